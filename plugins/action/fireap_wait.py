# SPDX-License-Identifier: MIT
"""Action plugin fireap_wait: wait for a release run, printing its progress as it goes.

It drives the wait loop ``_progress.follow_run``: every read is a run of the fireap_info module
on the target (the leader), so the controller needs no route to Consul, and between reads it
sleeps ``poll`` seconds. Re-fires and the abort are runs of fireap_fire and fireap_clear in the
same way. Progress lines go through Display, which forwards them from the worker process to the
controller's output while the task is still running.
"""

from __future__ import annotations

import math
import time

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

from ansible_collections.fireap.consul.plugins.module_utils._connection import CONNECTION_ARGUMENT_SPEC
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._kv import DEFAULT_PREFIX
from ansible_collections.fireap.consul.plugins.module_utils._progress import (
    MAX_NAMED,
    STATUS_PAUSED,
    counts_text,
    follow_run,
    outcome_problem,
    over_failure_budget,
    run_over,
)
from ansible_collections.fireap.consul.plugins.plugin_utils._connection_vars import role_connection

display = Display()

COLLECTION = "fireap.consul"

WAIT_ARGUMENT_SPEC = {
    "app": {"type": "str", "required": True},
    "run_id": {"type": "str"},
    "timeout": {"type": "float", "default": 600.0},
    "poll": {"type": "float", "default": 2.0},
    "max_fail_percentage": {"type": "float"},
    "straggler_retry_after": {"type": "float", "default": 30.0},
    "kv_prefix": {"type": "str", "default": DEFAULT_PREFIX},
}
ARGUMENT_SPEC = dict(CONNECTION_ARGUMENT_SPEC, **WAIT_ARGUMENT_SPEC)

#: The connection options passed on to the modules the plugin runs: not ``timeout``, which here
#: is how long to wait for the run (the modules keep their own HTTP timeout).
PASSED_ON = tuple(name for name in CONNECTION_ARGUMENT_SPEC if name not in WAIT_ARGUMENT_SPEC)

#: Keys of a module result that describe the module run, not the release.
_RUN_KEYS = frozenset(("changed", "failed", "msg", "invocation", "warnings", "deprecations", "exception"))


class _ModuleFailed(FireapError):
    """A fireap module run on the target failed; the message says which and why."""


class ActionModule(ActionBase):
    """Poll fireap_info until the run ends; re-fire to stragglers; abort on too many failures."""

    _supports_check_mode = False
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp  # no longer has any effect
        self._task_vars = {} if task_vars is None else task_vars
        # Options the task leaves unset come from the host's fireap_node role variables, as for the modules.
        self._task.args = role_connection(self, self._task_vars)
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        _check_numbers(args)
        self._connection_args = {name: args[name] for name in PASSED_ON if args.get(name) is not None}
        self._warnings: list[str] = []
        try:
            result.update(self._wait(args))
        except FireapError as err:
            result.update(failed=True, msg=str(err))
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        if self._warnings:
            result["warnings"] = self._warnings
        return result

    # --- the loop -----------------------------------------------------------------------

    def _wait(self, args: dict) -> dict:
        app, timeout = args["app"], args["timeout"]
        retry_after = args["straggler_retry_after"] or None
        next_refire = retry_after
        refired: list[dict] = []
        aborted = timed_out = False
        polls = 0

        def read() -> dict:
            nonlocal polls
            polls += 1
            return self._info(args)

        for snapshot in follow_run(read, time.sleep, args["run_id"], timeout=timeout, poll=args["poll"]):
            progress = snapshot.info
            display.display(progress_line(progress, snapshot.elapsed))
            if run_over(progress):
                break
            reason = over_failure_budget(progress, args["max_fail_percentage"])
            if reason:
                self._abort(args, progress, reason)
                aborted = True
                progress = read()
                break
            if snapshot.timed_out:
                timed_out = True
                break
            if next_refire is not None and snapshot.elapsed >= next_refire and progress["counts"]["pending"]:
                refire = self._refire(args, progress, snapshot.elapsed)
                if refire is not None:
                    refired.append(refire)
                next_refire = snapshot.elapsed + retry_after

        outcome = dict(progress, timed_out=timed_out, aborted=aborted, refired=refired, polls=polls)
        outcome["changed"] = bool(refired or aborted)
        problem = outcome_problem(progress, timeout if timed_out else None)
        if problem:
            outcome.update(failed=True, msg=problem)
        elif progress["status"] == STATUS_PAUSED:
            outcome["msg"] = (
                f"run {progress['run_id']} of app {app!r} (version {progress['version']}) is paused after stage "
                f"{progress['release']['pause_after_stage']}: its {len(progress['canaries'])} canaries are done; "
                "let the other stages follow with fireap_fire resume=true, or stop with fireap_clear abort=true"
            )
        else:
            outcome["msg"] = (
                f"run {progress['run_id']} of app {app!r} (version {progress['version']}): "
                f"{progress['counts']['done']} of {progress['total']} targets done in "
                f"{progress['timings']['elapsed']:.1f}s"
            )
        return outcome

    # --- module runs on the target -------------------------------------------------------

    def _module(self, name: str, what: str, **module_args) -> dict:
        module_args.update(self._connection_args)
        result = self._execute_module(
            module_name=f"{COLLECTION}.{name}", module_args=module_args, task_vars=self._task_vars
        )
        for warning in result.get("warnings") or ():
            self._warn(warning)
        if result.get("failed"):
            raise _ModuleFailed(f"{what} failed ({COLLECTION}.{name}): {result.get('msg') or 'no message'}")
        return {key: value for key, value in result.items() if key not in _RUN_KEYS and not key.startswith("_ansible")}

    def _warn(self, warning: str) -> None:
        """Keep a warning for the task result once, however many polls repeat it."""
        if warning not in self._warnings:
            self._warnings.append(warning)

    def _info(self, args: dict) -> dict:
        return self._module("fireap_info", "reading the progress", app=args["app"], kv_prefix=args["kv_prefix"])

    def _refire(self, args: dict, progress: dict, elapsed: float) -> dict | None:
        """Fire the event again to the targets without a record for the run; None if that failed."""
        try:
            fired = self._module(
                "fireap_fire",
                "re-firing the event to the targets that never started",
                app=args["app"],
                version=progress["version"],
                retry_stragglers=True,
                kv_prefix=args["kv_prefix"],
            )
        except _ModuleFailed as err:
            # The run goes on without it; the next attempt comes after straggler_retry_after.
            self._warn(str(err))
            return None
        stragglers = fired["stragglers"]
        if not stragglers:  # the pending targets are held by the canary gate
            return None
        display.display(
            f"{args['app']} {progress['version']}: fired the event again to {len(stragglers)} target(s) that never "
            f"started: {_names(stragglers)}"
        )
        return {"after": round(elapsed, 1), "stragglers": stragglers}

    def _abort(self, args: dict, progress: dict, reason: str) -> None:
        display.display(f"{args['app']} {progress['version']}: aborting the run: {reason}")
        self._module(
            "fireap_clear",
            "aborting the run",
            app=args["app"],
            abort=True,
            reason=reason,
            kv_prefix=args["kv_prefix"],
        )


# --- pure helpers (no I/O) ---------------------------------------------------------------------


def _check_numbers(args: dict) -> None:
    """Refuse values the loop cannot use (negative, NaN, infinite), naming the option."""
    checks = (
        ("timeout", lambda v: math.isfinite(v) and v >= 0, "a number of seconds >= 0"),
        ("poll", lambda v: math.isfinite(v) and v > 0, "a number of seconds > 0"),
        (
            "straggler_retry_after",
            lambda v: math.isfinite(v) and v >= 0,
            "a number of seconds >= 0 (0 disables re-firing)",
        ),
        ("max_fail_percentage", lambda v: v is None or 0 <= v <= 100, "a percentage from 0 to 100"),
    )
    for name, valid, expected in checks:
        if not valid(args[name]):
            raise AnsibleActionFail(f"{name} must be {expected}, got {args[name]!r}")


def progress_line(progress: dict, elapsed: float) -> str:
    """``web 1.4.3: 37/100 done, 2 failed, 3 pulling, 0 waiting, 58 pending [21s]``."""
    suffix = f" ({progress['status']})" if progress["status"] in ("aborted", STATUS_PAUSED) else ""
    return f"{progress['app']} {progress['version']}: {counts_text(progress)} [{elapsed:.0f}s]{suffix}"


def _names(names: list[str]) -> str:
    more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more
