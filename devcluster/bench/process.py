"""The process benchmark: the real node side, real rsync, against a GNU parallel push.

Every node gets the fireap_node role with ansible-playbook (playbooks/setup.yml, as the demo
installs it); a release is fired with the real ``_firing.fire`` against the leader's agent
and every node's own fireap-reap, started by its agent's watch, pulls the leader's tree:
TREE_FILES files, TREE_BYTES bytes in all, copied by rsync with ``--bwlimit`` set so that
one transfer takes about ``task_seconds``, as it would over a link of that rate. Measured:
from the start of the fire to the last node's finish (its record's ``finished``). Then GNU
parallel -j k pushes the same tree from the leader to every other node with the same
bandwidth limit. Every node's tree is compared with the leader's, file by file.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._firing import fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import NODE_DONE, KVRecordError, NodeState, Schema
from ansible_collections.fireap.consul.plugins.module_utils._progress import ReleaseWaitTimeout, wait
from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release

from ..consul import Double
from ..demo import builds
from ..demo.playbooks import SETUP_PLAYBOOK, DemoError, run_playbook, vars_file_text
from .baselines import run_ansible, run_parallel
from .core import ANSIBLE, PARALLEL, PROCESS, RunResult, TaskTiming, busy_fraction
from .double import BenchError, cpu_times, node_roots

APP = "bench"
APP_DIR = builds.APP_DIR
PUSH_DIR = "push"
TASK_STARTED = "task-started"
VARS_FILE = "bench-vars.yml"
#: The output of the role's install playbook, in the cluster's work directory.
INSTALL_LOG = "install.log"
TREE_FILES = 1000
TREE_DIRS = 20
TREE_BYTES = 12_000_000
#: Seconds the agents' handlers get after the role's reload before the benchmark starts.
INSTALL_SETTLE_SECONDS = 5.0
WAIT_POLL_SECONDS = 1.0


def write_tree(app_dir: Path, version: str, files: int = TREE_FILES, total_bytes: int = TREE_BYTES) -> int:
    """Replace ``app_dir`` with ``files`` files (VERSION included) of ``total_bytes`` random bytes in all."""
    if files < 2:
        raise ValueError(f"a tree needs at least 2 files (data and VERSION), got {files}")
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    version_bytes = (version + "\n").encode()
    (app_dir / "VERSION").write_bytes(version_bytes)
    data_files = files - 1
    left = total_bytes - len(version_bytes)
    for i in range(data_files):
        size = left // (data_files - i)
        directory = app_dir / f"lib{i % TREE_DIRS:02d}"
        directory.mkdir(exist_ok=True)
        (directory / f"part{i:04d}.bin").write_bytes(os.urandom(size))
        left -= size
    return total_bytes


def bwlimit_kib(total_bytes: int, task_seconds: float) -> int:
    """rsync's --bwlimit (KiB/s) at which ``total_bytes`` take ``task_seconds``."""
    if task_seconds <= 0:
        raise ValueError(f"task_seconds must be > 0, got {task_seconds!r}")
    return max(1, math.ceil(total_bytes / 1024 / task_seconds))


def rsync_command(nodes_dir: Path, kib: int) -> str:
    """The demo's pull command (source node's app tree over this node's) at ``kib`` KiB/s."""
    command = builds.rsync_command(nodes_dir)
    limited = command.replace("rsync ", f"rsync --bwlimit={kib} ", 1)
    if limited == command:
        raise BenchError(f"the demo's pull command does not start with rsync: {command}")
    return limited


def started_command(nodes_dir: Path) -> str:
    """Records, in the node's directory, when its task started (epoch seconds)."""
    return f"date +%s.%N > {shlex.quote(f'{nodes_dir}/')}{{{{ node }}}}/{TASK_STARTED}"


def push_command(source: Path, nodes_dir: Path, kib: int, host: str) -> str:
    """An rsync of ``source`` into ``<nodes_dir>/<host>/push/`` (``host``: the tool's placeholder)."""
    return f"rsync -a --delete --bwlimit={kib} {shlex.quote(f'{source}/')} {shlex.quote(f'{nodes_dir}/')}{host}/{PUSH_DIR}/"


class ProcessBench:
    """The cluster with fireap installed on every node; run() releases one new tree."""

    def __init__(self, double: Double, leader, fanout: int, task_seconds: float) -> None:
        """``leader``: the leader's client (double.py's ``leader_client``), which fires and follows each release."""
        self.double = double
        self.client = leader
        self.fanout = fanout
        self.task_seconds = task_seconds
        self.leader = double.leader.name
        self.nodes_dir, self.roots = node_roots(double)
        self.kib = bwlimit_kib(TREE_BYTES, task_seconds)

    def install(self) -> None:
        """The fireap_node role on every node, its app pulling with rsync at the bandwidth limit."""
        for root in self.roots.values():
            (root / APP_DIR).mkdir(parents=True, exist_ok=True)
        app = {
            "before_commands": [started_command(self.nodes_dir)],
            "exec_commands": [rsync_command(self.nodes_dir, self.kib)],
        }
        vars_path = self.double.workdir / VARS_FILE
        vars_path.write_text(vars_file_text({APP: app}))
        log_path = self.double.workdir / INSTALL_LOG
        try:
            status, _seconds = run_playbook(
                ["-i", str(self.double.inventory), "-e", f"@{vars_path}", str(SETUP_PLAYBOOK)], log_path
            )
        except DemoError as err:
            raise BenchError(str(err)) from err
        if status != 0:
            raise BenchError(f"installing fireap failed: ansible-playbook exited with status {status}; see {log_path}")
        time.sleep(INSTALL_SETTLE_SECONDS)

    def transfer_seconds(self) -> float:
        """One rsync of the leader's tree into an empty directory at the bandwidth limit."""
        scratch = self.double.workdir / "transfer-probe"
        shutil.rmtree(scratch, ignore_errors=True)
        began = time.monotonic()
        subprocess.run(
            ["rsync", "-a", f"--bwlimit={self.kib}", f"{self.roots[self.leader] / APP_DIR}/", f"{scratch}/"], check=True
        )
        seconds = time.monotonic() - began
        shutil.rmtree(scratch)
        return seconds

    def run(self, version: str, timeout: float, baselines: tuple[str, ...]) -> tuple[RunResult, dict[str, float]]:
        """Release a new tree at ``version``, then push it with each baseline; every tree checked."""
        write_tree(self.roots[self.leader] / APP_DIR, version)
        for root in self.roots.values():
            (root / TASK_STARTED).unlink(missing_ok=True)
        transfer = self.transfer_seconds()
        client = self.client
        schema = Schema()
        self.double.reset_stats()
        cpu_before = cpu_times()
        fired = time.time()
        outcome = fire(client, schema, APP, version=version, fanout=self.fanout)
        leader_ready = time.time()
        try:
            wait(client, schema, APP, outcome["run_id"], timeout, poll=WAIT_POLL_SECONDS)
        except ReleaseWaitTimeout:
            clear(client, schema, APP, abort=True, reason=f"the benchmark gave up after {timeout:g}s")
        cpu_after = cpu_times()
        stats = self.double.stats()
        states = self._states(client, schema)

        failures = {}
        tasks = {}
        for name in self.roots:
            if name == self.leader:
                continue
            state = states.get(name)
            if state is None or state.version != version or state.status != NODE_DONE:
                shown = "no record" if state is None else f"{state.status} at {state.version}: {state.error or ''}"
                failures[name] = f"not done at {version}: {shown}".rstrip(": ")
                continue
            started = self._task_started(name)
            if started is not None:
                tasks[name] = TaskTiming(state.source, started, state.finished)
        failures.update(self._check_trees(APP_DIR, "fireap"))
        finished = [state.finished for name, state in states.items() if name != self.leader and state.finished]

        measured: dict[str, float] = {}
        hosts = [name for name in self.roots if name != self.leader]
        source = self.roots[self.leader] / APP_DIR
        for baseline in baselines:
            self._clear_push_dirs()
            if baseline == PARALLEL:
                measured[PARALLEL] = run_parallel(
                    hosts, self.fanout, push_command(source, self.nodes_dir, self.kib, "{}")
                )
            elif baseline == ANSIBLE:
                command = push_command(source, self.nodes_dir, self.kib, "{{ inventory_hostname }}")
                measured[ANSIBLE] = run_ansible(self.double.inventory, self.double.workdir, self.fanout, command)
            for name, reason in self._check_trees(PUSH_DIR, baseline).items():
                failures[f"{name} ({baseline})"] = reason
        self._clear_push_dirs()

        result = RunResult(
            mode=PROCESS,
            nodes=len(self.roots),
            fanout=self.fanout,
            task_seconds=transfer,
            leader=self.leader,
            fired=fired,
            leader_ready=leader_ready,
            completed=max(finished, default=leader_ready),
            depths={name: state.depth for name, state in states.items() if state.depth is not None},
            tasks=tasks,
            plan=plan_release(outcome["targets"], outcome["leader"], self.fanout, outcome["run_id"]),
            stats=stats,
            failures=failures,
            details={
                "double": self.double.kind,
                "cpu_busy": busy_fraction(cpu_before, cpu_after),
                "tree_files": TREE_FILES,
                "tree_bytes": TREE_BYTES,
                "bwlimit_kib": self.kib,
            },
        )
        return result, measured

    def _states(self, client, schema: Schema) -> dict[str, NodeState]:
        _index, entries = client.kv.get(schema.nodes_prefix(APP), recurse=True)
        states = {}
        for entry in entries or ():
            try:
                states[schema.node_name(APP, entry["Key"])] = NodeState.from_json(entry["Value"], entry["Key"])
            except (KVRecordError, ValueError) as err:
                raise BenchError(f"unreadable node record: {err}") from err
        return states

    def _task_started(self, name: str) -> float | None:
        try:
            return float((self.roots[name] / TASK_STARTED).read_text())
        except (OSError, ValueError):
            return None

    def _check_trees(self, directory: str, what: str) -> dict[str, str]:
        expected = builds.tree_manifest(self.roots[self.leader] / APP_DIR)
        problems = {}
        for name, root in self.roots.items():
            if name == self.leader:
                continue
            difference = builds.tree_difference(expected, builds.tree_manifest(root / directory))
            if difference:
                problems[name] = f"the {what} tree differs from the leader's: {difference}"
        return problems

    def _clear_push_dirs(self) -> None:
        for root in self.roots.values():
            shutil.rmtree(root / PUSH_DIR, ignore_errors=True)
