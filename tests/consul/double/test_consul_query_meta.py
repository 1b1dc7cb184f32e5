"""Which answers carry Consul's query metadata headers, endpoint by endpoint, for every
endpoint the project's py-consul clients call.

A read answered from the servers' state goes through setMeta (hashicorp/consul agent/http.go):
X-Consul-Index (never 0), X-Consul-KnownLeader, X-Consul-LastContact,
X-Consul-Effective-Consistency and X-Consul-Query-Backend, also on a 404 (agent/kvs_endpoint.go
sets them before it answers "not found"). A read-only /v1/txn sets only KnownLeader and
LastContact (agent/txn_endpoint.go: "Since we don't do blocking"); /v1/event/list only its own
X-Consul-Index (agent/event_endpoint.go); writes, the agent's own endpoints and /v1/status
none of them.

Sources: https://developer.hashicorp.com/consul/api-docs/features/blocking,
https://developer.hashicorp.com/consul/api-docs/features/consistency, hashicorp/consul
agent/http.go (setMeta, setIndex), agent/kvs_endpoint.go, agent/session_endpoint.go,
agent/catalog_endpoint.go, agent/health_endpoint.go, agent/txn_endpoint.go,
agent/event_endpoint.go, agent/status_endpoint.go.
"""

from __future__ import annotations

import uuid

import pytest
from consul_harness import unique_name

META = ("X-Consul-Index", "X-Consul-Knownleader", "X-Consul-Lastcontact")


def _reads(target, prefix: str) -> list[tuple[str, int]]:
    """(path, expected status) of every read py-consul's clients send that goes through setMeta."""
    node = target.node_names[0]
    return [
        (f"/v1/kv/{prefix}missing", 404),
        (f"/v1/kv/{prefix}?recurse", 404),
        (f"/v1/kv/{prefix}?keys&separator=/", 404),
        (f"/v1/session/info/{uuid.uuid4()}", 200),
        ("/v1/session/list", 200),
        (f"/v1/session/node/{node}", 200),
        ("/v1/catalog/nodes", 200),
        ("/v1/catalog/services", 200),
        (f"/v1/catalog/service/{unique_name('service')}", 200),
        (f"/v1/catalog/node/{node}", 200),
        (f"/v1/health/node/{node}", 200),
        ("/v1/health/state/critical", 200),
        (f"/v1/health/checks/{unique_name('service')}", 200),
        (f"/v1/health/service/{unique_name('service')}", 200),
    ]


def test_reads_of_the_servers_state_carry_the_query_metadata(consul_target, kv_prefix):
    """setMeta: index >= 1, a known leader, the last contact (0 when the leader answered), the
    consistency mode and the blocking backend, on found and not-found answers alike."""
    for path, status in _reads(consul_target, kv_prefix):
        response = consul_target.http("GET", path)
        assert response.status_code == status, (path, response.text)
        headers = response.headers
        assert int(headers["X-Consul-Index"]) >= 1, path
        assert headers["X-Consul-Knownleader"] == "true", path
        assert int(headers["X-Consul-Lastcontact"]) >= 0, path
        assert headers["X-Consul-Effective-Consistency"] == "leader", path
        assert headers["X-Consul-Query-Backend"] == "blocking-query", path


@pytest.mark.parametrize("mode", ["stale", "consistent"])
def test_the_effective_consistency_is_the_mode_asked_for(consul_target, kv_prefix, mode):
    """?stale and ?consistent come back as X-Consul-Effective-Consistency."""
    response = consul_target.http("GET", f"/v1/kv/{kv_prefix}missing", params={mode: ""})
    assert response.status_code == 404
    assert response.headers["X-Consul-Effective-Consistency"] == mode


def test_a_read_only_txn_carries_leader_and_contact_but_no_index(consul_target, kv_prefix):
    """agent/txn_endpoint.go: a txn of reads only is served without Raft and cannot block, so it
    sets KnownLeader and LastContact only; a txn that writes sets none of them."""
    read = consul_target.http("PUT", "/v1/txn", json_body=[{"KV": {"Verb": "get-tree", "Key": kv_prefix}}])
    assert read.status_code == 200, read.text
    assert read.headers["X-Consul-Knownleader"] == "true"
    assert int(read.headers["X-Consul-Lastcontact"]) >= 0
    assert "X-Consul-Index" not in read.headers
    write = consul_target.http("PUT", "/v1/txn", json_body=[{"KV": {"Verb": "set", "Key": kv_prefix + "k", "Value": "eA=="}}])
    assert write.status_code == 200, write.text
    assert not [name for name in META if name in write.headers]


def test_the_event_list_carries_its_own_index_only(consul_target):
    """agent/event_endpoint.go: the list is the agent's memory; it sets X-Consul-Index (1 without
    a matching event) and nothing that speaks of the servers."""
    response = consul_target.http("GET", "/v1/event/list", params={"name": unique_name("event")})
    assert response.status_code == 200 and response.json() == []
    assert response.headers["X-Consul-Index"] == "1"
    assert "X-Consul-Knownleader" not in response.headers and "X-Consul-Query-Backend" not in response.headers


def test_writes_status_and_agent_answers_carry_no_query_metadata(consul_target, kv_prefix):
    """KV writes, event fires, session create/renew/destroy, /v1/status and /v1/agent answer without
    setMeta."""
    session = consul_target.http("PUT", "/v1/session/create", json_body={"TTL": "30s"})
    assert session.status_code == 200, session.text
    session_id = session.json()["ID"]
    calls = [
        ("PUT", f"/v1/kv/{kv_prefix}written"),
        ("DELETE", f"/v1/kv/{kv_prefix}written"),
        ("PUT", f"/v1/event/fire/{unique_name('event')}"),
        ("PUT", f"/v1/session/renew/{session_id}"),
        ("PUT", f"/v1/session/destroy/{session_id}"),
        ("GET", "/v1/status/leader"),
        ("GET", "/v1/status/peers"),
        ("GET", "/v1/agent/self"),
        ("GET", "/v1/agent/services"),
    ]
    for method, path in [("PUT", "/v1/session/create"), *calls]:
        response = session if path == "/v1/session/create" else consul_target.http(method, path)
        assert response.status_code == 200, (path, response.text)
        assert not [name for name in META if name in response.headers], (path, dict(response.headers))
