"""The benchmark's py-consul transport: py-consul's answers over one keep-alive connection per
thread, failures raised as requests' exceptions (what the worker's retry rules expect)."""

from __future__ import annotations

import socket
import threading

import pytest
import requests
from consul_harness import in_background, unique_name

from devcluster import find_free_port_range
from devcluster.bench_client import BenchConsul

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


class _OneAnswerPerConnection(threading.Thread):
    """An HTTP server that answers one request per connection, then closes it without saying so."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
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
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                body = b"[]"
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 7\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        self.sock.close()


def test_a_read_is_sent_again_on_a_fresh_connection_when_the_agent_closed_the_idle_one():
    server = _OneAnswerPerConnection()
    server.start()
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
        server.close()
