"""The node side's processes, read from /proc: fireap-reap workers, and kill -9 of a process tree."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from .apps import HANG_SECONDS


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _proc_parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def worker_pids(config_path: Path, app: str | None = None) -> list[int]:
    """The pids of the fireap-reap workers started for the node of ``config_path`` (of ``app``)."""
    config = str(config_path)
    found = []
    for pid in _pids():
        argv = _proc_cmdline(pid)
        if "--worker" not in argv or config not in argv:
            continue
        if app is None or argv[argv.index("--worker") + 1:][:1] == [app]:
            found.append(pid)
    return found


def kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and every process below it (its commands run in sessions of their own).

    Each process is stopped before its children are looked up, so none can start another
    between the look-up and the kill: a command forked meanwhile would run on, orphaned.
    """
    victims, pending = [], [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(current, signal.SIGSTOP)
        victims.append(current)
        pending.extend(other for other in _pids() if _proc_parent(other) == current)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return len(victims)


def hung_commands() -> list[int]:
    """Processes of the injected hang still alive."""
    return [pid for pid in _pids() if _proc_cmdline(pid) == ["sleep", str(HANG_SECONDS)]]
