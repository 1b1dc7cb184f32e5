"""Propagation decisions without I/O: the release plan and one node's pull state machine.

``plan_release`` computes the (k+1)-ary doubling schedule the leader writes to KV.
``PullMachine`` decides, for one node and one run, what to do next from what the Consul
adapter (``_worker``) observed; the adapter performs each action and reports back. Keeping
every decision here makes each rule testable without Consul and keeps the adapter thin.

The protocol between the two: ``start(now)`` returns the first action; the adapter performs
it and answers with the call the action names, which returns the next action, until a
``PullResult`` or a ``Restart`` ends the machine:

    WriteState -> on_written      WaitForNode -> on_node        CheckStart -> on_start_check
    ClaimSlot -> on_claim         WaitForSlots -> on_slots_changed    ListNodes -> on_nodes
    Sleep -> on_slept             RunTask -> on_task            ReleaseSlot -> on_released

``on_claim`` takes a ``ClaimOutcome`` (slot taken, slots busy, source unusable, or our own
record held by another worker). After a wait that came back unchanged (``WaitForNode``,
``WaitForSlots``, ``Sleep``) and after a claim refused because the release record changed,
the adapter first reports the release as re-read to ``on_release``, which either lets the
pending action go on (None) or ends the run. The machine is always in one ``Phase``;
``TRANSITIONS`` lists, for each phase, the calls it accepts and the phases each may lead to.
A call the table does not allow in the current phase raises ``PullProtocolError``, and so
does a move to a phase the table does not list: the table is the protocol, checked on every
call.

Pull rules, in the order the machine applies them:

* nothing runs twice: a node done at the release's version, the leader, a node that is not
  a target (no plan entry for this run), a node failed in this run and an aborted release
  all end the worker before anything runs;
* a run whose release record or plan entry for this node is malformed (``RunProblem``), or
  whose plan names the node as its own source, is recorded ``failed`` with the reason, so a
  target never looks pending forever;
* a node writes nothing and holds no session while it waits: it first waits for
  ``plan.after`` (the puller scheduled on the same source slot one stage earlier) to finish,
  then for its preferred source to be done at the version (a stage-1 node whose source is
  the leader, done when the release was recorded, claims at once);
* only a node done at the version is a source; a failed one never is; one that crashed in
  this run (``NodeState.crashed``: not finished and its record no longer held by a live
  session) is treated as failed;
* a failed or crashed source, one that has not started within ``start_grace`` of the moment
  it could have (its own planned source and slot predecessor finished: read only once the
  grace ran out; not a target, agent down, event lost), or one whose ``fanout`` slots all
  stay busy beyond ``busy_grace`` sends the node to the fallback: any done node with a free
  slot, lowest depth first, then fewest pullers, ties broken by a hash of the two names so
  fallbacks spread out;
* at most ``fanout`` pullers per source: a slot key must be acquired before pulling; the
  slot and the ``pulling`` record are written together, and so are the slot's release and
  the final record;
* a task that failed while its source's node is down (Consul's serfHealth check critical, or
  the node gone from the catalog after a leave; the adapter waits up to
  ``failure_detection`` for Consul to notice a crash) is the source's failure, not the
  puller's: the slot is released with the record left ``pulling``, and the puller goes to
  the fallback without that source; once more than ``fallback_tries`` sources went down
  under it, it records failed;
* the release is re-read at least every ``max_wait`` while waiting (no wait outlasts that),
  also when Consul keeps returning blocking reads with a raised index although the record
  read did not change: an abort reaches every waiting worker within ``max_wait``;
* a record waited on that does not exist is read at most once per ``absent_pause``: Consul
  returns blocking reads of a missing key early on writes to other keys, which would make
  the requests of a waiting node grow with the cluster's writes;
* a task that succeeded keeps its error text in the ``done`` record (failures the app's
  ``on_command_failure: ignore`` let it go past);
* the worker gives up at ``watch_timeout`` with a failed state saying what it waited for.
"""

from __future__ import annotations

import enum
import functools
import math
import random
import zlib
from dataclasses import dataclass, replace
from collections.abc import Callable, Mapping, Sequence
from typing import Concatenate, ParamSpec, TypeAlias, TypeVar

from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError, InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_DONE,
    NODE_FAILED,
    NODE_PULLING,
    NODE_WAITING,
    KVRecordError,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    run_of,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    SWARM_PEERS_MAX,
    check_fanout,
    check_name,
    check_run_id,
    clip,
)

# --- the doubling schedule -------------------------------------------------------------


def stage_count(n_nodes: int, fanout: int) -> int:
    """Stages the schedule needs for ``n_nodes`` (leader included): ceil(log_{k+1} N)."""
    fanout = check_fanout(fanout)
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise InvalidValue(f"node count must be an integer >= 1, got {n_nodes!r}")
    stages, reached = 0, 1
    while reached < n_nodes:
        reached *= fanout + 1
        stages += 1
    return stages


def schedule_position(index: int, fanout: int) -> tuple[int, int, int]:
    """``(stage, source_index, slot)`` of the node at ``index`` >= 1 in the schedule order.

    With s = floor(log_{k+1} index) and base = (k+1)^s: source = (index - base) // k,
    slot = (index - base) % k, stage = s + 1. Integer arithmetic only (no float log).
    """
    fanout = check_fanout(fanout)
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        raise InvalidValue(f"schedule index must be an integer >= 1, got {index!r}")
    s, base = 0, 1
    while base * (fanout + 1) <= index:
        base *= fanout + 1
        s += 1
    offset = index - base
    return s + 1, offset // fanout, offset % fanout


def schedule_order(targets: Sequence[str], leader: str) -> list[str]:
    """The leader first, then the other targets sorted by name: index = schedule position.

    The leader may or may not be among ``targets`` (it is always the tree's root); any other
    duplicate is an error.
    """
    check_name(leader, "leader node")
    seen: set[str] = set()
    for name in targets:
        check_name(name, "target node")
        if name in seen and name != leader:
            raise InvalidValue(f"target node {name!r} is listed twice")
        seen.add(name)
    seen.discard(leader)
    return [leader] + sorted(seen)


def plan_release(
    targets: Sequence[str], leader: str, fanout: int, run_id: str, addresses: Mapping[str, str] | None = None
) -> dict[str, PlanEntry]:
    """The plan entry of every target but the leader, keyed by node name.

    Node i (in ``schedule_order``) pulls from node ``source_index`` over slot ``slot``. When
    that source already served a puller on the same slot in the previous stage, ``after``
    names that puller (index i - k*(k+1)^(s-1)) so the two do not race for the slot.
    ``addresses`` (node name -> catalog address) fills in each entry's ``source_address``.
    """
    addresses = addresses or {}
    fanout = check_fanout(fanout)
    order = schedule_order(targets, leader)
    plan: dict[str, PlanEntry] = {}
    for index in range(1, len(order)):
        stage, source_index, slot = schedule_position(index, fanout)
        # The source serves from the stage after its own (the leader from stage 1); if that
        # is before this stage, the same slot had a puller one stage earlier.
        first_serving = 1 if source_index == 0 else schedule_position(source_index, fanout)[0] + 1
        after = order[index - fanout * (fanout + 1) ** (stage - 2)] if first_serving < stage else None
        source = order[source_index]
        plan[order[index]] = PlanEntry(
            run_id=run_id, source=source, stage=stage, slot=slot, after=after,
            source_address=addresses.get(source) or None,
        )
    return plan


def swarm_neighbours(targets: Sequence[str], leader: str, run_id: str) -> dict[str, list[str]]:
    """The swarm neighbours of every node of a run with an artifact (the leader included).

    The nodes stand on a ring: the leader at 0, the other targets after it in an order drawn
    from ``run_id`` (a new graph each run, so no node is always the leader's neighbour). With N
    nodes and s the smallest integer >= 2 with s**4 >= N, node i's neighbours are i +- 1, s,
    s**2, s**3 (mod N): at most SWARM_PEERS_MAX = 8, each listed by both ends (the graph is
    undirected, so the nodes that connect to a node are the ones it lists), connected by the
    +-1 steps, and few hops apart (from the leader at most 4 at N = 100, 8 at N = 1000: about
    2 N**(1/4)). Up to 9 nodes all see each other; the leader is a neighbour of up to 8 nodes.
    """
    check_run_id(run_id)
    order = schedule_order(targets, leader)
    rest = order[1:]
    random.Random(run_id).shuffle(rest)
    ring = [order[0]] + rest
    count = len(ring)
    step = 2
    while step ** 4 < count:
        step += 1
    offsets = set(range(1, count)) if count <= SWARM_PEERS_MAX + 1 else {step ** power for power in range(4)}
    neighbours: dict[str, list[str]] = {}
    for index, name in enumerate(ring):
        near = {(index + sign * offset) % count for offset in offsets for sign in (1, -1)} - {index}
        neighbours[name] = [ring[other] for other in sorted(near)]
    return neighbours


def spread_key(puller: str, candidate: str) -> int:
    """A stable pseudo-random number for (puller, candidate), the same on every node."""
    return zlib.crc32(f"{puller}\0{candidate}".encode("utf-8"))


def slot_order(puller: str, fanout: int, preferred: int | None = None) -> tuple[int, ...]:
    """Slots to try on a source: the preferred one, then all others from a puller-specific start."""
    fanout = check_fanout(fanout)
    start = spread_key(puller, "") % fanout
    rotated = [(start + j) % fanout for j in range(fanout)]
    if preferred is not None and 0 <= preferred < fanout:
        rotated.remove(preferred)
        rotated.insert(0, preferred)
    return tuple(rotated)


# --- observations and actions ----------------------------------------------------------


class PullProtocolError(FireapError):
    """``PullMachine`` was called out of turn: the call is not one ``TRANSITIONS`` allows in
    the machine's phase (or an answer contradicts itself). A bug in the adapter, never a
    fault of what Consul holds."""


@dataclass(frozen=True)
class NodeView:
    """A node record as read from KV: its state (None if absent, not parseable or from an
    unrelated app) and whether the key is held by a live session (``Session`` set)."""

    state: NodeState | None
    held: bool = False


@dataclass(frozen=True)
class PullTimings:
    """Time limits of one worker, in seconds."""

    watch_timeout: float = 3600.0
    start_grace: float = 30.0
    busy_grace: float = 30.0
    max_wait: float = 10.0
    fallback_tries: int = 3
    #: How long Consul's gossip may take to mark a crashed node down (probe plus suspicion:
    #: seconds, more in big clusters): a task that failed against a source still passing waits
    #: this long for it to turn critical before the failure is the puller's.
    failure_detection: float = 15.0
    #: The least time between two reads of a record that does not exist (see the module rules).
    absent_pause: float = 1.0

    def __post_init__(self) -> None:
        for name in ("watch_timeout", "start_grace", "busy_grace", "max_wait", "failure_detection", "absent_pause"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidValue(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(self.fallback_tries, bool) or not isinstance(self.fallback_tries, int) or self.fallback_tries < 1:
            raise InvalidValue(f"fallback_tries must be an integer >= 1, got {self.fallback_tries!r}")


@dataclass(frozen=True)
class WriteState:
    """Write this node's record (``<app>/nodes/<me>``); answer with ``on_written(ok)``."""

    state: NodeState


@dataclass(frozen=True)
class WaitForNode:
    """After ``pause`` s, read ``<app>/nodes/<node>``, blocking while its index is ``index`` (0:
    do not block) for at most ``wait`` s. If a blocking read came back unchanged (it timed out)
    or ended at or past ``PullMachine.release_due``, re-read the release (``on_release``); then
    answer ``on_node``. ``claim_soon``: the node waited on is pulling, so this wait should end
    in a claim: create the session before blocking, off the path from its end to our task.
    ``pause``: the record was absent when last read (see ``PullTimings.absent_pause``)."""

    node: str
    index: int
    wait: float
    claim_soon: bool = False
    pause: float = 0.0


@dataclass(frozen=True)
class CheckStart:
    """``node`` has not started this run within the grace: read its plan entry and the
    records of the nodes it waits for (its planned source and ``after``); answer
    ``on_start_check``."""

    node: str


@dataclass(frozen=True)
class ClaimSlot:
    """Take the first free slot of ``slots`` (in that order) on ``source`` and write ``state``
    (``pulling``) in one transaction: lock ``<app>/slots/<source>/<j>`` and lock our own
    record, both with the session. Read ``<app>/slots/<source>/`` (for its index) only after
    a refusal. Resolve the source's address first; answer ``on_claim`` with the
    ``ClaimOutcome``."""

    source: str
    slots: tuple[int, ...]
    state: NodeState


@dataclass(frozen=True)
class ClaimOutcome:
    """What a ``ClaimSlot`` came to, for ``on_claim``: ``slot`` taken (our record written
    ``pulling`` with it), or no slot: ``index`` is then the ModifyIndex of the source's slots
    as read (0: not read) to block on; ``unusable`` says why the source cannot be used;
    ``refused``: our own record is held by another worker (nothing was written). At most one
    of ``slot``, ``unusable`` and ``refused`` is set; none: every slot tried was busy."""

    slot: int | None = None
    index: int = 0
    unusable: str | None = None
    refused: bool = False

    def __post_init__(self) -> None:
        if sum((self.slot is not None, self.unusable is not None, self.refused)) > 1:
            raise PullProtocolError(f"a claim outcome is one of slot, unusable or refused, got {self!r}")


@dataclass(frozen=True)
class WaitForSlots:
    """Block on ``<app>/slots/<source>/`` at ``index`` for at most ``wait`` s; if it came back
    unchanged or ended at or past ``PullMachine.release_due``, re-read the release
    (``on_release``); then answer ``on_slots_changed``."""

    source: str
    index: int
    wait: float


@dataclass(frozen=True)
class ListNodes:
    """Read every record under ``<app>/nodes/`` once (fallback only); answer ``on_nodes``."""

    reason: str


@dataclass(frozen=True)
class Sleep:
    """Nothing to block on (no candidate source yet): sleep, re-read the release
    (``on_release``), then answer ``on_slept``."""

    seconds: float


@dataclass(frozen=True)
class RunTask:
    """Run the app's task against ``source``; answer ``on_task(ok, error, now, source_down)``,
    where ``source_down`` tells whether a failed task's source node is down: its serfHealth
    check critical, or the node no longer in the catalog (it left), waiting up to
    ``PullTimings.failure_detection`` for Consul to notice a crash."""

    source: str
    slot: int


@dataclass(frozen=True)
class ReleaseSlot:
    """Release ``<app>/slots/<source>/<slot>`` and write ``state`` (done or failed; still
    ``pulling`` when the source went down) as our record, in one transaction when the session
    still holds both; answer ``on_released(recorded)``."""

    source: str
    slot: int
    state: NodeState


@dataclass(frozen=True)
class Restart:
    """The release now describes another run: start over with a new machine."""

    reason: str


@dataclass(frozen=True)
class PullResult:
    """The end of a worker: the node's state (None if it has none), why it ended, and
    whether the task ran in this worker."""

    state: NodeState | None
    reason: str
    ran_task: bool = False

    @property
    def failed(self) -> bool:
        return self.state is not None and self.state.status == NODE_FAILED


#: Everything ``PullMachine`` may ask of the adapter; ``PullResult`` and ``Restart`` end it.
Action: TypeAlias = (
    WriteState | WaitForNode | CheckStart | ClaimSlot | WaitForSlots | ListNodes | Sleep | RunTask | ReleaseSlot
    | Restart | PullResult
)


@dataclass(frozen=True)
class RunProblem:
    """Run ``run_id`` (at ``version``) cannot be pulled: its release record or this node's plan
    entry is malformed (``reason`` names the key). The node records ``failed`` for it."""

    run_id: str
    version: str
    reason: str


def read_run(
    release_key: str, release_value: bytes | None, plan_key: str | None, plan_value: bytes | None
) -> tuple[ReleaseRecord | None, PlanEntry | None, RunProblem | None]:
    """The release record and this node's plan entry from their KV values (None: no key).
    ``plan_key``: where the entry was read, under the run ``run_of`` names (None: not read).

    A malformed one becomes a ``RunProblem`` when the run it concerns can still be told: a
    plan entry under a valid release, or a release whose ``run_id`` and ``version`` are valid
    and for which this node has a plan entry. Otherwise ``KVRecordError`` is raised: nothing
    can be recorded for a run nobody can name.
    """
    try:
        release = None if release_value is None else ReleaseRecord.from_json(release_value, release_key)
    except KVRecordError as err:
        run = run_of(release_value, release_key)
        if run is None or plan_value is None:
            raise
        try:
            plan_run = PlanEntry.from_json(plan_value, plan_key).run_id
        except KVRecordError:
            plan_run = run[0]
        if plan_run != run[0]:
            raise
        return None, None, RunProblem(run[0], run[1], str(err))
    try:
        plan = None if plan_value is None else PlanEntry.from_json(plan_value, plan_key)
    except KVRecordError as err:
        if release is None:
            return None, None, None
        return release, None, RunProblem(release.run_id, release.version, str(err))
    return release, plan, None


# --- the state machine -----------------------------------------------------------------

_LOST = "the record of node {} is held or changed by another worker"


class Phase(enum.Enum):
    """Where a ``PullMachine`` is: the action it returned last, whose answer it awaits."""

    NEW = "new"  # start() not called yet
    WAIT_AFTER = "wait-after"  # WaitForNode on plan.after, the slot's holder one stage earlier
    WAIT_SOURCE = "wait-source"  # WaitForNode on the source
    CHECK_START = "check-start"  # CheckStart on the node waited on
    CLAIM = "claim"  # ClaimSlot
    WAIT_SLOTS = "wait-slots"  # WaitForSlots
    LIST = "list"  # ListNodes
    SLEEP = "sleep"  # Sleep
    WRITE = "write"  # WriteState: a record that ends the pull
    RUN = "run"  # RunTask
    RELEASE = "release"  # ReleaseSlot
    FINISHED = "finished"  # PullResult or Restart returned: no call is accepted any more


#: For each phase, the calls it accepts and the phases each call may lead to. A wait that
#: goes on, and ``on_release`` letting the pending action go on, stay in their phase; WRITE
#: records ``failed`` (timed out, aborted, or a run that cannot be pulled) and FINISHED ends.
TRANSITIONS: Mapping[Phase, Mapping[str, frozenset[Phase]]] = {
    Phase.NEW: {
        "start": frozenset({Phase.WAIT_AFTER, Phase.WAIT_SOURCE, Phase.CLAIM, Phase.WRITE, Phase.FINISHED}),
    },
    Phase.WAIT_AFTER: {
        "on_node": frozenset({Phase.WAIT_AFTER, Phase.WAIT_SOURCE, Phase.CHECK_START, Phase.CLAIM, Phase.WRITE}),
        "on_release": frozenset({Phase.WAIT_AFTER, Phase.WRITE, Phase.FINISHED}),
    },
    Phase.WAIT_SOURCE: {
        "on_node": frozenset({Phase.WAIT_SOURCE, Phase.CHECK_START, Phase.CLAIM, Phase.LIST, Phase.WRITE}),
        "on_release": frozenset({Phase.WAIT_SOURCE, Phase.WRITE, Phase.FINISHED}),
    },
    Phase.CHECK_START: {
        "on_start_check": frozenset({Phase.WAIT_AFTER, Phase.WAIT_SOURCE, Phase.LIST, Phase.WRITE}),
    },
    Phase.CLAIM: {
        "on_claim": frozenset(
            {Phase.RUN, Phase.CLAIM, Phase.WAIT_SLOTS, Phase.LIST, Phase.WRITE, Phase.FINISHED}
        ),
        "on_release": frozenset({Phase.CLAIM, Phase.WRITE, Phase.FINISHED}),
    },
    Phase.WAIT_SLOTS: {
        "on_slots_changed": frozenset({Phase.CLAIM, Phase.LIST, Phase.WRITE}),
        "on_release": frozenset({Phase.WAIT_SLOTS, Phase.WRITE, Phase.FINISHED}),
    },
    Phase.LIST: {
        "on_nodes": frozenset({Phase.CLAIM, Phase.SLEEP, Phase.WRITE}),
    },
    Phase.SLEEP: {
        "on_slept": frozenset({Phase.LIST, Phase.WRITE}),
        "on_release": frozenset({Phase.SLEEP, Phase.WRITE, Phase.FINISHED}),
    },
    Phase.WRITE: {
        "on_written": frozenset({Phase.FINISHED}),
    },
    Phase.RUN: {
        "on_task": frozenset({Phase.RELEASE}),
    },
    Phase.RELEASE: {
        "on_released": frozenset({Phase.LIST, Phase.WRITE, Phase.FINISHED}),
    },
    Phase.FINISHED: {},
}


def _finished(state: NodeState, now: float) -> float:
    """When ``state`` finished: every done or failed record says (``now`` for any other)."""
    return now if state.finished is None else state.finished


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _transition(method: Callable[Concatenate[PullMachine, _P], _R]) -> Callable[Concatenate[PullMachine, _P], _R]:
    """Hold a call of ``method`` (named as in ``TRANSITIONS``) to the table: it must be
    accepted in the machine's phase, and the phase it leaves must be one the table lists."""
    call = method.__name__

    @functools.wraps(method)
    def checked(machine: PullMachine, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        before = machine.phase
        accepted = TRANSITIONS[before]
        if call not in accepted:
            expected = ", ".join(accepted) or "no call: the pull has ended"
            raise PullProtocolError(f"{call} is not expected in phase {before.value} (expected: {expected})")
        result = method(machine, *args, **kwargs)
        if machine.phase not in accepted[call]:
            raise PullProtocolError(
                f"{call} moved the pull from phase {before.value} to {machine.phase.value}, which TRANSITIONS does "
                "not allow"
            )
        return result

    return checked


class PullMachine:
    """One node's pull for one run, as a state machine driven by the Consul adapter.

    Call ``start(now)`` for the first action, then the ``on_*`` method matching each action
    with what was observed; every call returns the next action until a ``PullResult`` (or a
    ``Restart``) ends it. ``now`` is the adapter's clock (epoch seconds); it stamps the
    records and measures graces and the timeout. ``release_index`` is the ModifyIndex of the
    release record as read: the first wait blocks from it instead of reading first, since
    the node waited on usually has not changed since (0: read first). ``problem``: the
    run's records are malformed (see ``read_run``).
    """

    # Set when they first matter (start, a wait, a claim, ...) and only read in the phases after.
    started: float  # when this worker began the run
    deadline: float  # started + watch_timeout
    source: str  # node currently waited on / claimed on
    source_depth: int  # its depth in the tree
    waiting_since: float  # start of the current wait, or when its node could have started
    checked_phase: Phase  # the wait a CheckStart interrupted
    listed_at: float  # when the fallback last listed the nodes
    state: NodeState  # last record this machine asked to write
    write_reason: str  # why the record being written ends the pull
    slot: int  # the slot claimed
    outcome: PullResult  # result of the task, reported once recorded
    release_read_at: float  # when the release was last read (start, or on_release)
    read_at: float  # when the read of the node waited on was sent (after its pause)

    def __init__(
        self,
        node: str,
        release: ReleaseRecord | None,
        plan: PlanEntry | None,
        own: NodeState | None,
        timings: PullTimings = PullTimings(),
        release_index: int = 0,
        problem: RunProblem | None = None,
    ) -> None:
        self.node = check_name(node, "node")
        self.problem = problem
        self.release_index = release_index
        self.release = release
        self.plan = plan
        self.own = own
        self.timings = timings
        self.phase = Phase.NEW
        self.excluded: set[str] = set()  # failed, crashed or unusable sources
        self.fallback = False
        self.waited_index = 0  # index of the last read of the node waited on
        self.busy_since: float | None = None  # when the slots of the source were first all busy
        self.candidates: list[tuple[str, int]] = []  # (node, depth) from the last listing
        self.tried = 0  # candidates[tried] is the one being claimed
        self.empty_listings = 0
        self.source_lost: str | None = None  # why the slot being released is left for another source
        self.lost_sources: list[str] = []  # sources that went down while serving this pull
        self.ran_task = False  # the task ran (once, or again after its source went down)

    @property
    def release_due(self) -> float:
        """When the release must be read again: a wait ending at or past it is followed by a
        re-read (``on_release``), so an abort is seen within ``max_wait``."""
        return self.release_read_at + self.timings.max_wait

    def _target(self) -> tuple[ReleaseRecord, PlanEntry]:
        """The release being pulled and this node's plan entry for it: known in every phase
        after a ``start`` that did not end the pull (the phases ``TRANSITIONS`` allows)."""
        if self.release is None or self.plan is None:
            raise PullProtocolError(f"no run is being pulled in phase {self.phase.value}")
        return self.release, self.plan

    # -- entry ------------------------------------------------------------------------

    @_transition
    def start(self, now: float) -> Action:
        """The first action: the end at once (nothing to pull), a failed record to write, a
        claim (a stage-1 node) or the first wait."""
        release, plan, own, problem = self.release, self.plan, self.own, self.problem
        if release is not None:
            if release.aborted:
                reason = release.aborted_reason or "no reason given"
                return self._finish(own, f"release {release.run_id} was aborted: {reason}")
            if own is not None and own.has(release.version):
                return self._finish(own, f"already done at version {release.version}")
            if self.node == release.leader:
                return self._finish(own, f"this node is the leader of run {release.run_id}")
        if problem is not None:
            return self._fail_run(problem.run_id, problem.version, problem.reason, now)
        if release is None:
            return self._finish(own, "no release recorded for this app")
        if plan is None or plan.run_id != release.run_id:
            return self._finish(own, f"not a target of run {release.run_id} (no plan entry for it)")
        if self.node in (plan.source, plan.after):
            reason = f"the plan entry of run {release.run_id} names this node as its own source"
            return self._fail_run(release.run_id, release.version, reason, now)
        if own is not None and own.run_id == release.run_id and own.status == NODE_FAILED:
            return self._finish(own, f"already failed in run {release.run_id}: {own.error}; fire again to retry")
        if release.holds(plan.stage):
            # Nothing is written or claimed: the event fired by resume starts the pull.
            return self._finish(own, f"held by the canary gate of run {release.run_id}: stage {plan.stage} starts "
                                     f"once stage {release.pause_after_stage} is resumed")
        self.started = now
        self.deadline = now + self.timings.watch_timeout
        self.release_read_at = now
        if plan.after is None and plan.source == release.leader:
            # The leader's record was written done together with the release record.
            self.source_depth = 0
            return self._claim(plan.source, slot_order(self.node, release.fanout, plan.slot), now)
        return self._begin_wait(plan, now)

    def _begin_wait(self, plan: PlanEntry, now: float) -> WaitForNode | WriteState:
        if plan.after:
            action = self._wait_on(Phase.WAIT_AFTER, plan.after, now)
        else:
            action = self._wait_on(Phase.WAIT_SOURCE, plan.source, now)
        if self.release_index and isinstance(action, WaitForNode):
            return self._keep_waiting(self.release_index, now, grace_from=self.timings.start_grace)
        return action

    # -- observations -----------------------------------------------------------------

    @_transition
    def on_written(self, ok: bool, now: float) -> PullResult:
        """The record of a ``WriteState`` was written (``ok``) or refused."""
        if ok:
            return self._finish(self.state, self.write_reason)
        lost = _LOST.format(self.node)
        return self._finish(self.state, f"{self.state.error}; but this could not be recorded: {lost}")

    @_transition
    def on_release(self, release: ReleaseRecord | None, now: float) -> Restart | WriteState | None:
        """The release as re-read after a wait that came back unchanged or a claim refused
        because it changed: None to go on, else the action that ends this run."""
        current, _plan = self._target()
        self.release_read_at = now
        if release is None or release.run_id != current.run_id:
            self.phase = Phase.FINISHED
            what = "was deleted" if release is None else f"now describes run {release.run_id}"
            return Restart(f"the release record {what}")
        self.release = release
        if release.aborted:
            reason = f"release {release.run_id} was aborted: {release.aborted_reason or 'no reason given'}"
            return self._fail(reason, now)
        return None

    @_transition
    def on_node(self, node: str, view: NodeView, index: int, now: float) -> Action:
        """The record of ``node`` (the one waited on) as read at ``index``."""
        if node != self.source:
            raise PullProtocolError(f"on_node({node}) answers no wait: the pull waits on {self.source}")
        release, plan = self._target()
        state, run, version = view.state, release.run_id, release.version
        this_run = state is not None and state.run_id == run
        crashed = state is not None and state.crashed(run, view.held)
        absent = not this_run and not (state is not None and state.has(version))
        if absent and now - self.waiting_since >= self.timings.start_grace:
            return self._check_start(index)
        pulling = state is not None and this_run and state.status == NODE_PULLING

        if self.phase is Phase.WAIT_AFTER:
            # Keep waiting only while the predecessor may still take our slot on our source.
            if state is not None and this_run:
                ahead = not crashed and (
                    state.status == NODE_WAITING or (state.status == NODE_PULLING and state.source == plan.source)
                )
            else:  # not started in this run: it may still come, unless done already
                ahead = absent
            if ahead:
                return self._keep_waiting(
                    index, now, grace_from=None if this_run else self.timings.start_grace, claim_soon=pulling,
                    missing=state is None,
                )
            if state is not None and this_run and state.has(version) and state.source == plan.source:
                # It pulled from our source, so the source is done too, one level up.
                self.source, self.source_depth = plan.source, (state.depth or 0) - 1
                return self._claim(plan.source, slot_order(self.node, release.fanout, plan.slot), now)
            return self._wait_on(Phase.WAIT_SOURCE, plan.source, now)

        if state is not None and state.has(version):
            self.source_depth = state.depth or 0
            return self._claim(node, slot_order(self.node, release.fanout, plan.slot), now)
        if state is not None and this_run and state.status == NODE_FAILED:
            return self._start_fallback(f"source {node} failed: {state.error}", now, exclude=node)
        if crashed:
            reason = f"source {node} stopped without finishing (its session ended)"
            return self._start_fallback(reason, now, exclude=node)
        return self._keep_waiting(
            index, now, grace_from=None if this_run else self.timings.start_grace, claim_soon=pulling,
            missing=state is None,
        )

    @_transition
    def on_start_check(self, plan: PlanEntry | None, source: NodeView, after: NodeView, now: float) -> Action:
        """The waited-on node has not started within the grace. It is late only if it could
        have started ``start_grace`` ago: its planned ``source`` and ``after`` (as read for
        ``plan``, its plan entry) had let it go by then. Else the grace counts from then."""
        release, _plan = self._target()
        self.phase = self.checked_phase
        node, grace = self.source, self.timings.start_grace
        if plan is None or plan.run_id != release.run_id:
            return self._late(f"source {node} has no plan entry for run {release.run_id}", now)
        ready = self._source_ready(source, now)
        if ready is not None and plan.after:
            after_ready = self._after_ready(after, plan.source, now)
            ready = None if after_ready is None else max(ready, after_ready)
        if ready is not None and now - ready >= grace:
            return self._late(f"source {node} has not started run {release.run_id} within {grace:g}s", now)
        self.waiting_since = now if ready is None else ready
        return self._keep_waiting(self.waited_index, now, grace_from=grace)

    def _source_ready(self, view: NodeView, now: float) -> float | None:
        """When a node planned to pull from the node of ``view`` could start: once it is done
        (or failed, or crashed: the puller then falls back); None while it may still come."""
        state, (release, _plan) = view.state, self._target()
        if state is None:
            return None
        if state.has(release.version):
            return min(now, max(_finished(state, now), release.fired_at))
        if state.run_id == release.run_id and state.terminal:
            return min(now, _finished(state, now))
        if state.crashed(release.run_id, view.held):
            return now
        return None

    def _after_ready(self, view: NodeView, source: str, now: float) -> float | None:
        """When a node's slot predecessor (``view``) let it go: finished, crashed, pulling
        from another source, or done already before this run; None while it may still come."""
        state, (release, _plan) = view.state, self._target()
        if state is None:
            return None
        if state.run_id == release.run_id:
            if state.terminal:
                return min(now, _finished(state, now))
            if state.crashed(release.run_id, view.held) or state.source not in (None, source):
                return now
            return None
        if state.has(release.version):
            return release.fired_at
        return None

    @_transition
    def on_claim(self, outcome: ClaimOutcome, now: float) -> Action:
        """What the ``ClaimSlot`` came to: the task runs on a slot taken; busy slots are waited
        on (for ``busy_grace``) or, in the fallback, the next candidate is tried."""
        release, _plan = self._target()
        source = self.source
        if outcome.refused:
            return self._finish(None, f"{_LOST.format(self.node)}; did not pull")
        if outcome.unusable:
            return self._start_fallback(f"source {source} is unusable: {outcome.unusable}", now, exclude=source)
        if outcome.slot is not None:
            self.slot = outcome.slot
            return self._run(source, outcome.slot)
        if self.fallback:
            return self._next_candidate(outcome.index, now)
        if self.busy_since is None:
            self.busy_since = now
        if now - self.busy_since >= self.timings.busy_grace:
            return self._start_fallback(
                f"all {release.fanout} slots of source {source} stayed busy for {self.timings.busy_grace:g}s", now
            )
        return self._wait_slots(outcome.index, now, self.busy_since + self.timings.busy_grace)

    @_transition
    def on_slots_changed(self, now: float) -> Action:
        """The source's slots changed (or the wait ran out): claim again, or list again when
        the fallback's candidates stayed busy for ``max_wait``."""
        release, plan = self._target()
        if self.fallback and now - self.listed_at >= self.timings.max_wait:
            return self._list("re-reading candidates: slots stayed busy", now)
        preferred = None if self.fallback else plan.slot
        return self._claim(self.source, slot_order(self.node, release.fanout, preferred), now)

    @_transition
    def on_nodes(self, views: Mapping[str, NodeView], now: float) -> Action:
        """Every node record of the app (fallback): claim the best done candidate, or sleep."""
        release, _plan = self._target()
        run, version, fanout = release.run_id, release.version, release.fanout
        pullers: dict[str, int] = {}
        for view in views.values():
            state = view.state
            if (
                state is not None and state.run_id == run and state.status == NODE_PULLING and state.source is not None
                and not state.crashed(run, view.held)
            ):
                pullers[state.source] = pullers.get(state.source, 0) + 1
        ranked: list[tuple[tuple[bool, int, int, int], str, int]] = []
        for name, view in views.items():
            if name == self.node or name in self.excluded or view.state is None or not view.state.has(version):
                continue
            busy, depth = pullers.get(name, 0), view.state.depth or 0
            ranked.append(((busy >= fanout, depth, busy, spread_key(self.node, name)), name, depth))
        ranked.sort()
        self.candidates = [(name, depth) for _key, name, depth in ranked]
        self.listed_at = now
        self.tried = 0
        if not self.candidates:
            self.empty_listings += 1
            expired = self._expired(now)
            if expired:
                return expired
            delay = min(self.timings.max_wait, 0.5 * 2 ** (self.empty_listings - 1), self.deadline - now)
            self.phase = Phase.SLEEP
            return Sleep(delay)
        self.empty_listings = 0
        return self._claim_candidate(now)

    @_transition
    def on_slept(self, now: float) -> Action:
        """The ``Sleep`` is over: list the nodes again."""
        return self._list("no done node had a free slot", now)

    @_transition
    def on_task(self, ok: bool, error: str | None, now: float, source_down: bool = False) -> ReleaseSlot:
        """The task's outcome. ``error`` may come with ``ok`` (failures the app's policy
        ignored): the done record keeps it. ``source_down``: the task failed while its source's
        node was down, so the pull moves to another source once the slot is released."""
        release, _plan = self._target()
        self.phase = Phase.RELEASE
        message = error or "the task failed without a message"
        if source_down:
            self.lost_sources.append(self.source)
        if ok:
            final = replace(self.state, status=NODE_DONE, finished=now, error=clip(error) if error else None)
            reason = f"pulled version {release.version} from {self.source}"
        elif source_down and len(self.lost_sources) <= self.timings.fallback_tries:
            self.source_lost = f"source {self.source} went down during the pull: {message}"
            return ReleaseSlot(self.source, self.slot, self.state)
        else:
            if source_down:
                message += f" (the sources {', '.join(self.lost_sources)} all went down during the pull)"
            final = replace(self.state, status=NODE_FAILED, finished=now, error=clip(message))
            reason = f"task failed pulling from {self.source}: {message}"
        self.outcome = PullResult(final, reason, True)
        self.state = final
        return ReleaseSlot(self.source, self.slot, final)

    @_transition
    def on_released(self, recorded: bool, now: float) -> Action:
        """The slot was released; ``recorded``: the record was written."""
        if self.source_lost is not None:
            reason, self.source_lost = self.source_lost, None
            if not recorded:
                return self._finish(None, f"{reason}; {_LOST.format(self.node)}; did not pull again")
            return self._start_fallback(reason, now, exclude=self.source)
        outcome = self.outcome
        if recorded:
            return self._finish(outcome.state, outcome.reason)
        lost = _LOST.format(self.node)
        return self._finish(outcome.state, f"{outcome.reason}; but this could not be recorded: {lost}")

    # -- moves between phases ---------------------------------------------------------

    def _finish(self, state: NodeState | None, reason: str) -> PullResult:
        self.phase = Phase.FINISHED
        return PullResult(state, reason, self.ran_task)

    def _write(self, state: NodeState, reason: str) -> WriteState:
        """Write ``state``, a record that ends the pull for ``reason`` once written."""
        self.phase = Phase.WRITE
        self.state = state
        self.write_reason = reason
        return WriteState(state)

    def _fail(self, reason: str, now: float) -> WriteState:
        release, _plan = self._target()
        failed = NodeState(
            version=release.version,
            run_id=release.run_id,
            status=NODE_FAILED,
            started=self.started,
            finished=now,
            error=clip(reason),
        )
        return self._write(failed, reason)

    def _fail_run(self, run_id: str, version: str, reason: str, now: float) -> PullResult | WriteState:
        """Record ``failed`` for a run that cannot be pulled, once (not again when recorded)."""
        own = self.own
        if own is not None and own.run_id == run_id and own.status == NODE_FAILED:
            return self._finish(own, f"already failed in run {run_id}: {own.error}; fire again to retry")
        self.started = now
        failed = NodeState(version=version, run_id=run_id, status=NODE_FAILED, started=now, finished=now,
                           error=clip(reason))
        return self._write(failed, reason)

    def _expired(self, now: float) -> WriteState | None:
        if now < self.deadline:
            return None
        waited = f"waiting for a source ({self._waiting_for()})"
        return self._fail(f"timed out after {self.timings.watch_timeout:g}s {waited}", now)

    def _waiting_for(self) -> str:
        _release, plan = self._target()
        if self.phase is Phase.WAIT_AFTER:
            return f"{self.source} to finish with slot {plan.slot} of {plan.source}"
        if self.phase is Phase.WAIT_SOURCE:
            return f"{self.source} to be done"
        if self.phase in (Phase.CLAIM, Phase.WAIT_SLOTS):
            return f"a free slot on {self.source}"
        return "no done node had a free slot"

    def _wait_on(self, phase: Phase, node: str, now: float) -> WaitForNode | WriteState:
        self.phase = phase
        self.source = node
        self.waiting_since = now
        self.read_at = now
        return self._expired(now) or WaitForNode(node, 0, 0.0)

    def _keep_waiting(
        self, index: int, now: float, grace_from: float | None, claim_soon: bool = False, missing: bool = False
    ) -> WaitForNode | WriteState:
        """The next blocking read of the node waited on; ``missing``: its record was absent, so
        the read is sent no sooner than ``absent_pause`` after the last one."""
        expired = self._expired(now)
        if expired:
            return expired
        limit = self.deadline
        if grace_from is not None:
            limit = min(limit, self.waiting_since + grace_from)
        pause = max(0.0, self.read_at + self.timings.absent_pause - now) if missing else 0.0
        self.read_at = now + pause
        return WaitForNode(self.source, index, self._wait_time(now + pause, limit), claim_soon, pause)

    def _wait_time(self, now: float, limit: float) -> float:
        """A wait ends by ``limit`` and by ``release_due``, so the release is re-read in time."""
        return max(0.1, min(self.timings.max_wait, limit - now, self.release_due - now))

    def _claim(self, source: str, slots: tuple[int, ...], now: float) -> ClaimSlot | WriteState:
        expired = self._expired(now)
        if expired:
            return expired
        release, _plan = self._target()
        self.phase = Phase.CLAIM
        self.source = source
        self.state = NodeState(
            version=release.version,
            run_id=release.run_id,
            status=NODE_PULLING,
            started=self.started,
            source=source,
            depth=self.source_depth + 1,
        )
        return ClaimSlot(source, slots, self.state)

    def _check_start(self, index: int) -> CheckStart:
        self.checked_phase, self.phase = self.phase, Phase.CHECK_START
        self.waited_index = index
        return CheckStart(self.source)

    def _late(self, reason: str, now: float) -> WaitForNode | ListNodes | WriteState:
        """The node waited on will not come: go to the source itself, or to the fallback."""
        _release, plan = self._target()
        if self.phase is Phase.WAIT_AFTER:
            return self._wait_on(Phase.WAIT_SOURCE, plan.source, now)
        return self._start_fallback(reason, now)

    def _wait_slots(self, index: int, now: float, limit: float) -> WaitForSlots | WriteState:
        expired = self._expired(now)
        if expired:
            return expired
        self.phase = Phase.WAIT_SLOTS
        return WaitForSlots(self.source, index, self._wait_time(now, min(limit, self.deadline)))

    def _start_fallback(self, reason: str, now: float, exclude: str | None = None) -> ListNodes | WriteState:
        if exclude:
            self.excluded.add(exclude)
        self.fallback = True
        return self._list(reason, now)

    def _list(self, reason: str, now: float) -> ListNodes | WriteState:
        expired = self._expired(now)
        if expired:
            return expired
        self.phase = Phase.LIST
        return ListNodes(reason)

    def _claim_candidate(self, now: float) -> ClaimSlot | WriteState:
        release, _plan = self._target()
        name, depth = self.candidates[self.tried]
        self.source_depth = depth
        return self._claim(name, slot_order(self.node, release.fanout), now)

    def _next_candidate(self, index: int, now: float) -> ClaimSlot | WaitForSlots | WriteState:
        if self.tried + 1 < min(len(self.candidates), self.timings.fallback_tries):
            self.tried += 1
            return self._claim_candidate(now)
        # Every candidate tried is busy: block on the last one's slots, re-list after max_wait.
        return self._wait_slots(index, now, self.listed_at + self.timings.max_wait)

    def _run(self, source: str, slot: int) -> RunTask:
        self.phase = Phase.RUN
        self.ran_task = True
        return RunTask(source, slot)
