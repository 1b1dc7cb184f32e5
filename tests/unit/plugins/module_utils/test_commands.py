"""Command templates (strict rendering, shell quoting) and the command runner."""

import logging
import os
import re
import subprocess
import time

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import _commands
from ansible_collections.fireap.consul.plugins.module_utils._commands import (
    OUTPUT_TAIL_BYTES,
    CommandVariables,
    VARIABLES as NAMES,
    TemplateError,
    fill_template,
    render_command,
    render_phases,
    run_commands,
    run_phases,
    template_variables,
)
from ansible_collections.fireap.consul.plugins.module_utils._errors import InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import parse_config

VARIABLES = CommandVariables(app="myapp", version="1.0", node="node-1",
                             remote_name="node-0", remote_address="10.0.0.1",
                             artifact="/srv/builds/myapp-1.0.tar.gz")

HOSTILE = [
    "1.0;rm -rf /",
    "$(id)",
    "`id`",
    "it's",
    'say "hi"',
    "line1\nline2",
    "../../etc/passwd",
    "a  b\tc",
    "*",
    "~root",
    "$HOME",
    "back\\slash",
    "-n",
    "",
    "a|b&c>d<e",
    "{{ app }}",
]


FIELDS = ("app", "version", "node", "remote_name", "remote_address")


def variables(**values):
    fields = dict(app="myapp", version="1.0", node="node-1", remote_name="node-0",
                  remote_address="10.0.0.1", artifact="/srv/builds/myapp-1.0.tar.gz")
    fields.update(values)
    return CommandVariables(**fields)


def unchecked_variables(**values):
    """CommandVariables holding ``values`` without the checks: what the quoting layer alone
    would make of a value that got past them."""
    fields = dict(app="myapp", version="1.0", node="node-1", remote_name="node-0",
                  remote_address="10.0.0.1", artifact="/srv/builds/myapp-1.0.tar.gz")
    fields.update(values)
    unchecked = object.__new__(CommandVariables)
    for name, value in fields.items():
        object.__setattr__(unchecked, name, value)
    return unchecked


def fill(template, **values):
    """fill_template with every placeholder's value (``remote_name`` for ``remote.name``)."""
    fields = dict(app="myapp", version="1.0", node="node-1", remote_name="node-0",
                  remote_address="10.0.0.1", artifact="/srv/builds/myapp-1.0.tar.gz")
    fields.update(values)
    return fill_template(template, {name: fields[name.replace(".", "_")] for name in NAMES})


def sh(command):
    return subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE,
                          check=True).stdout.decode()


def app(**settings):
    settings.setdefault("exec_commands", ["true"])
    return parse_config({"apps": {"myapp": settings}}).app("myapp")


def process_gone(pid):
    """True once ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def template_variables_name(template):
    return template.split("{{")[1].split("}}")[0].strip()


def wait_gone(pid):
    end = time.monotonic() + 10
    while not process_gone(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return process_gone(pid)


# --- templates -----------------------------------------------------------------

def test_template_variables_in_order():
    assert template_variables(
        "rsync -a {{ remote.address }}::apps/{{app}}/ /opt/{{  app  }}/ # {{ version }}"
    ) == ("remote.address", "app", "app", "version")


def test_template_without_variables():
    assert template_variables("systemctl restart myapp") == ()
    assert render_command("echo '}}' \"}}\"", VARIABLES) == "echo '}}' \"}}\""


def test_render_all_variables():
    template = "x {{ app }} {{ version }} {{ node }} {{ remote.name }} {{ remote.address }}"
    assert render_command(template, VARIABLES) == "x myapp 1.0 node-1 node-0 10.0.0.1"


def test_render_quotes_values():
    rendered = fill("cp {{ version }} /opt/{{ app }}/", version="1.0;rm -rf /", app="my app")
    assert rendered == "cp '1.0;rm -rf /' /opt/'my app'/"
    assert render_command("cp {{ version }} /opt/{{ app }}/", variables(version="1.0~rc1")) == (
        "cp '1.0~rc1' /opt/myapp/")


def test_render_command_is_fill_template_with_the_checked_values():
    template = "x {{ app }} {{ version }} {{ node }} {{ remote.name }} {{ remote.address }}"
    values = {name: VARIABLES.value(name) for name in NAMES}
    assert render_command(template, VARIABLES) == fill_template(template, values)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_arrives_as_one_intact_argument(value):
    command = fill("for a in {{ version }}; do printf '[%s]' \"$a\"; done", version=value)
    assert sh(command) == "[%s]" % value


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_joined_to_text_stays_one_word(value):
    command = fill("printf '%s\\n' /opt/{{ app }}/current", app=value)
    assert sh(command) == "/opt/%s/current\n" % value


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_is_refused_for_every_variable(field, value):
    with pytest.raises(ValueError):
        variables(**{field: value})


def test_hostile_value_through_runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    value = "1.0;touch pwned $(touch pwned2)`touch pwned3`"
    with pytest.raises(ValueError, match="version"):
        variables(version=value)
    # Were a value to get past the checks, the quoting alone would still keep it inert.
    result = run_commands(["printf '%s' {{ version }}"], unchecked_variables(version=value),
                          timeout=10, on_failure="abort")
    assert result.ok
    assert result.results[0].output == value
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("template, message", [
    ("echo {{ remote.host }}",
     "unknown variable 'remote.host' in '{{ remote.host }}'; did you mean 'remote.address'?"),
    ("echo {{ build_id }}", "unknown variable 'build_id' in '{{ build_id }}' (variables: "
                            "app, version, node, remote.name, remote.address, artifact)"),
    ("echo {{ remote }}", "unknown variable 'remote'"),
    ("echo {{ app | upper }}", "filters are not supported in '{{ app | upper }}'"),
    ("echo {{ app ~ version }}", "only a variable name may stand in '{{ app ~ version }}'"),
    ("echo {{ remote['name'] }}", "only a variable name may stand in"),
    ("echo {{ }}", "empty placeholder '{{ }}'"),
    ("echo {{ app", "'{{' without a closing '}}'"),
    ("echo {{ app }} {{ version", "'{{' without a closing '}}'"),
    ("{% if app %}echo{% endif %}", "'{%' starts a Jinja statement"),
    ("echo {# note #} {{ app }}", "'{#' starts a Jinja comment"),
    ("echo {{- app -}}", "only a variable name may stand in"),
])
def test_template_refused(template, message):
    with pytest.raises(TemplateError) as info:
        template_variables(template)
    assert message in str(info.value)


@pytest.mark.parametrize("template, where", [
    ("echo '{{ app }}'", "is inside single quotes"),
    ('echo "/opt/{{ app }}"', "is inside double quotes"),
    ("sh -c 'cd /opt/{{ app }} && make'", "is inside single quotes"),
    ('echo "$(cat "{{ app }}")"', "is inside double quotes"),
    ("echo `cat '{{ app }}'`", "is inside single quotes"),
    ('echo "a\\"{{ app }}"', "is inside double quotes"),
    ("echo \\{{ app }}", "follows a backslash"),
    ("cat <<EOF\n{{ version }}\nEOF", "is in a here-document body"),
    ("echo `ls {{ app }}`", "is inside backquotes"),
])
def test_variable_in_unsafe_shell_context_refused(template, where):
    with pytest.raises(TemplateError) as info:
        template_variables(template)
    assert str(info.value).startswith("{{ %s }} %s" % (template_variables_name(template), where))


@pytest.mark.parametrize("template", [
    "echo \"it's\" {{ app }}",
    "echo 'a \"b' {{ app }} \"c 'd\"",
    "make # it's fine\necho {{ app }}",
    "echo \"$(ls {{ app }})\"",
    "echo $( (cd /opt && ls) ) {{ app }}",
    "cat <<EOF > /opt/{{ app }}/VERSION\nfixed text\nEOF",
    "echo \\' {{ app }}",
    "echo a#b {{ app }}",
])
def test_variable_in_safe_shell_context_accepted(template):
    assert "app" in template_variables(template)


@pytest.mark.parametrize("field, value, message", [
    ("version", 1.0, "version must be a non-empty string, got 1.0"),
    ("app", None, "app name must be a non-empty string, got None"),
    ("node", b"n1", "node name must be a non-empty string, got b'n1'"),
    ("remote_name", 7, "source node name must be a non-empty string, got 7"),
    ("remote_address", None, "source address must be a non-empty string, got None"),
])
def test_variables_must_be_strings(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        variables(**{field: value})


def test_variables_refuse_nul():
    with pytest.raises(ValueError, match=re.escape("node name 'a\\x00b' may only contain")):
        variables(node="a\0b")


def test_variables_value_lookup():
    assert VARIABLES.value("remote.address") == "10.0.0.1"
    with pytest.raises(KeyError):
        VARIABLES.value("remote_address")


# --- dry run ---------------------------------------------------------------------

def test_render_phases_in_order_with_labels():
    config = app(before_commands=["stop {{ app }}"], exec_commands=["pull {{ remote.name }}",
                                                                    "check {{ version }}"],
                 after_commands=["start {{ app }}"])
    assert render_phases(config, variables(version="2.0~beta")) == (
        ("before_commands[0]", "stop myapp"),
        ("exec_commands[0]", "pull node-0"),
        ("exec_commands[1]", "check '2.0~beta'"),
        ("after_commands[0]", "start myapp"),
    )


def test_render_phases_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    config = app(exec_commands=["touch %s" % marker])
    assert render_phases(config, VARIABLES) == (("exec_commands[0]", "touch %s" % marker),)
    assert not marker.exists()


# --- runner ----------------------------------------------------------------------

def test_run_success_records_each_command():
    result = run_commands(["echo out", "echo err >&2; printf {{ app }}"], VARIABLES,
                          timeout=10, on_failure="abort")
    assert result.ok and result.error is None and result.failures == ()
    first, second = result.results
    assert (first.label, first.command, first.returncode, first.output, first.error) == (
        "exec_commands[0]", "echo out", 0, "out\n", None)
    assert (second.label, second.command, second.output) == (
        "exec_commands[1]", "echo err >&2; printf myapp", "err\nmyapp")
    assert first.duration >= 0 and second.duration >= 0


def test_run_phase_name_in_labels():
    result = run_commands(["true"], VARIABLES, timeout=10, on_failure="abort",
                          phase="before_commands")
    assert result.results[0].label == "before_commands[0]"


def test_abort_stops_at_first_failure(tmp_path):
    marker = tmp_path / "ran"
    result = run_commands(["true", "echo broken; exit 3", "touch %s" % marker], VARIABLES,
                          timeout=10, on_failure="abort")
    assert not result.ok
    assert [r.returncode for r in result.results] == [0, 3]
    assert result.results[1].error == "exit status 3"
    assert result.error == ("exec_commands[1] failed (exit status 3): echo broken; exit 3\n"
                            "output:\nbroken\n(1 later command not run)")
    assert not marker.exists()


def test_ignore_runs_all_and_names_failures(tmp_path):
    marker = tmp_path / "ran"
    result = run_commands(["exit 1", "true", "echo last; exit 2", "touch %s" % marker],
                          VARIABLES, timeout=10, on_failure="ignore")
    assert result.ok
    assert marker.exists()
    assert [r.label for r in result.failures] == ["exec_commands[0]", "exec_commands[2]"]
    assert result.error.startswith(
        "2 of 4 commands failed, ignored (on_command_failure: ignore): "
        "exec_commands[0] (exit status 1), exec_commands[2] (exit status 2)\n"
        "exec_commands[2] failed (exit status 2): echo last; exit 2\noutput:\nlast")


def test_run_phases_abort_applies_across_phases(tmp_path):
    ran = tmp_path / "ran"
    config = app(before_commands=["exit 4"], exec_commands=["touch %s" % ran],
                 after_commands=["touch %s" % ran])
    result = run_phases(config, VARIABLES)
    assert not result.ok
    assert [r.label for r in result.results] == ["before_commands[0]"]
    assert "(2 later commands not run)" in result.error
    assert not ran.exists()


def test_run_phases_order_and_ignore(tmp_path):
    log = tmp_path / "log"
    config = app(on_command_failure="ignore",
                 before_commands=["echo before >> %s; exit 1" % log],
                 exec_commands=["echo exec {{ version }} >> %s" % log],
                 after_commands=["echo after >> %s" % log])
    result = run_phases(config, variables(version="9"))
    assert result.ok
    assert [r.label for r in result.failures] == ["before_commands[0]"]
    assert log.read_text() == "before\nexec 9\nafter\n"


def test_run_phases_uses_command_timeout():
    result = run_phases(app(command_timeout=0.5, exec_commands=["sleep 100"]), VARIABLES,
                        kill_grace=0.2)
    assert not result.ok
    assert result.results[0].error == "timed out after 0.5s"


def test_timeout_kills_command_and_its_children():
    result = run_commands(["sleep 100 & echo $!; wait"], VARIABLES, timeout=0.5,
                          on_failure="abort", kill_grace=0.2)
    failed = result.results[0]
    assert (failed.returncode, failed.error) == (None, "timed out after 0.5s")
    assert result.error.startswith("exec_commands[0] failed (timed out after 0.5s)")
    assert wait_gone(int(failed.output))


def test_timeout_escalates_to_sigkill():
    # Both the shell and its child ignore SIGTERM: only SIGKILL ends them.
    result = run_commands(["trap '' TERM; sleep 100 & echo $!; wait"], VARIABLES,
                          timeout=0.5, on_failure="abort", kill_grace=0.2)
    assert result.results[0].error == "timed out after 0.5s"
    assert wait_gone(int(result.results[0].output))


def test_timeout_when_command_closes_its_output():
    result = run_commands(["exec >/dev/null 2>&1; sleep 100"], VARIABLES, timeout=0.5,
                          on_failure="abort", kill_grace=0.2)
    assert result.results[0].error == "timed out after 0.5s"


def test_background_process_holding_output_does_not_block():
    # The shell exits at once; its background child keeps the output pipe open. The
    # command counts as finished (a wait for the pipe would hit the timeout instead).
    result = run_commands(["sleep 30 & echo $!"], VARIABLES, timeout=20, on_failure="abort")
    child = int(result.results[0].output)
    try:
        assert result.ok
        assert not process_gone(child)
    finally:
        os.kill(child, 9)


def test_output_tail_is_bounded():
    result = run_commands(["head -c 100000 /dev/zero | tr '\\0' a; echo END"], VARIABLES,
                          timeout=10, on_failure="abort")
    output = result.results[0].output
    header, kept = output.split("\n", 1)
    assert header == "[%d earlier bytes not kept]" % (100004 - OUTPUT_TAIL_BYTES)
    assert len(kept.encode()) == OUTPUT_TAIL_BYTES
    assert kept.endswith("aaaEND\n")


def test_killed_by_signal():
    result = run_commands(["kill -9 $$"], VARIABLES, timeout=10, on_failure="abort")
    assert (result.results[0].returncode, result.results[0].error) == (-9, "killed by SIGKILL")


def test_stdin_is_empty():
    result = run_commands(["cat; echo done"], VARIABLES, timeout=10, on_failure="abort")
    assert result.results[0].output == "done\n"


def test_shell_that_cannot_start(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-shell")
    monkeypatch.setattr(_commands, "SHELL", missing)
    result = run_commands(["true"], VARIABLES, timeout=10, on_failure="abort")
    assert not result.ok
    assert result.results[0].returncode is None
    assert result.results[0].error.startswith("could not start %s: " % missing)


def test_bad_template_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(TemplateError, match="unknown variable 'ver'"):
        run_commands(["touch %s" % marker, "echo {{ ver }}"], VARIABLES, timeout=10,
                     on_failure="abort")
    assert not marker.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout": 10, "on_failure": "stop"}, "on_failure must be one of abort, ignore, got 'stop'"),
    ({"timeout": 0, "on_failure": "abort"}, "timeout must be a number of seconds > 0, got 0"),
    ({"timeout": "5", "on_failure": "abort"}, "timeout must be a number of seconds > 0"),
])
def test_run_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_commands(["true"], VARIABLES, **kwargs)


def test_run_logs_commands_and_failures(caplog):
    log = logging.getLogger("fireap.test")
    with caplog.at_level(logging.INFO, logger="fireap.test"):
        run_commands(["echo {{ app }}", "echo oops; exit 5"], VARIABLES, timeout=10,
                     on_failure="abort", log=log)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "exec_commands[0]: running: echo myapp"
    assert messages[1].startswith("exec_commands[0]: ok in ")
    assert messages[2] == "exec_commands[1]: running: echo oops; exit 5"
    assert messages[3].startswith("exec_commands[1]: exit status 5 (ran ")
    assert messages[3].endswith("; output tail:\noops\n")
    assert caplog.records[3].levelno == logging.ERROR


def test_an_app_with_an_artifact_has_no_source_to_render():
    variables = CommandVariables(app="myapp", version="1.0", node="node-1", artifact="/srv/builds/myapp-1.0.tar.gz")
    assert render_command("tar -xzf {{ artifact }}", variables) == "tar -xzf /srv/builds/myapp-1.0.tar.gz"
    with pytest.raises(InvalidValue, match=r"the app has no single source for \{\{ remote.address \}\}"):
        render_command("rsync {{ remote.address }}::x /x", variables)
    with pytest.raises(ValueError, match="source node"):
        CommandVariables(app="myapp", version="1.0", node="node-1", remote_address="10.0.0.1")
