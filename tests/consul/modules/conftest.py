"""Fixtures of the module tests: a Consul double enforcing an ACL token, and an in-process runner."""

from __future__ import annotations

import json
import uuid

import pytest

from ansible.module_utils import _internal as module_internals
from ansible.module_utils.testing import patch_module_args

NODES = 4


@pytest.fixture(scope="session")
def acl_cluster(make_double):
    """NODES agents that answer only requests carrying the cluster's token."""
    with make_double(nodes=NODES, acl_token=f"secret-{uuid.uuid4().hex}", name="modules-double") as target:
        yield target


@pytest.fixture
def prefix(acl_cluster):
    """A KV prefix of this test's own; lock sessions left behind are destroyed, keys deleted."""
    prefix = f"fireap-test/{uuid.uuid4().hex}/"
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


class ModuleRun:
    """One in-process run of a module: its exit code, raw stdout and parsed result."""

    def __init__(self, code: int, stdout: str) -> None:
        self.code = code
        self.stdout = stdout
        self.result = json.loads(stdout)

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed"))


@pytest.fixture
def run_module(capsys, monkeypatch):
    """``run_module(module, args, check_mode=False, diff=False)`` -> ModuleRun."""

    def run(module, args: dict, check_mode: bool = False, diff: bool = False) -> ModuleRun:
        full = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
        capsys.readouterr()
        # Once a test has imported controller code (a filter plugin, say), module_utils would
        # send warnings to the controller's display instead of the module's result.
        monkeypatch.setattr(module_internals, "is_controller", False)
        with patch_module_args(full), pytest.raises(SystemExit) as exited:
            module.main()
        return ModuleRun(exited.value.code, capsys.readouterr().out)

    return run
