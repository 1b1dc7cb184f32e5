"""What each module reports when Consul refuses its token, has no leader, or does not answer:
the recorded answers of tests/unit/fixtures/consul_answers for the first two, a port that
refuses connections for the last."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from ansible_collections.fireap.consul.plugins.modules import fireap_clear, fireap_fire, fireap_info
from ansible_collections.fireap.consul.tests.unit.plugins.modules.consul_answers import (
    REPLAY_CONNECTION,
    run_on_answers,
)
from ansible_collections.fireap.consul.tests.unit.plugins.modules.module_run import run_module

#: Each module, the name its recordings start with, and the arguments they were recorded with.
MODULES = pytest.mark.parametrize(
    "module, recorded, args",
    [
        (fireap_info, "info", {"app": "web"}),
        (fireap_clear, "clear", {"app": "web", "abort": True}),
        (fireap_fire, "fire", {"app": "web", "version": "8", "fanout": 2}),
    ],
    ids=["fireap_info", "fireap_clear", "fireap_fire"],
)


@MODULES
def test_a_token_consul_refuses_fails_with_http_403_and_names_the_token_option(
    module: ModuleType, recorded: str, args: dict[str, Any]
) -> None:
    run = run_on_answers(f"{recorded}_acl_denied", module, args)
    assert run.failed, run.stdout
    assert "HTTP 403 Permission denied" in run.result["msg"] and "set token or CONSUL_HTTP_TOKEN" in run.result["msg"]
    assert REPLAY_CONNECTION["token"] not in run.stdout


@MODULES
def test_consul_without_a_leader_fails_with_its_answer(module: ModuleType, recorded: str, args: dict[str, Any]) -> None:
    run = run_on_answers(f"{recorded}_leader_lost", module, args)
    assert run.failed and "HTTP 500: No cluster leader" in run.result["msg"], run.stdout


@MODULES
def test_an_agent_that_does_not_listen_fails_as_unreachable(
    module: ModuleType, recorded: str, args: dict[str, Any], closed_port: int
) -> None:
    run = run_module(module, dict(args, host="127.0.0.1", port=closed_port, retries=0))
    assert run.failed, run.stdout
    assert f"cannot reach the Consul agent at http://127.0.0.1:{closed_port}" in run.result["msg"]
    assert "connection refused" in run.result["msg"]
