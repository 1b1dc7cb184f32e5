"""The chaos suite's kill -9 of a worker: every process below it dies, those in sessions of
their own and those the worker starts while its tree is being killed included."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

from devcluster.chaos.processes import _pids, _proc_parent, kill_tree

# A worker that keeps starting commands in sessions of their own, as fast as it can.
_WORKER = "while true; do setsid sleep 60 & done"


def _tagged(tag: bytes) -> list[int]:
    """Live processes whose environment carries ``tag`` (zombies have none left)."""
    found = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if tag in environ.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_kill_tree_leaves_no_process_of_the_tree_running():
    tag = f"FIREAP_KILL_TREE_TEST={uuid.uuid4().hex}"
    worker = subprocess.Popen(["sh", "-c", _WORKER], env=dict(os.environ, FIREAP_KILL_TREE_TEST=tag.split("=")[1]))
    try:
        deadline = time.monotonic() + 10
        while sum(_proc_parent(pid) == worker.pid for pid in _pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert kill_tree(worker.pid) >= 4
        worker.wait(10)
        time.sleep(0.2)
        assert _tagged(tag.encode()) == []
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for pid in _tagged(tag.encode()):
            os.kill(pid, 9)
