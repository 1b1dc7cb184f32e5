"""The py-consul client of a simulated node in the in-process benchmark.

It is py-consul's own ``consul.Consul`` (every endpoint, argument and answer parsed by
py-consul, as on a node), talking real HTTP/1.1 to the node's own agent; only the transport
under it differs. py-consul's default transport, requests, spends about 0.55 ms of CPU per
request and the benchmark runs a thousand nodes' clients on two cores, where that alone
would be most of the machine; a real node spends it on its own CPU. This transport keeps
one keep-alive connection per thread (the worker and its session renewer each get one) and
reads answers with a small HTTP/1.1 reader (status line, headers, a Content-Length or
chunked body): about 0.05 ms per request with py-consul on top, against 0.09 ms over
``http.client``, whose header parsing through the email package costs more than the rest.

Failures surface as the exceptions requests raises (``ConnectionError``, ``Timeout``), so
the worker's retry rules see what they would see on a node.
"""

from __future__ import annotations

import socket
import threading
import time

import consul
import consul.base
import consul.std
import requests
from requests.structures import CaseInsensitiveDict

#: A blocking query answers at the latest after wait + wait/16 (the agent's jitter): its
#: read timeout is the client's timeout plus that, as with py-consul's own transport.
_JITTER_DIVISOR = 16
#: Consul's default wait for a blocking query without ``?wait``.
_DEFAULT_WAIT_SECONDS = 300.0
HTTP_OK = 200
KV_PATH = "/v1/kv/"
TXN_PATH = "/v1/txn"
#: Longest status or header line accepted, and most header lines (as http.client's limits).
_MAX_LINE = 65536
_MAX_HEADERS = 100
#: Statuses that never have a body.
_NO_BODY = {204, 304}


class _Closed(Exception):
    """The agent closed the connection before any byte of the answer arrived."""


class _ProtocolError(Exception):
    """The answer is not HTTP/1.x as expected."""


def _wait_seconds(params) -> float | None:
    """The ``wait`` of a blocking query in seconds (None if the request does not block)."""
    params = dict(params or ())
    if "index" not in params:
        return None
    wait = params.get("wait")
    return consul.std.parse_duration(wait) if wait else _DEFAULT_WAIT_SECONDS


class _Connection:
    """One keep-alive HTTP/1.1 connection: send a request, read its whole answer."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")
        self.host_header = f"{host}:{port}"

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def exchange(self, method: str, target: str, body: bytes | None, headers: dict, timeout: float):
        """``(status, [(name, value), ...], content, will_close)`` of one request."""
        self.sock.settimeout(timeout)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}", "Accept-Encoding: identity"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body or b'')}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        status_line = self._line()
        if not status_line:
            raise _Closed()
        version, _sep, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise _ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        try:
            status = int(rest[:3])
        except ValueError:
            raise _ProtocolError(f"bad status line: {status_line[:80]!r}") from None
        answer_headers = []
        while True:
            line = self._line()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise _ProtocolError("the connection closed inside the headers")
            if len(answer_headers) >= _MAX_HEADERS:
                raise _ProtocolError(f"more than {_MAX_HEADERS} headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise _ProtocolError(f"bad header line: {line[:80]!r}")
            answer_headers.append((name.strip(), value.strip()))
        fields = {name.lower(): value for name, value in answer_headers}
        will_close = fields.get("connection", "").lower() == "close" or version == b"HTTP/1.0"
        if method == "HEAD" or status in _NO_BODY:
            content = b""
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            content = self._chunked()
        elif "content-length" in fields:
            content = self._exactly(int(fields["content-length"]))
        else:
            content, will_close = self.rfile.read(), True
        return status, answer_headers, content, will_close

    def _line(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _ProtocolError("a line of the answer is too long")
        return line

    def _exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise _ProtocolError(f"the connection closed after {len(data)} of {size} body bytes")
        return data

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size_line = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _ProtocolError(f"bad chunk size line: {size_line[:80]!r}") from None
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self._exactly(size))
            self._line()


class KeepAliveHTTPClient(consul.base.HTTPClient):
    """py-consul's HTTP client interface over :class:`_Connection`, one connection per thread."""

    def __init__(self, host: str, port: int, scheme: str, verify, cert, timeout: float) -> None:
        if scheme != "http":
            raise ValueError(f"the benchmark client speaks plain http only, not {scheme!r}")
        super().__init__(host, port, scheme, verify, cert)
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        #: When (epoch seconds) Consul last acknowledged a KV write or transaction of this
        #: client: for a pull, when its final record was written (None before any).
        self.kv_written: float | None = None

    def _connection(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _Connection(self.host, self.port, self.timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop(self, conn: _Connection | None) -> None:
        self._local.conn = None
        if conn is None:
            return
        conn.close()
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)

    def _request(self, method: str, path: str, params, body, headers, raw: bool = False) -> consul.base.Response:
        target = self.uri(path, params)[len(self.base_uri) :]
        if isinstance(body, str):
            body = body.encode("utf-8")
        wait = _wait_seconds(params)
        timeout = self.timeout if wait is None else self.timeout + wait + wait / _JITTER_DIVISOR
        # A kept-alive connection the agent closed meanwhile fails before anything was
        # read: a GET is sent again on a new one, as urllib3 would; a write is not.
        for attempt in (1, 2):
            conn = None
            try:
                conn = self._connection()
                status, answer_headers, content, will_close = conn.exchange(
                    method, target, body or None, headers or {}, timeout
                )
                break
            except socket.timeout as err:
                self._drop(conn)
                raise requests.exceptions.ReadTimeout(f"{method} {target}: {err}") from err
            except (_Closed, ConnectionResetError, BrokenPipeError) as err:
                self._drop(conn)
                if attempt == 1 and method == "GET" and conn is not None:
                    continue
                reason = "the agent closed the connection" if isinstance(err, _Closed) else err
                raise requests.exceptions.ConnectionError(f"{method} {target}: {reason}") from err
            except (OSError, ValueError, _ProtocolError) as err:
                self._drop(conn)
                raise requests.exceptions.ConnectionError(f"{method} {target}: {err}") from err
        if will_close:
            self._drop(conn)
        if method == "PUT" and status == HTTP_OK and (path == TXN_PATH or path.startswith(KV_PATH)):
            self.kv_written = time.time()
        return consul.base.Response(
            status, CaseInsensitiveDict(answer_headers), content if raw else content.decode("utf-8")
        )

    def get(self, callback, path, params=None, headers=None, raw: bool = False):
        return callback(self._request("GET", path, params, None, headers, raw))

    def put(self, callback, path, params=None, data="", headers=None):
        return callback(self._request("PUT", path, params, data, headers))

    def delete(self, callback, path, params=None, data="", headers=None):
        return callback(self._request("DELETE", path, params, data, headers))

    def post(self, callback, path, params=None, data="", headers=None):
        return callback(self._request("POST", path, params, data, headers))

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


class BenchConsul(consul.Consul):
    """``consul.Consul`` over :class:`KeepAliveHTTPClient`; ``timeout`` as py-consul's
    ``connections_timeout`` (blocking queries add their wait and its jitter)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._timeout = timeout
        super().__init__(host=host, port=port, scheme="http")

    def http_connect(self, host, port, scheme, verify=True, cert=None):
        return KeepAliveHTTPClient(host, port, scheme, verify, cert, self._timeout)
