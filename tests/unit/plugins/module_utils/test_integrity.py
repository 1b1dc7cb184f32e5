"""A build's verification on a node: the checksum of a file, the verify settings of the task
config, and the verify phase between exec_commands and after_commands."""

import hashlib
import shlex

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import _integrity
from ansible_collections.fireap.consul.plugins.module_utils._commands import (
    CommandVariables,
    TemplateError,
    render_command,
    render_path,
    render_phases,
    run_phases,
)
from ansible_collections.fireap.consul.plugins.module_utils._errors import InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._integrity import (
    file_checksum,
    file_mismatch,
    verification_problem,
)
from ansible_collections.fireap.consul.plugins.module_utils._reap import list_text
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import ConfigError, parse_config


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BUILD = b"the build\n"
GOOD = digest(BUILD)
OTHER = digest(b"another build\n")


def app(**settings):
    settings.setdefault("exec_commands", ["true"])
    return parse_config({"apps": {"myapp": settings}}).app("myapp")


def variables(checksum=GOOD, **values):
    fields = dict(app="myapp", version="1.0", node="node-1", remote_name="node-0", remote_address="10.0.0.1")
    fields.update(values)
    return CommandVariables(checksum=checksum, **fields)


# --- the checksum of a file ------------------------------------------------------------------

def test_file_checksum_reads_a_file_larger_than_a_chunk_piece_by_piece(tmp_path, monkeypatch):
    data = bytes(range(256)) * 1000
    path = tmp_path / "build.bin"
    path.write_bytes(data)
    monkeypatch.setattr(_integrity, "CHUNK", 4096)
    assert file_checksum(str(path)) == digest(data)


def test_file_mismatch_names_the_file_and_both_digests(tmp_path):
    path = tmp_path / "build.tar"
    path.write_bytes(BUILD)
    assert file_mismatch(str(path), GOOD) is None
    assert file_mismatch(str(path), OTHER) == f"checksum mismatch: {path} has {GOOD}, the release expects {OTHER}"


def test_file_mismatch_of_a_missing_file_says_it_cannot_be_read(tmp_path):
    missing = tmp_path / "absent.tar"
    assert file_mismatch(str(missing), GOOD) == f"cannot read {missing} to compute its checksum: No such file or directory"


# --- what a release and an app's settings must agree on --------------------------------------

def test_a_checksum_without_verification_fails_saying_what_to_configure():
    problem = verification_problem(app(), GOOD)
    assert problem.startswith(f"the release carries the checksum {GOOD}, but app myapp configures no verification")
    assert "set verify_file or verify_commands under apps.myapp (or defaults)" in problem


@pytest.mark.parametrize("settings", [{"verify_file": "/srv/build.tar"}, {"verify_commands": ["true"]}])
def test_verification_without_a_checksum_fails_saying_how_to_fire(settings):
    problem = verification_problem(app(**settings), None)
    assert problem.startswith("app myapp verifies its build on this node")
    assert "fire it with checksum or checksum_file (release.yml: fireap_checksum or fireap_checksum_file)" in problem


@pytest.mark.parametrize("settings, checksum", [
    ({}, None),
    ({"verify_file": "/srv/build.tar"}, GOOD),
    ({"artifact": {"path": "/srv/builds/{{ app }}-{{ version }}.tar.gz"}}, GOOD),  # the swarm checks the file
])
def test_a_release_and_an_app_that_agree_have_no_problem(settings, checksum):
    assert verification_problem(app(**settings), checksum) is None


# --- the settings ------------------------------------------------------------------------------

def test_the_verify_settings_merge_with_defaults_and_are_listed():
    config = parse_config({"defaults": {"verify_file": "/srv/{{ app }}/{{ version }}.tar"},
                           "apps": {"a": {"exec_commands": ["true"], "verify_commands": ["check {{ checksum }}"]},
                                    "b": {"exec_commands": ["true"], "verify_file": None}}})
    listing = config.app("a").listing()
    assert listing["verify_file"] == "/srv/{{ app }}/{{ version }}.tar"
    assert listing["verify_commands"] == ["check {{ checksum }}"]
    assert list(listing).index("verify_commands") == list(listing).index("exec_commands") + 1
    assert (config.app("b").verify_file, config.app("b").verify_commands) == (None, ())


@pytest.mark.parametrize("settings, message", [
    ({"verify_file": "srv/build.tar"}, "apps.myapp.verify_file: must be an absolute path, got 'srv/build.tar'"),
    ({"verify_file": "/srv/{{ remote.name }}.tar"},
     "apps.myapp.verify_file: unknown variable 'remote.name' in '{{ remote.name }}' (variables: app, version, node)"),
    ({"verify_file": "/srv/{{ checksum }}"}, "apps.myapp.verify_file: '{{ checksum }}' is set only in verify_commands"),
    ({"verify_file": "/srv/{{ app | upper }}"}, "apps.myapp.verify_file: filters are not supported"),
    ({"verify_file": "/srv/build\n.tar"}, "apps.myapp.verify_file: must not contain control characters"),
    ({"verify_file": ["/srv/build.tar"]}, "apps.myapp.verify_file: must be an absolute path"),
    ({"after_commands": ["echo {{ checksum }}"]},
     "apps.myapp.after_commands[0]: '{{ checksum }}' is set only in verify_commands"),
    ({"exec_commands": ["echo {{ checksum }}"]},
     "apps.myapp.exec_commands[0]: '{{ checksum }}' is set only in verify_commands"),
    ({"verify_commands": ["test \"{{ checksum }}\" = x"]},
     "apps.myapp.verify_commands[0]: {{ checksum }} is inside double quotes"),
    ({"verify_commands": ["sh -c 'echo '{{ checksum }}"]},
     "apps.myapp.verify_commands[0]: {{ checksum }} is in a 'sh' command line with an option that runs program text"),
    ({"verify_commands": ["eval {{ checksum }}"]}, "apps.myapp.verify_commands[0]: {{ checksum }} is an argument of 'eval'"),
    ({"verify_commands": "check {{ checksum }}"}, "apps.myapp.verify_commands: must be a list of commands"),
])
def test_bad_verify_settings_are_refused_at_load(settings, message):
    with pytest.raises(ConfigError) as info:
        app(**settings)
    assert message in str(info.value)


def test_the_task_list_shows_the_verification_where_it_runs():
    config = parse_config({"apps": {"myapp": {"exec_commands": ["pull"], "verify_file": "/srv/{{ app }}.tar",
                                              "verify_commands": ["check {{ checksum }}"], "after_commands": ["start"]},
                                    "plain": {"exec_commands": ["true"]}}}, source="c.yml")
    text = list_text(config)
    assert ("myapp:\n  exec_commands: pull\n  verify_file: /srv/{{ app }}.tar\n  verify_commands: check {{ checksum }}\n"
            "  after_commands: start\n") in text
    assert text.endswith("plain:\n  exec_commands: true\n")


def test_an_app_with_only_verify_commands_has_no_commands():
    with pytest.raises(ConfigError, match=r"apps.myapp: has no commands"):
        parse_config({"apps": {"myapp": {"verify_commands": ["true"]}}})


# --- rendering ------------------------------------------------------------------------------

def test_the_checksum_is_one_plain_word_and_a_hostile_one_never_gets_in():
    command = render_command("printf %s {{ checksum }}", variables())
    assert shlex.split(command) == ["printf", "%s", GOOD]
    for hostile in ("sha256:" + "0" * 63 + ";", "-" + GOOD, GOOD.upper(), "md5:" + "0" * 32, GOOD + "\n"):
        with pytest.raises(InvalidValue):
            variables(checksum=hostile)


def test_the_checksum_variable_of_a_release_without_one_cannot_render():
    with pytest.raises(InvalidValue, match="the release carries no checksum"):
        render_command("check {{ checksum }}", variables(checksum=None))


def test_render_path_inserts_the_values_as_they_are():
    path = render_path("/srv/{{ app }}/{{node}}/build-{{ version }}.tar", variables(version="1.0~rc1"))
    assert path == "/srv/myapp/node-1/build-1.0~rc1.tar"
    with pytest.raises(TemplateError):
        render_path("build.tar", variables())


def test_render_phases_shows_the_verification_between_exec_and_after():
    config = app(before_commands=["stop {{ app }}"], verify_file="/srv/{{ app }}.tar",
                 verify_commands=["check {{ checksum }}"], after_commands=["start {{ app }}"])
    assert render_phases(config, variables()) == (
        ("before_commands[0]", "stop myapp"),
        ("exec_commands[0]", "true"),
        ("verify_file", f"sha256 of /srv/myapp.tar must be {GOOD}"),
        ("verify_commands[0]", f"check {GOOD}"),
        ("after_commands[0]", "start myapp"),
    )


# --- the verify phase ------------------------------------------------------------------------

def steps_app(tmp_path, **settings):
    """An app whose every phase appends its name to ``ran``; exec_commands writes the build."""
    ran = tmp_path / "ran"
    build = tmp_path / "build.tar"
    settings = {"before_commands": [f"echo before >> {ran}"],
                "exec_commands": [f"printf 'the build\\n' > {build}; echo exec >> {ran}"],
                "verify_file": str(build),
                "verify_commands": [f"echo verify {{{{ checksum }}}} >> {ran}"],
                "after_commands": [f"echo after >> {ran}"], **settings}
    return app(**settings), ran, build


def test_a_matching_build_runs_every_phase_in_order(tmp_path):
    config, ran, _build = steps_app(tmp_path)
    result = run_phases(config, variables())
    assert result.ok and result.error is None, result.error
    assert [step.label for step in result.results] == [
        "before_commands[0]", "exec_commands[0]", "verify_file", "verify_commands[0]", "after_commands[0]"]
    assert ran.read_text() == f"before\nexec\nverify {GOOD}\nafter\n"


@pytest.mark.parametrize("policy", ["abort", "ignore"])
def test_a_mismatch_stops_before_verify_commands_and_after_commands_whatever_the_policy(tmp_path, policy):
    config, ran, build = steps_app(tmp_path, on_command_failure=policy)
    result = run_phases(config, variables(checksum=OTHER))
    assert not result.ok
    assert result.error == (f"verify_file failed: checksum mismatch: {build} has {GOOD}, the release expects {OTHER}\n"
                            "(2 later commands not run)")
    assert ran.read_text() == "before\nexec\n"


@pytest.mark.parametrize("policy", ["abort", "ignore"])
def test_a_failed_verify_command_stops_before_after_commands_whatever_the_policy(tmp_path, policy):
    config, ran, _build = steps_app(tmp_path, on_command_failure=policy, verify_file=None,
                                    verify_commands=["echo signature bad >&2; exit 7"])
    result = run_phases(config, variables())
    assert not result.ok
    assert result.error.startswith("verify_commands[0] failed (exit status 7): echo signature bad >&2; exit 7\n"
                                   "output:\nsignature bad")
    assert ran.read_text() == "before\nexec\n"


def test_an_ignored_exec_failure_still_gets_verified(tmp_path):
    config, ran, build = steps_app(tmp_path, on_command_failure="ignore", exec_commands=["exit 3"])
    result = run_phases(config, variables())
    assert not result.ok
    assert result.error.startswith(f"verify_file failed: cannot read {build} to compute its checksum")
    assert ran.read_text() == "before\n"


@pytest.mark.parametrize("settings, checksum", [({"verify_file": None, "verify_commands": []}, GOOD), ({}, None)])
def test_a_checksum_and_settings_that_disagree_run_nothing(tmp_path, settings, checksum):
    config, ran, _build = steps_app(tmp_path, **settings)
    result = run_phases(config, variables(checksum=checksum))
    assert (result.ok, result.results) == (False, ())
    assert result.error == verification_problem(config, checksum)
    assert not ran.exists()


def test_an_app_without_verification_runs_as_before_on_a_release_without_checksum(tmp_path):
    config, ran, _build = steps_app(tmp_path, verify_file=None, verify_commands=[])
    assert run_phases(config, variables(checksum=None)).ok
    assert ran.read_text() == "before\nexec\nafter\n"
