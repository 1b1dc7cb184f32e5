"""The chaos suite's view of a node's fireap-reap processes, read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from devcluster.chaos.processes import _pids, _proc_parent, worker_pids

# A worker that forks and runs nothing in the child: what a worker's command is between the
# fork and the exec, its name and command line still the worker's.
_FORKING_WORKER = "import os, time\nos.fork()\ntime.sleep(60)\n"


def test_a_workers_child_that_has_not_run_its_command_is_not_a_worker(tmp_path):
    config = tmp_path / "config.yml"
    worker = subprocess.Popen([sys.executable, "-c", _FORKING_WORKER, "--config", str(config), "--worker", "web"])
    try:
        deadline = time.monotonic() + 30
        while not [pid for pid in _pids() if _proc_parent(pid) == worker.pid] and time.monotonic() < deadline:
            time.sleep(0.01)
        children = [pid for pid in _pids() if _proc_parent(pid) == worker.pid]
        assert children
        assert worker_pids(config, "web") == [worker.pid]
        assert worker_pids(config) == [worker.pid]
        assert worker_pids(config, "db") == []
    finally:
        for pid in [pid for pid in _pids() if _proc_parent(pid) == worker.pid]:
            os.kill(pid, signal.SIGKILL)
        worker.kill()
        worker.wait()
