"""Consul's HTTP API, served on every agent port by one aiohttp application.

The agent answering a request is the one whose port the connection came in on.
Status codes, bodies, and headers follow Consul's agent/*_endpoint.go: blocking
queries with index/wait/jitter, X-Consul-* metadata, error texts, ACL answers.
Client agents (every node but node 0, which runs the server) prefix errors
returned by the servers with "rpc error making call: ", as a real client does.

Beyond Consul's API, `/_devcluster/` lets tests stop and start agents and read
per-agent HTTP counters; it is not subject to ACLs and not counted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import posixpath
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from . import state as st
from .agents import SERF_USER_EVENT_LIMIT, Agent, ConfigError, EventFilters, UserEvent
from .realism import MISSING_KEY_BLOCK, MISSING_KEY_EXACT
from .goparse import SECOND, DurationError, RegexError, compile_go_regex, go_quote, parse_duration

if TYPE_CHECKING:
    from .cluster import Cluster

KV_MAX_VALUE_SIZE = 512 * 1024
TXN_MAX_REQ_LEN = 512 * 1024
DEFAULT_QUERY_SECONDS = 300.0
MAX_QUERY_SECONDS = 600.0
JITTER_FRACTION = 16
LEADER_ADDRESS = "127.0.0.1:8300"
SERF_LAN_PORT = 8301
ANONYMOUS_HINT = ". The anonymous token is used implicitly when a request does not specify a token."
AGENT_KEY: web.RequestKey[Agent] = web.RequestKey("devcluster.agent", Agent)
TOO_MANY_CONNECTIONS = "Your IP is issuing too many concurrent connections, please rate limit your calls\n"
CLIENT_MAX_SIZE = 2 * TXN_MAX_REQ_LEN

_UINT = re.compile(r"^[0-9]+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
#: strconv.ParseBool's spellings, as health/service reads ?passing.
_GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")
# Agent-local endpoints: Consul does not read ?dc there (no RPC to route).
_LOCAL_ROUTES = ("/v1/agent/", "/v1/event/list", "/v1/catalog/datacenters")


class ApiError(Exception):
    """An HTTP error answer with Consul's status code and plain-text body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(slots=True)
class QueryResult:
    """One run of a blocking query: its index, the watch topics, and what to answer."""

    index: int
    topics: tuple[Any, ...]
    body: Any
    found: bool = True
    #: Consul's ErrNotFound (blockingquery): while a re-run finds nothing again, the query keeps
    #: blocking with the index it now reports.
    blocks_while_absent: bool = False


@dataclass(slots=True)
class QueryOptions:
    min_index: int
    wait_seconds: float
    consistency: str


def _go_uint(text: str) -> int:
    """strconv.ParseUint(text, 10, 64) with Go's error text."""
    if not _UINT.match(text):
        raise ApiError(500, f"strconv.ParseUint: parsing {go_quote(text)}: invalid syntax")
    value = int(text)
    if value >= 2**64:
        raise ApiError(500, f"strconv.ParseUint: parsing {go_quote(text)}: value out of range")
    return value


def _go_json(obj: Any, pretty: bool = False) -> bytes:
    """encoding/json output: UTF-8, HTML characters escaped; MarshalIndent with ?pretty."""
    if pretty:
        text = json.dumps(obj, ensure_ascii=False, indent=4) + "\n"
    else:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if "<" in text or ">" in text or "&" in text or "\u2028" in text or "\u2029" in text:
        text = (
            text.replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )
    return text.encode("utf-8")


def _go_query_encode(query: Any) -> str:
    """url.Values.Encode(): keys sorted, values query-escaped."""
    pairs = []
    for key in sorted(set(query.keys())):
        for value in query.getall(key):
            pairs.append(f"{quote(key, safe='')}={quote(value, safe='')}".replace("%20", "+"))
    return "&".join(pairs)


def _clean_path(path: str) -> str:
    """Go's ServeMux cleanPath: path.Clean, keeping a trailing slash."""
    if not path.startswith("/"):
        path = "/" + path
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


def _fields(obj: dict[str, Any]) -> dict[str, Any]:
    """Go's encoding/json matches object keys to struct fields case-insensitively."""
    return {k.lower(): v for k, v in obj.items()}


def _decode_error(field: str, expected: str, value: Any) -> str:
    kinds = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}
    return f"json: cannot unmarshal {kinds.get(type(value), 'value')} into Go struct field {field} of type {expected}"


class Call:
    """One request as a handler sees it: the agent, the query, the token."""

    __slots__ = ("agent", "pretty", "query", "request", "token")

    def __init__(self, request: web.BaseRequest, agent: Agent) -> None:
        self.request = request
        self.agent = agent
        self.query = request.query
        self.pretty = "pretty" in self.query
        self.token = self._token()

    def _token(self) -> str:
        if "token" in self.query:
            return self.query["token"]
        header = self.request.headers.get("X-Consul-Token", "")
        if header:
            return header
        auth = self.request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return ""

    def has(self, name: str) -> bool:
        return name in self.query

    def param(self, name: str) -> str:
        return self.query.get(name, "")


Handler = Callable[[Call, str], Awaitable[web.StreamResponse]]


class _AgentRequest(web.BaseRequest):
    """A request to an agent's port. aiohttp calls ``_prepare_hook`` (what an application's
    on_response_prepare signal hangs on) once it has set its own headers (Date, Server) and
    just before it sends them: Consul's headers are set there."""

    ATTRS = web.BaseRequest.ATTRS | frozenset(["_api"])

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        self._api._finish(self, response)


class HttpApi:
    """Routes requests to Consul endpoint handlers and keeps per-agent counters."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.state = cluster.state
        get, put, delete = "GET", "PUT", "DELETE"
        self._exact: dict[str, tuple[Handler, tuple[str, ...]]] = {
            "/v1/txn": (self.txn, (put,)),
            "/v1/session/create": (self.session_create, (put,)),
            "/v1/session/list": (self.session_list, (get,)),
            "/v1/event/list": (self.event_list, (get,)),
            "/v1/catalog/nodes": (self.catalog_nodes, (get,)),
            "/v1/catalog/services": (self.catalog_services, (get,)),
            "/v1/catalog/datacenters": (self.catalog_datacenters, (get,)),
            "/v1/agent/self": (self.agent_self, (get,)),
            "/v1/agent/members": (self.agent_members, (get,)),
            "/v1/agent/services": (self.agent_services, (get,)),
            "/v1/agent/checks": (self.agent_checks, (get,)),
            "/v1/agent/service/register": (self.agent_service_register, (put,)),
            "/v1/agent/reload": (self.agent_reload, (put,)),
            "/v1/status/leader": (self.status_leader, (get,)),
            "/v1/status/peers": (self.status_peers, (get,)),
        }
        self._prefixes: list[tuple[str, Handler, tuple[str, ...]]] = [
            ("/v1/kv/", self.kv, (get, put, delete)),
            ("/v1/session/destroy/", self.session_destroy, (put,)),
            ("/v1/session/renew/", self.session_renew, (put,)),
            ("/v1/session/info/", self.session_info, (get,)),
            ("/v1/session/node/", self.session_node, (get,)),
            ("/v1/event/fire/", self.event_fire, (put,)),
            ("/v1/catalog/node/", self.catalog_node, (get,)),
            ("/v1/catalog/service/", self.catalog_service, (get,)),
            ("/v1/agent/service/deregister/", self.agent_service_deregister, (put,)),
            ("/v1/health/node/", self.health_node, (get,)),
            ("/v1/health/checks/", self.health_checks, (get,)),
            ("/v1/health/service/", self.health_service, (get,)),
            ("/v1/health/state/", self.health_state, (get,)),
        ]

    # ------------------------------------------------------------------ wiring

    def make_server(self, **kwargs) -> web.Server:
        """aiohttp's low-level server: every request goes to dispatch (Consul's paths are
        routed there), without an application's router, middlewares and signals, which cost
        a seventh of the double's CPU per request. ``kwargs`` go to ``web.Server``."""

        def make_request(message, payload, protocol, writer, task):
            request = _AgentRequest(
                message, payload, protocol, writer, task, asyncio.get_running_loop(), client_max_size=CLIENT_MAX_SIZE
            )
            request._api = self
            return request

        return web.Server(self.dispatch, request_factory=make_request, **kwargs)

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        agent = self.cluster.agent_by_port.get(sockname[1]) if sockname else None
        if agent is None or not agent.running:
            # A stopped agent has no listener: drop connections that were already open.
            if transport is not None:
                transport.abort()
            raise web.HTTPServiceUnavailable()
        if not agent.admit(transport):  # type: ignore[arg-type]
            refused = web.Response(status=429, text=TOO_MANY_CONNECTIONS)
            refused.force_close()
            return refused
        path = request.path
        if path.startswith("/_devcluster/"):
            return await self.cluster.control.handle(request, path, agent)
        request[AGENT_KEY] = agent
        counters = agent.counters
        counters.requests += 1
        counters.bytes_in += self._request_size(request)
        cleaned = _clean_path(path)
        if cleaned != path:
            location = cleaned + (("?" + request.query_string) if request.query_string else "")
            body = f'<a href="{location}">Moved Permanently</a>.\n\n' if request.method == "GET" else ""
            return web.Response(
                status=301,
                text=body or None,
                headers={"Location": location},
                content_type="text/html" if body else None,
            )
        try:
            handler, methods, rest = self._route(path)
            route = path[: len(path) - len(rest)] if rest else path
            blocking = " (blocking)" if request.query.get("index", "0") not in ("", "0") else ""
            counters.count(f"{request.method} {route}{blocking}")
            if request.method == "OPTIONS":
                return web.Response(status=200, headers={"Allow": ",".join(("OPTIONS", *methods))})
            if request.method not in methods:
                raise ApiError(405, f"method {request.method} not allowed", {"Allow": ",".join(("OPTIONS", *methods))})
            call = Call(request, agent)
            if not route.startswith(_LOCAL_ROUTES):
                self._check_dc(call)
            return await handler(call, rest)
        except ApiError as err:
            return self._text(err.status, err.message, err.headers)
        except st.StateError as err:
            prefix = "" if agent.is_server else "rpc error making call: "
            return self._text(500, prefix + str(err))

    def _route(self, path: str) -> tuple[Handler, tuple[str, ...], str]:
        exact = self._exact.get(path)
        if exact is not None:
            return exact[0], exact[1], ""
        for prefix, handler, methods in self._prefixes:
            if path.startswith(prefix):
                return handler, methods, path[len(prefix) :]
        raise ApiError(404, "404 page not found\n")

    @staticmethod
    def _request_size(request: web.BaseRequest) -> int:
        size = len(request.method) + len(request.raw_path) + 12  # "GET /path HTTP/1.1\r\n"
        for name, value in request.raw_headers:
            size += len(name) + len(value) + 4
        return size + 2 + (request.content_length or 0)

    def _finish(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Consul's headers on an agent's answer, and its bytes counted for /_devcluster/stats."""
        agent: Agent | None = request.get(AGENT_KEY)
        if agent is None:
            return
        headers = response.headers
        headers.pop("Server", None)
        headers["X-Consul-Default-Acl-Policy"] = "deny" if self.cluster.acl_token else "allow"
        headers["Vary"] = "Accept-Encoding"
        size = len(response.reason or "") + 15 + 2
        for name, value in headers.items():
            size += len(name) + len(value) + 4
        agent.counters.bytes_out += size + (response.content_length or 0)

    # --------------------------------------------------------------- responses

    def _json(self, call: Call, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            status=status, body=_go_json(obj, call.pretty), headers=headers, content_type="application/json"
        )

    @staticmethod
    def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=status, text=message, headers=headers, content_type="text/plain", charset="utf-8")

    @staticmethod
    def _meta(index: int, consistency: str) -> dict[str, str]:
        """setMeta (agent/http.go): what every read answered from the servers' state carries.
        The query backend is the blocking one (streaming serves only health/service blocking
        reads on agents with use_streaming_backend: not modeled)."""
        return {
            "X-Consul-Effective-Consistency": consistency,
            "X-Consul-Index": str(max(index, 1)),
            "X-Consul-Knownleader": "true",
            "X-Consul-Lastcontact": "0",
            "X-Consul-Query-Backend": "blocking-query",
        }

    def _answer(self, call: Call, opts: QueryOptions, result: QueryResult) -> web.Response:
        headers = self._meta(result.index, opts.consistency)
        if not result.found:
            return web.Response(status=404, headers=headers)
        return self._json(call, result.body, headers=headers)

    # ------------------------------------------------------ options, blocking

    def _check_dc(self, call: Call) -> None:
        dc = call.param("dc")
        if dc and dc != self.cluster.datacenter:
            raise st.StateError("No path to datacenter")

    @staticmethod
    def _wait(call: Call) -> tuple[int, float]:
        """parseWait: ?index and ?wait, as (min_index, wait_seconds)."""
        wait_seconds = 0.0
        if call.param("wait"):
            try:
                wait_seconds = parse_duration(call.param("wait")) / SECOND
            except DurationError:
                raise ApiError(400, "Invalid wait time") from None
        min_index = 0
        if call.param("index"):
            if not _UINT.match(call.param("index")) or int(call.param("index")) >= 2**64:
                raise ApiError(400, "Invalid index")
            min_index = int(call.param("index"))
        return min_index, wait_seconds

    def _options(self, call: Call) -> QueryOptions:
        """The query options of a Raft-backed read: consistency mode, blocking, filter."""
        stale, consistent = call.has("stale"), call.has("consistent")
        if stale and consistent:
            raise ApiError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        min_index, wait_seconds = self._wait(call)
        if call.param("filter"):
            raise ApiError(400, "?filter expressions are not supported by devcluster")
        return QueryOptions(min_index, wait_seconds, "stale" if stale else "consistent" if consistent else "leader")

    async def _blocking(self, call: Call, opts: QueryOptions, run: Callable[[], QueryResult]) -> QueryResult:
        """Consul's blockingquery.Query: wait while the index is <= ?index, for wait + jitter."""
        result = run()
        if opts.min_index == 0 or result.index > opts.min_index:
            return result
        timeout = opts.wait_seconds
        if timeout > MAX_QUERY_SECONDS:
            timeout = MAX_QUERY_SECONDS
        elif timeout <= 0:
            timeout = DEFAULT_QUERY_SECONDS
        timeout += random.uniform(0, timeout / JITTER_FRACTION)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        agent = call.agent
        min_index = opts.min_index
        # The older double runs the query once more at the timeout.
        consul_timeout = self.cluster.realism.missing_key != MISSING_KEY_EXACT
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or not agent.running:
                return result
            future: asyncio.Future[None] = loop.create_future()

            def wake(future: asyncio.Future[None] = future) -> None:
                if not future.done():
                    future.set_result(None)

            handle = self.state.watch(result.topics, wake)
            agent.on_stop(wake)
            timer = loop.call_later(remaining, wake)
            try:
                await future
            finally:
                timer.cancel()
                self.state.unwatch(handle)
                agent.discard_on_stop(wake)
            if consul_timeout and loop.time() >= deadline:
                return result  # Consul answers a timed-out query from its last run (blockingquery.Query)
            previous, result = result, run()
            if previous.blocks_while_absent and result.blocks_while_absent:
                min_index = max(min_index, result.index)
            if result.index > min_index:
                return result

    # -------------------------------------------------------------------- ACLs

    def _allowed(self, call: Call, permission: str, resource: str, filtered: bool = False) -> bool:
        """Default-deny ACLs with one management token: True if the caller may see it.

        An unknown token is refused everywhere; the anonymous token gets filtered
        (empty) lists where Consul filters, and 403 elsewhere.
        """
        acl = self.cluster.acl_token
        if not acl or call.token == acl:
            return True
        if call.token:
            raise ApiError(403, "ACL not found")
        if filtered:
            return False
        raise ApiError(403, self._denied(permission, resource))

    @staticmethod
    def _denied(permission: str, resource: str) -> str:
        target = go_quote(resource)
        return f"Permission denied: anonymous token lacks permission '{permission}' on {target}{ANONYMOUS_HINT}"

    # ---------------------------------------------------------------- bodies

    @staticmethod
    async def _body(call: Call, limit: int, too_large: Callable[[int], str]) -> bytes:
        length = call.request.content_length
        if length is not None and length > limit:
            raise ApiError(413, too_large(length))
        body = await call.request.read()
        if len(body) > limit:
            raise ApiError(413, too_large(len(body)))
        return body

    @staticmethod
    def _json_body(body: bytes, error_prefix: str) -> Any:
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"{error_prefix}{err}") from None

    # ---------------------------------------------------------------------- KV

    async def kv(self, call: Call, key: str) -> web.StreamResponse:
        if key and key != key.strip():
            raise ApiError(400, "invalid key name: key must not begin or end with whitespace")
        method = call.request.method
        if method == "GET":
            opts = self._options(call)
            if call.has("keys"):
                if not self._allowed(call, "key:list", key, filtered=True):
                    return self._answer(call, opts, QueryResult(self.state.kv_max_index(), (), [], found=not key))
                separator = call.param("separator") if call.has("separator") else call.param("seperator")
                result = await self._blocking(call, opts, lambda: self._kv_keys(key, separator))
                return self._answer(call, opts, result)
            if call.has("recurse"):
                if not self._allowed(call, "key:read", key, filtered=True):
                    return self._answer(call, opts, QueryResult(self.state.kv_max_index(), (), [], found=False))
                result = await self._blocking(call, opts, lambda: self._kv_list(key))
                return self._answer(call, opts, result)
            if not key:
                raise ApiError(400, "Missing key name")
            self._allowed(call, "key:read", key)
            result = await self._blocking(call, opts, lambda: self._kv_get(key))
            if result.found and call.has("raw"):
                entry: st.KVEntry = result.body
                headers = self._meta(result.index, opts.consistency)
                headers.update({"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})
                return web.Response(body=entry.value or b"", headers=headers, content_type="text/plain")
            if result.found:
                result.body = [result.body.to_api()]
            return self._answer(call, opts, result)
        if method == "PUT":
            return await self._kv_put(call, key)
        return await self._kv_delete(call, key)

    def _kv_get(self, key: str) -> QueryResult:
        index, entry = self.state.kv_get(key)
        if entry is not None:
            return QueryResult(index, (("kv", key),), entry)
        mode = self.cluster.realism.missing_key
        return QueryResult(index, self._absent_topics(key, ("kv", key)), None, found=False,
                           blocks_while_absent=mode == MISSING_KEY_BLOCK)

    def _kv_list(self, prefix: str) -> QueryResult:
        index, entries = self.state.kv_list(prefix)
        topics = (("kvp", prefix),) if entries else self._absent_topics(prefix, ("kvp", prefix))
        return QueryResult(index, topics, [e.to_api() for e in entries], found=bool(entries))

    def _kv_keys(self, prefix: str, separator: str) -> QueryResult:
        index, keys = self.state.kv_keys(prefix, separator)
        topics = (("kvp", prefix),) if keys else self._absent_topics(prefix, ("kvp", prefix))
        return QueryResult(index, topics, keys, found=bool(keys) or not prefix)

    def _absent_topics(self, key: str, exact: tuple[str, str]) -> tuple[Any, ...]:
        """What wakes a read of a key or prefix that holds nothing: in Consul memdb's radix node
        nearest to it, i.e. a write under the longest prefix it shares with a stored key (a new
        key splitting that node's edge higher up is not modeled); ``exact`` in the older double."""
        if self.cluster.realism.missing_key == MISSING_KEY_EXACT:
            return (exact,)
        return (("kvp", self.state.kv_nearest_prefix(key)),)

    def _conflicting(self, call: Call, *flags: str) -> None:
        if sum(1 for f in flags if call.has(f)) > 1:
            raise ApiError(400, f"Conflicting flags: {_go_query_encode(call.query)}\n")

    async def _kv_put(self, call: Call, key: str) -> web.StreamResponse:
        if not key:
            raise ApiError(400, "Missing key name")
        self._conflicting(call, "cas", "acquire", "release")
        flags = _go_uint(call.param("flags")) if call.has("flags") else 0
        cas = _go_uint(call.param("cas")) if call.has("cas") else None
        self._allowed(call, "key:write", key)
        value = await self._body(
            call,
            KV_MAX_VALUE_SIZE,
            lambda n: (
                f"Request body({n} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes. "
                "See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
            ),
        )
        if call.has("acquire"):
            self._check_session_id(call.param("acquire"))
            ok = self.state.kv_lock(key, value, flags, call.param("acquire"))
        elif call.has("release"):
            ok = self.state.kv_unlock(key, value, flags, call.param("release"))
        elif cas is not None:
            ok = self.state.kv_cas(key, value, flags, cas)
        else:
            ok = self.state.kv_set(key, value, flags)
        return self._json(call, ok)

    async def _kv_delete(self, call: Call, key: str) -> web.StreamResponse:
        self._conflicting(call, "recurse", "cas")
        if call.has("recurse"):
            self._allowed(call, "key:write", key)
            self.state.kv_delete_tree(key)
            return self._json(call, True)
        if not key:
            raise ApiError(400, "Missing key name")
        cas = _go_uint(call.param("cas")) if call.has("cas") else None
        self._allowed(call, "key:write", key)
        if cas is not None:
            return self._json(call, self.state.kv_delete_cas(key, cas))
        self.state.kv_delete(key)
        return self._json(call, True)

    @staticmethod
    def _check_session_id(session_id: str) -> None:
        """Sessions are looked up by a UUID index: a malformed ID is an error, not a miss."""
        if not session_id:
            return
        if len(session_id) != 36:
            raise st.StateError("failed session lookup: UUID must be 36 characters")
        if not _UUID.match(session_id):
            raise st.StateError("failed session lookup: UUID improperly formatted")

    # --------------------------------------------------------------------- txn

    async def txn(self, call: Call, rest: str) -> web.StreamResponse:
        body = await self._body(
            call,
            TXN_MAX_REQ_LEN,
            lambda n: (
                f"Request body({n} bytes) too large, max size: {TXN_MAX_REQ_LEN} bytes. "
                "See https://www.consul.io/docs/agent/config/config-files#txn_max_req_len."
            ),
        )
        raw = self._json_body(body, "Failed to parse body: ")
        if not isinstance(raw, list):
            raise ApiError(400, f"Failed to parse body: {_decode_error('TxnOps', '[]*api.TxnOp', raw)}")
        max_ops = self.cluster.realism.txn_max_ops
        if len(raw) > max_ops:
            raise ApiError(413, f"Transaction contains too many operations ({len(raw)} > {max_ops})")
        ops = [op for op in (self._txn_op(i, item) for i, item in enumerate(raw)) if op is not None]
        writes = any(op.verb in st.KV_WRITE_VERBS for op in ops)
        if not writes:
            # Read-only txns skip Raft and take consistency modes (but never block).
            self._options(call)
        anonymous = not self._allowed(call, "key:read", "", filtered=True)
        if anonymous:
            # Reads are filtered on the way out; everything else needs a permission the anonymous token lacks.
            errors = [
                {
                    "OpIndex": i,
                    "What": self._denied("key:read" if op.verb.startswith("check-") else "key:write", op.key),
                }
                for i, op in enumerate(ops)
                if op.verb not in ("get", "get-tree")
            ]
            if errors:
                return self._json(call, {"Results": None, "Errors": errors}, status=409)
        results, errors = self.state.txn(ops, get_or_empty=self.cluster.realism.serves_get_or_empty)
        if results is not None and anonymous:
            results = []
        headers = None if writes else {"X-Consul-Knownleader": "true", "X-Consul-Lastcontact": "0"}
        if errors:
            return self._json(call, {"Results": None, "Errors": errors}, status=409, headers=headers)
        return self._json(call, {"Results": results, "Errors": None}, headers=headers)

    @staticmethod
    def _txn_op(position: int, item: Any) -> st.TxnOp | None:
        if not isinstance(item, dict):
            raise ApiError(400, f"Failed to parse body: {_decode_error('TxnOps', 'api.TxnOp', item)}")
        fields = _fields(item)
        kv = fields.get("kv")
        if kv is None:
            if any(fields.get(k) is not None for k in ("node", "service", "check", "session")):
                raise ApiError(400, f"Failed to parse body: op {position}: devcluster serves only KV operations")
            return None
        if not isinstance(kv, dict):
            raise ApiError(400, f"Failed to parse body: {_decode_error('TxnOp.KV', 'api.KVTxnOp', kv)}")
        kv = _fields(kv)
        op = st.TxnOp(verb="")
        for name, attr, kind in (
            ("verb", "verb", str),
            ("key", "key", str),
            ("session", "session", str),
            ("flags", "flags", int),
            ("index", "index", int),
        ):
            value = kv.get(name)
            if value is None:
                continue
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
                expected = "string" if kind is str else "uint64"
                raise ApiError(
                    400, f"Failed to parse body: {_decode_error('KVTxnOp.' + name.title(), expected, value)}"
                )
            setattr(op, attr, value)
        value = kv.get("value")
        if value is not None:
            if not isinstance(value, str):
                raise ApiError(400, f"Failed to parse body: unexpected value type: {type(value).__name__}")
            try:
                op.value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as err:
                raise ApiError(400, f"Failed to parse body: failed to decode value: {err}") from None
            if len(op.value) > KV_MAX_VALUE_SIZE:
                raise ApiError(
                    413, f"Value for key {go_quote(op.key)} is too large ({len(op.value)} > {KV_MAX_VALUE_SIZE} bytes)"
                )
        return op

    # ---------------------------------------------------------------- sessions

    async def session_create(self, call: Call, rest: str) -> web.StreamResponse:
        req = st.SessionRequest(node=call.agent.name, node_checks=[st.SERF_CHECK], checks=[st.SERF_CHECK])
        length = call.request.content_length
        if length is not None and length > 0:
            raw = self._json_body(await call.request.read(), "Request decode failed: ")
            self._decode_session(raw, req)
        # fixupEmptySessionChecks (agent/session_endpoint.go)
        if not req.checks:
            req.node_checks = []
        elif req.checks == [st.SERF_CHECK] or (req.node_checks is not None and not req.node_checks):
            req.checks = None
        self._allowed(call, "session:write", req.node)
        session = self.state.session_create(req)
        self.cluster.timers.reset(session)
        return self._json(call, {"ID": session.id})

    @staticmethod
    def _decode_session(raw: Any, req: st.SessionRequest) -> None:
        """Decode a session/create body into req like Go's json.Decoder + Session.UnmarshalJSON."""

        def fail(field: str, expected: str, value: Any) -> ApiError:
            return ApiError(400, f"Request decode failed: {_decode_error('Session.' + field, expected, value)}")

        if not isinstance(raw, dict):
            raise ApiError(400, f"Request decode failed: {_decode_error('Session', 'structs.Session', raw)}")
        fields = _fields(raw)
        for name, attr in (("name", "name"), ("node", "node"), ("behavior", "behavior"), ("ttl", "ttl")):
            if name in fields and fields[name] is not None:
                if not isinstance(fields[name], str):
                    raise fail(name.title() if name != "ttl" else "TTL", "string", fields[name])
                setattr(req, attr, fields[name])
        if "lockdelay" in fields and fields["lockdelay"] is not None:
            value = fields["lockdelay"]
            if isinstance(value, str):
                try:
                    delay = parse_duration(value)
                except DurationError as err:
                    raise ApiError(400, f"Request decode failed: {err}") from None
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                delay = int(value)
            else:
                raise fail("LockDelay", "time.Duration", value)
            # Session.UnmarshalJSON: values under 1000 are taken as seconds.
            req.lock_delay = delay * SECOND if delay < 1000 else delay
        for name, attr in (("checks", "checks"), ("nodechecks", "node_checks")):
            if name in fields:
                value = fields[name]
                if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                    raise fail("Checks" if name == "checks" else "NodeChecks", "[]string", value)
                setattr(req, attr, None if value is None else list(value))
        if "servicechecks" in fields:
            value = fields["servicechecks"]
            if value is None:
                req.service_checks = None
            else:
                if not isinstance(value, list):
                    raise fail("ServiceChecks", "[]structs.ServiceCheck", value)
                ids = []
                for item in value:
                    item_fields = _fields(item) if isinstance(item, dict) else None
                    if item_fields is None or not isinstance(item_fields.get("id", ""), str):
                        raise fail("ServiceChecks", "structs.ServiceCheck", item)
                    ids.append(item_fields.get("id", ""))
                req.service_checks = ids

    async def session_destroy(self, call: Call, session_id: str) -> web.StreamResponse:
        if not session_id:
            raise ApiError(400, "Missing session")
        self._check_session_id(session_id)
        existing = self.state.sessions.get(session_id)
        self._allowed(call, "session:write", existing.node if existing else session_id)
        self.state.session_destroy(session_id)
        return self._json(call, True)

    async def session_renew(self, call: Call, session_id: str) -> web.StreamResponse:
        self._options(call)
        if not session_id:
            raise ApiError(400, "Missing session")
        self._check_session_id(session_id)
        session = self.state.sessions.get(session_id)
        if session is None:
            raise ApiError(404, f"Session id '{session_id}' not found")
        self._allowed(call, "session:write", session.node)
        self.cluster.timers.reset(session)
        return self._json(call, [session.to_api()])

    async def session_info(self, call: Call, session_id: str) -> web.StreamResponse:
        opts = self._options(call)
        if not session_id:
            raise ApiError(400, "Missing session")
        self._check_session_id(session_id)
        visible = self._allowed(call, "session:read", session_id, filtered=True)

        def run() -> QueryResult:
            index, session = self.state.session_get(session_id)
            body = [session.to_api()] if session is not None and visible else []
            return QueryResult(index, (("session", session_id),), body)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    async def session_list(self, call: Call, rest: str) -> web.StreamResponse:
        opts = self._options(call)
        visible = self._allowed(call, "session:read", "", filtered=True)

        def run() -> QueryResult:
            index, sessions = self.state.session_list()
            return QueryResult(index, (("sessions",),), [s.to_api() for s in sessions] if visible else [])

        return self._answer(call, opts, await self._blocking(call, opts, run))

    async def session_node(self, call: Call, node: str) -> web.StreamResponse:
        opts = self._options(call)
        if not node:
            raise ApiError(400, "Missing node name")
        visible = self._allowed(call, "session:read", node, filtered=True)

        def run() -> QueryResult:
            index, sessions = self.state.node_sessions(node)
            body = [s.to_api() for s in sessions] if visible else []
            return QueryResult(index, (("node-sessions", node),), body)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    # ------------------------------------------------------------------ events

    async def event_fire(self, call: Call, name: str) -> web.StreamResponse:
        if not name:
            raise ApiError(400, "Missing name")
        if name.startswith("_"):
            raise ApiError(400, f"Invalid event name {go_quote(name)}: names starting with '_' are reserved for Consul")
        node, service, tag = call.param("node"), call.param("service"), call.param("tag")
        payload = None
        length = call.request.content_length
        # The body is read whole, with no limit of its own: Serf's 512 bytes apply below.
        if length is not None and length > 0:
            payload = await call.request.read()
        if tag and not service:
            raise ApiError(500, "Cannot provide tag filter without service filter")
        compiled = []
        for label, pattern in (("node", node), ("service", service), ("tag", tag)):
            if not pattern:
                compiled.append(None)
                continue
            try:
                compiled.append(compile_go_regex(pattern))
            except RegexError as err:
                raise ApiError(500, f"Invalid {label} filter: {err}") from None
        if self.cluster.acl_token and call.token != self.cluster.acl_token:
            raise ApiError(403, "ACL not found" if call.token else "Permission denied")
        event = UserEvent.new(name, payload, node, service, tag)
        # Serf refuses a user event over 512 bytes, measured before and after encoding (serf.UserEvent).
        before, after = event.serf_sizes(self.state.ltime)
        if before > SERF_USER_EVENT_LIMIT:
            raise st.StateError(f"user event exceeds configured limit of {SERF_USER_EVENT_LIMIT} bytes before encoding")
        if after > SERF_USER_EVENT_LIMIT:
            raise st.StateError(
                f"encoded user event exceeds configured limit of {SERF_USER_EVENT_LIMIT} bytes after encoding"
            )
        self.cluster.fire_event(event, EventFilters(*compiled))
        return self._json(call, event.to_api(ltime=0))

    async def event_list(self, call: Call, rest: str) -> web.StreamResponse:
        # Agent-local and gossip-fed: only ?index/?wait apply, with their own blocking rule.
        min_index, wait_seconds = self._wait(call)
        visible = self._allowed(call, "event:read", call.param("name"), filtered=True)
        if not visible:
            return self._json(call, [], headers={"X-Consul-Index": "1"})
        index, events = await call.agent.wait_events(call.param("name"), min_index, wait_seconds)
        return self._json(call, events, headers={"X-Consul-Index": str(index)})

    # ----------------------------------------------------------------- catalog

    async def catalog_nodes(self, call: Call, rest: str) -> web.StreamResponse:
        opts = self._options(call)
        visible = self._allowed(call, "node:read", "", filtered=True)
        dc = self.cluster.datacenter

        def run() -> QueryResult:
            nodes = [self.state.nodes[n].to_api(dc) for n in sorted(self.state.nodes)] if visible else []
            return QueryResult(self.state.catalog_index("nodes"), (("nodes",),), nodes)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    async def catalog_node(self, call: Call, name: str) -> web.StreamResponse:
        opts = self._options(call)
        if not name:
            raise ApiError(400, "Missing node name")
        visible = self._allowed(call, "node:read", name, filtered=True)
        dc = self.cluster.datacenter

        def run() -> QueryResult:
            node = self.state.nodes.get(name) if visible else None
            body = None
            if node is not None:
                services = self.state.services.get(name, {})
                body = {
                    "Node": node.to_api(dc),
                    "Services": {sid: services[sid].to_node_service_api() for sid in sorted(services)},
                }
            return QueryResult(self.state.catalog_index("nodes", "services"), (("nodes",), ("services",)), body)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    async def catalog_services(self, call: Call, rest: str) -> web.StreamResponse:
        opts = self._options(call)
        visible = self._allowed(call, "service:read", "", filtered=True)

        def run() -> QueryResult:
            body = self.state.service_names() if visible else {}
            return QueryResult(self.state.catalog_index("services"), (("services",),), body)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    async def catalog_service(self, call: Call, name: str) -> web.StreamResponse:
        opts = self._options(call)
        if not name:
            raise ApiError(400, "Missing service name")
        tags = call.query.getall("tag", [])
        visible = self._allowed(call, "service:read", name, filtered=True)
        dc = self.cluster.datacenter

        def run() -> QueryResult:
            pairs = self.state.service_instances(name, tags) if visible else []
            body = [service.to_catalog_api(node, dc) for node, service in pairs]
            return QueryResult(self.state.catalog_index("nodes", "services"), (("nodes",), ("services",)), body)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    async def catalog_datacenters(self, call: Call, rest: str) -> web.StreamResponse:
        return self._json(call, [self.cluster.datacenter])

    # ------------------------------------------------------------------ health

    async def health_node(self, call: Call, name: str) -> web.StreamResponse:
        opts = self._options(call)
        if not name:
            raise ApiError(400, "Missing node name")
        visible = self._allowed(call, "node:read", name, filtered=True)

        def run() -> QueryResult:
            checks = [c.to_api() for c in self.state.node_checks(name)] if visible else []
            return QueryResult(self.state.catalog_index("checks"), (("checks",),), checks)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    async def health_checks(self, call: Call, name: str) -> web.StreamResponse:
        opts = self._options(call)
        if not name:
            raise ApiError(400, "Missing service name")
        self._allowed(call, "service:read", name, filtered=True)
        # Services here carry no checks of their own.
        result = await self._blocking(
            call, opts, lambda: QueryResult(self.state.catalog_index("checks"), (("checks",),), [])
        )
        return self._answer(call, opts, result)

    async def health_service(self, call: Call, name: str) -> web.StreamResponse:
        opts = self._options(call)
        if not name:
            raise ApiError(400, "Missing service name")
        tags = call.query.getall("tag", [])
        # getBoolQueryParam: a bare ?passing is true, else strconv.ParseBool.
        passing = call.has("passing") and call.param("passing") not in _GO_FALSE
        if passing and call.param("passing") not in ("", *_GO_TRUE):
            raise ApiError(400, "Invalid value for ?passing")
        visible = self._allowed(call, "service:read", name, filtered=True)
        dc = self.cluster.datacenter

        def run() -> QueryResult:
            body = []
            for node, service in self.state.service_instances(name, tags) if visible else []:
                checks = self.state.node_checks(node.name)
                if passing and any(c.status != "passing" for c in checks):
                    continue
                body.append(
                    {
                        "Node": node.to_api(dc),
                        "Service": service.to_node_service_api(),
                        "Checks": [c.to_api() for c in checks],
                    }
                )
            index = self.state.catalog_index("nodes", "services", "checks")
            return QueryResult(index, (("nodes",), ("services",), ("checks",)), body)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    async def health_state(self, call: Call, wanted: str) -> web.StreamResponse:
        opts = self._options(call)
        if not wanted:
            raise ApiError(400, "Missing check state")
        # No check of the state: the state store looks it up by status, an unknown one has no checks.
        visible = self._allowed(call, "node:read", "", filtered=True)

        def run() -> QueryResult:
            checks = []
            for node in sorted(self.state.checks) if visible else []:
                checks += [c.to_api() for c in self.state.node_checks(node) if wanted in ("any", c.status)]
            return QueryResult(self.state.catalog_index("checks"), (("checks",),), checks)

        return self._answer(call, opts, await self._blocking(call, opts, run))

    # ------------------------------------------------------------------- agent

    def _member(self, agent: Agent) -> dict[str, Any]:
        tags = {
            "build": f"{self.cluster.realism.consul_version}:devcluster",
            "dc": self.cluster.datacenter,
            "id": st.node_id_for(agent.name),
            "role": "consul" if agent.is_server else "node",
            "segment": "",
            "vsn": "2",
            "vsn_max": "3",
            "vsn_min": "2",
        }
        if agent.is_server:
            tags.update({"bootstrap": "1", "port": "8300", "raft_vsn": "3", "wan_join_port": "8302"})
        return {
            "Name": agent.name,
            "Addr": self.cluster.host,
            "Port": SERF_LAN_PORT,
            "Tags": tags,
            "Status": agent.member_status,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        }

    async def agent_self(self, call: Call, rest: str) -> web.StreamResponse:
        agent = call.agent
        self._allowed(call, "agent:read", agent.name)
        node_id = st.node_id_for(agent.name)
        dc = self.cluster.datacenter
        version = self.cluster.realism.consul_version
        body = {
            "Config": {
                "Datacenter": dc,
                "PrimaryDatacenter": dc,
                "NodeName": agent.name,
                "NodeID": node_id,
                "Partition": "",
                "Revision": "devcluster",
                "Server": agent.is_server,
                "Version": version,
                "BuildDate": "2025-10-14T00:00:00Z",
            },
            "DebugConfig": {
                "Datacenter": dc,
                "NodeName": agent.name,
                "NodeID": node_id,
                "ServerMode": agent.is_server,
                "ACLsEnabled": bool(self.cluster.acl_token),
                "ACLResolverSettings": {"ACLDefaultPolicy": "deny" if self.cluster.acl_token else "allow"},
                "ClientAddrs": [self.cluster.host],
                "HTTPPort": agent.http_port,
                "KVMaxValueSize": KV_MAX_VALUE_SIZE,
                "TxnMaxReqLen": TXN_MAX_REQ_LEN,
                "SessionTTLMin": "10s",
                "Version": version,
            },
            "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
            "Member": self._member(agent),
            "Stats": {
                "agent": {
                    "check_monitors": "0",
                    "check_ttls": "0",
                    "checks": "0",
                    "services": str(len(self.state.local_services(agent.name))),
                },
                "build": {"prerelease": "", "revision": "devcluster", "version": version},
            },
            "Meta": {"consul-network-segment": "", "consul-version": version},
            "xDS": {"SupportedProxies": {}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
        }
        return self._json(call, body)

    async def agent_members(self, call: Call, rest: str) -> web.StreamResponse:
        visible = self._allowed(call, "node:read", "", filtered=True)
        if not visible:
            return self._json(call, [])
        if call.param("wan") not in ("", "0", "false"):
            # The WAN pool holds the servers only, named <node>.<datacenter>.
            server = self._member(self.cluster.agents[0])
            server.update(Name=f"{server['Name']}.{self.cluster.datacenter}", Port=8302)
            return self._json(call, [server])
        return self._json(call, [self._member(a) for a in self.cluster.agents])

    async def agent_services(self, call: Call, rest: str) -> web.StreamResponse:
        if call.param("filter"):
            raise ApiError(400, "?filter expressions are not supported by devcluster")
        visible = self._allowed(call, "service:read", "", filtered=True)
        services = self.state.local_services(call.agent.name) if visible else []
        dc = self.cluster.datacenter
        return self._json(call, {s.id: s.to_agent_api(dc) for s in sorted(services, key=lambda s: s.id)})

    async def agent_checks(self, call: Call, rest: str) -> web.StreamResponse:
        self._allowed(call, "node:read", "", filtered=True)
        return self._json(call, {})

    async def agent_service_register(self, call: Call, rest: str) -> web.StreamResponse:
        raw = self._json_body(await call.request.read(), "Request decode failed: ")
        try:
            service = call.agent.service_from_definition(raw, "Request decode failed")
        except ConfigError as err:
            raise ApiError(400, str(err)) from None
        fields = _fields(raw)
        if fields.get("check") or fields.get("checks"):
            call.agent.log("WARN", f"agent: service {service.id!r}: health checks are not run by devcluster")
        self._allowed(call, "service:write", service.name)
        self.state.register_service(service)
        return web.Response(status=200)

    async def agent_service_deregister(self, call: Call, service_id: str) -> web.StreamResponse:
        if not service_id:
            raise ApiError(400, "Missing service ID")
        self._allowed(call, "service:write", service_id)
        service = self.state.services.get(call.agent.name, {}).get(service_id)
        if service is None or not service.local:
            hint = "Ensure that the service ID is passed, not the service name."
            raise ApiError(404, f"Unknown service ID {go_quote(service_id)}. {hint}")
        self.state.deregister_service(call.agent.name, service_id)
        return web.Response(status=200)

    async def agent_reload(self, call: Call, rest: str) -> web.StreamResponse:
        self._allowed(call, "agent:write", call.agent.name)
        try:
            call.agent.reload()
        except ConfigError as err:
            call.agent.log("ERROR", f"agent: Failed to reload configs: {err}")
            raise ApiError(500, f"Failed to reload configs: {err}") from None
        return web.Response(status=200)

    # ------------------------------------------------------------------ status

    async def status_leader(self, call: Call, rest: str) -> web.StreamResponse:
        return self._json(call, LEADER_ADDRESS)

    async def status_peers(self, call: Call, rest: str) -> web.StreamResponse:
        return self._json(call, [LEADER_ADDRESS])
