"""The recorded Consul answers of the pure module tests (tests/unit/plugins/modules), made from the double.

Each scenario puts the app's KV state in place on a fresh prefix of an ACL-enforcing double,
then runs one module in-process and records every request it sends and the answer it gets
(consul_answers.RecordingConsul). A leader-lost scenario keeps only the first request of its
run and answers it as Consul does while it has no leader (500 "No cluster leader"). Every run
checks that replaying its recording gives the module the same outcome as the double did, so a
recording that no longer fits the module shows here.

After a change to the requests the modules send, record the answers again (the recordings
land in tests/unit/fixtures/consul_answers/) and review the diff:

    .venv/bin/python -m pytest -p no:cacheprovider tests/consul/test_record_consul_answers.py --record-answers
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import consul
import pytest
from consul_harness import ConsulTarget

from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.modules import fireap_clear, fireap_fire, fireap_info
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import advertise
from ansible_collections.fireap.consul.tests.unit.plugins.modules.consul_answers import (
    ANSWERS_DIR,
    RecordingConsul,
    consul_transport,
    run_on_answers,
    save,
)
from ansible_collections.fireap.consul.tests.unit.plugins.modules.module_run import ModuleRun, run_module

pytestmark = pytest.mark.double_only

NODES = 4
APP = "web"
PREFIX = "fireap/"
#: What Consul answers while its servers have no leader (an election, a lost quorum).
LEADER_LOST = {"status": 500, "headers": {"Content-Type": "text/plain; charset=utf-8"}, "body": "No cluster leader"}

Setup = Callable[[consul.Consul, dict[str, Any]], None]


def no_state(_client: consul.Consul, _connection: dict[str, Any]) -> None:
    """Nothing under the prefix: no node advertises an app."""


def advertised(client: consul.Consul, _connection: dict[str, Any]) -> None:
    """An app never released that every node advertises (max_semaphores 5), as their handlers leave it."""
    advertise(client, Schema(PREFIX), [APP])


def running_release(client: consul.Consul, connection: dict[str, Any]) -> None:
    """Version 7 of the app fired with fan-out 2: the leader done, its lock held, no node started."""
    advertised(client, connection)
    fired = run_module(fireap_fire, dict(connection, app=APP, version="7", fanout=2))
    assert fired.code == 0, fired.stdout


def release_in_progress(client: consul.Consul, connection: dict[str, Any]) -> None:
    """The running release with node-001 done, node-002 failed, node-003 not started, and a
    node record that is not JSON."""
    running_release(client, connection)
    _index, entry = client.kv.get(f"{PREFIX}{APP}/release")
    run_id = json.loads(entry["Value"])["run_id"]
    now = time.time()
    records = {
        "node-001": {"version": "7", "run_id": run_id, "status": "done", "source": "node-000", "depth": 1,
                     "started": now - 2, "finished": now - 1},
        "node-002": {"version": "7", "run_id": run_id, "status": "failed", "source": "node-000", "depth": 1,
                     "started": now - 2, "finished": now - 1, "error": "exec_commands: exit status 1"},
    }
    for node, record in records.items():
        assert client.kv.put(f"{PREFIX}{APP}/nodes/{node}", json.dumps(record))
    assert client.kv.put(f"{PREFIX}{APP}/nodes/bad", "not json")


def malformed_release(client: consul.Consul, connection: dict[str, Any]) -> None:
    """A release record that is not JSON, of an app every node advertises."""
    advertised(client, connection)
    assert client.kv.put(f"{PREFIX}{APP}/release", "{not json")


@dataclass(frozen=True)
class Scenario:
    """One recording: ``module`` run with ``args`` after ``setup``; ``token`` "wrong" sends a token
    the double does not know; ``leader_lost`` answers the first request with LEADER_LOST."""

    name: str
    description: str
    module: ModuleType
    args: dict[str, Any]
    setup: Setup = no_state
    check_mode: bool = False
    token: str = "right"
    leader_lost: bool = False


def scenarios_of(module: ModuleType, args: dict[str, Any], setup: Setup) -> list[Scenario]:
    """The error scenarios every module shares: a token Consul refuses, and a Consul without a leader."""
    name = module.__name__.rsplit(".", 1)[-1]
    short = name.removeprefix("fireap_")
    return [
        Scenario(f"{short}_acl_denied", f"{name} with a token the agent does not know", module, args, setup,
                 token="wrong"),
        Scenario(f"{short}_leader_lost", f"{name} while Consul has no leader", module, args, setup, leader_lost=True),
    ]


FIRE_ARGS = {"app": APP, "version": "8", "fanout": 2}

SCENARIOS = [
    Scenario("info_in_progress", "fireap_info of a release under way, one node record malformed", fireap_info,
             {"app": APP}, release_in_progress),
    Scenario("info_never_released", "fireap_info of an app never released", fireap_info, {"app": APP}),
    Scenario("info_malformed_release", "fireap_info of an app whose release record is not JSON", fireap_info,
             {"app": APP}, malformed_release),
    *scenarios_of(fireap_info, {"app": APP}, release_in_progress),
    Scenario("clear_abort", "fireap_clear aborting a running release", fireap_clear,
             {"app": APP, "abort": True, "reason": "bad build"}, running_release),
    Scenario("clear_wipe", "fireap_clear wiping the state of a running release", fireap_clear,
             {"app": APP, "wipe": True}, running_release),
    Scenario("clear_abort_malformed_release", "fireap_clear aborting a release whose record is not JSON",
             fireap_clear, {"app": APP, "abort": True}, malformed_release),
    Scenario("clear_wipe_malformed_release", "fireap_clear wiping an app whose release record is not JSON",
             fireap_clear, {"app": APP, "wipe": True}, malformed_release),
    *scenarios_of(fireap_clear, {"app": APP, "abort": True}, running_release),
    Scenario("fire_first", "fireap_fire of an app never released", fireap_fire, FIRE_ARGS, advertised),
    Scenario("fire_check_mode", "fireap_fire in check mode of an app never released", fireap_fire, FIRE_ARGS,
             advertised, check_mode=True),
    Scenario("fire_app_on_no_node", "fireap_fire of an app no node advertises", fireap_fire, FIRE_ARGS),
    Scenario("fire_lock_held", "fireap_fire while the app's previous release still runs", fireap_fire, FIRE_ARGS,
             running_release),
    Scenario("fire_malformed_release", "fireap_fire of an app whose release record is not JSON", fireap_fire,
             FIRE_ARGS, malformed_release),
    *scenarios_of(fireap_fire, FIRE_ARGS, no_state),
]


@pytest.fixture(scope="module")
def answers_double(make_double) -> Iterator[ConsulTarget]:
    with make_double(nodes=NODES, acl_token=f"answers-{uuid.uuid4().hex}", name="answers-double") as target:
        yield target


def connection_of(target: ConsulTarget, token: str) -> dict[str, Any]:
    agent = target.agents[0]
    sent = target.token if token == "right" else f"unknown-{uuid.uuid4().hex}"
    return {"host": agent.host, "port": agent.port, "token": sent, "retries": 0}


def wipe(client: consul.Consul) -> None:
    """Nothing of an earlier scenario left: the prefix deleted, the sessions holding its keys destroyed."""
    _index, entries = client.kv.get(PREFIX, recurse=True)
    for entry in entries or ():
        if entry.get("Session"):
            client.session.destroy(entry["Session"])
    client.kv.delete(PREFIX, recurse=True)


def outcome(run: ModuleRun) -> tuple[int, bool, Any, Any]:
    """What a replay must repeat: exit code, failure, changed and message (not run IDs or times)."""
    return run.code, run.failed, run.result.get("changed"), run.result.get("msg")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
def test_a_recording_replays_as_the_double_answered(answers_double, scenario, request, monkeypatch):
    for name in [name for name in os.environ if name.startswith("CONSUL_")]:
        monkeypatch.delenv(name)
    client = answers_double.client(0)
    wipe(client)
    scenario.setup(client, connection_of(answers_double, "right"))
    connection = connection_of(answers_double, scenario.token)
    recorder = RecordingConsul()
    with consul_transport(recorder):
        live = run_module(scenario.module, dict(connection, **scenario.args), check_mode=scenario.check_mode)
    exchanges = recorder.exchanges
    assert exchanges, f"{scenario.name}: the module sent no request"
    if scenario.leader_lost:
        exchanges = [dict(exchanges[0], response=LEADER_LOST)]
    recorded = json.dumps(exchanges)
    assert answers_double.token not in recorded and connection["token"] not in recorded
    # At the double's address, which the module's messages name.
    where = {"host": connection["host"], "port": connection["port"]}
    replayed = run_on_answers(scenario.name, scenario.module, dict(scenario.args, **where), exchanges=exchanges,
                              check_mode=scenario.check_mode)
    if scenario.leader_lost:
        assert replayed.failed and "HTTP 500: No cluster leader" in replayed.result["msg"], replayed.stdout
    else:
        assert outcome(replayed) == outcome(live), (replayed.stdout, live.stdout)
    if request.config.getoption("record_answers"):
        save(scenario.name, scenario.description, exchanges)


def test_every_recording_has_its_scenario():
    stored = sorted(path.stem for path in ANSWERS_DIR.glob("*.json"))
    assert stored == sorted(scenario.name for scenario in SCENARIOS)
