"""Each node's Consul agent at 127.0.0.1:8500 inside its namespace, relayed to the double.

On a host the agent listens on the host's own loopback, and its traffic to the servers does
not cross the host's application link. Here the listening socket is opened inside the node's
namespace (a short-lived thread enters it with setns(2); a socket keeps the namespace it was
made in) and every connection is relayed over the host's loopback to the double's agent of
that node. Agent traffic thus never touches the shaped link.

The relay reads the HTTP requests it passes (request line, headers, a Content-Length body)
and records each one: when, which node, and what it costs Consul (:func:`classify`). Answers
are passed as they come and only counted in bytes.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

CLONE_NEWNET = 0x40000000
#: Longest request head (line and headers) the relay parses; a longer one is passed unparsed.
MAX_HEAD = 65536
#: Largest request body the relay holds to parse (Consul refuses KV values over 512 KB); a larger one is passed unparsed.
MAX_BODY = 4 * 1024 * 1024
CHUNK = 65536
#: What a request costs Consul: answered by the agent alone, a Raft write at the leader, a
#: session renewal (the leader, no Raft), a default-consistency read (the leader), a stale
#: read (any server), a blocking read (held by the server that answers it).
AGENT, WRITE, RENEWAL, READ, STALE_READ, BLOCKING_READ = "agent", "write", "renewal", "read", "stale_read", "blocking_read"
CATEGORIES = (AGENT, WRITE, RENEWAL, READ, STALE_READ, BLOCKING_READ)
#: Endpoints an agent answers from its own memory or gossip, without the servers.
AGENT_LOCAL = ("/v1/agent/", "/v1/event/", "/v1/catalog/datacenters")


@dataclass(frozen=True)
class RequestRecord:
    """One request a node's process sent to its agent."""

    node: str
    at: float
    method: str
    path: str
    category: str
    size: int


def classify(method: str, target: str) -> str:
    """What a request costs Consul, from its method and target (path and query)."""
    parts = urlsplit(target)
    path = parts.path
    query = parse_qs(parts.query, keep_blank_values=True)
    if path.startswith(AGENT_LOCAL):
        return AGENT
    if method != "GET":
        return RENEWAL if path.startswith("/v1/session/renew/") else WRITE
    if query.get("index", ["0"])[0] not in ("", "0"):
        return BLOCKING_READ
    if "stale" in query or path.startswith("/v1/status/"):
        return STALE_READ
    return READ


def _setns(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {namespace}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def listen_in(namespace: str, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` inside ``namespace``."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            _setns(namespace)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(128)
            sock.setblocking(False)
            made.append(sock)
        except BaseException as err:  # handed to the caller's thread
            failed.append(err)

    # The thread entered the namespace and ends with it; the caller's thread never leaves the host's.
    thread = threading.Thread(target=make, name=f"listen-{namespace}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


class AgentRelay:
    """Relays ``port`` inside each namespace to the double's agent port of that node."""

    def __init__(self, routes: list[tuple[str, str, int]], port: int) -> None:
        """``routes``: (node name, namespace, the double's port of that node's agent)."""
        self.routes = routes
        self.port = port
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._answered: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="agent-relay", daemon=True)
        self._sockets: list[socket.socket] = []
        self._servers: list[asyncio.AbstractServer] = []

    def __enter__(self) -> AgentRelay:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        for node, namespace, target in self.routes:
            sock = listen_in(namespace, self.port)
            self._sockets.append(sock)
            self._servers.append(self._call(self._serve(node, sock, target)))

    def _call(self, coroutine):
        if not self._thread.is_alive():
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _serve(self, node: str, sock: socket.socket, target: int) -> asyncio.AbstractServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._relay(node, target, reader, writer)

        return await asyncio.start_server(handle, sock=sock)

    async def _relay(self, node: str, target: int, client_r, client_w) -> None:
        try:
            agent_r, agent_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        upward = asyncio.ensure_future(self._requests(node, client_r, agent_w))
        downward = asyncio.ensure_future(self._answers(node, agent_r, client_w))
        await asyncio.wait({upward, downward}, return_when=asyncio.FIRST_COMPLETED)
        for task in (upward, downward):
            task.cancel()
        for writer in (agent_w, client_w):
            writer.close()

    async def _requests(self, node: str, reader, writer) -> None:
        """Client to agent, request by request; a head it cannot parse is passed on unparsed."""
        buffer = b""
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    break
                chunk = await reader.read(CHUNK)
                if not chunk:
                    return
                buffer += chunk
                continue
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            lines = head.decode("latin-1").split("\r\n")
            request = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            length_text = headers.get("content-length", "0") or "0"
            length = int(length_text) if length_text.isdigit() else -1
            if len(request) != 3 or "chunked" in headers.get("transfer-encoding", "").lower() or not 0 <= length <= MAX_BODY:
                writer.write(head)
                break
            while len(buffer) < length:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    return
                buffer += chunk
            body, buffer = buffer[:length], buffer[length:]
            method, target = request[0], request[1]
            self._record(RequestRecord(node, time.time(), method, urlsplit(target).path, classify(method, target),
                                       len(head) + length))
            writer.write(head + body)
            await writer.drain()
        writer.write(buffer)
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()

    async def _answers(self, node: str, reader, writer) -> None:
        while chunk := await reader.read(CHUNK):
            with self._lock:
                self._answered[node] = self._answered.get(node, 0) + len(chunk)
            writer.write(chunk)
            await writer.drain()

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def reset(self) -> None:
        with self._lock:
            self._records = []
            self._answered = {}

    def snapshot(self) -> tuple[list[RequestRecord], dict[str, int]]:
        """The requests since the last reset, and the answer bytes per node."""
        with self._lock:
            return list(self._records), dict(self._answered)

    def stop(self) -> None:
        if self._thread.is_alive():
            for server in self._servers:
                self._loop.call_soon_threadsafe(server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self._servers = []
