"""The benchmark's py-consul transport: py-consul's answers over one keep-alive connection per
thread, failures raised as requests' exceptions (what the worker's retry rules expect)."""

from __future__ import annotations

import socket
import threading

import pytest
import requests
from consul_harness import in_background, unique_name

from devcluster.bench.client import BenchConsul
from devcluster.consul import find_free_port_range

TIMEOUT = 30.0


def _client(consul_target, agent: int = 0, timeout: float = TIMEOUT) -> BenchConsul:
    endpoint = consul_target.agents[agent]
    if endpoint.scheme != "http" or consul_target.token:
        pytest.skip("the benchmark transport speaks plain http without a token")
    return BenchConsul(endpoint.host, endpoint.port, timeout)


def test_kv_and_txn_answers_are_py_consuls_and_kv_writes_are_stamped(consul_target, kv_prefix):
    client = _client(consul_target)
    key = kv_prefix + unique_name("bench")
    try:
        assert client.kv.get(key)[1] is None
        assert client.http.kv_written is None
        assert client.kv.put(key, "v1") is True
        written = client.http.kv_written
        assert written is not None
        index, entry = client.kv.get(key)
        assert entry["Value"] == b"v1" and int(index) == entry["ModifyIndex"]
        result = client.txn.put([{"KV": {"Verb": "get-or-empty", "Key": key}}])
        assert result["Results"][0]["KV"]["Value"] == "djE="  # base64 of "v1"
        assert client.http.kv_written >= written  # a transaction counts, a read does not change it
        written = client.http.kv_written
        client.kv.get(key)
        assert client.http.kv_written == written
        assert client.kv.delete(key) is True
    finally:
        client.http.close()


def test_a_blocking_read_outlasts_the_client_timeout_and_wakes_on_a_write(consul_target, kv_prefix):
    """The read timeout of a blocking query is the client's plus the wait and its jitter."""
    client = _client(consul_target, timeout=0.5)
    key = kv_prefix + unique_name("bench")
    try:
        client.kv.put(key, "before")
        index, _entry = client.kv.get(key)
        unchanged, _entry = client.kv.get(key, index=index, wait="1500ms")
        assert unchanged == index
        pending = in_background(client.kv.get, key, index=index, wait="60s")
        # Another thread of the same client gets its own connection meanwhile.
        consul_target.client().kv.put(key, "after")
        new_index, entry = pending.result(timeout=TIMEOUT)
        assert int(new_index) > int(index) and entry["Value"] == b"after"
        assert client.kv.get(key)[1]["Value"] == b"after"
    finally:
        client.http.close()


def test_an_agent_that_does_not_listen_is_a_connection_error():
    port = find_free_port_range(1)
    client = BenchConsul("127.0.0.1", port, TIMEOUT)
    with pytest.raises(requests.exceptions.ConnectionError):
        client.kv.get("anything")


class _FixedAnswer(threading.Thread):
    """An HTTP server that sends the same raw answer to every request, on kept-alive
    connections unless ``close`` (then it closes each connection after its answer)."""

    def __init__(self, answer: bytes, close: bool) -> None:
        super().__init__(daemon=True)
        self.answer = answer
        self.close_after = close
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0

    def run(self) -> None:
        while True:
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                _head, _sep, data = data.partition(b"\r\n\r\n")
                conn.sendall(self.answer)
                if self.close_after:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fixed_answer():
    servers = []

    def start(answer: bytes, close: bool = False) -> _FixedAnswer:
        server = _FixedAnswer(answer, close)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_a_read_is_sent_again_on_a_fresh_connection_when_the_agent_closed_the_idle_one(fixed_answer):
    # The server closes each connection after one answer without saying so.
    server = fixed_answer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 7\r\nContent-Length: 2\r\n\r\n[]",
        close=True,
    )
    client = BenchConsul("127.0.0.1", server.port, TIMEOUT)
    try:
        assert client.event.list() == ("7", [])
        assert client.event.list() == ("7", [])
        assert server.connections == 2
        # A write is never sent twice: the closed connection is the caller's error.
        with pytest.raises(requests.exceptions.ConnectionError):
            client.event.fire("bench")
    finally:
        client.http.close()


def test_a_chunked_answer_is_read_whole_and_the_connection_kept(fixed_answer):
    body = (
        b'[{"ID":"e1","Name":"bench","Payload":null,"NodeFilter":"","ServiceFilter":"",'
        b'"TagFilter":"","Version":1,"LTime":3}]'
    )
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    server = fixed_answer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 9\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )
    client = BenchConsul("127.0.0.1", server.port, TIMEOUT)
    try:
        first, second = client.event.list(), client.event.list()
        assert first == second and first[0] == "9" and [event["ID"] for event in first[1]] == ["e1"]
        assert server.connections == 1
    finally:
        client.http.close()


def test_an_answer_that_says_close_is_followed_by_a_new_connection(fixed_answer):
    server = fixed_answer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 4\r\n"
        b"Connection: close\r\nContent-Length: 2\r\n\r\n[]"
    )
    client = BenchConsul("127.0.0.1", server.port, TIMEOUT)
    try:
        assert client.event.list() == ("4", [])
        assert client.event.list() == ("4", [])
        assert server.connections == 2
    finally:
        client.http.close()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 abc Weird\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[]", "closed after 2 of 10 body bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size line"),
    ],
)
def test_an_answer_that_is_not_http_is_a_connection_error(fixed_answer, answer, message):
    server = fixed_answer(answer, close=True)
    client = BenchConsul("127.0.0.1", server.port, TIMEOUT)
    try:
        with pytest.raises(requests.exceptions.ConnectionError, match=message):
            client.event.list()
    finally:
        client.http.close()
