"""The netns cluster: refused without root; as root, a 3-node cluster isolated (no default route),
shaped both ways, its agent relay classifying requests, and nothing of it left after the block."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import threading

import pytest

from devcluster.netns import CONSUL_PORT, AgentRelay, LinkShape, NetnsCluster, NetnsError
from devcluster.netns import cluster as netns_cluster
from devcluster.netns.relay import AGENT, BLOCKING_READ, READ, RENEWAL, STALE_READ, WRITE, classify

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="network namespaces, veth and tc need root")


@pytest.mark.parametrize(
    ("method", "target", "category"),
    [
        ("GET", "/v1/agent/self", AGENT),
        ("GET", "/v1/event/list?name=FIREAP%3ATASK&index=7", AGENT),
        ("PUT", "/v1/event/fire/FIREAP:TASK", AGENT),
        ("PUT", "/v1/kv/fireap/a?cas=3", WRITE),
        ("PUT", "/v1/txn", WRITE),
        ("PUT", "/v1/session/destroy/0f1c", WRITE),
        ("PUT", "/v1/session/renew/0f1c", RENEWAL),
        ("GET", "/v1/kv/fireap/a", READ),
        ("GET", "/v1/kv/fireap/a?consistent", READ),
        ("GET", "/v1/kv/fireap/a?index=0", READ),
        ("GET", "/v1/kv/fireap/a?stale", STALE_READ),
        ("GET", "/v1/status/leader", STALE_READ),
        ("GET", "/v1/kv/fireap/a?index=42&wait=60s", BLOCKING_READ),
    ],
)
def test_classify_says_what_a_request_costs_consul(method, target, category):
    assert classify(method, target) == category


def test_link_shape_refuses_bad_values():
    with pytest.raises(ValueError, match="link rate"):
        LinkShape(0)
    with pytest.raises(ValueError, match="latency"):
        LinkShape(50, -1)
    assert LinkShape(8, 5).bytes_per_second == 1_000_000
    assert LinkShape(8, 5).round_trip_seconds == 0.01


def test_refused_with_the_reason_without_root(monkeypatch):
    monkeypatch.setattr(netns_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match="needs root"):
        with NetnsCluster(["node-000"], LinkShape(50)):
            pass


def _in(cluster, name, *args) -> str:
    return subprocess.run(cluster.node(name).command(list(args)), capture_output=True, text=True, check=True).stdout


def _leftovers() -> list[str]:
    etc = list(netns_cluster.NETNS_ETC.glob(netns_cluster.PREFIX + "*")) if netns_cluster.NETNS_ETC.is_dir() else []
    return netns_cluster.own_namespaces() + netns_cluster.own_links() + [str(path) for path in etc]


class _Agent(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _cluster(names, shape):
    """The cluster, or a skip while another run (a benchmark) holds the machine's one cluster."""
    try:
        cluster = NetnsCluster(names, shape).__enter__()
    except NetnsError as err:
        if "another netns cluster" in str(err):
            pytest.skip(str(err))
        raise
    try:
        yield cluster
    finally:
        cluster.teardown()


@needs_root
def test_a_cluster_is_isolated_shaped_relayed_and_leaves_nothing():
    leftover = netns_cluster.PREFIX + "leftover"
    subprocess.run(["ip", "netns", "add", leftover], check=True)  # as a run killed with SIGKILL leaves it
    agent = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Agent)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    names = ["node-000", "node-001", "node-002"]
    try:
        with _cluster(names, LinkShape(20)) as cluster:
            assert leftover not in netns_cluster.own_namespaces()
            for node in cluster.nodes:
                routes = _in(cluster, node.name, "ip", "route", "show")
                assert "default" not in routes
                assert f"src {node.address}" in routes
                assert "rate 20Mbit" in _in(cluster, node.name, "tc", "class", "show", "dev", "eth0")
                shown = subprocess.run(["tc", "class", "show", "dev", node.veth], capture_output=True, text=True, check=True).stdout
                assert "rate 20Mbit" in shown
            hosts = _in(cluster, "node-001", "cat", "/etc/hosts")
            assert f"{cluster.node('node-002').address} node-002" in hosts
            routes = [(node.name, node.namespace, agent.server_address[1]) for node in cluster.nodes]
            with AgentRelay(routes, CONSUL_PORT) as relay:
                for target in ("/v1/kv/a?index=5", "/v1/kv/a?stale"):
                    answer = _in(cluster, "node-002", "curl", "-sf", f"http://127.0.0.1:{CONSUL_PORT}{target}")
                    assert answer == "[]"
                records, answered = relay.snapshot()
            assert [(r.node, r.category) for r in records] == [("node-002", BLOCKING_READ), ("node-002", STALE_READ)]
            assert answered["node-002"] > 0
            stray = subprocess.Popen(cluster.node("node-000").command(["sleep", "600"]))
        assert stray.wait(10) == -signal.SIGTERM  # the namespace's processes end with it
        assert _leftovers() == []
    finally:
        agent.shutdown()
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True, check=False)
