"""Where Consul is unkind, and the double must be too (its default, ``Realism()``).

Each test names the Consul document or source it follows. Against a real agent
(FIREAP_TEST_CONSUL_HTTP_ADDR) only the tests that need the double's /_devcluster/ endpoints
(stopping, leaving, gossip settings) are skipped.

Sources: https://developer.hashicorp.com/consul/docs/concepts/gossip (failure detection),
https://developer.hashicorp.com/consul/commands/leave (a left node is deregistered),
https://developer.hashicorp.com/consul/api-docs/features/blocking and hashicorp/consul
agent/blockingquery/blockingquery.go (missing keys), hashicorp/consul#9449 (older releases),
hashicorp/serf serf/serf.go ``UserEvent`` and hashicorp/consul agent/user_event.go (the
512-byte event limit), https://developer.hashicorp.com/consul/api-docs/txn (64 operations
before 1.14, 128 from 1.14), hashicorp/consul agent/http.go and agent/agent_endpoint.go (?dc).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from consul_harness import in_background, real_target_from_env, unique_name
from devcluster.consul import CONSUL_GOSSIP, MISSING_KEY_BLOCK, MISSING_KEY_WAKE, Gossip, Realism
from devcluster.consul.realism import failure_detection_seconds
from devcluster.polling import wait_until

README = Path(__file__).resolve().parents[3] / "devcluster" / "README.md"
SETTLE = 0.5  # time given to a blocking request to reach the agent before the test writes
WAKE_TIMEOUT = 20.0
#: The failure detection of the unkind double: short, so that the tests waiting for it stay short.
UNKIND_FAILURE_DETECTION = 2.0


@pytest.fixture(scope="module")
def unkind_target(make_double):
    """Consul as it is: the real agent named by the environment, else a 3-node double with
    Consul's behaviour (``Realism()``: failure detection, late and lossy gossip, missing keys
    as Consul 1.22 blocks on them, Serf's event size limit only), failure detection shortened."""
    real = real_target_from_env()
    if real is not None:
        yield real
        real.close()
        return
    realism = Realism(failure_detection=UNKIND_FAILURE_DETECTION)
    with make_double(nodes=3, realism=realism, name="devcluster-unkind") as target:
        yield target


@pytest.fixture(scope="module")
def versioned_double(make_double):
    """``versioned_double(version)``: a 1-node double reporting that Consul version (started once)."""
    started = {}

    def get(version: str):
        if version not in started:
            started[version] = make_double(nodes=1, realism=Realism(consul_version=version),
                                           name=f"devcluster-{version}")
        return started[version]

    yield get
    for target in started.values():
        target.close()


def _health(target, node: str, agent: int = 0) -> list[dict]:
    response = target.http("GET", f"/v1/health/node/{node}", agent)
    assert response.status_code == 200, response.text
    return response.json()


def _serf_status(target, node: str, agent: int = 0) -> str | None:
    return next((c["Status"] for c in _health(target, node, agent) if c["CheckID"] == "serfHealth"), None)


def _member_status(target, node: str) -> int:
    members = target.http("GET", "/v1/agent/members").json()
    return next(m["Status"] for m in members if m["Name"] == node)


def _session_on(target, agent: int) -> str:
    response = target.http("PUT", "/v1/session/create", agent, json_body={"LockDelay": "0s"})
    assert response.status_code == 200, response.text
    return response.json()["ID"]


def _session_alive(target, session_id: str) -> bool:
    return target.http("GET", f"/v1/session/info/{session_id}").json() != []


# --- a node that goes ----------------------------------------------------------------------


@pytest.mark.double_only
def test_a_crashed_node_stays_passing_with_valid_sessions_until_gossip_detects_it(unkind_target, kv_prefix):
    """Gossip: a node that stops answering is suspected, then declared failed after the suspicion
    timeout; only then does serfHealth turn critical and invalidate the sessions bound to it."""
    node = unkind_target.node_names[2]
    session_id = _session_on(unkind_target, 2)
    key = kv_prefix + "held"
    assert unkind_target.client(2).kv.put(key, "x", acquire=session_id)
    stopped = time.monotonic()
    unkind_target.double.stop_agent(node)
    try:
        assert _serf_status(unkind_target, node) == "passing"
        assert _session_alive(unkind_target, session_id)
        assert unkind_target.client().kv.get(key)[1]["Session"] == session_id
        assert _member_status(unkind_target, node) == 1  # alive: not detected yet
        wait_until(lambda: _serf_status(unkind_target, node) == "critical", 20, f"{node} detected")
        assert time.monotonic() - stopped >= UNKIND_FAILURE_DETECTION * 0.9
        assert not _session_alive(unkind_target, session_id)
        assert not unkind_target.client().kv.get(key)[1].get("Session")
        assert _member_status(unkind_target, node) == 4  # failed
    finally:
        unkind_target.double.start_agent(node)
    assert _serf_status(unkind_target, node) == "passing"


@pytest.mark.double_only
def test_a_node_that_leaves_is_deregistered_at_once_with_its_checks_and_sessions(unkind_target):
    """consul leave: the agent leaves gracefully; the servers deregister its node (catalog entry,
    services, checks: /v1/health/node answers []) and the sessions of that node end with it."""
    node = unkind_target.node_names[1]
    session_id = _session_on(unkind_target, 1)
    unkind_target.double.leave_agent(node)
    try:
        assert _health(unkind_target, node) == []
        assert unkind_target.http("GET", f"/v1/catalog/node/{node}").json() is None
        assert node not in [n["Node"] for n in unkind_target.http("GET", "/v1/catalog/nodes").json()]
        assert not _session_alive(unkind_target, session_id)
        assert _member_status(unkind_target, node) == 3  # left
    finally:
        unkind_target.double.start_agent(node)
    assert _serf_status(unkind_target, node) == "passing"
    assert _member_status(unkind_target, node) == 1


@pytest.mark.double_only
def test_passing_leaves_out_a_crashed_node_s_instances_once_detected_and_false_keeps_them(unkind_target):
    """health/service: ?passing drops the instances of a node whose serfHealth is critical;
    ?passing=false is strconv.ParseBool's false and filters nothing (agent/health_endpoint.go)."""
    node = unkind_target.node_names[2]
    name = unique_name("service")
    registered = unkind_target.http("PUT", "/v1/agent/service/register", 2, json_body={"Name": name, "ID": name + "-1"})
    assert registered.status_code == 200, registered.text

    def instances(**params) -> list[str]:
        response = unkind_target.http("GET", f"/v1/health/service/{name}", params=params)
        assert response.status_code == 200, response.text
        return [entry["Node"]["Node"] for entry in response.json()]

    wait_until(lambda: instances(passing="") == [node], 20, "the instance in the catalog")
    unkind_target.double.stop_agent(node)
    try:
        wait_until(lambda: _serf_status(unkind_target, node) == "critical", 20, f"{node} detected")
        assert instances(passing="") == [] and instances(passing="true") == []
        assert instances(passing="false") == [node] and instances() == [node]
    finally:
        unkind_target.double.start_agent(node)
        unkind_target.http("PUT", f"/v1/agent/service/deregister/{name}-1", 2)


# --- blocking reads of a missing key ---------------------------------------------------------


def _blocked_missing_read(target, key: str, wait: str):
    """A blocking read of the missing ``key`` at its current index, still waiting once it had time
    to reach the agent: (index, pending response)."""
    missing = target.http("GET", f"/v1/kv/{key}")
    assert missing.status_code == 404
    index = int(missing.headers["X-Consul-Index"])
    pending = in_background(target.http, "GET", f"/v1/kv/{key}", params={"index": index, "wait": wait}, timeout=60)
    time.sleep(SETTLE)
    return index, pending


def test_a_missing_key_read_comes_back_with_a_raised_index_though_the_key_never_changed(unkind_target, kv_prefix):
    """A missing key reports the whole KV table's index (kvsGetTxn); writes to keys that share its
    radix node re-run the blocking read, which comes back (woken, or at its timeout) still 404 with
    the raised index."""
    other = kv_prefix + "nodes/other"
    kv = unkind_target.client().kv
    kv.put(other, "0")
    index, pending = _blocked_missing_read(unkind_target, kv_prefix + "nodes/absent", "2s")
    for n in range(3):
        kv.put(other, str(n + 1))
    response = pending.result(timeout=WAKE_TIMEOUT)
    assert response.status_code == 404
    assert int(response.headers["X-Consul-Index"]) > index


def test_a_timed_out_missing_key_read_answers_from_its_last_run(unkind_target, kv_prefix):
    """blockingquery.Query returns at the timeout without running the query again: a write outside
    the radix node the read watches (here a key sharing only the test's prefix) does not show in
    the index it reports."""
    kv = unkind_target.client().kv
    kv.put(kv_prefix + "nodes/other", "0")
    index, pending = _blocked_missing_read(unkind_target, kv_prefix + "nodes/absent", "2s")
    kv.put(kv_prefix + "release", "1")
    response = pending.result(timeout=WAKE_TIMEOUT)
    assert response.status_code == 404
    assert int(response.headers["X-Consul-Index"]) == index


def test_a_missing_key_read_keeps_blocking_through_writes_elsewhere_until_the_key_is_created(
    unkind_target, kv_prefix
):
    """Consul 1.22 (agent/blockingquery: KVS.Get reports ErrNotFound): a write that does not create
    the key re-runs the query, which keeps blocking with the raised index; creating it returns it."""
    kv = unkind_target.client().kv
    kv.put(kv_prefix + "nodes/other", "0")
    index, pending = _blocked_missing_read(unkind_target, kv_prefix + "nodes/absent", "30s")
    kv.put(kv_prefix + "nodes/other", "1")
    time.sleep(SETTLE)
    assert not pending.done(), "a write to another key returned the blocking read of a missing key"
    kv.put(kv_prefix + "nodes/absent", "created")
    response = pending.result(timeout=WAKE_TIMEOUT)
    assert response.status_code == 200 and int(response.headers["X-Consul-Index"]) > index


@pytest.mark.double_only
def test_before_not_found_blocking_a_write_nearby_returns_a_missing_key_read(make_double):
    """hashicorp/consul#9449: before blocking queries kept blocking on "not found", the read watched
    memdb's radix node nearest to the key, so a write under the prefix they share returned it."""
    with make_double(nodes=1, realism=Realism(missing_key=MISSING_KEY_WAKE), name="devcluster-wake") as target:
        kv = target.client().kv
        kv.put("app/nodes/node-000", "0")
        kv.put("app/release", "0")
        index, pending = _blocked_missing_read(target, "app/nodes/node-005", "30s")
        kv.put("app/release", "1")  # shares only "app/": not the node the read watches
        time.sleep(SETTLE)
        assert not pending.done()
        kv.put("app/nodes/node-001", "1")  # shares "app/nodes/node-00" with it
        response = pending.result(timeout=WAKE_TIMEOUT)
        assert response.status_code == 404 and int(response.headers["X-Consul-Index"]) > index


# --- gossip ----------------------------------------------------------------------------------------


def _events(target, agent: int, name: str) -> list[dict]:
    response = target.http("GET", "/v1/event/list", agent, params={"name": name})
    assert response.status_code == 200, response.text
    return response.json()


def _fire(target, name: str, payload: bytes = b"x"):
    response = target.http("PUT", f"/v1/event/fire/{name}", data=payload)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def gossip_to(consul_target):
    """``gossip_to(agent, Gossip(...))`` sets how events reach one agent of the shared double; it is
    given Consul's gossip again afterwards."""
    changed = []

    def set_gossip(agent: int, gossip: Gossip) -> str:
        node = consul_target.node_names[agent]
        consul_target.double.set_gossip(node, gossip)
        changed.append(node)
        return node

    yield set_gossip
    for node in changed:
        consul_target.double.set_gossip(node, CONSUL_GOSSIP)


@pytest.mark.double_only
def test_a_fire_returns_before_gossip_has_carried_the_event(consul_target, gossip_to):
    """Gossip is asynchronous: the fire returns once the server queued the broadcast; an agent lists
    the event only when gossip reached it."""
    gossip_to(1, Gossip(delay=1.0))
    name = unique_name("event")
    fired = _fire(consul_target, name)
    assert _events(consul_target, 1, name) == []
    wait_until(lambda: [e["ID"] for e in _events(consul_target, 1, name)] == [fired["ID"]], 10, "the late event")


@pytest.mark.double_only
def test_gossip_can_lose_an_event_for_one_agent(consul_target, gossip_to):
    """Best-effort delivery: an agent may never get an event the others got."""
    gossip_to(1, Gossip(loss=1.0))
    name = unique_name("event")
    fired = _fire(consul_target, name)
    wait_until(lambda: _events(consul_target, 2, name), 10, "the event on agent 2")
    time.sleep(SETTLE)
    assert fired["ID"] not in [e["ID"] for e in _events(consul_target, 1, name)]


@pytest.mark.double_only
def test_gossip_can_deliver_an_event_twice(consul_target, gossip_to):
    """The setting for duplicated delivery: the agent's ring holds the event twice."""
    gossip_to(1, Gossip(duplicate=1.0))
    name = unique_name("event")
    fired = _fire(consul_target, name)
    wait_until(lambda: [e["ID"] for e in _events(consul_target, 1, name)] == [fired["ID"]] * 2, 10, "both copies")


@pytest.mark.double_only
def test_gossip_can_reorder_events_and_keeps_fire_order_otherwise(consul_target, gossip_to):
    """Events reach agents in no guaranteed order: late events may overtake each other (reorder);
    without reordering each agent gets them in fire order, however late."""
    gossip_to(1, Gossip(jitter=1.0, reorder=1.0))
    gossip_to(2, Gossip(jitter=1.0))
    name = unique_name("event")
    fired = [_fire(consul_target, name)["ID"] for _event in range(8)]
    for agent in (1, 2):
        wait_until(lambda agent=agent: len(_events(consul_target, agent, name)) == 8, 10, f"agent {agent}")
    assert [e["ID"] for e in _events(consul_target, 1, name)] != fired  # 1 chance in 8! to be in order
    assert [e["ID"] for e in _events(consul_target, 2, name)] == fired


# --- Serf's event size limit -----------------------------------------------------------------------

#: With this name, Serf measures 109 + n bytes before encoding and 141..149 + n after (the LTime's
#: msgpack size varies): serf.UserEvent of "consul:event:" + name and Consul's msgpack'd UserEvent.
SERF_NAME = "fireap-test-serf-limit"


def test_a_payload_far_above_100_bytes_is_fired(unkind_target):
    """The event endpoint reads the whole body; no limit of its own (agent/event_endpoint.go)."""
    response = unkind_target.http("PUT", f"/v1/event/fire/{SERF_NAME}", data=b"x" * 300)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "size, error",
    [
        (380, "encoded user event exceeds configured limit of 512 bytes after encoding"),
        (420, "user event exceeds configured limit of 512 bytes before encoding"),
    ],
)
def test_an_event_over_serfs_512_bytes_is_refused_with_500(unkind_target, size, error):
    """serf.UserEvent refuses an event whose name and payload exceed UserEventSizeLimit (512), before
    and after encoding; the fire answers 500 with Serf's error."""
    response = unkind_target.http("PUT", f"/v1/event/fire/{SERF_NAME}", data=b"x" * size)
    assert response.status_code == 500
    assert response.text.strip().endswith(error)


# --- transactions by Consul version ----------------------------------------------------------------


def _ops(prefix: str, count: int) -> list[dict]:
    return [{"KV": {"Verb": "get-tree", "Key": f"{prefix}{i}"}} for i in range(count)]


@pytest.mark.double_only
@pytest.mark.parametrize("version, limit", [("1.13.0", 64), ("1.22.0", 128)])
def test_a_txn_takes_64_operations_before_1_14_and_128_from_1_14(versioned_double, version, limit):
    """/v1/txn: at most 64 operations before Consul 1.14, 128 from 1.14; more is a 413."""
    target = versioned_double(version)
    assert target.http("GET", "/v1/agent/self").json()["Config"]["Version"] == version
    assert target.http("PUT", "/v1/txn", json_body=_ops("k", limit)).status_code == 200
    refused = target.http("PUT", "/v1/txn", json_body=_ops("k", limit + 1))
    assert refused.status_code == 413
    assert refused.text == f"Transaction contains too many operations ({limit + 1} > {limit})"


@pytest.mark.double_only
def test_get_or_empty_is_an_unknown_verb_before_1_14(versioned_double):
    """The "get-or-empty" KV verb came with 1.14; an older server's txn refuses an unknown verb."""
    ops = [{"KV": {"Verb": "get-or-empty", "Key": "k"}}]
    response = versioned_double("1.13.0").http("PUT", "/v1/txn", json_body=ops)
    assert response.status_code == 409
    assert response.json()["Errors"] == [{"OpIndex": 0, "What": 'unknown KV verb "get-or-empty"'}]


# --- datacenters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/agent/self", "/v1/agent/members", "/v1/event/list"])
def test_agent_local_endpoints_ignore_dc(unkind_target, path):
    """Agent endpoints and the event list answer from the agent's own memory: no RPC, no ?dc."""
    assert unkind_target.http("GET", path, params={"dc": "no-such-dc"}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/kv/fireap-test/any", "/v1/catalog/nodes", "/v1/status/leader"])
def test_an_unknown_datacenter_has_no_path(unkind_target, path):
    """A request the servers must route to another datacenter fails with structs.ErrNoDCPath."""
    response = unkind_target.http("GET", path, params={"dc": "no-such-dc"})
    assert response.status_code == 500
    assert response.text.strip().endswith("No path to datacenter")


# --- the defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes, seconds", [(1, 5.0), (10, 5.0), (100, 9.0), (1000, 13.0)])
def test_failure_detection_is_a_probe_and_memberlist_s_least_suspicion_timeout(nodes, seconds):
    """memberlist: probe every second; suspicion timeout 4 x max(1, log10 N) probe intervals
    (https://developer.hashicorp.com/consul/docs/agent/config/config-files#gossip_lan)."""
    assert failure_detection_seconds(nodes) == pytest.approx(seconds)
    assert Realism().for_nodes(nodes).failure_detection == pytest.approx(seconds)


@pytest.mark.double_only
def test_a_double_started_without_settings_is_consul_s(consul_target):
    """The tests', the demo's, the benchmark's and the fault suite's doubles are as unkind as Consul:
    its gossip on every agent, missing keys that block, 1.22's transaction limit."""
    assert Realism() == Realism(failure_detection=None, missing_key=MISSING_KEY_BLOCK, gossip=CONSUL_GOSSIP,
                                consul_version="1.22.0")
    assert Realism().txn_max_ops == 128
    agents = consul_target.http("GET", "/_devcluster/agents").json()
    assert [agent["gossip"] for agent in agents] == [asdict(CONSUL_GOSSIP)] * len(consul_target.agents)
    assert consul_target.http("GET", "/v1/agent/self").json()["Config"]["Version"] == "1.22.0"


# --- the settings as documented --------------------------------------------------------------------


@pytest.mark.double_only
def test_the_readme_s_realism_example_runs_as_written(tmp_path):
    section = README.read_text(encoding="utf-8").split("\n## Consul's unkind behaviour\n", 1)[1].split("\n## ", 1)[0]
    [example] = re.findall(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    namespace = {"workdir": tmp_path}
    exec(compile(example, str(README), "exec"), namespace)  # noqa: S102 - the project's own README
    assert namespace["realism"] == Realism(failure_detection=2.0)


@pytest.mark.double_only
def test_serve_options_give_the_settings_and_the_double_classes_pass_them_on(tmp_path):
    from devcluster.consul import ServeProcess
    from devcluster.consul.realism import from_args
    from devcluster.consul.serve import build_parser

    base = ["--nodes", "5", "--http-port", "8500", "--workdir", str(tmp_path)]
    parsed = build_parser().parse_args([*base, "--failure-detection", "2", "--gossip-loss", "0"])
    realism = from_args(parsed, 5)
    assert realism == Realism(failure_detection=2.0, gossip=Gossip(delay=0.05, jitter=0.5, reorder=0.2))
    assert from_args(build_parser().parse_args(base), 5) == Realism(failure_detection=5.0)
    kind = from_args(build_parser().parse_args([*base, "--kind", "--missing-key", "block"]), 5)
    assert kind == Realism.kind(missing_key="block")
    assert kind.failure_detection == 0 and kind.gossip.instant
    command = ServeProcess(5, tmp_path, http_port=8500, realism=realism)._command()
    assert from_args(build_parser().parse_args(command[command.index("serve") + 1:]), 5) == realism
