"""Push baselines: the same task run from the controller by Ansible (forks=k) or GNU parallel (-j k).

Both push to every node but the leader, the nodes a fireap release runs the task on, k at a
time, over the dev cluster's inventory (``ansible_connection: local``). The time is the wall
clock of the whole command, start-up included, as an operator would see it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from .. import REPO_ROOT
from ..demo.playbooks import ansible_env, ansible_tool
from .double import BenchError

PLAYBOOK_FILE = "baseline.yml"
#: The leader's inventory group: a push leaves it out, as a release does.
PUSH_HOSTS = "fireap_nodes:!fireap_leader"


def sleep_command(task_seconds: float) -> str:
    """The inproc task as a shell command."""
    return f"sleep {task_seconds:g}"


def ansible_playbook(command: str) -> str:
    """A playbook running ``command`` (no shell) once on every pushed-to host.

    ``{{ inventory_hostname }}`` in ``command`` is the host.
    """
    play = {
        "name": "Push baseline",
        "hosts": PUSH_HOSTS,
        "gather_facts": False,
        "tasks": [{"name": "Run the task", "ansible.builtin.command": command}],
    }
    return yaml.safe_dump([play], sort_keys=False, width=4096)


def run_ansible(inventory: Path, workdir: Path, forks: int, command: str, prefix: Sequence[str] = ()) -> float:
    """Seconds ansible-playbook takes to run ``command`` on every node but the leader with ``forks``.

    ``prefix`` runs ansible-playbook under another command (the netns mode: inside the leader's namespace).
    """
    playbook = workdir / PLAYBOOK_FILE
    playbook.write_text(ansible_playbook(command))
    args = [*prefix, ansible_tool("ansible-playbook"), "-i", str(inventory), "-f", str(forks), str(playbook)]
    began = time.monotonic()
    done = subprocess.run(
        args, cwd=REPO_ROOT, env=ansible_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    seconds = time.monotonic() - began
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise BenchError(f"the ansible baseline failed (exit status {done.returncode}): {shlex.join(args)}\n{tail}")
    return seconds


def parallel_tool() -> str:
    path = shutil.which("parallel")
    if path is None:
        raise BenchError("GNU parallel is not installed: run `make setup` (or apt-get install parallel)")
    return path


def run_parallel(hosts: list[str], jobs: int, command: str, prefix: Sequence[str] = ()) -> float:
    """Seconds GNU parallel -j ``jobs`` takes to run ``command`` once per host.

    ``{}`` in ``command`` is the host; a command without it gets no argument (``-N0``).
    ``prefix`` runs parallel under another command (the netns mode: inside the leader's namespace).
    """
    if not hosts:
        raise BenchError("the parallel baseline needs at least one host besides the leader")
    per_host = [] if "{}" in command else ["-N0"]
    args = [*prefix, parallel_tool(), "--will-cite", "--halt", "now,fail=1", "-j", str(jobs), *per_host, command, ":::", *hosts]
    began = time.monotonic()
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise BenchError(f"the parallel baseline failed (exit status {done.returncode}): {command}\n{tail}")
    return seconds
