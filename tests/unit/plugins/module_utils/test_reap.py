"""fireap-reap: event parsing, the record of handled events, the catch-up decision, the
handler and worker entry points (against the Consul target for the reads), and the exit codes."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.module_utils import _reap
from ansible_collections.fireap.consul.plugins.module_utils._commands import fill_template
from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    ConsulOptions,
    ConsulUnreachable,
    FireapConsulError,
)
from ansible_collections.fireap.consul.plugins.module_utils._release import EVENT_NAME, event_payload
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    KVRecordError,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    Schema,
)
from ansible_collections.fireap.consul.plugins.module_utils._reap import (
    PROCESSED_FILE,
    TaskEvent,
    check_app,
    decide,
    decode_payload,
    handler_command,
    load_processed,
    main,
    newest_per_app,
    parse_event,
    parse_events,
    remember,
    save_processed,
    write_atomic,
)

APP = "web"
ME = "node-me"
LEADER = "node-leader"
REPO_ROOT = Path(__file__).resolve().parents[4]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def event(event_id="e1", ltime=5, app=APP, version="1.0", *, payload=None, name=EVENT_NAME) -> dict:
    if payload is None:
        payload = b64(json.dumps({"app": app, "version": version}).encode())
    return {"ID": event_id, "Name": name, "Payload": payload, "NodeFilter": "", "ServiceFilter": "",
            "TagFilter": "", "Version": 1, "LTime": ltime}


def release(version="1.0", run_id="run-1", leader=LEADER, status="running") -> ReleaseRecord:
    return ReleaseRecord(app=APP, version=version, run_id=run_id, fanout=2, leader=leader, target_count=3,
                         fired_at=1700000000.0, status=status,
                         aborted_reason="stopped by hand" if status == "aborted" else None)


def plan(run_id="run-1", source=LEADER) -> PlanEntry:
    return PlanEntry(run_id=run_id, source=source, stage=1, slot=0)


def state(status, version="1.0", run_id="run-1") -> NodeState:
    if status == "done":
        return NodeState(version=version, run_id=run_id, status="done", started=1.0, source=LEADER, depth=1,
                         finished=2.0)
    if status == "failed":
        return NodeState(version=version, run_id=run_id, status="failed", started=1.0, finished=2.0,
                         error="exec_commands[0] failed (exit status 1)")
    return NodeState(version=version, run_id=run_id, status=status, started=1.0)


# --- event parsing ---------------------------------------------------------------------------


def test_a_well_formed_event_is_parsed():
    assert parse_event(event("abc", 7, "web", "2024.1-rc1")) == TaskEvent("abc", 7, "web", "2024.1-rc1")


def test_decode_reads_what_fireap_fire_sends():
    payload = event_payload("my-app_1.x", "2024.11.26-build.1234+g1a2b3c")
    assert decode_payload(b64(payload)) == ("my-app_1.x", "2024.11.26-build.1234+g1a2b3c")


def _payload(obj) -> str:
    return b64(json.dumps(obj).encode())


@pytest.mark.parametrize("overrides, reason", [
    ({"Name": "OTHER"}, "is named 'OTHER', not 'FIREAP:TASK'"),
    ({"LTime": None}, "no valid LTime"),
    ({"LTime": -1}, "no valid LTime"),
    ({"LTime": True}, "no valid LTime"),
    ({"LTime": "5"}, "no valid LTime"),
    ({"Payload": None}, "it has no payload"),
    ({"Payload": 12}, "its Payload must be base64 text, got int"),
    ({"Payload": "not base64!"}, "its payload is not valid base64"),
    ({"Payload": "eyJhcHAi"}, "its payload is not JSON"),
    ({"Payload": b64(b'\xff\xfe{"app"}')}, "its payload is not UTF-8 text"),
    ({"Payload": b64(b"web 1.0")}, "its payload is not JSON"),
    ({"Payload": _payload(["web", "1.0"])}, "must be a JSON object"),
    ({"Payload": _payload({"version": "1.0"})}, "its payload has no 'app' field"),
    ({"Payload": _payload({"app": "web"})}, "its payload has no 'version' field"),
    ({"Payload": _payload({"app": 7, "version": "1.0"})}, "its payload is invalid: app name 7 must be a string"),
    ({"Payload": _payload({"app": "../etc", "version": "1.0"})}, "its payload is invalid: app name '../etc'"),
    ({"Payload": _payload({"app": "..", "version": "1.0"})}, "its payload is invalid: app name '..'"),
    ({"Payload": _payload({"app": "", "version": "1.0"})}, "its payload is invalid: app name"),
    ({"Payload": _payload({"app": "web", "version": 1.0})}, "its payload is invalid: version must be"),
    ({"Payload": _payload({"app": "web", "version": None})}, "its payload is invalid: version must be"),
    ({"Payload": _payload({"app": "web", "version": ""})}, "its payload is invalid: version must be"),
    ({"Payload": _payload({"app": "web", "version": "1.0\nrm -rf /"})}, "its payload is invalid: version '1.0\\nrm"),
    ({"Payload": _payload({"app": "web", "version": "1.0\x1b[31m"})}, "its payload is invalid: version '1.0\\x1b"),
    ({"Payload": _payload({"app": "web", "version": "1.0\x00"})}, "its payload is invalid: version '1.0\\x00'"),
    ({"Payload": _payload({"app": "web", "version": "1.0 "})}, "its payload is invalid: version '1.0 '"),
    ({"Payload": _payload({"app": "web", "version": "v" * 65})}, "its payload is invalid: version 'vvv"),
])
def test_a_malformed_event_is_rejected_with_its_id_and_a_precise_reason(overrides, reason):
    raw = dict(event("evt-1"), **overrides)
    rejected = parse_event(raw)
    assert isinstance(rejected, _reap.RejectedEvent)
    assert rejected.id == "evt-1"
    assert "event evt-1" in rejected.reason
    assert reason in rejected.reason


@pytest.mark.parametrize("raw, reason", [
    ("just a string", "an event must be a JSON object, got str"),
    ({"Name": EVENT_NAME}, "no usable ID"),
    (dict(event(), ID=""), "no usable ID"),
    (dict(event(), ID=42), "no usable ID"),
    (dict(event(), ID="x" * 65), "no usable ID"),
    (dict(event(), ID="id\nwith newline"), "no usable ID"),
])
def test_an_event_without_a_usable_id_is_rejected_without_one(raw, reason):
    rejected = parse_event(raw)
    assert isinstance(rejected, _reap.RejectedEvent)
    assert rejected.id is None
    assert reason in rejected.reason


@pytest.mark.parametrize("text", ["", "  \n", "[]"])
def test_no_input_or_an_empty_array_means_no_events(text):
    assert parse_events(text) == ([], [])


@pytest.mark.parametrize("text, reason", [
    ("[{", "stdin is not JSON"),
    ('{"ID": "e1"}', "stdin must be a JSON array of events, got dict"),
    ("null", "stdin must be a JSON array of events, got NoneType"),
])
def test_unusable_stdin_is_one_rejection(text, reason):
    events, rejected = parse_events(text)
    assert events == []
    assert [item.id for item in rejected] == [None]
    assert reason in rejected[0].reason


def test_good_and_bad_events_are_separated_in_order():
    text = json.dumps([event("e1", 1), event("e2", 2, payload="%%%"), event("e3", 3, version="2.0"), 5])
    events, rejected = parse_events(text)
    assert [e.id for e in events] == ["e1", "e3"]
    assert [r.id for r in rejected] == ["e2", None]


def test_the_newest_event_per_app_wins_by_ltime_then_by_position():
    events = [
        TaskEvent("a1", 10, "web", "3"),
        TaskEvent("a2", 4, "web", "1"),
        TaskEvent("b1", 7, "db", "x"),
        TaskEvent("b2", 7, "db", "y"),
        TaskEvent("c1", 0, "cache", "z"),
    ]
    newest = newest_per_app(events)
    assert {app: e.id for app, e in newest.items()} == {"web": "a1", "db": "b2", "cache": "c1"}


# --- the record of handled events ----------------------------------------------------------


def test_write_atomic_replaces_the_file_with_the_mode_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    write_atomic(str(target), b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_processed_ids_round_trip(tmp_path):
    path = str(tmp_path / PROCESSED_FILE)
    assert load_processed(path) == ([], None)
    save_processed(path, ["a", "b"])
    assert load_processed(path) == (["a", "b"], None)


@pytest.mark.parametrize("content", [b"{not json", b'{"ids": [1, 2]}', b'["a"]', b"\xff\xfe"])
def test_an_unusable_record_is_ignored_with_a_warning(tmp_path, content):
    path = tmp_path / PROCESSED_FILE
    path.write_bytes(content)
    ids, warning = load_processed(str(path))
    assert ids == []
    assert warning.startswith(f"ignoring the record of handled events {path}")


def test_remember_appends_each_new_id_once_and_keeps_the_newest():
    assert remember(["a", "b"], ["b", "c", "c", "d"]) == ["a", "b", "c", "d"]
    assert remember(["a", "b", "c"], ["d", "e"], limit=3) == ["c", "d", "e"]
    assert remember([], []) == []


# --- the catch-up decision -----------------------------------------------------------------


@pytest.mark.parametrize("rel, pln, own, start, reason", [
    (None, None, None, False, "no release recorded"),
    (release(status="aborted"), plan(), None, False, "was aborted: stopped by hand"),
    (release(), plan(), state("done"), False, "already done at version 1.0"),
    (release(leader=ME), None, None, False, "this node is the leader"),
    (release(), None, None, False, "not a target of run run-1"),
    (release(), plan(run_id="run-0"), None, False, "not a target of run run-1"),
    (release(), plan(), state("failed"), False, "already failed in run run-1"),
    (release(), plan(), None, True, "behind release 1.0 (run run-1): no state yet"),
    (release(version="2.0", run_id="run-2"), plan(run_id="run-2"), state("done"), True,
     "own state done at version 1.0 (run run-1)"),
    (release(), plan(), state("waiting"), True, "own state waiting at version 1.0"),
    (release(version="2.0", run_id="run-2"), plan(run_id="run-2"), state("failed"), True, "own state failed"),
])
def test_decide_follows_the_pull_start_rules(rel, pln, own, start, reason):
    decided, why = decide(ME, rel, pln, own)
    assert decided is start
    assert reason in why


class FakeKV:
    """``client.kv.get`` over a dict of key -> bytes, counting reads; ``fail`` raises instead."""

    def __init__(self, values, fail=None):
        self.values = values
        self.fail = fail
        self.reads = []

    def get(self, key):
        self.reads.append(key)
        if self.fail is not None:
            raise self.fail
        value = self.values.get(key)
        return 1, None if value is None else {"Key": key, "Value": value}


class FakeClient:
    def __init__(self, values, fail=None):
        self.kv = FakeKV(values, fail)


SCHEMA = Schema("fireap/")
OPTIONS = ConsulOptions()


def _kv(rel=None, pln=None, own=None) -> dict:
    values = {}
    for key, record in ((SCHEMA.release(APP), rel), (SCHEMA.plan(APP, ME), pln), (SCHEMA.node(APP, ME), own)):
        if record is not None:
            values[key] = record if isinstance(record, bytes) else record.to_json().encode()
    return values


@pytest.mark.parametrize("values, reads, start", [
    (_kv(), ["release"], False),
    (_kv(release(status="aborted"), plan()), ["release"], False),
    (_kv(release(), plan(), state("done")), ["release", "own"], False),
    (_kv(release(leader=ME)), ["release", "own"], False),
    (_kv(release(), plan()), ["release", "own", "plan"], True),
    (_kv(release()), ["release", "own", "plan"], False),
])
def test_check_app_reads_only_what_the_decision_needs(values, reads, start):
    client = FakeClient(values)
    result = check_app(client, OPTIONS, SCHEMA, APP, ME)
    names = {SCHEMA.release(APP): "release", SCHEMA.node(APP, ME): "own", SCHEMA.plan(APP, ME): "plan"}
    assert [names[key] for key in client.kv.reads] == reads
    assert result.start is start
    assert result.app == APP


def test_check_app_treats_a_malformed_own_state_as_absent(caplog):
    client = FakeClient(_kv(release(), plan(), b'{"status": "bogus"}'))
    result = check_app(client, OPTIONS, SCHEMA, APP, ME)
    assert result.start
    assert "treating this node as having no state" in caplog.text


@pytest.mark.parametrize("values", [
    _kv(b"not json"),
    _kv(b'{"run_id": "run-1"}', plan()),
    _kv(json.dumps({**release().to_dict(), "run_id": "-r"}).encode(), plan()),
])
def test_check_app_raises_on_a_malformed_release_of_a_run_nobody_can_name(values):
    with pytest.raises(KVRecordError, match="malformed KV key 'fireap/web/release'"):
        check_app(FakeClient(values), OPTIONS, SCHEMA, APP, ME)


def test_check_app_turns_a_malformed_plan_under_a_valid_release_into_a_run_problem():
    client = FakeClient(_kv(release(), b'{"run_id": "run-1"}'))
    result = check_app(client, OPTIONS, SCHEMA, APP, ME)
    assert result.start and result.release == release()
    assert (result.problem.run_id, result.problem.version) == ("run-1", "1.0")
    assert result.problem.reason == "malformed KV key 'fireap/web/plan/node-me': missing field 'source'"
    assert result.reason == f"run run-1 cannot be pulled ({result.problem.reason}): recording it as failed"
    assert (result.run_id, result.version) == ("run-1", "1.0")


def test_check_app_turns_a_malformed_release_of_a_named_run_with_a_plan_entry_into_a_run_problem():
    bad = json.dumps({**release().to_dict(), "fanout": 0}).encode()
    result = check_app(FakeClient(_kv(bad, plan())), OPTIONS, SCHEMA, APP, ME)
    assert result.start and result.release is None
    assert (result.run_id, result.version) == ("run-1", "1.0")
    assert "field 'fanout': fanout must be an integer from 1 to 64, got 0" in result.problem.reason
    # Once recorded failed, the run is not tried again.
    failed = NodeState(version="1.0", run_id="run-1", status="failed", started=1.0, finished=1.0,
                       error=result.problem.reason)
    again = check_app(FakeClient(_kv(bad, plan(), failed)), OPTIONS, SCHEMA, APP, ME)
    assert not again.start and "already failed in run run-1" in again.reason


def test_check_app_turns_transport_errors_into_fireap_errors():
    import requests

    client = FakeClient({}, fail=requests.exceptions.ConnectionError("refused"))
    with pytest.raises(ConsulUnreachable, match="while reading fireap/web/release"):
        check_app(client, OPTIONS, SCHEMA, APP, ME)


# --- entry points against the Consul target --------------------------------------------------


def write_config(path: Path, consul_section: dict, kv_prefix: str, apps: dict, **extra) -> Path:
    config = {
        "consul": consul_section,
        "kv_prefix": kv_prefix,
        "state_dir": str(path.parent / "state"),
        "log_file": str(path.parent / "log" / "reap.log"),
        "apps": apps,
        **extra,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def consul_section(target, agent: int = 0) -> dict:
    endpoint = target.agents[agent]
    section = {"host": endpoint.host, "port": endpoint.port, "scheme": endpoint.scheme}
    if target.token:
        section["token"] = target.token
    return section


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Spawns:
    """The injected worker starter: records calls, starts nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, config_path, app, log_file):
        self.calls.append((config_path, app, log_file))
        return 4242


@pytest.fixture
def env(multi_agent_target, kv_prefix, tmp_path, monkeypatch):
    """A config for agent 0 under the test's KV prefix, and helpers to run the handler; the
    last agent is the release's leader (a source must be a node of the catalog)."""
    consul_target = multi_agent_target
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)

    class Env:
        target = consul_target
        schema = Schema(kv_prefix)
        node = consul_target.agents[0].name
        leader = consul_target.agents[-1].name
        config = write_config(
            tmp_path / "config.yml", consul_section(consul_target), kv_prefix,
            {APP: {"exec_commands": ["echo {{ app }} {{ version }} {{ node }} {{ remote.name }} {{ remote.address }}"
                                     " >> " + str(tmp_path / "ran.txt")]},
             "db": {"exec_commands": ["true"]}},
        )
        log_file = tmp_path / "log" / "reap.log"
        state_dir = tmp_path / "state"
        ran = tmp_path / "ran.txt"
        spawns = Spawns()

        def put(self, key, record):
            assert consul_target.client().kv.put(key, record.to_json())

        def fire(self, version="1.0", run_id="run-1", targets=True):
            """Write the release as fireap_fire leaves it: the leader done, a plan for node 0."""
            rel = release(version, run_id, leader=self.leader)
            leader_state = NodeState(version=version, run_id=run_id, status="done", started=1.0, depth=0,
                                     finished=1.0)
            self.put(self.schema.node(APP, self.leader), leader_state)
            if targets:
                self.put(self.schema.plan(APP, self.node), plan(run_id, source=self.leader))
            self.put(self.schema.release(APP), rel)
            return rel

        def handle(self, events, *args, stdin=None):
            text = stdin if stdin is not None else json.dumps(events)
            monkeypatch.setattr(sys, "stdin", io.StringIO(text))
            out = io.StringIO()
            rc = main(["--config", str(self.config), *args], spawn=self.spawns, out=out)
            return rc, out.getvalue()

        def log(self):
            return self.log_file.read_text() if self.log_file.exists() else ""

    return Env()


def test_a_new_event_starts_a_worker_and_is_recorded(env):
    env.fire()
    rc, _out = env.handle([event("ev-1", 3)])
    assert rc == 0
    assert env.spawns.calls == [(str(env.config), APP, str(env.log_file))]
    assert load_processed(str(env.state_dir / PROCESSED_FILE)) == (["ev-1"], None)
    log = env.log()
    assert re.search(r"^\S+ INFO fireap-reap\[\d+\] app=- version=-: invoked with 1 event\(s\), 1 new", log, re.M)
    assert "app=web version=1.0: event ev-1 (LTime 3) asks for version 1.0" in log
    assert "app=web version=1.0: behind release 1.0 (run run-1): no state yet: starting a worker" in log
    assert "worker started (pid 4242)" in log


def test_a_replayed_event_is_not_handled_again_but_the_release_is_still_checked(env):
    env.fire()
    env.handle([event("ev-1", 3)])
    rc, _out = env.handle([event("ev-1", 3)])
    assert rc == 0
    log = env.log()
    assert "invoked with 1 event(s), 0 new" in log
    assert log.count("event ev-1 (LTime 3) asks") == 1
    # The node is still behind (the injected spawn ran nothing): the check starts a worker again.
    assert len(env.spawns.calls) == 2


def test_the_watch_start_call_with_no_events_catches_up(env):
    env.fire()
    rc, _out = env.handle([])
    assert rc == 0
    assert [call[1] for call in env.spawns.calls] == [APP]
    assert "invoked with 0 event(s), 0 new" in env.log()


def test_a_terminal_on_stdin_is_not_read_and_means_no_events(env, monkeypatch):
    env.fire()
    leader_fd, follower_fd = os.openpty()
    with os.fdopen(follower_fd, "r") as terminal:
        monkeypatch.setattr(sys, "stdin", terminal)
        assert main(["--config", str(env.config)], spawn=env.spawns) == 0
    os.close(leader_fd)
    assert "invoked with 0 event(s), 0 new" in env.log()
    assert [call[1] for call in env.spawns.calls] == [APP]


def test_a_node_done_at_the_version_or_not_targeted_starts_nothing(env):
    env.fire(targets=False)
    assert env.handle([event("ev-1", 3)])[0] == 0
    env.fire(version="2.0", run_id="run-2")
    env.put(env.schema.node(APP, env.node), state("done", "2.0", "run-2"))
    assert env.handle([event("ev-2", 4, version="2.0")])[0] == 0
    assert env.spawns.calls == []
    log = env.log()
    assert "nothing to do: not a target of run run-1" in log
    assert "nothing to do: already done at version 2.0" in log


def test_an_event_older_than_the_release_record_follows_the_record(env):
    env.fire(version="2.0", run_id="run-2")
    env.handle([event("ev-old", 1, version="1.0")])
    assert "the release record names version 2.0 (run run-2), not the event's 1.0: following the record" in env.log()
    assert [call[1] for call in env.spawns.calls] == [APP]


def test_malformed_and_unknown_events_are_logged_once_and_skipped(env):
    events = [event("bad", 1, payload="!!"), event("other", 2, app="unknown-app"), {"no": "id"}]
    assert env.handle(events)[0] == 0
    assert env.handle(events)[0] == 0
    log = env.log()
    assert log.count("event bad is skipped: its payload is not valid base64") == 1
    assert log.count("event other names app unknown-app, which is not configured on this node; skipped") == 1
    assert "app=unknown-app version=1.0" in log
    assert log.count("an event has no usable ID") == 2  # without an ID it cannot be recognised
    assert sorted(load_processed(str(env.state_dir / PROCESSED_FILE))[0]) == ["bad", "other"]
    assert env.spawns.calls == []


def test_a_running_worker_gets_a_pending_request_instead_of_a_second_worker(env):
    env.fire()
    env.state_dir.mkdir()
    lock = os.open(env.state_dir / f"worker-{APP}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert env.handle([event("ev-1", 3)])[0] == 0
    finally:
        os.close(lock)
    assert env.spawns.calls == []
    assert (env.state_dir / f"worker-{APP}.pending").exists()
    assert "a worker for this app is running already; it will pull again" in env.log()


def test_dry_run_prints_the_commands_and_writes_nothing(env, capsys):
    env.fire(version="1.0~rc1")
    rc, out = env.handle([event("ev-1", 3)], "--dry-run")
    assert rc == 0
    assert env.spawns.calls == []
    assert not env.state_dir.exists()
    assert not env.log_file.exists()
    lines = out.splitlines()
    assert lines[0] == f"fireap-reap dry run on node {env.node}: 1 new event(s)"
    assert lines[1] == f"{APP}: would start a worker: behind release 1.0~rc1 (run run-1): no state yet"
    # The stand-ins for the source are valid values themselves; '~' is quoted by shlex.quote.
    assert lines[2] == (f"  exec_commands[0]: echo web '1.0~rc1' {env.node} SOURCE_NODE source-address.invalid"
                        f" >> {env.ran}")
    assert lines[3] == "db: nothing to do: no release recorded for this app"
    assert "event ev-1 (LTime 3) asks for version 1.0\n" in capsys.readouterr().err


def test_an_unreachable_agent_exits_1(env, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
    config = write_config(tmp_path / "down.yml", {"port": closed_port(), "retries": 0, "timeout": 2},
                          "fireap/", {APP: {"exec_commands": ["true"]}}, node_name=ME)
    rc = main(["--config", str(config)], spawn=env.spawns, out=io.StringIO())
    assert rc == 1
    assert "cannot check the release: cannot reach the Consul agent" in env.log()
    assert env.spawns.calls == []


def test_an_unreachable_agent_without_a_node_name_exits_1(env, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
    config = write_config(tmp_path / "down.yml", {"port": closed_port(), "retries": 0, "timeout": 2},
                          "fireap/", {APP: {"exec_commands": ["true"]}})
    assert main(["--config", str(config)], spawn=env.spawns) == 1
    assert "cannot learn this node's name: cannot reach the Consul agent" in env.log()


def test_a_malformed_release_exits_1_but_other_apps_are_checked(env):
    env.target.client().kv.put(env.schema.release(APP), "{broken")
    db_release = ReleaseRecord(app="db", version="7", run_id="run-db", fanout=1, leader=env.leader,
                               target_count=2, fired_at=1.0)
    env.put(env.schema.plan("db", env.node), plan("run-db", source=env.leader))
    env.put(env.schema.release("db"), db_release)
    rc, _out = env.handle([])
    assert rc == 1
    assert f"app=web version=-: cannot check the release: malformed KV key '{env.schema.release(APP)}'" in env.log()
    assert [call[1] for call in env.spawns.calls] == ["db"]


def test_an_unusable_state_dir_exits_2(env, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = write_config(tmp_path / "bad-state.yml", consul_section(env.target), "fireap/",
                          {APP: {"exec_commands": ["true"]}}, state_dir=str(blocker / "state"))
    rc = main(["--config", str(config)], spawn=env.spawns, out=io.StringIO())
    assert rc == 2
    assert f"cannot use state_dir {blocker / 'state'}" in env.log()


# --- the worker ------------------------------------------------------------------------------


def test_the_worker_pulls_with_the_rendered_commands_then_has_nothing_to_do(env):
    env.fire(version="1.0+final")
    rc = main(["--config", str(env.config), "--worker", APP])
    assert rc == 0
    source = env.target.agents[-1]
    address = env.target.client().catalog.node(source.name)[1]["Node"]["Address"]
    assert env.ran.read_text() == f"web 1.0+final {env.node} {env.leader} {address}\n"
    _index, entry = env.target.client().kv.get(env.schema.node(APP, env.node))
    done = NodeState.from_json(entry["Value"])
    assert (done.status, done.version, done.source) == ("done", "1.0+final", env.leader)
    log = env.log()
    assert re.search(r"INFO fireap-reap\[\d+\] app=web version=1\.0\+final: exec_commands\[0\]: running: echo", log)
    assert f"app=web version=1.0+final: pulled version 1.0+final from {env.leader}" in log

    assert main(["--config", str(env.config), "--worker", APP]) == 0
    assert env.ran.read_text().count("\n") == 1
    assert "app=web version=1.0+final: nothing to do: already done at version 1.0+final" in env.log()


def test_a_failed_task_is_recorded_with_its_error_and_exits_1(env, tmp_path):
    config = write_config(tmp_path / "failing.yml", consul_section(env.target), env.schema.prefix,
                          {APP: {"exec_commands": ["echo broken mirror >&2; exit 3"]}})
    env.fire()
    assert main(["--config", str(config), "--worker", APP]) == 1
    _index, entry = env.target.client().kv.get(env.schema.node(APP, env.node))
    failed = NodeState.from_json(entry["Value"])
    assert failed.status == "failed"
    assert "exec_commands[0] failed (exit status 3)" in failed.error
    assert "broken mirror" in failed.error
    assert "failed: task failed pulling from" in env.log()


def test_a_second_worker_leaves_a_request_and_exits(env):
    env.fire()
    env.state_dir.mkdir()
    lock = os.open(env.state_dir / f"worker-{APP}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert main(["--config", str(env.config), "--worker", APP]) == 0
    finally:
        os.close(lock)
    assert not env.ran.exists()
    assert "another worker for this app is running; it will pull again" in env.log()


def test_start_worker_detaches_into_its_own_session_and_logs_to_the_file(tmp_path):
    log_file = tmp_path / "log" / "reap.log"
    log_file.parent.mkdir()
    config = write_config(tmp_path / "config.yml", {"port": closed_port(), "retries": 0, "timeout": 2},
                          "fireap/", {APP: {"exec_commands": ["true"]}})
    pid = _reap.start_worker(str(config), APP, str(log_file))
    try:
        assert os.getsid(pid) == pid
    finally:
        _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert "cannot learn this node's name: cannot reach the Consul agent" in log_file.read_text()


# --- hostile values in KV: every target ends with a record, nothing hostile reaches a command ----

#: One log record: timestamp, level, program[pid], context, message, on one line.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                      r"fireap-reap\[\d+\] app=[A-Za-z0-9_.-]+ version=[A-Za-z0-9._+~-]+: \S")


def assert_log_lines_well_formed(log: str) -> None:
    lines = log.splitlines()
    assert lines
    for line in lines:
        assert LOG_LINE.match(line), line
        assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), line


def fake_ssh(directory: Path) -> str:
    """An ``ssh`` that, like OpenSSH, runs the command of a ``-oProxyCommand=`` option."""
    path = directory / "ssh"
    path.write_text("#!/bin/sh\nfor arg in \"$@\"; do\n"
                    "  case $arg in -oProxyCommand=*) /bin/sh -c \"${arg#-oProxyCommand=}\" ;; esac\n"
                    "done\nexit 255\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def hostile_setup(env, tmp_path, commands):
    """A config for agent 0 whose app runs ``commands``; returns (config, run the handler, run the worker)."""
    config = write_config(tmp_path / "hostile.yml", consul_section(env.target), env.schema.prefix,
                          {APP: {"exec_commands": commands}})

    def handler(monkeypatch):
        monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
        return main(["--config", str(config)], spawn=env.spawns, out=io.StringIO())

    def worker():
        return main(["--config", str(config), "--worker", APP])

    return config, handler, worker


def own_record(env) -> NodeState:
    _index, entry = env.target.client().kv.get(env.schema.node(APP, env.node))
    return NodeState.from_json(entry["Value"])


def test_hostile_plan_address_never_reaches_a_command(env, tmp_path, monkeypatch, umask_022):
    """The run is recorded failed, with the reason; the log is private and one record a line."""
    ssh = shutil.which("ssh") or fake_ssh(tmp_path)
    marker = tmp_path / "x"
    hostile = f"-oProxyCommand=touch {marker}"
    template = f"{ssh} -o BatchMode=yes -o ConnectTimeout=5 {{{{ remote.address }}}} true"
    # Were the address to reach this command, even shell-quoted, it would run code: the test is live.
    subprocess.run(["/bin/sh", "-c", fill_template(template, {"remote.address": hostile})], stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=60, check=False)
    assert marker.exists()
    marker.unlink()
    _config, handler, worker = hostile_setup(env, tmp_path, [template])
    env.fire()
    entry = plan("run-1", source=env.leader).to_dict()
    assert env.target.client().kv.put(env.schema.plan(APP, env.node), json.dumps({**entry, "source_address": hostile}))

    assert handler(monkeypatch) == 0
    assert [call[1] for call in env.spawns.calls] == [APP]
    plan_key = env.schema.plan(APP, env.node)
    # The value is shown clipped (repr, at most 80 characters).
    assert re.search(re.escape(f"app=web version=1.0: run run-1 cannot be pulled (malformed KV key '{plan_key}': field "
                               "'source_address': address '-oProxyCommand=touch ") + r".*"
                     + re.escape(" is neither an IP address nor a host name): recording it as failed: starting a worker"),
                     env.log())

    assert worker() == 1
    assert not marker.exists()
    failed = own_record(env)
    assert (failed.status, failed.run_id, failed.version) == ("failed", "run-1", "1.0")
    assert f"malformed KV key '{plan_key}': field 'source_address'" in failed.error
    assert_log_lines_well_formed(env.log())
    assert stat.S_IMODE(env.log_file.stat().st_mode) == 0o640
    assert stat.S_IMODE(env.state_dir.stat().st_mode) == 0o750

    # Recorded once: the next check has nothing to do.
    assert handler(monkeypatch) == 0
    assert len(env.spawns.calls) == 1
    assert "nothing to do: already failed in run run-1" in env.log()


def _self_sourced(env):
    entry = plan("run-1", source=env.node).to_dict()
    env.target.client().kv.put(env.schema.plan(APP, env.node), json.dumps(entry))
    return "the plan entry of run run-1 names this node as its own source"


def _malformed_plan(env):
    entry = plan("run-1", source=env.leader).to_dict()
    env.target.client().kv.put(env.schema.plan(APP, env.node), json.dumps({**entry, "stage": 0}))
    return f"malformed KV key '{env.schema.plan(APP, env.node)}': field 'stage'"


def _huge_fanout(env):
    record = release("1.0", "run-1", leader=env.leader).to_dict()
    env.target.client().kv.put(env.schema.release(APP), json.dumps({**record, "fanout": 10**12}))
    return f"malformed KV key '{env.schema.release(APP)}': field 'fanout'"


@pytest.mark.parametrize("corrupt", [_self_sourced, _malformed_plan, _huge_fanout],
                         ids=["self-sourced plan", "malformed plan", "fanout 10**12"])
def test_hostile_records_of_a_named_run_end_with_a_failed_record(env, tmp_path, monkeypatch, corrupt):
    marker = tmp_path / "ran"
    _config, handler, worker = hostile_setup(env, tmp_path, [f"touch {marker}"])
    env.fire()
    naming = corrupt(env)
    assert handler(monkeypatch) == 0
    assert [call[1] for call in env.spawns.calls] == [APP]
    assert worker() == 1
    assert not marker.exists()
    failed = own_record(env)
    assert (failed.status, failed.run_id, failed.version) == ("failed", "run-1", "1.0")
    assert naming in failed.error
    log = env.log()
    assert f"app=web version=1.0: failed: {naming}" in log
    assert_log_lines_well_formed(log)


def test_hostile_token_in_the_environment_never_reaches_a_command(env, tmp_path, monkeypatch):
    secret = env.target.token or f"token-secret-{os.getpid()}"
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", secret)
    token_file = tmp_path / "token"
    token_file.write_text(secret)
    env_file = tmp_path / "env.txt"
    _config, _handler, worker = hostile_setup(env, tmp_path, [f"env > {env_file}"])
    env.fire()
    assert worker() == 0
    assert own_record(env).status == "done"
    seen = env_file.read_text()
    assert secret not in seen and "CONSUL_HTTP_TOKEN" not in seen
    assert f"PATH={os.environ['PATH']}" in seen.splitlines()


@pytest.mark.parametrize("version", ["1.0\n2024-01-01T00:00:00+0000 INFO fireap-reap[1] app=web version=9: forged",
                                     "1" * 10240, "1.0\x1b[2J"], ids=["newline", "10 KB", "escape"])
def test_hostile_version_in_kv_or_event_forges_no_log_line(env, version):
    record = release("1.0", "run-1", leader=env.leader).to_dict()
    env.target.client().kv.put(env.schema.release(APP), json.dumps({**record, "version": version}))
    rc, _out = env.handle([event("ev-1", 3, version=version)])
    assert rc == 1
    assert env.spawns.calls == []
    log = env.log()
    assert_log_lines_well_formed(log)
    assert "event ev-1 is skipped: its payload is invalid: version" in log
    assert f"app=web version=-: cannot check the release: malformed KV key '{env.schema.release(APP)}': " \
           "field 'version'" in log
    assert max(len(line) for line in log.splitlines()) < 1000
    assert "forged" not in log or "\\n2024-01-01" in log


# --- --check and usage ---------------------------------------------------------------------------


def test_check_accepts_a_valid_config(tmp_path):
    config = write_config(tmp_path / "c.yml", {"port": 8500}, "fireap/", {APP: {"exec_commands": ["true"]}})
    out = io.StringIO()
    assert main(["--config", str(config), "--check"], out=out) == 0
    assert out.getvalue() == f"{config}: valid; apps: {APP}\n"
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("consul, apps, message", [
    ({}, {APP: {"exec_comands": ["true"]}}, "apps.web.exec_comands: unknown key; did you mean 'exec_commands'?"),
    ({}, {APP: {"exec_commands": ["echo {{ remote.adress }}"]}}, "unknown variable 'remote.adress'"),
    ({"port": "8500"}, {APP: {"exec_commands": ["true"]}}, "consul: port must be an integer"),
    ({"tokn": "x"}, {APP: {"exec_commands": ["true"]}}, "unknown Consul connection option(s) tokn"),
])
def test_check_refuses_an_invalid_config_with_exit_2(tmp_path, capsys, consul, apps, message):
    config = write_config(tmp_path / "c.yml", consul, "fireap/", apps)
    assert main(["--config", str(config), "--check"]) == 2
    assert message in capsys.readouterr().err


def test_check_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "none.yml"), "--check"]) == 2
    assert "cannot read the config: No such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--bogus"], ["--check", "--dry-run"], ["--worker"], ["extra"]])
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: fireap-reap" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "Exit codes: 0 ok" in capsys.readouterr().out


@pytest.mark.parametrize("mode", [[], ["--dry-run"], ["--worker", APP]])
def test_without_py_consul_only_check_runs(tmp_path, capsys, monkeypatch, mode):
    monkeypatch.setattr(_reap, "PY_CONSUL_IMPORT_ERROR", ImportError("No module named 'consul'"))
    monkeypatch.setattr(sys, "stdin", None)
    config = write_config(tmp_path / "c.yml", {}, "fireap/", {APP: {"exec_commands": ["true"]}})
    assert main(["--config", str(config), "--check"], out=io.StringIO()) == 0
    assert main(["--config", str(config), *mode]) == 2
    assert capsys.readouterr().err == "fireap-reap needs py-consul: No module named 'consul'\n"
    assert not (tmp_path / "state").exists()


def test_an_invalid_config_exits_2_before_reading_stdin(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    (tmp_path / "c.yml").write_text("apps: [web]\n")
    assert main(["--config", str(tmp_path / "c.yml")]) == 2
    assert "apps: must be a mapping of app names to settings" in capsys.readouterr().err


class FlakyCall:
    """Raises the given errors in turn, then answers "ok"; records the sleeps asked for."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.calls = 0
        self.sleeps = []

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class LineLog:
    """The logger interface retrying() uses, keeping the lines."""

    def __init__(self):
        self.lines = []

    def warning(self, fmt, *args):
        self.lines.append(fmt % args)


def test_a_worker_read_is_retried_with_backoff_while_consul_does_not_answer():
    call = FlakyCall(ConsulUnreachable("connection refused"), FireapConsulError("HTTP 503", status=503))
    log = LineLog()
    assert _reap.retrying(call, log, window=60, sleep=call.sleeps.append) == "ok"
    assert call.calls == 3
    assert 0.25 <= call.sleeps[0] <= 0.5 and 0.5 <= call.sleeps[1] <= 1.0
    assert log.lines[0].startswith("connection refused; retrying in ")


def test_a_refusal_is_not_retried_and_the_window_bounds_the_retries():
    refused = FlakyCall(FireapConsulError("HTTP 403 Permission denied", status=403))
    with pytest.raises(FireapConsulError, match="403"):
        _reap.retrying(refused, LineLog(), window=60, sleep=refused.sleeps.append)
    assert (refused.calls, refused.sleeps) == (1, [])
    now = [0.0]
    down = FlakyCall(*[ConsulUnreachable("connection refused")] * 100)
    with pytest.raises(ConsulUnreachable):
        _reap.retrying(down, LineLog(), window=10, sleep=lambda s: now.__setitem__(0, now[0] + s),
                       clock=lambda: now[0])
    assert now[0] <= 10 and down.calls > 3


def test_invalid_connection_options_name_the_file_and_section(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    config = tmp_path / "c.yml"
    config.write_text("consul: {port: eighty}\napps: {web: {exec_commands: ['true']}}\n")
    assert main(["--config", str(config)]) == 2
    assert f"fireap-reap: {config}: consul: port must be an integer between 1 and 65535" in capsys.readouterr().err


def test_handler_command_runs_this_tree_s_fireap_reap(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("apps: {web: {exec_commands: ['true']}}\n")
    done = subprocess.run([*handler_command(str(config)), "--check"], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, f"{config}: valid; apps: web\n")


@pytest.mark.parametrize("app, message", [("nope", "no app 'nope' is configured"), ("../x", "app name '../x'")])
def test_a_worker_for_an_unknown_or_invalid_app_exits_2(tmp_path, capsys, app, message):
    config = write_config(tmp_path / "c.yml", {}, "fireap/", {APP: {"exec_commands": ["true"]}})
    assert main(["--config", str(config), "--worker", app]) == 2
    assert message in capsys.readouterr().err


def test_a_node_name_unfit_for_kv_keys_is_refused(tmp_path):
    class HTTP:
        @staticmethod
        def get(callback, path, headers):
            assert (path, headers) == ("/v1/agent/self", {"X-Consul-Token": "secret"})
            return {"Config": {"NodeName": "node with spaces"}}

    class Client:
        http = HTTP

        @staticmethod
        def prepare_headers():
            return {"X-Consul-Token": "secret"}

    config = write_config(tmp_path / "c.yml", {}, "fireap/", {APP: {"exec_commands": ["true"]}})
    with pytest.raises(ValueError, match=f"node name 'node with spaces' .*: set node_name in {config}"):
        _reap._node_name(_reap.load_config(str(config)), Client(), OPTIONS)


# --- the role installs what the handler imports ---------------------------------------------------


def _sibling_imports(name: str) -> set[str]:
    text = (REPO_ROOT / "plugins" / "module_utils" / name).read_text()
    pattern = r"ansible_collections\.fireap\.consul\.plugins\.module_utils\.(_\w+)"
    return {f"{match}.py" for match in re.findall(pattern, text)}


def test_the_role_copies_exactly_the_modules_its_entry_points_import():
    """fireap-reap and every other program the role installs on a node (its bin templates)."""
    templates = (REPO_ROOT / "roles" / "fireap_node" / "templates").glob("*.j2")
    entry_points = {f"{name}.py" for template in templates
                    for name in re.findall(r"module_utils\.(_\w+) import main", template.read_text())}
    assert "_reap.py" in entry_points
    needed, pending = set(), sorted(entry_points)
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(_sibling_imports(name))
    role_vars = yaml.safe_load((REPO_ROOT / "roles" / "fireap_node" / "vars" / "main.yml").read_text())
    assert sorted(role_vars["__fireap_node_module_utils"]) == sorted(needed)


def test_the_role_pins_the_handler_dependencies_as_requirements_txt_does():
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    defaults = yaml.safe_load((REPO_ROOT / "roles" / "fireap_node" / "defaults" / "main.yml").read_text())
    for requirement in defaults["fireap_node_pip_packages"]:
        name, version = requirement.split("==")
        assert pins.get(name.lower()) == version, requirement


def test_every_role_default_is_documented_with_the_same_value():
    role = REPO_ROOT / "roles" / "fireap_node"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    options = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert sorted(options) == sorted(defaults)
    for name, spec in options.items():
        assert spec["default"] == defaults[name], name
        assert spec["description"] and spec["type"], name
