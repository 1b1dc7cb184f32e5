"""The fireap modules from the `ansible` command line, against the dev cluster, with nothing but
the inventory playbooks/setup.yml runs with.

The dev cluster's inventory gives each node the fireap_node role's variables (its agent's port,
the ACL token, its prefix); the modules' action plugins take their connection from them, so no
command here names a port or a token. No handler is installed on the nodes: the test advertises
each node's apps in KV as a handler would, and a fired run stays in progress, so the fire lock it
holds is certain to refuse a second fire of the same app.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.module_utils._kv import AppAdvert, NodeAdvert, ReleaseRecord, Schema

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = REPO_ROOT / ".venv" / "bin"
COLLECTIONS_PATH = REPO_ROOT / "build"
README = REPO_ROOT / "README.md"
NODES = 4
TOKEN = f"adhoc-test-{uuid.uuid4()}"
COMMAND_TIMEOUT = 300
#: `ansible` prints one result per host: "node-000 | CHANGED => {...json...}".
RESULT = re.compile(r"^(?P<host>\S+) \| (?P<state>[A-Z]+)!? => (?P<json>\{.*?^\})$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def cluster(make_double):
    with make_double(nodes=NODES, acl_token=TOKEN, name="adhoc-devcluster") as target:
        yield target.double, target


def ansible_env(cwd: Path, with_config: bool) -> dict[str, str]:
    """The environment of a command in ``cwd``: none of the caller's Ansible or Consul settings.

    ``with_config`` names the collection and the project's ansible.cfg through the environment,
    as for any directory; without it the run relies on the project's ansible.cfg being in ``cwd``.
    """
    assert (COLLECTIONS_PATH / "ansible_collections" / "fireap" / "consul").exists(), "run `make setup` first"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "CONSUL_"))}
    env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(cwd / ".ansible-tmp"))
    if with_config:
        env.update(ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS_PATH), ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"))
    return env


def run_adhoc(command: list[str], cwd: Path, with_config: bool = True) -> tuple[int, str, dict]:
    """Run an `ansible` command line; (exit status, output, the one host's result)."""
    done = subprocess.run(command, cwd=cwd, env=ansible_env(cwd, with_config), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, check=False)
    output = done.stdout + done.stderr
    match = RESULT.search(done.stdout)
    assert match, f"no module result in the output of {command}:\n{output}"
    return done.returncode, output, json.loads(match["json"])


def adhoc(inventory: Path, module: str, module_args: str, cwd: Path, *options: str,
          with_config: bool = True) -> tuple[int, str, dict]:
    """Run `ansible fireap_leader -i <inventory> -m <module> -a <args> [options]`."""
    command = [str(BIN / "ansible"), "fireap_leader", "-i", str(inventory), "-m", module, "-a", module_args, *options]
    return run_adhoc(command, cwd, with_config)


def inventory_variant(double, path: Path, drop: tuple[str, ...] = (), **leader_vars) -> Path:
    """The dev cluster's inventory without the variables ``drop`` and with ``leader_vars`` on the leader."""
    inventory = yaml.safe_load(double.inventory.read_text())
    for name in drop:
        inventory["all"]["vars"].pop(name)
    hosts = inventory["all"]["children"]["fireap_nodes"]["hosts"]
    hosts[next(iter(inventory["all"]["children"]["fireap_leader"]["hosts"]))].update(leader_vars)
    path.write_text(yaml.safe_dump(inventory))
    path.chmod(0o600)
    return path


def release_of(target, app: str, prefix: str = Schema().prefix) -> ReleaseRecord:
    _index, entry = target.client().kv.get(Schema(prefix).release(app))
    assert entry is not None, f"no release record of {app} under {prefix}"
    return ReleaseRecord.from_json(entry["Value"])


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def advertise(target, app: str, prefix: str = Schema().prefix) -> str:
    """Add ``app`` to every node's advert of its apps, as its handler would with the app in its config."""
    schema = Schema(prefix)
    client = target.client()
    for node in target.node_names:
        _index, entry = client.kv.get(schema.advert(node))
        apps = dict(NodeAdvert.from_json(entry["Value"]).apps) if entry else {}
        apps[app] = AppAdvert(max_semaphores=2)
        assert client.kv.put(schema.advert(node), NodeAdvert(apps).to_json())
    return app


def unique_app(target, prefix: str = Schema().prefix) -> str:
    """A new app name, advertised by every node."""
    return advertise(target, f"adhoc-{uuid.uuid4().hex[:8]}", prefix)


def test_a_fire_with_only_the_setup_inventory_starts_a_run_on_the_leader(cluster, tmp_path):
    double, target = cluster
    app = unique_app(target)
    status, output, result = adhoc(double.inventory, "fireap.consul.fireap_fire", f"app={app} version=1.4.2 fanout=2",
                                   tmp_path)
    assert status == 0, output
    assert result["changed"] is True
    assert (result["version"], result["leader"], result["target_count"]) == ("1.4.2", target.agents[0].name, NODES)
    assert result["targets"] == target.node_names
    record = release_of(target, app)
    assert (record.run_id, record.version, record.fanout, record.status) == (result["run_id"], "1.4.2", 2, "running")
    assert TOKEN not in output


def test_a_second_fire_while_the_run_is_in_progress_is_refused(cluster, tmp_path):
    double, target = cluster
    app = unique_app(target)
    status, output, first = adhoc(double.inventory, "fireap.consul.fireap_fire", f"app={app} version=1", tmp_path)
    assert status == 0, output
    status, output, second = adhoc(double.inventory, "fireap.consul.fireap_fire", f"app={app} version=2", tmp_path)
    assert status != 0, output
    assert first["run_id"] in second["msg"] and "still running" in second["msg"], second["msg"]
    assert release_of(target, app).run_id == first["run_id"], "the refused fire changed the release"


def test_the_kv_prefix_of_the_role_is_the_modules(cluster, tmp_path):
    double, target = cluster
    prefix = f"adhoc-{uuid.uuid4().hex[:8]}/"
    app = unique_app(target, prefix)
    inventory = inventory_variant(double, tmp_path / "inventory.yml", fireap_node_kv_prefix=prefix)
    status, output, fired = adhoc(inventory, "fireap.consul.fireap_fire", f"app={app} version=3", tmp_path)
    assert status == 0, output
    assert release_of(target, app, prefix).run_id == fired["run_id"]
    status, output, progress = adhoc(inventory, "fireap.consul.fireap_info", f"app={app}", tmp_path)
    assert status == 0, output
    assert (progress["run_id"], progress["status"]) == (fired["run_id"], "running")


def test_options_given_on_the_command_line_win(cluster, tmp_path, closed_port):
    double, _target = cluster
    status, output, result = adhoc(double.inventory, "fireap.consul.fireap_info", f"app=any port={closed_port}",
                                   tmp_path)
    assert status != 0, output
    assert f"cannot reach the Consul agent at http://127.0.0.1:{closed_port}" in result["msg"]
    assert TOKEN not in output


def test_module_defaults_win(cluster, tmp_path, closed_port):
    double, _target = cluster
    playbook = tmp_path / "defaults.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "fireap_leader",
        "gather_facts": False,
        "module_defaults": {"group/fireap.consul.consul": {"port": closed_port}},
        "tasks": [{"fireap.consul.fireap_info": {"app": "any"}}],
    }]))
    done = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(double.inventory), str(playbook)], cwd=tmp_path,
                          env=ansible_env(tmp_path, with_config=True), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, check=False)
    assert done.returncode != 0, done.stdout
    assert f"cannot reach the Consul agent at http://127.0.0.1:{closed_port}" in done.stdout


def test_the_token_from_the_inventory_never_shows(cluster, tmp_path):
    double, _target = cluster
    status, output, result = adhoc(double.inventory, "fireap.consul.fireap_info", "app=any", tmp_path, "-vvvv")
    assert status == 0, output
    assert result["invocation"]["module_args"]["token"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert TOKEN not in output


def test_the_role_s_python_runs_the_modules_when_the_host_names_none(cluster, tmp_path):
    """As on a real leader: the role put py-consul into <prefix>/venv, the host's default Python may lack it."""
    double, target = cluster
    prefix = tmp_path / "opt" / "fireap"
    venv_python = prefix / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    venv_python.chmod(0o755)
    inventory = inventory_variant(double, tmp_path / "inventory.yml", drop=("ansible_python_interpreter",
                                                                            "fireap_node_python"),
                                  fireap_node_prefix=str(prefix))
    app = unique_app(target)
    status, output, fired = adhoc(inventory, "fireap.consul.fireap_fire", f"app={app}", tmp_path, "-vvv")
    assert status == 0, output
    assert f"EXEC /bin/sh -c '{venv_python} && sleep 0'" in output
    assert release_of(target, app).run_id == fired["run_id"]
    # Under async, the polling of the job runs with the same Python.
    status, output, progress = adhoc(inventory, "fireap.consul.fireap_info", f"app={app}", tmp_path, "-B", "60",
                                     "-P", "1")
    assert status == 0, output
    assert progress["run_id"] == fired["run_id"] and "discovered" not in output


def test_wait_reads_the_run_with_only_the_setup_inventory(cluster, tmp_path):
    double, target = cluster
    app = unique_app(target)
    status, output, fired = adhoc(double.inventory, "fireap.consul.fireap_fire", f"app={app}", tmp_path)
    assert status == 0, output
    status, output, waited = adhoc(double.inventory, "fireap.consul.fireap_wait",
                                   f"app={app} timeout=1 poll=0.5 straggler_retry_after=0", tmp_path)
    assert status != 0, output
    assert (waited["run_id"], waited["timed_out"], waited["counts"]["done"]) == (fired["run_id"], True, 1)
    assert TOKEN not in output


def test_short_module_names_work_from_the_project_root(cluster):
    double, target = cluster
    app = unique_app(target)
    status, output, fired = adhoc(double.inventory, "fireap_fire", f"app={app}", REPO_ROOT, with_config=False)
    assert status == 0, output
    assert fired["version"] == "1", "without a version nor a previous run, the first version is 1"
    status, output, progress = adhoc(double.inventory, "fireap_info", f"app={app}", REPO_ROOT, with_config=False)
    assert status == 0, output
    assert (progress["run_id"], progress["status"], progress["total"]) == (fired["run_id"], "running", NODES)
    assert progress["counts"] == {"done": 1, "pulling": 0, "waiting": 0, "failed": 0, "pending": NODES - 1}


def readme_adhoc_commands() -> list[list[str]]:
    """The `ansible` command lines of the README's section "Ad hoc commands", in order."""
    section = README.read_text(encoding="utf-8").split("\n## Ad hoc commands\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    commands = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]
    return [command for command in commands if command and command[0] == "ansible"]


def test_the_readme_s_ad_hoc_commands_run_as_written(cluster, tmp_path):
    double, target = cluster
    advertise(target, "myapp")
    commands = readme_adhoc_commands()
    assert [command[command.index("-m") + 1] for command in commands] == [
        "fireap.consul.fireap_fire", "fireap.consul.fireap_info", "fireap.consul.fireap_clear"]
    for command in commands:
        assert command[1:4] == ["fireap_leader", "-i", "inventory"], command
        status, output, result = run_adhoc([str(BIN / "ansible"), *command[1:3], str(double.inventory), *command[4:]],
                                           tmp_path)
        assert status == 0, f"{shlex.join(command)}:\n{output}"
    record = release_of(target, "myapp")
    assert (record.version, record.status, record.aborted_reason) == ("1.4.2", "aborted", "bad build")
    assert result["changed"] is True
