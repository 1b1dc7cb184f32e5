"""One module run in-process, as Ansible runs it: its arguments in, its exit code and JSON result out.

The pure module tests and the recorder of their Consul answers (tests/consul/test_record_consul_answers.py)
both run modules this way.
"""

from __future__ import annotations

import contextlib
import io
import json
from types import ModuleType
from typing import Any
from unittest import mock

from ansible.module_utils import _internal as module_internals
from ansible.module_utils.testing import patch_module_args


class ModuleRun:
    """One in-process run of a module: its exit code, raw stdout and parsed result."""

    def __init__(self, code: int, stdout: str) -> None:
        self.code = code
        self.stdout = stdout
        self.result: dict[str, Any] = json.loads(stdout)

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed"))


def run_module(module: ModuleType, args: dict[str, Any], check_mode: bool = False, diff: bool = False) -> ModuleRun:
    """Run ``module.main()`` with ``args``; returns once the module has exited."""
    stdout = io.StringIO()
    full = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    # Once a test has imported controller code (a filter plugin, say), module_utils would send
    # warnings to the controller's display instead of the module's result.
    with (mock.patch.object(module_internals, "is_controller", False), patch_module_args(full),
          contextlib.redirect_stdout(stdout)):
        try:
            module.main()
        except SystemExit as exited:
            return ModuleRun(int(exited.code or 0), stdout.getvalue())
    raise AssertionError(f"{module.__name__}.main() returned without exit_json or fail_json")
