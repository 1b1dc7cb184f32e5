"""The dev cluster's published files: the inventory carries the ACL token only owner-readable."""

from __future__ import annotations

import json
import stat

import yaml

from devcluster.consul.workdir import CLUSTER_FILE, INVENTORY_FILE, plan_nodes, prepare_dirs, write_cluster_files


def publish(tmp_path, acl_token):
    nodes = plan_nodes(tmp_path, 3, 18500, "127.0.0.1")
    prepare_dirs(tmp_path, nodes)
    write_cluster_files(tmp_path, "dc1", 18500, nodes, acl_token, None)
    return nodes


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_an_inventory_with_the_token_is_readable_by_its_owner_only(tmp_path):
    publish(tmp_path, "secret-token-1")
    inventory = tmp_path / INVENTORY_FILE
    assert mode(inventory) == 0o600
    assert "secret-token-1" in inventory.read_text()
    assert "secret-token-1" not in (tmp_path / CLUSTER_FILE).read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_without_acls_both_files_are_world_readable_and_complete(tmp_path):
    nodes = publish(tmp_path, None)
    assert mode(tmp_path / INVENTORY_FILE) == 0o644
    assert mode(tmp_path / CLUSTER_FILE) == 0o644
    cluster = json.loads((tmp_path / CLUSTER_FILE).read_text())
    assert [node["name"] for node in cluster["nodes"]] == [node.name for node in nodes]
    assert cluster["acl"] is False
    assert yaml.safe_load((tmp_path / INVENTORY_FILE).read_text())


def test_republishing_without_the_token_makes_the_inventory_world_readable_again(tmp_path):
    publish(tmp_path, "secret-token-2")
    publish(tmp_path, None)
    assert mode(tmp_path / INVENTORY_FILE) == 0o644
    assert "secret-token-2" not in (tmp_path / INVENTORY_FILE).read_text()
