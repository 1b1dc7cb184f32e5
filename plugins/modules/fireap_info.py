#!/usr/bin/python
# SPDX-License-Identifier: MIT
"""Ansible module fireap_info: report the progress of an app's current release run."""

from __future__ import annotations

DOCUMENTATION = r"""
module: fireap_info
short_description: Report the progress of a fireap release run
version_added: 0.1.0
description:
  - Reads the release record, the plan, every target's state and the fire lock of O(app) from Consul KV
    and reports the current run's progress, failures, propagation tree and timings.
  - Reads every target's record, so its result grows linearly with the number of targets; meant
    for the controller, for example polled by a playbook until RV(all_finished) is true. It never changes anything.
  - A node that is already done at the run's version from an earlier run counts as done.
  - Every time is returned twice, as epoch seconds (for arithmetic) and as ISO 8601 in UTC under the same
    name with C(_iso) appended, for example RV(timings.fired_at) and RV(timings.fired_at_iso).
extends_documentation_fragment:
  - fireap.consul.connection
  - fireap.consul.app
  - fireap.consul.attributes
  - fireap.consul.attributes.action_group
notes:
  - Runs under C(async) like any module. Its result has none of the keys Ansible sets on an async task's
    result (C(finished), C(started), C(ansible_job_id), C(results_file)), so RV(all_finished) is the run's own.
attributes:
  check_mode:
    support: full
    details:
      - Read-only; runs normally in check mode.
  diff_mode:
    support: none
    details:
      - Changes nothing, so there is no diff.
seealso:
  - module: fireap.consul.fireap_fire
  - module: fireap.consul.fireap_clear
author:
  - fireap maintainers (@fireap)
"""

EXAMPLES = r"""
- name: Poll the current run of web every 5 seconds until every node has finished or the run was aborted
  fireap.consul.fireap_info:
    app: web
  register: progress
  until: progress.all_finished or progress.status == 'aborted'
  retries: 720
  delay: 5

- name: Show when the run started and how long it took
  ansible.builtin.debug:
    msg: "web {{ progress.version }}: fired at {{ progress.timings.fired_at_iso }}, {{ progress.timings.elapsed }}s"

- name: Show the failed nodes
  ansible.builtin.debug:
    msg: "{{ item.node }} failed pulling from {{ item.source }}: {{ item.error }}"
  loop: "{{ progress.failed_nodes }}"
"""

RETURN = r"""
app:
  description: The app.
  returned: always
  type: str
  sample: web
exists:
  description: Whether a release record exists for the app.
  returned: always
  type: bool
release:
  description: The release record (app, version, run_id, fanout, leader, target_count, fired_at, fired_at_iso,
    filters, status, aborted_reason); null when there is none.
  returned: always
  type: dict
run_id:
  description: Id of the current run, null without a release.
  returned: always
  type: str
version:
  description: Version of the current run, null without a release.
  returned: always
  type: str
status:
  description:
    - V(running) while a target has not finished, V(finished) when every target is done or failed,
      V(aborted) when the run was aborted, V(none) without a release.
  returned: always
  type: str
  sample: running
all_finished:
  description:
    - Whether every target is done or failed.
    - Formerly C(finished), a key that Ansible overwrites in the result of an async task.
  returned: always
  type: bool
succeeded:
  description: Whether every target is done.
  returned: always
  type: bool
counts:
  description: Number of targets per status.
  returned: always
  type: dict
  contains:
    done:
      description: Targets that have the version (the leader included).
      type: int
    pulling:
      description: Targets running the task against a source.
      type: int
    waiting:
      description: Targets whose worker started and waits for a source.
      type: int
    failed:
      description: Targets that failed in this run.
      type: int
    pending:
      description: Targets without a record for this run (event not received yet, or lost).
      type: int
  sample: {done: 7, pulling: 2, waiting: 1, failed: 0, pending: 0}
total:
  description: Number of targets, the leader included.
  returned: always
  type: int
  sample: 10
percent:
  description: Share of targets that finished (done or failed), in percent, one decimal.
  returned: always
  type: float
  sample: 70.0
failed_nodes:
  description: The failed targets.
  returned: always
  type: list
  elements: dict
  contains:
    node:
      description: The node.
      type: str
    source:
      description: The node it pulled from, null if it failed before claiming one.
      type: str
    error:
      description: What went wrong.
      type: str
nodes:
  description: One row per target in schedule order, the leader first.
  returned: always
  type: list
  elements: dict
  contains:
    node:
      description: The node.
      type: str
    status:
      description: V(done), V(pulling), V(waiting), V(failed) or V(pending).
      type: str
    this_run:
      description: Whether the node's record belongs to this run (false for a node done in an earlier run).
      type: bool
    planned_source:
      description: The source the plan assigned (null for the leader).
      type: str
    stage:
      description: The planned stage (0 for the leader).
      type: int
    slot:
      description: The planned slot on the planned source (null for the leader).
      type: int
    source:
      description: The source the node actually pulled from.
      type: str
    depth:
      description: Depth in the propagation tree (0 for the leader).
      type: int
    started:
      description: When the node's worker started (epoch seconds).
      type: float
    started_iso:
      description: RV(nodes[].started) as ISO 8601 in UTC, for example V(2026-11-26T16:30:01.250Z).
      type: str
    finished:
      description: When it finished (epoch seconds).
      type: float
    finished_iso:
      description: RV(nodes[].finished) as ISO 8601 in UTC.
      type: str
    duration:
      description: finished - started, in seconds.
      type: float
    error:
      description: Why it failed.
      type: str
tree:
  description: The propagation tree of this run, source node -> the nodes that pulled from it.
  returned: always
  type: dict
  sample: {node-0: [node-1, node-2], node-1: [node-3]}
max_depth:
  description: Greatest depth reached in this run.
  returned: always
  type: int
  sample: 2
stages_planned:
  description: Number of stages of the plan.
  returned: always
  type: int
  sample: 2
ideal_stages:
  description: ceil(log_(fanout+1) total), the stages an ideal run needs.
  returned: always
  type: int
  sample: 2
timings:
  description: Timings of the run (epoch seconds, and ISO 8601 in UTC under C(_iso); elapsed in seconds).
  returned: always
  type: dict
  contains:
    fired_at:
      description: When the run was started.
      type: float
    fired_at_iso:
      description: RV(timings.fired_at) as ISO 8601 in UTC, for example V(2026-11-26T16:30:01.250Z).
      type: str
    first_finished:
      description: When the first target other than the leader finished.
      type: float
    first_finished_iso:
      description: RV(timings.first_finished) as ISO 8601 in UTC.
      type: str
    last_finished:
      description: When the last target other than the leader finished so far.
      type: float
    last_finished_iso:
      description: RV(timings.last_finished) as ISO 8601 in UTC.
      type: str
    elapsed:
      description: From fired_at to the last finish once finished, else to now.
      type: float
lock:
  description: The app's fire lock; null when there is no lock key.
  returned: always
  type: dict
  contains:
    held:
      description: Whether a session holds the lock.
      type: bool
    session:
      description: The holding session.
      type: str
    run_id:
      description: The run that took the lock.
      type: str
    holder:
      description: Who took it.
      type: str
    since:
      description: When (epoch seconds).
      type: float
    since_iso:
      description: RV(lock.since) as ISO 8601 in UTC.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.fireap.consul.plugins.module_utils._module import fireap_argument_spec, fireap_consul
from ansible_collections.fireap.consul.plugins.module_utils._progress import info

ARGUMENT_SPEC = fireap_argument_spec()


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    with fireap_consul(module, f"reading the release of app {params['app']!r}") as (client, schema):
        result = info(client, schema, params["app"])
    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
