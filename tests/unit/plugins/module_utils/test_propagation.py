"""Pure propagation decisions: the doubling schedule and every PullMachine transition."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections import Counter

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._kv import NodeState, PlanEntry, ReleaseRecord
from ansible_collections.fireap.consul.plugins.module_utils._propagation import (
    CheckStart,
    ClaimOutcome,
    ClaimSlot,
    ListNodes,
    NodeView,
    Phase,
    PullMachine,
    PullProtocolError,
    PullResult,
    PullTimings,
    ReleaseSlot,
    Restart,
    RunTask,
    Sleep,
    TRANSITIONS,
    WaitForNode,
    WaitForSlots,
    WriteState,
    plan_release,
    schedule_order,
    swarm_neighbours,
    schedule_position,
    slot_order,
    spread_key,
    stage_count,
)

# --- the schedule ----------------------------------------------------------------------

SIZES = sorted({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 17, 26, 27, 28, 36, 37, 64, 100, 215, 216, 217, 343, 512, 999, 1000})


def names(n):
    return [f"node-{i:04d}" for i in range(n)]


@pytest.mark.parametrize("fanout", [1, 2, 5])
@pytest.mark.parametrize("n", SIZES)
def test_plan_is_a_valid_doubling_schedule(fanout, n):
    nodes = names(n)
    plan = plan_release(list(reversed(nodes)), "node-0000", fanout, "run-1")
    order = schedule_order(nodes, "node-0000")
    index = {name: i for i, name in enumerate(order)}
    stage_of = {"node-0000": 0, **{name: entry.stage for name, entry in plan.items()}}

    assert set(plan) == set(nodes) - {"node-0000"}
    assert all(entry.run_id == "run-1" for entry in plan.values())
    # Every node pulls from an earlier node that finished in an earlier stage.
    for name, entry in plan.items():
        assert index[entry.source] < index[name]
        assert stage_of[entry.source] < entry.stage
        assert 0 <= entry.slot < fanout
    # At most k pullers per source per stage, each on its own slot.
    per_stage = Counter((entry.source, entry.stage) for entry in plan.values())
    assert max(per_stage.values(), default=0) <= fanout
    slots = Counter((entry.source, entry.stage, entry.slot) for entry in plan.values())
    assert max(slots.values(), default=0) == (1 if n > 1 else 0)
    # ceil(log_{k+1} N) stages.
    expected = math.ceil(round(math.log(n, fanout + 1), 9)) if n > 1 else 0
    assert max(stage_of.values()) == expected == stage_count(n, fanout)


@pytest.mark.parametrize("fanout", [1, 2, 5])
def test_after_names_the_previous_holder_of_the_same_slot(fanout):
    plan = plan_release(names(1000), "node-0000", fanout, "r")
    holders = {(e.source, e.stage, e.slot): name for name, e in plan.items()}
    for name, entry in plan.items():
        previous = holders.get((entry.source, entry.stage - 1, entry.slot))
        assert entry.after == previous, name
        if previous is not None:
            assert plan[previous].source == entry.source and plan[previous].slot == entry.slot


@pytest.mark.parametrize("fanout", [1, 2, 5])
def test_stage_by_stage_simulation_finishes_in_the_ideal_number_of_stages(fanout):
    """Each stage, a node pulls when its source is done and its `after` has freed the slot."""
    n = 500
    plan = plan_release(names(n), "node-0000", fanout, "r")
    done = {"node-0000": 0}
    stage = 0
    while len(done) < n:
        stage += 1
        ready = [
            name
            for name, entry in plan.items()
            if name not in done and entry.source in done and (entry.after is None or entry.after in done)
        ]
        assert Counter(plan[name].source for name in ready).most_common(1)[0][1] <= fanout
        done.update({name: stage for name in ready})
    assert stage == stage_count(n, fanout)
    assert all(done[name] == entry.stage for name, entry in plan.items())


def test_schedule_position_formulas():
    # k = 2: stage 1 = indexes 1..2 from 0; stage 2 = 3..8 from 0,0,1,1,2,2; stage 3 starts at 9.
    assert [schedule_position(i, 2) for i in range(1, 10)] == [
        (1, 0, 0), (1, 0, 1),
        (2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1), (2, 2, 0), (2, 2, 1),
        (3, 0, 0),
    ]
    assert schedule_position(1, 1) == (1, 0, 0)
    assert schedule_position(7, 1) == (3, 3, 0)
    assert schedule_position(8, 1) == (4, 0, 0)
    assert schedule_position(6 ** 3, 5) == (4, 0, 0)


@pytest.mark.parametrize(
    "n, k, stages",
    [(1, 3, 0), (2, 1, 1), (4, 1, 2), (5, 1, 3), (3, 2, 1), (4, 2, 2), (10, 2, 3), (1000, 9, 3), (1001, 9, 4)],
)
def test_stage_count(n, k, stages):
    assert stage_count(n, k) == stages


def test_schedule_order_puts_the_leader_first_and_sorts_the_rest():
    assert schedule_order(["c", "a", "lead", "b"], "lead") == ["lead", "a", "b", "c"]
    assert schedule_order(["c", "a"], "lead") == ["lead", "a", "c"]
    assert plan_release(["lead"], "lead", 3, "r") == {}
    assert plan_release(["b", "a"], "lead", 1, "r") == {
        "a": PlanEntry(run_id="r", source="lead", stage=1, slot=0),
        "b": PlanEntry(run_id="r", source="lead", stage=2, slot=0, after="a"),
    }


def test_plan_entries_carry_the_source_address_when_known():
    plan = plan_release(["lead", "a", "b", "c"], "lead", 1, "r", {"lead": "10.0.0.1", "a": "10.0.0.2"})
    assert plan["a"].source_address == plan["b"].source_address == "10.0.0.1"
    assert plan["c"].source == "a" and plan["c"].source_address == "10.0.0.2"
    assert plan_release(["lead", "a"], "lead", 2, "r")["a"].source_address is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: schedule_order(["a", "a"], "l"), "target node 'a' is listed twice"),
        (lambda: schedule_order(["a/b"], "l"), "target node name 'a/b'"),
        (lambda: schedule_order(["a"], ""), "leader node name must be a non-empty string"),
        (lambda: plan_release(["a"], "l", 0, "r"), "fanout must be an integer from 1 to 64, got 0"),
        (lambda: plan_release(["a"], "l", True, "r"), "fanout must be an integer from 1 to 64, got True"),
        (lambda: plan_release(["a"], "l", 65, "r"), "fanout must be an integer from 1 to 64, got 65"),
        (lambda: stage_count(0, 2), "node count must be an integer >= 1"),
        (lambda: schedule_position(0, 2), "schedule index must be an integer >= 1"),
    ],
)
def test_schedule_inputs_are_validated(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_slot_order_is_a_permutation_with_the_preferred_slot_first():
    for fanout in (1, 2, 5):
        for puller in ("a", "b", "node-7"):
            order = slot_order(puller, fanout, preferred=fanout - 1)
            assert sorted(order) == list(range(fanout))
            assert order[0] == fanout - 1
            assert slot_order(puller, fanout) == slot_order(puller, fanout)
    starts = {slot_order(f"node-{i}", 5)[0] for i in range(50)}
    assert len(starts) > 1  # pullers do not all start at slot 0


# --- the pull machine ------------------------------------------------------------------

T0 = 1000.0
TIMINGS = PullTimings(watch_timeout=600, start_grace=20, busy_grace=15, max_wait=10, fallback_tries=2)
RELEASE = ReleaseRecord(app="web", version="v2", run_id="r2", fanout=2, leader="lead", target_count=20, fired_at=T0)
PLAN = PlanEntry(run_id="r2", source="src", stage=2, slot=1)
PLAN_AFTER = PlanEntry(run_id="r2", source="src", stage=3, slot=1, after="prev")


def state(status, *, version="v2", run_id="r2", source=None, depth=None, error=None, started=T0):
    if status == "done" and depth is None:
        depth = 1 if source else 0
    if source and depth is None:
        depth = 1
    finished = T0 + 1 if status in ("done", "failed") else None
    if status == "failed" and error is None:
        error = "boom"
    return NodeState(
        version=version, run_id=run_id, status=status, started=started, source=source, depth=depth,
        finished=finished, error=error,
    )


def view(status=None, held=True, **kwargs):
    return NodeView(state(status, **kwargs) if status else None, held)


def started(plan=PLAN, own=None, timings=TIMINGS):
    """A machine that started waiting (writing nothing); returns (machine, first wait action)."""
    machine = PullMachine("me", RELEASE, plan, own, timings)
    action = machine.start(T0)
    assert isinstance(action, WaitForNode)
    return machine, action


def observe(machine, node, seen, index, now):
    """``on_node`` as the adapter answers it: a wait ending at or past the machine's
    ``release_due`` is first followed by a re-read of the (unchanged) release."""
    if now >= machine.release_due:
        assert machine.on_release(RELEASE, now) is None
    return machine.on_node(node, seen, index, now)


def claim(source, depth, slots=None):
    """The ClaimSlot of ``source``: the slots in order and the pulling record to write."""
    slots = slot_order("me", 2, 1) if slots is None else slots
    return ClaimSlot(source, slots, state("pulling", source=source, depth=depth))


def claimed(depth=3):
    """A machine at the ClaimSlot for its preferred source (done, depth ``depth``)."""
    machine, _wait = started()
    action = machine.on_node("src", view("done", source="x", depth=depth), 5, T0 + 1)
    assert action == claim("src", depth + 1)
    return machine


@pytest.mark.parametrize(
    "release, plan, own, reason",
    [
        (None, PLAN, None, "no release recorded for this app"),
        (ReleaseRecord(**{**RELEASE.__dict__, "status": "aborted", "aborted_reason": "bad build"}), PLAN, None,
         "release r2 was aborted: bad build"),
        (RELEASE, PLAN, state("done", run_id="r1", source="a"), "already done at version v2"),
        (ReleaseRecord(**{**RELEASE.__dict__, "leader": "me"}), None, None, "this node is the leader of run r2"),
        (RELEASE, None, None, "not a target of run r2"),
        (RELEASE, PlanEntry(run_id="r1", source="src", stage=1, slot=0), None, "not a target of run r2"),
        (RELEASE, PLAN, state("failed", error="disk full"), "already failed in run r2: disk full"),
    ],
)
def test_start_ends_without_running_anything(release, plan, own, reason):
    result = PullMachine("me", release, plan, own, TIMINGS).start(T0)
    assert isinstance(result, PullResult)
    assert reason in result.reason
    assert result.state == own and not result.ran_task


@pytest.mark.parametrize(
    "plan",
    [
        PlanEntry(run_id="r2", source="me", stage=1, slot=0),
        PlanEntry(run_id="r2", source="src", stage=3, slot=0, after="me"),
    ],
    ids=["source", "after"],
)
def test_a_plan_naming_this_node_as_its_own_source_is_recorded_failed(plan):
    machine = PullMachine("me", RELEASE, plan, None, TIMINGS)
    action = machine.start(T0)
    reason = "the plan entry of run r2 names this node as its own source"
    assert action == WriteState(
        NodeState(version="v2", run_id="r2", status="failed", started=T0, finished=T0, error=reason)
    )
    result = machine.on_written(True, T0)
    assert isinstance(result, PullResult)
    assert result.failed and result.reason == reason and not result.ran_task


def test_a_self_sourced_plan_already_recorded_failed_is_not_written_again():
    reason = "the plan entry of run r2 names this node as its own source"
    own = state("failed", error=reason, started=T0 - 5)
    result = PullMachine("me", RELEASE, PlanEntry(run_id="r2", source="me", stage=1, slot=0), own, TIMINGS).start(T0)
    assert isinstance(result, PullResult)
    assert result.state == own and f"already failed in run r2: {reason}" in result.reason


def test_start_proceeds_from_an_older_version_or_an_interrupted_pull():
    for own in (state("done", version="v1", run_id="r1", source="a"), state("pulling", source="a")):
        machine = PullMachine("me", RELEASE, PLAN, own, TIMINGS)
        assert machine.start(T0) == WaitForNode("src", 0, 0.0)


def test_a_first_stage_node_claims_the_leader_at_once():
    plan = PlanEntry(run_id="r2", source="lead", stage=1, slot=1)
    machine = PullMachine("me", RELEASE, plan, None, TIMINGS)
    assert machine.start(T0) == claim("lead", 1)
    assert machine.on_claim(ClaimOutcome(slot=1), T0) == RunTask("lead", 1)


def test_claim_refused_for_our_own_record_ends_without_running():
    machine = claimed()
    result = machine.on_claim(ClaimOutcome(refused=True), T0 + 2)
    assert result == PullResult(None, "the record of node me is held or changed by another worker; did not pull")


def test_waits_on_the_source_or_first_on_the_previous_slot_holder():
    assert started()[1] == WaitForNode("src", 0, 0.0)
    assert started(PLAN_AFTER)[1] == WaitForNode("prev", 0, 0.0)


@pytest.mark.parametrize(
    "prev, now, expected",
    [
        # The release was read at T0: the wait ends when it is due again (T0 + max_wait).
        (view("waiting"), T0 + 1, WaitForNode("prev", 7, 9)),
        (view("pulling", source="src"), T0 + 1, WaitForNode("prev", 7, 9, claim_soon=True)),
        (None, T0 + 15, WaitForNode("prev", 7, 5)),  # not started yet: wait until the grace ends
        (view("done", source="src"), T0 + 1, claim("src", 1)),  # so src is done
        (view("done", source="other"), T0 + 1, WaitForNode("src", 0, 0.0)),
        (view("failed", source="src"), T0 + 1, WaitForNode("src", 0, 0.0)),
        (view("pulling", source="elsewhere"), T0 + 1, WaitForNode("src", 0, 0.0)),
        (view("pulling", source="src", held=False), T0 + 1, WaitForNode("src", 0, 0.0)),  # crashed
        (None, T0 + 20, CheckStart("prev")),  # not started within the grace: could it have?
        (view("done", run_id="r1", source="src"), T0 + 1, WaitForNode("src", 0, 0.0)),  # had it already
        (view("pulling", run_id="r1", source="src"), T0 + 1, WaitForNode("prev", 7, 9)),  # old run, may start
    ],
)
def test_waiting_on_the_previous_slot_holder(prev, now, expected):
    machine, _first = started(PLAN_AFTER)
    assert observe(machine, "prev", prev or NodeView(None), 7, now) == expected


def test_previous_holder_done_from_our_source_lets_us_claim_at_once():
    machine, _first = started(PLAN_AFTER)
    assert machine.on_node("prev", view("done", source="src", depth=3), 7, T0 + 1) == claim("src", 3)
    assert machine.on_claim(ClaimOutcome(slot=1, index=8), T0 + 1) == RunTask("src", 1)


def test_done_source_is_claimed_with_the_planned_slot_first_then_pulled_and_reported():
    machine = claimed(depth=3)
    assert machine.on_claim(ClaimOutcome(slot=1, index=40), T0 + 2) == RunTask("src", 1)
    done = NodeState(version="v2", run_id="r2", status="done", started=T0, source="src", depth=4, finished=T0 + 9)
    assert machine.on_task(True, None, T0 + 9) == ReleaseSlot("src", 1, done)
    result = machine.on_released(True, T0 + 9)
    assert result == PullResult(done, "pulled version v2 from src", True)
    assert not result.failed


def test_task_failure_is_reported_as_failed_with_the_error():
    machine = claimed()
    machine.on_claim(ClaimOutcome(slot=0, index=40), T0 + 2)
    action = machine.on_task(False, "exit 23", T0 + 5)
    assert (action.source, action.slot) == ("src", 0)
    assert action.state.status == "failed" and action.state.error == "exit 23"
    result = machine.on_released(True, T0 + 5)
    assert result.state == action.state and result.failed and result.ran_task
    assert "task failed pulling from src: exit 23" in result.reason


def test_failures_ignored_by_the_app_policy_keep_their_error_in_the_done_record():
    machine = claimed()
    machine.on_claim(ClaimOutcome(slot=1, index=40), T0 + 2)
    ignored = "1 of 2 commands failed, ignored (on_command_failure: ignore): exec_commands[0] (exit status 3)"
    action = machine.on_task(True, ignored, T0 + 5)
    assert action.state.status == "done" and action.state.error == ignored
    assert machine.on_released(True, T0 + 5).state == action.state


def test_a_task_failed_with_its_source_down_moves_to_another_source():
    machine = claimed(depth=3)
    pulling = claim("src", 4).state
    assert machine.on_claim(ClaimOutcome(slot=1, index=40), T0 + 2) == RunTask("src", 1)
    # The slot is released with the record left pulling: nothing is recorded failed.
    action = machine.on_task(False, "rsync: connection refused", T0 + 5, source_down=True)
    assert action == ReleaseSlot("src", 1, pulling)
    action = machine.on_released(True, T0 + 5)
    assert isinstance(action, ListNodes)
    assert action.reason == "source src went down during the pull: rsync: connection refused"
    assert "src" in machine.excluded
    views = {"src": view("done", source="x", depth=3), "d1": view("done", source="lead", depth=1)}
    assert machine.on_nodes(views, T0 + 6) == claim("d1", 2, slot_order("me", 2))
    assert machine.on_claim(ClaimOutcome(slot=0, index=41), T0 + 6) == RunTask("d1", 0)
    done = machine.on_task(True, None, T0 + 9)
    assert done.state == NodeState(
        version="v2", run_id="r2", status="done", started=T0, source="d1", depth=2, finished=T0 + 9
    )
    assert machine.on_released(True, T0 + 9) == PullResult(done.state, "pulled version v2 from d1", True)


def test_a_pull_that_loses_more_sources_than_fallback_tries_records_failed():
    machine = claimed(depth=3)
    lost = []
    for n in range(TIMINGS.fallback_tries + 1):
        source = machine.source
        assert isinstance(machine.on_claim(ClaimOutcome(slot=0, index=40 + n), T0 + 2), RunTask)
        action = machine.on_task(False, "connection refused", T0 + 3, source_down=True)
        lost.append(source)
        if n < TIMINGS.fallback_tries:
            assert action == ReleaseSlot(source, 0, claim(source, machine.source_depth + 1).state)
            assert isinstance(machine.on_released(True, T0 + 3), ListNodes)
            machine.on_nodes({f"d{n}": view("done", source="lead", depth=1)}, T0 + 3)
    assert action.state.status == "failed"
    assert action.state.error == f"connection refused (the sources {', '.join(lost)} all went down during the pull)"
    assert machine.on_released(True, T0 + 3).failed


def test_a_source_down_is_only_heard_for_a_failed_task():
    machine = claimed()
    machine.on_claim(ClaimOutcome(slot=1, index=40), T0 + 2)
    assert machine.on_task(True, None, T0 + 5, source_down=True).state.status == "done"


def test_a_source_down_whose_slot_release_was_not_recorded_ends_without_pulling_again():
    machine = claimed()
    machine.on_claim(ClaimOutcome(slot=1, index=40), T0 + 2)
    machine.on_task(False, "gone", T0 + 5, source_down=True)
    result = machine.on_released(False, T0 + 5)
    assert result == PullResult(
        None, "source src went down during the pull: gone; the record of node me is held or changed by another worker; "
        "did not pull again", True,
    )


def test_final_write_refused_still_returns_the_outcome():
    machine = claimed()
    machine.on_claim(ClaimOutcome(slot=1, index=40), T0 + 2)
    machine.on_task(True, None, T0 + 3)
    result = machine.on_released(False, T0 + 3)
    assert result.state.status == "done" and result.ran_task
    assert "could not be recorded" in result.reason


@pytest.mark.parametrize(
    "source, now, excluded, reason",
    [
        (view("failed", error="no space"), T0 + 1, True, "source src failed: no space"),
        (view("pulling", source="x", held=False), T0 + 1, True, "source src stopped without finishing"),
        (view("waiting", held=False), T0 + 1, True, "source src stopped without finishing"),
    ],
)
def test_unusable_preferred_source_sends_to_the_fallback(source, now, excluded, reason):
    machine, _first = started()
    action = machine.on_node("src", source, 3, now)
    assert isinstance(action, ListNodes) and reason in action.reason
    assert ("src" in machine.excluded) is excluded


@pytest.mark.parametrize(
    "source, now, expected",
    [
        (view("waiting"), T0 + 500, WaitForNode("src", 3, 10)),  # started: no grace, only the timeout
        # Pulling: the session is made while it pulls; the wait is capped by the deadline.
        (view("pulling", source="x"), T0 + 595, WaitForNode("src", 3, 5, claim_soon=True)),
        (NodeView(None), T0 + 12, WaitForNode("src", 3, 8)),  # capped by the start grace
    ],
)
def test_pending_source_is_waited_on_with_bounded_blocking_queries(source, now, expected):
    machine, _first = started()
    assert observe(machine, "src", source, 3, now) == expected


@pytest.mark.parametrize("source", [NodeView(None), view("done", version="v1", run_id="r1", source="x")])
def test_a_source_not_started_within_the_grace_is_checked(source):
    machine, _first = started()
    assert observe(machine, "src", source, 3, T0 + 19) == WaitForNode("src", 3, 1)
    assert observe(machine, "src", source, 3, T0 + 20) == CheckStart("src")


SRC_PLAN = PlanEntry(run_id="r2", source="s0", stage=1, slot=0)


@pytest.mark.parametrize(
    "plan, source, after, now, expected",
    [
        # Its own source done at T0 + 1: it could have started 20 s ago, it will not come.
        (SRC_PLAN, view("done", source="x"), NodeView(None), T0 + 21, "source src has not started run r2 within 20s"),
        (None, NodeView(None), NodeView(None), T0 + 20, "source src has no plan entry for run r2"),
        (PlanEntry(run_id="r1", source="s0", stage=1, slot=0), view("done", source="x"), NodeView(None), T0 + 20,
         "source src has no plan entry for run r2"),
        # Its source failed: it falls back itself, and had 20 s to.
        (SRC_PLAN, view("failed"), NodeView(None), T0 + 21, "has not started run r2 within 20s"),
        # Its source done and its slot predecessor gone: both long enough ago.
        (PlanEntry(run_id="r2", source="s0", stage=2, slot=0, after="a0"), view("done", source="x"),
         view("done", source="s0"), T0 + 21, "has not started run r2 within 20s"),
    ],
)
def test_a_source_that_could_have_started_long_ago_is_late(plan, source, after, now, expected):
    machine, _first = started()
    assert machine.on_node("src", NodeView(None), 3, T0 + 20) == CheckStart("src")
    action = machine.on_start_check(plan, source, after, now)
    assert isinstance(action, ListNodes) and expected in action.reason
    assert "src" not in machine.excluded


@pytest.mark.parametrize(
    "plan, source, after, now, expected",
    [
        # Its source is still pulling: the grace starts over from now.
        (SRC_PLAN, view("pulling", source="x"), NodeView(None), T0 + 20, WaitForNode("src", 3, 10)),
        (SRC_PLAN, NodeView(None), NodeView(None), T0 + 20, WaitForNode("src", 3, 10)),
        # Its source was done at T0 + 1: the grace ends at T0 + 21.
        (SRC_PLAN, view("done", source="x"), NodeView(None), T0 + 20, WaitForNode("src", 3, 1)),
        # Its slot predecessor still pulls from its source: it may not start yet.
        (PlanEntry(run_id="r2", source="s0", stage=2, slot=0, after="a0"), view("done", source="x"),
         view("pulling", source="s0"), T0 + 30, WaitForNode("src", 3, 10)),
    ],
)
def test_a_source_that_could_not_start_yet_is_waited_for(plan, source, after, now, expected):
    machine, _first = started()
    assert observe(machine, "src", NodeView(None), 3, now) == CheckStart("src")
    assert machine.on_start_check(plan, source, after, now) == expected


def test_a_late_previous_slot_holder_sends_us_to_our_source():
    machine, _first = started(PLAN_AFTER)
    assert machine.on_node("prev", NodeView(None), 7, T0 + 20) == CheckStart("prev")
    assert machine.on_start_check(None, NodeView(None), NodeView(None), T0 + 20) == WaitForNode("src", 0, 0.0)


def test_busy_slots_are_waited_on_then_abandoned_after_the_busy_grace():
    machine = claimed()
    # The release read at T0 is due again at T0 + 10: the wait ends then.
    assert machine.on_claim(ClaimOutcome(index=41), T0 + 2) == WaitForSlots("src", 41, 8)
    assert machine.on_release(RELEASE, T0 + 10) is None  # the wait timed out: the adapter re-read it
    assert machine.on_slots_changed(T0 + 10) == claim("src", 4)
    assert machine.on_claim(ClaimOutcome(index=42), T0 + 10) == WaitForSlots("src", 42, 7)  # grace ends at T0 + 17
    assert machine.on_slots_changed(T0 + 17) == claim("src", 4)
    action = machine.on_claim(ClaimOutcome(index=43), T0 + 17)
    assert isinstance(action, ListNodes) and "all 2 slots of source src stayed busy for 15s" in action.reason
    assert "src" not in machine.excluded


def test_source_without_address_is_excluded():
    machine = claimed()
    action = machine.on_claim(ClaimOutcome(unusable="no address in the catalog"), T0 + 2)
    assert isinstance(action, ListNodes) and "source src is unusable: no address in the catalog" in action.reason
    assert "src" in machine.excluded


def fallback_machine():
    machine, _first = started()
    assert isinstance(machine.on_node("src", view("failed"), 3, T0 + 1), ListNodes)
    return machine


def test_fallback_prefers_shallow_then_idle_sources_and_skips_the_unusable():
    machine = fallback_machine()
    views = {
        "me": view("waiting"),
        "src": view("failed"),  # excluded
        "lead": view("done", depth=0),  # shallowest, but both slots look busy
        "p1": view("pulling", source="lead"),
        "p2": view("pulling", source="lead"),
        "d1": view("done", source="lead", depth=1),
        "d2": view("done", source="lead", depth=1),
        "p3": view("pulling", source="d2"),
        "p4": view("pulling", source="d1", held=False),  # crashed puller: not counted
        "deep": view("done", source="d1", depth=2),
        "old": view("done", version="v1", run_id="r1", source="lead"),  # other version
        "bad": NodeView(None),
        "f": view("failed", source="lead"),
    }
    action = machine.on_nodes(views, T0 + 2)
    assert machine.candidates == [("d1", 1), ("d2", 1), ("deep", 2), ("lead", 0)]
    assert action == claim("d1", 2, slot_order("me", 2))


def test_fallback_tries_candidates_then_blocks_and_relists():
    machine = fallback_machine()
    views = {name: view("done", source="lead", depth=1) for name in ("a", "b", "c")}
    first = machine.on_nodes(views, T0 + 2)
    order = [name for name, _depth in machine.candidates]
    assert first == claim(order[0], 2, slot_order("me", 2))
    assert machine.on_claim(ClaimOutcome(index=50), T0 + 2) == claim(order[1], 2, slot_order("me", 2))
    # fallback_tries = 2: block on the last tried candidate until the listing is max_wait old,
    # and no longer than until the release is due (read at T0, due at T0 + 10).
    assert machine.on_claim(ClaimOutcome(index=51), T0 + 3) == WaitForSlots(order[1], 51, 7)
    assert machine.on_slots_changed(T0 + 4) == claim(order[1], 2, slot_order("me", 2))
    assert machine.on_claim(ClaimOutcome(index=52), T0 + 5) == WaitForSlots(order[1], 52, 5)
    assert machine.on_release(RELEASE, T0 + 10) is None  # that wait timed out: the adapter re-read it
    assert isinstance(machine.on_slots_changed(T0 + 12), ListNodes)


def test_fallback_claim_records_the_depth_of_the_chosen_source():
    machine = fallback_machine()
    action = machine.on_nodes({"deep": view("done", source="x", depth=4)}, T0 + 2)
    assert action == claim("deep", 5, slot_order("me", 2))
    assert machine.on_claim(ClaimOutcome(slot=0, index=9), T0 + 2) == RunTask("deep", 0)


def test_fallback_ties_are_broken_per_puller_so_fallbacks_spread():
    views = {f"d{i}": view("done", source="lead", depth=1) for i in range(8)}
    firsts = set()
    for i in range(40):
        machine = PullMachine(f"puller-{i}", RELEASE, PLAN, None, TIMINGS)
        machine.start(T0)
        machine.on_node("src", view("failed"), 3, T0)
        action = machine.on_nodes(views, T0)
        firsts.add(action.source)
        assert action.source == min(views, key=lambda name: spread_key(f"puller-{i}", name))
    assert len(firsts) >= 4


def test_no_candidate_sleeps_with_backoff_and_relists():
    machine = fallback_machine()
    delays = []
    for step in range(6):
        action = machine.on_nodes({"x": view("pulling", source="lead")}, T0 + 2 + step)
        assert isinstance(action, Sleep)
        delays.append(action.seconds)
        assert isinstance(machine.on_slept(T0 + 2 + step), ListNodes)
    assert delays == [0.5, 1, 2, 4, 8, 10]


def test_abort_while_waiting_records_failed_and_stops():
    machine, _first = started()
    aborted = ReleaseRecord(**{**RELEASE.__dict__, "status": "aborted", "aborted_reason": "rollback"})
    action = machine.on_release(aborted, T0 + 3)
    assert isinstance(action, WriteState)
    assert action.state.status == "failed" and action.state.error == "release r2 was aborted: rollback"
    result = machine.on_written(True, T0 + 3)
    assert result.failed and not result.ran_task


def test_release_unchanged_lets_the_wait_go_on():
    machine, _first = started()
    assert machine.on_release(RELEASE, T0 + 3) is None
    assert machine.on_node("src", view("waiting"), 3, T0 + 3) == WaitForNode("src", 3, 10)


def test_no_wait_outlasts_the_release_due_so_an_abort_is_seen_within_max_wait():
    """Consul may return blocking reads of a missing record with a raised index although it did not
    change: each read ends by the time the release is due, and the adapter re-reads it then."""
    machine, _first = started()
    aborted = ReleaseRecord(**{**RELEASE.__dict__, "status": "aborted", "aborted_reason": "budget"})
    now, index = T0, 3
    while now < machine.release_due:
        action = machine.on_node("src", NodeView(None), index, now)
        # (A read lasts at least 0.1 s.)
        assert isinstance(action, WaitForNode) and now + action.pause + action.wait <= machine.release_due + 0.1
        now, index = now + action.pause + 0.2, index + 1  # woken early by a write elsewhere
    assert now - T0 < TIMINGS.max_wait + TIMINGS.absent_pause + 0.2
    ended = machine.on_release(aborted, now)
    assert isinstance(ended, WriteState) and ended.state.error == "release r2 was aborted: budget"


def test_an_absent_record_is_read_at_most_once_per_absent_pause():
    machine, _first = started()
    first = machine.on_node("src", NodeView(None), 3, T0 + 0.25)
    assert first == WaitForNode("src", 3, 9, pause=0.75)  # read at T0; ends when the release is due
    second = machine.on_node("src", NodeView(None), 4, T0 + 1.5)
    assert second == WaitForNode("src", 4, 8, pause=0.5)
    # A record that exists wakes the read only when it changes: no pause.
    assert machine.on_node("src", view("waiting"), 5, T0 + 2.1).pause == 0


@pytest.mark.parametrize("release, what", [(None, "was deleted"), ("new", "now describes run r3")])
def test_another_run_restarts_the_worker(release, what):
    machine, _first = started()
    new = ReleaseRecord(**{**RELEASE.__dict__, "run_id": "r3", "version": "v3"}) if release else None
    assert machine.on_release(new, T0 + 3) == Restart(f"the release record {what}")


@pytest.mark.parametrize("phase", ["source", "slots", "fallback"])
def test_timeout_records_failed_with_what_was_awaited(phase):
    machine, _first = started()
    late = T0 + 600
    if phase == "source":
        action = machine.on_node("src", view("pulling", source="x"), 3, late)
        awaited = "src to be done"
    elif phase == "slots":
        machine.on_node("src", view("done", source="x"), 3, T0 + 1)
        machine.on_claim(ClaimOutcome(index=4), T0 + 2)
        action = machine.on_slots_changed(late)
        awaited = "a free slot on src"
    else:
        machine.on_node("src", view("failed"), 3, T0 + 1)
        action = machine.on_nodes({}, late)
        awaited = "no done node had a free slot"
    assert isinstance(action, WriteState) and action.state.status == "failed"
    assert action.state.error == f"timed out after 600s waiting for a source ({awaited})"
    result = machine.on_written(True, late)
    assert result.failed and result.reason == action.state.error


# --- the transition table ----------------------------------------------------------------

ABORTED = ReleaseRecord(**{**RELEASE.__dict__, "status": "aborted", "aborted_reason": "rollback"})


def machine_in(phase: Phase) -> PullMachine:
    """A machine brought to ``phase`` by legal calls only."""
    if phase is Phase.NEW:
        return PullMachine("me", RELEASE, PLAN, None, TIMINGS)
    if phase is Phase.WAIT_AFTER:
        return started(PLAN_AFTER)[0]
    if phase in (Phase.WAIT_SOURCE, Phase.CHECK_START, Phase.WRITE):
        machine, _first = started()
        if phase is Phase.CHECK_START:
            machine.on_node("src", NodeView(None), 3, T0 + 20)
        elif phase is Phase.WRITE:
            machine.on_release(ABORTED, T0 + 3)
        return machine
    if phase in (Phase.LIST, Phase.SLEEP):
        machine = fallback_machine()
        if phase is Phase.SLEEP:
            machine.on_nodes({}, T0 + 2)
        return machine
    machine = claimed()
    if phase is Phase.WAIT_SLOTS:
        machine.on_claim(ClaimOutcome(index=41), T0 + 2)
    elif phase is not Phase.CLAIM:
        machine.on_claim(ClaimOutcome(slot=1, index=40), T0 + 2)
        if phase is not Phase.RUN:
            machine.on_task(True, None, T0 + 5)
            if phase is not Phase.RELEASE:
                machine.on_released(True, T0 + 5)
    return machine


#: Each call of the protocol with answers that fit the phase that accepts it.
CALLS = {
    "start": lambda machine: machine.start(T0),
    "on_written": lambda machine: machine.on_written(True, T0 + 6),
    "on_release": lambda machine: machine.on_release(RELEASE, T0 + 6),
    "on_node": lambda machine: machine.on_node(
        "prev" if machine.phase is Phase.WAIT_AFTER else "src", view("waiting"), 8, T0 + 6
    ),
    "on_start_check": lambda machine: machine.on_start_check(None, NodeView(None), NodeView(None), T0 + 20),
    "on_claim": lambda machine: machine.on_claim(ClaimOutcome(slot=0, index=9), T0 + 6),
    "on_slots_changed": lambda machine: machine.on_slots_changed(T0 + 6),
    "on_nodes": lambda machine: machine.on_nodes({"d1": view("done", source="lead")}, T0 + 6),
    "on_slept": lambda machine: machine.on_slept(T0 + 6),
    "on_task": lambda machine: machine.on_task(False, "exit 1", T0 + 6),
    "on_released": lambda machine: machine.on_released(True, T0 + 6),
}

LEGAL = [(phase, call) for phase in Phase for call in TRANSITIONS[phase]]
ILLEGAL = [(phase, call) for phase in Phase for call in CALLS if call not in TRANSITIONS[phase]]


def test_the_table_covers_every_phase_and_every_call_of_the_machine():
    assert set(TRANSITIONS) == set(Phase)
    assert {call for calls in TRANSITIONS.values() for call in calls} == set(CALLS)
    public = {name for name in vars(PullMachine) if name == "start" or name.startswith("on_")}
    assert public == set(CALLS)
    assert TRANSITIONS[Phase.FINISHED] == {}
    # Every phase but NEW is where some call may lead.
    assert {target for calls in TRANSITIONS.values() for targets in calls.values() for target in targets} == (
        set(Phase) - {Phase.NEW}
    )


@pytest.mark.parametrize("phase", list(Phase), ids=lambda phase: phase.value)
def test_machine_in_reaches_each_phase(phase):
    assert machine_in(phase).phase is phase


@pytest.mark.parametrize("phase, call", LEGAL, ids=[f"{phase.value}-{call}" for phase, call in LEGAL])
def test_every_call_the_table_allows_is_accepted_and_moves_as_listed(phase, call):
    machine = machine_in(phase)
    action = CALLS[call](machine)
    assert machine.phase in TRANSITIONS[phase][call], action


@pytest.mark.parametrize("phase, call", ILLEGAL, ids=[f"{phase.value}-{call}" for phase, call in ILLEGAL])
def test_every_call_the_table_does_not_allow_raises_the_protocol_error(phase, call):
    machine = machine_in(phase)
    expected = ", ".join(TRANSITIONS[phase]) or "no call: the pull has ended"
    with pytest.raises(PullProtocolError) as info:
        CALLS[call](machine)
    assert str(info.value) == f"{call} is not expected in phase {phase.value} (expected: {expected})"
    assert machine.phase is phase  # nothing moved


def test_the_protocol_error_is_a_fireap_error():
    assert issubclass(PullProtocolError, FireapError)


def test_an_answer_about_another_node_than_the_one_waited_on_is_refused():
    machine, _first = started()
    with pytest.raises(PullProtocolError, match=r"^on_node\(other\) answers no wait: the pull waits on src$"):
        machine.on_node("other", NodeView(None), 1, T0)
    assert machine.phase is Phase.WAIT_SOURCE


def test_a_move_the_table_does_not_list_raises_the_protocol_error(monkeypatch):
    machine = machine_in(Phase.CLAIM)
    monkeypatch.setitem(TRANSITIONS[Phase.CLAIM], "on_claim", frozenset({Phase.WAIT_SLOTS}))
    with pytest.raises(PullProtocolError, match="^on_claim moved the pull from phase claim to run, which TRANSITIONS"):
        machine.on_claim(ClaimOutcome(slot=1), T0 + 2)


def test_a_machine_that_ended_accepts_nothing():
    result = PullMachine("me", None, PLAN, None, TIMINGS).start(T0)
    assert isinstance(result, PullResult)
    machine, _first = started()
    assert isinstance(machine.on_release(None, T0 + 3), Restart)
    for ended in (machine, machine_in(Phase.FINISHED)):
        assert ended.phase is Phase.FINISHED
        with pytest.raises(PullProtocolError, match="expected: no call: the pull has ended"):
            ended.on_release(RELEASE, T0 + 4)


# --- the claim outcome --------------------------------------------------------------------


@pytest.mark.parametrize(
    "outcome, expected",
    [
        (ClaimOutcome(slot=0, index=40), RunTask("src", 0)),  # slot 0 is a slot taken
        # All busy: block on the slots read, until the release read at T0 is due again.
        (ClaimOutcome(index=41), WaitForSlots("src", 41, 8)),
        (ClaimOutcome(), WaitForSlots("src", 0, 8)),  # all busy, slots not read
        (ClaimOutcome(unusable="no address"), ListNodes("source src is unusable: no address")),
        (ClaimOutcome(refused=True),
         PullResult(None, "the record of node me is held or changed by another worker; did not pull")),
    ],
    ids=["taken", "busy", "busy-unread", "unusable", "refused"],
)
def test_each_claim_outcome_leads_to_its_action(outcome, expected):
    assert claimed().on_claim(outcome, T0 + 2) == expected


def test_a_claim_outcome_has_named_fields_and_defaults_to_all_slots_busy():
    outcome = ClaimOutcome(slot=2, index=7)
    assert (outcome.slot, outcome.index, outcome.unusable, outcome.refused) == (2, 7, None, False)
    assert ClaimOutcome() == ClaimOutcome(slot=None, index=0, unusable=None, refused=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.slot = 3


@pytest.mark.parametrize(
    "fields",
    [{"slot": 0, "refused": True}, {"slot": 1, "unusable": "gone"}, {"unusable": "gone", "refused": True}],
)
def test_a_claim_outcome_is_one_thing_only(fields):
    with pytest.raises(PullProtocolError, match="a claim outcome is one of slot, unusable or refused"):
        ClaimOutcome(**fields)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"watch_timeout": 0}, "watch_timeout must be a number of seconds > 0"),
        ({"max_wait": -1}, "max_wait must be"),
        ({"start_grace": True}, "start_grace must be"),
        ({"fallback_tries": 0}, "fallback_tries must be an integer >= 1"),
        ({"failure_detection": 0}, "failure_detection must be a number of seconds > 0"),
        ({"absent_pause": float("nan")}, "absent_pause must be a number of seconds > 0"),
    ],
)
def test_timings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PullTimings(**kwargs)


def test_the_first_wait_blocks_from_the_release_index():
    machine = PullMachine("me", RELEASE, PLAN_AFTER, None, TIMINGS, release_index=70)
    assert machine.start(T0) == WaitForNode("prev", 70, 10)
    first_stage = PlanEntry(run_id="r2", source="lead", stage=1, slot=0)
    assert isinstance(PullMachine("me", RELEASE, first_stage, None, TIMINGS, release_index=70).start(T0), ClaimSlot)


# --- the canary gate ----------------------------------------------------------------------------


@pytest.mark.parametrize("pause, resumed, stage, held", [
    (1, None, 2, True), (1, None, 1, False), (2, None, 2, False), (1, T0 + 5, 2, False), (None, None, 3, False),
])
def test_the_canary_gate_holds_later_stages_until_resumed_without_writing_or_claiming(pause, resumed, stage, held):
    release = dataclasses.replace(RELEASE, pause_after_stage=pause, resumed_at=resumed)
    plan = PlanEntry(run_id="r2", source="lead", stage=stage, slot=0)
    action = PullMachine("me", release, plan, None, TIMINGS).start(T0)
    if held:
        assert isinstance(action, PullResult) and not action.ran_task and action.state is None
        assert action.reason == f"held by the canary gate of run r2: stage {stage} starts once stage 1 is resumed"
    else:
        assert not isinstance(action, PullResult), action


# --- the swarm's neighbours ---------------------------------------------------------------------

RUN = "0123456789abcdef0123456789abcdef"


def hops_from(graph, start):
    """Each node's distance from ``start`` (breadth first): the nodes it reaches."""
    distance = {start: 0}
    queue = collections.deque([start])
    while queue:
        name = queue.popleft()
        for other in graph[name]:
            if other not in distance:
                distance[other] = distance[name] + 1
                queue.append(other)
    return distance


@pytest.mark.parametrize("count", [1, 2, 5, 9, 10, 17, 82, 100, 1000])
def test_swarm_neighbours_are_bounded_mutual_and_connected_with_the_leader_near(count):
    names = [f"node-{index:04d}" for index in range(count)]
    graph = swarm_neighbours(names[1:], names[0], RUN)
    assert sorted(graph) == names
    assert all(len(near) <= 8 and name not in near and len(set(near)) == len(near) for name, near in graph.items())
    assert all(name in graph[other] for name, near in graph.items() for other in near)
    distance = hops_from(graph, names[0])
    assert len(distance) == count
    step = next(step for step in range(2, 100) if step ** 4 >= count)
    assert max(distance.values()) <= (1 if count <= 9 else 2 * step)
    if count <= 9:
        assert all(len(near) == count - 1 for near in graph.values())
    else:
        assert len(graph[names[0]]) >= 4


def test_swarm_neighbours_change_with_the_run_and_only_with_it():
    names = [f"node-{index:03d}" for index in range(40)]
    first = swarm_neighbours(names, names[0], RUN)
    assert swarm_neighbours(list(reversed(names)), names[0], RUN) == first
    assert swarm_neighbours(names, names[0], "f" * 32) != first
    with pytest.raises(ValueError, match="run id"):
        swarm_neighbours(names, names[0], "../x")
