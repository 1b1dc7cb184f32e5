"""fireap_info with view=apps, in-process against the Consul double: the apps the nodes advertise, the
adverts that outlived their node, and hostile adverts."""

from __future__ import annotations

import json

from ansible_collections.fireap.consul.plugins.module_utils._kv import ADVERT_APPS_MAX, Schema
from ansible_collections.fireap.consul.plugins.modules import fireap_info
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import APP, advertise


def test_the_apps_view_lists_each_app_with_its_nodes_and_settings(acl_cluster, connection, prefix, run_module):
    names = acl_cluster.node_names
    schema = Schema(prefix)
    with acl_cluster.client(0) as client:
        advertise(client, schema, [APP, "batch"], nodes=names[:2], max_semaphores=3, service_filter="^web$")
        advertise(client, schema, ["batch"], nodes=["left-the-cluster"])
        before = client.kv.get(prefix, recurse=True)[1]
    for check_mode in (False, True):
        run = run_module(fireap_info, dict(connection, view="apps", kv_prefix=prefix), check_mode=check_mode)
        assert run.code == 0 and run.result["changed"] is False, run.stdout
        apps = run.result["apps"]
        assert list(apps) == ["batch", APP]
        # The prefix's fixture advertised web with max_semaphores 5 on every node; the first two re-advertised.
        assert apps[APP]["nodes"] == sorted(names) and apps[APP]["fanout"] == 3
        # As many nodes of each: the first node's name decides.
        assert apps[APP]["settings"] == [
            {"max_semaphores": 3, "service_filter": "^web$", "tag_filter": None, "nodes": sorted(names[:2])},
            {"max_semaphores": 5, "service_filter": None, "tag_filter": None, "nodes": sorted(names[2:])},
        ]
        assert apps["batch"]["nodes"] == sorted(names[:2]) and apps["batch"]["absent_nodes"] == ["left-the-cluster"]
        assert run.result["nodes_without_apps"] == []
        assert "release" not in run.result and "counts" not in run.result
        assert acl_cluster.token not in run.stdout
    with acl_cluster.client(0) as client:
        assert client.kv.get(prefix, recurse=True)[1] == before


def test_the_apps_view_of_one_app(acl_cluster, connection, prefix, run_module):
    with acl_cluster.client(0) as client:
        advertise(client, Schema(prefix), [APP, "batch"], nodes=acl_cluster.node_names[:1])
    run = run_module(fireap_info, dict(connection, view="apps", app="batch", kv_prefix=prefix))
    assert run.code == 0 and list(run.result["apps"]) == ["batch"]
    assert run.result["apps"]["batch"]["nodes"] == acl_cluster.node_names[:1]


def test_hostile_adverts_are_left_out_with_a_warning(acl_cluster, connection, prefix, run_module):
    names = acl_cluster.node_names
    schema = Schema(prefix)
    flood = {"apps": {f"app{index}": {"max_semaphores": 1} for index in range(ADVERT_APPS_MAX + 1)}}
    with acl_cluster.client(0) as client:
        client.kv.put(schema.advert(names[0]), json.dumps(flood))
        client.kv.put(schema.advert(names[1]), json.dumps({"apps": {APP: {"max_semaphores": 10**9}}}))
        client.kv.put(schema.advert(names[2]), json.dumps({"apps": {"a b; rm -rf /": {"max_semaphores": 1}}}))
        client.kv.put(schema.advert(names[3]), b"\xff not json")
    run = run_module(fireap_info, dict(connection, view="apps", kv_prefix=prefix))
    assert run.code == 0, run.stdout
    assert run.result["apps"] == {}
    assert run.result["nodes_without_apps"] == sorted(names)
    # In process, Ansible's warning list may still hold one from an earlier module run: ours name the prefix.
    ours = [warning for warning in run.result["warnings"] if prefix in json.dumps(warning)]
    warnings = json.dumps(ours)
    assert len(ours) == 4 and warnings.count("that node counts as having no app") == 4
    assert f"at most {ADVERT_APPS_MAX}" in warnings and "from 1 to 64" in warnings and "may only contain" in warnings


def test_the_release_view_still_needs_an_app(connection, prefix, run_module):
    run = run_module(fireap_info, dict(connection, kv_prefix=prefix))
    assert run.code == 1 and "missing required arguments: app" in run.result["msg"]
    run = run_module(fireap_info, dict(connection, view="nodes", kv_prefix=prefix))
    assert "value of view must be one of: release, apps" in run.result["msg"]
