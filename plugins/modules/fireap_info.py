#!/usr/bin/python
# SPDX-License-Identifier: MIT
"""Ansible module fireap_info: report the progress of an app's current release run, or the apps the nodes advertise."""

from __future__ import annotations

DOCUMENTATION = r"""
module: fireap_info
short_description: Report the progress of a fireap release run, or the apps the nodes have
version_added: 0.1.0
description:
  - Reads the release record, the plan, every target's state and the fire lock of O(app) from Consul KV
    and reports the current run's progress, failures, propagation tree and timings.
  - With O(view=apps), reports instead the apps the nodes advertise (their handlers write the apps of
    their task config to C(<kv_prefix>.apps/<node>)), app by app, with the nodes that have each one and the
    settings they advertise; see RV(apps).
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
options:
  app:
    description:
      - Name of the app, as configured on the nodes (a key of C(apps) in their task config).
      - Letters, digits, V(_), V(.) and V(-) only.
      - Required with O(view=release). With O(view=apps), only this app is reported; every app when unset.
    type: str
    required: false
  view:
    description:
      - V(release) reports the current run of O(app) (every return value but RV(apps) and RV(nodes_without_apps)).
      - V(apps) reports the apps the nodes advertise (RV(apps) and RV(nodes_without_apps) only), as the leader
        targets and sizes releases by them. Commands, timeouts and the failure policy are not advertised; on a
        node, C(fireap-reap --list) shows them.
    type: str
    choices: [release, apps]
    default: release
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

- name: List the apps the nodes have
  fireap.consul.fireap_info:
    view: apps
  register: fireap_apps

- name: Show which nodes have each app, and the fan-out of a release to all of them
  ansible.builtin.debug:
    msg: "{{ item.key }}: {{ item.value.nodes | length }} node(s), fan-out {{ item.value.fanout }}"
  loop: "{{ fireap_apps.apps | dict2items }}"
"""

RETURN = r"""
app:
  description: The app.
  returned: when O(view=release)
  type: str
  sample: web
apps:
  description:
    - The apps the nodes advertise, by name, each with the nodes that have it and the settings they advertise.
    - Only the nodes the catalog lists count; nodes whose advert outlived their membership are under
      RV(apps.absent_nodes). An advert that cannot be read is left out with a warning.
  returned: when O(view=apps)
  type: dict
  sample: {web: {nodes: [node-1, node-2], fanout: 3, absent_nodes: [],
                 settings: [{max_semaphores: 3, service_filter: ^web$, tag_filter: null, nodes: [node-1, node-2]}]}}
  contains:
    nodes:
      description: The nodes that advertise the app, sorted.
      type: list
      elements: str
    fanout:
      description:
        - The smallest C(max_semaphores) these nodes advertise, the fan-out M(fireap.consul.fireap_fire) gives a
          release to all of them; null when no node of the catalog has the app.
      type: int
    settings:
      description: Each distinct advert of the app, with the nodes that advertise it, the most common first.
      type: list
      elements: dict
      contains:
        max_semaphores:
          description: Pullers one source serves at once.
          type: int
        service_filter:
          description: Regular expression on the names of a node's services that a node must match to take the app.
          type: str
        tag_filter:
          description: Regular expression on the tags of that service.
          type: str
        nodes:
          description: The nodes that advertise these settings.
          type: list
          elements: str
    absent_nodes:
      description: Nodes that advertise the app but that the catalog no longer lists; a release leaves them out.
      type: list
      elements: str
nodes_without_apps:
  description: The nodes of the catalog that advertise no app (no fireap handler, or an advert that cannot be read).
  returned: when O(view=apps)
  type: list
  elements: str
  sample: [consul-server-1]
exists:
  description: Whether a release record exists for the app.
  returned: when O(view=release)
  type: bool
release:
  description: The release record (app, version, run_id, fanout, leader, target_count, fired_at, fired_at_iso,
    filters, status, aborted_reason); null when there is none.
  returned: when O(view=release)
  type: dict
run_id:
  description: Id of the current run, null without a release.
  returned: when O(view=release)
  type: str
version:
  description: Version of the current run, null without a release.
  returned: when O(view=release)
  type: str
status:
  description:
    - V(running) while a target has not finished, V(finished) when every target is done or failed,
      V(aborted) when the run was aborted, V(none) without a release.
    - V(paused) when the run's canary gate (O(fireap.consul.fireap_fire#module:pause_after_stage)) holds the later
      stages and every canary (RV(canaries)) has finished; O(fireap.consul.fireap_fire#module:resume=true) lets
      the run go on.
  returned: when O(view=release)
  type: str
  sample: running
all_finished:
  description:
    - Whether every target is done or failed.
    - Formerly C(finished), a key that Ansible overwrites in the result of an async task.
  returned: when O(view=release)
  type: bool
succeeded:
  description: Whether every target is done.
  returned: when O(view=release)
  type: bool
counts:
  description: Number of targets per status.
  returned: when O(view=release)
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
  returned: when O(view=release)
  type: int
  sample: 10
percent:
  description: Share of targets that finished (done or failed), in percent, one decimal.
  returned: when O(view=release)
  type: float
  sample: 70.0
failed_nodes:
  description: The failed targets.
  returned: when O(view=release)
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
  returned: when O(view=release)
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
    downloaded:
      description: For an app with an artifact, the bytes of it the node had when it last wrote its record (null without one).
      type: int
    download_percent:
      description: RV(nodes[].downloaded) as a share of the artifact, in percent, one decimal.
      type: float
    rate:
      description: The node's download rate in bytes per second when it last wrote its record, while it downloads.
      type: int
    download_seconds:
      description: How long the node's download of the artifact took, RV(nodes[].fetched) - RV(nodes[].started), in seconds.
      type: float
    fetched:
      description: When the node's download of the artifact ended (epoch seconds); its commands ran after.
      type: float
    fetched_iso:
      description: RV(nodes[].fetched) as ISO 8601 in UTC.
      type: str
    error:
      description: Why it failed.
      type: str
tree:
  description: The propagation tree of this run, source node -> the nodes that pulled from it.
  returned: when O(view=release)
  type: dict
  sample: {node-0: [node-1, node-2], node-1: [node-3]}
max_depth:
  description: Greatest depth reached in this run.
  returned: when O(view=release)
  type: int
  sample: 2
stages_planned:
  description: Number of stages of the plan.
  returned: when O(view=release)
  type: int
  sample: 2
ideal_stages:
  description: ceil(log_(fanout+1) total), the stages an ideal run needs.
  returned: when O(view=release)
  type: int
  sample: 2
timings:
  description: Timings of the run (epoch seconds, and ISO 8601 in UTC under C(_iso); elapsed in seconds).
  returned: when O(view=release)
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
  returned: when O(view=release)
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
canaries:
  description: The targets of stages 1 to O(fireap.consul.fireap_fire#module:pause_after_stage) of a run with a
    canary gate; empty otherwise.
  returned: when O(view=release)
  type: list
  elements: str
history:
  description:
    - The app's last runs (at most 50, kept in C(<kv_prefix><app>/history)), newest first. The current run's
      line shows its outcome and counts as they are now; each earlier line was closed by the fire that
      replaced its run.
  returned: when O(view=release)
  type: list
  elements: dict
  contains:
    run_id:
      description: The run id.
      type: str
    version:
      description: The version the run released.
      type: str
    kind:
      description: V(release), V(retry) (of a run's failed targets) or V(rollback).
      type: str
    retry_of:
      description: For a retry, the run whose failed targets it ran; else null.
      type: str
    fired_by:
      description: Who fired it (the fire lock's holder).
      type: str
    fired_at:
      description: When it was fired (epoch seconds); C(fired_at_iso) gives it as ISO 8601 in UTC.
      type: float
    target_count:
      description: Its targets, the leader included.
      type: int
    outcome:
      description:
        - V(running), V(succeeded), V(failed) (every target finished, some failed), V(aborted), or
          V(unfinished) (a new run replaced it while targets were still pending).
      type: str
    done:
      description: Targets done.
      type: int
    failed:
      description: Targets failed.
      type: int
    finished_at:
      description: When its last target finished (epoch seconds), null while unfinished; C(finished_at_iso) as ISO 8601.
      type: float
    abort_reason:
      description: Why it was aborted, or null.
      type: str
    checksum:
      description: The build's checksum recorded with the run, or null; a retry or rollback reuses it.
      type: str
  sample:
    - {run_id: 3f2a9c0e6b7d4e21a8f05c6d7e8f9a0b, version: 1.4.3, kind: release, retry_of: null, fired_by: ops@ctl (pid 4211),
       fired_at: 1764951001.25, fired_at_iso: "2026-12-05T16:10:01.250Z", target_count: 20, outcome: succeeded, done: 20,
       failed: 0, finished_at: 1764951009.5, finished_at_iso: "2026-12-05T16:10:09.500Z", abort_reason: null,
       checksum: null}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.fireap.consul.plugins.module_utils._module import fireap_argument_spec, fireap_consul
from ansible_collections.fireap.consul.plugins.module_utils._progress import info
from ansible_collections.fireap.consul.plugins.module_utils._task_list import apps_view

ARGUMENT_SPEC = fireap_argument_spec(view={"type": "str", "choices": ["release", "apps"], "default": "release"})
# The apps view lists every app unless told one.
ARGUMENT_SPEC.update(app=dict(ARGUMENT_SPEC["app"], required=False))


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    if params["view"] == "release" and params["app"] is None:
        module.fail_json(msg="missing required arguments: app (view=release reports the run of one app)")
    if params["view"] == "apps":
        with fireap_consul(module, "reading the nodes' adverts of their apps") as (client, schema):
            result = apps_view(client, schema, params["app"])
    else:
        with fireap_consul(module, f"reading the release of app {params['app']!r}") as (client, schema):
            result = info(client, schema, params["app"])
    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
