"""Durability: KV state is Raft state, kept across a restart of the servers, with its indexes.

Source: https://developer.hashicorp.com/consul/docs/architecture/consensus (writes are committed to
the Raft log before they are acknowledged) and https://developer.hashicorp.com/consul/api-docs/kv
(indexes). Double only: it restarts the cluster from its --data-dir.
"""

from __future__ import annotations

import base64

import pytest

from devcluster.consul import ServeProcess

PREFIX = "fireap-test/persistence/"


def _snapshot(target) -> tuple[int, list[dict]]:
    response = target.http("GET", f"/v1/kv/{PREFIX}", params={"recurse": ""})
    assert response.status_code == 200, response.text
    return int(response.headers["X-Consul-Index"]), sorted(response.json(), key=lambda e: e["Key"])


def _write_state(target) -> None:
    kv = target.client().kv
    assert kv.put(PREFIX + "plain", "v1", flags=7) is True
    assert kv.put(PREFIX + "plain", "v2", cas=kv.get(PREFIX + "plain")[1]["ModifyIndex"]) is True
    assert kv.put(PREFIX + "deleted", "gone") is True
    assert kv.delete(PREFIX + "deleted") is True
    txn = [
        {"KV": {"Verb": "set", "Key": PREFIX + "txn/a", "Value": base64.b64encode(b"a").decode()}},
        {"KV": {"Verb": "set", "Key": PREFIX + "txn/b", "Value": base64.b64encode(b"b").decode()}},
    ]
    assert target.http("PUT", "/v1/txn", json_body=txn).status_code == 200


def _restart_keeps_state(make_double, tmp_path, end) -> None:
    data_dir = tmp_path / "data"
    with make_double(nodes=1, data_dir=data_dir, workdir=tmp_path / "run-1") as target:
        try:
            _write_state(target)
            index_before, entries_before = _snapshot(target)
        finally:
            end(target.double)
    with make_double(nodes=1, data_dir=data_dir, workdir=tmp_path / "run-2") as target:
        index_after, entries_after = _snapshot(target)
        assert entries_after == entries_before
        assert index_after == index_before
        assert [e["Key"] for e in entries_after] == [PREFIX + k for k in ("plain", "txn/a", "txn/b")]
        kv = target.client().kv
        assert kv.put(PREFIX + "next", "v") is True
        assert kv.get(PREFIX + "next")[1]["ModifyIndex"] > index_before


@pytest.mark.double_only
def test_kv_state_survives_a_sigterm_restart(make_double, tmp_path):
    """After a clean stop (SIGTERM) and a start from the same data dir, keys, values, flags and
    indexes are unchanged and new writes get higher indexes."""
    _restart_keeps_state(make_double, tmp_path, ServeProcess.stop)


@pytest.mark.double_only
def test_acknowledged_writes_survive_a_sigkill_restart(make_double, tmp_path):
    """A write is acknowledged only once durable: after SIGKILL nothing acknowledged is lost."""
    _restart_keeps_state(make_double, tmp_path, ServeProcess.kill)
