"""Fixtures of the Consul conformance suite: sessions that clean up, a target with ACLs, gossip
without losses."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from consul_harness import ADDR_ENV, real_target_from_env

from devcluster.consul import CONSUL_GOSSIP


@pytest.fixture
def make_session(consul_target):
    """Create sessions (``make_session(agent=0, **body)`` -> ID); every one is destroyed afterwards."""
    created: list[tuple[int, str]] = []

    def make(agent: int = 0, **body) -> str:
        response = consul_target.http("PUT", "/v1/session/create", agent, json_body=body)
        assert response.status_code == 200, f"session create {body}: {response.status_code} {response.text}"
        session_id = response.json()["ID"]
        created.append((agent, session_id))
        return session_id

    yield make
    for agent, session_id in created:
        consul_target.http("PUT", f"/v1/session/destroy/{session_id}", agent)


@pytest.fixture(scope="session")
def acl_target(make_double):
    """A target that enforces ACLs: a 1-node double started with --acl-token, or the real agent
    when it refuses anonymous KV writes and FIREAP_TEST_CONSUL_HTTP_TOKEN is set."""
    real = real_target_from_env()
    if real is not None:
        try:
            if not real.token:
                pytest.skip(f"ACL tests against {ADDR_ENV} need FIREAP_TEST_CONSUL_HTTP_TOKEN")
            probe = f"fireap-test/{uuid.uuid4()}/acl-probe"
            if real.http("PUT", f"/v1/kv/{probe}", data=b"x", token=None).status_code == 200:
                real.http("DELETE", f"/v1/kv/{probe}")
                pytest.skip(f"the agent at {ADDR_ENV} accepts anonymous KV writes: ACLs are not enforced")
            yield real
        finally:
            real.close()
        return
    with make_double(nodes=1, acl_token=f"acl-{uuid.uuid4()}", name="devcluster-acl") as target:
        yield target


@pytest.fixture
def lossless_gossip(consul_target):
    """Consul's gossip on every agent of the double, late and reordered but without losses, for
    tests of which agents an event reaches (the API's filter rules, not delivery: in a small
    healthy LAN Serf's push/pull re-sends what a round missed); Consul's again afterwards. A real
    agent is left as it is."""
    double = consul_target.double
    if double is None:
        yield
        return
    for node in consul_target.node_names:
        double.set_gossip(node, replace(CONSUL_GOSSIP, loss=0.0))
    yield
    for node in consul_target.node_names:
        double.set_gossip(node, CONSUL_GOSSIP)
