#!/usr/bin/python
# SPDX-License-Identifier: MIT
"""Ansible module fireap_fire: start a release run of an app across the Consul cluster."""

from __future__ import annotations

DOCUMENTATION = r"""
module: fireap_fire
short_description: Start rolling a task (a release) across a Consul cluster
version_added: 0.1.0
description:
  - Starts a run of O(app) at O(version) from the leader, the node of the Consul agent the module talks to.
  - The leader already has the version (deploy it there first). It takes the app's fire lock, resolves the
    target nodes from the Consul catalog, writes the release record, every target's place in the
    propagation plan and its own state (done) to Consul KV, and fires the user event C(FIREAP:TASK)
    carrying only the app and version.
  - The targets are the nodes that have the app. Each node's C(fireap-reap) handler advertises the apps of
    its task config in Consul KV (C(<kv_prefix>.apps/<node>)) when its agent starts or reloads. A node is a
    target when it advertises O(app), the app's C(service)/C(tag) filters there (if any) match one of the
    node's services in the catalog, and O(node_filter), O(service) and O(tag) select it.
    An app that no node advertises is refused at once, before the fire lock is taken,
    with the apps the nodes do have.
  - Every target's C(fireap-reap) watch handler then pulls the version from a node that already has it;
    finished nodes serve up to O(fanout) further nodes each, so the run takes about
    ceil(log_(fanout+1) N) task durations for N nodes.
  - When the targets advertise an artifact for the app (the task config's C(artifact.path), each node's
    own; the directories may differ, the file name rendered for the version must be the same on every
    target, else nothing is fired), the leader's file for the version is published with the run. The
    module creates the file's torrent metadata and records it with its size, info-hash and checksum
    (computed from the file when O(checksum) is not given, and refused when O(checksum) is not the
    file's). The targets fetch the file from the swarm into their own directories and check it before
    running the app's commands.
  - The fire lock stays held by the run after the module returns. A lock held by a run that has finished
    (every target done or failed) or was aborted is taken over by the next fire; a lock held by a run in
    progress makes the module fail with the run id, version, holder and time, unless O(force=true).
    M(fireap.consul.fireap_clear) lifts a stuck lock.
  - With O(retry_stragglers=true) no new run starts; the current run's event is fired again, only to its
    targets that have not started (the event was lost or their agent was down).
extends_documentation_fragment:
  - fireap.consul.connection
  - fireap.consul.app
  - fireap.consul.attributes
  - fireap.consul.attributes.action_group
attributes:
  check_mode:
    support: full
    details:
      - Computes the version, the targets and the lock decision without writing to KV or firing an event.
  diff_mode:
    support: full
    details:
      - Shows the release record before and after.
options:
  config_path:
    description:
      - The leader's task config file (the handler's, C(fireap-reap --config)). When the targets advertise an
        artifact for O(app), the file hashed and published is the one this config's C(artifact.path) renders,
        never one named by the leader's advert in Consul KV, which whoever can write KV could change; when that
        advert names another path template, nothing is fired and the error names both.
      - When omitted, the environment variable C(FIREAP_CONFIG_PATH), else C(/etc/fireap/config.yml); the action
        plugin sets it from the host's C(fireap_node_config_dir) when the task leaves it unset.
      - Read only for an app with an artifact.
    type: path
  version:
    description:
      - Version to release; 1 to 64 letters, digits and C(._+~-), starting with a letter or a digit
        (V(1.4.2), V(v7), V(2.0-rc1), V(1.0+build.5)). Every node checks the version it reads from
        Consul by the same rule, so it can never reach a command as an option or as shell code.
      - When omitted, the last run of digits of the previous run's version is incremented
        (V(1.4.2) becomes V(1.4.3), V(v7) becomes V(v8)); without a previous run the version is V(1).
      - The event carries the app and version as compact JSON, which must fit the 100 bytes Consul's docs
        advise for event payloads; the module refuses longer values.
      - With O(retry_stragglers=true), it must be the current run's version when given.
    type: str
  node_filter:
    description:
      - Regular expression (Go RE2 syntax) selecting the target nodes by name; it must match the B(whole)
        name. V(web1) selects V(web1) only, not V(web10); V(web[0-9]+) selects V(web1) and V(web10);
        V(web1|web2) selects both.
      - The event carries it anchored (C(^(?:web1\)$)), so that Consul's agents, which search event filters
        unanchored, match whole names too.
      - When omitted (and O(service) too), every node of the catalog that has the app is a target.
      - The leader is always part of the run, whether it matches or not.
    type: str
  service:
    description:
      - Only nodes the catalog lists for this service are targets (combined with O(node_filter) when both
        are given).
      - The name is matched exactly in the catalog. The event carries no service filter, since Consul would
        match it against each agent's service IDs, not names. Every node O(node_filter) selects gets the
        event, and those that are not targets find no plan entry for the run and do nothing.
    type: str
  tag:
    description:
      - Only instances of O(service) with this tag are targets. Requires O(service).
    type: str
  fanout:
    description:
      - How many nodes one finished node serves at the same time (C(k)); between V(1) and V(64).
      - Small values suit transfers bounded by the source's bandwidth; large values suit short or
        latency-bound tasks.
      - When not set, the smallest C(max_semaphores) the targets advertise for O(app) (from their task
        config), so that no node serves more pullers at once than its own config allows.
    type: int
  force:
    description:
      - Take the fire lock over even when the run holding it is still in progress. That run's nodes that
        have not finished switch to the new run.
    type: bool
    default: false
  retry_stragglers:
    description:
      - Do not start a new run; fire the current run's event again to its targets that never started, with
        node filters anchoring exactly those nodes (C(^(a|b|c\)$)), split into several events when needed.
      - Cannot be combined with O(node_filter), O(service), O(tag), O(force), O(retry_failed) or O(rollback).
      - Failed targets are not re-fired, their run is over for them; see O(retry_failed).
      - For an app with an artifact the leader is woken too, and a run whose leader recorded it
        finished (counting targets whose worker died as over) is reopened, so that the leader serves
        the file again to the stragglers.
    type: bool
    default: false
  retry_failed:
    description:
      - Start a run of the current version to the current run's B(failed) targets only (those the filters
        still select and that still have the app), once that run is over. The nodes that failed run the
        app's commands again; the others are not woken.
      - Refused while the current run has unfinished targets (see O(retry_stragglers) for those), after an
        abort, and when no target failed. Cannot be combined with O(version) or O(rollback).
    type: bool
    default: false
  rollback:
    description:
      - Start a run of the last version that a run delivered to every target (outcome V(succeeded) in the
        history RV(history)), other than the current version, to the targets the filters select.
      - Refused when the history holds no such version. Cannot be combined with O(version) or O(retry_failed).
    type: bool
    default: false
  pause_after_stage:
    description:
      - The canary gate. The targets of plan stages 1 to N run; those of later stages do not start (they
        claim no slot and run nothing) until the gate is opened with O(resume=true). The run then shows
        as V(paused) in M(fireap.consul.fireap_info) once stages 1 to N are over.
      - With fan-out k, stage 1 is k nodes, stages 1 and 2 are k(k+2) nodes (see the plan's C(stage)).
      - O(fireap.consul.fireap_clear#module:abort=true) is the other way out.
    type: int
  resume:
    description:
      - Do not start a new run; open the canary gate of the current run (see O(pause_after_stage)) and fire
        its event, so that the targets of the later stages start.
      - Refused when the current run has no canary gate, was resumed already or was aborted. Cannot be
        combined with the options that start a run.
    type: bool
    default: false
  checksum:
    description:
      - The build's checksum, V(sha256:) and 64 lowercase hex digits, recorded with the run. Every target
        verifies its copy against it before its C(after_commands) (the task config's C(verify_file) or
        C(verify_commands)); a mismatch fails the target, which then serves no other node.
      - A target fails before running anything when the release carries a checksum and its app configures no
        verification, and when its app configures verification and the release carries no checksum.
      - O(retry_failed) and O(rollback) reuse the checksum of the run they repeat unless one is given.
      - Mutually exclusive with O(checksum_file).
    type: str
  checksum_file:
    description:
      - A file on the leader (the build) whose SHA-256 the module computes and records as O(checksum).
    type: path
  wait:
    description:
      - Wait until every target is done or failed (or the run is aborted) before returning.
      - The module then fails when the run did not succeed (a target failed, the run was aborted, or
        O(wait_timeout) passed), and returns the run's progress in RV(info) either way.
    type: bool
    default: false
  wait_timeout:
    description:
      - Seconds to wait with O(wait=true).
    type: float
    default: 3600
seealso:
  - module: fireap.consul.fireap_info
  - module: fireap.consul.fireap_clear
author:
  - fireap maintainers (@fireap)
"""

EXAMPLES = r"""
- name: Release web 1.4.3 to every node of the catalog
  fireap.consul.fireap_fire:
    app: web
    version: 1.4.3
  register: fired

- name: Release the next version of web (previous version + 1) to web01 .. web99 only
  fireap.consul.fireap_fire:
    host: consul-leader.example.com
    app: web
    node_filter: 'web[0-9]{2}'
    fanout: 3

- name: Release web 1.4.4 to the node web1 only (not web10)
  fireap.consul.fireap_fire:
    app: web
    version: 1.4.4
    node_filter: web1

- name: Release to the nginx instances tagged blue and wait for the run to finish
  fireap.consul.fireap_fire:
    app: web
    version: 1.4.3
    service: nginx
    tag: blue
    wait: true
    wait_timeout: 1800

- name: Run the current version again on the nodes that failed in the last run
  fireap.consul.fireap_fire:
    app: web
    retry_failed: true
    wait: true

- name: Go back to the last version every target got
  fireap.consul.fireap_fire:
    app: web
    rollback: true

- name: Release web 2.0.0 to the first stage only (the canaries)
  fireap.consul.fireap_fire:
    app: web
    version: 2.0.0
    pause_after_stage: 1

- name: Let the other stages follow once the canaries look good
  fireap.consul.fireap_fire:
    app: web
    resume: true

- name: Fire the current run's event again to the nodes that never started
  fireap.consul.fireap_fire:
    app: web
    retry_stragglers: true
"""

RETURN = r"""
run_id:
  description: Id of the run (a new one, or the current one with O(retry_stragglers=true)).
  returned: success
  type: str
  sample: 3f2b9c0e8d7a4c1b9e6f5a4d3c2b1a09
version:
  description: Version of the run.
  returned: success
  type: str
  sample: 1.4.3
previous_version:
  description: Version of the run this one replaces; null when the app had none.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: str
  sample: 1.4.2
targets:
  description: Names of the target nodes in schedule order, the leader first.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: list
  elements: str
  sample: [node-0, node-1, node-2]
target_count:
  description: Number of targets, the leader included.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: int
  sample: 3
leader:
  description: The node of the agent the module talked to; the root of the propagation tree.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: str
  sample: node-0
fanout:
  description: The fan-out of the run (O(fanout), else the smallest C(max_semaphores) the targets advertise).
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: int
  sample: 5
unreachable_targets:
  description:
    - Targets whose agent is down (C(serfHealth) critical). They stay targets and pull when their agent
      is back; until then the run waits for them.
    - Not named C(unreachable), which Ansible reads as the host's own state.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: list
  elements: str
  sample: [node-5]
without_app:
  description: Nodes the filters select that are not targets because they do not advertise O(app).
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: list
  elements: str
  sample: [db-1, db-2]
not_accepting:
  description:
    - Nodes that advertise O(app) but are not targets because the app's C(service)/C(tag) filters in
      their task config match none of their services in the catalog.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: list
  elements: str
  sample: [web-7]
advert_errors:
  description: Adverts that could not be read (their nodes count as not having the app); also warnings.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: list
  elements: str
  sample: []
filters:
  description: The release's filters (node, service, tag), as given; the event carries the node filter only.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: dict
  contains:
    node:
      description: The node name regex (matching whole names), or null.
      type: str
    service:
      description: The service name, or null.
      type: str
    tag:
      description: The service tag, or null.
      type: str
  sample: {node: '^web', service: null, tag: null}
resumed_at:
  description: When the canary gate was opened (epoch seconds).
  returned: success and O(resume)
  type: float
pause_after_stage:
  description: The stage after which the run's canary gate holds the later stages.
  returned: success and O(resume)
  type: int
kind:
  description: How the run was started, V(release), V(retry) (O(retry_failed)) or V(rollback) (O(rollback)).
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: str
  sample: release
retry_of:
  description: The run whose failed targets this run retries; null unless O(retry_failed).
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: str
  sample: null
history:
  description:
    - The app's last runs (at most 50, kept in C(<kv_prefix><app>/history)), newest first, this run included;
      the run this one replaced is closed with its outcome. See M(fireap.consul.fireap_info) for the fields.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: list
  elements: dict
event_id:
  description: Id of the fired C(FIREAP:TASK) event; null in check mode.
  returned: success and not O(retry_stragglers)
  type: str
  sample: 0f6c4a51-8a3c-2e1b-66d2-0c9b2f1d7e4a
release:
  description: The release record written to C(<kv_prefix><app>/release).
  returned: success and not O(retry_stragglers)
  type: dict
  contains:
    app:
      description: The app.
      type: str
    version:
      description: The version.
      type: str
    run_id:
      description: The run id.
      type: str
    fanout:
      description: The fan-out.
      type: int
    leader:
      description: The leader node.
      type: str
    target_count:
      description: Number of targets, the leader included.
      type: int
    fired_at:
      description: When the run was started (epoch seconds).
      type: float
    filters:
      description: The release's filters (node, service, tag).
      type: dict
    status:
      description: V(running) (a new record is never aborted).
      type: str
    aborted_reason:
      description: Always null for a new record.
      type: str
previous_release:
  description: The release record this run replaced, null when there was none.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: dict
took_over:
  description: The lock record (run_id, holder, since) of the run whose fire lock was taken over, else null.
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: dict
  sample: {run_id: 8e1f0c2d3b4a59687f6e5d4c3b2a1908, holder: ctl01 (pid 4242), since: 1700000000.5}
stale_plans:
  description: Plan keys of nodes that are no longer targets (deleted, or to be deleted in check mode).
  returned: success, when a run is started (not O(retry_stragglers) or O(resume))
  type: list
  elements: str
  sample: [fireap/web/plan/node-9]
stragglers:
  description: Targets of the current run that never started, to which the event was fired again.
  returned: success with O(retry_stragglers=true)
  type: list
  elements: str
  sample: [node-4, node-7]
events:
  description: The events fired to the stragglers (event_id null in check mode).
  returned: success with O(retry_stragglers=true)
  type: list
  elements: dict
  contains:
    event_id:
      description: Id of the event.
      type: str
    node_filter:
      description: The anchored node filter of the event.
      type: str
  sample: [{event_id: 5d1c0b2a-3e4f-5a6b-7c8d-9e0f1a2b3c4d, node_filter: '^(node-4|node-7)$'}]
info:
  description:
    - Progress of the run when O(wait=true), as returned by M(fireap.consul.fireap_info)
      (also on failure).
  returned: when O(wait=true) and not in check mode
  type: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.fireap.consul.plugins.module_utils._firing import fire, resume, retry_stragglers
from ansible_collections.fireap.consul.plugins.module_utils._integrity import file_checksum
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.module_utils._module import fireap_argument_spec, fireap_consul
from ansible_collections.fireap.consul.plugins.module_utils._progress import ReleaseWaitTimeout, outcome_problem, wait
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import CONFIG_PATH_ENV, DEFAULT_PATH

#: Longest single blocking read while waiting; any change under the app's keys (a finish, an abort) ends it sooner.
WAIT_POLL = 5.0

ARGUMENT_SPEC = fireap_argument_spec(
    version={"type": "str"},
    node_filter={"type": "str"},
    service={"type": "str"},
    tag={"type": "str"},
    fanout={"type": "int"},
    force={"type": "bool", "default": False},
    retry_stragglers={"type": "bool", "default": False},
    retry_failed={"type": "bool", "default": False},
    rollback={"type": "bool", "default": False},
    pause_after_stage={"type": "int"},
    resume={"type": "bool", "default": False},
    checksum={"type": "str"},
    checksum_file={"type": "path"},
    config_path={"type": "path"},
    wait={"type": "bool", "default": False},
    wait_timeout={"type": "float", "default": 3600.0},
)

#: The options that start a run, which re-firing to stragglers and resuming do not.
_RUN_OPTIONS = ("node_filter", "service", "tag", "force", "retry_failed", "rollback", "pause_after_stage", "checksum",
                "checksum_file")


def run(module: AnsibleModule, client, schema: Schema) -> dict:
    params = module.params
    if params["retry_stragglers"]:
        result = retry_stragglers(client, schema, params["app"], params["version"], check_mode=module.check_mode)
        return dict(result, changed=bool(result["events"]))
    if params["resume"]:
        return dict(resume(client, schema, params["app"], params["version"], check_mode=module.check_mode), changed=True)
    checksum = params["checksum"]
    if params["checksum_file"]:
        checksum = file_checksum(params["checksum_file"])
    result = fire(
        client,
        schema,
        params["app"],
        version=params["version"],
        node_filter=params["node_filter"],
        service=params["service"],
        tag=params["tag"],
        fanout=params["fanout"],
        force=params["force"],
        check_mode=module.check_mode,
        retry_failed=params["retry_failed"],
        rollback=params["rollback"],
        pause_after_stage=params["pause_after_stage"],
        checksum=checksum,
        config_path=params["config_path"] or os.environ.get(CONFIG_PATH_ENV) or DEFAULT_PATH,
    )
    for message in result["advert_errors"]:
        module.warn(message)
    result["changed"] = True
    if module._diff:
        result["diff"] = {"before": result["previous_release"] or {}, "after": result["release"]}
    if params["wait"] and not module.check_mode:
        try:
            result["info"] = wait(client, schema, params["app"], result["run_id"], params["wait_timeout"], WAIT_POLL)
        except ReleaseWaitTimeout as err:
            module.fail_json(msg=str(err), **dict(result, info=err.info))
        problem = outcome_problem(result["info"])
        if problem:
            module.fail_json(msg=problem, **result)
    return result


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True, required_by={"tag": "service"},
                           mutually_exclusive=[("checksum", "checksum_file"), ("retry_stragglers", "resume")])
    params = module.params
    if params["wait_timeout"] < 0:
        module.fail_json(msg=f"wait_timeout must be a number of seconds >= 0, got {params['wait_timeout']:g}")
    for mode, what in (("retry_stragglers", "re-fires the current run"), ("resume", "opens the current run's gate")):
        given = [name for name in _RUN_OPTIONS if params[name]]
        if params[mode] and given:
            module.fail_json(msg=f"{mode}=true {what}; it cannot be combined with {', '.join(given)}")
    with fireap_consul(module, f"releasing app {params['app']!r}") as (client, schema):
        result = run(module, client, schema)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
