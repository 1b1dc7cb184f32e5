#!/usr/bin/python
# SPDX-License-Identifier: MIT
"""Documentation of fireap_wait; the work is done by the action plugin of the same name."""

from __future__ import annotations

DOCUMENTATION = r"""
module: fireap_wait
short_description: Wait for a fireap release run to finish, showing its progress
version_added: 0.1.0
description:
  - Polls the progress of the run O(run_id) of O(app) until every target is done or failed, the run is
    aborted, or O(timeout) seconds have passed.
  - This is an action plugin. Each poll runs M(fireap.consul.fireap_info) on the target host (the
    release's leader), so the controller itself never talks to Consul.
  - "After every poll it prints one line such as
    C(myapp 1.4.2: 37/100 done, 2 failed, 3 pulling, 0 waiting, 58 pending [21s]) while the task runs."
  - Targets that never started (no record for the run, typically because Consul's best-effort gossip
    lost the event) get the event again through M(fireap.consul.fireap_fire) with
    O(fireap.consul.fireap_fire#module:retry_stragglers=true), first after O(straggler_retry_after)
    seconds and then every O(straggler_retry_after) seconds while any remain.
  - When more than O(max_fail_percentage) percent of the targets have failed, the run is aborted
    through M(fireap.consul.fireap_clear) (which also lifts the fire lock); targets that have not
    started do not start, targets still waiting for a source give up. Early stages involve few
    nodes (1, then k, then k(k+1), ...), so a broken release stops after a few failures.
  - The task fails when a target failed, the run was aborted, or the timeout passed; its result then
    still holds the run's progress, so a later task can report on it.
extends_documentation_fragment:
  - fireap.consul.connection
  - fireap.consul.app
  - fireap.consul.attributes
  - fireap.consul.attributes.action_group
attributes:
  action:
    description: Runs on the controller and executes the fireap modules on the target host.
    support: full
  async:
    description: Cannot run asynchronously.
    support: none
  check_mode:
    support: none
    details:
      - Skipped in check mode (a fire in check mode starts no run to wait for).
  diff_mode:
    support: none
    details:
      - Produces no diff.
options:
  run_id:
    description:
      - Id of the run to wait for, as returned by M(fireap.consul.fireap_fire).
      - When omitted, the app's current run (at the first poll) is waited for.
      - The task fails when the app's current run becomes another one (a new fire, or a wipe).
    type: str
  timeout:
    description:
      - Seconds to wait for the run to finish; the task fails when it has not by then. The run itself
        goes on.
    type: float
    default: 600
  poll:
    description:
      - Seconds between two polls (each of which is a run of M(fireap.consul.fireap_info)).
    type: float
    default: 2
  max_fail_percentage:
    description:
      - Abort the run as soon as more than this percentage of its targets (the leader included) have
        failed; V(0) aborts at the first failure.
      - When unset, the run is never aborted; failed targets are reported once every target has finished.
    type: float
  straggler_retry_after:
    description:
      - Seconds after which the event is fired again to targets that never started, and again every
        as many seconds while any remain.
      - V(0) disables re-firing.
    type: float
    default: 30
notes:
  - The connection options are passed as given to the modules the plugin runs, those set in C(module_defaults)
    for the action group C(group/fireap.consul.consul) included, except O(timeout), which here is how long to
    wait; the modules keep their own HTTP timeout.
  - Progress lines are printed by the controller while the task runs, whatever the callback plugin.
seealso:
  - module: fireap.consul.fireap_fire
  - module: fireap.consul.fireap_info
  - module: fireap.consul.fireap_clear
author:
  - fireap maintainers (@fireap)
"""

EXAMPLES = r"""
- name: Release web 1.4.3
  fireap.consul.fireap_fire:
    app: web
    version: 1.4.3
  register: fired

# The task fails when a node failed, the run was aborted or the timeout passed: failed_when
# keeps the play going so that the next task can show the failed nodes, and the last one fails.
- name: Wait for every node, aborting when more than 10% fail
  fireap.consul.fireap_wait:
    app: web
    run_id: "{{ fired.run_id }}"
    timeout: 1800
    max_fail_percentage: 10
  register: waited
  failed_when: false

- name: Show the nodes that failed
  ansible.builtin.debug:
    msg: "{{ item.node }}: {{ item.error }}"
  loop: "{{ waited.failed_nodes | default([]) }}"

- name: Fail unless every node has web 1.4.3
  ansible.builtin.fail:
    msg: "{{ waited.msg }}"
  when: not (waited.succeeded | default(false))
"""

RETURN = r"""
timed_out:
  description: Whether the timeout passed before the run finished.
  returned: always
  type: bool
  sample: false
aborted:
  description: Whether this task aborted the run because too many targets failed.
  returned: always
  type: bool
  sample: false
refired:
  description: The re-fires of the event to targets that never started, in order.
  returned: always
  type: list
  elements: dict
  contains:
    after:
      description: Seconds since the task started.
      type: float
    stragglers:
      description: The targets the event was fired to again.
      type: list
      elements: str
  sample: [{after: 30.2, stragglers: [node-017]}]
polls:
  description: How many times the progress was read.
  returned: always
  type: int
  sample: 12
msg:
  description: Summary of the outcome; on failure, which targets failed (with their errors) or never finished.
  returned: always
  type: str
  sample: "run 3f2b9c0e... of app 'web' (version 1.4.3): 100 of 100 targets done in 21.4s"
app:
  description: The app.
  returned: when the progress could be read
  type: str
  sample: web
run_id:
  description: Id of the run.
  returned: when the progress could be read
  type: str
version:
  description: Version of the run.
  returned: when the progress could be read
  type: str
status:
  description: V(finished), V(running) (timed out) or V(aborted).
  returned: when the progress could be read
  type: str
all_finished:
  description: Whether every target is done or failed.
  returned: when the progress could be read
  type: bool
succeeded:
  description: Whether every target is done.
  returned: when the progress could be read
  type: bool
counts:
  description: Number of targets per status (done, pulling, waiting, failed, pending).
  returned: when the progress could be read
  type: dict
  sample: {done: 98, pulling: 0, waiting: 0, failed: 2, pending: 0}
total:
  description: Number of targets, the leader included.
  returned: when the progress could be read
  type: int
failed_nodes:
  description: The failed targets (node, source, error).
  returned: when the progress could be read
  type: list
  elements: dict
nodes:
  description: One row per target, as returned by M(fireap.consul.fireap_info).
  returned: when the progress could be read
  type: list
  elements: dict
tree:
  description: The propagation tree, source node -> the nodes that pulled from it.
  returned: when the progress could be read
  type: dict
max_depth:
  description: Greatest depth reached.
  returned: when the progress could be read
  type: int
timings:
  description: Timings of the run (fired_at, first_finished, last_finished as epoch seconds and as ISO 8601 in
    UTC under C(_iso), and elapsed), as returned by M(fireap.consul.fireap_info).
  returned: when the progress could be read
  type: dict
release:
  description:
    - The release record; the remaining keys of M(fireap.consul.fireap_info) (exists, percent,
      stages_planned, ideal_stages, lock) are returned too.
  returned: when the progress could be read
  type: dict
"""
