"""fireap_info run in-process against the Consul double: read-only results and warnings."""

from __future__ import annotations

import json


from ansible_collections.fireap.consul.plugins.modules import fireap_fire, fireap_info


def test_info_reports_the_current_run(acl_cluster, connection, prefix, run_module):
    nodes = len(acl_cluster.agents)
    fired = run_module(fireap_fire, dict(connection, app="web", version="7", kv_prefix=prefix))
    with acl_cluster.client(0) as client:
        client.kv.put(f"{prefix}web/nodes/bad", b"not json")
        before = client.kv.get(prefix, recurse=True)[1]
    for check_mode in (False, True):
        run = run_module(fireap_info, dict(connection, app="web", kv_prefix=prefix), check_mode=check_mode)
        assert run.code == 0 and run.result["changed"] is False, run.stdout
        result = run.result
        assert (result["run_id"], result["version"], result["status"]) == (fired.result["run_id"], "7", "running")
        assert result["counts"] == {"done": 1, "pulling": 0, "waiting": 0, "failed": 0, "pending": nodes - 1}
        assert result["total"] == nodes and result["lock"]["held"] is True
        assert [row["node"] for row in result["nodes"]] == fired.result["targets"]
        assert len(result["warnings"]) == 1 and "malformed KV key" in json.dumps(result["warnings"])
        assert acl_cluster.token not in run.stdout
    with acl_cluster.client(0) as client:
        assert client.kv.get(prefix, recurse=True)[1] == before


def test_info_of_an_app_never_released(connection, prefix, run_module):
    run = run_module(fireap_info, dict(connection, app="never", kv_prefix=prefix))
    assert run.code == 0
    assert (run.result["exists"], run.result["status"], run.result["total"]) == (False, "none", 0)


def test_info_argument_errors(connection, prefix, run_module):
    assert "app name 'a b' may only contain" in run_module(fireap_info, dict(connection, app="a b", kv_prefix=prefix)).result["msg"]
    assert "missing required arguments: app" in run_module(fireap_info, dict(connection, kv_prefix=prefix)).result["msg"]
    assert "must not start with '/'" in run_module(fireap_info, dict(connection, app="web", kv_prefix="/x/")).result["msg"]
