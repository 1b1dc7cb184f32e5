"""fireap-reap against the Consul target: the handler and the worker entry points reading
and writing KV, and the hostile values they must survive (the exit codes, the decision and
the parsing without Consul are in tests/unit/plugins/module_utils/test_reap.py)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._commands import fill_template
from ansible_collections.fireap.consul.plugins.module_utils._firing import fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import NodeAdvert, NodeState, ReleaseRecord, Schema
from ansible_collections.fireap.consul.plugins.module_utils._progress import ReleaseError
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import load_config
from ansible_collections.fireap.consul.plugins.module_utils._processed_events import PROCESSED_FILE, load_processed
from ansible_collections.fireap.consul.plugins.module_utils._reap import WORKER_PROCESS_NAME, handler_command, main
from devcluster.chaos.processes import _proc_stat, handler_pids, worker_pids
from devcluster.polling import wait_until
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import (
    APP,
    Spawns,
    event,
    plan,
    release,
    state,
    write_config,
)


def consul_section(target, agent: int = 0) -> dict:
    endpoint = target.agents[agent]
    section = {"host": endpoint.host, "port": endpoint.port, "scheme": endpoint.scheme}
    if target.token:
        section["token"] = target.token
    return section


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
                self.put(self.schema.plan(APP, run_id, self.node), plan(run_id, source=self.leader))
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

        @contextlib.contextmanager
        def worker_running(self):
            """Hold the app's worker lock as a running worker does."""
            self.state_dir.mkdir()
            lock = os.open(self.state_dir / f"worker-{APP}.lock", os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
            finally:
                os.close(lock)

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


def _ended(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (an orphan waits for whoever reaps it)."""
    fields = _proc_stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def test_the_handler_forks_a_detached_worker_once_it_let_its_lock_go(env, tmp_path):
    """The real starter, with the handler a process of its own as the agent runs it: it exits
    while the worker it forked runs the app's command; the worker is a session of its own,
    named fireap-worker, holds its pid in its lock file (what the chaos suite finds it by) and
    not the handler's lock; then it records the node done."""
    go = tmp_path / "go"
    config = write_config(tmp_path / "forked.yml", consul_section(env.target), env.schema.prefix,
                          {APP: {"exec_commands": [f"while [ ! -e {go} ]; do sleep 0.05; done"]}})
    env.fire()
    handled = subprocess.run(handler_command(str(config)), input=json.dumps([event("ev-1", 3)]), text=True,
                             capture_output=True, timeout=120, check=False)
    assert handled.returncode == 0, handled.stderr
    lock = env.state_dir / f"worker-{APP}.lock"
    wait_until(lambda: lock.exists() and lock.read_text().strip().isdigit(), 60, "the worker's pid in its lock file")
    pid = int(lock.read_text())
    try:
        assert Path(f"/proc/{pid}/comm").read_text() == f"{WORKER_PROCESS_NAME}\n"
        assert os.getsid(pid) == pid
        assert worker_pids(config, APP) == [pid]
        assert worker_pids(config, "db") == []
        assert handler_pids(config) == []
        with open(env.state_dir / "handler.lock", "w", encoding="ascii") as handler_lock:
            fcntl.flock(handler_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert f"worker started (pid {pid})" in env.log()
        go.touch()
        wait_until(lambda: _ended(pid), 60, "the worker to end")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _index, entry = env.target.client().kv.get(env.schema.node(APP, env.node))
    assert json.loads(entry["Value"])["status"] == "done"


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
    with env.worker_running():
        assert env.handle([event("ev-1", 3)])[0] == 0
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


def test_a_malformed_release_exits_1_but_other_apps_are_checked(env):
    env.target.client().kv.put(env.schema.release(APP), "{broken")
    db_release = ReleaseRecord(app="db", version="7", run_id="run-db", fanout=1, leader=env.leader,
                               target_count=2, fired_at=1.0)
    env.put(env.schema.plan("db", "run-db", env.node), plan("run-db", source=env.leader))
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


# --- the advert of the node's apps ------------------------------------------------------------


def advert_entry(env):
    return env.target.client().kv.get(env.schema.advert(env.node))[1]


def test_the_watch_start_advertises_the_apps_and_a_changed_config_advertises_again(env, tmp_path):
    assert env.handle([])[0] == 0
    entry = advert_entry(env)
    assert NodeAdvert.from_json(entry["Value"]) == load_config(str(env.config)).advert()
    assert set(json.loads(entry["Value"])["apps"]) == {APP, "db"}
    assert b"exec_commands" not in entry["Value"] and b"echo" not in entry["Value"], "no commands in KV"
    assert f"advertised this node's apps in {env.schema.advert(env.node)}: web, db" in env.log()

    env.handle([])  # another agent reload: the advert is current, nothing is written
    assert advert_entry(env)["ModifyIndex"] == entry["ModifyIndex"]

    write_config(env.config, consul_section(env.target), env.schema.prefix,
                 {APP: {"exec_commands": ["true"], "max_semaphores": 2}})
    assert env.handle([event("ev-1", 3)])[0] == 0  # even a call with a new event notices the change
    changed = NodeAdvert.from_json(advert_entry(env)["Value"])
    assert list(changed.apps) == [APP] and changed.apps[APP].max_semaphores == 2


def test_the_fanout_comes_from_the_advert_of_a_config_outside_etc_fireap(env, tmp_path):
    """Before the adverts, fireap_fire read /etc/fireap/config.yml on the leader: 5 here."""
    env.config = tmp_path / "opt" / "fireap-config" / "config.yml"
    env.config.parent.mkdir(parents=True)
    write_config(env.config, consul_section(env.target), env.schema.prefix,
                 {APP: {"exec_commands": ["true"], "max_semaphores": 3}})
    assert env.handle([])[0] == 0
    fired = fire(env.target.client(len(env.target.agents) - 1), env.schema, APP, version="1", check_mode=True)
    assert fired["targets"] == [env.leader, env.node]
    assert fired["fanout"] == 3
    others = [agent.name for agent in env.target.agents[1:-1]]
    assert fired["without_app"] == others


def test_a_node_whose_services_do_not_match_the_app_filter_is_no_target_and_does_not_pull(env, tmp_path):
    config = write_config(tmp_path / "filtered.yml", consul_section(env.target), env.schema.prefix,
                          {APP: {"exec_commands": [f"touch {env.ran}"], "service": "nosuchservice"}})
    env.config = config
    assert env.handle([])[0] == 0
    leader_client = env.target.client(len(env.target.agents) - 1)
    with pytest.raises(ReleaseError, match=rf"no node besides the leader {env.leader} takes app 'web'.*"
                                           rf"1 have it, but its service/tag filters there match none of their "
                                           rf"services in the catalog \({env.node}\)"):
        fire(leader_client, env.schema, APP, version="1")

    env.fire()  # targeted all the same (say, by a leader that read the catalog before a change)
    assert main(["--config", str(config), "--worker", APP]) == 1
    assert not env.ran.exists()
    failed = own_record(env)
    assert failed.status == "failed"
    assert failed.error.startswith("not pulled: the app's service filter '^nosuchservice$' matches none of this "
                                   "node's services")


def test_a_node_running_the_app_filter_s_service_is_a_target_and_pulls(env, tmp_path):
    service = f"svc-{os.getpid()}-{id(env)}"
    config = write_config(tmp_path / "filtered.yml", consul_section(env.target), env.schema.prefix,
                          {APP: {"exec_commands": [f"touch {env.ran}"], "service": service, "tag": "blue"}})
    env.config = config
    registered = env.target.http("PUT", "/v1/agent/service/register", 0,
                                 json_body={"Name": service, "ID": service + "-1", "Tags": ["blue"]})
    assert registered.status_code == 200, registered.text
    try:
        assert env.handle([])[0] == 0
        fired = fire(env.target.client(len(env.target.agents) - 1), env.schema, APP, version="1")
        assert fired["targets"] == [env.leader, env.node] and fired["not_accepting"] == []
        assert main(["--config", str(config), "--worker", APP]) == 0
        assert env.ran.exists() and own_record(env).status == "done"
    finally:
        env.target.http("PUT", f"/v1/agent/service/deregister/{service}-1", 0)


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
    with env.worker_running():
        assert main(["--config", str(env.config), "--worker", APP]) == 0
    assert not env.ran.exists()
    assert "another worker for this app is running; it will pull again" in env.log()


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
    assert env.target.client().kv.put(env.schema.plan(APP, "run-1", env.node), json.dumps({**entry, "source_address": hostile}))

    assert handler(monkeypatch) == 0
    assert [call[1] for call in env.spawns.calls] == [APP]
    plan_key = env.schema.plan(APP, "run-1", env.node)
    # The value is shown clipped (repr, at most 80 characters).
    assert re.search(re.escape(f"app=web version=1.0: run run-1 cannot be pulled (malformed KV key '{plan_key}': field "
                               "'source_address': address '-oProxyCommand=touch ") + r".*"
                     + re.escape(" is neither an IP address nor a host name): recording it as failed: "
                                 "starting a worker"),
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
    env.target.client().kv.put(env.schema.plan(APP, "run-1", env.node), json.dumps(entry))
    return "the plan entry of run run-1 names this node as its own source"


def _malformed_plan(env):
    entry = plan("run-1", source=env.leader).to_dict()
    env.target.client().kv.put(env.schema.plan(APP, "run-1", env.node), json.dumps({**entry, "stage": 0}))
    return f"malformed KV key '{env.schema.plan(APP, 'run-1', env.node)}': field 'stage'"


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
