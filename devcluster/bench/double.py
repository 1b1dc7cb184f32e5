"""The dev cluster a benchmark runs against, served in this process or by `python -m devcluster serve`.

Either way every figure comes from real HTTP: each node gets a py-consul client of its own
(``_connection.build_client``, the client the node handler uses) talking to its own agent's
port, and the per-agent request and byte counters are read from ``/_devcluster/stats``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import requests

from ansible_collections.fireap.consul.plugins.module_utils._connection import ConsulOptions, build_client

from .embedded import DevCluster
from .serve_process import ServeError, ServeProcess
from .workdir import CLUSTER_FILE, INVENTORY_FILE, fresh_workdir

#: Where the double is served: in a thread of the benchmark's own process, or in a process
#: of its own so that serving HTTP and the simulated nodes do not share one interpreter lock.
EMBEDDED = "embedded"
SUBPROCESS = "subprocess"
DOUBLE_KINDS = (EMBEDDED, SUBPROCESS)

#: Marks a directory as made by the benchmark, so that a later run may empty it.
MARKER = ".fireap-bench"
STATS_PATH = "/_devcluster/stats"
CONTROL_TIMEOUT = 60.0
#: Seconds a node's client waits for a non-blocking answer (blocking queries add their wait).
CLIENT_TIMEOUT = 60.0


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    http_port: int
    root: Path


def cpu_times() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    # user nice system idle iowait irq softirq steal
    return sum(fields) - fields[3] - fields[4], sum(fields)


def fresh_dir(path: Path) -> Path:
    """Create ``path`` empty; an earlier benchmark's directory is emptied, any other content refused."""
    try:
        return fresh_workdir(path, MARKER, "the benchmark")
    except ValueError as err:
        raise BenchError(str(err)) from None


class BenchCluster:
    """N agents (node 0 leads releases) and one py-consul client per node; close() stops all."""

    def __init__(self, nodes: int, workdir: Path, kind: str = SUBPROCESS) -> None:
        if kind not in DOUBLE_KINDS:
            raise BenchError(f"unknown double kind {kind!r}; use one of {', '.join(DOUBLE_KINDS)}")
        self.kind = kind
        self.workdir = fresh_dir(workdir)
        self._embedded: DevCluster | None = None
        self._process: ServeProcess | None = None
        try:
            if kind == EMBEDDED:
                self._embedded = DevCluster(nodes, None, self.workdir).start()
            else:
                self._process = ServeProcess(nodes, self.workdir, new_session=True)
                self._process.start()
        except (ServeError, OSError, RuntimeError) as err:
            self.close()
            raise BenchError(f"the dev cluster of {nodes} nodes did not start: {err}") from err
        info = json.loads((self.workdir / CLUSTER_FILE).read_text())
        self.nodes = [Node(n["name"], n["address"], n["http_port"], Path(n["root"])) for n in info["nodes"]]
        self.leader = self.nodes[0]
        self._by_name = {node.name: node for node in self.nodes}
        self.inventory = self.workdir / INVENTORY_FILE
        self._control = requests.Session()
        self._clients: dict[str, object] = {}

    def client(self, name: str):
        """The py-consul client of node ``name``, talking to that node's own agent (made once)."""
        client = self._clients.get(name)
        if client is None:
            node = self._by_name[name]
            options = ConsulOptions(host=node.address, port=node.http_port, timeout=CLIENT_TIMEOUT)
            client = self._clients[name] = build_client(options)
        return client

    def _control_url(self) -> str:
        return f"http://{self.leader.address}:{self.leader.http_port}{STATS_PATH}"

    def stats(self) -> dict:
        """``{"agents": {name: {requests, bytes_in, bytes_out}}, "total": ...}`` (not counted itself)."""
        response = self._control.get(self._control_url(), timeout=CONTROL_TIMEOUT)
        response.raise_for_status()
        return response.json()

    def reset_stats(self) -> None:
        self._control.delete(self._control_url(), timeout=CONTROL_TIMEOUT).raise_for_status()

    def close(self) -> None:
        """Close every client and stop the double; idempotent."""
        for client in getattr(self, "_clients", {}).values():
            client.http.close()
        if getattr(self, "_control", None) is not None:
            self._control.close()
        self._clients = {}
        if self._embedded is not None:
            self._embedded.close()
            self._embedded = None
        if self._process is not None:
            self._process.stop()
            self._process = None

    def __enter__(self) -> BenchCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
