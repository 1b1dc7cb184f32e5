"""Blocking-query and consistency rules the project relies on (waiting nodes block, never poll).

Sources: https://developer.hashicorp.com/consul/api-docs/features/blocking,
https://developer.hashicorp.com/consul/api-docs/features/consistency and
https://developer.hashicorp.com/consul/api-docs/kv
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
from consul_harness import in_background, unique_name

BLOCK_WAIT = "60s"  # far longer than any wake-up below: a return before it means a change was seen
SETTLE = 0.5  # time given to a blocking request to reach the agent before the test writes
WAKE_TIMEOUT = 20.0


def _blocking_get(target, path: str, index, **params):
    params = {"index": index, "wait": BLOCK_WAIT, **params}
    return in_background(target.http, "GET", path, params=params, timeout=120)


def _blocked_read(target, path: str, **params) -> tuple[int, concurrent.futures.Future]:
    """A blocking read of *path* at its current index, still waiting once it had time to reach the agent."""
    index = int(target.http("GET", path, params=params).headers["X-Consul-Index"])
    pending = _blocking_get(target, path, index, **params)
    time.sleep(SETTLE)
    assert not pending.done(), f"the blocking read of {path} returned before any change"
    return index, pending


def test_blocking_read_wakes_on_a_write(consul_target, kv_prefix):
    """A request with ?index hangs until the key changes, then returns the new value and a higher index."""
    kv = consul_target.client().kv
    key = kv_prefix + "watched"
    kv.put(key, "before")
    index, pending = _blocked_read(consul_target, f"/v1/kv/{key}")
    kv.put(key, "after")
    response = pending.result(timeout=WAKE_TIMEOUT)
    assert response.status_code == 200
    assert int(response.headers["X-Consul-Index"]) > index
    assert response.json()[0]["Value"] == "YWZ0ZXI="  # base64 of "after"


def test_blocking_read_of_a_missing_key_wakes_when_it_is_created(consul_target, kv_prefix):
    """The index of a 404 can be blocked on; the request returns once the key exists."""
    key = kv_prefix + "not-yet"
    missing = consul_target.http("GET", f"/v1/kv/{key}")
    assert missing.status_code == 404
    pending = _blocking_get(consul_target, f"/v1/kv/{key}", missing.headers["X-Consul-Index"])
    time.sleep(SETTLE)
    assert not pending.done(), "the blocking read of a missing key returned before it was created"
    consul_target.client().kv.put(key, "created")
    response = pending.result(timeout=WAKE_TIMEOUT)
    assert response.status_code == 200
    assert response.json()[0]["Key"] == key


def test_blocking_recurse_read_wakes_on_any_change_under_the_prefix(consul_target, kv_prefix, make_session):
    """A recurse query blocked on the prefix index wakes when any key within the prefix is updated
    (here: a lock release, as when a slot frees)."""
    kv = consul_target.client().kv
    session_id = make_session()
    kv.put(kv_prefix + "slots/0", "puller", acquire=session_id)
    kv.put(kv_prefix + "slots/1", "idle")
    index, pending = _blocked_read(consul_target, f"/v1/kv/{kv_prefix}slots/", recurse="")
    kv.put(kv_prefix + "slots/0", "puller", release=session_id)
    response = pending.result(timeout=WAKE_TIMEOUT)
    assert int(response.headers["X-Consul-Index"]) > index
    slot0 = next(e for e in response.json() if e["Key"] == kv_prefix + "slots/0")
    assert not slot0.get("Session")


def test_blocking_recurse_read_wakes_on_a_delete_under_the_prefix(consul_target, kv_prefix):
    """A delete within the prefix is an update too: the blocked prefix query returns, without the key
    and with an index that did not go backwards."""
    kv = consul_target.client().kv
    kv.put(kv_prefix + "keep", "v")
    kv.put(kv_prefix + "drop", "v")
    index, pending = _blocked_read(consul_target, f"/v1/kv/{kv_prefix}", recurse="")
    kv.delete(kv_prefix + "drop")
    response = pending.result(timeout=WAKE_TIMEOUT)
    assert [e["Key"] for e in response.json()] == [kv_prefix + "keep"]
    assert int(response.headers["X-Consul-Index"]) > index


def test_blocking_read_times_out_with_the_same_index(consul_target, kv_prefix):
    """Without a change the request returns after ``wait`` with the same index: a return is no proof of change."""
    kv = consul_target.client().kv
    key = kv_prefix + "quiet"
    kv.put(key, "v")
    index = consul_target.http("GET", f"/v1/kv/{key}").headers["X-Consul-Index"]
    started = time.monotonic()
    response = consul_target.http("GET", f"/v1/kv/{key}", params={"index": index, "wait": "1s"})
    assert time.monotonic() - started >= 1.0
    assert response.status_code == 200
    assert response.headers["X-Consul-Index"] == index


@pytest.mark.parametrize(
    "path, params",
    [
        ("/v1/kv/{prefix}missing", {}),
        ("/v1/kv/{prefix}", {"recurse": ""}),
        ("/v1/kv/{prefix}", {"keys": ""}),
        ("/v1/catalog/nodes", {}),
        ("/v1/catalog/service/{name}", {}),
        ("/v1/session/list", {}),
        ("/v1/session/info/{uuid}", {}),
        ("/v1/event/list", {"name": "{name}"}),
    ],
)
def test_index_is_never_zero(consul_target, kv_prefix, path, params):
    """X-Consul-Index is always greater than zero, even for empty or missing results
    (a client blocking on 0 would spin). Also https://developer.hashicorp.com/consul/api-docs/event"""
    values = {"prefix": kv_prefix, "name": unique_name(), "uuid": "00000000-0000-0000-0000-000000000000"}
    response = consul_target.http(
        "GET", path.format(**values), params={k: v.format(**values) for k, v in params.items()}
    )
    assert response.status_code in (200, 404)
    assert int(response.headers["X-Consul-Index"]) >= 1


def test_consistent_read_sees_the_last_write_and_reports_the_leader(consul_target, kv_prefix):
    """?consistent is strongly consistent; reads carry X-Consul-KnownLeader and X-Consul-LastContact;
    ?stale is accepted too."""
    kv = consul_target.client().kv
    key = kv_prefix + "consistent"
    for value in ("1", "2", "3"):
        kv.put(key, value)
        response = consul_target.http("GET", f"/v1/kv/{key}", params={"consistent": "", "raw": ""})
        assert response.status_code == 200
        assert response.text == value
        assert response.headers["X-Consul-KnownLeader"] == "true"
        assert int(response.headers["X-Consul-LastContact"]) >= 0
    stale = consul_target.http("GET", f"/v1/kv/{key}", params={"stale": "", "raw": ""})
    assert stale.status_code == 200
