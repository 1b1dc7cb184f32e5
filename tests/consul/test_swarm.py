"""A release of an app with an artifact against the Consul double: the leader serves its file,
each target fetches it from the swarm into its own directory (real libtorrent on 127.0.0.1,
its neighbours from its plan entry), verifies it, runs its task with the local path and records done; a target refuses
metadata that is not the release's and an app without the artifact, before running anything;
the run ends on the leader's word in the run's swarm record, and requests per node do not grow
with the number of nodes."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from devcluster.polling import wait_until

from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._connection import client_options
from ansible_collections.fireap.consul.plugins.module_utils._firing import EVENT_NAME, fire, retry_stragglers
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NodeState,
    PlanEntry,
    ReleaseRecord,
    Schema,
    SwarmRun,
)
from ansible_collections.fireap.consul.plugins.module_utils._progress import info
from ansible_collections.fireap.consul.plugins.module_utils._reap import check_app, main
from ansible_collections.fireap.consul.plugins.module_utils import _swarm_worker
from ansible_collections.fireap.consul.plugins.module_utils._swarm_worker import SCAN_SECONDS, serve
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import ArtifactConfig
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import (
    Spawns,
    advertise,
    artifact_config,
    event,
    write_config,
)

pytestmark = pytest.mark.double_only

NODES = 4
TEMPLATE = "{{ app }}-{{ version }}.tar.gz"


@pytest.fixture(scope="module")
def cluster(make_double):
    with make_double(nodes=NODES, name="swarm-double") as target:
        yield target


def destroy_sessions(cluster, schema):
    client = cluster.client(0)
    _index, entries = client.kv.get(schema.prefix, recurse=True)
    for entry in entries or ():
        if entry.get("Session"):
            client.session.destroy(entry["Session"])


@pytest.fixture
def schema(cluster, kv_prefix):
    """The test's own prefix; the fire lock's session is destroyed afterwards."""
    schema = Schema(kv_prefix)
    yield schema
    destroy_sessions(cluster, schema)


def free_ports(count):
    """``count`` ports free on 127.0.0.1 now: the nodes of a double share that address."""
    sockets = [socket.socket() for _index in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def release_with_artifact(cluster, schema, tmp_path, nodes):
    """Web 1 fired to ``nodes`` (the leader first) with a 600 KB artifact on the leader; each node
    has a directory of its own (its advertised artifact path) and advertises a port of its own. The release, the nodes' artifact
    configs (seed_seconds 0) and the build."""
    dirs = [tmp_path / name for name in nodes]
    for directory in dirs:
        directory.mkdir(parents=True)
    build = os.urandom(600_000)
    (dirs[0] / "web-1.tar.gz").write_bytes(build)
    client = cluster.client(0)
    configs = [ArtifactConfig(path=str(directory / TEMPLATE), seed_seconds=0, port=port)
               for directory, port in zip(dirs, free_ports(len(nodes)))]
    for name, config in zip(nodes, configs):  # each node its own directory, as its handler advertises it
        advertise(client, schema, ["web"], [name], artifact=config.path, artifact_port=config.port)
    fire(client, schema, "web", "1", config_path=artifact_config(tmp_path / "leader.yml", configs[0].path))
    release = ReleaseRecord.from_json(client.kv.get(schema.release("web"))[1]["Value"])
    return release, configs, build


@pytest.fixture
def released(cluster, schema, tmp_path):
    """Web 1 fired with its artifact to every node."""
    release, configs, build = release_with_artifact(cluster, schema, tmp_path, cluster.node_names)
    return release, [Path(config.path).parent for config in configs], build, configs


def run_nodes(cluster, schema, release, configs, task, indexes=None):
    """``serve`` at once on the nodes at ``indexes`` (default: all), each with its config (None:
    the node's app has no artifact); their outcomes."""
    indexes = list(range(len(configs))) if indexes is None else indexes
    with concurrent.futures.ThreadPoolExecutor(len(indexes)) as pool:
        futures = [pool.submit(serve, cluster.client(index), release, cluster.node_names[index], configs[index], task,
                               schema=schema, timeout=60, upload_slots=2) for index in indexes]
        return [future.result(timeout=90) for future in futures]


def state_of(cluster, schema, node):
    return NodeState.from_json(cluster.client(0).kv.get(schema.node("web", node))[1]["Value"])


def swarm_run(cluster, schema, release):
    return SwarmRun.from_json(cluster.client(0).kv.get(schema.swarm_run("web", release.run_id))[1]["Value"])


def record_crashed(client, schema, release, node):
    """``node``'s worker recorded pulling with a session, then died: the record is no longer held."""
    session = client.session.create(node=node, lock_delay=0, behavior="release")
    pulling = NodeState(version="1", run_id=release.run_id, status="pulling", started=time.time(),
                        source=release.leader, depth=1)
    assert client.kv.put(schema.node("web", node), pulling.to_json(), acquire=session)
    client.session.destroy(session)


def test_every_target_fetches_the_artifact_from_the_swarm_into_its_own_directory_then_runs_its_task(cluster, schema, released):
    release, dirs, build, configs = released
    seen = []

    def task(path):
        seen.append((path, Path(path).read_bytes() == build))
        return True, None

    outcomes = run_nodes(cluster, schema, release, configs, task)

    assert [ok for ok, _reason in outcomes] == [True] * NODES, outcomes
    assert sorted(seen) == sorted((str(directory / "web-1.tar.gz"), True) for directory in dirs[1:])
    for name, directory in zip(cluster.node_names[1:], dirs[1:]):
        state = state_of(cluster, schema, name)
        assert (state.status, state.source, state.depth, state.run_id) == ("done", release.leader, 1, release.run_id)
        assert state.started <= state.fetched <= state.finished
        assert state.downloaded == len(build)  # from the swarm, into the node's own directory
        assert (directory / "web-1.tar.gz").read_bytes() == build
        assert not (directory / ".fireap-swarm").exists()
    client = cluster.client(0)
    # Each node's neighbours are the three others (up to 9 nodes all see each other), at their ports.
    endpoints = {name: f"127.0.0.1:{config.port}" for name, config in zip(cluster.node_names, configs)}
    for name in cluster.node_names[1:]:
        plan = PlanEntry.from_json(client.kv.get(schema.plan("web", release.run_id, name))[1]["Value"])
        assert sorted(plan.peers) == sorted(endpoint for other, endpoint in endpoints.items() if other != name)
    record = swarm_run(cluster, schema, release)
    assert sorted(record.leader_peers) == sorted(endpoints[name] for name in cluster.node_names[1:])
    assert record.refused is None and record.finished >= max(state_of(cluster, schema, name).finished
                                                             for name in cluster.node_names[1:])
    assert client.kv.get(schema.swarms_prefix("web"), keys=True)[1] == [schema.swarm_run("web", release.run_id)]
    assert info(client, schema, "web")["counts"]["done"] == NODES


def test_metadata_that_is_not_the_releases_fails_the_targets_before_anything_runs(cluster, schema, released):
    release, dirs, _build, configs = released
    client = cluster.client(0)
    key = schema.artifact("web", release.run_id)
    forged = client.kv.get(key)[1]["Value"].replace(b"web-1.tar.gz", b"web-1.tar.gx")
    client.kv.put(key, forged)
    ran = []
    outcomes = run_nodes(cluster, schema, release, configs, lambda path: ran.append(path) or (True, None))

    assert not ran and not any(ok for ok, _reason in outcomes)
    for name, directory in zip(cluster.node_names[1:], dirs[1:]):
        state = state_of(cluster, schema, name)
        assert state.status == "failed" and "names the file 'web-1.tar.gx', the release 'web-1.tar.gz'" in state.error
        assert not (directory / "web-1.tar.gz").exists()
    assert "names the file 'web-1.tar.gx'" in swarm_run(cluster, schema, release).refused


def test_a_target_whose_app_has_no_artifact_fails_saying_so(cluster, schema, released):
    release, _dirs, _build, configs = released
    configs[1] = None
    outcomes = run_nodes(cluster, schema, release, configs, lambda path: (True, None))

    assert [ok for ok, _reason in outcomes] == [True, False, True, True], outcomes
    error = state_of(cluster, schema, cluster.node_names[1]).error
    assert error.startswith(f"run {release.run_id} carries the artifact web-1.tar.gz, but the app has no artifact on "
                            "this node")


def test_the_leader_refusing_to_serve_fails_the_targets_at_once_with_its_reason(cluster, schema, released):
    release, dirs, _build, configs = released
    (dirs[0] / "web-1.tar.gz").write_bytes(b"changed since the fire")
    began = time.monotonic()
    outcomes = run_nodes(cluster, schema, release, configs, pytest.fail)

    assert time.monotonic() - began < 20  # not the watch_timeout of 60 s
    assert not any(ok for ok, _reason in outcomes)
    refused = swarm_run(cluster, schema, release).refused
    assert refused.startswith("cannot serve the artifact:") and "sha256:" in refused
    for name in cluster.node_names[1:]:
        state = state_of(cluster, schema, name)
        assert state.status == "failed" and state.error == f"the leader cannot serve the artifact: {refused}"


def test_a_crashed_target_counts_as_finished_for_the_end_of_the_run(cluster, schema, released):
    release, _dirs, _build, configs = released
    client = cluster.client(0)
    crashed = cluster.node_names[3]
    record_crashed(client, schema, release, crashed)

    outcomes = run_nodes(cluster, schema, release, configs, lambda path: (True, None), indexes=[0, 1, 2])

    assert [ok for ok, _reason in outcomes] == [True] * 3, outcomes
    assert swarm_run(cluster, schema, release).finished is not None
    assert state_of(cluster, schema, crashed).status == "pulling"


def test_the_leaders_handler_serves_the_artifact_until_every_target_is_over(cluster, schema, released):
    release, _dirs, _build, configs = released
    client = cluster.client(0)
    check = check_app(client, client_options(client), schema, "web", release.leader)
    assert check.start and check.reason == f"leader of run {release.run_id}: serving its artifact web-1.tar.gz"
    for name in cluster.node_names[1:]:
        done = NodeState(version="1", run_id=release.run_id, status="done", started=1.0, finished=2.0,
                         source=release.leader, depth=1)
        client.kv.put(schema.node("web", name), done.to_json())
    leader = configs[0]
    assert serve(client, release, release.leader, leader, pytest.fail, schema=schema, timeout=60,
                 upload_slots=2) == (True, f"served {Path(leader.path).parent / 'web-1.tar.gz'}")
    assert swarm_run(cluster, schema, release).finished is not None
    assert serve(client, release, release.leader, leader, pytest.fail, schema=schema, timeout=60,
                 upload_slots=2) == (True, f"run {release.run_id} is over: nothing to serve")
    # Once the run is over, its handler starts no worker for it at each event.
    check = check_app(client, client_options(client), schema, "web", release.leader)
    assert not check.start and check.reason == f"leader of run {release.run_id}: its swarm is over (finished)"


def test_the_leaders_worker_holds_its_record_while_it_serves_and_lets_go_after(cluster, schema, released):
    release, _dirs, _build, configs = released
    client = cluster.client(0)
    key = schema.node("web", release.leader)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        serving = pool.submit(serve, client, release, release.leader, configs[0], pytest.fail, schema=schema,
                              timeout=60, upload_slots=2)
        wait_until(lambda: client.kv.get(key)[1].get("Session"), 20, "the leader holding its record")
        assert NodeState.from_json(client.kv.get(key)[1]["Value"]).status == "done"  # its value unchanged
        for name in cluster.node_names[1:]:
            done = NodeState(version="1", run_id=release.run_id, status="done", started=1.0, finished=2.0,
                             source=release.leader, depth=1)
            client.kv.put(schema.node("web", name), done.to_json())
        assert serving.result(timeout=30)[0]
    entry = client.kv.get(key)[1]
    assert not entry.get("Session") and entry["LockIndex"] >= 1


def test_a_target_fires_the_event_to_the_leader_again_when_its_worker_ends_before_the_run_is_over(
        cluster, schema, released):
    """A leader's worker that ends (its session gone: killed, or its agent down) while the run
    is open leaves its record no longer held: a target sees it at its next wake-up and fires
    the event to the leader alone, whose handler starts a worker again."""
    release, dirs, build, configs = released
    client = cluster.client(0)
    key = schema.node("web", release.leader)
    for name in cluster.node_names[2:]:
        done = NodeState(version="1", run_id=release.run_id, status="done", started=1.0, finished=2.0,
                         source=release.leader, depth=1)
        client.kv.put(schema.node("web", name), done.to_json())
    only_leader = "^(" + release.leader.replace(".", r"\.") + ")$"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        leading = pool.submit(serve, cluster.client(0), release, release.leader, configs[0], pytest.fail,
                              schema=schema, timeout=60, upload_slots=2)
        session = wait_until(lambda: client.kv.get(key)[1].get("Session"), 20, "the leader holding its record")
        assert not [item for item in client.event.list(name=EVENT_NAME)[1] or () if item["NodeFilter"] == only_leader]
        client.session.destroy(session)
        began = time.monotonic()
        target = pool.submit(serve, cluster.client(1), release, cluster.node_names[1], configs[1],
                             lambda path: (True, None), schema=schema, timeout=60, upload_slots=2)
        woken = wait_until(lambda: [item for item in client.event.list(name=EVENT_NAME)[1] or ()
                                    if item["NodeFilter"] == only_leader], 20, "the event fired to the leader")
        assert time.monotonic() - began < 15  # within MAX_WAIT of the hold's end, not watch_timeout
        assert len(woken) == 1 and json.loads(woken[0]["Payload"] if isinstance(woken[0]["Payload"], str)
                                              else woken[0]["Payload"].decode()) == {"app": "web", "version": "1"}
        assert target.result(timeout=60)[0] and leading.result(timeout=60)[0]
    assert (dirs[1] / "web-1.tar.gz").read_bytes() == build


def test_an_abort_ends_the_seeding_after_the_run_at_once(cluster, schema, released):
    """seed_seconds keep the node's worker, lock and port: an abort (or a newer run) ends them."""
    release, _dirs, _build, configs = released
    client = cluster.client(0)
    for name in cluster.node_names[1:]:
        done = NodeState(version="1", run_id=release.run_id, status="done", started=1.0, finished=2.0,
                         source=release.leader, depth=1)
        client.kv.put(schema.node("web", name), done.to_json())
    leader = dataclasses.replace(configs[0], seed_seconds=300)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        serving = pool.submit(serve, client, release, release.leader, leader, pytest.fail, schema=schema,
                              timeout=600, upload_slots=2)
        wait_until(lambda: swarm_run(cluster, schema, release).finished, 20, "the leader ending the run")
        time.sleep(1)  # the leader seeds, blocked on the release record
        assert not serving.done()
        clear(client, schema, "web", lift_lock=False, abort=True, reason="next build")
        began = time.monotonic()
        assert serving.result(timeout=30)[0]
    assert time.monotonic() - began < 5


def test_a_straggler_started_again_after_the_run_ended_gets_the_artifact(cluster, schema, released):
    """The leader counts a target whose worker died as over and ends the run; the re-fire to the
    stragglers reopens the run's swarm, so the leader serves again and the target catches up."""
    release, dirs, build, configs = released
    client = cluster.client(0)
    crashed = cluster.node_names[3]
    record_crashed(client, schema, release, crashed)
    first = check_app(client, client_options(client), schema, "web", release.leader)
    run_nodes(cluster, schema, release, configs, lambda path: (True, None), indexes=[0, 1, 2])
    assert swarm_run(cluster, schema, release).finished is not None

    refired = retry_stragglers(client, schema, "web")

    assert refired["stragglers"] == [crashed]
    assert [re.search(item["node_filter"], release.leader) is not None for item in refired["events"]] == [True]
    assert not swarm_run(cluster, schema, release).over
    again = check_app(client, client_options(client), schema, "web", release.leader)
    assert again.start and again.attempt != first.attempt  # a worker that served the run once serves again
    outcomes = run_nodes(cluster, schema, release, configs, lambda path: (True, None), indexes=[0, 3])
    assert [ok for ok, _reason in outcomes] == [True, True], outcomes
    assert state_of(cluster, schema, crashed).status == "done"
    assert (dirs[3] / "web-1.tar.gz").read_bytes() == build


def test_a_straggler_that_finds_the_run_over_reopens_it_and_wakes_the_leader(cluster, schema, released):
    """A re-fire or a replayed event can start a crashed target's worker again after the leader
    counted that target as over and ended the run: the worker reopens the run and fires the
    event to the leader, whose next worker serves it the artifact."""
    release, dirs, build, configs = released
    client = cluster.client(0)
    crashed = cluster.node_names[3]
    record_crashed(client, schema, release, crashed)
    run_nodes(cluster, schema, release, configs, lambda path: (True, None), indexes=[0, 1, 2])
    assert swarm_run(cluster, schema, release).finished is not None
    only_leader = "^(" + release.leader.replace(".", r"\.") + ")$"

    def woken():
        return [item for item in client.event.list(name=EVENT_NAME)[1] or () if item["NodeFilter"] == only_leader]

    before = len(woken())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        target = pool.submit(serve, cluster.client(3), release, crashed, configs[3], lambda path: (True, None),
                             schema=schema, timeout=60, upload_slots=2)
        wait_until(lambda: not swarm_run(cluster, schema, release).over, 20, "the target reopening the run")
        wait_until(lambda: len(woken()) > before, 20, "the event fired to the leader")
        assert check_app(client, client_options(client), schema, "web", release.leader).start
        assert serve(client, release, release.leader, configs[0], pytest.fail, schema=schema, timeout=60,
                     upload_slots=2)[0]
        assert target.result(timeout=60) == (True, "done at version 1")
    assert (dirs[3] / "web-1.tar.gz").read_bytes() == build
    assert swarm_run(cluster, schema, release).finished is not None


def test_the_leader_fires_the_event_again_to_targets_with_no_record_in_the_run(cluster, schema, released, monkeypatch):
    """Gossip may not bring the event to a target: the serving leader fires it again to the
    targets that have no record in the run, and only to them, until they have one."""
    release, dirs, build, configs = released
    monkeypatch.setattr(_swarm_worker, "SILENT_SECONDS", 1.0)
    silent = cluster.node_names[2]
    only_silent = "^(" + silent.replace(".", r"\.") + ")$"

    def events(index):
        return cluster.client(index).event.list(name=EVENT_NAME)[1] or ()

    def refired():  # an agent keeps the events whose node filter matches it
        return [item for item in events(2) if item["NodeFilter"] == only_silent]

    def filtered(index):  # the events that reached only some nodes (earlier tests' ones too)
        return [item["ID"] for item in events(index) if item["NodeFilter"]]

    before = {index: filtered(index) for index in (1, 3)}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(serve, cluster.client(index), release, cluster.node_names[index], configs[index],
                               lambda path: (True, None), schema=schema, timeout=60, upload_slots=2)
                   for index in (0, 1, 3)]
        wait_until(refired, 20, "the event fired again to the silent target")
        assert {index: filtered(index) for index in (1, 3)} == before
        futures.append(pool.submit(serve, cluster.client(2), release, silent, configs[2], lambda path: (True, None),
                                   schema=schema, timeout=60, upload_slots=2))
        assert all(future.result(timeout=90)[0] for future in futures)
    assert (dirs[2] / "web-1.tar.gz").read_bytes() == build
    assert swarm_run(cluster, schema, release).finished is not None


@pytest.fixture
def target_config(cluster, schema, released, tmp_path, monkeypatch):
    """The task config of the first target: its artifact in its own directory, copied by exec_commands."""
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    _release, _dirs, _build, configs = released
    endpoint = cluster.agents[1]
    app = {"artifact": {"path": configs[1].path, "seed_seconds": 0, "port": configs[1].port},
           "exec_commands": [f"cp {{{{ artifact }}}} {tmp_path}/copied"]}
    return write_config(tmp_path / "config.yml", {"host": endpoint.host, "port": endpoint.port}, schema.prefix,
                        {"web": app})


def test_a_targets_worker_fetches_the_artifact_then_runs_its_commands_with_its_path(
        cluster, schema, released, target_config, tmp_path):
    release, _dirs, build, configs = released
    others = [index for index in range(NODES) if index != 1]
    with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:
        futures = [pool.submit(serve, cluster.client(index), release, cluster.node_names[index], configs[index],
                               lambda path: (True, None), schema=schema, timeout=60, upload_slots=2)
                   for index in others]
        assert main(["--config", str(target_config), "--worker", "web"]) == 0
        assert all(future.result(timeout=90)[0] for future in futures)
    assert (tmp_path / "copied").read_bytes() == build
    assert state_of(cluster, schema, cluster.node_names[1]).status == "done"


def test_dry_run_renders_the_commands_with_the_artifacts_path(released, target_config, monkeypatch):
    _release, dirs, _build, _configs = released
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([event("ev-1", 3, app="web", version="1")])))
    out = io.StringIO()
    assert main(["--config", str(target_config), "--dry-run"], spawn=Spawns(), out=out) == 0
    assert f"  exec_commands[0]: cp {dirs[1] / 'web-1.tar.gz'} {target_config.parent}/copied" in out.getvalue()


def test_dry_run_on_the_leader_says_it_would_serve_and_renders_no_commands(
        cluster, schema, released, tmp_path, monkeypatch):
    release, _dirs, _build, configs = released
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    agent = cluster.agents[0]
    app = {"artifact": {"path": configs[0].path, "seed_seconds": 0, "port": configs[0].port},
           "exec_commands": ["cp {{ artifact }} /srv/web"]}
    config = write_config(tmp_path / "leader.yml", {"host": agent.host, "port": agent.port}, schema.prefix,
                          {"web": app})
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([event("ev-1", 3, app="web", version="1")])))
    out = io.StringIO()
    assert main(["--config", str(config), "--dry-run"], spawn=Spawns(), out=out) == 0
    assert f"leader of run {release.run_id}: serving its artifact web-1.tar.gz" in out.getvalue()
    assert "the leader runs no commands" in out.getvalue() and "exec_commands" not in out.getvalue()


def test_a_run_aborted_during_the_download_ends_it_and_fails_the_target(cluster, schema, released):
    release, dirs, _build, configs = released
    client = cluster.client(0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The leader serves nothing: the download waits until the abort.
        waiting = pool.submit(serve, cluster.client(1), release, cluster.node_names[1], configs[1],
                              lambda path: (True, None), schema=schema, timeout=60, upload_slots=2)
        wait_until(lambda: client.kv.get(schema.node("web", cluster.node_names[1]))[1], 20, "the target's record")
        clear(client, schema, "web", lift_lock=False, abort=True, reason="bad build")
        ok, reason = waiting.result(timeout=30)
    assert not ok and reason == "the run ended before the artifact arrived"
    assert state_of(cluster, schema, cluster.node_names[1]).status == "failed"
    assert not (dirs[1] / "web-1.tar.gz").exists()


def test_requests_per_node_do_not_grow_with_the_number_of_nodes(make_double, kv_prefix, tmp_path):
    """The same release to 4 and to 12 nodes of one double: each target makes the same requests
    (its own record, session, metadata, plan entry, its catalog address, the run's one swarm
    key and the release), and the leader's recursive reads of the node records follow the time
    the run takes (one per SCAN_SECONDS at most), not the nodes."""
    with make_double(nodes=12, name="swarm-cost") as big:
        per_count = {}
        for count in (4, 12):
            schema = Schema(f"{kv_prefix}{count}/")
            release, configs, _build = release_with_artifact(big, schema, tmp_path / str(count),
                                                             big.node_names[:count])
            big.http("DELETE", "/_devcluster/stats", 0)
            began = time.monotonic()
            outcomes = run_nodes(big, schema, release, configs, lambda path: (True, None))
            elapsed = time.monotonic() - began
            assert all(ok for ok, _reason in outcomes), outcomes
            stats = big.http("GET", "/_devcluster/stats", 0).json()["agents"]
            per_count[count] = {name: stats[name]["requests"] for name in big.node_names[1:count]}
            leader = stats[release.leader]["routes"]
            assert leader.get("GET /v1/kv/ (blocking)", 0) <= elapsed / SCAN_SECONDS + 2, leader
            destroy_sessions(big, schema)
        # 12 each, both times (one a read of the leader's record at the watch's wake-up); a session renewal may
        # add one, a second wake-up of the swarm key two.
        assert max(per_count[12].values()) <= max(per_count[4].values()) + 2 <= 14, per_count
