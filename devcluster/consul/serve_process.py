"""`python -m devcluster serve` as a child process: started, waited for, stopped or killed.

The demo, the benchmark, the chaos suite and the tests' Consul harness run the double this way:
in a process of its own it does not share this interpreter's lock, and it can be killed as a
crash would kill it. ``start()`` returns once ``cluster.json`` is written (every agent listens);
the double's output goes to ``<workdir>/devcluster.log``, whose tail a failed start shows.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import REPO_ROOT
from .control import PREFIX as CONTROL_PREFIX
from .double import SUBPROCESS, Double
from .realism import Gossip
from .workdir import CLUSTER_FILE, NodeInfo, read_nodes

LOG_FILE = "devcluster.log"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 40
#: Seconds a request to the double's /_devcluster/ endpoints may take.
CONTROL_TIMEOUT = 60.0


class ServeError(RuntimeError):
    """The double did not start (the message ends with the tail of its log), or a /_devcluster/
    call to it failed."""


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


class ServeProcess(Double):
    """One double, started again on the same ports by a later ``start()`` (with ``data_dir``, in
    the state it had); ``options`` are Double's. ``new_session`` keeps the terminal's Ctrl-C
    from it, so that its owner stops it last.

    The /_devcluster/ calls (stop_agent, start_agent, set_address, is_running, stats,
    reset_stats) go over HTTP(S) to the leader's agent, or to the next running one when the leader's is stopped or
    is the one the call is about."""

    kind = SUBPROCESS

    def __init__(self, nodes: int, workdir: str | Path, *, new_session: bool = False, **options: Any) -> None:
        super().__init__(nodes, workdir, **options)
        self.new_session = new_session
        self.proc: subprocess.Popen | None = None
        self.nodes: list[NodeInfo] = []

    def __repr__(self) -> str:
        return f"ServeProcess({self.node_count}, {str(self.workdir)!r}, http_port={self.http_port})"

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "devcluster", "serve", "--nodes", str(self.node_count),
                   "--http-port", str(self.http_port), "--workdir", str(self.workdir)]
        for option, value in (("--acl-token", self.acl_token), ("--data-dir", self.data_dir),
                              ("--datacenter", self.datacenter), ("--tls-cert", self.tls_cert),
                              ("--tls-key", self.tls_key), ("--tls-client-ca", self.tls_client_ca)):
            if value is not None:
                command += [option, str(value)]
        return command + self.realism.to_args()

    def start(self, timeout: float = START_TIMEOUT) -> ServeProcess:
        """Start the double; it returns once every agent listens (cluster.json is written).

        Raises ServeError when it exits first or has not written the file within ``timeout``
        seconds (then it is killed).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise ServeError(f"the dev cluster in {self.workdir} is already running")
        try:
            self._port_range()
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
                self.nodes = read_nodes(self.workdir, self.scheme)
                return self
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

    # ------------------------------------------------------- /_devcluster/ calls

    def stop_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._control("PUT", f"agents/{name}/stop", avoid=name)

    def leave_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._control("PUT", f"agents/{name}/leave", avoid=name)

    def set_gossip(self, node: str | int, gossip: Gossip) -> None:
        name = self.node(node).name
        self._control("PUT", f"agents/{name}/gossip", body=asdict(gossip))

    def set_address(self, node: str | int, address: str) -> None:
        name = self.node(node).name
        self._control("PUT", f"agents/{name}/address", body={"address": address})

    def start_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._control("PUT", f"agents/{name}/start", avoid=name)

    def is_running(self, node: str | int) -> bool:
        name = self.node(node).name
        agents = self._control("GET", "agents")
        return any(agent["name"] == name and agent["running"] for agent in agents)

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "stats")

    def reset_stats(self) -> None:
        self._control("DELETE", "stats")

    def _control(self, method: str, path: str, avoid: str | None = None, body: Any = None) -> Any:
        """Send a /_devcluster/ call (``body`` as JSON) to the first agent that takes it, the leader's
        first; never to the agent named ``avoid`` (the one the call is about: a stopped agent's port
        is closed)."""
        refused = []
        for via in self.nodes:
            if via.name == avoid:
                continue
            try:
                return self._control_via(method, path, via, body)
            except ConnectionRefusedError:
                refused.append(via.name)
        raise ServeError(f"{method} {CONTROL_PREFIX}{path}: no agent to send it to (refused by {refused or 'none'})")

    def _control_via(self, method: str, path: str, via: NodeInfo, body: Any = None) -> Any:
        url = f"{via.base_url}{CONTROL_PREFIX}{path}"
        headers = {"X-Consul-Token": self.acl_token} if self.acl_token else {}
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if via.scheme == "https" and self.tls_cert is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(self.tls_cert))))
        try:
            with urllib.request.build_opener(*handlers).open(request, timeout=CONTROL_TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace").strip()
            raise ServeError(f"{method} {CONTROL_PREFIX}{path} on {via.name}: {err.code} {body}") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, ConnectionRefusedError):
                raise err.reason from None
            raise ServeError(f"{method} {CONTROL_PREFIX}{path} on {via.name}: {err.reason}") from None
        except OSError as err:
            raise ServeError(f"{method} {CONTROL_PREFIX}{path} on {via.name}: {err}") from None
