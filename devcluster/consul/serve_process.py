"""`python -m devcluster serve` as a child process: started, waited for, stopped or killed.

The demo, the benchmark, the chaos suite and the tests' Consul harness run the double this way:
in a process of its own it does not share this interpreter's lock, and it can be killed as a
crash would kill it. ``start()`` returns once ``cluster.json`` is written (every agent listens);
the double's output goes to ``<workdir>/devcluster.log``, whose tail a failed start shows.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from .embedded import find_free_port_range
from .workdir import CLUSTER_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_FILE = "devcluster.log"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 40


class ServeError(RuntimeError):
    """The double did not start; the message ends with the tail of its log."""


def stop_process(proc: subprocess.Popen, sig: int, timeout: float = STOP_TIMEOUT) -> None:
    """Send ``sig`` to a child still running and wait for it; SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(eq=False)
class ServeProcess:
    """One double, started again on the same ports by a later ``start()`` (with ``data_dir``, in
    the state it had). ``http_port=None`` takes a free port range at the first start.
    ``new_session`` keeps the terminal's Ctrl-C from it, so that its owner stops it last."""

    nodes: int
    workdir: Path
    _keyword_only: KW_ONLY
    http_port: int | None = None
    acl_token: str | None = field(default=None, repr=False)
    data_dir: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    new_session: bool = False
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "devcluster", "serve", "--nodes", str(self.nodes),
                   "--http-port", str(self.http_port), "--workdir", str(self.workdir)]
        for option, value in (("--acl-token", self.acl_token), ("--data-dir", self.data_dir),
                              ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if value is not None:
                command += [option, str(value)]
        return command

    def start(self, timeout: float = START_TIMEOUT) -> dict:
        """Start the double; its parsed cluster.json once every agent listens.

        Raises ServeError when it exits first or has not written the file within ``timeout``
        seconds (then it is killed).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise ServeError(f"the dev cluster in {self.workdir} is already running")
        if self.http_port is None:
            try:
                self.http_port = find_free_port_range(self.nodes)
            except RuntimeError as err:
                raise ServeError(str(err)) from None
        self.workdir.mkdir(parents=True, exist_ok=True)
        cluster_file = self.workdir / CLUSTER_FILE
        # A file left by an earlier run would pass for this one's.
        cluster_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=self.new_session)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return json.loads(cluster_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if self.proc.poll() is not None:
                raise ServeError(f"the dev cluster exited with status {self.proc.returncode} before writing "
                                 f"{cluster_file}; the end of {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ServeError(f"the dev cluster did not write {cluster_file} within {timeout:.0f}s and was "
                                 f"killed; the end of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (the double shuts down cleanly), SIGKILL if it has not exited within STOP_TIMEOUT."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL at once, as a crash: no shutdown, running watch handlers are left behind."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the double's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"
