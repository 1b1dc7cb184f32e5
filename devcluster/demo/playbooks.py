"""Running the project's playbooks from the checkout, as the demo and the benchmark's process mode do.

ansible-playbook and ansible come from this interpreter's venv and read the project's
ansible.cfg; the fireap_node role's apps go in as an extra-vars file.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .. import REPO_ROOT
from ..consul.serve_process import stop_process

ANSIBLE_CONFIG = REPO_ROOT / "ansible.cfg"
SETUP_PLAYBOOK = REPO_ROOT / "playbooks" / "setup.yml"
RELEASE_PLAYBOOK = REPO_ROOT / "playbooks" / "release.yml"


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


class Unsafe(str):
    """A string Ansible must not template (YAML ``!unsafe``): its ``{{ }}`` are the node's."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Unsafe, lambda dumper, value: dumper.represent_scalar("!unsafe", str(value)))


def dump_yaml(document) -> str:
    """``document`` as YAML for Ansible (an inventory, an extra-vars file), Unsafe strings tagged."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=4096)


def vars_file_text(apps: dict[str, dict]) -> str:
    """An extra-vars YAML file with ``apps`` as fireap_node_apps (the inventory has the rest).

    Commands are tagged ``!unsafe`` so that Ansible leaves their ``{{ }}`` placeholders to
    the node.
    """
    phases = ("before_commands", "exec_commands", "after_commands")
    tagged = {
        name: {key: [Unsafe(c) for c in value] if key in phases else value for key, value in settings.items()}
        for name, settings in apps.items()
    }
    return dump_yaml({"fireap_node_apps": tagged})


def with_host_vars(inventory: Path, host_vars: dict[str, dict], path: Path) -> Path:
    """``inventory`` with ``host_vars[host]`` added to each of its fireap_nodes hosts, written
    to ``path``: per-node settings (an artifact directory of each node's own) that an
    extra-vars file, the same for every host, cannot give."""
    document = yaml.safe_load(inventory.read_text())
    hosts = document["all"]["children"]["fireap_nodes"]["hosts"]
    for name, variables in host_vars.items():
        hosts[name] = {**(hosts[name] or {}), **variables}
    path.write_text(dump_yaml(document))
    return path


def ansible_env() -> dict[str, str]:
    """The environment the playbooks run in: the project's ansible.cfg, the venv first on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    return dict(
        os.environ,
        ANSIBLE_CONFIG=str(ANSIBLE_CONFIG),
        PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
    )


def ansible_tool(name: str) -> str:
    """An Ansible command of the interpreter's venv (ansible-playbook, ansible)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DemoError(f"{path} does not exist: run `make setup` first")
    return str(path)


def announce(what: str, args: list[str]) -> None:
    """Say which playbook runs now, before it or anything it starts writes to the terminal."""
    print(f"\n=== {what}: ansible-playbook {shlex.join(args)}", flush=True)


def run_playbook(args: list[str], log_path: Path | None = None) -> tuple[int, float]:
    """Run ansible-playbook from the project root; (exit status, seconds).

    Its output is shown live, or goes to ``log_path``. On Ctrl-C ansible-playbook gets SIGINT
    too and time to stop its workers, which run in sessions of their own and would be left
    behind if it were killed at once.
    """
    began = time.monotonic()
    with open(log_path, "wb") if log_path else contextlib.nullcontext() as log:
        proc = subprocess.Popen(
            [ansible_tool("ansible-playbook"), *args],
            cwd=REPO_ROOT,
            env=ansible_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
        )
        try:
            status = proc.wait()
        except KeyboardInterrupt:
            stop_process(proc, signal.SIGINT)
            raise
    return status, time.monotonic() - began
