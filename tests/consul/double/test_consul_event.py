"""User-event rules the project relies on (FIREAP:TASK wakes every node's watch handler).

Source: https://developer.hashicorp.com/consul/api-docs/event; the filter semantics (unanchored
regexes matched by each receiving agent) and the list index are those of Consul's agent
(agent/user_event.go, agent/event_endpoint.go).
"""

from __future__ import annotations

import base64
import os
import re
import time
import uuid

import pytest
from consul_harness import event_index, in_background, unique_name

DELIVERY_TIMEOUT = 20.0

pytestmark = pytest.mark.usefixtures("lossless_gossip")


def _fire(target, name: str, payload: bytes = b"", agent: int = 0, **filters):
    return target.http("PUT", f"/v1/event/fire/{name}", agent, params=filters, data=payload)


def _listed(target, agent: int, name: str, event_id: str):
    """The agent's list of *name* events once it holds *event_id*; blocks on the list's index."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    params = {"name": name}
    while True:
        response = target.http("GET", "/v1/event/list", agent, params=params)
        assert response.status_code == 200, response.text
        if event_id in [e["ID"] for e in response.json()]:
            return response
        assert time.monotonic() < deadline, f"event {event_id} never reached agent {agent}"
        params = {"name": name, "index": response.headers["X-Consul-Index"], "wait": "2s"}


def _assert_reaches(target, expected: set[int], **filters) -> None:
    """Fire an event with *filters* from agent 0: exactly the agents in *expected* list it. Absence is
    checked once an unfiltered event fired afterwards has reached the other agents."""
    name = unique_name("event")
    filtered = _fire(target, name, b"filtered", **filters)
    assert filtered.status_code == 200, filtered.text
    filtered_id = filtered.json()["ID"]
    for agent in sorted(expected):
        _listed(target, agent, name, filtered_id)
    sentinel_id = _fire(target, name, b"sentinel").json()["ID"]
    for agent in sorted(set(range(len(target.agents))) - expected):
        listed = _listed(target, agent, name, sentinel_id).json()
        assert filtered_id not in [e["ID"] for e in listed], f"{filters} reached {target.node_names[agent]}"


def test_fire_returns_the_event(consul_target):
    """PUT /event/fire/:name answers ID, Name, base64 Payload, empty filters, Version 1 and LTime."""
    name = unique_name("event")
    response = _fire(consul_target, name, b'{"app":"web","version":"1.2.3"}')
    assert response.status_code == 200, response.text
    event = response.json()
    assert str(uuid.UUID(event["ID"])) == event["ID"]
    assert event["Name"] == name
    assert base64.b64decode(event["Payload"]) == b'{"app":"web","version":"1.2.3"}'
    assert (event["NodeFilter"], event["ServiceFilter"], event["TagFilter"]) == ("", "", "")
    assert event["Version"] == 1
    assert isinstance(event["LTime"], int)


def test_fire_without_a_body_has_a_null_payload(consul_target):
    """The body is the payload; with none, Payload is null."""
    response = _fire(consul_target, unique_name("event"))
    assert response.status_code == 200
    assert response.json()["Payload"] is None


def test_fire_without_a_name_is_refused(consul_target):
    """name is required: 400 Missing name."""
    response = consul_target.http("PUT", "/v1/event/fire/", data=b"x")
    assert response.status_code == 400
    assert "Missing name" in response.text


def test_tag_filter_without_service_filter_is_an_error(consul_target):
    """A tag filter must be provided with a service filter."""
    assert _fire(consul_target, unique_name("event"), tag="web").status_code >= 400


@pytest.mark.parametrize("field", ["node", "service"])
def test_invalid_filter_regex_is_an_error(consul_target, field):
    """Filters are regular expressions; one that does not compile is refused."""
    assert _fire(consul_target, unique_name("event"), **{field: "("}).status_code >= 400


def test_every_agent_lists_the_event_with_the_index_derived_from_its_id(consul_target):
    """Each agent lists the events it received; X-Consul-Index is derived from the newest matching
    event's UUID (XOR of its two 64-bit halves), not a Raft index."""
    name = unique_name("event")
    fired = _fire(consul_target, name, b"payload").json()
    for agent in range(len(consul_target.agents)):
        response = _listed(consul_target, agent, name, fired["ID"])
        [event] = response.json()
        assert event["Name"] == name
        assert base64.b64decode(event["Payload"]) == b"payload"
        assert event["Version"] == 1
        assert int(response.headers["X-Consul-Index"]) == event_index(fired["ID"])


def test_event_list_without_a_match_is_empty_with_index_1(consul_target):
    """No matching event: [] and index 1 (never 0, so watches do not spin)."""
    response = consul_target.http("GET", "/v1/event/list", params={"name": unique_name("event")})
    assert response.status_code == 200
    assert response.json() == []
    assert response.headers["X-Consul-Index"] == "1"


def test_event_list_blocks_only_while_the_index_equals_the_current_one(consul_target):
    """The event index is opaque and not ordered: ?index blocks only while it equals the current value;
    any other value answers at once; a new event wakes a blocked request."""
    name = unique_name("event")
    first = _fire(consul_target, name, b"1").json()
    current = str(event_index(first["ID"]))
    _listed(consul_target, 0, name, first["ID"])

    started = time.monotonic()
    timed_out = consul_target.http("GET", "/v1/event/list", params={"name": name, "index": current, "wait": "1s"})
    assert time.monotonic() - started >= 1.0
    assert timed_out.headers["X-Consul-Index"] == current

    other = str(int(current) ^ 1)
    at_once = consul_target.http(
        "GET", "/v1/event/list", params={"name": name, "index": other, "wait": "60s"}, timeout=DELIVERY_TIMEOUT
    )
    assert at_once.headers["X-Consul-Index"] == current

    pending = in_background(
        consul_target.http, "GET", "/v1/event/list", params={"name": name, "index": current, "wait": "60s"}, timeout=120
    )
    time.sleep(0.5)
    assert not pending.done(), "the blocking event list returned before a new event"
    second = _fire(consul_target, name, b"2").json()
    woken = pending.result(timeout=DELIVERY_TIMEOUT)
    assert woken.headers["X-Consul-Index"] == str(event_index(second["ID"]))
    assert [e["ID"] for e in woken.json()] == [first["ID"], second["ID"]]


def test_small_payload_is_delivered_and_oversized_payload_refused(consul_target):
    """A 60-byte payload arrives intact; a 1024-byte one is refused (Serf caps a user event at 512 bytes)."""
    name = unique_name("event")
    small = os.urandom(30).hex().encode()
    fired = _fire(consul_target, name, small)
    assert fired.status_code == 200
    [event] = _listed(consul_target, 0, name, fired.json()["ID"]).json()
    assert base64.b64decode(event["Payload"]) == small
    assert _fire(consul_target, unique_name("event"), b"x" * 1024).status_code >= 400


def test_node_filter_is_an_unanchored_regex(multi_agent_target):
    """node is a regular expression searched in each node name, not anchored: a common prefix of the
    names reaches every node; an anchored name reaches one."""
    names = multi_agent_target.node_names
    prefix = os.path.commonprefix(names)
    if not prefix:
        pytest.skip(f"the node names {names} share no prefix")
    _assert_reaches(multi_agent_target, set(range(len(names))), node=re.escape(prefix))
    _assert_reaches(multi_agent_target, {1}, node=f"^{re.escape(names[1])}$")


def test_service_and_tag_filters_are_unanchored_regexes(multi_agent_target):
    """service and tag filters match the receiving agent's local services and their tags, unanchored."""
    service = unique_name("svc")
    tag = unique_name("tag")
    registered = multi_agent_target.http(
        "PUT", "/v1/agent/service/register", 1, json_body={"Name": service, "ID": service, "Tags": [tag], "Port": 80}
    )
    assert registered.status_code == 200, registered.text
    try:
        service_part = service.rsplit("-", 1)[1]
        tag_part = tag.rsplit("-", 1)[1]
        _assert_reaches(multi_agent_target, {1}, service=service_part)
        _assert_reaches(multi_agent_target, {1}, service=service_part, tag=tag_part)
        _assert_reaches(multi_agent_target, set(), service=service_part, tag=f"^{tag_part}$")
    finally:
        multi_agent_target.http("PUT", f"/v1/agent/service/deregister/{service}", 1)
