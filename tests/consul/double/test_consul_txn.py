"""Transaction rules the project relies on (the fire module writes plans in /v1/txn batches).

Source: https://developer.hashicorp.com/consul/api-docs/txn
"""

from __future__ import annotations

import base64

import pytest


@pytest.fixture
def max_txn_ops(consul_target):
    """The agent's operation limit: 64 before Consul 1.14, 128 from 1.14."""
    version = consul_target.http("GET", "/v1/agent/self").json()["Config"]["Version"]
    major, minor = (int(part) for part in version.split(".")[:2])
    return 128 if (major, minor) >= (1, 14) else 64


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _set(key: str, value: str) -> dict:
    return {"KV": {"Verb": "set", "Key": key, "Value": _b64(value)}}


def test_txn_applies_every_operation(consul_target, kv_prefix):
    """200 with one result per non-delete op; get returns the base64 Value, other verbs a null Value."""
    ops = [_set(kv_prefix + "a", "1"), _set(kv_prefix + "b", "2"), {"KV": {"Verb": "get", "Key": kv_prefix + "a"}}]
    response = consul_target.http("PUT", "/v1/txn", json_body=ops)
    assert response.status_code == 200, response.text
    body = response.json()
    assert not body.get("Errors")
    results = [r["KV"] for r in body["Results"]]
    assert [r["Key"] for r in results] == [kv_prefix + "a", kv_prefix + "b", kv_prefix + "a"]
    assert results[0]["Value"] is None
    assert base64.b64decode(results[2]["Value"]) == b"1"
    kv = consul_target.client().kv
    assert kv.get(kv_prefix + "b")[1]["Value"] == b"2"


def test_txn_failing_check_rolls_back_every_operation(consul_target, kv_prefix):
    """If any operation fails, none is applied: 409 with Errors naming the failed OpIndex."""
    kv = consul_target.client().kv
    kv.put(kv_prefix + "guard", "v")
    stale = kv.get(kv_prefix + "guard")[1]["ModifyIndex"] + 1000
    ops = [
        _set(kv_prefix + "a", "1"),
        {"KV": {"Verb": "delete", "Key": kv_prefix + "guard"}},
        {"KV": {"Verb": "check-index", "Key": kv_prefix + "guard", "Index": stale}},
    ]
    response = consul_target.http("PUT", "/v1/txn", json_body=ops)
    assert response.status_code == 409, response.text
    errors = response.json()["Errors"]
    assert [e["OpIndex"] for e in errors] == [2]
    assert errors[0]["What"]
    assert kv.get(kv_prefix + "a")[1] is None
    assert kv.get(kv_prefix + "guard")[1]["Value"] == b"v"


def test_txn_check_not_exists_and_cas_guard_writes(consul_target, kv_prefix):
    """check-not-exists fails on an existing key; cas fails on a stale index; both roll back."""
    kv = consul_target.client().kv
    kv.put(kv_prefix + "exists", "v")
    current = kv.get(kv_prefix + "exists")[1]["ModifyIndex"]
    refused = consul_target.http(
        "PUT",
        "/v1/txn",
        json_body=[_set(kv_prefix + "new", "x"), {"KV": {"Verb": "check-not-exists", "Key": kv_prefix + "exists"}}],
    )
    assert refused.status_code == 409
    assert [e["OpIndex"] for e in refused.json()["Errors"]] == [1]
    stale_cas = {"KV": {"Verb": "cas", "Key": kv_prefix + "exists", "Value": _b64("w"), "Index": current + 1000}}
    assert consul_target.http("PUT", "/v1/txn", json_body=[stale_cas]).status_code == 409
    fresh_cas = {"KV": {"Verb": "cas", "Key": kv_prefix + "exists", "Value": _b64("w"), "Index": current}}
    assert consul_target.http("PUT", "/v1/txn", json_body=[fresh_cas]).status_code == 200
    assert kv.get(kv_prefix + "new")[1] is None
    assert kv.get(kv_prefix + "exists")[1]["Value"] == b"w"


def test_txn_lock_check_session_and_unlock(consul_target, kv_prefix, make_session):
    """lock acquires with Session (LockIndex 1), check-session fails unless that session holds the key,
    unlock clears Session."""
    kv = consul_target.client().kv
    key = kv_prefix + "slot"
    holder, other = make_session(), make_session()
    lock = {"KV": {"Verb": "lock", "Key": key, "Value": _b64("puller"), "Session": holder}}
    locked = consul_target.http("PUT", "/v1/txn", json_body=[lock])
    assert locked.status_code == 200, locked.text
    assert locked.json()["Results"][0]["KV"]["LockIndex"] == 1
    assert kv.get(key)[1]["Session"] == holder

    def check(session):
        return {"KV": {"Verb": "check-session", "Key": key, "Session": session}}

    assert consul_target.http("PUT", "/v1/txn", json_body=[check(holder)]).status_code == 200
    refused = consul_target.http("PUT", "/v1/txn", json_body=[_set(kv_prefix + "side", "x"), check(other)])
    assert refused.status_code == 409
    assert [e["OpIndex"] for e in refused.json()["Errors"]] == [1]
    assert kv.get(kv_prefix + "side")[1] is None
    unlock = {"KV": {"Verb": "unlock", "Key": key, "Value": _b64("free"), "Session": holder}}
    assert consul_target.http("PUT", "/v1/txn", json_body=[unlock]).status_code == 200
    _index, entry = kv.get(key)
    assert not entry.get("Session")
    assert entry["LockIndex"] == 1


def test_txn_get_tree_and_delete_tree(consul_target, kv_prefix):
    """get-tree returns every key with the prefix; delete-tree removes them and adds no result entry."""
    kv = consul_target.client().kv
    for name in ("plan/a", "plan/b", "planet"):
        kv.put(kv_prefix + name, name)
    tree = consul_target.http("PUT", "/v1/txn", json_body=[{"KV": {"Verb": "get-tree", "Key": kv_prefix + "plan/"}}])
    assert tree.status_code == 200
    assert sorted(r["KV"]["Key"] for r in tree.json()["Results"]) == [kv_prefix + "plan/a", kv_prefix + "plan/b"]
    dropped = consul_target.http(
        "PUT", "/v1/txn", json_body=[{"KV": {"Verb": "delete-tree", "Key": kv_prefix + "plan/"}}]
    )
    assert dropped.status_code == 200
    assert not dropped.json().get("Results")
    assert kv.get(kv_prefix, keys=True)[1] == [kv_prefix + "planet"]


def test_txn_of_the_limits_operations_is_accepted(consul_target, kv_prefix, max_txn_ops):
    """Up to 128 operations (64 before 1.14) may be present in a single transaction."""
    ops = [_set(f"{kv_prefix}k{i:03d}", str(i)) for i in range(max_txn_ops)]
    response = consul_target.http("PUT", "/v1/txn", json_body=ops)
    assert response.status_code == 200, response.text
    keys = consul_target.client().kv.get(kv_prefix, keys=True)[1]
    assert len(keys) == max_txn_ops


def test_txn_over_the_limits_operations_is_refused(consul_target, kv_prefix, max_txn_ops):
    """More operations than the limit: the request is refused and nothing is written."""
    ops = [_set(f"{kv_prefix}k{i:03d}", str(i)) for i in range(max_txn_ops + 1)]
    response = consul_target.http("PUT", "/v1/txn", json_body=ops)
    assert response.status_code >= 400
    assert consul_target.client().kv.get(kv_prefix, keys=True)[1] is None
