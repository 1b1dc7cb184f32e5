"""fireap_clear run in-process against the Consul double: lift, abort, wipe, check and diff mode."""

from __future__ import annotations

import json

from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.modules import fireap_clear, fireap_fire


def dump(cluster, prefix):
    """The keys of the app ``web`` (the nodes' adverts are not the app's)."""
    with cluster.client(0) as client:
        return client.kv.get(Schema(prefix).app_prefix("web"), recurse=True)[1]


def test_check_mode_reports_without_changing(acl_cluster, connection, prefix, run_module):
    fired = run_module(fireap_fire, dict(connection, app="web", version="1", kv_prefix=prefix))
    before = dump(acl_cluster, prefix)
    run = run_module(fireap_clear, dict(connection, app="web", abort=True, wipe=True, kv_prefix=prefix), check_mode=True, diff=True)
    assert run.code == 0 and run.result["changed"] is True, run.stdout
    assert run.result["aborted"]["run_id"] == fired.result["run_id"]
    assert run.result["lock_lifted"]["run_id"] == fired.result["run_id"]
    assert run.result["wiped"] is True and run.result["deleted_keys"] == len(before)
    assert run.result["diff"]["after"] == {"release": None, "lock": None}
    assert dump(acl_cluster, prefix) == before
    assert acl_cluster.token not in run.stdout


def test_abort_with_a_reason(acl_cluster, connection, prefix, run_module):
    run_module(fireap_fire, dict(connection, app="web", version="1", kv_prefix=prefix))
    args = dict(connection, app="web", abort=True, lift_lock=False, reason="bad build", kv_prefix=prefix)
    run = run_module(fireap_clear, args, diff=True)
    assert run.result["changed"] is True and run.result["lock_lifted"] is None
    assert run.result["diff"]["before"]["release"]["status"] == "running"
    assert run.result["diff"]["after"]["release"]["aborted_reason"] == "bad build"
    with acl_cluster.client(0) as client:
        record = json.loads(client.kv.get(f"{prefix}web/release")[1]["Value"])
    assert (record["status"], record["aborted_reason"]) == ("aborted", "bad build")
    assert run_module(fireap_clear, args).result["changed"] is False


def test_lift_lock_then_nothing_to_lift(connection, prefix, run_module):
    run_module(fireap_fire, dict(connection, app="web", version="1", kv_prefix=prefix))
    first = run_module(fireap_clear, dict(connection, app="web", kv_prefix=prefix))
    assert first.result["changed"] is True and first.result["lock_lifted"]["held"] is True
    assert run_module(fireap_clear, dict(connection, app="web", kv_prefix=prefix)).result["changed"] is False
    assert run_module(fireap_fire, dict(connection, app="web", version="2", kv_prefix=prefix)).result["took_over"] is None


def test_wipe_deletes_the_app(acl_cluster, connection, prefix, run_module):
    run_module(fireap_fire, dict(connection, app="web", version="1", kv_prefix=prefix))
    run = run_module(fireap_clear, dict(connection, app="web", wipe=True, kv_prefix=prefix))
    assert run.result["wiped"] is True and run.result["deleted_keys"] > 0
    assert dump(acl_cluster, prefix) is None


def test_reason_requires_abort(acl_cluster, connection, prefix, run_module):
    run = run_module(fireap_clear, dict(connection, app="web", reason="why", kv_prefix=prefix))
    assert run.failed and "requires abort=true" in run.result["msg"]
