"""fireap_info run in-process on Consul's answers recorded from the double: the progress of a
release, an app never released, a corrupt release record (test_consul_errors.py: Consul's own errors)."""

from __future__ import annotations

from ansible_collections.fireap.consul.plugins.modules import fireap_info
from ansible_collections.fireap.consul.tests.unit.plugins.modules.consul_answers import (
    REPLAY_CONNECTION,
    run_on_answers,
)

NODES = ["node-000", "node-001", "node-002", "node-003"]


def test_a_release_under_way_is_counted_node_by_node_and_a_malformed_record_is_a_warning():
    for check_mode in (False, True):
        run = run_on_answers("info_in_progress", fireap_info, {"app": "web"}, check_mode=check_mode)
        assert run.code == 0 and run.result["changed"] is False, run.stdout
        result = run.result
        assert (result["exists"], result["version"]) == (True, "7")
        assert (result["status"], result["all_finished"]) == ("running", False)
        assert result["counts"] == {"done": 2, "pulling": 0, "waiting": 0, "failed": 1, "pending": 1}
        assert result["total"] == len(NODES) and result["lock"]["held"] is True
        assert [row["node"] for row in result["nodes"]] == NODES
        assert [(row["node"], row["error"]) for row in result["failed_nodes"]] == [
            ("node-002", "exec_commands: exit status 1")]
        assert len(result["warnings"]) == 1 and "malformed KV key 'fireap/web/nodes/bad'" in str(result["warnings"])
        assert REPLAY_CONNECTION["token"] not in run.stdout


def test_an_app_never_released_exists_not():
    run = run_on_answers("info_never_released", fireap_info, {"app": "web"})
    assert run.code == 0, run.stdout
    assert (run.result["exists"], run.result["status"]) == (False, "none")
    assert (run.result["total"], run.result["lock"]) == (0, None)


def test_a_release_record_that_is_not_json_fails_and_says_how_to_get_rid_of_it():
    run = run_on_answers("info_malformed_release", fireap_info, {"app": "web"})
    assert run.failed, run.stdout
    assert "malformed KV key 'fireap/web/release'" in run.result["msg"]
    assert "fireap_clear wipe=true" in run.result["msg"]
