"""fireap_clear run in-process on Consul's answers recorded from the double: aborting and wiping
a release, a corrupt one included (test_consul_errors.py: Consul's own errors)."""

from __future__ import annotations

from ansible_collections.fireap.consul.plugins.modules import fireap_clear
from ansible_collections.fireap.consul.tests.unit.plugins.modules.consul_answers import run_on_answers


def test_abort_marks_the_running_release_aborted_and_lifts_its_lock():
    run = run_on_answers("clear_abort", fireap_clear, {"app": "web", "abort": True, "reason": "bad build"}, diff=True)
    assert run.code == 0 and run.result["changed"] is True, run.stdout
    result = run.result
    release = result["before"]["release"]
    assert (release["version"], release["status"]) == ("7", "running")
    assert result["aborted"] == {"run_id": release["run_id"], "version": "7", "reason": "bad build"}
    assert result["lock_lifted"]["held"] is True and result["lock_lifted"]["run_id"] == release["run_id"]
    after = result["after"]["release"]
    assert (after["status"], after["aborted_reason"]) == ("aborted", "bad build")
    assert result["after"]["lock"]["held"] is False
    assert (result["wiped"], result["deleted_keys"]) == (False, 0)
    assert result["diff"] == {"before": result["before"], "after": result["after"]}


def test_wipe_deletes_every_key_of_the_app():
    run = run_on_answers("clear_wipe", fireap_clear, {"app": "web", "wipe": True})
    assert run.code == 0 and run.result["changed"] is True, run.stdout
    # The recorded release: its record, lock, history, the leader's state and the plans of the three other nodes.
    assert (run.result["wiped"], run.result["deleted_keys"]) == (True, 7)
    assert run.result["lock_lifted"]["held"] is True and run.result["aborted"] is None
    assert run.result["after"] == {"release": None, "lock": None}


def test_a_release_record_that_is_not_json_cannot_be_aborted_but_can_be_wiped():
    aborting = run_on_answers("clear_abort_malformed_release", fireap_clear, {"app": "web", "abort": True})
    assert aborting.failed and "malformed KV key 'fireap/web/release'" in aborting.result["msg"], aborting.stdout
    wiping = run_on_answers("clear_wipe_malformed_release", fireap_clear, {"app": "web", "wipe": True})
    assert wiping.code == 0, wiping.stdout
    assert (wiping.result["changed"], wiping.result["wiped"], wiping.result["deleted_keys"]) == (True, True, 1)
    assert wiping.result["before"] == {"release": None, "lock": None}
