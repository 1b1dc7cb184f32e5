"""Run the double inside a test or benchmark process, its loop in a background thread.

with DevCluster(20, None, tmp_path) as cluster:
    consul.Consul(port=cluster.nodes[3].http_port).kv.put("k", "v")
    cluster.stop_agent("node-003")
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .cluster import Cluster
from .workdir import NodeInfo

T = TypeVar("T")
CALL_TIMEOUT_SECONDS = 60.0
_PORT_FLOOR = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def find_free_port_range(count: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """First port of `count` consecutive free ports, below the ephemeral range.

    Ports that outgoing connections may take (the kernel's ephemeral range) are
    avoided so that a client socket cannot grab an agent's port later.
    """
    low, _high = _ephemeral_range()
    ceiling = low if low - _PORT_FLOOR > count else 65536
    for _attempt in range(attempts):
        base = random.randrange(_PORT_FLOOR, ceiling - count)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found on {host} after {attempts} attempts")


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run does before closing its loop: cancel and reap leftover tasks."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


class DevCluster:
    """A Cluster served from a background thread; every method is safe to call from any thread.

    `http_port=None` picks a free range (find_free_port_range).
    """

    def __init__(
        self,
        nodes: int,
        http_port: int | None,
        workdir: str | Path,
        acl_token: str | None = None,
        data_dir: str | Path | None = None,
        datacenter: str = "dc1",
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        self._cluster = Cluster(
            nodes=nodes,
            http_port=http_port if http_port is not None else find_free_port_range(nodes),
            workdir=Path(workdir),
            acl_token=acl_token,
            data_dir=Path(data_dir) if data_dir is not None else None,
            datacenter=datacenter,
            tls_cert=Path(tls_cert) if tls_cert is not None else None,
            tls_key=Path(tls_key) if tls_key is not None else None,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing: asyncio.Event | None = None

    # --------------------------------------------------------------- lifecycle

    def start(self) -> DevCluster:
        if self._thread is not None:
            raise RuntimeError("DevCluster already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="devcluster", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                self._closing = asyncio.Event()
                loop.run_until_complete(self._cluster.start())
            except BaseException as err:  # handed to the starting thread
                failure.append(err)
                return
            finally:
                self._loop = loop if not failure else None
                ready.set()
            loop.run_until_complete(self._closing.wait())
            loop.run_until_complete(self._cluster.close())
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def close(self) -> None:
        """Stop all agents and the servers; idempotent."""
        if self._thread is None or self._loop is None or self._closing is None:
            return
        self._loop.call_soon_threadsafe(self._closing.set)
        self._thread.join()
        self._thread = None
        self._loop = None

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ nodes

    @property
    def nodes(self) -> list[NodeInfo]:
        return list(self._cluster.nodes)

    @property
    def leader(self) -> NodeInfo:
        """Node 0, where the Raft server runs."""
        return self._cluster.nodes[0]

    @property
    def workdir(self) -> Path:
        return self._cluster.workdir

    @property
    def datacenter(self) -> str:
        return self._cluster.datacenter

    def node(self, node: str | int) -> NodeInfo:
        """A node by name ("node-007") or index (7)."""
        if isinstance(node, int):
            return self._cluster.nodes[node]
        for info in self._cluster.nodes:
            if info.name == node:
                return info
        raise KeyError(f"unknown node {node!r}")

    def stop_agent(self, node: str | int) -> None:
        """Crash-stop a node's agent: its port refuses, its sessions die, it misses events."""
        name = self.node(node).name
        self._await(lambda: self._cluster.stop_agent(name))

    def start_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._await(lambda: self._cluster.start_agent(name))

    def is_running(self, node: str | int) -> bool:
        name = self.node(node).name
        return self._call(lambda: self._cluster.agent_by_name[name].running)

    def stats(self) -> dict[str, Any]:
        """Per-agent HTTP counters: {"agents": {name: {requests, bytes_in, bytes_out}}, "total": {...}}."""
        return self._call(self._cluster.stats)

    def reset_stats(self) -> None:
        self._call(self._cluster.reset_stats)

    # ---------------------------------------------------------------- helpers

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("DevCluster is not running")
        return self._loop

    def _await(self, make: Callable[[], Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(make(), self._running_loop())
        return future.result(CALL_TIMEOUT_SECONDS)

    def _call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self._await(run)
