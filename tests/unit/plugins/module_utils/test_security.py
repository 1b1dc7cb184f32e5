"""Nothing read from Consul becomes an option, code, or an unbounded allocation on a node.

First the seven cases of the security issue, one or more ``test_case<N>_...`` each; then the
same class of test for every other value a node reads from Consul (each field of the release
record, plan entry, node record and lock record), for every command placeholder and for the
event payload. The end-to-end runs against the Consul double are in test_worker.py and
test_reap.py (``test_hostile_...``).

The case tests reach the newer APIs through their modules (``_propagation.read_run``, ...),
so that each one runs, and fails on its own, against a tree without them.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import stat

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import (
    _commands,
    _firing,
    _propagation,
    _reap,
    _task_event,
    _taskconfig,
)
from ansible_collections.fireap.consul.plugins.module_utils._commands import CommandVariables, TemplateError
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    HISTORY_MAX,
    AppAdvert,
    History,
    KVRecordError,
    LockRecord,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    RunSummary,
    Schema,
    SwarmRun,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import (
    ClaimOutcome,
    PullMachine,
    PullResult,
    PullTimings,
    WriteState,
)

SCHEMA = Schema()
APP = "web"
ME = "node-me"
RELEASE_KEY = SCHEMA.release(APP)
PLAN_KEY = SCHEMA.plan(APP, "run-1", ME)
OWN_KEY = SCHEMA.node(APP, ME)
LOCK_KEY = SCHEMA.lock(APP)
T0 = 1700000000.0
TIMINGS = PullTimings(watch_timeout=600, start_grace=20, busy_grace=15, max_wait=10, fallback_tries=2)

PROXY_COMMAND = "-oProxyCommand=touch /tmp/x"
SUBSTITUTION = "$(touch${IFS}/tmp/x)"

RELEASE = {
    "app": APP, "version": "1.0", "run_id": "run-1", "fanout": 2, "leader": "lead", "target_count": 3,
    "fired_at": T0, "filters": {"node": "^web", "service": "nginx", "tag": "blue"}, "status": "running",
}
PLAN = {"run_id": "run-1", "source": "lead", "stage": 2, "slot": 1, "after": "prev", "source_address": "10.0.0.1"}
SWARM_PLAN = {**PLAN, "peers": ["10.0.0.1:6881", "[fd00::2]:6881"]}
SWARM_RUN = {"leader_peers": ["10.0.0.2:6881"], "finished": T0 + 9}
SWARM_KEY = SCHEMA.swarm_run(APP, "run-1")
PULLING = {"version": "1.0", "run_id": "run-1", "status": "pulling", "started": T0, "source": "lead", "depth": 1,
           "downloaded": 1000, "rate": 500}
ADVERT = {"max_semaphores": 2, "artifact": "/srv/builds/{{ app }}-{{ version }}.tar.gz", "artifact_port": 6881}
ADVERT_KEY = SCHEMA.advert(ME)
STATE = {"version": "1.0", "run_id": "run-1", "status": "done", "started": T0, "source": "lead", "depth": 1,
         "finished": T0 + 1}
FAILED_STATE = {"version": "1.0", "run_id": "run-1", "status": "failed", "started": T0, "finished": T0 + 1,
                "error": "exec_commands[0] failed (exit status 1)\noutput:\nboom"}
LOCK = {"run_id": "run-1", "holder": "controller.example.com", "since": T0}
RUN = {"run_id": "run-1", "version": "1.0", "kind": "release", "fired_by": "ops@ctl", "fired_at": T0, "target_count": 3,
       "outcome": "failed", "done": 2, "failed": 1, "finished_at": T0 + 5, "abort_reason": "r", "retry_of": "run-0"}
HISTORY_KEY = SCHEMA.history(APP)

#: The control characters no value may carry into a message or a log line.
CONTROLS = [chr(code) for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)]
#: How long an error message about a hostile value may be (values are shown clipped).
MESSAGE_MAX = 1000

#: Hostile strings for a field that is a name, a run ID, a version or an address.
HOSTILE_WORDS = {
    "leading dash": "-x",
    "option": PROXY_COMMAND,
    "semicolon": "a;touch x",
    "substitution": SUBSTITUTION,
    "backquote": "a`id`",
    "pipe": "a|sh",
    "space": "a b",
    "quote": "a'b",
    "glob": "a*",
    "newline": "1.0\nFORGED LINE",
    "escape": "a\x1b[31m",
    "nul": "a\x00b",
    "empty": "",
    "over-long": "a" * 10240,
    "int": 5,
    "bool": True,
    "list": ["a"],
    "object": {"a": "b"},
}
#: Hostile values of an integer field.
HOSTILE_INTS = {
    "huge": 10**12,
    "very huge": 10**400,
    "negative": -1,
    "true": True,
    "false": False,
    "float": 1.5,
    "NaN": math.nan,
    "inf": math.inf,
    "string": "1",
    "list": [1],
}
#: Hostile values of a time field (float epoch seconds).
HOSTILE_TIMES = {
    "NaN": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "negative": -1,
    "past year 9999": 253402300800,
    "huge": 1e300,
    "true": True,
    "string": "1",
    "list": [1.0],
    "object": {},
}
#: Hostile values of a free-text field (never put into a command, but into messages and logs).
HOSTILE_LINES = {
    "newline": "reason\nFORGED LINE",
    "escape": "reason\x1b[2J",
    "carriage return": "reason\rFORGED",
    "line separator": "reason\u2028FORGED",
    "over-long": "r" * 10240,
    "int": 5,
    "bool": True,
    "list": ["r"],
}
HOSTILE_CHOICES = {"unknown": "finished", "newline": "done\n", "case": "DONE", "empty": "", "int": 1, "bool": True}
#: Hostile values of a list of swarm peers (``ADDRESS:PORT``, connected to by libtorrent).
HOSTILE_PEERS = {
    "host name": ["node-1.example.com:6881"],
    "option": [PROXY_COMMAND + ":6881"],
    "zone": ["[fe80::1%eth0]:6881"],
    "unbracketed IPv6": ["fd00::1:6881"],
    "privileged port": ["10.0.0.1:22"],
    "port past 65535": ["10.0.0.1:70000"],
    "huge port": ["10.0.0.1:" + "9" * 5000],
    "newline": ["10.0.0.1:6881\nFORGED"],
    "nine peers": [f"10.0.0.{index}:6881" for index in range(9)],
    "repeated": ["10.0.0.1:6881"] * 2,
    "huge list": ["10.0.0.1:6881"] * 100_000,
    "string": "10.0.0.1:6881",
    "object": {},
    "int": [6881],
}


def dumps(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def with_field(base: dict, field: str, value) -> dict:
    return {**base, field: value}


def assert_one_bounded_line(text: str) -> None:
    assert not any(char in text for char in CONTROLS), repr(text[:200])
    assert len(text) <= MESSAGE_MAX, len(text)


def assert_refused(cls, obj: dict, key: str, field: str) -> KVRecordError:
    with pytest.raises(KVRecordError) as info:
        cls.from_json(dumps(obj), key)
    assert info.value.key == key
    assert f"'{field}'" in str(info.value)
    assert_one_bounded_line(str(info.value))
    return info.value


def start_problem_run(release_value: bytes, plan_value: bytes, own: NodeState | None = None):
    """The records read as a worker reads them, and the machine's first action."""
    release, plan, problem = _propagation.read_run(RELEASE_KEY, release_value, PLAN_KEY, plan_value)
    machine = PullMachine(ME, release, plan, own, TIMINGS, problem=problem)
    return machine, problem, machine.start(T0)


def assert_failed_record(machine, action, naming: str) -> NodeState:
    """``action`` writes ``failed`` with an error naming the problem; the run ends failed, unrun."""
    assert isinstance(action, WriteState), action
    state = action.state
    assert (state.status, state.run_id, state.version) == ("failed", "run-1", "1.0")
    assert naming in state.error
    assert_one_bounded_line(state.error)
    result = machine.on_written(True, T0)
    assert isinstance(result, PullResult)
    assert result.failed and not result.ran_task and result.state == state
    return state


@pytest.fixture
def no_slot_lists(monkeypatch):
    """Fails the test if a node builds the list of a source's slots (its size is the fan-out)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a slot list was built: slot_order{args}")

    monkeypatch.setattr(_propagation, "slot_order", refuse)


@pytest.fixture
def private_umask():
    """Run with umask 022, so that file modes show what the code asked for."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def variables(**values) -> CommandVariables:
    fields = dict(app="myapp", version="1.0", node="node-1", remote_name="node-0", remote_address="10.0.0.1",
                  artifact="/srv/builds/myapp-1.0.tar.gz")
    fields.update(values)
    return CommandVariables(**fields)


def payload(app, version) -> str:
    return base64.b64encode(json.dumps({"app": app, "version": version}).encode("utf-8")).decode("ascii")


def config_with(template: str) -> dict:
    return {"apps": {APP: {"exec_commands": [template]}}}


# === seven attacks, and the checks that stop them =============================================

# --- 1. option injection through plan values ------------------------------------------------


def test_case1_a_plan_source_address_starting_with_dash_is_refused_by_the_reader():
    error = assert_refused(PlanEntry, with_field(PLAN, "source_address", PROXY_COMMAND), PLAN_KEY, "source_address")
    assert "neither an IP address nor a host name" in str(error)


@pytest.mark.parametrize("field", ["source", "after"])
@pytest.mark.parametrize("name", ["-x", "--help", "-oProxyCommand"])
def test_case1_a_plan_source_name_starting_with_dash_is_refused_by_the_reader(field, name):
    error = assert_refused(PlanEntry, with_field(PLAN, field, name), PLAN_KEY, field)
    assert "must start with a letter, a digit or '_'" in str(error)
    assert_refused(NodeState, with_field(STATE, "source", name), OWN_KEY, "source")


def test_case1_a_version_starting_with_dash_is_refused_by_the_leader_and_every_reader():
    with pytest.raises(ValueError, match="version '-v1' may only contain"):
        _firing.check_version("-v1")
    with pytest.raises(ValueError, match="version '-v1' may only contain"):
        _firing.fire(object(), SCHEMA, APP, "-v1")
    assert_refused(ReleaseRecord, with_field(RELEASE, "version", "-v1"), RELEASE_KEY, "version")
    assert_refused(NodeState, with_field(STATE, "version", "-v1"), OWN_KEY, "version")
    with pytest.raises(ValueError, match="its payload is invalid: version '-v1'"):
        _task_event.decode_payload(payload(APP, "-v1"))


@pytest.mark.parametrize("field", ["app", "version", "node", "remote_name", "remote_address"])
@pytest.mark.parametrize("value", ["-n", "--help", PROXY_COMMAND, "-oProxyCommand=touch${IFS}/tmp/x"])
def test_case1_no_placeholder_value_can_start_with_a_dash(field, value):
    with pytest.raises(ValueError):
        variables(**{field: value})


def test_case1_a_plan_with_an_option_as_address_fails_the_run_and_reaches_no_command(no_slot_lists):
    machine, problem, action = start_problem_run(dumps(RELEASE), dumps(with_field(PLAN, "source_address", PROXY_COMMAND)))
    assert (problem.run_id, problem.version) == ("run-1", "1.0")
    state = assert_failed_record(machine, action, f"malformed KV key '{PLAN_KEY}': field 'source_address'")
    assert "'-oProxyCommand=touch /tmp/x'" in state.error


# --- 2. arithmetic expansion ------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, problem",
    [
        ("echo $(( {{ version }} ))", "is inside an arithmetic expression"),
        ("echo $(( {{ version }} + 1 ))", "is inside an arithmetic expression"),
        ("(( {{ version }} > 1 ))", "is inside an arithmetic expression"),
        ("[[ {{ version }} -eq 1 ]]", "is inside [[ ]]"),
        ("if [[ -n x && {{ version }} -eq 1 ]]; then true; fi", "is inside [[ ]]"),
    ],
)
def test_case2_arithmetic_templates_are_refused_by_check_and_by_loading_the_config(template, problem):
    with pytest.raises(TemplateError, match=r"^\{\{ version \}\} " + problem.replace("[", r"\[").replace("]", r"\]")):
        _commands.template_variables(template)
    with pytest.raises(_taskconfig.ConfigError, match="apps.web.exec_commands"):
        _taskconfig.parse_config(config_with(template))


def test_case2_a_version_with_a_command_substitution_is_refused_by_the_leader():
    with pytest.raises(ValueError, match=r"version '\$\(touch\$\{IFS\}/tmp/x\)' may only contain"):
        _firing.check_version(SUBSTITUTION)
    with pytest.raises(ValueError, match=r"version '\$\(touch\$\{IFS\}/tmp/x\)' may only contain"):
        _firing.fire(object(), SCHEMA, APP, SUBSTITUTION)


def test_case2_a_version_with_a_command_substitution_is_refused_by_the_node():
    assert_refused(ReleaseRecord, with_field(RELEASE, "version", SUBSTITUTION), RELEASE_KEY, "version")
    assert_refused(NodeState, with_field(STATE, "version", SUBSTITUTION), OWN_KEY, "version")
    with pytest.raises(ValueError, match="its payload is invalid: version"):
        _task_event.decode_payload(payload(APP, SUBSTITUTION))
    with pytest.raises(ValueError, match="version"):
        variables(version=SUBSTITUTION)


# --- 3. backquotes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", ["echo `echo {{ version }}`", "x=`basename {{ app }}`", "echo \"`echo {{ version }}`\"", "echo `echo \\`{{ app }}\\``"]
)
def test_case3_templates_with_variables_in_backquotes_are_refused(template):
    with pytest.raises(TemplateError, match="is inside backquotes|follows a backslash"):
        _commands.template_variables(template)
    with pytest.raises(_taskconfig.ConfigError, match="apps.web.exec_commands"):
        _taskconfig.parse_config(config_with(template))


@pytest.mark.parametrize("version", ["1`id`", "`touch /tmp/x`", "1.0`"])
def test_case3_a_version_with_a_backquote_is_refused(version):
    with pytest.raises(ValueError, match="version '"):
        _firing.check_version(version)
    assert_refused(ReleaseRecord, with_field(RELEASE, "version", version), RELEASE_KEY, "version")
    with pytest.raises(ValueError, match="its payload is invalid: version"):
        _task_event.decode_payload(payload(APP, version))
    with pytest.raises(ValueError, match="version"):
        variables(version=version)


@pytest.mark.parametrize("template", [
    "echo $[ {{ version }} ]",
    "declare -i n={{ version }}",
    "typeset -i n={{ version }}",
    "f() { local -i n={{ version }}; }; f",
    "printf -v {{ version }} x",
    "test -v {{ version }}",
    "[ -v {{ version }} ]",
    "read {{ version }} < /dev/null",
    "arr[{{ version }}]=1",
    "coproc eval {{ version }}",
    "bash <<< {{ version }}",
])
def test_more_contexts_where_bash_evaluates_a_quoted_word_are_refused(template):
    try:
        _commands.template_variables(template)
    except TemplateError:
        return
    raise AssertionError(f"accepted: {template}")


# --- 4. the token in the commands' environment ------------------------------------------------------

CREDENTIALS = {
    "CONSUL_HTTP_TOKEN": "token-secret-1",
    "CONSUL_HTTP_TOKEN_FILE": "/etc/fireap/token-secret-2",
    "CONSUL_HTTP_AUTH": "user:token-secret-3",
    "CONSUL_CLIENT_KEY": "/etc/consul.d/token-secret-4.key",
    "CONSUL_CLIENT_CERT": "/etc/consul.d/token-secret-5.pem",
}


def test_case4_commands_run_without_any_consul_credential(monkeypatch, tmp_path):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500")
    env_file = tmp_path / "env.txt"
    result = _commands.run_commands(["env", f"env > {env_file}"], variables(), timeout=10, on_failure="abort")
    assert result.ok
    output = result.results[0].output
    written = env_file.read_text()
    for text in (output, written):
        for name, value in CREDENTIALS.items():
            assert f"{name}=" not in text and value not in text
    names = {line.split("=", 1)[0] for line in written.splitlines() if "=" in line}
    assert f"PATH={os.environ['PATH']}" in written.splitlines()
    assert "CONSUL_HTTP_ADDR" in names  # an address is no credential
    assert os.environ["CONSUL_HTTP_TOKEN"] == "token-secret-1"  # the handler's own environment is untouched


def test_case4_the_command_environment_drops_every_consul_credential_whatever_its_spelling():
    environ = {
        **CREDENTIALS,
        "CONSUL_GRPC_TOKEN": "t", "consul_http_token": "t", "CONSUL_LICENSE": "l", "CONSUL_AGENT_SECRET": "s",
        "CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_SSL": "true", "PATH": "/usr/bin", "HOME": "/var/lib/consul",
        "LANG": "C.UTF-8",
    }
    kept = _commands.command_environment(environ)
    assert kept == {"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_SSL": "true", "PATH": "/usr/bin",
                    "HOME": "/var/lib/consul", "LANG": "C.UTF-8"}
    assert "CONSUL_HTTP_TOKEN" in environ  # a copy: the mapping given is not changed


# --- 5. unbounded fan-out from KV --------------------------------------------------------------------


@pytest.mark.parametrize("fanout", [10**12, 65, 10**400])
def test_case5_a_release_record_with_a_huge_fanout_is_refused_by_the_reader(fanout):
    error = assert_refused(ReleaseRecord, with_field(RELEASE, "fanout", fanout), RELEASE_KEY, "fanout")
    assert "fanout must be an integer from 1 to 64" in str(error)


def test_case5_a_huge_fanout_is_recorded_failed_without_building_a_slot_list(no_slot_lists):
    machine, problem, action = start_problem_run(dumps(with_field(RELEASE, "fanout", 10**12)), dumps(PLAN))
    assert problem is not None and problem.run_id == "run-1"
    state = assert_failed_record(machine, action, f"malformed KV key '{RELEASE_KEY}': field 'fanout'")
    assert "fanout must be an integer from 1 to 64, got 1000000000000" in state.error


def test_case5_a_first_stage_puller_of_a_huge_fanout_release_builds_nothing(no_slot_lists):
    first_stage = {**PLAN, "stage": 1, "slot": 0, "after": None}
    machine, _problem, action = start_problem_run(dumps(with_field(RELEASE, "fanout", 10**12)), dumps(first_stage))
    assert_failed_record(machine, action, "field 'fanout'")


def test_case5_the_schedule_refuses_a_huge_fanout_before_allocating(monkeypatch):
    def bounded_range(*args):
        assert max(args) <= 1000, f"range{args} would be allocated"
        return range(*args)

    monkeypatch.setattr(_propagation, "range", bounded_range, raising=False)
    with pytest.raises(ValueError, match="fanout must be an integer from 1 to 64"):
        _propagation.slot_order(ME, 10**12)
    with pytest.raises(ValueError, match="fanout must be an integer from 1 to 64"):
        _propagation.plan_release(["a", "b"], "a", 10**12, "run-1")


# --- 6. unvalidated version on nodes, forged and flooded log lines, world-readable log ----------------

LONG_VERSION = "1" * 10240


@pytest.mark.parametrize("version", ["1.0\nFORGED 2024-01-01T00:00:00+0000 INFO fireap-reap[1] app=web", LONG_VERSION],
                         ids=["newline", "10 KB"])
def test_case6_a_version_with_a_newline_or_of_10_kb_is_refused_by_every_reader(version):
    assert_refused(ReleaseRecord, with_field(RELEASE, "version", version), RELEASE_KEY, "version")
    assert_refused(NodeState, with_field(STATE, "version", version), OWN_KEY, "version")
    assert_refused(NodeState, with_field(FAILED_STATE, "version", version), OWN_KEY, "version")
    rejected = _task_event.parse_event({"ID": "e1", "Name": _firing.EVENT_NAME, "Payload": payload(APP, version), "LTime": 1})
    assert isinstance(rejected, _task_event.RejectedEvent) and "its payload is invalid: version" in rejected.reason
    assert_one_bounded_line(rejected.reason)
    with pytest.raises(ValueError, match="version"):
        variables(version=version)


def test_case6_a_release_whose_version_is_malformed_cannot_be_named_and_is_not_followed():
    bad = dumps(with_field(RELEASE, "version", "1.0\nFORGED"))
    with pytest.raises(KVRecordError) as info:
        _propagation.read_run(RELEASE_KEY, bad, PLAN_KEY, dumps(PLAN))
    assert_one_bounded_line(str(info.value))


def log_lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_case6_one_log_record_is_one_line_whatever_its_message_holds(tmp_path, reap_logger):
    path = tmp_path / "log" / "reap.log"
    assert _reap.configure_logging(str(path)) is None
    forged = "1.0\n2024-01-01T00:00:00+0000 ERROR fireap-reap[1] app=web version=6.6.6: forged\x1b[2J\r\u2028end"
    logging.LoggerAdapter(reap_logger, {"app": APP, "version": "1.0"}).info("version %s", forged)
    lines = log_lines(path)
    assert len(lines) == 1
    assert not any(char in lines[0] for char in CONTROLS)
    assert lines[0].endswith("version 1.0\\n2024-01-01T00:00:00+0000 ERROR fireap-reap[1] app=web version=6.6.6: "
                             "forged\\x1b[2J\\r\\u2028end")


def test_case6_a_huge_log_message_is_clipped(tmp_path, reap_logger):
    path = tmp_path / "reap.log"
    _reap.configure_logging(str(path))
    reap_logger.error("output tail: %s", "x" * 1_000_000)
    lines = log_lines(path)
    assert len(lines) == 1 and len(lines[0]) < 100_000
    assert len(lines[0]) < _reap.LOG_MESSAGE_MAX_LENGTH + 200
    assert lines[0].endswith("characters in all]")


def test_case6_an_exception_in_a_log_record_stays_on_its_line(tmp_path, reap_logger):
    path = tmp_path / "reap.log"
    _reap.configure_logging(str(path))
    try:
        raise ValueError("bad\nvalue\x1b")
    except ValueError:
        reap_logger.exception("the pull stopped")
    (line,) = log_lines(path)
    assert "Traceback" in line and "bad\\nvalue\\x1b" in line
    assert not any(char in line for char in CONTROLS)


def test_case6_reap_log_is_created_private_and_a_world_readable_one_is_tightened(tmp_path, reap_logger, private_umask):
    new = tmp_path / "new" / "reap.log"
    _reap.configure_logging(str(new))
    assert stat.S_IMODE(new.stat().st_mode) == 0o640
    assert stat.S_IMODE(new.parent.stat().st_mode) == 0o750
    old = tmp_path / "old" / "reap.log"
    old.parent.mkdir(mode=0o755)
    old.write_text("earlier lines\n")
    old.chmod(0o644)
    _reap.configure_logging(str(old))
    assert stat.S_IMODE(old.stat().st_mode) == 0o640
    assert old.read_text().startswith("earlier lines\n")  # appended to, not replaced
    open_to_all = tmp_path / "all.log"
    open_to_all.write_text("")
    open_to_all.chmod(0o666)
    _reap.configure_logging(str(open_to_all))
    assert stat.S_IMODE(open_to_all.stat().st_mode) == 0o660


def test_case6_the_state_dir_is_private(tmp_path, private_umask):
    new = tmp_path / "state"
    _reap.private_dir(str(new))
    assert stat.S_IMODE(new.stat().st_mode) == 0o750
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o755)
    _reap.private_dir(str(existing))
    assert stat.S_IMODE(existing.stat().st_mode) == 0o750
    tighter = tmp_path / "tighter"
    tighter.mkdir()
    tighter.chmod(0o700)
    _reap.private_dir(str(tighter))
    assert stat.S_IMODE(tighter.stat().st_mode) == 0o700  # never loosened


def test_a_shared_directory_holding_the_log_is_left_as_it_is(tmp_path, reap_logger, private_umask):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert _reap.configure_logging(str(shared / "reap.log")) is None
    assert stat.S_IMODE((shared / "reap.log").stat().st_mode) == 0o640
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


# --- 7. self-sourced plan entry -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["source", "after"])
def test_case7_a_plan_entry_naming_the_node_as_its_own_source_is_recorded_failed(field):
    plan = PlanEntry(**{**PLAN, field: ME})
    release = ReleaseRecord.from_json(dumps(RELEASE))
    machine = PullMachine(ME, release, plan, None, TIMINGS)
    action = machine.start(T0)
    assert_failed_record(machine, action, "the plan entry of run run-1 names this node as its own source")


def test_case7_the_handler_starts_a_worker_for_a_self_sourced_plan_so_that_it_is_recorded():
    release = ReleaseRecord.from_json(dumps(RELEASE))
    start, _reason = _reap.decide(ME, release, PlanEntry(**{**PLAN, "source": ME}), None)
    assert start is True


# === the same class of test for every value read from Consul ===================================

RECORD_FIELDS = [
    # (record class, key, valid object, field, hostile values)
    *[(ReleaseRecord, RELEASE_KEY, RELEASE, field, HOSTILE_WORDS) for field in ("app", "version", "run_id", "leader")],
    *[(ReleaseRecord, RELEASE_KEY, RELEASE, field, HOSTILE_INTS) for field in ("fanout", "target_count")],
    (ReleaseRecord, RELEASE_KEY, RELEASE, "fired_at", HOSTILE_TIMES),
    (ReleaseRecord, RELEASE_KEY, RELEASE, "status", HOSTILE_CHOICES),
    (ReleaseRecord, RELEASE_KEY, {**RELEASE, "status": "aborted"}, "aborted_reason", HOSTILE_LINES),
    *[(PlanEntry, PLAN_KEY, PLAN, field, HOSTILE_WORDS) for field in ("run_id", "source", "after", "source_address")],
    *[(PlanEntry, PLAN_KEY, PLAN, field, HOSTILE_INTS) for field in ("stage", "slot")],
    *[(NodeState, OWN_KEY, STATE, field, HOSTILE_WORDS) for field in ("version", "run_id", "source")],
    (NodeState, OWN_KEY, STATE, "status", HOSTILE_CHOICES),
    (NodeState, OWN_KEY, STATE, "depth", HOSTILE_INTS),
    *[(NodeState, OWN_KEY, STATE, field, HOSTILE_TIMES) for field in ("started", "finished")],
    # A failure's error keeps the newlines of its output tail; nothing else of HOSTILE_LINES.
    (NodeState, OWN_KEY, FAILED_STATE, "error", {name: value for name, value in HOSTILE_LINES.items() if name != "newline"}),
    (LockRecord, LOCK_KEY, LOCK, "run_id", HOSTILE_WORDS),
    (LockRecord, LOCK_KEY, LOCK, "holder", HOSTILE_LINES),
    (LockRecord, LOCK_KEY, LOCK, "since", HOSTILE_TIMES),
    (ReleaseRecord, RELEASE_KEY, RELEASE, "pause_after_stage", {**HOSTILE_INTS, "zero": 0, "past the stages": 65}),
    (ReleaseRecord, RELEASE_KEY, RELEASE, "resumed_at", HOSTILE_TIMES),
    (ReleaseRecord, RELEASE_KEY, RELEASE, "checksum", {**HOSTILE_WORDS, "upper case": "sha256:" + "A" * 64,
                                                       "short": "sha256:" + "a" * 63, "md5": "md5:" + "a" * 32,
                                                       "option": "-" + "a" * 70}),
    *[(RunSummary, HISTORY_KEY, RUN, field, HOSTILE_WORDS) for field in ("run_id", "version", "retry_of")],
    *[(RunSummary, HISTORY_KEY, RUN, field, HOSTILE_CHOICES) for field in ("kind", "outcome")],
    *[(RunSummary, HISTORY_KEY, RUN, field, HOSTILE_INTS) for field in ("target_count", "done", "failed")],
    *[(RunSummary, HISTORY_KEY, RUN, field, HOSTILE_TIMES) for field in ("fired_at", "finished_at")],
    *[(RunSummary, HISTORY_KEY, RUN, field, HOSTILE_LINES) for field in ("fired_by", "abort_reason")],
    (RunSummary, HISTORY_KEY, RUN, "checksum", {**HOSTILE_WORDS, "short": "sha256:" + "a" * 63}),
    # The swarm: neighbours given by the plan and the run's record, progress, the advertised port.
    (PlanEntry, PLAN_KEY, SWARM_PLAN, "peers", HOSTILE_PEERS),
    (SwarmRun, SWARM_KEY, SWARM_RUN, "leader_peers", HOSTILE_PEERS),
    (SwarmRun, SWARM_KEY, SWARM_RUN, "finished", HOSTILE_TIMES),
    (SwarmRun, SWARM_KEY, SWARM_RUN, "refused", {name: value for name, value in HOSTILE_LINES.items() if name != "newline"}),
    *[(NodeState, OWN_KEY, PULLING, field, HOSTILE_INTS) for field in ("downloaded", "rate")],
    (NodeState, OWN_KEY, STATE, "fetched", {**HOSTILE_TIMES, "before started": T0 - 1}),
    (AppAdvert, ADVERT_KEY, ADVERT, "artifact_port", {**HOSTILE_INTS, "privileged": 80, "past 65535": 65536}),
]
RECORD_CASES = [
    pytest.param(cls, key, base, field, value, id=f"{cls.__name__}.{field}-{name}")
    for cls, key, base, field, values in RECORD_FIELDS
    for name, value in values.items()
]


def test_every_valid_baseline_record_is_accepted():
    assert ReleaseRecord.from_json(dumps(RELEASE)).fanout == 2
    assert PlanEntry.from_json(dumps(SWARM_PLAN)).peers == ("10.0.0.1:6881", "[fd00::2]:6881")
    assert SwarmRun.from_json(dumps(SWARM_RUN)).over
    assert NodeState.from_json(dumps(PULLING)).downloaded == 1000
    assert NodeState.from_json(dumps({**STATE, "fetched": T0 + 0.5})).fetched == T0 + 0.5
    assert AppAdvert.from_json(dumps(ADVERT)).artifact_port == 6881
    assert ReleaseRecord.from_json(dumps({**RELEASE, "status": "aborted", "aborted_reason": "r"})).aborted
    assert PlanEntry.from_json(dumps(PLAN)).source_address == "10.0.0.1"
    assert NodeState.from_json(dumps(STATE)).has("1.0")
    assert NodeState.from_json(dumps(FAILED_STATE)).error.endswith("boom")
    assert LockRecord.from_json(dumps(LOCK)).holder == "controller.example.com"
    assert RunSummary.from_json(dumps(RUN)).retry_of == "run-0"
    gated = ReleaseRecord.from_json(dumps({**RELEASE, "pause_after_stage": 1, "checksum": "sha256:" + "0" * 64}))
    assert gated.paused and gated.holds(2) and not gated.holds(1)


def test_a_history_of_too_many_runs_or_of_hostile_entries_is_refused():
    with pytest.raises(KVRecordError, match=f"holds {HISTORY_MAX + 1} runs; at most {HISTORY_MAX}"):
        History.from_json(dumps({"runs": [RUN] * (HISTORY_MAX + 1)}), HISTORY_KEY)
    for runs in ([RUN, "x"], [RUN, {**RUN, "version": "-v"}], "runs"):
        with pytest.raises(KVRecordError) as info:
            History.from_json(dumps({"runs": runs}), HISTORY_KEY)
        assert_one_bounded_line(str(info.value))


@pytest.mark.parametrize("cls, key, base, field, value", RECORD_CASES)
def test_every_field_of_every_record_refuses_hostile_values(cls, key, base, field, value):
    assert_refused(cls, with_field(base, field, value), key, field)


@pytest.mark.parametrize("field, value", [
    pytest.param(field, value, id=f"{field}-{name}")
    for field in ("node", "service", "tag")
    for name, value in HOSTILE_LINES.items()
])
def test_every_release_filter_refuses_hostile_values(field, value):
    filters = {"node": "^web", "service": "nginx", "tag": "blue", field: value}
    assert_refused(ReleaseRecord, {**RELEASE, "filters": filters}, RELEASE_KEY, field)


@pytest.mark.parametrize("field, value", [
    pytest.param(field, value, id=f"{field}-{name}")
    for field in ("started", "finished", "fired_at", "since")
    for name, value in {"310 digits": 10**310, "4000 digits": 10**4000}.items()
])
def test_every_time_field_refuses_an_integer_too_large_for_a_float(field, value):
    cls, key, base = {
        "started": (NodeState, OWN_KEY, STATE), "finished": (NodeState, OWN_KEY, STATE),
        "fired_at": (ReleaseRecord, RELEASE_KEY, RELEASE), "since": (LockRecord, LOCK_KEY, LOCK),
    }[field]
    assert_refused(cls, with_field(base, field, value), key, field)


@pytest.mark.parametrize("cls", [ReleaseRecord, PlanEntry, NodeState, LockRecord])
def test_every_record_reader_refuses_a_deeply_nested_value(cls):
    with pytest.raises(KVRecordError, match="not JSON"):
        cls.from_json(b"[" * 200_000, "fireap/web/x")


@pytest.mark.parametrize("field", ["fired_at", "since", "started"])
def test_non_finite_times_written_as_json_tokens_are_refused(field):
    cls, key, base = {"fired_at": (ReleaseRecord, RELEASE_KEY, RELEASE), "since": (LockRecord, LOCK_KEY, LOCK),
                      "started": (NodeState, OWN_KEY, STATE)}[field]
    for token in ("NaN", "Infinity", "-Infinity", "1e400"):
        text = json.dumps(base).replace(json.dumps(base[field]), token, 1)
        with pytest.raises(KVRecordError, match=f"field '{field}'"):
            cls.from_json(text, key)


# --- a malformed record of a run that can be named becomes a failed record ---------------------------

PLAN_PROBLEMS = [
    pytest.param(field, value, id=f"{field}-{name}")
    for field, values in (("source", HOSTILE_WORDS), ("after", HOSTILE_WORDS), ("source_address", HOSTILE_WORDS),
                          ("stage", HOSTILE_INTS), ("slot", HOSTILE_INTS))
    for name, value in values.items()
]


@pytest.mark.parametrize("field, value", PLAN_PROBLEMS)
def test_a_hostile_plan_field_under_a_valid_release_is_recorded_failed(no_slot_lists, field, value):
    machine, problem, action = start_problem_run(dumps(RELEASE), dumps(with_field(PLAN, field, value)))
    assert problem is not None
    assert_failed_record(machine, action, f"malformed KV key '{PLAN_KEY}': field '{field}'")


RELEASE_PROBLEMS = [
    pytest.param(field, value, id=f"{field}-{name}")
    for field, values in (("app", HOSTILE_WORDS), ("leader", HOSTILE_WORDS), ("fanout", HOSTILE_INTS),
                          ("target_count", HOSTILE_INTS), ("fired_at", HOSTILE_TIMES), ("status", HOSTILE_CHOICES))
    for name, value in values.items()
]


@pytest.mark.parametrize("field, value", RELEASE_PROBLEMS)
def test_a_hostile_field_of_a_release_whose_run_can_be_named_is_recorded_failed(no_slot_lists, field, value):
    machine, problem, action = start_problem_run(dumps(with_field(RELEASE, field, value)), dumps(PLAN))
    assert problem is not None
    assert_failed_record(machine, action, f"malformed KV key '{RELEASE_KEY}': field '{field}'")


@pytest.mark.parametrize("field, value", [
    pytest.param(field, value, id=f"{field}-{name}")
    for field in ("run_id", "version") for name, value in HOSTILE_WORDS.items()
])
def test_a_release_whose_run_cannot_be_named_is_an_error_with_nothing_to_record(field, value):
    with pytest.raises(KVRecordError) as info:
        _propagation.read_run(RELEASE_KEY, dumps(with_field(RELEASE, field, value)), PLAN_KEY, dumps(PLAN))
    assert f"'{field}'" in str(info.value)
    assert_one_bounded_line(str(info.value))


def test_a_malformed_release_is_not_pinned_on_a_node_planned_for_another_run_or_not_planned():
    bad = dumps(with_field(RELEASE, "fanout", 10**12))
    with pytest.raises(KVRecordError, match="field 'fanout'"):
        _propagation.read_run(RELEASE_KEY, bad, PLAN_KEY, None)
    with pytest.raises(KVRecordError, match="field 'fanout'"):
        _propagation.read_run(RELEASE_KEY, bad, PLAN_KEY, dumps({**PLAN, "run_id": "run-0"}))


def test_a_run_problem_is_recorded_once():
    bad = dumps(with_field(RELEASE, "fanout", 10**12))
    machine, problem, action = start_problem_run(bad, dumps(PLAN))
    recorded = assert_failed_record(machine, action, "field 'fanout'")
    _machine, _problem, again = start_problem_run(bad, dumps(PLAN), own=recorded)
    assert isinstance(again, PullResult) and not again.ran_task and again.state == recorded
    assert again.reason.startswith("already failed in run run-1: ")
    assert problem.reason in recorded.error


def test_a_failure_text_written_to_kv_is_bounded():
    huge = "x" * 100_000
    machine = PullMachine(ME, ReleaseRecord.from_json(dumps(RELEASE)), PlanEntry(**{**PLAN, "stage": 1, "after": None}),
                          None, TIMINGS)
    machine.start(T0)
    machine.on_claim(ClaimOutcome(slot=0, index=1), T0)
    release = machine.on_task(False, huge, T0 + 1)
    assert len(release.state.error) <= 8192
    NodeState.from_json(release.state.to_json())  # what is written can be read back


# --- every placeholder --------------------------------------------------------------------------------

PLACEHOLDER_FIELDS = {
    "app": "app name", "version": "version", "node": "node name", "remote_name": "source node name",
    "remote_address": "source address",
}


@pytest.mark.parametrize("field", PLACEHOLDER_FIELDS)
@pytest.mark.parametrize("value", list(HOSTILE_WORDS.values()), ids=list(HOSTILE_WORDS))
def test_every_placeholder_refuses_hostile_values(field, value):
    with pytest.raises(ValueError) as info:
        variables(**{field: value})
    assert str(info.value).startswith(PLACEHOLDER_FIELDS[field])
    assert_one_bounded_line(str(info.value))


@pytest.mark.parametrize("field", ["app", "node", "remote_name", "remote_address"])
@pytest.mark.parametrize("value", ["..", "a..b", "../x", "a/b", "~root"])
def test_no_placeholder_but_version_can_hold_a_path_step(field, value):
    with pytest.raises(ValueError):
        variables(**{field: value})


def test_the_dry_run_stand_ins_are_valid_values():
    checked = variables(remote_name=_reap.DRY_RUN_SOURCE.name, remote_address=_reap.DRY_RUN_SOURCE.address)
    assert checked.value("remote.address") == "source-address.invalid"


@pytest.mark.parametrize("template", [
    "ssh -o BatchMode=yes {{ remote.address }} true",
    "rsync -a --delete {{ remote.address }}::apps/{{ app }}/ /opt/{{ app }}/",
    "curl -fsS http://{{ remote.name }}/{{ app }}/{{ version }}.tar.gz -o /tmp/{{ node }}.tgz",
])
@pytest.mark.parametrize("address", ["192.0.2.7", "2001:db8::1", "src-1.example.com"])
def test_a_checked_value_is_a_plain_word_that_needs_no_quoting(template, address):
    """Every value the checks let through is inert as it is: quoting is a second layer."""
    _commands.template_variables(template)
    checked = variables(version="2.0-rc1+b.5", remote_address=address)
    expected = template
    for name in _commands.VARIABLES:
        expected = expected.replace("{{ %s }}" % name, checked.value(name))
    assert _commands.render_command(template, checked) == expected


# --- the event payload ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["app", "version"])
@pytest.mark.parametrize("value", list(HOSTILE_WORDS.values()), ids=list(HOSTILE_WORDS))
def test_the_event_payload_refuses_hostile_values(field, value):
    values = {"app": APP, "version": "1.0", field: value}
    raw = payload(values["app"], values["version"])
    with pytest.raises(ValueError, match=f"its payload is invalid: {'app name' if field == 'app' else 'version'}"):
        _task_event.decode_payload(raw)
    rejected = _task_event.parse_event({"ID": "e1", "Name": _firing.EVENT_NAME, "Payload": raw, "LTime": 1})
    assert isinstance(rejected, _task_event.RejectedEvent) and rejected.id == "e1"
    assert_one_bounded_line(rejected.reason)
