"""The py-consul client of a simulated node in the in-process benchmark.

It is py-consul's own ``consul.Consul`` (every endpoint, argument and answer parsed by
py-consul, as on a node), talking real HTTP/1.1 to the node's own agent; only the transport
under it differs. py-consul's default transport, requests, spends about 0.55 ms of CPU per
request and the benchmark runs a thousand nodes' clients on two cores, where that alone
would be most of the machine; a real node spends it on its own CPU. This transport keeps
one keep-alive ``http.client`` connection per thread (the worker and its session renewer
each get one) and costs about 0.08 ms per request.

Failures surface as the exceptions requests raises (``ConnectionError``, ``Timeout``), so
the worker's retry rules see what they would see on a node.
"""

from __future__ import annotations

import http.client
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
#: How a kept-alive connection the agent closed while it was idle fails.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _wait_seconds(params) -> float | None:
    """The ``wait`` of a blocking query in seconds (None if the request does not block)."""
    params = dict(params or ())
    if "index" not in params:
        return None
    wait = params.get("wait")
    return consul.std.parse_duration(wait) if wait else _DEFAULT_WAIT_SECONDS


class KeepAliveHTTPClient(consul.base.HTTPClient):
    """py-consul's HTTP client interface over ``http.client``, one connection per thread."""

    def __init__(self, host: str, port: int, scheme: str, verify, cert, timeout: float) -> None:
        if scheme != "http":
            raise ValueError(f"the benchmark client speaks plain http only, not {scheme!r}")
        super().__init__(host, port, scheme, verify, cert)
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        #: When (epoch seconds) Consul last acknowledged a KV write or transaction of this
        #: client: for a pull, when its final record was written (None before any).
        self.kv_written: float | None = None

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)

    def _request(self, method: str, path: str, params, body, headers, raw: bool = False) -> consul.base.Response:
        target = self.uri(path, params)[len(self.base_uri) :]
        if isinstance(body, str):
            body = body.encode("utf-8")
        wait = _wait_seconds(params)
        timeout = self.timeout if wait is None else self.timeout + wait + wait / _JITTER_DIVISOR
        conn = self._connection()
        # A kept-alive connection the agent closed meanwhile fails before anything was
        # read: a GET is sent again on a new one, as urllib3 would; a write is not.
        for attempt in (1, 2):
            try:
                if conn.sock is None:
                    conn.connect()
                conn.sock.settimeout(timeout)
                conn.request(method, target, body=body or None, headers=headers or {})
                response = conn.getresponse()
                content = response.read()
                break
            except socket.timeout as err:
                self._drop(conn)
                raise requests.exceptions.ReadTimeout(f"{method} {target}: {err}") from err
            except (OSError, http.client.HTTPException) as err:
                self._drop(conn)
                if attempt == 1 and method == "GET" and isinstance(err, _STALE_CONNECTION):
                    conn = self._connection()
                    continue
                raise requests.exceptions.ConnectionError(f"{method} {target}: {err}") from err
        if response.will_close:
            self._drop(conn)
        if method == "PUT" and response.status == HTTP_OK and (path == TXN_PATH or path.startswith(KV_PATH)):
            self.kv_written = time.time()
        answer_headers = CaseInsensitiveDict(response.getheaders())
        return consul.base.Response(response.status, answer_headers, content if raw else content.decode("utf-8"))

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
