"""The fireap_node role, applied with the real ansible-playbook to the nodes of the dev cluster.

The cluster runs with ACLs (a token in the task config). The role is applied twice: the first
run installs and reloads every agent, the second changes nothing. The reloaded agents run the
installed fireap-reap from their watch; a release written the way fireap_fire writes it and
woken by the FIREAP:TASK event then reaches every node through the installed handler. Then
the role runs in check mode and with its tags.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from devcluster.polling import wait_until

from ansible_collections.fireap.consul.plugins.module_utils._firing import EVENT_NAME, event_payload
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NodeAdvert,
    NodeState,
    ReleaseRecord,
    Schema,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = REPO_ROOT / ".venv" / "bin" / "ansible-playbook"
PLAYBOOK = Path(__file__).resolve().parent / "playbooks" / "role_smoke.yml"
NODES = 4
FANOUT = 2
APP = "demo"
TOKEN = f"role-test-{uuid.uuid4()}"
PLAYBOOK_TIMEOUT = 600
HANDLER_TIMEOUT = 60
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def _extra_vars(kv_prefix: str, out_dir: Path) -> str:
    """The role's variables this test sets beyond the dev-cluster inventory's.

    The command is marked !unsafe so that Ansible leaves its placeholders to the node.
    """
    mapped = {
        "fireap_node_kv_prefix": kv_prefix,
        "fireap_node_defaults": {"watch_timeout": 60, "command_timeout": 30},
    }
    command = f"echo {{{{ app }}}} {{{{ version }}}} {{{{ remote.name }}}} > {out_dir}/{{{{ node }}}}.txt"
    apps = f"fireap_node_apps:\n  {APP}:\n    exec_commands:\n      - !unsafe {json.dumps(command)}\n"
    return yaml.safe_dump(mapped, sort_keys=False) + apps


@pytest.fixture(scope="module")
def cluster(make_double):
    with make_double(nodes=NODES, acl_token=TOKEN, name="role-devcluster") as target:
        yield target.double, target


@pytest.fixture(scope="module")
def deployed(cluster, tmp_path_factory):
    """The role applied twice to every node; yields the two runs and the test's paths."""
    double, target = cluster
    work = tmp_path_factory.mktemp("role-run")
    kv_prefix = f"fireap-test/{uuid.uuid4()}/"
    out_dir = work / "out"
    out_dir.mkdir()
    extra_vars = work / "extra-vars.yml"
    extra_vars.write_text(_extra_vars(kv_prefix, out_dir))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_LOCAL_TEMP=str(work / "ansible-tmp"))
    command = [str(ANSIBLE_PLAYBOOK), "-i", str(double.workdir / "inventory.yml"), "-e", f"@{extra_vars}",
               str(PLAYBOOK)]

    def apply(*extra: str) -> subprocess.CompletedProcess:
        """The role applied with these further ansible-playbook arguments."""
        # cwd outside the repository: the run must not depend on its ansible.cfg.
        return subprocess.run([*command, *extra], cwd=work, env=env, capture_output=True, text=True,
                              timeout=PLAYBOOK_TIMEOUT, check=False)

    runs, adverts = [], []
    for _run in range(2):
        result = apply()
        assert result.returncode == 0, f"ansible-playbook failed:\n{result.stdout}\n{result.stderr}"
        runs.append(result.stdout)
        # Read at once: a release started right after the play targets the nodes advertised then.
        _index, entries = target.client().kv.get(Schema(kv_prefix).adverts_prefix(), recurse=True)
        adverts.append({entry["Key"]: NodeAdvert.from_json(entry["Value"]) for entry in entries or []})
    yield {"runs": runs, "adverts": adverts, "kv_prefix": kv_prefix, "out_dir": out_dir, "double": double,
           "target": target, "apply": apply}
    target.client().kv.delete(kv_prefix, recurse=True)


def _recap(output: str) -> dict[str, tuple[int, int, int, int]]:
    return {host: tuple(int(n) for n in counts) for host, *counts in RECAP.findall(output)}


def _results(output: str, task: str) -> dict[str, str]:
    """Each host's result word (ok, changed, skipping, fatal) for the task or handler named ``task``."""
    block = re.search(rf"^(?:TASK|RUNNING HANDLER) \[fireap\.consul\.fireap_node : {re.escape(task)}\] \**\n"
                      r"(.*?)(?:\n\n|\Z)", output, re.M | re.S)
    assert block, f"no task {task!r} in:\n{output}"
    return dict((host, word) for word, host in re.findall(r"^(\w+): \[([^\]]+)\]", block.group(1), re.M))


def _node_root(double, name: str) -> Path:
    return double.workdir / "nodes" / name


def test_the_first_run_changes_every_node_and_the_second_nothing(deployed):
    first, second = (_recap(run) for run in deployed["runs"])
    names = deployed["target"].node_names
    assert sorted(first) == sorted(second) == sorted(names)
    for name in names:
        ok, changed, unreachable, failed = first[name]
        assert changed > 0 and unreachable == failed == 0, first[name]
        tasks = "\n".join(line for line in deployed["runs"][1].splitlines() if line.startswith(("TASK", "changed")))
        assert second[name][1:] == (0, 0, 0), f"{name} in the second run: {second[name]}\n{tasks}"
    assert "RUNNING HANDLER [fireap.consul.fireap_node : Reload the Consul agent]" in deployed["runs"][0]
    assert "RUNNING HANDLER" not in deployed["runs"][1]
    assert TOKEN not in deployed["runs"][0] + deployed["runs"][1]


def test_files_are_installed_with_their_modes(deployed):
    double, target = deployed["double"], deployed["target"]
    for agent in target.agents:
        root = _node_root(double, agent.name)
        config = root / "etc" / "fireap" / "config.yml"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        loaded = yaml.safe_load(config.read_text())
        assert loaded["consul"] == {"host": "127.0.0.1", "port": agent.port, "scheme": "http",
                                    "validate_certs": True, "token": TOKEN}
        assert loaded["apps"][APP]["exec_commands"][0].startswith("echo {{ app }} {{ version }} {{ remote.name }}")
        watch = agent.config_dir / "fireap.json"
        assert stat.S_IMODE(watch.stat().st_mode) == 0o600
        reap = root / "opt" / "fireap" / "bin" / "fireap-reap"
        assert json.loads(watch.read_text()) == {"watches": [{
            "type": "event", "name": EVENT_NAME, "args": [str(reap), "--config", str(config)], "token": TOKEN,
        }]}
        assert stat.S_IMODE(reap.stat().st_mode) == 0o755
        assert reap.read_text().startswith(f"#!{sys.executable}\n")
        monitor = root / "opt" / "fireap" / "bin" / "fireap-monitor"
        assert stat.S_IMODE(monitor.stat().st_mode) == 0o755
        assert monitor.read_text().startswith(f"#!{sys.executable}\n")
        installed = root / "opt" / "fireap" / "lib" / "ansible_collections" / "fireap" / "consul" / "plugins"
        for module in ("_reap.py", "_worker.py", "_monitor.py", "_report.py"):
            source = REPO_ROOT / "plugins" / "module_utils" / module
            assert (installed / "module_utils" / module).read_bytes() == source.read_bytes()
        for directory in ("var/lib/fireap", "var/log/fireap"):
            assert stat.S_IMODE((root / directory).stat().st_mode) == 0o750


def test_the_reloaded_watch_runs_the_installed_handler(deployed):
    double, target = deployed["double"], deployed["target"]
    for agent in target.agents:
        log = _node_root(double, agent.name) / "var" / "log" / "fireap" / "reap.log"
        text = wait_until(lambda: log.exists() and log.read_text(), HANDLER_TIMEOUT, f"{log} written by the watch")
        assert re.search(rf"INFO fireap-reap\[\d+\] app=- version=-: invoked with 0 event\(s\), 0 new; "
                         rf"node {agent.name}, apps: {APP}$", text, re.M), text


def test_every_node_has_advertised_its_apps_when_the_play_ends(deployed):
    schema = Schema(deployed["kv_prefix"])
    for adverts in deployed["adverts"]:
        assert {key: sorted(advert.apps) for key, advert in adverts.items()} == {
            schema.advert(name): [APP] for name in deployed["target"].node_names}


def test_the_role_waits_for_each_node_to_advertise_after_the_reload(deployed):
    names = deployed["target"].node_names
    assert _results(deployed["runs"][0], "Wait for the node to advertise its apps") == dict.fromkeys(names, "ok")


def test_the_installed_handler_validates_and_dry_runs(deployed):
    double, target = deployed["double"], deployed["target"]
    root = _node_root(double, target.agents[1].name)
    reap = root / "opt" / "fireap" / "bin" / "fireap-reap"
    config = root / "etc" / "fireap" / "config.yml"
    checked = subprocess.run([str(reap), "--config", str(config), "--check"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert (checked.returncode, checked.stdout) == (0, f"{config}: valid; apps: {APP}\n")
    dry = subprocess.run([str(reap), "--config", str(config), "--dry-run"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60, check=False)
    assert dry.returncode == 0, dry.stderr
    assert f"{APP}: nothing to do: no release recorded for this app" in dry.stdout


def test_a_fired_release_reaches_every_node_through_the_installed_handler(deployed):
    target, out_dir = deployed["target"], deployed["out_dir"]
    schema = Schema(deployed["kv_prefix"])
    client = target.client()
    names = target.node_names
    leader, version, run_id = names[0], "2.0.1", str(uuid.uuid4())
    now = time.time()
    plan = plan_release(names, leader, FANOUT, run_id)
    records = [(schema.plan(APP, run_id, node), entry.to_json()) for node, entry in plan.items()]
    records.append((schema.node(APP, leader), NodeState(version=version, run_id=run_id, status="done", started=now,
                                                        depth=0, finished=now).to_json()))
    for key, value in records:
        assert client.kv.put(key, value)
    client.kv.put(schema.release(APP), ReleaseRecord(app=APP, version=version, run_id=run_id, fanout=FANOUT,
                                                     leader=leader, target_count=len(names), fired_at=now).to_json())
    fired = target.http("PUT", f"/v1/event/fire/{EVENT_NAME}", data=event_payload(APP, version))
    assert fired.status_code == 200, fired.text

    def states():
        found = {}
        for node in names[1:]:
            _index, entry = client.kv.get(schema.node(APP, node))
            if entry is None:
                return None
            found[node] = NodeState.from_json(entry["Value"])
            if not found[node].terminal:
                return None
        return found

    finished = wait_until(states, HANDLER_TIMEOUT, "every node done or failed")
    assert {node: state.status for node, state in finished.items()} == {node: "done" for node in names[1:]}
    for node, state in finished.items():
        assert state.version == version
        assert (out_dir / f"{node}.txt").read_text() == f"{APP} {version} {state.source}\n"
        if state.source != leader:  # a source had finished before its puller started pulling
            assert finished[state.source].depth == state.depth - 1
            assert finished[state.source].finished <= state.finished
    assert not (out_dir / f"{leader}.txt").exists()


def test_the_installed_monitor_shows_the_release_with_the_node_config(deployed):
    """Runs after the release above: every node done, read with the node's config (token, prefix)."""
    double, target = deployed["double"], deployed["target"]
    root = _node_root(double, target.agents[2].name)
    monitor = root / "opt" / "fireap" / "bin" / "fireap-monitor"
    config = root / "etc" / "fireap" / "config.yml"
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSUL_")}
    shown = subprocess.run([str(monitor), "--config", str(config), "--app", APP, "--one-shot"], capture_output=True,
                           text=True, timeout=60, check=False, env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert re.fullmatch(rf"{APP} 2\.0\.1  run \S{{12}}  fired .* UTC  finished after \d+\.\ds", lines[0]), lines[0]
    assert f"{NODES}/{NODES} done, 0 failed" in lines[1]
    assert [line.split()[:3] for line in lines[4:]] == [[name, "2.0.1", "done"] for name in target.node_names]
    assert TOKEN not in shown.stdout + shown.stderr


def test_the_reload_handler_reports_a_change(deployed):
    names = deployed["target"].node_names
    assert _results(deployed["runs"][0], "Reload the Consul agent") == dict.fromkeys(names, "changed")


def test_check_mode_runs_the_python_check_and_changes_nothing(deployed):
    run = deployed["apply"]("--check")
    assert run.returncode == 0, run.stdout + run.stderr
    names = deployed["target"].node_names
    assert _results(run.stdout, "Check that the handler's Python can run fireap-reap") == dict.fromkeys(names, "ok")
    assert all(counts[1:] == (0, 0, 0) for counts in _recap(run.stdout).values()), run.stdout


def test_check_mode_fails_on_a_python_that_cannot_run_the_handler(deployed):
    run = deployed["apply"]("--check", "-e", "fireap_node_python=/nonexistent/python3")
    assert run.returncode != 0, run.stdout
    assert "/nonexistent/python3 cannot run fireap-reap" in run.stdout + run.stderr


def test_check_mode_leaves_out_the_check_of_a_venv_it_has_not_created(deployed):
    double, target = deployed["double"], deployed["target"]
    run = deployed["apply"]("--check", "-e", "fireap_node_python=")
    assert run.returncode == 0, run.stdout + run.stderr
    names = target.node_names
    assert _results(run.stdout, "Create the handler's venv with its Python dependencies") == dict.fromkeys(
        names, "changed")
    assert _results(run.stdout, "Check that the handler's Python can run fireap-reap") == dict.fromkeys(
        names, "skipping")
    assert not any((_node_root(double, name) / "opt" / "fireap" / "venv").exists() for name in names)


def test_every_task_has_the_role_tag_and_the_install_or_the_config_tag(deployed):
    listed = deployed["apply"]("--list-tasks")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    tags = dict(re.findall(r"fireap\.consul\.fireap_node : (.*?)\tTAGS: \[(.*?)\]", listed.stdout))
    del tags["Validating arguments against arg spec 'main' - Install the fireap-reap handler and its Consul watch "
             "on a node"]
    assert len(tags) == 12, tags
    install = {task for task, names in tags.items() if names == "fireap_node, fireap_node_install"}
    config = {task for task, names in tags.items() if names == "fireap_node, fireap_node_config"}
    assert config == {"Create the config directory", "Write the task config",
                      "Register the Consul watch that runs fireap-reap", "Install the logrotate snippet of the handler's log"}
    assert install == set(tags) - config


def test_the_config_tag_rewrites_the_config_only_and_the_install_tag_the_code_only(deployed):
    double, target = deployed["double"], deployed["target"]
    node = target.agents[1].name
    root = _node_root(double, node)
    monitor = root / "opt" / "fireap" / "bin" / "fireap-monitor"
    config = root / "etc" / "fireap" / "config.yml"
    monitor.unlink()
    config.write_text(config.read_text() + "# edited by hand\n")

    run = deployed["apply"]("--tags", "fireap_node_config")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "# edited by hand" not in config.read_text() and not monitor.exists()
    assert _results(run.stdout, "Write the task config")[node] == "changed"
    assert _results(run.stdout, "Reload the Consul agent") == {node: "changed"}
    assert "Install the fireap-monitor command" not in run.stdout

    run = deployed["apply"]("--tags", "fireap_node_install")
    assert run.returncode == 0, run.stdout + run.stderr
    assert monitor.exists() and _results(run.stdout, "Install the fireap-monitor command")[node] == "changed"
    assert "Write the task config" not in run.stdout and "RUNNING HANDLER" not in run.stdout
