"""The pull worker against the project's Consul double over HTTP, one worker thread per node.

Every test fires a release the way fireap_fire does (plan entries in txn batches, the
leader's own state, then the release record) under a KV prefix of its own, runs the
workers of the other nodes in threads, each talking to its own agent, and checks the
outcome in KV and in what the injected task saw.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter

import consul
import pytest
from devcluster.consul import MISSING_KEY_BLOCK, MISSING_KEY_WAKE, Realism
from devcluster.polling import wait_until

from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NodeState,
    PlanEntry,
    ReleaseRecord,
    Schema,
    txn_set_batches,
)
from ansible_collections.fireap.consul.plugins.module_utils import _propagation
from ansible_collections.fireap.consul.plugins.module_utils._commands import fill_template
from ansible_collections.fireap.consul.plugins.module_utils._propagation import (
    PullTimings,
    plan_release,
    schedule_order,
    stage_count,
)
from ansible_collections.fireap.consul.plugins.module_utils._worker import PullError, SourceInfo, pull

pytestmark = pytest.mark.double_only

NODES = 24
TASK_SECONDS = 0.05
# A failed task waits failure_detection for its source to be marked down: at once on the kind double.
FAST = PullTimings(watch_timeout=120, start_grace=1.5, busy_grace=3, max_wait=2, failure_detection=1)


@pytest.fixture(scope="module")
def cluster(make_double):
    """The kind double (``Realism.kind()``: a crash detected at once), for FAST's short waits; the
    ``unkind`` doubles below are Consul's."""
    with make_double(nodes=NODES, name="worker-double", realism=Realism.kind()) as target:
        yield target


#: Doubles as unkind as Consul (the ``unkind`` fixture): a crashed agent's node stays passing this
#: long, and missing keys are woken by writes nearby (hashicorp/consul#9449) or raise the index.
DETECTION = 3.0
REALISTIC = PullTimings(watch_timeout=120, start_grace=60, busy_grace=60, max_wait=2, failure_detection=10,
                        absent_pause=0.5)


@pytest.fixture(scope="module")
def unkind(make_double):
    """Doubles with Consul's behaviour (``Realism()``), one per missing-key mode, started on demand."""
    started = {}

    def get(missing_key=MISSING_KEY_BLOCK):
        if missing_key not in started:
            realism = Realism(failure_detection=DETECTION, missing_key=missing_key)
            started[missing_key] = make_double(nodes=6, realism=realism, name=f"unkind-{missing_key}")
        return started[missing_key]

    yield get
    for target in started.values():
        target.close()


@pytest.fixture
def schema(cluster):
    prefix = f"fireap-test/{uuid.uuid4().hex}/"
    yield Schema(prefix)
    cluster.client().kv.delete(prefix, recurse=True)


class Task:
    """The injected run_task: sleeps, counts concurrent pullers per source, may fail."""

    def __init__(self, failing=()):
        self.failing = set(failing)
        self.lock = threading.Lock()
        self.active = Counter()
        self.peak = Counter()
        self.calls = []

    def for_node(self, node):
        def run_task(source: SourceInfo):
            with self.lock:
                self.calls.append((node, source))
                self.active[source.name] += 1
                self.peak[source.name] = max(self.peak[source.name], self.active[source.name])
            try:
                time.sleep(TASK_SECONDS)
            finally:
                with self.lock:
                    self.active[source.name] -= 1
            if node in self.failing:
                return False, f"simulated failure on {node}"
            return True, None

        return run_task


def fire(cluster, schema, app, fanout, targets=None, version="v1", addresses=None):
    """Write what fireap_fire writes: plan (txn batches), leader state, release record."""
    client = cluster.client(0)
    leader = cluster.node_names[0]
    targets = cluster.node_names if targets is None else targets
    run_id = uuid.uuid4().hex
    plan = plan_release(targets, leader, fanout, run_id, addresses)
    for batch in txn_set_batches((schema.plan(app, run_id, node), entry.to_json()) for node, entry in plan.items()):
        client.txn.put(batch)
    now = time.time()
    leader_state = NodeState(version=version, run_id=run_id, status="done", started=now, depth=0, finished=now)
    assert client.kv.put(schema.node(app, leader), leader_state.to_json())
    release = ReleaseRecord(
        app=app, version=version, run_id=run_id, fanout=fanout, leader=leader,
        target_count=len(plan) + 1, fired_at=now,
    )
    assert client.kv.put(schema.release(app), release.to_json())
    return release, plan


def run_workers(cluster, schema, app, nodes, task, timings=FAST):
    """Run pull() for each node in its own thread against its own agent; {node: result}."""
    index = {name: i for i, name in enumerate(cluster.node_names)}
    logs = {node: [] for node in nodes}

    def one(node):
        return pull(
            cluster.client(index[node]), app, node, task.for_node(node),
            schema=schema, timings=timings, log=logs[node].append,
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        futures = {node: pool.submit(one, node) for node in nodes}
        results = {}
        for node, future in futures.items():
            try:
                results[node] = future.result(timeout=300)
            except Exception as err:
                raise AssertionError(f"worker {node} raised {err!r}; log:\n" + "\n".join(logs[node])) from err
    return results, logs


def states(cluster, schema, app):
    _index, entries = cluster.client().kv.get(schema.nodes_prefix(app), recurse=True)
    return {schema.node_name(app, e["Key"]): NodeState.from_json(e["Value"], e["Key"]) for e in entries or ()}


def assert_clean(cluster, schema, app, nodes):
    """No slot is left held and no worker session is left behind."""
    _index, slots = cluster.client().kv.get(schema.app_prefix(app) + "slots/", recurse=True)
    assert not [slot["Key"] for slot in slots or () if slot.get("Session")]
    index = {name: i for i, name in enumerate(cluster.node_names)}
    for node in nodes:
        _index, sessions = cluster.client(index[node]).session.node(node)
        assert not [s for s in sessions if s.get("Name", "").startswith("fireap pull")], node


@pytest.mark.parametrize("fanout", [1, 2, 5])
def test_every_node_pulls_once_through_a_shallow_tree(cluster, schema, fanout):
    app = f"app{fanout}"
    release, plan = fire(cluster, schema, app, fanout)
    task = Task()
    results, logs = run_workers(cluster, schema, app, list(plan), task)

    final = states(cluster, schema, app)
    for node, result in results.items():
        assert result.ran_task and result.state == final[node], "\n".join(logs[node])
        assert result.state.status == "done" and result.state.has("v1") and result.state.run_id == release.run_id
    assert sorted(node for node, _source in task.calls) == sorted(plan)  # once per node
    # Each node's depth is its source's depth + 1 and its source was done.
    for node in plan:
        source = final[node].source
        assert final[source].has("v1") and final[node].depth == final[source].depth + 1
    assert max(state.depth for state in final.values()) <= stage_count(NODES, fanout)
    # At most k pullers per source at any moment (counted inside the task).
    assert max(task.peak.values()) <= fanout
    # The task got each source's catalog address.
    for _node, source in task.calls:
        assert source.address == cluster.client().catalog.node(source.name)[1]["Node"]["Address"]
    assert_clean(cluster, schema, app, plan)


def test_a_failed_source_is_never_used_and_its_pullers_fall_back(cluster, schema):
    app = "fails"
    _release, plan = fire(cluster, schema, app, 2)
    order = schedule_order(cluster.node_names, cluster.node_names[0])
    broken = order[1]  # a stage-1 node: several later nodes planned to pull from it
    assert sum(entry.source == broken for entry in plan.values()) >= 2
    task = Task(failing={broken})
    results, logs = run_workers(cluster, schema, app, list(plan), task)

    final = states(cluster, schema, app)
    assert final[broken].status == "failed" and final[broken].error == f"simulated failure on {broken}"
    assert results[broken].failed
    for node in plan:
        if node != broken:
            assert final[node].status == "done", "\n".join(logs[node])
            assert final[node].source != broken
    fell_back = [node for node, entry in plan.items() if entry.source == broken]
    for node in fell_back:
        assert any(f"source {broken} failed: simulated failure on {broken}" in line for line in logs[node])
    assert all(source.name != broken for _node, source in task.calls)
    assert max(task.peak.values()) <= 2
    assert_clean(cluster, schema, app, plan)


def test_a_planned_source_that_never_starts_is_replaced_after_the_grace(cluster, schema):
    app = "absent"
    _release, plan = fire(cluster, schema, app, 2)
    order = schedule_order(cluster.node_names, cluster.node_names[0])
    silent = order[2]  # planned as a source, but its worker never runs
    workers = [node for node in plan if node != silent]
    task = Task()
    results, logs = run_workers(cluster, schema, app, workers, task)

    assert all(result.state.status == "done" for result in results.values())
    for node, entry in plan.items():
        if entry.source == silent:
            assert results[node].state.source != silent
            assert any(f"source {silent} has not started run" in line for line in logs[node])
    assert silent not in states(cluster, schema, app)


def test_a_source_whose_session_ends_mid_pull_counts_as_crashed(cluster, schema):
    app = "crash"
    release, plan = fire(cluster, schema, app, 1, targets=cluster.node_names[:3])
    leader, first, second = schedule_order(cluster.node_names[:3], cluster.node_names[0])
    assert plan[second] == PlanEntry(run_id=release.run_id, source=leader, stage=2, slot=0, after=first)
    # `first` claims the leader's slot and writes "pulling", then its process dies.
    client = cluster.client(1)
    session = client.session.create(node=first, lock_delay=0, ttl=30)
    assert client.kv.put(schema.slot(app, leader, 0), first, acquire=session)
    pulling = NodeState(version="v1", run_id=release.run_id, status="pulling", started=time.time(), source=leader,
                        depth=1)
    assert client.kv.put(schema.node(app, first), pulling.to_json(), acquire=session)
    task = Task()
    box = {}
    thread = threading.Thread(target=lambda: box.update(run_workers(cluster, schema, app, [second], task)[0]))
    thread.start()
    time.sleep(0.5)
    client.session.destroy(session)
    thread.join(120)
    assert box[second].state.status == "done" and box[second].state.source == leader


def four_nodes_with_a_stage_two_puller(cluster, schema, app):
    """Fire with fan-out 1 to the leader and three nodes: ``first`` (stage 1, from the leader)
    is recorded done; ``puller`` (stage 2) plans to pull from ``first`` with no predecessor."""
    targets = cluster.node_names[:4]
    release, plan = fire(cluster, schema, app, 1, targets=targets)
    leader, first, _second, puller = schedule_order(targets, cluster.node_names[0])
    assert plan[puller] == PlanEntry(run_id=release.run_id, source=first, stage=2, slot=0)
    return release, leader, first, puller


@pytest.mark.parametrize("double, how", [("kind", "stop"), ("unkind", "stop"), ("unkind", "leave")])
def test_a_puller_whose_source_goes_down_mid_task_moves_to_another_source(request, double, how):
    """The source's node fails while we pull from it: a crash (``stop``) or a clean ``leave``. On
    Consul (the ``unkind`` double) a crashed node stays passing until gossip failure detection
    marks it (DETECTION s later), a node that left has no checks at all; either way the failed
    task is the source's and the puller ends done from another source."""
    cluster = request.getfixturevalue("cluster") if double == "kind" else request.getfixturevalue("unkind")()
    timings = FAST if double == "kind" else REALISTIC
    schema = Schema(f"fireap-test/{uuid.uuid4().hex}/")
    app = f"srcdown{how}"
    release, leader, first, puller = four_nodes_with_a_stage_two_puller(cluster, schema, app)
    done = NodeState(version="v1", run_id=release.run_id, status="done", started=time.time(), source=leader, depth=1,
                     finished=time.time())
    assert cluster.client().kv.put(schema.node(app, first), done.to_json())
    task = Task()

    def source_goes(source):
        if source.name == first:
            control(cluster, f"agents/{first}/{how}")
            task.calls.append((puller, source))
            return False, "rsync: connection refused"
        return task.for_node(puller)(source)

    lines = []
    try:
        result = pull(cluster.client(cluster.node_names.index(puller)), app, puller, source_goes, schema=schema,
                      timings=timings, log=lines.append)
    finally:
        control(cluster, f"agents/{first}/start")
    assert result.ran_task and result.state.status == "done" and result.state.source == leader, "\n".join(lines)
    assert result.state.depth == 1 and result.state.error is None
    assert [source.name for _node, source in task.calls] == [first, leader]
    assert f"looking for another source: source {first} went down during the pull: rsync: connection refused" in lines
    assert states(cluster, schema, app)[puller] == result.state
    assert_clean(cluster, schema, app, [puller])
    cluster.client().kv.delete(schema.prefix, recurse=True)


def test_a_claim_after_the_release_was_aborted_is_refused_and_runs_nothing(cluster, schema):
    app = "late"
    release, leader, first, puller = four_nodes_with_a_stage_two_puller(cluster, schema, app)
    patient = PullTimings(watch_timeout=120, start_grace=60, busy_grace=60, max_wait=10)
    task = Task()
    box = {}
    control(cluster, "stats", "DELETE")
    thread = threading.Thread(
        target=lambda: box.setdefault("run", run_workers(cluster, schema, app, [puller], task, patient))
    )
    thread.start()
    # One txn read, then a blocking read of its source's record: the worker is waiting.
    wait_until(lambda: control(cluster, "stats", "GET")["agents"][puller]["requests"] >= 2, 60, f"{puller} waiting")
    client = cluster.client()
    aborted = ReleaseRecord(**{**release.__dict__, "status": "aborted", "aborted_reason": "over the failure budget"})
    client.kv.put(schema.release(app), aborted.to_json())
    # Its source finishes right after the abort: the wait ends on that change, not on a timeout.
    done = NodeState(version="v1", run_id=release.run_id, status="done", started=time.time(), source=leader, depth=1,
                     finished=time.time())
    client.kv.put(schema.node(app, first), done.to_json())
    thread.join(120)
    results, logs = box["run"]
    result = results[puller]
    assert result.failed and result.state.error == f"release {release.run_id} was aborted: over the failure budget"
    assert task.calls == [] and not result.ran_task
    assert any(f"not claiming a slot on {first}: the release record changed" in line for line in logs[puller]), logs
    assert states(cluster, schema, app)[puller] == result.state
    assert_clean(cluster, schema, app, [puller])


def test_a_node_done_at_the_version_runs_nothing_again(cluster, schema):
    app = "again"
    _release, plan = fire(cluster, schema, app, 3, targets=cluster.node_names[:4])
    run_workers(cluster, schema, app, list(plan), Task())
    task = Task()
    results, _logs = run_workers(cluster, schema, app, list(plan), task)
    assert task.calls == []
    assert all(not r.ran_task and r.reason == "already done at version v1" for r in results.values())


def test_non_targets_and_the_leader_stop_at_once(cluster, schema):
    app = "outside"
    fire(cluster, schema, app, 2, targets=cluster.node_names[:3])
    outsider, leader = cluster.node_names[5], cluster.node_names[0]
    task = Task()
    results, _logs = run_workers(cluster, schema, app, [outsider, leader], task)
    assert "not a target of run" in results[outsider].reason and results[outsider].state is None
    assert results[leader].reason == "already done at version v1" and results[leader].state.depth == 0
    assert task.calls == []


def test_an_abort_stops_a_waiting_worker_and_records_why(cluster, schema):
    app = "abort"
    release, plan = fire(cluster, schema, app, 1, targets=cluster.node_names[:3])
    waiting = next(node for node, entry in plan.items() if entry.stage == 2)
    task = Task()
    box = {}
    patient = PullTimings(watch_timeout=120, start_grace=60, busy_grace=60, max_wait=1)
    thread = threading.Thread(
        target=lambda: box.update(run_workers(cluster, schema, app, [waiting], task, patient)[0])
    )
    control(cluster, "stats", "DELETE")
    thread.start()
    client = cluster.client()
    # A waiting worker writes nothing: it is waiting once it read its records and its predecessor.
    wait_until(lambda: control(cluster, "stats", "GET")["agents"][waiting]["requests"] >= 2, 60, f"{waiting} waiting")
    assert client.kv.get(schema.node(app, waiting))[1] is None
    aborted = ReleaseRecord(**{**release.__dict__, "status": "aborted", "aborted_reason": "operator"})
    client.kv.put(schema.release(app), aborted.to_json())
    thread.join(120)
    result = box[waiting]
    assert result.failed and result.state.error == f"release {release.run_id} was aborted: operator"
    assert task.calls == []
    assert states(cluster, schema, app)[waiting] == result.state


def test_watch_timeout_gives_up_with_a_failed_record(cluster, schema):
    app = "timeout"
    _release, plan = fire(cluster, schema, app, 1, targets=cluster.node_names[:3])
    waiting = next(node for node, entry in plan.items() if entry.stage == 2)
    timings = PullTimings(watch_timeout=1.5, start_grace=60, busy_grace=60, max_wait=1)
    results, _logs = run_workers(cluster, schema, app, [waiting], Task(), timings)
    assert results[waiting].failed
    assert results[waiting].state.error.startswith("timed out after 1.5s waiting for a source")
    assert_clean(cluster, schema, app, [waiting])


def test_a_malformed_release_is_a_clear_error(cluster, schema):
    cluster.client().kv.put(schema.release("broken"), json.dumps({"app": "broken"}))
    node = cluster.node_names[1]
    with pytest.raises(PullError, match=f"malformed KV key '{schema.release('broken')}': missing field 'version'"):
        pull(cluster.client(1), "broken", node, Task().for_node(node), schema=schema, timings=FAST)


def control(cluster, path, method="PUT"):
    """The double's /_devcluster/ endpoints, always through the leader's agent (agent 0)."""
    response = cluster.http(method, f"/_devcluster/{path}", 0)
    assert response.status_code == 200, response.text
    return response.json()


def test_requests_per_node_stay_constant_without_any_listing(cluster, schema):
    app = "cost"
    addresses = {node["Node"]: node["Address"] for node in cluster.client().catalog.nodes()[1]}
    _release, plan = fire(cluster, schema, app, 2, addresses=addresses)
    control(cluster, "stats", "DELETE")
    patient = PullTimings(watch_timeout=120, start_grace=30, busy_grace=30, max_wait=10)
    _results, logs = run_workers(cluster, schema, app, list(plan), Task(), patient)
    stats = control(cluster, "stats", "GET")["agents"]
    # Each worker talks only to its own agent: one txn reading the release and its own record,
    # one read of its plan entry (under the run ID the release names), session create/destroy,
    # one claim txn, one txn releasing the slot with the final record, and
    # blocking reads of the node waited on (as many as that record changes: not a constant, so
    # not bounded here). No node lists the other nodes' records or reads the catalog (the plan
    # carries the addresses, as fireap_fire writes it).
    assert all(not any("looking for another source" in line for line in lines) for lines in logs.values())
    fixed = {"GET /v1/kv/": 1, "PUT /v1/session/create": 1, "PUT /v1/session/destroy/": 1, "PUT /v1/txn": 3}
    for node in plan:
        routes = dict(stats[node]["routes"])
        routes.pop("GET /v1/kv/ (blocking)", None)
        assert routes == fixed, node


def test_the_task_and_its_report_survive_the_agent_restarting(cluster, schema):
    app = "restart"
    leader, node = cluster.node_names[0], cluster.node_names[1]
    fire(cluster, schema, app, 1, targets=[leader, node])
    restarted = threading.Event()

    def crash_during_task(source):
        control(cluster, f"agents/{node}/stop")

        def start_again():
            time.sleep(1)
            control(cluster, f"agents/{node}/start")
            restarted.set()

        threading.Thread(target=start_again).start()
        return Task().for_node(node)(source)

    index = cluster.node_names.index(node)
    lines = []
    result = pull(cluster.client(index), app, node, crash_during_task, schema=schema, timings=FAST, log=lines.append)
    assert restarted.wait(30)
    assert result.ran_task and result.state.status == "done", "\n".join(lines)
    assert states(cluster, schema, app)[node] == result.state
    assert any("retrying in" in line for line in lines)
    assert_clean(cluster, schema, app, [node])


def test_a_session_lost_while_the_task_runs_is_reported_and_the_pull_completes(cluster, schema):
    app = "lost"
    leader, node = cluster.node_names[0], cluster.node_names[2]
    fire(cluster, schema, app, 1, targets=[leader, node])
    client = cluster.client(2)

    def lose_session(source):
        for session in client.session.node(node)[1]:
            client.session.destroy(session["ID"])
        return True, None

    lines = []
    result = pull(client, app, node, lose_session, schema=schema, timings=FAST, log=lines.append)
    assert result.ran_task and result.state.status == "done"
    assert states(cluster, schema, app)[node] == result.state
    assert any("was no longer held by this worker" in line for line in lines), lines
    assert f"session lost: writing {schema.node(app, node)} with check-and-set instead" in lines


def test_the_source_address_comes_from_the_plan(cluster, schema):
    app = "address"
    leader, node = cluster.node_names[0], cluster.node_names[1]
    fire(cluster, schema, app, 1, targets=[leader, node], addresses={leader: "192.0.2.7"})
    task = Task()
    run_workers(cluster, schema, app, [node], task)
    assert task.calls == [(node, SourceInfo(leader, "192.0.2.7"))]


class _WithoutGetOrEmpty:
    """A client of an agent older than Consul 1.14: /v1/txn refuses the "get-or-empty" verb."""

    def __init__(self, client):
        self.client = client
        self.txn = self

    def put(self, ops):
        if any(op["KV"]["Verb"] == "get-or-empty" for op in ops):
            raise consul.ConsulException('400 Failed to parse body: unknown KV verb "get-or-empty"')
        return self.client.txn.put(ops)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_an_agent_without_read_transactions_is_read_key_by_key(cluster, schema):
    app = "oldagent"
    leader, node = cluster.node_names[0], cluster.node_names[3]
    fire(cluster, schema, app, 1, targets=[leader, node])
    lines = []
    client = _WithoutGetOrEmpty(cluster.client(3))
    result = pull(client, app, node, Task().for_node(node), schema=schema, timings=FAST, log=lines.append)
    assert result.state.status == "done" and result.ran_task
    assert sum("reading key by key" in line for line in lines) == 1, lines


# --- Consul as unkind as it is: missing keys woken by other writes --------------------------------

@pytest.mark.parametrize("missing_key", [MISSING_KEY_WAKE, MISSING_KEY_BLOCK])
def test_every_node_pulls_once_on_an_unkind_double(unkind, missing_key):
    """The whole propagation where Consul wakes (or raises the index of) reads of records that do not
    exist yet on every write nearby: every node ends done, once, within the fan-out."""
    cluster = unkind(missing_key)
    schema = Schema(f"fireap-test/{uuid.uuid4().hex}/")
    app = "unkindall"
    release, plan = fire(cluster, schema, app, 2)
    task = Task()
    try:
        results, logs = run_workers(cluster, schema, app, list(plan), task, REALISTIC)
        final = states(cluster, schema, app)
    finally:
        cluster.client().kv.delete(schema.prefix, recurse=True)
    for node, result in results.items():
        assert result.state.status == "done" and result.state.run_id == release.run_id, "\n".join(logs[node])
        assert final[node] == result.state
    assert sorted(node for node, _source in task.calls) == sorted(plan)
    assert max(task.peak.values()) <= 2


def write_elsewhere(cluster, schema, app, node, stop):
    """Keep rewriting another node's record (as a busy rollout does) until ``stop`` is set: each
    write wakes, or raises the index of, Consul's blocking reads of missing keys nearby."""
    client = cluster.client()
    n = 0
    while not stop.is_set():
        n += 1
        client.kv.put(schema.node(app, node), json.dumps({"noise": n}))
        time.sleep(0.02)


@pytest.mark.parametrize("missing_key", [MISSING_KEY_WAKE, MISSING_KEY_BLOCK])
def test_an_abort_reaches_a_worker_blocked_on_a_missing_record_within_one_wait(unkind, missing_key):
    """The source's record does not exist yet: Consul wakes (or raises the index of) the blocking read
    on every write to a key nearby. The worker still re-reads the release within max_wait."""
    cluster = unkind(missing_key)
    schema = Schema(f"fireap-test/{uuid.uuid4().hex}/")
    app = "abortmissing"
    release, _leader, first, puller = four_nodes_with_a_stage_two_puller(cluster, schema, app)
    assert cluster.client().kv.get(schema.node(app, first))[1] is None
    stop = threading.Event()
    writer = threading.Thread(target=write_elsewhere, args=(cluster, schema, app, cluster.node_names[5], stop))
    box = {}
    worker = threading.Thread(
        target=lambda: box.setdefault("run", run_workers(cluster, schema, app, [puller], Task(), REALISTIC))
    )
    try:
        control(cluster, "stats", "DELETE")
        writer.start()
        worker.start()
        wait_until(lambda: control(cluster, "stats", "GET")["agents"][puller]["requests"] >= 3, 30, f"{puller} waiting")
        aborted = ReleaseRecord(**{**release.__dict__, "status": "aborted", "aborted_reason": "operator"})
        cluster.client().kv.put(schema.release(app), aborted.to_json())
        began = time.monotonic()
        worker.join(REALISTIC.max_wait * 3)
        seen_after = time.monotonic() - began
    finally:
        stop.set()
        writer.join()
        worker.join(60)
        cluster.client().kv.delete(schema.prefix, recurse=True)
    result = box["run"][0][puller]
    assert result.failed and result.state.error == f"release {release.run_id} was aborted: operator"
    assert seen_after < REALISTIC.max_wait + REALISTIC.absent_pause + 1.0


def test_requests_of_a_worker_blocked_on_a_missing_record_stay_bounded_under_writes_nearby(unkind):
    """Consul before not-found blocking returns a read of a missing key on every write under its
    nearest radix node: without spacing those reads the requests would follow the cluster's writes."""
    cluster = unkind(MISSING_KEY_WAKE)
    schema = Schema(f"fireap-test/{uuid.uuid4().hex}/")
    app = "manywrites"
    release, _leader, _first, puller = four_nodes_with_a_stage_two_puller(cluster, schema, app)
    stop = threading.Event()
    writer = threading.Thread(target=write_elsewhere, args=(cluster, schema, app, cluster.node_names[5], stop))
    timings = PullTimings(watch_timeout=5, start_grace=60, busy_grace=60, max_wait=2, absent_pause=0.5)
    control(cluster, "stats", "DELETE")
    writer.start()
    try:
        results, _logs = run_workers(cluster, schema, app, [puller], Task(), timings)
    finally:
        stop.set()
        writer.join()
        cluster.client().kv.delete(schema.prefix, recurse=True)
    assert results[puller].state.error.startswith("timed out after 5s waiting for a source")
    stats = control(cluster, "stats", "GET")["agents"]
    # 5 s of waiting: one read per absent_pause at most, the release every max_wait, start and end.
    bound = 5 / 0.5 + 5 / 2 + 6
    assert stats[puller]["requests"] <= bound, stats[puller]["routes"]
    # Each write woke the worker's read: without the spacing it would have sent one read per write.
    assert stats[cluster.node_names[0]]["routes"].get("PUT /v1/kv/", 0) > 2 * bound


# --- hostile values in KV: every target ends with a record, nothing hostile reaches a command -----


def fake_ssh(directory) -> str:
    """An ``ssh`` that, like OpenSSH, runs the command of a ``-oProxyCommand=`` option."""
    path = directory / "ssh"
    path.write_text(
        "#!/bin/sh\n"
        "for arg in \"$@\"; do\n"
        "  case $arg in -oProxyCommand=*) /bin/sh -c \"${arg#-oProxyCommand=}\" ;; esac\n"
        "done\n"
        "exit 255\n"
    )
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def ssh(tmp_path):
    """OpenSSH's client when installed, else a stand-in that handles ProxyCommand the same way."""
    return shutil.which("ssh") or fake_ssh(tmp_path)


class ShellTask(Task):
    """The injected run_task running a real command: ``template`` filled in with the source by
    the quoting layer alone, so whatever address reaches the task reaches the command."""

    def __init__(self, template):
        super().__init__()
        self.template = template

    def for_node(self, node):
        def run_task(source: SourceInfo):
            with self.lock:
                self.calls.append((node, source))
            values = {"app": "app", "version": "v1", "node": node, "remote.name": source.name,
                      "remote.address": source.address}
            done = subprocess.run(["/bin/sh", "-c", fill_template(self.template, values)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, check=False)
            return done.returncode == 0, done.stdout.decode(errors="replace")

        return run_task


@pytest.fixture
def no_slot_lists(monkeypatch):
    """Fails the pull if a node builds the list of a source's slots (sized by the fan-out)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a slot list was built: slot_order{args}")

    monkeypatch.setattr(_propagation, "slot_order", refuse)


def two_nodes(cluster, schema, app):
    """Fire with fan-out 1 to the leader and one node (stage 1, from the leader)."""
    leader, node = cluster.node_names[0], cluster.node_names[1]
    release, plan = fire(cluster, schema, app, 1, targets=[leader, node])
    return release, plan[node], leader, node


def pull_one(cluster, node, app, task, schema, timings=FAST):
    lines = []
    result = pull(cluster.client(cluster.node_names.index(node)), app, node, task.for_node(node), schema=schema,
                  timings=timings, log=lines.append)
    return result, lines


def assert_recorded_failed(cluster, schema, app, node, result, release, naming):
    """The pull ended failed, unrun, with a record in KV naming the problem."""
    assert result.failed and not result.ran_task
    recorded = states(cluster, schema, app)[node]
    assert recorded == result.state
    assert (recorded.status, recorded.run_id, recorded.version) == ("failed", release.run_id, release.version)
    assert naming in recorded.error
    assert "\n" not in recorded.error and len(recorded.error) < 1000
    assert_clean(cluster, schema, app, [node])
    return recorded


def test_hostile_plan_address_never_reaches_the_command_and_the_run_is_recorded_failed(cluster, schema, tmp_path, ssh):
    app = "hostaddr"
    release, entry, _leader, node = two_nodes(cluster, schema, app)
    marker = tmp_path / "x"
    hostile = f"-oProxyCommand=touch {marker}"
    # The hostile address makes the real command run code when it reaches it: the test is live.
    subprocess.run(["/bin/sh", "-c", fill_template(f"{ssh} -o BatchMode=yes {{{{ remote.address }}}} true",
                                                   {"remote.address": hostile})],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert marker.exists()
    marker.unlink()
    assert cluster.client().kv.put(schema.plan(app, release.run_id, node), json.dumps({**entry.to_dict(), "source_address": hostile}))
    task = ShellTask(f"{ssh} -o BatchMode=yes -o ConnectTimeout=5 {{{{ remote.address }}}} true")
    result, lines = pull_one(cluster, node, app, task, schema)
    assert not marker.exists()
    assert task.calls == []
    recorded = assert_recorded_failed(cluster, schema, app, node, result, release,
                                      f"malformed KV key '{schema.plan(app, release.run_id, node)}': field 'source_address'")
    assert "neither an IP address nor a host name" in recorded.error, lines


@pytest.mark.parametrize("field", ["source", "after"])
def test_hostile_self_sourced_plan_is_recorded_failed(cluster, schema, field):
    app = f"self{field}"
    release, entry, _leader, node = two_nodes(cluster, schema, app)
    assert cluster.client().kv.put(schema.plan(app, release.run_id, node), json.dumps({**entry.to_dict(), field: node}))
    task = Task()
    result, _lines = pull_one(cluster, node, app, task, schema)
    assert task.calls == []
    assert_recorded_failed(cluster, schema, app, node, result, release,
                           f"the plan entry of run {release.run_id} names this node as its own source")
    # Recorded once: a second worker does not write it again.
    again, _lines = pull_one(cluster, node, app, task, schema)
    assert again.state == result.state and again.reason.startswith(f"already failed in run {release.run_id}")


@pytest.mark.parametrize("field, value", [
    ("stage", 0), ("slot", 10**12), ("source", "-oProxyCommand=x"), ("source_address", "a;touch x"),
    ("after", "a\nb"),
])
def test_hostile_malformed_plan_is_recorded_failed(cluster, schema, field, value):
    app = f"badplan-{field}"
    release, entry, _leader, node = two_nodes(cluster, schema, app)
    assert cluster.client().kv.put(schema.plan(app, release.run_id, node), json.dumps({**entry.to_dict(), field: value}))
    task = Task()
    result, _lines = pull_one(cluster, node, app, task, schema)
    assert task.calls == []
    assert_recorded_failed(cluster, schema, app, node, result, release,
                           f"malformed KV key '{schema.plan(app, release.run_id, node)}': field '{field}'")


def test_hostile_fanout_release_is_recorded_failed_without_a_slot_list(cluster, schema, no_slot_lists):
    app = "hugefanout"
    release, _entry, _leader, node = two_nodes(cluster, schema, app)
    assert cluster.client().kv.put(schema.release(app), json.dumps({**release.to_dict(), "fanout": 10**12}))
    task = Task()
    result, _lines = pull_one(cluster, node, app, task, schema)
    assert task.calls == []
    recorded = assert_recorded_failed(cluster, schema, app, node, result, release,
                                      f"malformed KV key '{schema.release(app)}': field 'fanout'")
    assert "fanout must be an integer from 1 to 64, got 1000000000000" in recorded.error


def test_hostile_release_turning_malformed_while_a_worker_waits_is_recorded_failed(cluster, schema, no_slot_lists):
    app = "turnsbad"
    release, plan = fire(cluster, schema, app, 1, targets=cluster.node_names[:3])
    waiting = next(node for node, entry in plan.items() if entry.stage == 2)
    task = Task()
    box = {}
    patient = PullTimings(watch_timeout=120, start_grace=60, busy_grace=60, max_wait=1)
    thread = threading.Thread(
        target=lambda: box.setdefault("run", run_workers(cluster, schema, app, [waiting], task, patient))
    )
    control(cluster, "stats", "DELETE")
    thread.start()
    wait_until(lambda: control(cluster, "stats", "GET")["agents"][waiting]["requests"] >= 2, 60, f"{waiting} waiting")
    cluster.client().kv.put(schema.release(app), json.dumps({**release.to_dict(), "fanout": 10**12}))
    thread.join(120)
    results, logs = box["run"]
    result = results[waiting]
    assert task.calls == []
    assert any("field 'fanout'" in line and "starting over" in line for line in logs[waiting]), logs[waiting]
    assert_recorded_failed(cluster, schema, app, waiting, result, release,
                           f"malformed KV key '{schema.release(app)}': field 'fanout'")


@pytest.mark.parametrize("version", ["v1\nFORGED", "-v1", "v" * 10240])
def test_hostile_version_stops_the_pull_with_an_error_on_one_line(cluster, schema, version):
    app = "badversion"
    release, _entry, _leader, node = two_nodes(cluster, schema, app)
    assert cluster.client().kv.put(schema.release(app), json.dumps({**release.to_dict(), "version": version}))
    task = Task()
    with pytest.raises(PullError) as info:
        pull_one(cluster, node, app, task, schema)
    message = str(info.value)
    assert f"malformed KV key '{schema.release(app)}': field 'version'" in message
    assert "\n" not in message and len(message) < 1000
    assert task.calls == []
    assert node not in states(cluster, schema, app)


class _HostileCatalog:
    """A client whose catalog gives node ``name`` the address ``address``."""

    def __init__(self, client, name, address):
        self.client = client
        self.name = name
        self.address = address
        self.catalog = self

    def node(self, name, *args, **kwargs):
        index, info = self.client.catalog.node(name, *args, **kwargs)
        if name == self.name:
            info = {**info, "Node": {**info["Node"], "Address": self.address}}
        return index, info

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_hostile_catalog_address_of_a_source_makes_the_puller_use_another(cluster, schema, tmp_path):
    app = "hostcatalog"
    release, leader, first, puller = four_nodes_with_a_stage_two_puller(cluster, schema, app)
    done = NodeState(version="v1", run_id=release.run_id, status="done", started=time.time(), source=leader, depth=1,
                     finished=time.time())
    assert cluster.client().kv.put(schema.node(app, first), done.to_json())
    hostile = f"-oProxyCommand=touch {tmp_path / 'x'}"
    client = _HostileCatalog(cluster.client(cluster.node_names.index(puller)), first, hostile)
    task = Task()
    lines = []
    result = pull(client, app, puller, task.for_node(puller), schema=schema, timings=FAST, log=lines.append)
    assert result.state.status == "done" and result.state.source != first, lines
    assert [source.name for _node, source in task.calls] == [result.state.source]
    assert all(source.address != hostile for _node, source in task.calls)
    assert any(f"source {first} is unusable: the catalog address of node {first}" in line
               and "neither an IP address nor a host name" in line for line in lines), lines
    assert not (tmp_path / "x").exists()
    assert_clean(cluster, schema, app, [puller])


def test_hostile_huge_integer_time_in_the_release_is_recorded_failed(cluster, schema):
    app = "hugetime"
    release, _entry, _leader, node = two_nodes(cluster, schema, app)
    record = json.dumps({**release.to_dict(), "fired_at": 10**400})
    assert cluster.client().kv.put(schema.release(app), record)
    task = Task()
    result, _lines = pull_one(cluster, node, app, task, schema)
    assert task.calls == []
    assert_recorded_failed(cluster, schema, app, node, result, release,
                           f"malformed KV key '{schema.release(app)}': field 'fired_at'")


def test_hostile_deeply_nested_own_record_is_treated_as_absent(cluster, schema):
    app = "nested"
    _release, _entry, _leader, node = two_nodes(cluster, schema, app)
    assert cluster.client().kv.put(schema.node(app, node), "[" * 200_000)
    task = Task()
    result, lines = pull_one(cluster, node, app, task, schema)
    assert result.state.status == "done" and any("ignoring malformed KV key" in line for line in lines)
