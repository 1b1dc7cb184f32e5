"""A release of an app with an artifact against the Consul double: the leader serves its file,
each target fetches it from the swarm (real libtorrent on 127.0.0.1, peers from KV and the
catalog), verifies it, runs its task with the local path and records done; a target refuses
metadata that is not the release's and an app without the artifact, before running anything."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import sys
from pathlib import Path

import pytest
from devcluster.polling import wait_until

from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._connection import client_options
from ansible_collections.fireap.consul.plugins.module_utils._firing import fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import NodeState, ReleaseRecord, Schema, SwarmPeer
from ansible_collections.fireap.consul.plugins.module_utils._progress import info
from ansible_collections.fireap.consul.plugins.module_utils._reap import check_app, main
from ansible_collections.fireap.consul.plugins.module_utils._swarm_worker import serve
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import (
    Spawns,
    advertise,
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


@pytest.fixture
def schema(cluster, kv_prefix):
    """The test's own prefix; the fire lock's session is destroyed afterwards."""
    schema = Schema(kv_prefix)
    yield schema
    client = cluster.client(0)
    _index, entries = client.kv.get(schema.prefix, recurse=True)
    for entry in entries or ():
        if entry.get("Session"):
            client.session.destroy(entry["Session"])


@pytest.fixture
def released(cluster, schema, tmp_path):
    """Web 1 fired with its artifact: 600 KB on the leader; each node has a directory of its own."""
    dirs = [tmp_path / name for name in cluster.node_names]
    for directory in dirs:
        directory.mkdir()
    build = os.urandom(600_000)
    (dirs[0] / "web-1.tar.gz").write_bytes(build)
    client = cluster.client(0)
    advertise(client, schema, ["web"], artifact=str(dirs[0] / TEMPLATE))
    fire(client, schema, "web", "1")
    release = ReleaseRecord.from_json(client.kv.get(schema.release("web"))[1]["Value"])
    return release, dirs, build


def run_nodes(cluster, schema, release, templates, task):
    """``serve`` on every node at once (None: the node's app has no artifact); their outcomes."""
    with concurrent.futures.ThreadPoolExecutor(len(templates)) as pool:
        futures = [pool.submit(serve, cluster.client(index), release, name, templates[index], task, schema=schema,
                               seed_seconds=0.5, timeout=60, upload_slots=2)
                   for index, name in enumerate(cluster.node_names)]
        return [future.result(timeout=90) for future in futures]


def state_of(cluster, schema, node):
    return NodeState.from_json(cluster.client(0).kv.get(schema.node("web", node))[1]["Value"])


def test_every_target_fetches_the_leaders_artifact_from_the_swarm_then_runs_its_task(cluster, schema, released):
    release, dirs, build = released
    seen = []

    def task(path):
        seen.append((path, Path(path).read_bytes() == build))
        return True, None

    outcomes = run_nodes(cluster, schema, release, [str(directory / TEMPLATE) for directory in dirs], task)

    assert [ok for ok, _reason in outcomes] == [True] * NODES, outcomes
    assert sorted(seen) == sorted((str(directory / "web-1.tar.gz"), True) for directory in dirs[1:])
    for name, directory in zip(cluster.node_names[1:], dirs[1:]):
        state = state_of(cluster, schema, name)
        assert (state.status, state.source, state.depth, state.run_id) == ("done", release.leader, 1, release.run_id)
        assert os.listdir(directory / ".fireap-swarm") == []
    client = cluster.client(0)
    _index, peers = client.kv.get(schema.swarm_prefix("web", release.run_id), recurse=True)
    assert sorted(entry["Key"].rpartition("/")[2] for entry in peers) == cluster.node_names
    assert all(SwarmPeer.from_json(entry["Value"]).port > 0 for entry in peers)
    assert info(client, schema, "web")["counts"]["done"] == NODES


def test_metadata_that_is_not_the_releases_fails_the_targets_before_anything_runs(cluster, schema, released):
    release, dirs, _build = released
    client = cluster.client(0)
    key = schema.artifact("web", release.run_id)
    forged = client.kv.get(key)[1]["Value"].replace(b"web-1.tar.gz", b"web-1.tar.gx")
    client.kv.put(key, forged)
    ran = []
    outcomes = run_nodes(cluster, schema, release, [str(directory / TEMPLATE) for directory in dirs],
                         lambda path: ran.append(path) or (True, None))

    assert not ran and not any(ok for ok, _reason in outcomes)
    for name, directory in zip(cluster.node_names[1:], dirs[1:]):
        state = state_of(cluster, schema, name)
        assert state.status == "failed" and "names the file 'web-1.tar.gx', the release 'web-1.tar.gz'" in state.error
        assert not (directory / "web-1.tar.gz").exists()


def test_a_target_whose_app_has_no_artifact_fails_saying_so(cluster, schema, released):
    release, dirs, _build = released
    templates = [str(directory / TEMPLATE) for directory in dirs]
    templates[1] = None
    outcomes = run_nodes(cluster, schema, release, templates, lambda path: (True, None))

    assert [ok for ok, _reason in outcomes] == [True, False, True, True], outcomes
    error = state_of(cluster, schema, cluster.node_names[1]).error
    assert error.startswith(f"run {release.run_id} carries the artifact web-1.tar.gz, but the app has no artifact on "
                            "this node")



def test_the_leaders_handler_serves_the_artifact_while_the_run_is_not_over(cluster, schema, released):
    release, dirs, _build = released
    client = cluster.client(0)
    check = check_app(client, client_options(client), schema, "web", release.leader)
    assert check.start and check.reason == f"leader of run {release.run_id}: serving its artifact web-1.tar.gz"
    for name in cluster.node_names[1:]:
        done = NodeState(version="1", run_id=release.run_id, status="done", started=1.0, finished=2.0,
                         source=release.leader, depth=1)
        client.kv.put(schema.node("web", name), done.to_json())
    outcome = serve(client, release, release.leader, str(dirs[0] / TEMPLATE), pytest.fail, schema=schema,
                    seed_seconds=30, timeout=60, upload_slots=2)
    assert outcome == (True, f"run {release.run_id} is over: nothing to serve")
    assert client.kv.get(schema.swarm_prefix("web", release.run_id), keys=True)[1] is None


@pytest.fixture
def target_config(cluster, schema, released, tmp_path, monkeypatch):
    """The task config of the first target: its artifact in its own directory, copied by exec_commands."""
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    _release, dirs, _build = released
    endpoint = cluster.agents[1]
    app = {"artifact": {"path": str(dirs[1] / TEMPLATE), "seed_seconds": 0},
           "exec_commands": [f"cp {{{{ artifact }}}} {tmp_path}/copied"]}
    return write_config(tmp_path / "config.yml", {"host": endpoint.host, "port": endpoint.port}, schema.prefix,
                        {"web": app})


def test_a_targets_worker_fetches_the_artifact_then_runs_its_commands_with_its_path(cluster, schema, released,
                                                                                      target_config, tmp_path):
    release, dirs, build = released
    others = [index for index in range(NODES) if index != 1]
    with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:
        futures = [pool.submit(serve, cluster.client(index), release, cluster.node_names[index],
                               str(dirs[index] / TEMPLATE), lambda path: (True, None), schema=schema,
                               seed_seconds=0.5, timeout=60, upload_slots=2) for index in others]
        assert main(["--config", str(target_config), "--worker", "web"]) == 0
        assert all(future.result(timeout=90)[0] for future in futures)
    assert (tmp_path / "copied").read_bytes() == build
    assert state_of(cluster, schema, cluster.node_names[1]).status == "done"


def test_dry_run_renders_the_commands_with_the_artifacts_path(released, target_config, monkeypatch):
    _release, dirs, _build = released
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([event("ev-1", 3, app="web", version="1")])))
    out = io.StringIO()
    assert main(["--config", str(target_config), "--dry-run"], spawn=Spawns(), out=out) == 0
    assert f"  exec_commands[0]: cp {dirs[1] / 'web-1.tar.gz'} {target_config.parent}/copied" in out.getvalue()


def test_a_run_aborted_during_the_download_ends_it_and_fails_the_target(cluster, schema, released):
    release, dirs, _build = released
    client = cluster.client(0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The leader serves nothing: the download waits until the abort.
        waiting = pool.submit(serve, cluster.client(1), release, cluster.node_names[1], str(dirs[1] / TEMPLATE),
                              lambda path: (True, None), schema=schema, seed_seconds=0, timeout=60, upload_slots=2)
        wait_until(lambda: client.kv.get(schema.swarm_peer("web", release.run_id, cluster.node_names[1]))[1], 20,
                   "the target's swarm port")
        clear(client, schema, "web", lift_lock=False, abort=True, reason="bad build")
        ok, reason = waiting.result(timeout=30)
    assert not ok and reason == "the artifact could not be fetched: the run ended before the artifact arrived"
    assert state_of(cluster, schema, cluster.node_names[1]).status == "failed"
    assert not (dirs[1] / "web-1.tar.gz").exists()
