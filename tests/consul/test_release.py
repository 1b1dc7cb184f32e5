"""Controller-side release logic (_firing, _progress, _clearing) against the Consul double over HTTP.

The double runs NODES agents; agent 0 is the leader. No watch handler is configured, so a
fired event only lands in the agents' event lists and node states are written by hand.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
import uuid

import pytest
from consul_harness import in_background
from devcluster.polling import wait_until

from ansible_collections.fireap.consul.plugins.module_utils import _firing
from ansible_collections.fireap.consul.plugins.module_utils import _reap as reap
from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._firing import (
    EVENT_NAME,
    FireLockHeld,
    _re2_problem,
    anchored_node_filters,
    check_filter_regex,
    event_payload,
    fire,
    next_version,
    resume,
    retry_stragglers,
)
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    LockRecord,
    NodeState,
    PlanEntry,
    HISTORY_MAX,
    ReleaseRecord,
    Schema,
    txn_set_batches,
)
from ansible_collections.fireap.consul.plugins.module_utils._progress import ReleaseError, ReleaseWaitTimeout, info, wait
from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release
from ansible_collections.fireap.consul.plugins.module_utils._task_event import decode_payload
from ansible_collections.fireap.consul.plugins.module_utils._validation import check_version
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import advertise

NODES = 12
DELIVERY_TIMEOUT = 20.0
WAIT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def cluster(make_double):
    with make_double(nodes=NODES, name="release-double") as target:
        yield target


@pytest.fixture
def client(cluster):
    with cluster.client(0) as consul_client:
        yield consul_client


#: The apps every node advertises under a test's prefix (the last one: the longest app name the KV keys take).
APPS = ("web", "api", "a" * 60)


@pytest.fixture
def schema(cluster):
    """A prefix of this test's own, where every node advertises APPS; lock sessions left behind
    are destroyed, keys deleted."""
    schema = Schema(f"fireap-test/{uuid.uuid4().hex}/")
    with cluster.client(0) as consul_client:
        advertise(consul_client, schema, APPS)
    yield schema
    with cluster.client(0) as consul_client:
        _index, entries = consul_client.kv.get(schema.prefix, recurse=True)
        for entry in entries or ():
            if entry.get("Session"):
                consul_client.session.destroy(entry["Session"])
        consul_client.kv.delete(schema.prefix, recurse=True)


@pytest.fixture
def leader(cluster):
    return cluster.node_names[0]


def kv_dump(client, schema):
    _index, entries = client.kv.get(schema.prefix, recurse=True)
    return [(e["Key"], e["Value"], e.get("Session"), e["ModifyIndex"]) for e in entries or ()]


def read_json(client, key):
    _index, entry = client.kv.get(key)
    return None if entry is None else json.loads(entry["Value"])


def put_state(client, schema, app, node, session=None, **fields):
    """Write a node record, held by ``session`` if given (as a live worker holds an unfinished one)."""
    state = NodeState(**fields)
    assert client.kv.put(schema.node(app, node), state.to_json(), acquire=session)
    return state


def worker_session(client):
    """A session standing for live workers; the schema fixture destroys it."""
    return client.session.create(lock_delay=0)


def finish_all(client, schema, app, result, status="done"):
    """Record every non-leader target of the run as finished."""
    for name in result["targets"][1:]:
        extra = {"error": "broken"} if status == "failed" else {"source": result["leader"], "depth": 1}
        put_state(
            client, schema, app, name,
            version=result["version"], run_id=result["run_id"], status=status, started=10.0, finished=11.0, **extra,
        )


def event_on(cluster, agent, event_id):
    """The event *event_id* as listed by agent number *agent*, once gossip delivered it."""

    def listed():
        response = cluster.http("GET", "/v1/event/list", agent, params={"name": EVENT_NAME})
        assert response.status_code == 200, response.text
        return next((event for event in response.json() if event["ID"] == event_id), None)

    return wait_until(listed, DELIVERY_TIMEOUT, f"event {event_id} on agent {agent}")


# --- pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "previous, expected",
    [(None, "1"), ("1", "2"), ("1.4.2", "1.4.3"), ("v7", "v8"), ("r09", "r10"), ("2.0-rc1", "2.0-rc2"), ("1.9", "1.10"), ("build-99x", "build-100x")],
)
def test_next_version_increments_the_last_run_of_digits(previous, expected):
    assert next_version(previous) == expected


def test_next_version_needs_digits():
    with pytest.raises(ReleaseError, match="'beta'.*no digits.*give version"):
        next_version("beta")


@pytest.mark.parametrize(
    "version, fragment",
    [
        ("", "non-empty"),
        ("1.0 beta", "may only contain letters, digits and '._+~-'"),
        ("1.0\n", "may only contain letters, digits and '._+~-'"),
        ("1\x00", "may only contain letters, digits and '._+~-'"),
        ("-1.0", "must start with a letter or a digit"),
        ("1;id", "may only contain letters, digits and '._+~-'"),
        ("é", "may only contain letters, digits and '._+~-'"),
        ("v" * 65, "65 characters"),
    ],
)
def test_bad_versions_are_refused(version, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        check_version(version)


def test_payload_is_compact_json_the_node_handler_decodes():
    assert event_payload("web", "1.4.3") == b'{"app":"web","version":"1.4.3"}'
    assert event_payload("web", "é") == '{"app":"web","version":"é"}'.encode()
    assert reap.EVENT_NAME == EVENT_NAME
    for version in ("1.4.3", "2.0-rc1+build.5~x", "v" * 64):
        assert decode_payload(base64.b64encode(event_payload("web", version)).decode()) == ("web", version)
    # What fire() refuses to send, a node refuses to read.
    for version in ("é", 'quo"te\\', "-1"):
        with pytest.raises(ValueError, match="its payload is invalid: version"):
            decode_payload(base64.b64encode(event_payload("web", version)).decode())


@pytest.mark.parametrize(
    "pattern, problem",
    [
        ("^web(?=1)", "a lookahead"),
        ("^web(?!1)", "a lookahead"),
        ("(?<=a)b", "a lookbehind"),
        ("(a)\\1", "a backreference"),
        ("(?P<x>a)(?P=x)", "a named backreference"),
        ("a++", "a possessive quantifier"),
        ("(?>ab)", "an atomic group"),
        (r"^web\(?=", None),
        ("[(?=]x", None),
        ("^web[0-9]+$", None),
        ("(?i)web(?:1|2)?", None),
        ("a+?", None),
    ],
)
def test_re2_problems_are_found_outside_escapes_and_classes(pattern, problem):
    assert _re2_problem(pattern) == problem


def test_filter_regex_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"node_filter '\^web\(\?=1\)' uses a lookahead"):
        check_filter_regex("^web(?=1)", "node_filter")
    with pytest.raises(ValueError, match="node_filter 'web\\[' is not a valid regular expression"):
        check_filter_regex("web[", "node_filter")


def test_anchored_filters_split_within_the_budget_and_match_exactly():
    names = [f"node-{i}.example" for i in range(40)]
    filters = anchored_node_filters(names, 120)
    assert len(filters) > 1
    assert all(len(f) <= 120 and f.startswith("^(") and f.endswith(")$") for f in filters)
    matched = {name for name in names + ["node-1Xexample", "xnode-1.example", "node-1.example2"] if any(re.search(f, name) for f in filters)}
    assert matched == set(names)


# --- fire --------------------------------------------------------------------------------


def test_fire_writes_release_plan_leader_state_lock_and_event(cluster, client, schema, leader):
    result = fire(client, schema, "web", "1.0.0", fanout=2, holder="ctl (test)")

    others = sorted(set(cluster.node_names) - {leader})
    assert result["targets"] == [leader] + others
    assert result["target_count"] == NODES
    assert result["leader"] == leader and result["fanout"] == 2
    assert result["previous_version"] is None and result["previous_release"] is None
    assert result["took_over"] is None and result["stale_plans"] == []
    run_id = result["run_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", run_id)

    release = ReleaseRecord.from_json(client.kv.get(schema.release("web"))[1]["Value"])
    assert release.to_dict() == result["release"]
    assert (release.version, release.run_id, release.fanout, release.leader) == ("1.0.0", run_id, 2, leader)
    assert release.target_count == NODES and release.status == "running"

    # Each entry carries its source's catalog address, so pullers need not look it up.
    addresses = {node["Node"]: node["Address"] for node in client.catalog.nodes()[1]}
    expected = plan_release(result["targets"], leader, 2, run_id, addresses)
    assert all(entry.source_address for entry in expected.values())
    _index, plans = client.kv.get(schema.plans_prefix("web"), recurse=True)
    assert {e["Key"]: PlanEntry.from_json(e["Value"]) for e in plans} == {
        schema.plan("web", run_id, name): entry for name, entry in expected.items()
    }

    state = NodeState.from_json(client.kv.get(schema.node("web", leader))[1]["Value"])
    assert (state.status, state.version, state.run_id, state.depth, state.source) == ("done", "1.0.0", run_id, 0, None)

    _index, lock_entry = client.kv.get(schema.lock("web"))
    assert lock_entry["Session"]
    lock = LockRecord.from_json(lock_entry["Value"])
    assert (lock.run_id, lock.holder) == (run_id, "ctl (test)")

    event = event_on(cluster, NODES - 1, result["event_id"])
    assert base64.b64decode(event["Payload"]) == b'{"app":"web","version":"1.0.0"}'
    assert (event["NodeFilter"], event["ServiceFilter"], event["TagFilter"]) == ("", "", "")


def test_version_defaults_to_the_previous_one_plus_one(client, schema):
    first = fire(client, schema, "api")
    assert (first["version"], first["previous_version"]) == ("1", None)
    finish_all(client, schema, "api", first)
    fire(client, schema, "api", "2.3.9")
    second = fire(client, schema, "api", force=True)
    assert (second["version"], second["previous_version"]) == ("2.3.10", "2.3.9")


def test_a_running_release_holds_the_lock(client, schema):
    first = fire(client, schema, "web", "1.0", holder="ctl-a")
    _index, old_lock = client.kv.get(schema.lock("web"))
    with pytest.raises(FireLockHeld) as refused:
        fire(client, schema, "web", "1.1")
    message = str(refused.value)
    for fragment in (first["run_id"], "version 1.0", "ctl-a", "UTC", f"{NODES - 1} of {NODES} targets", "force=true", "fireap_clear"):
        assert fragment in message
    assert refused.value.lock.run_id == first["run_id"]
    assert read_json(client, schema.release("web"))["run_id"] == first["run_id"]

    forced = fire(client, schema, "web", "1.1", force=True, holder="ctl-b")
    assert forced["took_over"]["run_id"] == first["run_id"]
    assert forced["previous_version"] == "1.0"
    _index, new_lock = client.kv.get(schema.lock("web"))
    record = LockRecord.from_json(new_lock["Value"])
    assert (record.run_id, record.holder) == (forced["run_id"], "ctl-b")
    assert new_lock["Session"] != old_lock["Session"]
    assert client.session.info(old_lock["Session"])[1] is None


def test_a_finished_or_aborted_release_gives_its_lock_up(client, schema):
    first = fire(client, schema, "web", "1.0")
    _index, old_lock = client.kv.get(schema.lock("web"))
    finish_all(client, schema, "web", first, status="failed")
    second = fire(client, schema, "web", "1.1")
    assert second["took_over"]["run_id"] == first["run_id"]
    assert client.session.info(old_lock["Session"])[1] is None

    clear(client, schema, "web", lift_lock=False, abort=True)
    third = fire(client, schema, "web", "1.2")
    assert third["took_over"]["run_id"] == second["run_id"]


def test_a_lock_without_a_release_of_its_run_is_refused(client, schema):
    session = client.session.create(lock_delay=0)
    lock = LockRecord(run_id="interrupted-run", holder="ctl-x", since=1.0)
    assert client.kv.put(schema.lock("web"), lock.to_json(), acquire=session)
    with pytest.raises(FireLockHeld, match="interrupted-run.*no release record describes that run"):
        fire(client, schema, "web", "1.0")
    assert fire(client, schema, "web", "1.0", force=True)["took_over"]["run_id"] == "interrupted-run"


def test_payload_over_budget_is_refused_before_anything_is_written(client, schema):
    before = kv_dump(client, schema)
    app = "a" * 60
    with pytest.raises(ReleaseError, match=r"is 101 bytes, over the 100-byte budget Consul advises.*77 bytes together.*take 78"):
        fire(client, schema, app, "v" * 18)
    assert kv_dump(client, schema) == before
    assert fire(client, schema, app, "v" * 17, check_mode=True)["version"] == "v" * 17


def test_filters_too_long_for_one_event_are_refused(client, schema):
    with pytest.raises(ReleaseError, match="would not fit in one Consul user event"):
        fire(client, schema, "web", "1", node_filter="^(" + "|".join(f"n{i:03d}" for i in range(80)) + ")$")


def test_argument_errors(client, schema):
    with pytest.raises(ValueError, match="fanout must be an integer from 1 to 64, got 65"):
        fire(client, schema, "web", "1", fanout=65)
    with pytest.raises(ValueError, match="app name 'web/x' may only contain"):
        fire(client, schema, "web/x", "1")
    with pytest.raises(ValueError, match="give service too"):
        fire(client, schema, "web", "1", tag="blue")
    with pytest.raises(ValueError, match="service 'a/b' must not contain"):
        fire(client, schema, "web", "1", service="a/b")


def test_node_filter_matches_whole_names_here_and_in_the_event(cluster, client, schema, leader):
    """Behaviour changed: node_filter was searched unanchored (web1 also selected web10)."""
    names = cluster.node_names  # node-000 ... node-011
    with pytest.raises(ReleaseError, match="no node besides the leader .* matches the filters node='node-01'"):
        fire(client, schema, "web", "1", node_filter="node-01", check_mode=True)  # a prefix of node-010, node-011
    exact = fire(client, schema, "web", "1", node_filter=names[1])
    assert exact["targets"] == [leader, names[1]]
    assert exact["filters"]["node"] == names[1]
    event = event_on(cluster, 1, exact["event_id"])
    assert event["NodeFilter"] == f"^(?:{names[1]})$"
    assert not re.search(event["NodeFilter"], names[1] + "0"), "Consul's agents search it: it must be anchored"

    several = fire(client, schema, "web", "2", node_filter=r"node-00[1-3]", force=True, check_mode=True)
    assert several["targets"] == [leader] + names[1:4]
    either = fire(client, schema, "web", "2", node_filter="node-001|node-002", force=True, check_mode=True)
    assert either["targets"] == [leader] + names[1:3]


def test_a_filter_matching_nothing_is_refused(client, schema, leader):
    with pytest.raises(ReleaseError, match=r"no node besides the leader .* matches the filters node='\^nomatch\$'"):
        fire(client, schema, "web", "1", node_filter="^nomatch$")


def test_a_target_whose_service_id_differs_from_its_name_gets_the_event(cluster, client, schema, leader):
    """Consul delivers an event with a service filter only to agents with a service whose ID
    matches it; the targets are chosen by service name, so the event carries no service filter."""
    service = f"svc-{uuid.uuid4().hex[:8]}"
    response = cluster.http("PUT", "/v1/agent/service/register", 3,
                            json_body={"Name": service, "ID": "frontend-1", "Tags": ["blue"]})
    assert response.status_code == 200, response.text
    try:
        fired = fire(client, schema, "web", "1", service=service, tag="blue")
        assert fired["targets"] == [leader, cluster.node_names[3]]
        assert event_on(cluster, 3, fired["event_id"])["Payload"]
    finally:
        cluster.http("PUT", "/v1/agent/service/deregister/frontend-1", 3)


def test_targets_by_service_and_tag(cluster, client, schema, leader):
    service = f"svc-{uuid.uuid4().hex[:8]}"
    registered = {2: ["blue"], 3: ["green"], 4: ["blue", "canary"]}
    for agent, tags in registered.items():
        response = cluster.http("PUT", "/v1/agent/service/register", agent, json_body={"Name": service, "Tags": tags})
        assert response.status_code == 200, response.text
    try:
        names = cluster.node_names
        everyone = fire(client, schema, "web", "1", service=service, check_mode=True)
        assert everyone["targets"] == [leader] + sorted(names[a] for a in registered)

        blue = fire(client, schema, "web", "1", service=service, tag="blue")
        assert blue["targets"] == [leader] + sorted([names[2], names[4]])
        assert blue["filters"] == {"node": None, "service": service, "tag": "blue"}
        event = event_on(cluster, 2, blue["event_id"])
        assert (event["NodeFilter"], event["ServiceFilter"], event["TagFilter"]) == ("", "", "")

        narrowed = fire(client, schema, "web", "2", node_filter=f"^{re.escape(names[4])}$", service=service, force=True)
        assert narrowed["targets"] == [leader, names[4]]
    finally:
        for agent in registered:
            cluster.http("PUT", f"/v1/agent/service/deregister/{service}", agent)


def plan_keys(client, schema, app):
    return client.kv.get(schema.plans_prefix(app), keys=True)[1] or []


def test_a_new_run_deletes_the_plans_of_earlier_runs(cluster, client, schema, leader):
    names = cluster.node_names
    first = fire(client, schema, "web", "1")
    finish_all(client, schema, "web", first)
    first_keys = plan_keys(client, schema, "web")
    assert first_keys == sorted(schema.plan("web", first["run_id"], name) for name in first["targets"][1:])
    second = fire(client, schema, "web", "2", node_filter=f"^{re.escape(names[1])}$")
    assert second["stale_plans"] == first_keys
    assert plan_keys(client, schema, "web") == [schema.plan("web", second["run_id"], names[1])]
    assert read_json(client, schema.plan("web", second["run_id"], names[1]))["run_id"] == second["run_id"]


class _InterruptedClient:
    """A client whose fire stops after the plan is written: the switching transaction fails."""

    def __init__(self, client) -> None:
        self._client = client
        self.txn = self

    def __getattr__(self, name):
        return getattr(self._client, name)

    def put(self, payload):
        if any(op["KV"]["Verb"].startswith("check") for op in payload):
            raise ConnectionError("leader lost")
        return self._client.txn.put(payload)


def test_a_fire_interrupted_after_the_plan_leaves_the_run_in_force_untouched(cluster, client, schema, monkeypatch):
    """The plan goes in several transactions (64 ops each before Consul 1.14; 2 here): until the
    release record names the new run, every node reads the plan of the run in force."""
    first = fire(client, schema, "web", "1")
    before = {key: read_json(client, key) for key in plan_keys(client, schema, "web")}
    monkeypatch.setattr(_firing, "txn_set_batches", functools.partial(txn_set_batches, max_ops=2))
    with pytest.raises(ConnectionError, match="leader lost"):
        fire(_InterruptedClient(client), schema, "web", "2", force=True)
    assert read_json(client, schema.release("web"))["run_id"] == first["run_id"]
    assert {key: read_json(client, key) for key in before} == before
    partial = sorted(set(plan_keys(client, schema, "web")) - set(before))
    assert partial and all(read_json(client, key)["run_id"] != first["run_id"] for key in partial)

    third = fire(client, schema, "web", "3", force=True)
    assert sorted(third["stale_plans"]) == sorted([*before, *partial])
    assert all(key.startswith(schema.plan_prefix("web", third["run_id"])) for key in plan_keys(client, schema, "web"))


class _RacingClient:
    """A client whose transaction guarded by a check runs ``before()`` first, as a concurrent writer."""

    def __init__(self, client, before) -> None:
        self._client = client
        self._before = before
        self.txn = self

    def __getattr__(self, name):
        return getattr(self._client, name)

    def put(self, payload):
        if any(op["KV"]["Verb"].startswith("check") for op in payload):
            self._before()
        return self._client.txn.put(payload)


def test_a_release_changed_while_recording_fires_nothing_and_frees_the_lock(cluster, client, schema):
    first = fire(client, schema, "web", "1")
    finish_all(client, schema, "web", first)
    events_before = cluster.http("GET", "/v1/event/list", 0, params={"name": EVENT_NAME}).json()
    racing = _RacingClient(client, lambda: clear(client, schema, "web", lift_lock=False, abort=True, reason="race"))
    with pytest.raises(ReleaseError, match="changed while run .* was being recorded.*nothing was fired"):
        fire(racing, schema, "web", "2")
    record = read_json(client, schema.release("web"))
    assert (record["run_id"], record["status"]) == (first["run_id"], "aborted")
    assert client.kv.get(schema.lock("web"))[1].get("Session") is None
    assert cluster.http("GET", "/v1/event/list", 0, params={"name": EVENT_NAME}).json() == events_before


def test_malformed_release_record_is_reported_and_wipe_removes_it(client, schema):
    client.kv.put(schema.release("web"), b"{not json")
    with pytest.raises(ReleaseError, match="malformed KV key .*release.*fireap_clear wipe=true"):
        fire(client, schema, "web", "1")
    assert clear(client, schema, "web", wipe=True)["wiped"]
    assert fire(client, schema, "web")["version"] == "1"


# --- the nodes that have the app ---------------------------------------------------------


def test_only_nodes_advertising_the_app_are_targets_at_their_smallest_fanout(cluster, client, schema, leader):
    names = cluster.node_names
    advertise(client, schema, ["web", "some"], names[1:3], max_semaphores=4)
    advertise(client, schema, ["web", "some"], names[3:4], max_semaphores=2)
    fired = fire(client, schema, "some", "1")
    assert fired["targets"] == [leader] + names[1:4]
    assert (fired["fanout"], fired["release"]["fanout"]) == (2, 2)
    assert fired["without_app"] == names[4:] and fired["not_accepting"] == [] and fired["unreachable_targets"] == []
    assert fire(client, schema, "some", "2", fanout=3, force=True)["fanout"] == 3


def test_an_app_on_no_node_fails_at_once_before_the_lock_and_the_event(cluster, client, schema):
    events_before = cluster.http("GET", "/v1/event/list", 0, params={"name": EVENT_NAME}).json()
    started = time.monotonic()
    with pytest.raises(ReleaseError) as refused:
        fire(client, schema, "nosuchapp", "1")
    assert time.monotonic() - started < 5
    assert str(refused.value).startswith(
        f"app 'nosuchapp' is configured on no node: none advertises it in {schema.adverts_prefix()}<node> "
        f"(the apps the nodes have: {'a' * 60}, api, web)")
    assert client.kv.get(schema.app_prefix("nosuchapp"), recurse=True)[1] is None, "no lock, no release record"
    assert cluster.http("GET", "/v1/event/list", 0, params={"name": EVENT_NAME}).json() == events_before


def test_the_app_filters_a_node_advertises_decide_on_its_catalog_services(cluster, client, schema, leader):
    names = cluster.node_names
    service = f"svc-{uuid.uuid4().hex[:8]}"
    advertise(client, schema, ["filtered"], names[1:5], service_filter=f"^{service}$", tag_filter="^blue$")
    registered = {1: ["blue"], 2: ["green"], 4: ["green", "blue"]}
    for agent, tags in registered.items():
        body = {"Name": service, "ID": f"{service}-{agent}", "Tags": tags}
        assert cluster.http("PUT", "/v1/agent/service/register", agent, json_body=body).status_code == 200
    try:
        fired = fire(client, schema, "filtered", "1", check_mode=True)
    finally:
        for agent in registered:
            cluster.http("PUT", f"/v1/agent/service/deregister/{service}-{agent}", agent)
    assert fired["targets"] == [leader, names[1], names[4]]
    assert fired["not_accepting"] == [names[2], names[3]]
    assert fired["without_app"] == names[5:]


def test_a_node_whose_agent_is_down_stays_a_target_and_is_reported(cluster, client, schema, leader):
    down = cluster.node_names[-1]
    assert cluster.http("PUT", f"/_devcluster/agents/{down}/stop", 0).status_code == 200
    try:
        # A crash shows once gossip failure detection has marked the node (seconds on Consul).
        wait_until(lambda: any(check["CheckID"] == "serfHealth" and check["Status"] == "critical"
                               for check in cluster.http("GET", f"/v1/health/node/{down}", 0).json()),
                   30, f"{down}'s serfHealth critical")
        fired = fire(client, schema, "web", "1", check_mode=True)
    finally:
        assert cluster.http("PUT", f"/_devcluster/agents/{down}/start", 0).status_code == 200
    assert down in fired["targets"] and fired["unreachable_targets"] == [down]


def test_an_unreadable_advert_leaves_its_node_out_and_says_why(cluster, client, schema, leader):
    broken = cluster.node_names[2]
    assert client.kv.put(schema.advert(broken), json.dumps({"apps": {"web": {"max_semaphores": 10**12}}}))
    fired = fire(client, schema, "web", "1", check_mode=True)
    assert broken not in fired["targets"] and fired["without_app"] == [broken]
    assert fired["advert_errors"] == [
        f"malformed KV key '{schema.advert(broken)}': app 'web': field 'max_semaphores': max_semaphores must be an "
        "integer from 1 to 64, got 1000000000000; that node counts as having no app until its handler writes the "
        "advert again"]


# --- check mode ---------------------------------------------------------------------------


def test_check_mode_changes_nothing(cluster, client, schema, leader):
    first = fire(client, schema, "web", "1.0")
    put_state(client, schema, "web", cluster.node_names[1], session=worker_session(client), version="1.0",
              run_id=first["run_id"], status="waiting", started=5.0)
    before = kv_dump(client, schema)
    events_before = cluster.http("GET", "/v1/event/list", 0, params={"name": EVENT_NAME}).json()

    planned = fire(client, schema, "web", check_mode=True, force=True)
    assert planned["version"] == "1.1" and planned["event_id"] is None
    assert planned["took_over"]["run_id"] == first["run_id"]
    with pytest.raises(FireLockHeld):
        fire(client, schema, "web", check_mode=True)
    retried = retry_stragglers(client, schema, "web", check_mode=True)
    assert retried["stragglers"] and all(e["event_id"] is None for e in retried["events"])
    cleared = clear(client, schema, "web", abort=True, wipe=True, check_mode=True)
    assert cleared["changed"] and cleared["aborted"]["run_id"] == first["run_id"] and cleared["wiped"]
    assert cleared["lock_lifted"]["run_id"] == first["run_id"]

    assert kv_dump(client, schema) == before
    assert cluster.http("GET", "/v1/event/list", 0, params={"name": EVENT_NAME}).json() == events_before


# --- info ---------------------------------------------------------------------------------


def test_info_without_a_release(client, schema):
    result = info(client, schema, "nothing")
    assert result["exists"] is False and result["status"] == "none" and result["release"] is None
    assert result["counts"] == {"done": 0, "pulling": 0, "waiting": 0, "failed": 0, "pending": 0}
    assert result["lock"] is None and result["nodes"] == [] and result["all_finished"] is False


def test_info_counts_tree_pending_and_timings(client, schema, leader):
    fired = fire(client, schema, "web", "2.0", fanout=2)
    run, targets = fired["run_id"], fired["targets"]
    n1, n2, n3, n4, n5, n6, n7, n8 = targets[1:9]
    common = {"version": "2.0", "run_id": run}
    live = worker_session(client)
    put_state(client, schema, "web", n1, status="done", started=100.0, finished=104.0, source=leader, depth=1, **common)
    put_state(client, schema, "web", n2, status="done", started=100.0, finished=106.5, source=leader, depth=1, **common)
    put_state(client, schema, "web", n3, status="done", started=104.0, finished=109.0, source=n1, depth=2, **common)
    put_state(client, schema, "web", n4, session=live, status="pulling", started=104.0, source=n1, depth=2, **common)
    put_state(client, schema, "web", n5, session=live, status="waiting", started=105.0, **common)
    put_state(client, schema, "web", n6, status="failed", started=105.0, finished=107.0, source=n2, depth=2, error="rsync exit 23", **common)
    # Done at this version in an earlier run: counts as done, not part of this run's tree.
    put_state(client, schema, "web", n7, version="2.0", run_id="older", status="done", started=1.0, finished=2.0, source=leader, depth=1)
    # Its worker died mid-pull (no session holds the record): pending, not part of the tree.
    put_state(client, schema, "web", n8, status="pulling", started=104.0, source=n2, depth=2, **common)

    result = info(client, schema, "web")
    pending = NODES - 8
    assert result["counts"] == {"done": 5, "pulling": 1, "waiting": 1, "failed": 1, "pending": pending}
    assert result["total"] == NODES
    assert result["percent"] == round(100 * 6 / NODES, 1)
    assert (result["status"], result["all_finished"], result["succeeded"]) == ("running", False, False)
    assert result["failed_nodes"] == [{"node": n6, "source": n2, "error": "rsync exit 23"}]
    assert result["tree"] == {leader: [n1, n2], n1: [n3, n4], n2: [n6]}
    assert result["max_depth"] == 2
    assert result["stages_planned"] == 3 and result["ideal_stages"] == 3
    assert result["timings"]["first_finished"] == 104.0 and result["timings"]["last_finished"] == 109.0
    rows = {row["node"]: row for row in result["nodes"]}
    assert [row["node"] for row in result["nodes"]] == targets
    assert rows[n3]["duration"] == 5.0 and rows[n4]["duration"] is None
    assert rows[n7]["status"] == "done" and rows[n7]["this_run"] is False
    assert rows[targets[-1]]["status"] == "pending" and rows[targets[-1]]["started"] is None
    assert rows[n8]["status"] == "pending" and rows[n8]["this_run"] is False
    assert rows[leader]["depth"] == 0 and rows[leader]["stage"] == 0
    assert result["lock"]["held"] is True and result["lock"]["run_id"] == run
    assert result["warnings"] == []


def test_info_rows_follow_the_plan(client, schema):
    fired = fire(client, schema, "web", "3", fanout=3)
    plan = plan_release(fired["targets"], fired["leader"], 3, fired["run_id"])
    for row in info(client, schema, "web")["nodes"][1:]:
        entry = plan[row["node"]]
        assert (row["planned_source"], row["stage"], row["slot"]) == (entry.source, entry.stage, entry.slot)


def test_info_finishes_and_skips_malformed_records(client, schema):
    fired = fire(client, schema, "web", "1")
    finish_all(client, schema, "web", fired)
    client.kv.put(schema.node("web", "garbage"), b"[]")
    result = info(client, schema, "web")
    assert (result["status"], result["all_finished"], result["succeeded"], result["percent"]) == ("finished", True, True, 100.0)
    assert result["timings"]["elapsed"] >= 0
    assert len(result["warnings"]) == 1 and "garbage" in result["warnings"][0]


# --- wait ---------------------------------------------------------------------------------


def test_wait_returns_when_the_last_target_finishes(client, schema):
    fired = fire(client, schema, "web", "1")
    seen = []
    future = in_background(wait, client, schema, "web", fired["run_id"], WAIT_TIMEOUT, 1.0, seen.append)
    wait_until(lambda: seen, WAIT_TIMEOUT, "first progress report")
    finish_all(client, schema, "web", fired)
    final = future.result(WAIT_TIMEOUT * 2)
    assert final["all_finished"] and final["counts"]["done"] == NODES
    assert seen[0]["counts"]["pending"] == NODES - 1 and seen[-1] == final


def test_wait_times_out_with_the_last_progress(client, schema):
    fired = fire(client, schema, "web", "1")
    with pytest.raises(ReleaseWaitTimeout, match=rf"did not finish within 0s: 1 done, .*{NODES - 1} pending of {NODES}") as timeout:
        wait(client, schema, "web", fired["run_id"], 0)
    assert timeout.value.info["run_id"] == fired["run_id"]


def test_wait_stops_on_abort_and_on_replacement(client, schema):
    fired = fire(client, schema, "web", "1")
    clear(client, schema, "web", abort=True, reason="bad build")
    aborted = wait(client, schema, "web", fired["run_id"], WAIT_TIMEOUT)
    assert aborted["status"] == "aborted" and aborted["release"]["aborted_reason"] == "bad build"
    fire(client, schema, "web", "2")
    with pytest.raises(ReleaseError, match=f"stopped waiting for run {fired['run_id']}.*replaced it"):
        wait(client, schema, "web", fired["run_id"], WAIT_TIMEOUT)


# --- retry_stragglers ---------------------------------------------------------------------


def test_retry_fires_to_exactly_the_targets_that_never_started_or_whose_worker_died(cluster, client, schema, leader):
    fired = fire(client, schema, "web", "1.2")
    started = fired["targets"][1:-2]
    live = worker_session(client)
    for name in started:
        put_state(client, schema, "web", name, session=live, version="1.2", run_id=fired["run_id"], status="waiting",
                  started=3.0)
    never_started, died = fired["targets"][-2:]
    put_state(client, schema, "web", died, version="1.2", run_id=fired["run_id"], status="pulling", started=3.0,
              source=leader, depth=1)
    stragglers = [never_started, died]

    result = retry_stragglers(client, schema, "web", "1.2")
    assert (result["run_id"], result["version"], result["stragglers"]) == (fired["run_id"], "1.2", stragglers)
    assert [e["node_filter"] for e in result["events"]] == [anchored_node_filters(stragglers, 400)[0]]
    agent = cluster.node_names.index(stragglers[0])
    event = event_on(cluster, agent, result["events"][0]["event_id"])
    assert event["NodeFilter"] == result["events"][0]["node_filter"]
    assert base64.b64decode(event["Payload"]) == event_payload("web", "1.2")
    assert read_json(client, schema.release("web"))["run_id"] == fired["run_id"]


def test_retry_refusals(client, schema):
    with pytest.raises(ReleaseError, match="no release to retry"):
        retry_stragglers(client, schema, "web")
    fire(client, schema, "web", "1")
    with pytest.raises(ReleaseError, match="version '2' is not the version of the current run"):
        retry_stragglers(client, schema, "web", "2")
    clear(client, schema, "web", abort=True)
    with pytest.raises(ReleaseError, match="was aborted"):
        retry_stragglers(client, schema, "web")


def test_retry_without_stragglers_fires_nothing(client, schema):
    fired = fire(client, schema, "web", "1")
    finish_all(client, schema, "web", fired)
    assert retry_stragglers(client, schema, "web")["events"] == []


# --- clear --------------------------------------------------------------------------------


def test_clear_lifts_the_lock(client, schema):
    fired = fire(client, schema, "web", "1")
    _index, entry = client.kv.get(schema.lock("web"))
    result = clear(client, schema, "web")
    assert result["changed"] and result["lock_lifted"]["session"] == entry["Session"]
    assert result["lock_lifted"]["run_id"] == fired["run_id"] and result["aborted"] is None
    assert result["after"]["lock"]["held"] is False
    assert client.kv.get(schema.lock("web"))[1].get("Session") is None
    assert client.session.info(entry["Session"])[1] is None
    assert fire(client, schema, "web", "2")["took_over"] is None
    assert clear(client, schema, "nothing")["changed"] is False


def test_clear_aborts_a_running_release_once(client, schema):
    fired = fire(client, schema, "web", "1")
    result = clear(client, schema, "web", lift_lock=False, abort=True, reason="rollback")
    assert result["aborted"] == {"run_id": fired["run_id"], "version": "1", "reason": "rollback"}
    assert result["lock_lifted"] is None
    record = read_json(client, schema.release("web"))
    assert (record["status"], record["aborted_reason"]) == ("aborted", "rollback")
    assert result["before"]["release"]["status"] == "running" and result["after"]["release"]["status"] == "aborted"
    assert clear(client, schema, "web", lift_lock=False, abort=True)["changed"] is False
    assert info(client, schema, "web")["status"] == "aborted"


def test_clear_wipes_every_key_of_the_app_only(client, schema):
    fire(client, schema, "web", "1")
    fire(client, schema, "api", "1")
    _index, entry = client.kv.get(schema.lock("web"))
    count = len(client.kv.get(schema.app_prefix("web"), keys=True)[1])
    result = clear(client, schema, "web", lift_lock=False, wipe=True)
    assert result["wiped"] and result["deleted_keys"] == count and result["lock_lifted"]
    assert client.kv.get(schema.app_prefix("web"), keys=True)[1] is None
    assert client.session.info(entry["Session"])[1] is None
    assert client.kv.get(schema.release("api"))[1] is not None
    assert result["after"] == {"release": None, "lock": None}


def test_clear_reason_must_be_text(client, schema):
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        clear(client, schema, "web", abort=True, reason="  ")


# --- history, retry of the failed targets, rollback -------------------------------------------


def finish_with_failures(client, schema, app, result, failing):
    """Record the run's targets done, but ``failing`` failed."""
    for name in result["targets"][1:]:
        if name in failing:
            put_state(client, schema, app, name, version=result["version"], run_id=result["run_id"], status="failed",
                      started=10.0, finished=11.0, error="exit 1")
        else:
            put_state(client, schema, app, name, version=result["version"], run_id=result["run_id"], status="done",
                      started=10.0, finished=11.0, source=result["leader"], depth=1)


def test_each_run_is_in_the_history_and_the_next_fire_closes_it(client, schema):
    first = fire(client, schema, "web", "1", holder="ops@ctl")
    assert [(row["run_id"], row["outcome"]) for row in first["history"]] == [(first["run_id"], "running")]
    finish_all(client, schema, "web", first)
    assert info(client, schema, "web")["history"][0]["outcome"] == "succeeded"
    second = fire(client, schema, "web", "2", holder="ops@ctl")
    finish_with_failures(client, schema, "web", second, second["targets"][1:2])
    history = info(client, schema, "web")["history"]
    assert [(row["version"], row["kind"], row["outcome"]) for row in history] == [
        ("2", "release", "failed"), ("1", "release", "succeeded")]
    closed = history[1]
    assert (closed["fired_by"], closed["done"], closed["failed"], closed["target_count"]) == (
        "ops@ctl", NODES, 0, NODES)
    assert closed["finished_at"] == 11.0 and closed["finished_at_iso"].startswith("1970-01-01T00:00:11")
    clear(client, schema, "web", abort=True, reason="bad build")
    fire(client, schema, "web", "3")
    assert [(row["version"], row["outcome"], row["abort_reason"]) for row in info(client, schema, "web")["history"]] == [
        ("3", "running", None), ("2", "aborted", "bad build"), ("1", "succeeded", None)]


def test_the_history_keeps_the_last_runs_only(client, schema):
    for number in range(1, HISTORY_MAX + 3):
        fire(client, schema, "web", str(number), force=True)
    history = info(client, schema, "web")["history"]
    assert len(history) == HISTORY_MAX
    assert history[0]["version"] == str(HISTORY_MAX + 2) and history[-1]["version"] == "3"
    assert {row["outcome"] for row in history[1:]} == {"unfinished"}


def test_a_malformed_history_is_a_warning_and_the_next_fire_starts_it_afresh(client, schema):
    client.kv.put(schema.history("web"), json.dumps({"runs": [{"run_id": "-x"}]}))
    assert any("history" in warning for warning in info(client, schema, "web")["warnings"])
    fired = fire(client, schema, "web", "1")
    assert [row["run_id"] for row in info(client, schema, "web")["history"]] == [fired["run_id"]]


def test_retry_failed_runs_the_same_version_to_the_failed_targets_only(client, schema, leader):
    first = fire(client, schema, "web", "4")
    failing = first["targets"][2:4]
    finish_with_failures(client, schema, "web", first, failing)
    retry = fire(client, schema, "web", retry_failed=True)
    assert (retry["version"], retry["kind"], retry["retry_of"]) == ("4", "retry", first["run_id"])
    assert retry["targets"] == [leader] + failing
    assert plan_keys(client, schema, "web") == sorted(schema.plan("web", retry["run_id"], name) for name in failing)
    row = info(client, schema, "web")["history"][0]
    assert (row["kind"], row["retry_of"], row["target_count"]) == ("retry", first["run_id"], 3)


def test_retry_failed_refuses_what_it_cannot_retry(client, schema):
    with pytest.raises(ReleaseError, match="has no run whose failed targets could be retried"):
        fire(client, schema, "web", retry_failed=True)
    first = fire(client, schema, "web", "1")
    with pytest.raises(ReleaseError, match=r"is not over \(\d+ targets have not finished\).*retry_stragglers"):
        fire(client, schema, "web", retry_failed=True)
    finish_all(client, schema, "web", first)
    with pytest.raises(ReleaseError, match="has no failed targets: nothing to retry"):
        fire(client, schema, "web", retry_failed=True)
    with pytest.raises(ValueError, match="retry_failed decides the version itself"):
        fire(client, schema, "web", "2", retry_failed=True)
    with pytest.raises(ValueError, match="give one of them"):
        fire(client, schema, "web", retry_failed=True, rollback=True)


def test_rollback_releases_the_last_version_every_target_got(client, schema):
    with pytest.raises(ReleaseError, match="no earlier version that a run delivered to every target.*history: empty"):
        fire(client, schema, "web", rollback=True)
    good = fire(client, schema, "web", "1.0")
    finish_all(client, schema, "web", good)
    bad = fire(client, schema, "web", "1.1")
    finish_with_failures(client, schema, "web", bad, bad["targets"][1:2])
    rolled = fire(client, schema, "web", rollback=True)
    assert (rolled["version"], rolled["kind"], rolled["target_count"]) == ("1.0", "rollback", NODES)
    assert [(row["version"], row["kind"]) for row in info(client, schema, "web")["history"]] == [
        ("1.0", "rollback"), ("1.1", "release"), ("1.0", "release")]
    with pytest.raises(ValueError, match="rollback decides the version itself"):
        fire(client, schema, "web", "0.9", rollback=True)


def test_rollback_refuses_when_only_the_current_version_ever_succeeded(client, schema):
    only = fire(client, schema, "web", "1")
    finish_all(client, schema, "web", only)
    with pytest.raises(ReleaseError, match=r"no earlier version .*history: 1 succeeded\); nothing to roll back to"):
        fire(client, schema, "web", rollback=True)


# --- the canary gate ---------------------------------------------------------------------------


def test_a_gated_run_records_its_gate_and_resume_opens_it_once(cluster, client, schema):
    fired = fire(client, schema, "web", "5", fanout=2, pause_after_stage=1, checksum="sha256:" + "ab" * 32)
    record = ReleaseRecord.from_json(client.kv.get(schema.release("web"))[1]["Value"])
    assert (record.pause_after_stage, record.resumed_at, record.checksum) == (1, None, "sha256:" + "ab" * 32)
    assert info(client, schema, "web")["canaries"] == fired["targets"][1:3]
    assert retry_stragglers(client, schema, "web")["stragglers"] == fired["targets"][1:3], "the held nodes are left alone"
    opened = resume(client, schema, "web", "5")
    assert opened["run_id"] == fired["run_id"] and opened["pause_after_stage"] == 1
    assert ReleaseRecord.from_json(client.kv.get(schema.release("web"))[1]["Value"]).resumed_at == opened["resumed_at"]
    assert base64.b64decode(event_on(cluster, 1, opened["event_id"])["Payload"]) == event_payload("web", "5")
    with pytest.raises(ReleaseError, match="was resumed already"):
        resume(client, schema, "web")


def test_resume_refuses_runs_without_a_closed_gate(client, schema):
    with pytest.raises(ReleaseError, match="has no release to resume"):
        resume(client, schema, "web")
    fire(client, schema, "web", "1")
    with pytest.raises(ReleaseError, match="has no canary gate .*nothing to resume"):
        resume(client, schema, "web")
    fire(client, schema, "web", "2", pause_after_stage=2, force=True)
    with pytest.raises(ReleaseError, match="is not the version of the current run"):
        resume(client, schema, "web", "3")
    clear(client, schema, "web", abort=True, reason="stop")
    with pytest.raises(ReleaseError, match="was aborted"):
        resume(client, schema, "web")


@pytest.mark.parametrize("arguments, message", [
    ({"pause_after_stage": 0}, "pause_after_stage must be an integer from 1 to 64"),
    ({"checksum": "sha256:XYZ"}, "checksum 'sha256:XYZ' must be 'sha256:' followed by 64 lowercase hex digits"),
])
def test_gate_and_checksum_arguments_are_checked_before_anything_is_written(client, schema, arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fire(client, schema, "web", "1", **arguments)
    assert client.kv.get(schema.release("web"))[1] is None


def test_a_retry_and_a_rollback_carry_the_checksum_of_the_run_they_repeat(client, schema):
    good_sum, bad_sum = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    good = fire(client, schema, "web", "1.0", checksum=good_sum)
    finish_all(client, schema, "web", good)
    bad = fire(client, schema, "web", "1.1", checksum=bad_sum)
    finish_with_failures(client, schema, "web", bad, bad["targets"][1:2])
    retry = fire(client, schema, "web", retry_failed=True)
    assert retry["release"]["checksum"] == bad_sum
    finish_all(client, schema, "web", retry)
    rolled = fire(client, schema, "web", rollback=True)
    assert (rolled["version"], rolled["release"]["checksum"]) == ("1.0", good_sum)
    assert info(client, schema, "web")["history"][0]["checksum"] == good_sum
