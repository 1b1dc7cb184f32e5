"""Run the double inside a test or benchmark process, its loop in a background thread.

with DevCluster(20, tmp_path) as cluster:
    consul.Consul(port=cluster.nodes[3].port).kv.put("k", "v")
    cluster.stop_agent("node-003")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .cluster import Cluster
from .double import EMBEDDED, Double
from .ports import find_free_port_range
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

    `http_port=None` picks a free range (find_free_port_range).
    """

    kind = EMBEDDED

    def __init__(
        self,
        nodes: int,
        workdir: str | Path,
        *,
        http_port: int | None = None,
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
        return list(self._cluster.nodes)

    @property
    def workdir(self) -> Path:
        return self._cluster.workdir

    @property
    def datacenter(self) -> str:
        return self._cluster.datacenter

    def stop_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._await(lambda: self._cluster.stop_agent(name))

    def start_agent(self, node: str | int) -> None:
        name = self.node(node).name
        self._await(lambda: self._cluster.start_agent(name))

    def is_running(self, node: str | int) -> bool:
        name = self.node(node).name
        return self._call(lambda: self._cluster.agent_by_name[name].running)

    def stats(self) -> dict[str, Any]:
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
