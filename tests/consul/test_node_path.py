"""The node path runs without ansible: the files the role installs, on their own.

Nodes get only py-consul and PyYAML. This venv has ansible (and Jinja2) installed, so a
stray import would go unnoticed; the handler and the monitor here run in a child
interpreter that refuses those imports, from a lib tree laid out as the role lays it out.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._firing import fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import advertise

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLE_VARS = REPO_ROOT / "roles" / "fireap_node" / "vars" / "main.yml"

RUNNER = r"""
import importlib, importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ansible", "jinja2"):
            raise ImportError(f"the node path imported {name}")
        return None

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, sys.argv[1])
command = importlib.import_module("ansible_collections.fireap.consul.plugins.module_utils." + sys.argv[2])
code = command.main(sys.argv[3:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("ansible", "jinja2"))
print("LEAKED " + json.dumps(leaked))
sys.exit(code)
"""


def _install_lib(tmp_path: Path) -> Path:
    """Copy the handler's files as the role does: <lib>/ansible_collections/fireap/consul/..."""
    lib = tmp_path / "lib"
    target = lib / "ansible_collections" / "fireap" / "consul" / "plugins" / "module_utils"
    target.mkdir(parents=True)
    for name in yaml.safe_load(ROLE_VARS.read_text())["__fireap_node_module_utils"]:
        shutil.copy(REPO_ROOT / "plugins" / "module_utils" / name, target / name)
    return lib


def _run(lib: Path, *args: str, stdin: str = "", module: str = "_reap") -> subprocess.CompletedProcess:
    """Run ``module``'s main(args) from ``lib`` in an interpreter that refuses ansible and jinja2."""
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(lib), module, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
        cwd=lib,
    )


def _config(tmp_path: Path, consul: dict, **settings) -> Path:
    path = tmp_path / "config.yml"
    config = {
        **settings,
        "consul": consul,
        "state_dir": str(tmp_path / "state"),
        "log_file": str(tmp_path / "reap.log"),
        "apps": {"web": {"exec_commands": ["echo {{ version }} from {{ remote.name }}"]}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_installed_handler_checks_a_config_without_ansible(tmp_path):
    lib = _install_lib(tmp_path)
    run = _run(lib, "--config", str(_config(tmp_path, {"port": 1})), "--check")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "LEAKED []" in run.stdout


def test_the_installed_handler_reads_consul_without_ansible(tmp_path, consul_target):
    agent = consul_target.agents[0]
    consul = {"host": agent.host, "port": agent.port, "scheme": agent.scheme}
    if consul_target.token:
        consul["token"] = consul_target.token
    lib = _install_lib(tmp_path)
    run = _run(lib, "--config", str(_config(tmp_path, consul)), "--dry-run", stdin=json.dumps([]))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "LEAKED []" in run.stdout
    assert "dry run" in run.stdout


def test_the_refusal_really_refuses(tmp_path):
    """The guard itself: a module that imports ansible fails under it."""
    lib = _install_lib(tmp_path)
    module_utils = lib / "ansible_collections" / "fireap" / "consul" / "plugins" / "module_utils"
    reap = module_utils / "_reap.py"
    reap.write_text(reap.read_text() + "\nimport ansible.module_utils.basic\n")
    run = _run(lib, "--config", str(_config(tmp_path, {"port": 1})), "--check")
    assert run.returncode != 0
    assert "the node path imported ansible" in run.stderr


def test_the_installed_monitor_shows_a_release_and_writes_its_report_without_ansible(tmp_path, consul_target, kv_prefix):
    agent = consul_target.agents[0]
    client = consul_target.client()
    schema = Schema(kv_prefix)
    advertise(client, schema, ["web"])
    fired = fire(client, schema, "web", version="5.0.1", fanout=2)
    try:
        consul = {"host": agent.host, "port": agent.port, "scheme": agent.scheme}
        if consul_target.token:
            consul["token"] = consul_target.token
        config = _config(tmp_path, dict(consul), kv_prefix=kv_prefix)
        lib = _install_lib(tmp_path)
        shown = _run(lib, "--config", str(config), "--app", "web", "--one-shot", module="_monitor")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "LEAKED []" in shown.stdout
        assert f"web 5.0.1  run {fired['run_id'][:12]}" in shown.stdout
        report = tmp_path / "report.html"
        written = _run(lib, "--config", str(config), "--app", "web", "--report", str(report), module="_monitor")
        assert written.returncode == 0, written.stdout + written.stderr
        assert "LEAKED []" in written.stdout
        assert report.read_text().count('<rect class="bar ') == 1, "the leader is done, the others have not started"
    finally:
        clear(client, schema, "web")
