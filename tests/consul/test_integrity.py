"""A pull that verifies the build against the release's checksum, with fireap-reap's worker and
handler against the Consul target: a matching copy is done, a copy that differs is recorded
failed naming the file and both digests, and the handler's --dry-run shows the verify steps."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._kv import NodeState, ReleaseRecord, Schema
from ansible_collections.fireap.consul.plugins.module_utils._reap import main
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import (
    APP,
    Spawns,
    event,
    plan,
    release,
    write_config,
)

BUILD = b"web 2.0 build\n"
CHECKSUM = "sha256:" + hashlib.sha256(BUILD).hexdigest()


def consul_section(target) -> dict:
    endpoint = target.agents[0]
    section = {"host": endpoint.host, "port": endpoint.port, "scheme": endpoint.scheme}
    if target.token:
        section["token"] = target.token
    return section


@pytest.fixture
def node(multi_agent_target, kv_prefix, tmp_path, monkeypatch):
    """Agent 0 pulling APP from the last agent (the release's leader), whose build is ``source``:
    exec_commands copies it, verify_file is the copy, after_commands leaves a marker."""
    target = multi_agent_target
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)

    class Node:
        schema = Schema(kv_prefix)
        name = target.agents[0].name
        leader = target.agents[-1].name
        source = tmp_path / "source" / "web.tar"
        copy = tmp_path / "copy" / "web-2.0.tar"
        started = tmp_path / "started"
        spawns = Spawns()

        def configure(self, **settings) -> None:
            self.copy.parent.mkdir(exist_ok=True)
            settings = {"exec_commands": [f"cp {self.source} {tmp_path}/copy/{{{{ app }}}}-{{{{ version }}}}.tar"],
                        "verify_file": f"{tmp_path}/copy/{{{{ app }}}}-{{{{ version }}}}.tar",
                        "after_commands": [f"touch {self.started}"], **settings}
            self.config = write_config(tmp_path / "config.yml", consul_section(target), kv_prefix, {APP: settings})

        def fire(self, checksum: str | None = CHECKSUM) -> ReleaseRecord:
            """The records fireap_fire leaves for a run of version 2.0 that carries ``checksum``."""
            record = dataclasses.replace(release("2.0", "run-1", leader=self.leader), checksum=checksum)
            leader = NodeState(version="2.0", run_id="run-1", status="done", started=1.0, depth=0, finished=1.0)
            client = target.client()
            assert client.kv.put(self.schema.node(APP, self.leader), leader.to_json())
            assert client.kv.put(self.schema.plan(APP, "run-1", self.name), plan("run-1", source=self.leader).to_json())
            assert client.kv.put(self.schema.release(APP), record.to_json())
            return record

        def worker(self) -> int:
            return main(["--config", str(self.config), "--worker", APP])

        def state(self) -> NodeState:
            return NodeState.from_json(target.client().kv.get(self.schema.node(APP, self.name))[1]["Value"])

        def log(self) -> str:
            return (tmp_path / "log" / "reap.log").read_text()

        def dry_run(self) -> str:
            monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps([event("ev-1", 3, version="2.0")])))
            out = io.StringIO()
            assert main(["--config", str(self.config), "--dry-run"], spawn=self.spawns, out=out) == 0
            return out.getvalue()

    found = Node()
    found.source.parent.mkdir()
    found.source.write_bytes(BUILD)
    return found


def test_a_copy_that_matches_the_checksum_is_verified_and_done(node):
    node.configure(verify_commands=["test {{ checksum }} = " + CHECKSUM])
    node.fire()
    assert node.worker() == 0
    state = node.state()
    assert (state.status, state.version, state.source) == ("done", "2.0", node.leader)
    assert node.started.exists()
    log = node.log()
    assert f"verify_file: checking that the sha256 of {node.copy} is {CHECKSUM}" in log
    assert f"verify_commands[0]: running: test {CHECKSUM} = {CHECKSUM}" in log


def test_a_copy_that_differs_fails_the_node_naming_the_file_and_both_digests(node):
    node.configure()
    node.source.write_bytes(b"a tampered build\n")
    node.fire()
    assert node.worker() == 1
    state = node.state()
    actual = "sha256:" + hashlib.sha256(b"a tampered build\n").hexdigest()
    assert state.status == "failed"
    assert f"verify_file failed: checksum mismatch: {node.copy} has {actual}, the release expects {CHECKSUM}" \
        in state.error
    assert not node.started.exists(), "after_commands must not run on an unverified build"
    assert "failed: task failed pulling from" in node.log()


def test_a_checksum_on_an_app_without_verification_fails_the_node_before_any_command(node):
    node.configure(verify_file=None)
    node.fire()
    assert node.worker() == 1
    state = node.state()
    assert state.status == "failed"
    assert f"the release carries the checksum {CHECKSUM}, but app {APP} configures no verification" in state.error
    assert not node.copy.exists() and not node.started.exists()


def test_a_verifying_app_fails_on_a_release_without_a_checksum(node):
    node.configure()
    node.fire(checksum=None)
    assert node.worker() == 1
    state = node.state()
    assert state.status == "failed"
    assert f"app {APP} verifies its build on this node" in state.error and "carries no checksum" in state.error
    assert not node.copy.exists()


def test_dry_run_shows_the_verify_steps_with_the_release_s_checksum(node):
    node.configure(verify_commands=["test {{ checksum }} = " + CHECKSUM])
    node.fire()
    lines = node.dry_run().splitlines()
    assert lines[1].startswith(f"{APP}: would start a worker: behind release 2.0 (run run-1)")
    assert lines[2:6] == [
        f"  exec_commands[0]: cp {node.source} {node.copy}",
        f"  verify_file: sha256 of {node.copy} must be {CHECKSUM}",
        f"  verify_commands[0]: test {CHECKSUM} = {CHECKSUM}",
        f"  after_commands[0]: touch {node.started}",
    ]
    assert node.spawns.calls == []


def test_dry_run_says_why_the_pull_would_fail(node):
    node.configure(verify_file=None)
    node.fire()
    out = node.dry_run()
    assert f"  the pull would fail: the release carries the checksum {CHECKSUM}, but app {APP}" in out
