"""ServeProcess: `python -m devcluster serve` as a child process, started, stopped, killed and
started again, and the free port range it takes when given no port; and the calls it answers
as DevCluster (the double in this process) does."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import requests

from devcluster.consul import (
    EMBEDDED,
    SUBPROCESS,
    DevCluster,
    NodeInfo,
    ServeError,
    ServeProcess,
    find_free_port_range,
)
from devcluster.consul.cluster import ClusterError

TIMEOUT = 10


def test_start_returns_once_every_agent_answers_with_the_cluster_files_nodes_and_stop_ends_the_double(tmp_path):
    workdir = tmp_path / "work"
    process = ServeProcess(2, workdir, new_session=True)
    try:
        assert process.start() is process
        cluster = json.loads((workdir / "cluster.json").read_text())
        assert (cluster["http_port_base"], cluster["acl"], cluster["data_dir"]) == (process.http_port, False, None)
        assert process.nodes == [NodeInfo.from_json(node) for node in cluster["nodes"]]
        nodes = process.nodes
        assert [node.name for node in nodes] == ["node-000", "node-001"]
        assert [node.port for node in nodes] == [process.http_port, process.http_port + 1]
        assert nodes[1].log_path == workdir.absolute() / "agents" / "node-001" / "agent.log"
        for node in nodes:
            assert requests.get(f"{node.base_url}/v1/status/leader", timeout=TIMEOUT).ok
        assert os.getsid(process.proc.pid) == process.proc.pid
        with pytest.raises(ServeError, match="already running"):
            process.start()
    finally:
        process.stop()
    assert process.proc.returncode == 0
    assert "devcluster: stopped" in process.log_tail()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{process.http_port}/v1/status/leader", timeout=TIMEOUT)


def test_a_killed_double_started_again_on_its_data_dir_keeps_its_ports_and_keys(tmp_path):
    token = "serve-process-test-token"
    headers = {"X-Consul-Token": token}
    process = ServeProcess(1, tmp_path / "work", acl_token=token, data_dir=tmp_path / "data")
    try:
        port = process.start().nodes[0].port
        url = f"http://127.0.0.1:{port}/v1/kv/serve-process/key"
        assert requests.put(url, data=b"kept", timeout=TIMEOUT).status_code == 403
        assert requests.put(url, data=b"kept", headers=headers, timeout=TIMEOUT).json() is True
        process.kill()
        assert process.proc.returncode == -signal.SIGKILL
        assert process.start().nodes[0].port == port
        answer = requests.get(url, params={"raw": ""}, headers=headers, timeout=TIMEOUT)
        assert (answer.status_code, answer.content) == (200, b"kept")
    finally:
        process.stop()


def test_a_refused_option_fails_the_start_with_the_end_of_the_log(tmp_path):
    process = ServeProcess(1, tmp_path / "work", tls_cert=tmp_path / "cert.pem")
    with pytest.raises(ServeError, match="exited with status 1") as failure:
        process.start()
    message = str(failure.value)
    assert str(process.log_path) in message
    assert "devcluster: error: --tls-cert and --tls-key go together" in message


def test_a_double_not_ready_in_time_is_killed(tmp_path):
    process = ServeProcess(1, tmp_path / "work")
    with pytest.raises(ServeError, match="did not write .*cluster.json within 0s and was killed"):
        process.start(timeout=0)
    assert process.proc.returncode == -signal.SIGKILL


def test_a_free_port_range_binds_as_a_whole_below_the_ephemeral_ports():
    base = find_free_port_range(5)
    sockets = [socket.socket() for _offset in range(5)]
    try:
        for offset, sock in enumerate(sockets):
            sock.bind(("127.0.0.1", base + offset))
    finally:
        for sock in sockets:
            sock.close()
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert base + 5 <= low


@pytest.mark.parametrize("kind", [DevCluster, ServeProcess])
def test_both_ways_of_running_the_double_answer_the_same_calls(tmp_path, kind):
    with kind(2, tmp_path / "work") as double:
        assert double.kind in (EMBEDDED, SUBPROCESS)
        assert double.leader == double.node(0) == double.node("node-000")
        assert double.inventory == double.workdir / "inventory.yml" and double.inventory.exists()
        follower = double.node(1)
        assert requests.get(f"{follower.base_url}/v1/status/leader", timeout=TIMEOUT).ok
        assert double.stats()["agents"][follower.name]["requests"] >= 1
        double.reset_stats()
        assert double.stats()["total"]["requests"] == 0
        double.stop_agent(follower.name)
        assert not double.is_running(1)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{follower.base_url}/v1/status/leader", timeout=TIMEOUT)
        double.start_agent(follower.name)
        assert requests.get(f"{follower.base_url}/v1/status/leader", timeout=TIMEOUT).ok
        double.stop_agent(0)  # the leader's: sent through another agent's port
        assert not double.is_running("node-000") and double.is_running(1)
        double.start_agent(0)
        assert double.is_running(0)
        # A node's catalog address, as its agent advertises it, kept when the agent starts again.
        double.set_address(1, "10.213.0.2")
        double.stop_agent(1)
        double.start_agent(1)
        nodes = requests.get(f"{double.leader.base_url}/v1/catalog/nodes", timeout=TIMEOUT).json()
        assert {node["Node"]: node["Address"] for node in nodes} == {"node-000": "127.0.0.1", "node-001": "10.213.0.2"}
        with pytest.raises((ClusterError, ServeError), match="must be an IP address"):
            double.set_address(1, "node-001")
