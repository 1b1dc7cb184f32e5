"""The whole Consul double in one event loop: servers' state, N agents, N ports.

Node 0 is where the (single) Raft server runs; its agent is also an agent like
the others.  Stopping an agent (a crash) closes its port and loses its event ring;
its serfHealth turns critical (invalidating sessions bound to it) once failure
detection has run (``Realism.failure_detection``: memberlist's time for the cluster's size).  An agent
that leaves is deregistered at once, its sessions invalidated.  Starting it again
re-reads its config dir and fires its watches as an agent start does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from .agents import MEMBER_FAILED, MEMBER_LEFT, Agent, EventFilters, UserEvent
from .control import Control
from .httpapi import HttpApi
from .persistence import Journal
from .realism import Realism
from .state import CONSUL_VERSION, ConsulState, Service
from .ttl import SessionTimers
from .workdir import NodeInfo, plan_nodes, prepare_dirs, write_cluster_files

REAP_INTERVAL_SECONDS = 30.0
HANDLER_GRACE_SECONDS = 2.0
LISTEN_BACKLOG = 1024
_DATACENTER = re.compile(r"^[A-Za-z0-9_-]+$")

log = logging.getLogger(__name__)


class ClusterError(ValueError):
    """Invalid cluster parameters."""


def _tls_context(cert: Path | None, key: Path | None, client_ca: Path | None = None) -> ssl.SSLContext | None:
    """The server side of HTTPS on every agent port (as Consul's ports.https with tls.https), or None.

    With ``client_ca`` every client must present a certificate that CA signed, as with Consul's
    tls.https.verify_incoming.
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise ClusterError("--tls-client-ca needs --tls-cert and --tls-key: client certificates need HTTPS")
        return None
    if cert is None or key is None:
        raise ClusterError("--tls-cert and --tls-key go together: give both or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as err:
        raise ClusterError(f"cannot load the TLS certificate {cert} with key {key}: {err}") from None
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as err:
            raise ClusterError(f"cannot load the client CA certificate {client_ca}: {err}") from None
    return context


class Cluster:
    """The double itself, run inside an event loop: the servers' state and one agent per node.

    DevCluster (embedded.py) runs it in a thread of another process, ServeProcess
    (serve_process.py) as `python -m devcluster serve`; both are what other code starts."""

    def __init__(
        self,
        nodes: int,
        http_port: int,
        workdir: Path,
        acl_token: str | None = None,
        data_dir: Path | None = None,
        datacenter: str = "dc1",
        host: str = "127.0.0.1",
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        realism: Realism | None = None,
        tls_client_ca: Path | None = None,
    ) -> None:
        if nodes < 1:
            raise ClusterError(f"--nodes must be at least 1, got {nodes}")
        if http_port < 1 or http_port + nodes - 1 > 65535:
            raise ClusterError(f"ports {http_port}..{http_port + nodes - 1} are outside 1..65535")
        if not _DATACENTER.match(datacenter):
            raise ClusterError(f"datacenter {datacenter!r}: use letters, digits, '-' and '_' only")
        if acl_token is not None and not acl_token.strip():
            raise ClusterError("--acl-token must not be empty")
        self.host = host
        self.datacenter = datacenter
        self.http_port = http_port
        self.workdir = Path(workdir).absolute()
        self.acl_token = acl_token
        self.data_dir = Path(data_dir).absolute() if data_dir is not None else None
        self.tls = _tls_context(tls_cert, tls_key, tls_client_ca)
        self.realism = (realism or Realism()).for_nodes(nodes)
        self.nodes: list[NodeInfo] = plan_nodes(self.workdir, nodes, http_port, host, "https" if self.tls else "http")
        self.state = ConsulState(datacenter)
        self.timers = SessionTimers(self.state)
        self.control = Control(self)
        self.agents = [
            Agent(self, i, node.name, node.port, node.config_dir, node.log_path)
            for i, node in enumerate(self.nodes)
        ]
        self.agent_by_port = {a.http_port: a for a in self.agents}
        self.agent_by_name = {a.name: a for a in self.agents}
        self._journal = Journal(self.data_dir) if self.data_dir is not None else None
        self._runner: web.AppRunner | None = None
        self._sites: dict[str, web.TCPSite] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Crashed agents whose failure gossip has not detected yet: name -> the pending detection.
        self._detections: dict[str, asyncio.TimerHandle] = {}
        #: Each node's address in the catalog (the agent's advertise address): the host it
        #: listens on unless set_address() gave another.
        self.addresses: dict[str, str] = {node.name: node.host for node in self.nodes}

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        prepare_dirs(self.workdir, self.nodes)
        if self._journal is not None:
            replayed = self._journal.restore(self.state)
            self._journal.compact(self.state)
            self.state.journal = self._journal
            log.info(
                "restored state at index %d (%d journal records) from %s", self.state.index, replayed, self.data_dir
            )
        self._bootstrap_catalog()
        self.timers.arm_all()
        # handler_cancellation: a client that hangs up ends its blocking query, as in Consul.
        self._runner = web.ServerRunner(
            HttpApi(self).make_server(handler_cancellation=True, access_log=None),
            handle_signals=False,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        try:
            for agent in self.agents:
                await self._listen(agent)
        except OSError as err:
            await self._runner.cleanup()
            raise ClusterError(f"cannot listen on {self.host}:{agent.http_port}: {err.strerror or err}") from None
        for agent in self.agents:
            agent.start()
        write_cluster_files(self.workdir, self.datacenter, self.http_port, self.nodes, self.acl_token, self.data_dir)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def close(self) -> None:
        """Stop everything; persistent state is flushed and synced."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        self.timers.close()
        for handle in self._detections.values():
            handle.cancel()
        self._detections.clear()
        for agent in self.agents:
            if agent.running:
                agent.stop()
        await asyncio.gather(*(agent.handlers.shutdown(HANDLER_GRACE_SECONDS) for agent in self.agents))
        if self._runner is not None:
            await self._runner.cleanup()
        self._sites.clear()
        if self._journal is not None:
            self._journal.close()

    def _bootstrap_catalog(self) -> None:
        names = {node.name for node in self.nodes}
        for extra in sorted(set(self.state.nodes) - names):
            self.state.deregister_node(extra)
        for node in self.nodes:
            self.state.register_node(node.name, self.addresses[node.name])
            self.state.set_node_health(node.name, True)
        self.state.register_service(
            Service(
                node=self.nodes[0].name,
                id="consul",
                name="consul",
                port=8300,
                meta={
                    "non_voter": "false",
                    "raft_version": "3",
                    "read_replica": "false",
                    "serf_protocol_current": "2",
                    "serf_protocol_max": "5",
                    "serf_protocol_min": "1",
                    "version": CONSUL_VERSION,
                },
                local=False,
            )
        )

    async def _listen(self, agent: Agent) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, agent.http_port, backlog=LISTEN_BACKLOG, ssl_context=self.tls)
        await site.start()
        self._sites[agent.name] = site

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_SECONDS)
            self.state.reap()

    # ----------------------------------------------------------------- agents

    async def stop_agent(self, name: str) -> None:
        """Crash-stop one agent: port closed, connections dropped; its serfHealth turns critical
        (its sessions invalidated) once failure detection has run, at once with ``Realism.kind()``."""
        agent = self.agent_by_name[name]
        if not agent.running:
            return
        await self._close(agent)
        delay = self.realism.failure_detection
        if delay > 0:
            self._detections[name] = asyncio.get_running_loop().call_later(delay, self._detect_failure, name)
        else:
            self._detect_failure(name)

    async def leave_agent(self, name: str) -> None:
        """The agent leaves the cluster (a client agent's SIGTERM): it stops and its node is
        deregistered at once, which removes its services and checks and invalidates its sessions."""
        agent = self.agent_by_name[name]
        if agent.running:
            await self._close(agent)
        self._cancel_detection(name)
        if name in self.state.nodes:
            self.state.deregister_node(name)
        agent.member_status = MEMBER_LEFT

    async def start_agent(self, name: str) -> None:
        agent = self.agent_by_name[name]
        if agent.running:
            return
        self._cancel_detection(name)
        await self._listen(agent)
        self.state.register_node(name, self.addresses[name])
        self.state.set_node_health(name, True)
        agent.start()

    def set_address(self, name: str, address: str) -> None:
        """The node's catalog address from now on (its agent's advertise address): a node whose
        processes run behind an address of their own (a network namespace) is found there."""
        try:
            if not isinstance(address, str):
                raise ValueError(address)
            address = str(ipaddress.ip_address(address))
        except ValueError:
            raise ClusterError(f"the address of {name} must be an IP address, got {address!r}") from None
        self.addresses[name] = address
        if name in self.state.nodes:
            self.state.register_node(name, address)

    async def _close(self, agent: Agent) -> None:
        site = self._sites.pop(agent.name)
        await site.stop()
        agent.stop()

    def _detect_failure(self, name: str) -> None:
        """Gossip found the crashed node: serfHealth critical, sessions bound to it invalidated."""
        self._detections.pop(name, None)
        self.agent_by_name[name].member_status = MEMBER_FAILED
        self.state.set_node_health(name, False)

    def _cancel_detection(self, name: str) -> None:
        handle = self._detections.pop(name, None)
        if handle is not None:
            handle.cancel()

    def fire_event(self, event: UserEvent, filters: EventFilters) -> None:
        """Gossip the event to every running agent with one cluster-wide Lamport time; each agent
        gets it as its gossip settings say (the server's own agent at once: it fired it)."""
        event.ltime = self.state.next_ltime()
        for agent in self.agents:
            agent.receive(event, filters)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        agents = {a.name: a.counters.to_api() for a in self.agents}
        total: dict[str, Any] = {key: sum(c[key] for c in agents.values()) for key in ("requests", "bytes_in", "bytes_out")}
        return {"agents": agents, "total": total}

    def reset_stats(self) -> None:
        for agent in self.agents:
            agent.counters.reset()
