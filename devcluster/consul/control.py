"""Test and benchmark support under /_devcluster/, a path real Consul does not have.

    GET    /_devcluster/agents               agents with their port and whether they run
    PUT    /_devcluster/agents/<name>/stop   crash-stop an agent (its port closes)
    PUT    /_devcluster/agents/<name>/start  start it again (empty event ring, watches fire)
    GET    /_devcluster/stats                per-agent HTTP requests (also by route) and bytes in/out
    DELETE /_devcluster/stats                reset those counters

Send stop/start for an agent to another agent's port: a stopped agent's port is closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

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
            return [{"name": a.name, "http_port": a.http_port, "running": a.running} for a in self.cluster.agents]
        if len(parts) == 3 and parts[0] == "agents" and parts[2] in ("stop", "start"):
            self._method(method, "PUT")
            agent = self.cluster.agent_by_name.get(parts[1])
            if agent is None:
                raise ControlError(404, f"unknown agent {parts[1]!r}")
            # Shielded: a client hanging up must not leave an agent half stopped or started.
            if parts[2] == "stop":
                if serving is agent:
                    raise ControlError(
                        409, f"{agent.name} is serving this request: send its stop to another agent's port"
                    )
                await asyncio.shield(self.cluster.stop_agent(agent.name))
            else:
                await asyncio.shield(self.cluster.start_agent(agent.name))
            return {"name": agent.name, "http_port": agent.http_port, "running": agent.running}
        if parts == ["stats"]:
            if method == "DELETE":
                self.cluster.reset_stats()
                return True
            self._method(method, "GET")
            return self.cluster.stats()
        raise ControlError(404, f"no such devcluster endpoint: {request.path}")

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise ControlError(405, f"method {method} not allowed, use {allowed}")

    @staticmethod
    def _json(body: Any) -> web.Response:
        return web.Response(text=json.dumps(body, indent=2) + "\n", content_type="application/json")
