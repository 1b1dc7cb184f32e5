"""fireap_fire run in-process on Consul's answers recorded from the double: a first release, check
mode, a release refused while the previous one runs, its record is corrupt or no node has the app
(test_consul_errors.py: Consul's own errors)."""

from __future__ import annotations

import re

from ansible_collections.fireap.consul.plugins.modules import fireap_fire
from ansible_collections.fireap.consul.tests.unit.plugins.modules.consul_answers import run_on_answers

ARGS = {"app": "web", "version": "8", "fanout": 2}
NODES = ["node-000", "node-001", "node-002", "node-003"]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_a_first_release_targets_every_node_leader_first_and_fires_the_event():
    run = run_on_answers("fire_first", fireap_fire, ARGS)
    assert run.code == 0 and run.result["changed"] is True, run.stdout
    result = run.result
    assert (result["version"], result["previous_version"]) == ("8", None)
    assert (result["leader"], result["fanout"]) == ("node-000", 2)
    assert (result["targets"], result["target_count"]) == (NODES, len(NODES))
    assert re.fullmatch(r"[0-9a-f]{32}", result["run_id"]) and UUID.fullmatch(result["event_id"])
    assert (result["release"]["run_id"], result["release"]["status"]) == (result["run_id"], "running")
    assert (result["previous_release"], result["took_over"], result["stale_plans"]) == (None, None, [])


def test_check_mode_says_what_would_be_fired_and_fires_nothing():
    run = run_on_answers("fire_check_mode", fireap_fire, ARGS, check_mode=True)
    assert run.code == 0 and run.result["changed"] is True, run.stdout
    assert (run.result["targets"], run.result["event_id"]) == (NODES, None)


def test_a_release_still_running_holds_the_lock_and_the_message_says_what_to_do():
    run = run_on_answers("fire_lock_held", fireap_fire, ARGS)
    assert run.failed, run.stdout
    msg = run.result["msg"]
    assert msg.startswith("app 'web' is locked by run ") and "(version 7)" in msg
    assert "that release is still running: 3 of 4 targets have not finished" in msg
    assert "force=true" in msg and "fireap_clear" in msg


def test_a_release_record_that_is_not_json_fails_and_says_how_to_get_rid_of_it():
    run = run_on_answers("fire_malformed_release", fireap_fire, ARGS)
    assert run.failed, run.stdout
    assert "malformed KV key 'fireap/web/release'" in run.result["msg"]
    assert "fireap_clear wipe=true" in run.result["msg"]


def test_an_app_no_node_advertises_fails_before_the_lock_is_looked_at():
    run = run_on_answers("fire_app_on_no_node", fireap_fire, ARGS)
    assert run.failed, run.stdout
    assert run.result["msg"].startswith("app 'web' is configured on no node: none advertises it in fireap/.apps/<node> "
                                        "(the apps the nodes have: none)")
