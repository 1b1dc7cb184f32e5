"""The node side's processes, read from /proc: fireap-reap workers, and kill -9 of a process tree.

A worker the handler forks keeps the handler's command line; it is told apart by its process
name, and its app by the worker lock file that holds its pid (``_reap``). A worker started
by hand (``--worker APP``) says both on its command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from ansible_collections.fireap.consul.plugins.module_utils._reap import WORKER_PROCESS_NAME
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import load_config

from .apps import HANG_SECONDS


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), None once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _proc_parent(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[1])


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until ``pid`` is stopped (state T) or gone: SIGSTOP takes effect only when the process
    next runs, and until then it can still fork."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("T", "Z", "X"):
            return
        time.sleep(0.001)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _reap_processes(config_path: Path) -> list[tuple[int, list[str]]]:
    """The pids and command lines of the fireap-reap processes (handlers and workers) of the
    node of ``config_path``: their command line names that config."""
    config = str(config_path)
    return [(pid, argv) for pid in _pids() if config in (argv := _proc_cmdline(pid))]


def _is_worker(pid: int, argv: list[str]) -> bool:
    if "--worker" in argv:
        return True
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n") == WORKER_PROCESS_NAME
    except OSError:
        return False


def _lock_pids(config_path: Path) -> dict[int, str]:
    """The pids the node's worker lock files hold, each with its app."""
    state_dir = Path(load_config(str(config_path)).state_dir)
    pids: dict[int, str] = {}
    for lock in state_dir.glob("worker-*.lock"):
        with contextlib.suppress(OSError, ValueError):
            pids[int(lock.read_text())] = lock.name[len("worker-"):-len(".lock")]
    return pids


def worker_pids(config_path: Path, app: str | None = None) -> list[int]:
    """The pids of the fireap-reap workers started for the node of ``config_path`` (of ``app``).
    A forked worker whose pid no lock file holds yet (it has just started, or ends finding
    another worker of its app) counts for every app: no check for absent workers misses it."""
    workers = [(pid, argv) for pid, argv in _reap_processes(config_path) if _is_worker(pid, argv)]
    # A worker's child that has not run its command yet still has the worker's name and
    # command line; workers never fork workers.
    found = {pid for pid, _argv in workers}
    workers = [(pid, argv) for pid, argv in workers if _proc_parent(pid) not in found]
    if app is None:
        return [pid for pid, _argv in workers]
    locked = _lock_pids(config_path) if any("--worker" not in argv for _pid, argv in workers) else {}
    return [pid for pid, argv in workers
            if (argv[argv.index("--worker") + 1:][:1] == [app] if "--worker" in argv
                else locked.get(pid, app) == app)]


def handler_pids(config_path: Path) -> list[int]:
    """The pids of the fireap-reap handlers (not workers) the agent of ``config_path`` runs."""
    return [pid for pid, argv in _reap_processes(config_path) if not _is_worker(pid, argv)]


def kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and every process below it (its commands run in sessions of their own).

    Each process is stopped before its children are looked up, so none can start another
    between the look-up and the kill: a command forked meanwhile would run on, orphaned. The
    tree is stopped one generation at a time, with one look at /proc per generation (a process
    that forks as fast as it can leaves thousands of children before its stop takes effect).
    """
    victims: set[int] = set()
    generation = [pid]
    while generation:
        for current in generation:
            with contextlib.suppress(ProcessLookupError):
                os.kill(current, signal.SIGSTOP)
        for current in generation:
            _wait_stopped(current)
        victims.update(generation)
        generation = [other for other in _pids() if other not in victims and _proc_parent(other) in victims]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return len(victims)


def hung_commands() -> list[int]:
    """Processes of the injected hang still alive."""
    return [pid for pid in _pids() if _proc_cmdline(pid) == ["sleep", str(HANG_SECONDS)]]
