"""The fireap_wait action plugin's loop, with the modules it runs answered from recorded results."""

from __future__ import annotations

import pytest
import yaml
from ansible.modules import async_status
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.fake_time import FakeTime
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.release_info import (
    finished_release,
    info_of,
    no_release,
    row,
    running_release,
)

from ansible_collections.fireap.consul.plugins.action import fireap_wait
from ansible_collections.fireap.consul.plugins.modules import fireap_info as fireap_info_doc
from ansible_collections.fireap.consul.plugins.modules import fireap_wait as fireap_wait_doc
from ansible_collections.fireap.consul.plugins.module_utils import _progress
from ansible_collections.fireap.consul.plugins.module_utils._connection import CONNECTION_ARGUMENT_SPEC

RUN = "0f3c" * 8
ARGS = {"app": "web", "run_id": None, "timeout": 600.0, "poll": 2.0, "max_fail_percentage": None,
        "straggler_retry_after": 30.0, "kv_prefix": "fireap/"}


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(_progress, "time", fake)
    monkeypatch.setattr(fireap_wait, "time", fake)
    monkeypatch.setattr(fireap_wait.display, "display", lambda *_args, **_kwargs: None)
    return fake


class Modules:
    """Answers each module run: fireap_info with the next progress, the others with ``answers``."""

    def __init__(self, progress: list[dict], **answers) -> None:
        self.progress = list(progress)
        self.answers = answers
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, module_name: str, module_args: dict, task_vars: dict) -> dict:
        del task_vars
        name = module_name.rsplit(".", 1)[-1]
        self.calls.append((name, module_args))
        if name == "fireap_info":
            return dict(self.progress.pop(0), changed=False)
        return self.answers[name]


def plugin(modules: Modules, connection: dict | None = None) -> fireap_wait.ActionModule:
    action = object.__new__(fireap_wait.ActionModule)
    action._execute_module = modules
    action._task_vars = {}
    action._connection_args = connection or {}
    action._warnings = []
    return action


def test_the_wait_timeout_is_not_the_modules_http_timeout():
    assert "timeout" in CONNECTION_ARGUMENT_SPEC and "timeout" not in fireap_wait.PASSED_ON
    assert set(fireap_wait.PASSED_ON) == set(CONNECTION_ARGUMENT_SPEC) - {"timeout"}
    modules = Modules([finished_release()])
    plugin(modules, {"host": "10.0.0.1", "token": "t"})._wait(dict(ARGS))
    assert modules.calls == [("fireap_info", {"app": "web", "kv_prefix": "fireap/", "host": "10.0.0.1", "token": "t"})]


def test_a_finished_run_with_a_failure_fails_with_the_outcome_text():
    modules = Modules([running_release(), finished_release()])
    outcome = plugin(modules)._wait(dict(ARGS, run_id=RUN))
    assert outcome["failed"] and outcome["msg"] == _progress.outcome_problem(finished_release())
    assert (outcome["timed_out"], outcome["aborted"], outcome["refired"], outcome["polls"]) == (False, False, [], 2)
    assert outcome["changed"] is False and outcome["counts"] == finished_release()["counts"]


def test_a_run_that_succeeds_is_summed_up():
    done = info_of(finished_release()["nodes"][:4])
    outcome = plugin(Modules([done]))._wait(dict(ARGS))
    assert "failed" not in outcome
    assert outcome["msg"] == f"run {RUN} of app 'web' (version 1.4.3): 4 of 4 targets done in 2.0s"


def test_the_timeout_ends_the_wait_and_says_what_is_unfinished(clock):
    modules = Modules([running_release()] * 4)
    outcome = plugin(modules)._wait(dict(ARGS, timeout=5.0, straggler_retry_after=0.0))
    assert outcome["timed_out"] and outcome["polls"] == 4 and clock.now == 5.0
    assert outcome["msg"] == _progress.outcome_problem(running_release(), 5.0)


def test_past_the_failure_budget_the_run_is_aborted_and_read_again():
    failing = info_of([row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None),
                       row("node-001", "failed", started=0.0, finished=1.0, error="exit status 4"),
                       row("node-002", "pending", this_run=False)])
    aborted = dict(failing, status="aborted", release=dict(failing["release"], aborted_reason="1 of 3 failed"))
    modules = Modules([failing, aborted], fireap_clear={"changed": True})
    outcome = plugin(modules)._wait(dict(ARGS, max_fail_percentage=10.0))
    [(_name, args)] = [call for call in modules.calls if call[0] == "fireap_clear"]
    assert args["abort"] and args["reason"] == "1 of 3 targets failed (33.3%), more than max_fail_percentage 10%"
    assert (outcome["aborted"], outcome["polls"], outcome["changed"]) == (True, 2, True)
    assert outcome["msg"].startswith(f"run {RUN} of app 'web' (version 1.4.3) was aborted: 1 of 3 failed")


def test_stragglers_get_the_event_again_after_the_delay():
    modules = Modules([running_release()] * 3 + [finished_release()],
                      fireap_fire={"stragglers": ["node-003"], "events": [], "changed": True})
    outcome = plugin(modules)._wait(dict(ARGS, poll=10.0, straggler_retry_after=15.0))
    assert outcome["refired"] == [{"after": 20.0, "stragglers": ["node-003"]}]
    [(_name, args)] = [call for call in modules.calls if call[0] == "fireap_fire"]
    assert args["retry_stragglers"] and args["version"] == "1.4.3"


def test_a_replaced_run_fails_the_task():
    replaced = info_of(running_release()["nodes"], run_id="1" * 32)
    with pytest.raises(_progress.ReleaseError, match=f"stopped waiting for run {RUN} .*replaced it"):
        plugin(Modules([running_release(), replaced]))._wait(dict(ARGS))


def async_result_keys() -> set[str]:
    """The keys Ansible sets on an async task's result: async_status's own (not the job's stdout and
    stderr, which are the module's) and async_wrapper's results_file."""
    return set(yaml.safe_load(async_status.RETURN)) - {"stdout", "stderr"} | {"results_file"}


def test_no_result_key_is_one_that_ansible_sets_on_an_async_task():
    reserved = async_result_keys()
    assert {"finished", "started", "ansible_job_id"} <= reserved
    for module in (fireap_info_doc, fireap_wait_doc):
        assert not set(yaml.safe_load(module.RETURN)) & reserved, module.__name__
    outcome = plugin(Modules([finished_release()]))._wait(dict(ARGS))
    for result in (finished_release(), no_release(), outcome):
        assert not set(result) & reserved
    assert outcome["all_finished"] is True
