"""The chaos scenarios of apps with an artifact: faults in the swarm that delivers it.

Each releases an app of its own (apps.SWARM_APPS) to the first SWARM_NODES nodes, from a file of
SWARM_ARTIFACT_BYTES random bytes in the leader's artifact directory; every node is capped at
SWARM_RATE_LIMIT, so a download lasts seconds and a fault lands in the middle of it. Besides the
suite's figures, each judges the nodes' files: every survivor holds a byte-equal copy of the
leader's build in its own artifact directory, and no node holds a file that differs from it,
but the one a scenario spoils on purpose (artifact_problems).
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from pathlib import Path

from ansible_collections.fireap.consul.plugins.module_utils._firing import event_payload, fire, retry_stragglers
from ansible_collections.fireap.consul.plugins.module_utils._kv import NODE_PULLING

from .apps import SWARM_ARTIFACT_BYTES, SWARM_NODES, artifact_file
from .harness import ChaosCluster
from .probe import Outcome, Probe
from .processes import kill_tree, worker_pids

#: What a node's artifact file is, against the leader's build.
EQUAL, MISSING, DIFFERS = "equal", "missing", "differs"


def artifact_states(files: dict[str, Path], build: bytes) -> dict[str, str]:
    """Each node's file (node -> path) against ``build``: EQUAL, MISSING or DIFFERS."""
    states = {}
    for name, path in files.items():
        try:
            states[name] = EQUAL if path.read_bytes() == build else DIFFERS
        except FileNotFoundError:
            states[name] = MISSING
    return states


def artifact_problems(states: dict[str, str], may_lack: Collection[str] = ()) -> list[str]:
    """What is wrong with the nodes' files (``artifact_states``): a file that differs from the
    build, anywhere; a missing one, but on the nodes of ``may_lack``."""
    problems = [f"{name} holds an artifact that differs from the leader's build"
                for name, state in sorted(states.items()) if state == DIFFERS]
    problems.extend(f"{name} has no artifact" for name, state in sorted(states.items())
                    if state == MISSING and name not in may_lack)
    return problems


def _build(cluster: ChaosCluster, app: str, version: str, holders: tuple[str, ...] = ()) -> bytes:
    """The leader's build of ``app`` at ``version`` (random bytes), in place on the leader and on
    ``holders`` (nodes that have the file already, as after an earlier delivery)."""
    build = os.urandom(SWARM_ARTIFACT_BYTES)
    for name in (cluster.leader, *holders):
        path = artifact_file(cluster.nodes_dir, name, app, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build)
    return build


def _files(cluster: ChaosCluster, app: str, version: str, names: list[str]) -> dict[str, Path]:
    return {name: artifact_file(cluster.nodes_dir, name, app, version) for name in names}


def _judge(cluster: ChaosCluster, probe: Probe, outcome: Outcome, app: str, version: str, targets: list[str],
           build: bytes, faulted: set[str], spoiled: str | None = None) -> Outcome:
    """The suite's figures, and the files: ``spoiled`` (a node whose file the scenario overwrote)
    is only reported; faulted nodes may lack the file."""
    judged = [name for name in targets if name != spoiled]
    states = artifact_states(_files(cluster, app, version, judged), build)
    outcome.facts["artifacts"] = states
    if spoiled is not None:
        outcome.facts["spoiled_file_at_end"] = artifact_states(_files(cluster, app, version, [spoiled]), build)[spoiled]
    views = probe.views(app)
    outcome.facts["downloaded_from_swarm"] = {
        name: views[name].state.downloaded for name in judged
        if name != cluster.leader and name in views and views[name].state is not None}
    outcome.problems.extend(artifact_problems(states, faulted))
    return probe.measure(outcome, [(app, version, targets, faulted)])


def _done(probe: Probe, app: str, name: str, version: str) -> bool:
    view = probe.views(app).get(name)
    return view is not None and view.state is not None and view.state.has(version)


def _downloading(probe: Probe, app: str, run_id: str, names: list[str], least: int = 1) -> list[str]:
    """Those of ``names`` whose worker holds its record of ``run_id`` pulling, ``least`` bytes in."""
    views = probe.views(app)
    return [name for name in names if name in views and views[name].held and views[name].state is not None
            and views[name].state.run_id == run_id and views[name].state.status == NODE_PULLING
            and (views[name].state.downloaded or 0) >= least]


def swarm_peer_crash(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """A target's worker is killed (kill -9) mid-download: the others finish; once its session
    has ended the re-fire to the stragglers wakes it and the leader (reopening the run if the
    leader had counted the crashed target as over and ended it), and should it still fail, a
    retry of the failed targets catches it up."""
    app, version = "swarm-crash", "1"
    build = _build(cluster, app, version)
    fired = probe.fire(app, version)
    targets, run_id = fired["targets"], fired["run_id"]
    outcome = Outcome("swarm_peer_crash", len(targets), 1, "kill -9 of a target's worker mid-download")
    victim = probe.wait("a target part-way through its download",
                        lambda: (_downloading(probe, app, run_id, targets[1:]) or [None])[0])
    outcome.facts["killed_at_bytes"] = probe.views(app)[victim].state.downloaded
    for pid in worker_pids(cluster.config_path(victim), app):
        kill_tree(pid)
    # The node records only: a retry's new run replaces the plan and metadata of the last, as designed.
    probe.snapshot(cluster.schema.nodes_prefix(app))
    others = [name for name in targets if name != victim]
    probe.wait("the other targets to finish", probe.finished(app, others, version))
    probe.wait("the killed worker's session to end", lambda: not probe.views(app)[victim].held)
    outcome.facts["refired_to"] = retry_stragglers(probe.client, cluster.schema, app, version)["stragglers"]
    probe.wait("the killed target to end the run", probe.finished(app, [victim], version))
    state = probe.views(app)[victim].state
    outcome.facts["after_refire"] = f"{state.status}: {state.error or ''}"[:200]
    if not state.has(version):
        retried = fire(probe.client, cluster.schema, app, fanout=cluster.fanout, holder="chaos", retry_failed=True,
                       config_path=str(cluster.config_path(cluster.leader)))
        outcome.facts["retried"] = retried["targets"]
        probe.wait("the retried target to finish", probe.finished(app, [victim], version))
    probe.settled([app])
    probe.snapshot(cluster.schema.nodes_prefix(app))
    return _judge(cluster, probe, outcome, app, version, targets, build, set())


def swarm_late_join(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """A target's agent is down when the release is fired and starts after the others are
    done: the run stays open for it (the leader waits for every target) and it fetches the
    file from the nodes that have it."""
    app, version = "swarm-late", "1"
    late = cluster.names[SWARM_NODES - 1]
    build = _build(cluster, app, version)
    outcome = Outcome("swarm_late_join", 0, 1, "a target's agent starts after the fire (it gets the event later)")
    cluster.stop_agent(late)
    try:
        fired = probe.fire(app, version)
        targets, run_id = fired["targets"], fired["run_id"]
        outcome.nodes = len(targets)
        others = [name for name in targets if name != late]
        probe.wait("the other targets to finish", probe.finished(app, others, version))
        view = probe.views(app).get(late)
        outcome.facts["late_while_down"] = ("no record" if view is None or view.state is None
                                            or view.state.run_id != run_id else view.state.status)
    finally:
        cluster.start_agent(late)
    started = time.monotonic()
    probe.wait("the late target to catch up", probe.finished(app, targets, version))
    outcome.facts["late_caught_up_s"] = round(time.monotonic() - started, 1)
    probe.settled([app])
    probe.snapshot(cluster.schema.app_prefix(app))
    return _judge(cluster, probe, outcome, app, version, targets, build, set())


def swarm_corrupt_peer(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """A target that had the file already (it serves it at once, in seed mode) has it overwritten
    with garbage while the others download: their piece checks reject what it sends, no node
    ends with a bad file, and every other target is done."""
    app, version = "swarm-corrupt", "1"
    spoiler = cluster.names[1]
    build = _build(cluster, app, version, holders=(spoiler,))
    fired = probe.fire(app, version)
    targets, run_id = fired["targets"], fired["run_id"]
    outcome = Outcome("swarm_corrupt_peer", len(targets), 1,
                      "a serving target's verified file overwritten with garbage mid-swarm")
    probe.wait(f"{spoiler} serving the file it had", lambda: _done(probe, app, spoiler, version))
    # Half-way, the spoiler has sent most pieces once: libtorrent checks a piece in seed mode
    # when it first sends it, not again, so from now on it sends garbage unchecked.
    probe.wait("a target half-way through its download",
               lambda: _downloading(probe, app, run_id, [name for name in targets[1:] if name != spoiler],
                                    SWARM_ARTIFACT_BYTES // 2))
    with open(artifact_file(cluster.nodes_dir, spoiler, app, version), "r+b") as stream:
        stream.write(os.urandom(SWARM_ARTIFACT_BYTES))  # in place: the file it serves from
    probe.snapshot(cluster.schema.app_prefix(app))
    probe.wait("every other target to finish", probe.finished(app, targets, version))
    probe.settled([app])
    probe.snapshot(cluster.schema.app_prefix(app))
    # What the receivers' workers logged of the pieces that failed their check, and of bans.
    outcome.facts["rejected"] = {name: line for name in targets[1:] if name != spoiler
                                 for line in _log_lines(cluster, name, app, "failed their hash check")}
    return _judge(cluster, probe, outcome, app, version, targets, build, {spoiler}, spoiled=spoiler)


def _log_lines(cluster: ChaosCluster, name: str, app: str, needle: str) -> list[str]:
    """The lines of ``name``'s reap.log about ``app`` that hold ``needle``, without their prefix."""
    try:
        text = cluster.reap_log(name).read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line.split(": ", 1)[-1][:300] for line in text.splitlines() if f"app={app} " in line and needle in line]


def swarm_leader_gone(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """The leader's agent and worker stop once another target holds the whole file: the
    others finish from that copy. The run ends once the leader is back (its worker says when
    every target is over), which the event fired to it again starts."""
    app, version = "swarm-leader", "1"
    holder = cluster.names[1]
    build = _build(cluster, app, version, holders=(holder,))
    fired = probe.fire(app, version)
    targets, leader = fired["targets"], cluster.leader
    outcome = Outcome("swarm_leader_gone", len(targets), 1, "the leader's agent and worker stopped mid-swarm")
    probe.client = cluster.client(holder)  # the probe reads through an agent that stays
    probe.wait(f"{holder} done with the whole file", lambda: _done(probe, app, holder, version))
    cluster.stop_agent(leader)
    for pid in worker_pids(cluster.config_path(leader), app):
        kill_tree(pid)
    probe.snapshot(cluster.schema.app_prefix(app))
    others = [name for name in targets if name != leader]
    try:
        probe.wait("the other targets to finish from the copy", probe.finished(app, others, version))
    finally:
        cluster.start_agent(leader)
    cluster.fire_event(event_payload(app, version), [leader])
    probe.settled([app])
    probe.snapshot(cluster.schema.app_prefix(app))
    return _judge(cluster, probe, outcome, app, version, targets, build, {leader})
