"""The demo's swarm mode without a cluster: each node's artifact settings (its own directory and
port, the path left to the node), the app the task config accepts once Ansible has rendered
them, the inventory carrying them, the byte-for-byte check of every node's artifact, and the
wait for the leader's word that the run is over."""

from __future__ import annotations

import dataclasses

import yaml

from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema, SwarmRun
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import parse_config
from ansible_collections.fireap.consul.plugins.module_utils._validation import artifact_path
from devcluster.demo import run as demo
from devcluster.demo.playbooks import with_host_vars
from devcluster.demo.swarm import swarm_over

NAMES = ["node-000", "node-001", "node-002"]


def test_each_node_has_its_own_directory_and_port(tmp_path):
    host_vars = demo.swarm_host_vars(tmp_path, NAMES, 20000)
    settings = [host_vars[name][demo.SWARM_VAR] for name in NAMES]
    assert [item["port"] for item in settings] == [20000, 20001, 20002]
    paths = [artifact_path(item["path"], demo.APP, "2026.1205.1500") for item in settings]
    assert paths == [f"{tmp_path}/{name}/builds/{demo.swarm_artifact_name('2026.1205.1500')}" for name in NAMES]
    assert all(item["rate_limit"] == demo.SWARM_RATE_LIMIT for item in settings)


def test_the_swarm_app_is_valid_once_ansible_rendered_the_nodes_settings(tmp_path):
    app = demo.demo_app(tmp_path, swarm=True)
    assert app["artifact"] == f"{{{{ {demo.SWARM_VAR} }}}}"
    rendered = {**app, "artifact": dict(demo.swarm_host_vars(tmp_path, NAMES, 20000)["node-001"][demo.SWARM_VAR])}
    config = parse_config({"apps": {demo.APP: rendered}})
    assert config.apps[demo.APP].artifact.port == 20001
    assert "rsync" in demo.demo_app(tmp_path, swarm=False)["exec_commands"][0]


def test_the_inventory_carries_the_settings_unrendered(tmp_path):
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"fireap_nodes": {"hosts": {
        "node-000": {"ansible_connection": "local"}, "node-001": None}}}}}))
    written = with_host_vars(inventory, demo.swarm_host_vars(tmp_path, NAMES[:2], 20000), tmp_path / "out.yml")
    text = written.read_text()
    assert text.count("path: !unsafe") == 2 and "ansible_connection: local" in text
    hosts = yaml.safe_load(text.replace("!unsafe ", ""))["all"]["children"]["fireap_nodes"]["hosts"]
    assert hosts["node-001"][demo.SWARM_VAR]["path"].endswith("/node-001/builds/{{ app }}-{{ version }}.tar")


def test_every_nodes_artifact_is_compared_byte_for_byte(tmp_path, capsys):
    roots = {name: tmp_path / name for name in NAMES}
    name = demo.swarm_artifact_name("1")
    for root in roots.values():
        (root / demo.SWARM_DIR).mkdir(parents=True)
        (root / demo.SWARM_DIR / name).write_bytes(b"x" * 1000)
    assert demo.verify_artifacts(roots, "node-000", name)
    (roots["node-001"] / demo.SWARM_DIR / name).write_bytes(b"x" * 999 + b"y")
    (roots["node-002"] / demo.SWARM_DIR / name).unlink()
    assert not demo.verify_artifacts(roots, "node-000", name)
    out = capsys.readouterr().out
    assert "byte for byte the leader's: 1/3" in out and "node-001" in out and "no artifact" in out


def test_the_demo_takes_swarm():
    assert demo.build_parser().parse_args(["--swarm"]).swarm
    assert not demo.build_parser().parse_args([]).swarm


class _KV:
    """The one KV read swarm_over makes, from a dict."""

    def __init__(self, values):
        self.values = values
        self.reads = 0

    def get(self, key):
        self.reads += 1
        value = self.values.get(key)
        return 1, None if value is None else {"Key": key, "Value": value}


class _Client:
    def __init__(self, values):
        self.kv = _KV(values)


def test_swarm_over_waits_for_the_leaders_word():
    run_id = "20260101T000000-0123abcd"
    key = Schema().swarm_run(demo.APP, run_id)
    running = SwarmRun(leader_peers=("10.213.0.2:6881",))
    assert not swarm_over(_Client({key: running.to_json()}), demo.APP, run_id, 0)
    assert not swarm_over(_Client({}), demo.APP, run_id, 0)
    client = _Client({key: dataclasses.replace(running, finished=1767225600.0).to_json()})
    assert swarm_over(client, demo.APP, run_id, 5) and client.kv.reads == 1
