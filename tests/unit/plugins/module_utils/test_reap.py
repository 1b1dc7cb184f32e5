"""fireap-reap without Consul: the catch-up decision and its reads (over a fake client), the
entry points' exit codes and usage, and what the role installs. The handler and the worker
against Consul are in tests/consul/test_reap.py; the event parsing and the record of handled
events in test_task_event.py and test_processed_events.py."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.module_utils import _reap
from ansible_collections.fireap.consul.plugins.module_utils._connection import ConsulOptions, ConsulUnreachable
from ansible_collections.fireap.consul.plugins.module_utils._kv import KVRecordError, NodeState, Schema
from ansible_collections.fireap.consul.plugins.module_utils._reap import check_app, decide, handler_command, main
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import (
    APP,
    ME,
    Spawns,
    closed_port,
    plan,
    release,
    state,
    write_config,
)

REPO_ROOT = Path(__file__).resolve().parents[4]


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
    for key, record in ((SCHEMA.release(APP), rel), (SCHEMA.plan(APP, "run-1", ME), pln), (SCHEMA.node(APP, ME), own)):
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
    names = {SCHEMA.release(APP): "release", SCHEMA.node(APP, ME): "own", SCHEMA.plan(APP, "run-1", ME): "plan"}
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
    assert result.problem.reason == "malformed KV key 'fireap/web/plan/run-1/node-me': missing field 'source'"
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


# --- entry points without Consul -------------------------------------------------------------


def test_an_unreachable_agent_exits_1(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
    config = write_config(tmp_path / "down.yml", {"host": "127.0.0.1", "port": closed_port(), "retries": 0,
                                                  "timeout": 2}, "fireap/", {APP: {"exec_commands": ["true"]}},
                          node_name=ME)
    spawns = Spawns()
    assert main(["--config", str(config)], spawn=spawns, out=io.StringIO()) == 1
    assert "cannot check the release: cannot reach the Consul agent" in (tmp_path / "log" / "reap.log").read_text()
    assert spawns.calls == []


def test_an_unreachable_agent_without_a_node_name_exits_1(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
    config = write_config(tmp_path / "down.yml", {"host": "127.0.0.1", "port": closed_port(), "retries": 0,
                                                  "timeout": 2}, "fireap/", {APP: {"exec_commands": ["true"]}})
    assert main(["--config", str(config)], spawn=Spawns()) == 1
    assert "cannot learn this node's name: cannot reach the Consul agent" in (tmp_path / "log" / "reap.log").read_text()


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


def test_the_handler_leaves_the_swarm_and_firing_code_to_the_workers_that_need_them():
    # Every agent starts a handler per event: what it imports is paid for on every node.
    program = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "import ansible_collections.fireap.consul.plugins.module_utils._reap; "
               "print(' '.join(sorted(name.rsplit('.', 1)[1] for name in sys.modules if 'module_utils._' in name)))")
    done = subprocess.run([sys.executable, "-c", program, _reap.IMPORT_ROOT], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert {"_reap", "_kv", "_propagation", "_task_event"} <= loaded
    assert not loaded & {"_swarm", "_swarm_worker", "_firing", "_progress"}


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
