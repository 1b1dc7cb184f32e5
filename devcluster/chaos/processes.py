"""The node side's processes, read from /proc: fireap-reap workers, and kill -9 of a process tree."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

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


def worker_pids(config_path: Path, app: str | None = None) -> list[int]:
    """The pids of the fireap-reap workers started for the node of ``config_path`` (of ``app``)."""
    return [pid for pid, argv in _reap_processes(config_path) if "--worker" in argv
            and (app is None or argv[argv.index("--worker") + 1:][:1] == [app])]


def handler_pids(config_path: Path) -> list[int]:
    """The pids of the fireap-reap handlers (not workers) the agent of ``config_path`` runs."""
    return [pid for pid, argv in _reap_processes(config_path) if "--worker" not in argv]


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
