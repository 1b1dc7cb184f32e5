"""Fault injection, for real, against a dev cluster whose nodes run the real fireap-reap handler.

One cluster (ACLs on, a data dir so that it can be killed and restarted) serves every test;
each scenario of devcluster/chaos/scenarios.py uses apps of its own. Every test checks the common
figures (survivors all done, no slot left held, no command run twice for one version on one
node, no KV record lost or rolled back) and the scenario's own facts.
"""

from __future__ import annotations

import json

import pytest

from devcluster.chaos.apps import HANG_TIMEOUT, SWARM_ARTIFACT_BYTES, SWARM_NODES
from devcluster.chaos.harness import ChaosCluster
from devcluster.chaos.probe import Outcome
from devcluster.chaos.scenarios import OUTAGE_SECONDS, run_scenario

pytestmark = pytest.mark.double_only

NODES = 10
FANOUT = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ChaosCluster(NODES, FANOUT, tmp_path_factory.mktemp("chaos")) as chaos:
        yield chaos


def assert_nothing_lost(outcome: Outcome) -> None:
    print(json.dumps(outcome.to_json(), default=str, sort_keys=True))  # pytest shortens the repr of a failing outcome
    assert outcome.faults > 0, outcome
    assert outcome.survivors > 0, outcome
    assert outcome.survivors_done == outcome.survivors, outcome
    assert (outcome.leaked_slots, outcome.duplicate_runs, outcome.lost_records) == (0, 0, 0), outcome
    assert outcome.problems == [], outcome


def test_killed_pullers_are_never_done_and_a_refire_completes_them(cluster):
    outcome = run_scenario(cluster, "puller_crash")
    killed = outcome.facts["killed"]
    assert len(killed) == 1
    for seen in killed.values():
        assert seen["record"] == "pulling" and seen["reported"] in ("failed", "pending"), killed
    assert outcome.facts["refired_to"] == list(killed)
    assert outcome.facts["refired_done"] == len(killed)
    assert_nothing_lost(outcome)


@pytest.mark.parametrize("scenario", ["source_crash", "source_leave"])
def test_pullers_of_a_source_that_crashed_or_left_move_to_other_sources(cluster, scenario):
    """A crash shows only once failure detection has run (the pullers see the source fail first);
    a node that leaves is deregistered at once."""
    outcome = run_scenario(cluster, scenario)
    assert outcome.facts["pullers_at_crash"], outcome
    assert_nothing_lost(outcome)
    crashed = outcome.facts["crashed"]
    assert crashed not in outcome.facts["moved"].values()
    assert set(outcome.facts["moved"]) == set(outcome.facts["pullers_at_crash"])
    if scenario == "source_crash":
        assert outcome.facts["detected_after_s"] >= outcome.facts["failure_detection_s"] > 0


def test_a_consul_outage_is_ridden_out_without_running_anything_twice(cluster):
    outcome = run_scenario(cluster, "consul_outage")
    assert_nothing_lost(outcome)
    assert 0 < outcome.facts["done_at_outage"] < NODES
    assert outcome.facts["workers_that_retried"] > 0, "no worker saw the outage"
    assert 5 <= OUTAGE_SECONDS <= 10


def test_replays_duplicates_and_old_events_run_nothing_twice_and_downgrade_nothing(cluster):
    outcome = run_scenario(cluster, "replays_duplicates")
    assert_nothing_lost(outcome)
    assert outcome.facts["downgraded"] == []
    assert outcome.facts["two_apps_one_invocation"] == {"events": 2, "exit": 0}
    assert outcome.survivors == 3 * NODES


def test_two_fires_of_one_app_have_one_winner_and_another_app_goes_on(cluster):
    outcome = run_scenario(cluster, "concurrent_fires")
    assert_nothing_lost(outcome)
    assert len(outcome.facts["race_winners"]) == 1
    (message,) = outcome.facts["race_loser_messages"]
    assert "app 'race'" in message and "locked" in message
    assert outcome.survivors == 2 * NODES


def test_bad_input_is_refused_clearly_and_loses_nothing(cluster):
    outcome = run_scenario(cluster, "bad_input")
    assert_nothing_lost(outcome)
    events = outcome.facts["events"]
    assert "is not JSON" in events["payload not JSON"]
    assert "not UTF-8" in events["payload not UTF-8"]
    assert "no 'version' field" in events["no version"]
    assert "not configured on this node" in events["unknown app"]
    assert "may only contain" in events["app with ../"] and "may only contain" in events["app with a shell metacharacter"]
    assert "may only contain letters, digits and '._+~-'" in events["version with a newline"]
    assert "has 120 characters; at most 64" in events["version of 120 characters"]
    assert events["event over Serf's 512 bytes"].startswith("refused by Consul") and "512 bytes" in events[
        "event over Serf's 512 bytes"]
    assert all(result["exit"] == 0 and result["log"] for result in outcome.facts["stdin"].values())
    assert "not valid base64" in outcome.facts["stdin"]["payload not base64"]["log"]
    configs = outcome.facts["configs"]
    assert "apps.input.max_semaphores" in configs["wrong type"]
    assert "apps.input.exec_command: unknown key" in configs["unknown key"]
    assert "inside double quotes" in configs["quoted variable"]
    assert "filters are not supported" in configs["Jinja filter"]
    assert "consul: port" in configs["bad Consul port"]
    assert "consul: port" in configs["handler run on a broken config"]
    arguments = outcome.facts["module_arguments"]
    assert all(message != "accepted" for message in arguments.values())
    assert "may only contain" in arguments["version with shell code"]
    assert "must start with a letter or a digit" in arguments["version taken for an option"]
    hostile = outcome.facts["hostile_kv"]
    plans = list(hostile["hostile plans"].values())
    assert "field 'source_address'" in plans[0] and plans[0].startswith("failed: ")
    assert plans[1] == "failed: the plan entry of run hostile-plans names this node as its own source"
    assert "field 'stage'" in plans[2] and "field 'source'" in plans[3]
    assert plans[4] == "done: "
    assert all("field 'fanout'" in text and text.startswith("failed: ") for text in hostile["fan-out 10**12"].values())
    assert "field 'version'" in hostile["controller on a release with a forged version"]
    assert hostile["log lines not written by fireap-reap"] == {}
    assert hostile["reap.log modes"] == ["0o640"]
    assert hostile["files planted"] == []


def test_failed_and_hung_commands_follow_their_policy(cluster):
    outcome = run_scenario(cluster, "command_failures")
    assert_nothing_lost(outcome)
    outcomes = outcome.facts["outcomes"]
    for name in outcome.facts["injected"]:
        assert outcomes["fail-abort"][name]["status"] == "failed"
        assert "(1 later command not run)" in outcomes["fail-abort"][name]["error"]
        assert outcomes["fail-ignore"][name]["status"] == "done"
        assert f"timed out after {HANG_TIMEOUT}s" in outcomes["hang"][name]["error"]
    assert outcome.facts["hung_left"] == []


def test_without_the_token_everything_is_refused_clearly_and_the_token_never_leaks(cluster):
    outcome = run_scenario(cluster, "access")
    assert_nothing_lost(outcome)
    refusals = outcome.facts["refusals"]
    assert refusals["handler without a token"].startswith("exit 1: ")
    assert "no ACL token was given" in refusals["handler without a token"]
    assert "no ACL token was given" in refusals["module without a token"]
    assert "ACL not found" in refusals["module with a wrong token"]
    assert outcome.facts["files_holding_the_token"] == 2 * NODES
    assert outcome.facts["token_leaks"] == []


def test_nodes_whose_agent_missed_the_event_catch_up_when_it_starts(cluster):
    outcome = run_scenario(cluster, "missed_events")
    assert_nothing_lost(outcome)
    assert set(outcome.facts["while_down"].values()) == {"pending"}
    assert outcome.facts["caught_up"] == len(outcome.facts["while_down"])
    assert outcome.facts["events_fired"] == 1


def test_past_the_failure_budget_the_run_is_aborted_and_nodes_not_started_never_start(cluster):
    outcome = run_scenario(cluster, "failure_budget")
    report = outcome.facts["report"]
    assert report["status"] == "aborted" and "max_fail_percentage" in report["reason"]
    assert outcome.facts["not_started"] > 0
    assert outcome.facts["started_after_abort"] == []
    assert_nothing_lost(outcome)


def test_nodes_that_gossip_missed_are_completed_by_fires_at_the_stragglers(cluster):
    outcome = run_scenario(cluster, "event_loss")
    assert_nothing_lost(outcome)
    assert outcome.facts["event_loss"] == 0.2
    assert outcome.facts["refire_rounds"] == len([r for r in outcome.facts.get("refires", ()) if r["app"] == "lossy"])


def test_late_and_reordered_events_end_every_node_at_the_newest_version(cluster):
    outcome = run_scenario(cluster, "gossip_reorder")
    assert_nothing_lost(outcome)
    assert outcome.facts["downgraded"] == [] and outcome.facts["ran_1_after_2"] == []


def test_an_abort_ends_workers_waiting_on_a_missing_record_without_a_run(cluster):
    outcome = run_scenario(cluster, "abort_missing_record")
    assert outcome.facts["waiting_at_abort"], outcome
    assert outcome.facts["ran_or_done_after_abort"] == []
    assert_nothing_lost(outcome)


def test_a_release_to_a_service_reaches_nodes_whose_service_id_is_not_its_name(cluster):
    outcome = run_scenario(cluster, "service_ids")
    assert outcome.facts["never_woken"] == [], outcome.problems
    assert_nothing_lost(outcome)


def test_a_release_to_every_node_fits_consul_1_13_s_64_operation_transactions(cluster):
    outcome = run_scenario(cluster, "txn_limit_1_13")
    assert outcome.facts["consul_version"] == "1.13.0" and outcome.facts["txn_max_ops"] == 64
    assert outcome.facts["txn_of_65"].startswith("413 ")
    assert_nothing_lost(outcome)


@pytest.mark.parametrize("scenario", ["swarm_peer_crash", "swarm_late_join", "swarm_corrupt_peer",
                                      "swarm_leader_gone"])
def test_the_swarm_delivers_a_byte_equal_artifact_to_every_survivor_despite_its_faults(cluster, scenario):
    """On the first SWARM_NODES nodes; every file judged is the leader's build (a killed or
    late target's too, once caught up), and each target but a holder fetched it from the swarm."""
    outcome = run_scenario(cluster, scenario)
    assert_nothing_lost(outcome)
    assert outcome.nodes == SWARM_NODES
    assert set(outcome.facts["artifacts"].values()) == {"equal"}, outcome.facts
    assert SWARM_ARTIFACT_BYTES in outcome.facts["downloaded_from_swarm"].values()
    if scenario == "swarm_peer_crash":
        assert 0 < outcome.facts["killed_at_bytes"] < SWARM_ARTIFACT_BYTES
    if scenario == "swarm_late_join":
        assert outcome.facts["late_while_down"] == "no record"
