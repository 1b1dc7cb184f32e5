"""Test and benchmark support under /_devcluster/, a path real Consul does not have.

    GET    /_devcluster/agents               agents with their port, whether they run, their gossip
    PUT    /_devcluster/agents/<name>/stop   crash-stop an agent (its port closes; serfHealth critical
                                             once failure detection has run)
    PUT    /_devcluster/agents/<name>/leave  the agent leaves: stopped, its node deregistered at once
    PUT    /_devcluster/agents/<name>/start  start it again (empty event ring, watches fire)
    PUT    /_devcluster/agents/<name>/gossip how events reach it from now on (JSON body: Gossip fields)
    PUT    /_devcluster/agents/<name>/address its node's catalog address from now on (JSON body:
                                             {"address": IP}), as an agent's advertise address
    GET    /_devcluster/stats                per-agent HTTP requests (also by route) and bytes in/out
    DELETE /_devcluster/stats                reset those counters

Send stop/start for an agent to another agent's port: a stopped agent's port is closed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .realism import Gossip, RealismError

if TYPE_CHECKING:
    from .agents import Agent
    from .cluster import Cluster

PREFIX = "/_devcluster/"


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Control:
    """Handlers of the /_devcluster/ endpoints."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def handle(self, request: web.BaseRequest, path: str, serving: Agent) -> web.Response:
        try:
            return self._json(await self._route(request, path[len(PREFIX) :].strip("/").split("/"), serving))
        except ControlError as err:
            return web.Response(status=err.status, text=str(err) + "\n")

    async def _route(self, request: web.BaseRequest, parts: list[str], serving: Agent) -> Any:
        method = request.method
        if parts == ["agents"]:
            self._method(method, "GET")
            return [self._agent(a) for a in self.cluster.agents]
        if len(parts) == 3 and parts[0] == "agents" and parts[2] in ("stop", "leave", "start", "gossip", "address"):
            self._method(method, "PUT")
            agent = self.cluster.agent_by_name.get(parts[1])
            if agent is None:
                raise ControlError(404, f"unknown agent {parts[1]!r}")
            if parts[2] == "gossip":
                agent.set_gossip(await self._gossip(request))
                return self._agent(agent)
            if parts[2] == "address":
                try:
                    self.cluster.set_address(agent.name, (await self._object(request, "the address"))["address"])
                except (KeyError, ValueError) as err:
                    raise ControlError(400, f"give the address as {{\"address\": IP}}: {err}") from None
                return self._agent(agent)
            # Shielded: a client hanging up must not leave an agent half stopped or started.
            if parts[2] in ("stop", "leave"):
                if serving is agent:
                    raise ControlError(
                        409, f"{agent.name} is serving this request: send its {parts[2]} to another agent's port"
                    )
                ending = self.cluster.stop_agent if parts[2] == "stop" else self.cluster.leave_agent
                await asyncio.shield(ending(agent.name))
            else:
                await asyncio.shield(self.cluster.start_agent(agent.name))
            return self._agent(agent)
        if parts == ["stats"]:
            if method == "DELETE":
                self.cluster.reset_stats()
                return True
            self._method(method, "GET")
            return self.cluster.stats()
        raise ControlError(404, f"no such devcluster endpoint: {request.path}")

    @staticmethod
    def _agent(agent: Agent) -> dict[str, Any]:
        return {"name": agent.name, "http_port": agent.http_port, "running": agent.running,
                "address": agent.cluster.addresses[agent.name], "gossip": asdict(agent.gossip.gossip)}

    @staticmethod
    async def _object(request: web.BaseRequest, what: str) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ControlError(400, f"{what} must be a JSON object: {err}") from None
        if not isinstance(body, dict):
            raise ControlError(400, f"{what} must be a JSON object, got {body!r}")
        return body

    @classmethod
    async def _gossip(cls, request: web.BaseRequest) -> Gossip:
        body = await cls._object(request, "the gossip settings")
        try:
            return Gossip.from_dict(body)
        except (RealismError, TypeError) as err:
            raise ControlError(400, str(err)) from None

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise ControlError(405, f"method {method} not allowed, use {allowed}")

    @staticmethod
    def _json(body: Any) -> web.Response:
        return web.Response(text=json.dumps(body, indent=2) + "\n", content_type="application/json")
