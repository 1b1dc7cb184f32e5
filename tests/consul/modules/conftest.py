"""Fixtures of the module tests: a Consul double enforcing an ACL token, and an in-process runner."""

from __future__ import annotations

import uuid

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import APP, advertise
from ansible_collections.fireap.consul.tests.unit.plugins.modules.module_run import run_module as run_in_process

NODES = 4


@pytest.fixture(scope="session")
def acl_cluster(make_double):
    """NODES agents that answer only requests carrying the cluster's token."""
    with make_double(nodes=NODES, acl_token=f"secret-{uuid.uuid4().hex}", name="modules-double") as target:
        yield target


@pytest.fixture
def prefix(acl_cluster):
    """A KV prefix of this test's own, where every node advertises the app ``web``; lock sessions
    left behind are destroyed, keys deleted."""
    prefix = f"fireap-test/{uuid.uuid4().hex}/"
    with acl_cluster.client(0) as client:
        advertise(client, Schema(prefix), [APP])
    yield prefix
    with acl_cluster.client(0) as client:
        _index, entries = client.kv.get(prefix, recurse=True)
        for entry in entries or ():
            if entry.get("Session"):
                client.session.destroy(entry["Session"])
        client.kv.delete(prefix, recurse=True)


@pytest.fixture
def connection(acl_cluster, monkeypatch):
    """Module parameters reaching agent 0 with the token; CONSUL_HTTP_* of the caller removed."""
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_SSL", "CONSUL_CACERT", "CONSUL_CAPATH"):
        monkeypatch.delenv(name, raising=False)
    agent = acl_cluster.agents[0]
    return {"host": agent.host, "port": agent.port, "token": acl_cluster.token, "retries": 0}


@pytest.fixture
def run_module():
    """``run_module(module, args, check_mode=False, diff=False)`` -> ModuleRun (in-process)."""
    return run_in_process
