"""The KV schema: key names, name/prefix validation, record round trips, malformed records."""

from __future__ import annotations

import base64
import json

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    AppAdvert,
    DEFAULT_PREFIX,
    KVRecordError,
    LockRecord,
    NodeState,
    PlanEntry,
    ReleaseArtifact,
    ReleaseFilters,
    ReleaseRecord,
    Schema,
    SwarmRun,
    check_name,
    check_prefix,
    txn_set_batches,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import ERROR_MAX_LENGTH

RELEASE = ReleaseRecord(
    app="web",
    version="2024.1-rc1",
    run_id="run-1",
    fanout=3,
    leader="node-0",
    target_count=10,
    fired_at=1700000000.5,
    filters=ReleaseFilters(node="^web", service="nginx", tag="blue"),
)
LOCK = LockRecord(run_id="run-1", holder="controller.example.com", since=1700000000.25)
PLAN = PlanEntry(run_id="run-1", source="node-0", stage=2, slot=1, after="node-2", source_address="10.1.2.3")
STATES = [
    NodeState(version="v1", run_id="run-1", status="done", started=1.0, depth=0, finished=1.0),
    NodeState(version="v1", run_id="run-1", status="waiting", started=2.0),
    NodeState(version="v1", run_id="run-1", status="pulling", started=2.0, source="node-0", depth=1),
    NodeState(version="v1", run_id="run-1", status="done", started=2.0, source="node-0", depth=1, finished=3.5),
    NodeState(version="v1", run_id="run-1", status="failed", started=2.0, source="node-0", depth=1, finished=3.5, error="rsync: 23"),
    NodeState(version="v1", run_id="run-1", status="failed", started=2.0, finished=9.0, error="timed out"),
]


def test_default_schema_names_every_key():
    schema = Schema()
    assert schema.prefix == DEFAULT_PREFIX == "fireap/"
    assert schema.app_prefix("web") == "fireap/web/"
    assert schema.release("web") == "fireap/web/release"
    assert schema.lock("web") == "fireap/web/lock"
    assert schema.plans_prefix("web") == "fireap/web/plan/"
    assert schema.plan_prefix("web", "run-1") == "fireap/web/plan/run-1/"
    assert schema.plan("web", "run-1", "n1") == "fireap/web/plan/run-1/n1"
    assert schema.nodes_prefix("web") == "fireap/web/nodes/"
    assert schema.node("web", "n1") == "fireap/web/nodes/n1"
    assert schema.slots_prefix("web", "n1") == "fireap/web/slots/n1/"
    assert schema.slot("web", "n1", 4) == "fireap/web/slots/n1/4"


def test_custom_prefix_and_node_name_parsing():
    schema = Schema("ops/fireap-2/")
    assert schema.node("my.app_1", "host-1.example.com") == "ops/fireap-2/my.app_1/nodes/host-1.example.com"
    assert schema.node_name("my.app_1", "ops/fireap-2/my.app_1/nodes/host-1") == "host-1"
    assert schema.node_name("my.app_1", "ops/fireap-2/my.app_1/plan/run-7/host-2") == "host-2"
    for key in ("ops/fireap-2/other/nodes/host-1", "ops/fireap-2/my.app_1/plan/host-2"):
        with pytest.raises(ValueError, match="neither under"):
            schema.node_name("my.app_1", key)
    for key in ("ops/fireap-2/my.app_1/nodes/a/b", "ops/fireap-2/my.app_1/plan/run-7/a/b"):
        with pytest.raises(ValueError, match="node name"):
            schema.node_name("my.app_1", key)


@pytest.mark.parametrize("prefix", ["", "/fireap/", "fireap", "a//b/", "a/../b/", "./", "fi re/", "ü/", None, 3])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(ValueError, match="prefix"):
        check_prefix(prefix)
    with pytest.raises(ValueError):
        Schema(prefix)


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", ".", "a b", "a\nb", "é", None, 5])
def test_bad_app_and_node_names_are_refused(name):
    with pytest.raises(ValueError, match="app name"):
        Schema().release(name)
    with pytest.raises(ValueError, match="node name"):
        Schema().node("web", name)


def test_slot_numbers_must_be_non_negative_integers():
    for bad in (-1, "0", 1.0, True):
        with pytest.raises(ValueError, match="slot number"):
            Schema().slot("web", "n1", bad)


def test_check_name_accepts_the_allowed_alphabet():
    assert check_name("Az09_.-x", "node") == "Az09_.-x"


@pytest.mark.parametrize("record", [RELEASE, LOCK, PLAN, *STATES], ids=lambda r: type(r).__name__)
def test_records_round_trip_through_json_text_and_bytes(record):
    text = record.to_json()
    assert isinstance(json.loads(text), dict)
    assert type(record).from_json(text) == record
    assert type(record).from_json(text.encode("utf-8"), "fireap/x") == record


def test_release_defaults_and_flags():
    record = ReleaseRecord(app="a", version="1", run_id="r", fanout=1, leader="l", target_count=1, fired_at=0)
    assert record.status == "running" and not record.aborted
    assert record.filters == ReleaseFilters()
    aborted = ReleaseRecord.from_json(json.dumps({**record.to_dict(), "status": "aborted", "aborted_reason": "x"}))
    assert aborted.aborted and aborted.aborted_reason == "x"


def test_unknown_fields_are_ignored_for_newer_writers():
    data = {**PLAN.to_dict(), "future_field": [1, 2]}
    assert PlanEntry.from_json(json.dumps(data)) == PLAN
    # An entry of an older writer has no address: the puller looks it up.
    older = {name: value for name, value in PLAN.to_dict().items() if name != "source_address"}
    assert PlanEntry.from_json(json.dumps(older)).source_address is None


def test_has_means_done_at_that_exact_version():
    done = STATES[3]
    assert done.has("v1") and done.terminal
    assert not done.has("v1.0") and not done.has("v2")
    assert not STATES[2].has("v1")  # pulling
    assert not STATES[4].has("v1")  # failed
    assert not STATES[1].terminal


KEY = "fireap/web/nodes/n1"
GOOD_STATE = STATES[3].to_dict()


@pytest.mark.parametrize(
    "value, reason",
    [
        (None, "empty value"),
        (b"\xff\xfe", "not UTF-8"),
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ("null", "expected a JSON object, got NoneType"),
        ({**GOOD_STATE, "status": "finished"}, "field 'status' must be one of waiting, pulling, done, failed"),
        ({k: v for k, v in GOOD_STATE.items() if k != "version"}, "missing field 'version'"),
        ({**GOOD_STATE, "version": ""}, "field 'version': version must be a non-empty string, got ''"),
        ({**GOOD_STATE, "version": 2}, "field 'version': version must be a non-empty string, got 2"),
        ({**GOOD_STATE, "depth": True}, "field 'depth': depth must be an integer from 0 to 100000, got True"),
        ({**GOOD_STATE, "depth": "1"}, "field 'depth': depth must be an integer from 0 to 100000, got '1'"),
        ({**GOOD_STATE, "started": "now"}, "field 'started': started must be a number of epoch seconds, got 'now'"),
        ({**GOOD_STATE, "source": "a/b"}, "source name 'a/b'"),
        ({**GOOD_STATE, "source": None, "depth": 2}, "depth 2 without a source"),
        ({**GOOD_STATE, "depth": 0}, "requires a depth >= 1"),
        ({**GOOD_STATE, "finished": None}, "status 'done' requires 'finished'"),
        ({**GOOD_STATE, "status": "pulling"}, "status 'pulling' must not have 'finished'"),
        ({**GOOD_STATE, "status": "failed"}, "status 'failed' requires an 'error'"),
        ({**GOOD_STATE, "source": None, "depth": None}, "status 'done' requires a depth"),
        ({"version": "1", "run_id": "r", "status": "pulling", "started": 1}, "status 'pulling' requires a source"),
    ],
)
def test_malformed_node_state_names_the_key_and_the_problem(value, reason):
    raw = value if value is None or isinstance(value, (str, bytes)) else json.dumps(value)
    with pytest.raises(KVRecordError) as info:
        NodeState.from_json(raw, KEY)
    assert info.value.key == KEY
    assert reason in str(info.value)
    assert str(info.value).startswith(f"malformed KV key '{KEY}': ")


@pytest.mark.parametrize(
    "cls, data, reason",
    [
        (ReleaseRecord, {**RELEASE.to_dict(), "fanout": 0}, "field 'fanout': fanout must be an integer from 1 to 64, got 0"),
        (ReleaseRecord, {**RELEASE.to_dict(), "target_count": 2.5},
         "field 'target_count': target_count must be an integer from 1 to 100000, got 2.5"),
        (ReleaseRecord, {**RELEASE.to_dict(), "status": "paused"}, "field 'status' must be one of running, aborted"),
        (ReleaseRecord, {**RELEASE.to_dict(), "app": "../etc"}, "app name '../etc'"),
        (ReleaseRecord, {**RELEASE.to_dict(), "filters": ["node"]}, "field 'filters' must be an object"),
        (ReleaseRecord, {**RELEASE.to_dict(), "filters": {"node": 1}}, "field 'node': node must be a string, got 1"),
        (ReleaseRecord, {**RELEASE.to_dict(), "filters": {"tag": "blue"}}, "filter 'tag' requires filter 'service'"),
        (LockRecord, {"run_id": "r", "holder": "h"}, "missing field 'since'"),
        (PlanEntry, {**PLAN.to_dict(), "stage": 0}, "field 'stage': stage must be an integer from 1 to 64, got 0"),
        (PlanEntry, {**PLAN.to_dict(), "slot": -1}, "field 'slot': slot must be an integer from 0 to 63, got -1"),
        (PlanEntry, {**PLAN.to_dict(), "after": "x y"}, "after name 'x y'"),
        (PlanEntry, {**PLAN.to_dict(), "source_address": 5},
         "field 'source_address': address must be a non-empty string, got 5"),
    ],
)
def test_malformed_records_name_the_key_and_the_problem(cls, data, reason):
    with pytest.raises(KVRecordError) as info:
        cls.from_json(json.dumps(data), "fireap/web/some-key")
    assert info.value.key == "fireap/web/some-key"
    assert reason in str(info.value)


def test_records_built_in_code_are_validated_like_records_read():
    with pytest.raises(KVRecordError, match="status 'done' requires a depth"):
        NodeState(version="1", run_id="r", status="done", started=1.0, finished=2.0)
    with pytest.raises(KVRecordError, match="field 'fanout': fanout must be an integer from 1 to 64, got 0"):
        ReleaseRecord(app="a", version="1", run_id="r", fanout=0, leader="l", target_count=1, fired_at=0)
    with pytest.raises(KVRecordError, match="filters must be a ReleaseFilters"):
        ReleaseRecord(app="a", version="1", run_id="r", fanout=1, leader="l", target_count=1, fired_at=0, filters={})
    with pytest.raises(KVRecordError, match="'tag' requires filter 'service'"):
        ReleaseFilters(tag="blue")
    with pytest.raises(KVRecordError, match="source name must be a non-empty string"):
        PlanEntry(run_id="r", source="", stage=1, slot=0)
    with pytest.raises(KVRecordError, match="missing field 'holder'"):
        LockRecord(run_id="r", holder=None, since=1.0)


def test_txn_batches_split_sets_and_encode_values():
    items = [(f"fireap/web/plan/n{i}", f"value-{i}") for i in range(130)]
    batches = txn_set_batches(items)
    assert [len(batch) for batch in batches] == [64, 64, 2]
    ops = [op["KV"] for batch in batches for op in batch]
    assert [op["Key"] for op in ops] == [key for key, _value in items]
    assert all(op["Verb"] == "set" for op in ops)
    assert base64.b64decode(ops[129]["Value"]) == b"value-129"
    assert txn_set_batches([("k", b"\x00\xff")], max_ops=1) == [
        [{"KV": {"Verb": "set", "Key": "k", "Value": "AP8="}}]
    ]
    assert txn_set_batches([]) == []


@pytest.mark.parametrize(
    "items, max_ops, message",
    [
        ([("k", "v")], 0, "max_ops must be within 1..128"),
        ([("k", "v")], 129, "max_ops must be within 1..128"),
        ([("/k", "v")], 64, "without a leading '/'"),
        ([("", "v")], 64, "non-empty string"),
        ([("k", 5)], 64, "must be str or bytes"),
    ],
)
def test_txn_batches_refuse_bad_input(items, max_ops, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        txn_set_batches(items, max_ops)


def test_a_runs_swarm_record_holds_the_leaders_neighbours_and_how_the_run_ended():
    schema = Schema("fireap/")
    assert schema.swarm_run("web", "run-1") == "fireap/web/swarm/run-1"
    assert schema.artifact("web", "run-1") == "fireap/web/artifact/run-1"
    record = SwarmRun.from_json('{"leader_peers": ["10.0.0.2:6881", "[fd00::2]:6882"]}')
    assert record.leader_peers == ("10.0.0.2:6881", "[fd00::2]:6882") and not record.over
    assert SwarmRun.from_json('{"leader_peers": [], "finished": 5.0}').over
    assert SwarmRun.from_json('{"leader_peers": [], "refused": "changed"}').over
    for value, field in (('{}', "leader_peers"), ('{"leader_peers": ["node-1:6881"]}', "leader_peers"),
                         ('{"leader_peers": [], "finished": -1}', "finished"),
                         ('{"leader_peers": [], "refused": "' + "x" * (ERROR_MAX_LENGTH + 1) + '"}', "refused")):
        with pytest.raises(KVRecordError, match=field):
            SwarmRun.from_json(value, "fireap/web/swarm/run-1")


def test_a_release_with_an_artifact_needs_its_checksum():
    artifact = {"name": "web-1.tar.gz", "length": 10, "info_hash": "0" * 40}
    base = {"app": "web", "version": "1", "run_id": "run-1", "fanout": 2, "leader": "node-0", "target_count": 2,
            "fired_at": 1.0, "status": "running", "artifact": artifact}
    with pytest.raises(KVRecordError, match="field 'artifact' requires a 'checksum'"):
        ReleaseRecord.from_dict(base)
    record = ReleaseRecord.from_dict({**base, "checksum": "sha256:" + "0" * 64})
    assert record.artifact == ReleaseArtifact(**artifact) and record.to_dict()["artifact"] == artifact
    with pytest.raises(KVRecordError, match="field 'name'"):
        ReleaseRecord.from_dict({**base, "checksum": "sha256:" + "0" * 64, "artifact": {**artifact, "name": "../x"}})


def test_an_advert_gives_the_swarm_port_with_the_artifact_and_only_with_it():
    artifact = "/srv/builds/{{ app }}-{{ version }}.tar.gz"
    advert = AppAdvert.from_json(json.dumps({"max_semaphores": 2, "artifact": artifact, "artifact_port": 7000}))
    assert (advert.artifact, advert.artifact_port) == (artifact, 7000)
    for value in ({"max_semaphores": 2, "artifact": artifact}, {"max_semaphores": 2, "artifact_port": 7000}):
        with pytest.raises(KVRecordError, match="'artifact' and 'artifact_port' go together"):
            AppAdvert.from_json(json.dumps(value), "fireap/.apps/node-1")


def test_a_plan_entry_lists_the_swarm_peers_only_for_a_run_with_an_artifact():
    base = {"run_id": "run-1", "source": "lead", "stage": 1, "slot": 0}
    assert "peers" not in PlanEntry.from_dict(base).to_dict()
    entry = PlanEntry.from_dict({**base, "peers": ["10.0.0.1:6881"]})
    assert entry.peers == ("10.0.0.1:6881",) and json.loads(entry.to_json())["peers"] == ["10.0.0.1:6881"]
