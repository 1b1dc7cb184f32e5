"""Run the double inside a test or benchmark process, its loop in a background thread.

with DevCluster(20, tmp_path) as cluster:
    consul.Consul(port=cluster.nodes[3].port).kv.put("k", "v")
    cluster.stop_agent("node-003")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .cluster import Cluster
from .double import EMBEDDED, Double
from .realism import Gossip
from .workdir import NodeInfo

T = TypeVar("T")
CALL_TIMEOUT_SECONDS = 60.0


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run does before closing its loop: cancel and reap leftover tasks."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


class DevCluster(Double):
    """A Cluster served from a background thread; every method is safe to call from any thread.

    Each start serves a Cluster of its own (with ``data_dir``, in the state the last one left).
    """

    kind = EMBEDDED
    _cluster: Cluster | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _closing: asyncio.Event | None = None

    # --------------------------------------------------------------- lifecycle

    def start(self) -> DevCluster:
        if self._thread is not None:
            raise RuntimeError("DevCluster already started")
        cluster = Cluster(self.node_count, self._port_range(), self.workdir, self.acl_token, self.data_dir,
                          self.datacenter, tls_cert=self.tls_cert, tls_key=self.tls_key, realism=self.realism,
                          tls_client_ca=self.tls_client_ca)
        self._cluster = cluster
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(cluster, ready, failure), name="devcluster",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def _run(self, cluster: Cluster, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                self._closing = asyncio.Event()
                loop.run_until_complete(cluster.start())
            except BaseException as err:  # handed to the starting thread
                failure.append(err)
                return
            finally:
                self._loop = loop if not failure else None
                ready.set()
            loop.run_until_complete(self._closing.wait())
            loop.run_until_complete(cluster.close())
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop all agents and the servers; idempotent."""
        if self._thread is None or self._loop is None or self._closing is None:
            return
        self._loop.call_soon_threadsafe(self._closing.set)
        self._thread.join()
        self._thread = None
        self._loop = None

    # ------------------------------------------------------------------ nodes

    @property
    def nodes(self) -> list[NodeInfo]:
        return list(self._cluster.nodes) if self._cluster is not None else []

    def stop_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._await(lambda cluster: cluster.stop_agent(name))

    def leave_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._await(lambda cluster: cluster.leave_agent(name))

    def set_gossip(self, node: str | int, gossip: Gossip) -> None:
        name = self.node(node).name
        self._call(lambda cluster: cluster.agent_by_name[name].set_gossip(gossip))

    def set_address(self, node: str | int, address: str) -> None:
        name = self.node(node).name
        self._call(lambda cluster: cluster.set_address(name, address))

    def start_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._await(lambda cluster: cluster.start_agent(name))

    def is_running(self, node: str | int) -> bool:
        name = self.node(node).name
        return self._call(lambda cluster: cluster.agent_by_name[name].running)

    def stats(self) -> dict[str, Any]:
        return self._call(Cluster.stats)

    def reset_stats(self) -> None:
        self._call(Cluster.reset_stats)

    # ---------------------------------------------------------------- helpers

    def _await(self, make: Callable[[Cluster], Coroutine[Any, Any, T]]) -> T:
        """Run ``make(cluster)`` on the running cluster's loop and wait for its result."""
        if self._loop is None or self._cluster is None:
            raise RuntimeError("DevCluster is not running")
        future = asyncio.run_coroutine_threadsafe(make(self._cluster), self._loop)
        return future.result(CALL_TIMEOUT_SECONDS)

    def _call(self, fn: Callable[[Cluster], T]) -> T:
        async def run(cluster: Cluster) -> T:
            return fn(cluster)

        return self._await(run)
