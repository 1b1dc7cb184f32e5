"""Firing a release of an app with an artifact, against the Consul double: the leader's file's
torrent metadata goes into KV under the run, the release record names the file, its size,
info-hash and checksum, each plan entry lists the node's swarm neighbours and the run's swarm
record the leader's; targets that disagree on having an artifact or on its file name, a
checksum that is not the file's, a missing file and a leader whose advert names another file
than its own task config are refused before anything is written."""

from __future__ import annotations

import hashlib
import os
import re
import time

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import _firing
from ansible_collections.fireap.consul.plugins.module_utils._firing import EVENT_NAME, fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import History, PlanEntry, ReleaseRecord, Schema, SwarmRun
from ansible_collections.fireap.consul.plugins.module_utils._progress import ReleaseError
from ansible_collections.fireap.consul.plugins.module_utils._swarm import SwarmError, check_metadata
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import advertise, artifact_config, write_config


@pytest.fixture
def client(consul_target):
    return consul_target.client(0)


@pytest.fixture
def schema(client, kv_prefix):
    """The test's own prefix (deleted by kv_prefix); the fire locks' sessions are destroyed."""
    schema = Schema(kv_prefix)
    yield schema
    _index, entries = client.kv.get(schema.prefix, recurse=True)
    for entry in entries or ():
        if entry.get("Session"):
            client.session.destroy(entry["Session"])


@pytest.fixture
def builds(tmp_path):
    """The leader's build directory, with the builds of web 1 and 2 (200 KB each)."""
    for version in ("1", "2"):
        (tmp_path / f"web-{version}.tar.gz").write_bytes(os.urandom(200_000))
    return tmp_path


@pytest.fixture
def config_path(builds):
    """The leader's task config, naming the builds' template: what the fire publishes."""
    return artifact_config(builds / "config.yml", template(builds))


def template(builds):
    return str(builds / "{{ app }}-{{ version }}.tar.gz")


def sha256(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def advertise_ports(client, schema, builds):
    """Each node of the double (all on 127.0.0.1) advertises a swarm port of its own; node -> endpoint."""
    names = [node["Node"] for node in client.catalog.nodes()[1]]
    for index, name in enumerate(names):
        advertise(client, schema, ["web"], [name], artifact=template(builds), artifact_port=7000 + index)
    return {name: f"127.0.0.1:{7000 + index}" for index, name in enumerate(names)}


def test_a_release_carries_its_artifact_and_the_metadata_goes_under_the_run(client, schema, builds, config_path):
    endpoints = advertise_ports(client, schema, builds)
    result = fire(client, schema, "web", "1", config_path=config_path)

    release = ReleaseRecord.from_json(client.kv.get(schema.release("web"))[1]["Value"])
    build = builds / "web-1.tar.gz"
    assert release.checksum == sha256(build)
    assert (release.artifact.name, release.artifact.length) == ("web-1.tar.gz", 200_000)
    assert result["release"]["artifact"] == release.artifact.to_dict()
    metadata = client.kv.get(schema.artifact("web", result["run_id"]))[1]["Value"]
    checked = check_metadata(metadata, name="web-1.tar.gz", length=200_000, info_hash=release.artifact.info_hash)
    assert checked.pieces == 4
    history = History.from_json(client.kv.get(schema.history("web"))[1]["Value"])
    assert history.runs[0].checksum == release.checksum
    # Each node's port as advertised, at its catalog address; each node lists all others (few nodes).
    _index, entries = client.kv.get(schema.plan_prefix("web", result["run_id"]), recurse=True)
    assert len(entries) == len(endpoints) - 1
    for entry in entries:
        node = entry["Key"].rpartition("/")[2]
        assert sorted(PlanEntry.from_json(entry["Value"]).peers) == sorted(
            where for name, where in endpoints.items() if name != node)
    swarm = SwarmRun.from_json(client.kv.get(schema.swarm_run("web", result["run_id"]))[1]["Value"])
    assert sorted(swarm.leader_peers) == sorted(where for name, where in endpoints.items() if name != release.leader)
    assert not swarm.over


def test_the_event_of_a_run_with_an_artifact_reaches_the_leader_whatever_the_node_filter(
        multi_agent_target, client, schema, builds, config_path):
    """The leader serves the file, and only the event starts its worker: a node filter that
    leaves the leader's name out must not leave the targets without a seed."""
    endpoints = advertise_ports(client, schema, builds)
    leader = client.agent.self()["Config"]["NodeName"]
    other = next(name for name in sorted(endpoints) if name != leader)
    result = fire(client, schema, "web", "1", node_filter=other, config_path=config_path)
    assert result["targets"] == [leader, other]
    deadline = time.monotonic() + 10
    event = None
    while event is None and time.monotonic() < deadline:
        event = next((item for item in client.event.list(name=EVENT_NAME)[1] or ()
                      if item["ID"] == result["event_id"]), None)
        time.sleep(0.1)
    assert event is not None
    hears = [name for name in sorted(endpoints) if re.search(event["NodeFilter"], name)]
    assert hears == sorted([leader, other])


def test_nodes_that_would_serve_at_one_endpoint_fire_nothing(multi_agent_target, client, schema, builds, config_path):
    advertise(client, schema, ["web"], artifact=template(builds), artifact_port=6881)
    with pytest.raises(ReleaseError, match=r"nodes .* and .* would both serve app 'web' at 127\.0\.0\.1:6881"):
        fire(client, schema, "web", "1", config_path=config_path)
    assert client.kv.get(schema.release("web"))[1] is None


def test_the_next_run_replaces_the_metadata_of_the_last(client, schema, builds, config_path):
    advertise_ports(client, schema, builds)
    first = fire(client, schema, "web", "1", config_path=config_path)
    second = fire(client, schema, "web", "2", force=True, checksum=sha256(builds / "web-2.tar.gz"),
                  config_path=config_path)
    assert client.kv.get(schema.artifacts_prefix("web"), keys=True)[1] == [schema.artifact("web", second["run_id"])]
    assert client.kv.get(schema.swarms_prefix("web"), keys=True)[1] == [schema.swarm_run("web", second["run_id"])]
    assert first["release"]["artifact"]["info_hash"] != second["release"]["artifact"]["info_hash"]


def test_an_app_without_an_artifact_is_released_as_before(client, schema):
    advertise(client, schema, ["web"])
    result = fire(client, schema, "web", "1")
    assert "artifact" not in result["release"]
    assert client.kv.get(schema.artifacts_prefix("web"), keys=True)[1] is None


def test_a_checksum_that_is_not_the_files_fires_nothing(client, schema, builds, config_path):
    advertise(client, schema, ["web"], artifact=template(builds), artifact_port=6881)
    with pytest.raises(ReleaseError, match=r"web-1\.tar\.gz of app 'web' version 1 has the checksum sha256:"):
        fire(client, schema, "web", "1", checksum="sha256:" + "0" * 64, config_path=config_path)
    assert client.kv.get(schema.release("web"))[1] is None


def test_a_version_without_a_file_on_the_leader_fires_nothing(client, schema, builds, config_path):
    advertise(client, schema, ["web"], artifact=template(builds), artifact_port=6881)
    with pytest.raises(SwarmError, match=r"cannot read the artifact .*web-3\.tar\.gz"):
        fire(client, schema, "web", "3", config_path=config_path)
    assert client.kv.get(schema.release("web"))[1] is None


def test_targets_that_disagree_on_the_artifact_fire_nothing(multi_agent_target, client, schema, builds):
    names = multi_agent_target.node_names
    advertise(client, schema, ["web"], nodes=names[:2], artifact=template(builds), artifact_port=6881)
    advertise(client, schema, ["web"], nodes=names[2:])
    with pytest.raises(ReleaseError, match=r"do not agree on its artifact \(no artifact on .*; an artifact on "):
        fire(client, schema, "web", "1")
    assert client.kv.get(schema.release("web"))[1] is None


def test_targets_whose_artifact_file_names_differ_fire_nothing(multi_agent_target, client, schema, builds):
    names = multi_agent_target.node_names
    for index, name in enumerate(names):  # each its own directory; the last names the file otherwise
        directory = builds / name
        file_name = "{{ version }}.tar.gz" if name == names[-1] else "{{ app }}-{{ version }}.tar.gz"
        advertise(client, schema, ["web"], [name], artifact=str(directory / file_name), artifact_port=7000 + index)
    leader = client.agent.self()["Config"]["NodeName"]
    config_path = artifact_config(builds / "config.yml", str(builds / leader / "{{ app }}-{{ version }}.tar.gz"))
    with pytest.raises(ReleaseError, match=rf"name its artifact of version 1 differently \('1\.tar\.gz' on {names[-1]}; "):
        fire(client, schema, "web", "1", config_path=config_path)
    assert client.kv.get(schema.release("web"))[1] is None


def test_a_run_without_an_artifact_after_one_with_deletes_its_metadata(client, schema, builds, config_path):
    advertise_ports(client, schema, builds)
    fire(client, schema, "web", "1", config_path=config_path)
    advertise(client, schema, ["web"])
    fire(client, schema, "web", "2", force=True)
    assert client.kv.get(schema.artifacts_prefix("web"), keys=True)[1] is None
    assert client.kv.get(schema.swarms_prefix("web"), keys=True)[1] is None


def test_a_leader_advert_naming_another_file_fires_nothing_and_hashes_nothing(
        client, schema, builds, config_path, monkeypatch):
    """Whoever can write KV can rewrite the leader's advert: the file the fire hashes and
    publishes is the one the leader's own task config names, and an advert that disagrees
    stops the fire before any file is read."""
    secret = builds / "secret"
    secret.write_bytes(b"not an artifact")
    elsewhere = builds / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "web-1.tar.gz").symlink_to(secret)  # the file name the targets agree on
    hostile = str(elsewhere / "{{ app }}-{{ version }}.tar.gz")
    advertise_ports(client, schema, builds)
    leader = client.agent.self()["Config"]["NodeName"]
    advertise(client, schema, ["web"], [leader], artifact=hostile, artifact_port=7100)
    hashed = []
    monkeypatch.setattr(_firing, "create_metadata", hashed.append)
    monkeypatch.setattr(_firing, "file_checksum", hashed.append)
    with pytest.raises(ReleaseError, match=rf"the leader {leader}'s advert of app 'web' in Consul KV names the "
                                           rf"artifact path '{re.escape(hostile)}', its task "
                                           rf"config {re.escape(config_path)} '{re.escape(template(builds))}'"):
        fire(client, schema, "web", "1", config_path=config_path)
    assert hashed == []
    assert client.kv.get(schema.release("web"))[1] is None
    assert client.kv.get(schema.artifacts_prefix("web"), keys=True)[1] is None


def test_a_leader_whose_task_config_gives_no_artifact_fires_nothing(client, schema, builds, tmp_path):
    advertise_ports(client, schema, builds)
    without = write_config(tmp_path / "without.yml", {}, "fireap/", {"web": {"exec_commands": ["true"]}})
    with pytest.raises(ReleaseError, match=rf"the leader's task config {re.escape(str(without))} gives the app none"):
        fire(client, schema, "web", "1", config_path=str(without))
    with pytest.raises(ReleaseError, match=r"does not give it: .*missing\.yml: cannot read the config"):
        fire(client, schema, "web", "1", config_path=str(tmp_path / "missing.yml"))
    assert client.kv.get(schema.release("web"))[1] is None
