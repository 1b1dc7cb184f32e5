#!/usr/bin/python
# SPDX-License-Identifier: MIT
"""Ansible module fireap_clear: lift an app's fire lock, abort its run, or wipe its state."""

from __future__ import annotations

DOCUMENTATION = r"""
module: fireap_clear
short_description: Lift a fireap fire lock, abort a release run, or wipe an app's state
version_added: 0.1.0
description:
  - Lifts the fire lock of O(app) (destroys the Consul session holding it), so that the next
    M(fireap.consul.fireap_fire) starts without O(fireap.consul.fireap_fire#module:force).
  - With O(abort=true), marks the running release as aborted with O(reason). Targets that have not
    started do not start; targets waiting for a source give up and record a failure; targets that
    claimed a slot (their claim checks the release record, so none succeeds after the abort) finish
    their task.
  - With O(wipe=true), deletes everything fireap stores for the app (release record, lock, plan, node
    states, slots, history); nodes then treat the app as never released.
extends_documentation_fragment:
  - fireap.consul.connection
  - fireap.consul.app
  - fireap.consul.attributes
  - fireap.consul.attributes.action_group
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - Shows the release record and the lock before and after.
options:
  lift_lock:
    description:
      - Destroy the session holding the app's fire lock, if any.
    type: bool
    default: true
  abort:
    description:
      - Mark the running release as aborted. A release already aborted is left as it is.
    type: bool
    default: false
  reason:
    description:
      - Why the release is aborted; stored in the release record and reported by M(fireap.consul.fireap_info).
      - Only with O(abort=true). Defaults to V(aborted with fireap_clear).
    type: str
  wipe:
    description:
      - Delete every key under C(<kv_prefix><app>/). The fire lock is lifted first, whatever O(lift_lock) says.
    type: bool
    default: false
seealso:
  - module: fireap.consul.fireap_fire
  - module: fireap.consul.fireap_info
author:
  - fireap maintainers (@fireap)
"""

EXAMPLES = r"""
- name: Lift a stuck fire lock of web
  fireap.consul.fireap_clear:
    app: web

- name: Stop the running release of web
  fireap.consul.fireap_clear:
    app: web
    abort: true
    reason: bad build, rolling back

- name: Forget everything about web
  fireap.consul.fireap_clear:
    app: web
    wipe: true
"""

RETURN = r"""
lock_lifted:
  description: The lock that was (or in check mode would be) lifted, else null.
  returned: always
  type: dict
  contains:
    held:
      description: Always true (the lock was held when lifted).
      type: bool
    session:
      description: The destroyed session.
      type: str
    run_id:
      description: The run that held the lock.
      type: str
    holder:
      description: Who took the lock.
      type: str
    since:
      description: When (epoch seconds).
      type: float
aborted:
  description: The run that was (or would be) aborted, else null.
  returned: always
  type: dict
  contains:
    run_id:
      description: The run.
      type: str
    version:
      description: Its version.
      type: str
    reason:
      description: The reason stored.
      type: str
  sample: {run_id: 3f2b9c0e8d7a4c1b9e6f5a4d3c2b1a09, version: 1.4.3, reason: bad build, rolling back}
wiped:
  description: Whether the app's keys were (or would be) deleted.
  returned: always
  type: bool
deleted_keys:
  description: Number of keys deleted (or that would be) by O(wipe).
  returned: always
  type: int
  sample: 42
before:
  description: The release record and lock before the change (null where absent).
  returned: always
  type: dict
  contains:
    release:
      description: The release record.
      type: dict
    lock:
      description: The lock (held, session, run_id, holder, since).
      type: dict
after:
  description: The release record and lock after the change (null where absent).
  returned: always
  type: dict
  contains:
    release:
      description: The release record.
      type: dict
    lock:
      description: The lock (held, session, run_id, holder, since).
      type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.fireap.consul.plugins.module_utils._module import fireap_argument_spec, fireap_consul
from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear

ARGUMENT_SPEC = fireap_argument_spec(
    lift_lock={"type": "bool", "default": True},
    abort={"type": "bool", "default": False},
    reason={"type": "str"},
    wipe={"type": "bool", "default": False},
)


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    if params["reason"] is not None and not params["abort"]:
        module.fail_json(msg="reason is stored when aborting: it requires abort=true")
    with fireap_consul(module, f"clearing app {params['app']!r}") as (client, schema):
        result = clear(
            client,
            schema,
            params["app"],
            lift_lock=params["lift_lock"],
            abort=params["abort"],
            wipe=params["wipe"],
            reason=params["reason"],
            check_mode=module.check_mode,
        )
    if module._diff:
        result["diff"] = {"before": result["before"], "after": result["after"]}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
