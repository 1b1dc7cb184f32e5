"""Session rules the project relies on (slots and the fire lock are keys acquired with sessions).

Sources: https://developer.hashicorp.com/consul/api-docs/session and the session concepts page
https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions
"""

from __future__ import annotations

import time
import uuid

import pytest
from devcluster.polling import wait_until

NS = 1_000_000_000  # LockDelay is reported in nanoseconds


def _session_info(target, session_id: str, agent: int = 0) -> list[dict]:
    response = target.http("GET", f"/v1/session/info/{session_id}", agent)
    assert response.status_code == 200, response.text
    return response.json()


def _refused_create(target, body: dict) -> int:
    """Status of a session create that must fail; a session created by mistake is destroyed."""
    response = target.http("PUT", "/v1/session/create", json_body=body)
    if response.status_code == 200:
        target.http("PUT", f"/v1/session/destroy/{response.json()['ID']}")
    return response.status_code


def test_create_defaults_to_the_agents_node_serf_health_15s_lock_delay_and_release(consul_target, make_session):
    """Node defaults to the agent's node; LockDelay 15s; Behavior release; no TTL; check serfHealth."""
    for agent, node_name in enumerate(consul_target.node_names):
        session_id = make_session(agent)
        [info] = _session_info(consul_target, session_id, agent)
        assert info["ID"] == session_id
        assert info["Node"] == node_name
        assert info["LockDelay"] == 15 * NS
        assert info["Behavior"] == "release"
        assert not info.get("TTL")
        assert "serfHealth" in (info.get("NodeChecks") or info.get("Checks") or [])
        assert info["CreateIndex"] >= 1


@pytest.mark.parametrize("ttl", ["10s", "86400s"])
def test_ttl_at_the_bounds_is_accepted(consul_target, make_session, ttl):
    """TTL must be between 10s and 86400s (inclusive)."""
    [info] = _session_info(consul_target, make_session(TTL=ttl))
    assert info["TTL"] == ttl


@pytest.mark.parametrize("ttl", ["9s", "86401s"])
def test_ttl_outside_the_bounds_is_an_error(consul_target, ttl):
    """TTL must be between 10s and 86400s."""
    assert _refused_create(consul_target, {"TTL": ttl}) >= 400


def test_invalid_behavior_is_an_error(consul_target):
    """Behavior is release or delete; anything else is refused."""
    assert _refused_create(consul_target, {"Behavior": "explode"}) >= 400


def test_unknown_node_is_an_error(consul_target):
    """Node must refer to a node that is already registered."""
    assert _refused_create(consul_target, {"Node": f"fireap-test-no-such-node-{uuid.uuid4().hex}"}) >= 400


def test_explicit_serf_health_check_or_no_check_is_accepted(consul_target, make_session):
    """Checks (NodeChecks since 1.7) lists node checks to bind; serfHealth is the default one; an empty
    list binds none."""
    [bound] = _session_info(consul_target, make_session(Checks=["serfHealth"]))
    assert "serfHealth" in (bound.get("NodeChecks") or bound.get("Checks") or [])
    [unbound] = _session_info(consul_target, make_session(Checks=[]))
    assert not unbound.get("NodeChecks") and not unbound.get("Checks")


def test_unknown_check_is_an_error(consul_target):
    """A session can only bind checks registered on its node."""
    assert _refused_create(consul_target, {"Checks": ["serfHealth", "fireap-test-no-such-check"]}) >= 400


def test_renew_info_list_node_and_destroy(consul_target, make_session):
    """renew returns [session] (404 once gone); info, list and node list it; destroy is idempotent;
    info of a destroyed session is []."""
    session_id = make_session(Name="fireap-test-session", TTL="30s")
    node = consul_target.node_names[0]

    renewed = consul_target.http("PUT", f"/v1/session/renew/{session_id}")
    assert renewed.status_code == 200
    assert [s["ID"] for s in renewed.json()] == [session_id]
    [info] = _session_info(consul_target, session_id)
    assert info["Name"] == "fireap-test-session"
    listed = consul_target.http("GET", "/v1/session/list")
    assert session_id in [s["ID"] for s in listed.json()]
    on_node = consul_target.http("GET", f"/v1/session/node/{node}")
    assert session_id in [s["ID"] for s in on_node.json()]

    destroyed = consul_target.http("PUT", f"/v1/session/destroy/{session_id}")
    assert destroyed.status_code == 200
    assert destroyed.json() is True
    assert _session_info(consul_target, session_id) == []
    assert session_id not in [s["ID"] for s in consul_target.http("GET", "/v1/session/list").json()]
    assert consul_target.http("PUT", f"/v1/session/renew/{session_id}").status_code == 404
    assert consul_target.http("PUT", f"/v1/session/destroy/{session_id}").status_code == 200


def test_invalidation_with_release_behavior_releases_held_keys(consul_target, kv_prefix, make_session):
    """release behavior: held locks are released, ModifyIndex is incremented, LockIndex is unchanged."""
    kv = consul_target.client().kv
    key = kv_prefix + "held"
    session_id = make_session(LockDelay="0s")
    kv.put(key, "value", acquire=session_id)
    held = kv.get(key)[1]
    consul_target.http("PUT", f"/v1/session/destroy/{session_id}")
    released = kv.get(key)[1]
    assert not released.get("Session")
    assert released["LockIndex"] == held["LockIndex"] == 1
    assert released["ModifyIndex"] > held["ModifyIndex"]
    assert released["Value"] == b"value"


def test_invalidation_with_delete_behavior_deletes_held_keys(consul_target, kv_prefix, make_session):
    """delete behavior: the keys of held locks are deleted; other keys stay."""
    kv = consul_target.client().kv
    session_id = make_session(Behavior="delete", LockDelay="0s")
    kv.put(kv_prefix + "held-1", "v", acquire=session_id)
    kv.put(kv_prefix + "held-2", "v", acquire=session_id)
    kv.put(kv_prefix + "free", "v")
    consul_target.http("PUT", f"/v1/session/destroy/{session_id}")
    assert kv.get(kv_prefix, keys=True)[1] == [kv_prefix + "free"]


def test_lock_delay_after_invalidation_refuses_acquire_until_it_passes(consul_target, kv_prefix, make_session):
    """After invalidation, previously held locks cannot be re-acquired for the lock-delay interval."""
    kv = consul_target.client().kv
    key = kv_prefix + "delayed"
    lock_delay = 5.0
    holder, next_holder = make_session(LockDelay=f"{lock_delay:.0f}s"), make_session(LockDelay="0s")
    kv.put(key, "holder", acquire=holder)
    invalidated_no_earlier_than = time.monotonic()
    consul_target.http("PUT", f"/v1/session/destroy/{holder}")
    assert kv.put(key, "next", acquire=next_holder) is False
    wait_until(lambda: kv.put(key, "next", acquire=next_holder), lock_delay + 30, "acquire after the lock-delay")
    assert time.monotonic() - invalidated_no_earlier_than >= lock_delay
    assert kv.get(key)[1]["Session"] == next_holder


def test_explicit_release_does_not_arm_lock_delay(consul_target, kv_prefix, make_session):
    """Lock-delay applies on session invalidation only: after ?release another session acquires at once."""
    kv = consul_target.client().kv
    key = kv_prefix + "released"
    holder, next_holder = make_session(LockDelay="60s"), make_session()
    kv.put(key, "holder", acquire=holder)
    assert kv.put(key, "holder", release=holder) is True
    assert kv.put(key, "next", acquire=next_holder) is True


def test_zero_lock_delay_lets_another_session_acquire_at_once(consul_target, kv_prefix, make_session):
    """A zero lock-delay disables the mechanism (what the project's slot sessions use)."""
    kv = consul_target.client().kv
    key = kv_prefix + "no-delay"
    holder, next_holder = make_session(LockDelay="0s"), make_session()
    [info] = _session_info(consul_target, holder)
    assert info["LockDelay"] == 0
    kv.put(key, "holder", acquire=holder)
    consul_target.http("PUT", f"/v1/session/destroy/{holder}")
    assert kv.put(key, "next", acquire=next_holder) is True


def test_ttl_expiry_invalidates_the_session_between_ttl_and_twice_ttl(consul_target, kv_prefix, make_session):
    """Without renew, a TTL session is invalidated no earlier than the TTL and may take up to twice it;
    its locks are then released."""
    kv = consul_target.client().kv
    key = kv_prefix + "ttl"
    ttl = 10.0
    created_no_earlier_than = time.monotonic()
    session_id = make_session(TTL=f"{ttl:.0f}s", LockDelay="0s")
    kv.put(key, "v", acquire=session_id)
    index, entry = kv.get(key)
    deadline = created_no_earlier_than + 2 * ttl + 15
    while entry.get("Session") == session_id:
        assert time.monotonic() < deadline, "the TTL session was not invalidated within 2 x TTL + 15 s"
        index, entry = kv.get(key, index=index, wait="5s")
    assert time.monotonic() - created_no_earlier_than >= ttl
    assert _session_info(consul_target, session_id) == []


def test_a_well_formed_unknown_session_id_is_empty_or_not_found_never_an_error(consul_target):
    """agent/session_endpoint.go: info of an unknown ID answers [] (with the sessions index), renew
    404 "Session id '<id>' not found", destroy true; the sessions of an unknown node are []. Only
    an ID that is not a UUID fails the lookup (500)."""
    unknown = str(uuid.uuid4())
    info = consul_target.http("GET", f"/v1/session/info/{unknown}")
    assert info.status_code == 200 and info.json() == []
    assert int(info.headers["X-Consul-Index"]) >= 1
    renew = consul_target.http("PUT", f"/v1/session/renew/{unknown}")
    assert renew.status_code == 404 and renew.text == f"Session id '{unknown}' not found"
    destroy = consul_target.http("PUT", f"/v1/session/destroy/{unknown}")
    assert destroy.status_code == 200 and destroy.json() is True
    node = consul_target.http("GET", f"/v1/session/node/fireap-test-{uuid.uuid4().hex}")
    assert node.status_code == 200 and node.json() == []
    assert consul_target.http("GET", "/v1/session/info/not-a-uuid").status_code == 500
