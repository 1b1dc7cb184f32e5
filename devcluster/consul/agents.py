"""Simulated Consul agents: what each node's agent keeps in its own memory.

An agent holds the ring of the 256 most recent user events it received (lost
when it stops), the watches loaded from its config dir, the services its config
files define, its end of gossip (how late, in what order, how often events reach
it) and its HTTP counters.  Replicated data lives in state.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .realism import Gossip, GossipLink
from .state import Service
from .watches import (
    EventWatchPlan,
    HandlerRunner,
    UnsupportedWatch,
    WatchConfigError,
    WatchSpec,
    event_index,
    parse_watch,
)

if TYPE_CHECKING:
    from .cluster import Cluster

EVENT_RING_SIZE = 256
# Serf's UserEventSizeLimit default; Consul prefixes the Serf event name with this.
SERF_USER_EVENT_LIMIT = 512
SERF_EVENT_PREFIX = "consul:event:"
# Consul's limits.http_max_conns_per_client default.
MAX_CONNS_PER_CLIENT = 200
# Consul's agent maxQueryTime for the event list quasi-blocking query.
EVENT_LIST_MAX_WAIT_SECONDS = 600.0
# Serf member status as /v1/agent/members reports it (serf.MemberStatus).
MEMBER_ALIVE = 1
MEMBER_LEFT = 3
MEMBER_FAILED = 4


def _peer_ip(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return peer[0] if peer else None


class ConfigError(ValueError):
    """An agent config dir Consul would refuse to load (reload answers 500)."""


@dataclass(slots=True)
class UserEvent:
    id: str
    name: str
    payload: bytes | None
    node_filter: str = ""
    service_filter: str = ""
    tag_filter: str = ""
    version: int = 1
    ltime: int = 0

    @classmethod
    def new(cls, name: str, payload: bytes | None, node: str, service: str, tag: str) -> UserEvent:
        return cls(str(uuid.uuid4()), name, payload or None, node, service, tag)

    def serf_sizes(self, ltime: int) -> tuple[int, int]:
        """What Serf's UserEvent measures, (before, after) encoding: the name
        ``consul:event:<name>`` plus the msgpack'd UserEvent Consul sends as the payload
        (agent/user_event.go, agent/util.go: WriteExt on), then that whole message encoded by
        Serf (messageUserEvent {LTime, Name, Payload, CC} after a type byte, WriteExt off)."""
        name = len(self.name.encode("utf-8"))
        fields = [(2, _str_header(36, True) + 36), (1, _str_header(name, True) + name), (1, 1)]  # ID, n, v
        if self.payload:
            fields.append((1, _bin_header(len(self.payload)) + len(self.payload)))
        for pattern in (self.node_filter, self.service_filter, self.tag_filter):
            if pattern:
                size = len(pattern.encode("utf-8"))
                fields.append((2, _str_header(size, True) + size))
        payload = 1 + sum(1 + key + value for key, value in fields)  # fixmap, fixstr keys
        serf_name = len(SERF_EVENT_PREFIX) + name
        encoded = (
            1 + 1  # message type, fixmap of 4
            + 1 + len("LTime") + _uint_size(ltime)
            + 1 + len("Name") + _str_header(serf_name, False) + serf_name
            + 1 + len("Payload") + _str_header(payload, False) + payload
            + 1 + len("CC") + 1
        )
        return serf_name + payload, encoded

    def to_api(self, ltime: int | None = None) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Payload": base64.b64encode(self.payload).decode("ascii") if self.payload else None,
            "NodeFilter": self.node_filter,
            "ServiceFilter": self.service_filter,
            "TagFilter": self.tag_filter,
            "Version": self.version,
            "LTime": self.ltime if ltime is None else ltime,
        }


def _str_header(size: int, write_ext: bool) -> int:
    """msgpack string header bytes (ugorji codec: str8 only with WriteExt)."""
    if size < 32:
        return 1
    if write_ext and size < 256:
        return 2
    return 3 if size < 65536 else 5


def _bin_header(size: int) -> int:
    return 2 if size < 256 else 3 if size < 65536 else 5


def _uint_size(value: int) -> int:
    return 1 if value < 128 else 2 if value < 256 else 3 if value < 65536 else 5 if value < 2**32 else 9


@dataclass(slots=True)
class EventFilters:
    """Compiled event filters; each receiving agent applies them to itself."""

    node: re.Pattern[str] | None
    service: re.Pattern[str] | None
    tag: re.Pattern[str] | None


@dataclass(slots=True)
class HttpCounters:
    """An agent's HTTP traffic; ``routes`` splits the requests by "METHOD route" (a blocking
    read, one with ``?index=``, is counted apart) so a test can bound what is deterministic."""

    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    routes: dict[str, int] = field(default_factory=dict)

    def count(self, route: str) -> None:
        self.routes[route] = self.routes.get(route, 0) + 1

    def reset(self) -> None:
        self.requests = self.bytes_in = self.bytes_out = 0
        self.routes.clear()

    def to_api(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "routes": dict(sorted(self.routes.items())),
        }


class Agent:
    """One node's agent: HTTP identity, event ring, watches and config-defined services."""

    def __init__(self, cluster: Cluster, index: int, name: str, http_port: int, config_dir: Path, log_path: Path):
        self.cluster = cluster
        self.index = index
        self.name = name
        self.http_port = http_port
        self.config_dir = config_dir
        self.log_path = log_path
        self.running = False
        #: Serf's view of the member: alive (also while a crash is not detected yet), failed or left.
        self.member_status = MEMBER_ALIVE
        realism = cluster.realism
        self.gossip = GossipLink.seeded(realism.gossip, realism.gossip_seed, name)
        # Events gossip is still carrying to this agent; a stop loses them.
        self._in_flight: set[asyncio.TimerHandle] = set()
        self.counters = HttpCounters()
        self.events: deque[UserEvent] = deque(maxlen=EVENT_RING_SIZE)
        self.transports: set[asyncio.BaseTransport] = set()
        self._event_waiters: set[Callable[[], None]] = set()
        self._stop_waiters: set[Callable[[], None]] = set()
        self._watches: list[EventWatchPlan] = []
        self._config_services: set[str] = set()
        self.handlers = HandlerRunner(self.log)

    @property
    def is_server(self) -> bool:
        return self.index == 0

    # --------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Come up with an empty event ring, load the config dir, start its watches."""
        self.events.clear()
        self.running = True
        self.member_status = MEMBER_ALIVE
        self.log("INFO", f"agent: started: node={self.name} http=127.0.0.1:{self.http_port}")
        try:
            specs, services = self._load_config()
        except ConfigError as err:
            self.log("ERROR", f"agent: failed to load config, running without watches: {err}")
            specs, services = [], []
        self._sync_config_services(services)
        self._start_watches(specs)

    def stop(self) -> None:
        """Crash-stop: watches end, the ring is lost, open connections are dropped."""
        self.running = False
        for plan in self._watches:
            plan.stop()
        self._watches = []
        self.events.clear()
        for handle in self._in_flight:
            handle.cancel()
        self._in_flight.clear()
        for transport in list(self.transports):
            transport.abort()
        self.transports.clear()
        waiters, self._stop_waiters = self._stop_waiters, set()
        for waiter in waiters:
            waiter()
        self._wake_event_waiters()
        self.log("INFO", "agent: stopped")

    def reload(self) -> None:
        """PUT /v1/agent/reload: re-read the config dir and replace the watches."""
        specs, services = self._load_config()
        self._sync_config_services(services)
        for plan in self._watches:
            plan.stop()
        self._start_watches(specs)
        self.log("INFO", f"agent: reloaded configuration: watches={len(specs)}")

    def on_stop(self, callback: Callable[[], None]) -> None:
        self._stop_waiters.add(callback)

    def discard_on_stop(self, callback: Callable[[], None]) -> None:
        self._stop_waiters.discard(callback)

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Track a connection (stopping the agent drops it); False past http_max_conns_per_client."""
        transports = self.transports
        if transport in transports:
            return True
        if len(transports) >= MAX_CONNS_PER_CLIENT:
            for stale in [t for t in transports if t.is_closing()]:
                transports.discard(stale)
            peer = _peer_ip(transport)
            if sum(1 for t in transports if _peer_ip(t) == peer) >= MAX_CONNS_PER_CLIENT:
                return False
        transports.add(transport)
        return True

    # ------------------------------------------------------------------ config

    def _load_config(self) -> tuple[list[WatchSpec], list[Service]]:
        specs: list[WatchSpec] = []
        services: list[Service] = []
        if not self.config_dir.is_dir():
            return specs, services
        for path in sorted(self.config_dir.iterdir()):
            if path.suffix == ".hcl":
                self.log("ERROR", f"agent: {path}: HCL config files are not supported by devcluster, use JSON")
                continue
            if path.suffix != ".json" or not path.is_file():
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ConfigError(f"Error parsing {path}: {err}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"Error parsing {path}: top level must be an object")
            for key in data:
                if key not in ("watches", "service", "services"):
                    self.log("WARN", f"agent: {path}: config key {key!r} is ignored by devcluster")
            watches = data.get("watches", [])
            if not isinstance(watches, list):
                raise ConfigError(f"{path}: 'watches' must be a list")
            for i, params in enumerate(watches):
                try:
                    specs.append(parse_watch(params, f"{path}: watches[{i}]"))
                except WatchConfigError as err:
                    raise ConfigError(f"Failed to parse watch: {err}") from None
                except UnsupportedWatch as err:
                    self.log("ERROR", f"agent: {err}")
            definitions = data.get("services", [])
            if "service" in data:
                definitions = [data["service"], *definitions]
            if not isinstance(definitions, list):
                raise ConfigError(f"{path}: 'services' must be a list")
            for definition in definitions:
                services.append(self.service_from_definition(definition, str(path)))
        return specs, services

    def service_from_definition(self, definition: Any, source: str) -> Service:
        """A service from an agent config file or a /v1/agent/service/register body."""
        if not isinstance(definition, dict):
            raise ConfigError(f"{source}: a service definition must be an object")
        fields = {k.replace("_", "").lower(): v for k, v in definition.items()}
        name = fields.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError("Missing service name")
        service_id = fields.get("id") or name
        tags = fields.get("tags") or []
        meta = fields.get("meta") or {}
        port = fields.get("port", 0)
        address = fields.get("address", "")
        if not isinstance(service_id, str):
            raise ConfigError(f"{source}: service ID must be a string")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError(f"{source}: service Tags must be a list of strings")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ConfigError(f"{source}: service Meta must map strings to strings")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ConfigError(f"{source}: service Port must be an integer in 0..65535")
        if not isinstance(address, str):
            raise ConfigError(f"{source}: service Address must be a string")
        return Service(
            node=self.name,
            id=service_id,
            name=name,
            tags=list(tags),
            address=address,
            port=port,
            meta=dict(meta),
            enable_tag_override=bool(fields.get("enabletagoverride", False)),
        )

    def _sync_config_services(self, services: list[Service]) -> None:
        state = self.cluster.state
        wanted = {s.id for s in services}
        for service_id in sorted(self._config_services - wanted):
            state.deregister_service(self.name, service_id)
        for service in services:
            state.register_service(service)
        self._config_services = wanted

    def _start_watches(self, specs: list[WatchSpec]) -> None:
        self._watches = [EventWatchPlan(spec, self.wait_events, self.handlers) for spec in specs]
        for plan in self._watches:
            plan.start()

    # ------------------------------------------------------------------ events

    def set_gossip(self, gossip: Gossip) -> None:
        """This agent's gossip settings from now on (its random generator goes on)."""
        self.gossip.gossip = gossip

    def receive(self, event: UserEvent, filters: EventFilters) -> None:
        """Gossip carries a fired event here: at once for the server's agent (the event is
        fired there) or with instant gossip, else when, and as often as, the settings draw."""
        if not self.running:
            return
        if self.is_server or self.gossip.gossip.instant:
            self.deliver(event, filters)
            return
        loop = asyncio.get_running_loop()
        for at in self.gossip.arrivals(loop.time()):
            self._arrive_at(loop, at, event, filters)

    def _arrive_at(self, loop: asyncio.AbstractEventLoop, at: float, event: UserEvent, filters: EventFilters) -> None:
        def arrive() -> None:
            self._in_flight.discard(handle)
            self.deliver(event, filters)

        handle = loop.call_at(at, arrive)
        self._in_flight.add(handle)

    def deliver(self, event: UserEvent, filters: EventFilters) -> bool:
        """Gossip reached this agent: keep the event if it passes the filters (shouldProcessUserEvent)."""
        if not self.running:
            return False
        if filters.node is not None and not filters.node.search(self.name):
            return False
        if filters.service is not None:
            found = False
            for service in self.cluster.state.local_services(self.name):
                # Consul matches the filter against the local service's ID.
                if not filters.service.search(service.id):
                    continue
                if filters.tag is None or any(filters.tag.search(t) for t in service.tags):
                    found = True
                    break
            if not found:
                return False
        self.events.append(event)
        self._wake_event_waiters()
        return True

    def _wake_event_waiters(self) -> None:
        waiters, self._event_waiters = self._event_waiters, set()
        for waiter in waiters:
            waiter()

    def list_events(self, name: str) -> tuple[int, list[UserEvent]]:
        """The ring oldest first, filtered by exact name; index = hash of the newest (1 if none)."""
        events = [e for e in self.events if e.name == name] if name else list(self.events)
        return (event_index(events[-1].id) if events else 1), events

    async def wait_events(
        self, name: str, min_index: int, wait_seconds: float = 0.0
    ) -> tuple[int, list[dict[str, Any]]]:
        """EventList's quasi-blocking query: block only while the index equals min_index."""
        loop = asyncio.get_running_loop()
        index, events = self.list_events(name)
        if min_index == 0 or index != min_index or not self.running:
            return index, [e.to_api() for e in events]
        if wait_seconds <= 0 or wait_seconds > EVENT_LIST_MAX_WAIT_SECONDS:
            wait_seconds = EVENT_LIST_MAX_WAIT_SECONDS
        deadline = loop.time() + wait_seconds
        while index == min_index and self.running:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            future: asyncio.Future[None] = loop.create_future()

            def wake(future: asyncio.Future[None] = future) -> None:
                if not future.done():
                    future.set_result(None)

            self._event_waiters.add(wake)
            timer = loop.call_later(remaining, wake)
            try:
                await future
            finally:
                timer.cancel()
                self._event_waiters.discard(wake)
            index, events = self.list_events(name)
        return index, [e.to_api() for e in events]

    # ------------------------------------------------------------------- logs

    def log(self, level: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} [{level}] {message}\n")
