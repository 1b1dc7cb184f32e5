"""KV store rules the project relies on.

Source: https://developer.hashicorp.com/consul/api-docs/kv (and, where noted, the session
concepts page https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions).
"""

from __future__ import annotations

import base64
import uuid

MAX_VALUE_SIZE = 512 * 1024  # "Values in the KV store cannot be larger than 512kb"


def test_put_then_get_returns_the_value_and_its_metadata(consul_target, kv_prefix):
    """PUT answers true; GET returns Key, base64 Value, Flags 0, LockIndex 0, CreateIndex/ModifyIndex."""
    key = kv_prefix + "round-trip"
    value = bytes(range(256))  # every byte value: the store is binary-safe
    put = consul_target.http("PUT", f"/v1/kv/{key}", data=value)
    assert put.status_code == 200
    assert put.json() is True

    got = consul_target.http("GET", f"/v1/kv/{key}")
    assert got.status_code == 200
    [entry] = got.json()
    assert entry["Key"] == key
    assert base64.b64decode(entry["Value"]) == value
    assert entry["Flags"] == 0
    assert entry["LockIndex"] == 0
    assert entry["CreateIndex"] == entry["ModifyIndex"] >= 1
    assert int(got.headers["X-Consul-Index"]) >= entry["ModifyIndex"]


def test_update_bumps_modify_index_and_keeps_create_index(consul_target, kv_prefix):
    """ModifyIndex is the last index that modified the key; CreateIndex stays."""
    kv = consul_target.client().kv
    key = kv_prefix + "update"
    kv.put(key, "one")
    _index, first = kv.get(key)
    kv.put(key, "two")
    _index, second = kv.get(key)
    assert second["Value"] == b"two"
    assert second["CreateIndex"] == first["CreateIndex"]
    assert second["ModifyIndex"] > first["ModifyIndex"]


def test_flags_are_stored_as_unsigned_64_bit(consul_target, kv_prefix):
    """flags: an unsigned value between 0 and (2^64)-1, returned as Flags."""
    kv = consul_target.client().kv
    for flags in (0, 42, 2**64 - 1):
        key = f"{kv_prefix}flags-{flags}"
        assert kv.put(key, "v", flags=flags) is True
        _index, entry = kv.get(key)
        assert entry["Flags"] == flags


def test_values_up_to_512_kib_are_accepted_and_larger_ones_refused(consul_target, kv_prefix):
    """Values cannot be larger than 512 KiB: a larger body is refused (413) and nothing is written."""
    fits = consul_target.http("PUT", f"/v1/kv/{kv_prefix}fits", data=b"x" * MAX_VALUE_SIZE)
    assert fits.status_code == 200
    assert fits.json() is True
    too_big = consul_target.http("PUT", f"/v1/kv/{kv_prefix}too-big", data=b"x" * (MAX_VALUE_SIZE + 1))
    assert too_big.status_code == 413
    assert consul_target.http("GET", f"/v1/kv/{kv_prefix}too-big").status_code == 404


def test_raw_returns_the_bare_value(consul_target, kv_prefix):
    """?raw: the response is just the raw value, without encoding or metadata."""
    key = kv_prefix + "raw"
    value = b'{"not": "decoded"}\x00\xff'
    consul_target.http("PUT", f"/v1/kv/{key}", data=value)
    got = consul_target.http("GET", f"/v1/kv/{key}", params={"raw": ""})
    assert got.status_code == 200
    assert got.content == value


def test_recurse_lists_the_prefix_and_indexes_its_latest_change(consul_target, kv_prefix):
    """?recurse treats the key as a prefix; X-Consul-Index is the latest ModifyIndex within it."""
    kv = consul_target.client().kv
    for name in ("a", "b/c", "b/d"):
        kv.put(kv_prefix + name, name)
    kv.put(kv_prefix.rstrip("/") + "-sibling", "outside the prefix")
    try:
        got = consul_target.http("GET", f"/v1/kv/{kv_prefix}", params={"recurse": ""})
        assert got.status_code == 200
        entries = got.json()
        assert sorted(e["Key"] for e in entries) == [kv_prefix + n for n in ("a", "b/c", "b/d")]
        assert int(got.headers["X-Consul-Index"]) == max(e["ModifyIndex"] for e in entries)
    finally:
        kv.delete(kv_prefix.rstrip("/") + "-sibling")


def test_keys_lists_names_and_separator_stops_at_it(consul_target, kv_prefix):
    """?keys returns key names only (implies recurse); ?separator lists only up to the separator."""
    kv = consul_target.client().kv
    for name in ("a", "b/c", "b/d/e"):
        kv.put(kv_prefix + name, "v")
    every = consul_target.http("GET", f"/v1/kv/{kv_prefix}", params={"keys": ""})
    assert every.status_code == 200
    assert sorted(every.json()) == [kv_prefix + n for n in ("a", "b/c", "b/d/e")]
    shallow = consul_target.http("GET", f"/v1/kv/{kv_prefix}", params={"keys": "", "separator": "/"})
    assert shallow.status_code == 200
    assert sorted(shallow.json()) == [kv_prefix + "a", kv_prefix + "b/"]


def test_missing_key_is_404_with_an_index(consul_target, kv_prefix):
    """A missing key answers 404; X-Consul-Index is still set (>= 1) so a client can block until it appears.
    Also https://developer.hashicorp.com/consul/api-docs/features/blocking"""
    got = consul_target.http("GET", f"/v1/kv/{kv_prefix}missing")
    assert got.status_code == 404
    assert int(got.headers["X-Consul-Index"]) >= 1


def test_cas_zero_creates_only_if_absent(consul_target, kv_prefix):
    """cas=0: Consul only puts the key if it does not already exist."""
    kv = consul_target.client().kv
    key = kv_prefix + "cas-zero"
    assert kv.put(key, "first", cas=0) is True
    assert kv.put(key, "second", cas=0) is False
    assert kv.get(key)[1]["Value"] == b"first"


def test_cas_with_a_stale_index_fails(consul_target, kv_prefix):
    """cas=N (non-zero): the key is only set if N matches its ModifyIndex."""
    kv = consul_target.client().kv
    key = kv_prefix + "cas-stale"
    kv.put(key, "v1")
    index = kv.get(key)[1]["ModifyIndex"]
    assert kv.put(key, "v2", cas=index) is True
    assert kv.put(key, "v3", cas=index) is False
    assert kv.get(key)[1]["Value"] == b"v2"


def test_cas_on_a_missing_key_with_nonzero_index_fails(consul_target, kv_prefix):
    """cas=N on a key that does not exist: no ModifyIndex can match, so nothing is written."""
    kv = consul_target.client().kv
    key = kv_prefix + "cas-missing"
    assert kv.put(key, "v", cas=12345) is False
    assert kv.get(key)[1] is None


def test_delete_with_cas_only_deletes_at_the_matching_index(consul_target, kv_prefix):
    """DELETE ?cas=N deletes only if N matches the key's ModifyIndex (a 0 index never deletes); it does
    not combine with ?recurse."""
    kv = consul_target.client().kv
    key = kv_prefix + "delete-cas"
    kv.put(key, "v1")
    stale = kv.get(key)[1]["ModifyIndex"]
    kv.put(key, "v2")
    current = kv.get(key)[1]["ModifyIndex"]
    for index in (stale, 0):  # unlike PUT, cas=0 never deletes
        refused = consul_target.http("DELETE", f"/v1/kv/{key}", params={"cas": index})
        assert refused.status_code == 200
        assert refused.json() is False, f"cas={index}"
        assert kv.get(key)[1]["Value"] == b"v2"
    combined = consul_target.http("DELETE", f"/v1/kv/{key}", params={"cas": current, "recurse": ""})
    assert combined.status_code == 400, "recurse and cas cannot be combined"
    accepted = consul_target.http("DELETE", f"/v1/kv/{key}", params={"cas": current})
    assert accepted.json() is True
    assert kv.get(key)[1] is None


def test_delete_recurse_removes_every_key_with_the_prefix(consul_target, kv_prefix):
    """DELETE ?recurse deletes all keys with the prefix (a plain string prefix: "dir" takes "dirt" too);
    without it only the exact key goes."""
    kv = consul_target.client().kv
    for name in ("dir/a", "dir/b/c", "dirt", "other"):
        kv.put(kv_prefix + name, "v")
    exact = consul_target.http("DELETE", f"/v1/kv/{kv_prefix}dir/a")
    assert exact.json() is True
    assert kv.get(kv_prefix + "dir/b/c")[1] is not None
    tree = consul_target.http("DELETE", f"/v1/kv/{kv_prefix}dir", params={"recurse": ""})
    assert tree.status_code == 200
    assert tree.json() is True
    assert kv.get(kv_prefix, keys=True)[1] == [kv_prefix + "other"]


def test_acquire_sets_session_and_increments_lock_index(consul_target, kv_prefix, make_session):
    """?acquire on a free key (which need not exist) sets Session and increments LockIndex."""
    kv = consul_target.client().kv
    key = kv_prefix + "lock"
    session = make_session()
    assert kv.put(key, "holder-1", acquire=session) is True
    _index, entry = kv.get(key)
    assert entry["Session"] == session
    assert entry["LockIndex"] == 1
    assert entry["Value"] == b"holder-1"


def test_reacquire_by_the_holder_updates_value_and_keeps_lock_index(consul_target, kv_prefix, make_session):
    """If the lock is already held by the given session, LockIndex is not incremented but the value is updated."""
    kv = consul_target.client().kv
    key = kv_prefix + "lock"
    session = make_session()
    kv.put(key, "first", acquire=session)
    assert kv.put(key, "second", acquire=session) is True
    _index, entry = kv.get(key)
    assert entry["LockIndex"] == 1
    assert entry["Session"] == session
    assert entry["Value"] == b"second"


def test_acquire_of_a_key_held_by_another_session_is_refused(consul_target, kv_prefix, make_session):
    """Acquire succeeds only if there is no existing lock holder."""
    kv = consul_target.client().kv
    key = kv_prefix + "lock"
    holder, other = make_session(), make_session()
    kv.put(key, "holder", acquire=holder)
    assert kv.put(key, "intruder", acquire=other) is False
    _index, entry = kv.get(key)
    assert entry["Session"] == holder
    assert entry["Value"] == b"holder"
    assert entry["LockIndex"] == 1


def test_release_needs_the_holder_and_keeps_lock_index(consul_target, kv_prefix, make_session):
    """?release by a non-holder fails; by the holder it clears Session, keeps LockIndex, bumps ModifyIndex.
    The next acquire increments LockIndex again. (Also the sessions concepts page.)"""
    kv = consul_target.client().kv
    key = kv_prefix + "lock"
    holder, other = make_session(), make_session()
    kv.put(key, "v", acquire=holder)
    held = kv.get(key)[1]
    assert kv.put(key, "v", release=other) is False
    assert kv.get(key)[1]["Session"] == holder
    assert kv.put(key, "v", release=holder) is True
    released = kv.get(key)[1]
    assert not released.get("Session")
    assert released["LockIndex"] == 1
    assert released["ModifyIndex"] > held["ModifyIndex"]
    assert kv.put(key, "v", acquire=other) is True
    assert kv.get(key)[1]["LockIndex"] == 2


def test_write_without_acquire_proceeds_on_a_locked_key(consul_target, kv_prefix, make_session):
    """An update that does not include ?acquire proceeds even if another session locked the key."""
    kv = consul_target.client().kv
    key = kv_prefix + "lock"
    holder = make_session()
    kv.put(key, "locked", acquire=holder)
    assert kv.put(key, "plain write") is True
    _index, entry = kv.get(key)
    assert entry["Value"] == b"plain write"
    assert entry["Session"] == holder


def test_acquire_with_an_unknown_session_is_an_error(consul_target, kv_prefix):
    """The session must exist (created before use): an unknown ID is an error, and nothing is written.
    Also https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions"""
    key = kv_prefix + "lock"
    response = consul_target.http("PUT", f"/v1/kv/{key}", params={"acquire": str(uuid.uuid4())}, data=b"v")
    assert response.status_code >= 400
    assert consul_target.http("GET", f"/v1/kv/{key}").status_code == 404


def test_cas_acquire_and_release_cannot_be_combined(consul_target, kv_prefix, make_session):
    """cas, acquire and release are separate operations: combining them is a 400 (Conflicting flags)."""
    session = make_session()
    key = kv_prefix + "conflict"
    for params in ({"cas": 0, "acquire": session}, {"acquire": session, "release": session}):
        response = consul_target.http("PUT", f"/v1/kv/{key}", params=params, data=b"v")
        assert response.status_code == 400, params
    assert consul_target.http("GET", f"/v1/kv/{key}").status_code == 404
