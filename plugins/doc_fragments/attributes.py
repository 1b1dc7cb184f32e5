# SPDX-License-Identifier: MIT
"""Documentation of the attributes of the fireap modules."""

from __future__ import annotations


class ModuleDocFragment:
    """What check_mode, diff_mode and action_group mean for a fireap module.

    ``fireap.consul.attributes`` describes check_mode and diff_mode; each module states its own
    ``support`` and, where it helps, ``details``. ``fireap.consul.attributes.action_group``
    documents membership of the action group that meta/runtime.yml defines; every module of
    that group extends it.
    """

    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Runs in check mode and then reports what it would change, without changing anything.
  diff_mode:
    description: Returns what it changed (or would change, in check mode) as a before and after diff in diff mode.
"""

    ACTION_GROUP = r"""
options: {}
attributes:
  action_group:
    description: Member of the action group C(group/fireap.consul.consul); C(module_defaults) set for the group, such as the
      connection options, apply to this action.
    support: full
    membership:
      - fireap.consul.consul
"""
