"""Catalog, agent and status rules the project relies on (target resolution, node addresses).

Sources: https://developer.hashicorp.com/consul/api-docs/catalog,
https://developer.hashicorp.com/consul/api-docs/agent,
https://developer.hashicorp.com/consul/api-docs/agent/service and
https://developer.hashicorp.com/consul/api-docs/status
"""

from __future__ import annotations

import socket

import pytest
import requests
from consul_harness import unique_name

SYNC_TIMEOUT = "20s"  # catalog sync of a local registration is asynchronous (anti-entropy)


def _catalog_service(target, name: str, index=None, **params) -> tuple[str, list[dict]]:
    if index is not None:
        params.update(index=index, wait=SYNC_TIMEOUT)
    response = target.http("GET", f"/v1/catalog/service/{name}", params=params, timeout=60)
    assert response.status_code == 200, response.text
    return response.headers["X-Consul-Index"], response.json()


def _until_catalog(target, name: str, predicate) -> list[dict]:
    """Block on /v1/catalog/service/:name until *predicate(entries)* holds (at most 3 wake-ups)."""
    index, entries = _catalog_service(target, name)
    for _wakeup in range(3):
        if predicate(entries):
            return entries
        index, entries = _catalog_service(target, name, index)
    assert predicate(entries), f"catalog entries for {name}: {entries}"
    return entries


def test_catalog_nodes_lists_every_agent_with_its_address(consul_target):
    """GET /catalog/nodes: one entry per node with ID, Node, Address, Datacenter, TaggedAddresses, Meta."""
    response = consul_target.http("GET", "/v1/catalog/nodes")
    assert response.status_code == 200
    nodes = {n["Node"]: n for n in response.json()}
    for name in consul_target.node_names:
        node = nodes[name]
        assert node["Address"]
        assert node["Datacenter"]
        for field in ("ID", "TaggedAddresses", "Meta"):
            assert field in node


def test_agent_self_describes_the_agent(consul_target):
    """GET /agent/self: Config (Datacenter, NodeName, NodeID, Server, Version) and Member of this agent."""
    for agent, name in enumerate(consul_target.node_names):
        body = consul_target.http("GET", "/v1/agent/self", agent).json()
        config = body["Config"]
        assert config["NodeName"] == name
        for field in ("Datacenter", "NodeID", "Server", "Version"):
            assert field in config
        assert body["Member"]["Name"] == name
        assert body["Member"]["Addr"]


def test_agent_members_lists_every_node_alive(consul_target):
    """GET /agent/members: the LAN members seen by the agent; Status 1 means alive."""
    for agent in range(len(consul_target.agents)):
        members = {m["Name"]: m for m in consul_target.http("GET", "/v1/agent/members", agent).json()}
        for name in consul_target.node_names:
            assert members[name]["Status"] == 1
            assert members[name]["Addr"]


def test_service_registration_reaches_agent_services_and_catalog(consul_target):
    """A service registered on an agent is listed by /agent/services and, with its tags, address and port,
    by /catalog/service/:name (filtered by ?tag); deregistration removes it from both."""
    agent = len(consul_target.agents) - 1
    node = consul_target.node_names[agent]
    name = unique_name("svc")
    definition = {"Name": name, "ID": name, "Tags": ["primary", "v1"], "Address": "127.0.0.9", "Port": 8080}
    registered = consul_target.http("PUT", "/v1/agent/service/register", agent, json_body=definition)
    assert registered.status_code == 200, registered.text
    try:
        local = consul_target.http("GET", "/v1/agent/services", agent).json()
        assert local[name]["Service"] == name
        assert sorted(local[name]["Tags"]) == ["primary", "v1"]
        assert local[name]["Port"] == 8080

        [entry] = _until_catalog(consul_target, name, lambda entries: len(entries) == 1)
        assert entry["Node"] == node
        assert entry["ServiceName"] == name
        assert entry["ServiceID"] == name
        assert sorted(entry["ServiceTags"]) == ["primary", "v1"]
        assert entry["ServiceAddress"] == "127.0.0.9"
        assert entry["ServicePort"] == 8080
        assert entry["Address"]
        assert [e["Node"] for e in _catalog_service(consul_target, name, tag="primary")[1]] == [node]
        assert _catalog_service(consul_target, name, tag="absent")[1] == []
    finally:
        deregistered = consul_target.http("PUT", f"/v1/agent/service/deregister/{name}", agent)
    assert deregistered.status_code == 200
    assert name not in consul_target.http("GET", "/v1/agent/services", agent).json()
    _until_catalog(consul_target, name, lambda entries: entries == [])


def test_status_leader_and_peers(consul_target):
    """GET /status/leader: the Raft leader's address; GET /status/peers: the Raft peers, leader included."""
    leader = consul_target.http("GET", "/v1/status/leader").json()
    peers = consul_target.http("GET", "/v1/status/peers").json()
    assert isinstance(leader, str) and ":" in leader
    assert leader in peers


def test_answers_carry_consuls_headers_and_no_server_header(consul_target):
    """Consul's HTTP server (Go's net/http) sends no Server header; every answer carries Date
    and X-Consul-Default-Acl-Policy, blocking-capable reads their X-Consul-Index."""
    for method, path in (("GET", "/v1/status/leader"), ("GET", f"/v1/kv/{unique_name('missing')}")):
        response = consul_target.http(method, path)
        assert "Server" not in response.headers, (path, dict(response.headers))
        assert response.headers["Date"]
        assert response.headers["X-Consul-Default-Acl-Policy"] in ("allow", "deny")
    assert int(response.headers["X-Consul-Index"]) >= 1


@pytest.mark.double_only
def test_stats_count_each_request_and_every_byte_of_its_answer(consul_target):
    """/_devcluster/stats counts the agent's requests and the bytes of its answers as sent,
    headers aiohttp adds itself (Date, Content-Length) included."""
    endpoint = consul_target.agents[0]
    stats_url = f"{endpoint.base_url}/_devcluster/stats"
    assert requests.delete(stats_url, timeout=30).status_code == 200
    request = f"GET /v1/status/leader HTTP/1.1\r\nHost: {endpoint.host}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection((endpoint.host, endpoint.port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    counters = requests.get(stats_url, timeout=30).json()["agents"][endpoint.name]
    assert counters["requests"] == 1
    assert counters["routes"] == {"GET /v1/status/leader": 1}
    assert counters["bytes_in"] == len(request)
    assert counters["bytes_out"] == len(answer)
