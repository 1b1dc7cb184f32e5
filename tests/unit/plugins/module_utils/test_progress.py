"""_progress without Consul: the outcome text, the failure budget, the one wait loop, and wait()
over recorded KV answers (a fake client serving real records)."""

from __future__ import annotations

import pytest
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.fake_time import EPOCH, FakeTime
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.release_info import (
    finished_release,
    info_of,
    no_release,
    row,
    running_release,
)

from ansible_collections.fireap.consul.plugins.module_utils import _progress
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    LockRecord,
    NodeState,
    ReleaseArtifact,
    ReleaseRecord,
    Schema,
)
from ansible_collections.fireap.consul.plugins.module_utils._progress import (
    MAX_NAMED,
    PrefixChanges,
    InvalidValue,
    ReleaseError,
    ReleaseWaitTimeout,
    follow_run,
    outcome_problem,
    over_failure_budget,
    run_over,
    wait,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release

RUN = "0f3c" * 8


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> FakeTime:
    """Time as the wait loop sees it: it moves only when something sleeps."""
    fake = FakeTime()
    monkeypatch.setattr(_progress, "time", fake)
    return fake


def reader(states: list[dict]):
    """read() answering ``states`` in turn."""
    pending = list(states)
    return lambda: pending.pop(0)


def aborted_release() -> dict:
    return info_of(running_release()["nodes"], aborted_reason="bad build")


def many_failed() -> dict:
    rows = [row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None)]
    rows += [row(f"node-{i:03d}", "failed", started=0.0, finished=1.0, error=f"exit status {i}") for i in range(1, 13)]
    rows += [row(f"node-{i:03d}", "pending", this_run=False) for i in range(13, 26)]
    return info_of(rows)


# --- the outcome text ---------------------------------------------------------------------------


def test_a_run_that_succeeded_has_no_problem():
    assert outcome_problem(info_of(finished_release()["nodes"][:4])) is None


def test_failures_are_named_with_their_errors():
    problem = outcome_problem(finished_release())
    assert problem.splitlines() == [
        f"run {RUN} of app 'web' (version 1.4.3) finished with failures: "
        "6 done, 1 failed, 0 pulling, 0 waiting, 0 pending of 7 targets",
        "failed (1):",
        '  node-004: exit status 3: <script>alert("x")</script> & more',
        "second line",
    ]


def test_a_timeout_names_the_unfinished_targets():
    problem = outcome_problem(running_release(), 600)
    assert problem.splitlines() == [
        f"run {RUN} of app 'web' (version 1.4.3) did not finish within 600s: "
        "3 done, 0 failed, 1 pulling, 0 waiting, 1 pending of 5 targets",
        "unfinished (2): node-002 (pulling), node-003 (pending)",
    ]


def test_an_abort_says_why():
    assert outcome_problem(aborted_release()).startswith(
        f"run {RUN} of app 'web' (version 1.4.3) was aborted: bad build: 3 done, 0 failed"
    )
    unexplained = info_of(running_release()["nodes"], status="aborted")
    assert "(version 1.4.3) was aborted: no reason given: " in outcome_problem(unexplained)


def test_long_lists_are_cut_and_counted():
    lines = outcome_problem(many_failed(), 30).splitlines()
    assert lines[1] == "failed (12):"
    assert lines[2:2 + MAX_NAMED] == [f"  node-{i:03d}: exit status {i}" for i in range(1, 1 + MAX_NAMED)]
    assert lines[2 + MAX_NAMED] == "  ... and 2 more"
    assert lines[-1].startswith("unfinished (13): node-013 (pending), ") and lines[-1].endswith(" and 3 more")


# --- the failure budget -----------------------------------------------------------------------


def test_the_failure_budget_names_the_share_that_failed():
    progress = finished_release()  # 1 failed of 7: 14.3%
    assert over_failure_budget(progress, None) is None
    assert over_failure_budget(progress, 14.3) is None
    assert over_failure_budget(progress, 10) == "1 of 7 targets failed (14.3%), more than max_fail_percentage 10%"
    assert over_failure_budget(progress, 0).endswith("more than max_fail_percentage 0%")
    assert over_failure_budget(no_release(), 0) is None


# --- the wait loop ------------------------------------------------------------------------------


def test_a_pinned_run_is_followed_until_it_is_over():
    blocks = []
    read = reader([running_release(), running_release(), finished_release()])
    snapshots = list(follow_run(read, blocks.append, RUN, poll=5.0))
    assert [snapshot.info["status"] for snapshot in snapshots] == ["running", "running", "finished"]
    assert blocks == [0.0, 5.0, 5.0], "the first read comes at once, then at most poll seconds apart"
    assert not any(snapshot.timed_out for snapshot in snapshots)
    assert run_over(snapshots[-1].info)


def test_without_a_run_id_the_current_run_is_pinned():
    replaced = info_of(running_release()["nodes"], run_id="1" * 32, version="1.4.4")
    with pytest.raises(ReleaseError, match=f"stopped waiting for run {RUN} of app 'web': run 1{{32}} "
                                           r"\(version 1.4.4\) replaced it"):
        list(follow_run(reader([running_release(), replaced]), lambda _seconds: None))
    with pytest.raises(ReleaseError, match="app 'web' has no release to wait for: fire one first"):
        list(follow_run(reader([no_release()]), lambda _seconds: None))
    with pytest.raises(ReleaseError, match=f"stopped waiting for run {RUN} .*: no release is recorded any more"):
        list(follow_run(reader([running_release(), no_release()]), lambda _seconds: None, RUN))


def test_an_aborted_run_is_over():
    snapshots = list(follow_run(reader([running_release(), aborted_release()]), lambda _seconds: None, RUN))
    assert len(snapshots) == 2 and snapshots[-1].info["status"] == "aborted"


def test_the_timeout_ends_the_wait_with_a_timed_out_snapshot(clock):
    def read():
        clock.now += 1.0  # a read takes a second
        return running_release()

    blocks = []

    def block(seconds):
        blocks.append(seconds)
        clock.sleep(seconds)

    snapshots = list(follow_run(read, block, RUN, timeout=10.0, poll=4.0))
    assert [snapshot.timed_out for snapshot in snapshots] == [False, False, True]
    assert [snapshot.elapsed for snapshot in snapshots] == [1.0, 6.0, 11.0]
    assert blocks == [0.0, 4.0, 4.0], "never past the deadline: min(poll, time left)"


def test_a_run_over_at_the_deadline_has_not_timed_out():
    (snapshot,) = follow_run(reader([finished_release()]), lambda _seconds: None, RUN, timeout=0)
    assert not snapshot.timed_out


def test_reads_are_at_least_the_minimum_interval_apart(clock):
    list(follow_run(reader([running_release()] * 3 + [finished_release()]), lambda _seconds: None, RUN))
    assert clock.sleeps == [_progress.MIN_POLL_INTERVAL] * 3, "a block that returns at once does not speed reads up"


def test_unpinned_it_follows_whatever_run_is_current_and_goes_on_after_it():
    other = info_of(running_release()["nodes"], run_id="1" * 32)
    states = [no_release(), running_release(), finished_release(), other]
    snapshots = zip(states, follow_run(reader(states), lambda _seconds: None, pin=False))
    assert [snapshot.info["run_id"] for _state, snapshot in snapshots] == [None, RUN, RUN, "1" * 32]


class FakeKV:
    """Consul's KV over a dict of key -> (value, session); each blocking read applies the next change."""

    def __init__(self, entries: dict, changes=()) -> None:
        self.entries = dict(entries)
        self.changes = list(changes)
        self.index = 10
        self.listings: list[dict] = []

    def _entry(self, key: str) -> dict:
        value, session = self.entries[key]
        return {"Key": key, "Value": value.encode(), "Session": session, "ModifyIndex": self.index}

    def get(self, key, recurse=False, keys=False, separator=None, index=None, wait=None, consistency=None):
        del consistency
        if keys:
            self.listings.append({"separator": separator, "index": index, "wait": wait})
            if index and self.changes:
                self.changes.pop(0)(self.entries)
                self.index += 1
            return self.index, sorted({name[len(key):].split("/")[0] for name in self.entries if name.startswith(key)})
        if recurse:
            return self.index, [self._entry(name) for name in sorted(self.entries) if name.startswith(key)] or None
        return self.index, self._entry(key) if key in self.entries else None


class FakeClient:
    def __init__(self, kv: FakeKV) -> None:
        self.kv = kv


def recorded_run(schema: Schema, nodes: list[str]) -> dict:
    """A run of app web to ``nodes`` (the first leads), as KV holds it right after the fire."""
    release = ReleaseRecord(app="web", version="2", run_id="run-1", fanout=2, leader=nodes[0], target_count=len(nodes),
                            fired_at=EPOCH)
    entries = {schema.release("web"): (release.to_json(), None)}
    for name, entry in plan_release(nodes, nodes[0], 2, "run-1").items():
        entries[schema.plan("web", "run-1", name)] = (entry.to_json(), None)
    leader = NodeState(version="2", run_id="run-1", status="done", started=EPOCH, finished=EPOCH, depth=0)
    entries[schema.node("web", nodes[0])] = (leader.to_json(), None)
    return entries


def finishes(schema: Schema, name: str, status: str = "done"):
    """A change: ``name`` records ``status`` for run-1."""
    state = NodeState(version="2", run_id="run-1", status=status, started=EPOCH + 1, finished=EPOCH + 2, source="n0",
                      depth=1, error="boom" if status == "failed" else None)
    return lambda entries: entries.__setitem__(schema.node("web", name), (state.to_json(), None))


def test_wait_reads_recorded_kv_and_blocks_on_the_app_prefix():
    schema = Schema("fireap/")
    kv = FakeKV(recorded_run(schema, ["n0", "n1", "n2"]), [finishes(schema, "n1"), finishes(schema, "n2")])
    seen = []
    final = wait(FakeClient(kv), schema, "web", "run-1", timeout=60, poll=3.0, on_progress=seen.append)
    assert [progress["counts"]["done"] for progress in seen] == [1, 2, 3]
    assert final is seen[-1] and final["succeeded"] and final["status"] == "finished"
    assert kv.listings[0] == {"separator": "/", "index": None, "wait": None}, "the first listing does not block"
    assert kv.listings[1:] == [
        {"separator": "/", "index": 10, "wait": "3000ms"},
        {"separator": "/", "index": 11, "wait": "3000ms"},
    ]


def test_wait_times_out_with_the_outcome_text_and_the_last_progress():
    schema = Schema("fireap/")
    entries = recorded_run(schema, ["n0", "n1", "n2"])
    finishes(schema, "n1", "failed")(entries)
    with pytest.raises(ReleaseWaitTimeout) as timeout:
        wait(FakeClient(FakeKV(entries)), schema, "web", "run-1", timeout=0)
    assert str(timeout.value).splitlines() == [
        "run run-1 of app 'web' (version 2) did not finish within 0s: "
        "1 done, 1 failed, 0 pulling, 0 waiting, 1 pending of 3 targets",
        "failed (1):",
        "  n1: boom",
        "unfinished (1): n2 (pending)",
    ]
    assert timeout.value.info["counts"]["pending"] == 1 and isinstance(timeout.value, FireapError)


def test_wait_refuses_bad_numbers():
    for kwargs, message in (({"timeout": -1}, "timeout must be a number of seconds >= 0, got -1"),
                            ({"timeout": 1, "poll": 0}, "poll must be a number of seconds > 0, got 0")):
        with pytest.raises(InvalidValue, match=message):
            wait(FakeClient(FakeKV({})), Schema(), "web", "run-1", **kwargs)
    assert issubclass(InvalidValue, ValueError) and issubclass(ReleaseError, FireapError)


def test_prefix_changes_block_from_the_last_index_and_restart_when_it_goes_back():
    class Listing:
        def __init__(self, indexes):
            self.indexes, self.calls = list(indexes), []

        def get(self, key, **kwargs):
            self.calls.append((key, kwargs))
            return self.indexes.pop(0), []

    kv = Listing([7, 9, 4, 5])
    changes = PrefixChanges(FakeClient(kv), "fireap/web/")
    for seconds in (0, 2.5, 2.5, 2.5):
        changes(seconds)
    assert [kwargs for _key, kwargs in kv.calls] == [
        {"keys": True, "separator": "/"},
        {"keys": True, "separator": "/", "index": 7, "wait": "2500ms"},
        {"keys": True, "separator": "/", "index": 9, "wait": "2500ms"},
        {"keys": True, "separator": "/"},
    ]


# --- info's keys and times ------------------------------------------------------------------


def recorded_info(schema: Schema) -> dict:
    """info() of a run of three nodes in which n1 has finished and the fire lock is held."""
    entries = recorded_run(schema, ["n0", "n1", "n2"])
    finishes(schema, "n1")(entries)
    lock = LockRecord(run_id="run-1", holder="n0", since=EPOCH + 0.25)
    entries[schema.lock("web")] = (lock.to_json(), "session-1")
    return _progress.info(FakeClient(FakeKV(entries)), schema, "web")


def test_iso_utc_shows_an_epoch_time_as_iso_8601_in_utc():
    assert _progress.iso_utc(EPOCH + 1.2345) == "2023-11-14T22:13:21.234Z"
    assert _progress.iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert _progress.iso_utc(None) is None


def test_info_gives_every_time_as_epoch_seconds_and_as_iso_8601_utc():
    result = recorded_info(Schema("fireap/"))
    assert result["release"]["fired_at"] == EPOCH and result["release"]["fired_at_iso"] == "2023-11-14T22:13:20.000Z"
    assert result["timings"] == {
        "fired_at": EPOCH, "fired_at_iso": "2023-11-14T22:13:20.000Z",
        "first_finished": EPOCH + 2, "first_finished_iso": "2023-11-14T22:13:22.000Z",
        "last_finished": EPOCH + 2, "last_finished_iso": "2023-11-14T22:13:22.000Z",
        "elapsed": 0.0,
    }
    rows = {row["node"]: row for row in result["nodes"]}
    assert (rows["n1"]["started_iso"], rows["n1"]["finished_iso"]) == ("2023-11-14T22:13:21.000Z",
                                                                       "2023-11-14T22:13:22.000Z")
    assert (rows["n2"]["started"], rows["n2"]["started_iso"], rows["n2"]["finished_iso"]) == (None, None, None)
    assert (result["lock"]["since"], result["lock"]["since_iso"]) == (EPOCH + 0.25, "2023-11-14T22:13:20.250Z")
    assert list(rows["n1"])[8:12] == ["started", "started_iso", "finished", "finished_iso"], "each next to its epoch"


def test_info_says_whether_every_target_finished_as_all_finished_not_as_finished():
    """``finished`` is the key Ansible's async_status sets on an async task's result."""
    result = recorded_info(Schema("fireap/"))
    assert "finished" not in result and result["all_finished"] is False and result["status"] == "running"
    assert "finished" not in no_release() and run_over(info_of(finished_release()["nodes"]))


def _keys(progress: dict) -> list[set]:
    """The keys of an info(): its own, its release record's, its timings' and its node rows'."""
    rows = [set(row) for row in progress["nodes"][:1]]
    return [set(progress), set(progress["release"] or ()), set(progress["timings"]), *rows]


def test_the_tests_release_states_have_the_keys_of_info():
    """release_info's states stand in for info() in the rendering, outcome and wait tests."""
    schema = Schema("fireap/")
    assert _keys(finished_release()) == _keys(recorded_info(schema))
    assert _keys(no_release()) == _keys(_progress.info(FakeClient(FakeKV({})), schema, "web"))


def gated_run(schema: Schema, nodes: list[str], resumed_at=None) -> dict:
    """recorded_run with a canary gate after stage 1 (fan-out 2: two canaries)."""
    entries = recorded_run(schema, nodes)
    release = ReleaseRecord.from_json(entries[schema.release("web")][0])
    gated = ReleaseRecord(**{**release.to_dict(), "filters": release.filters, "pause_after_stage": 1,
                             "resumed_at": resumed_at})
    entries[schema.release("web")] = (gated.to_json(), None)
    return entries


def test_a_gated_run_is_running_until_its_canaries_are_over_then_paused_and_over_for_the_wait():
    schema = Schema("fireap/")
    nodes = ["n0", "n1", "n2", "n3", "n4"]
    kv = FakeKV(gated_run(schema, nodes))
    running = _progress.info(FakeClient(kv), schema, "web")
    assert (running["status"], running["canaries"]) == ("running", ["n1", "n2"])
    for name in ("n1", "n2"):
        finishes(schema, name)(kv.entries)
    paused = _progress.info(FakeClient(kv), schema, "web")
    assert (paused["status"], paused["all_finished"], paused["counts"]["pending"]) == ("paused", False, 2)
    assert _progress.run_over(paused) and _progress.outcome_problem(paused) is None
    resumed = _progress.info(FakeClient(FakeKV({**kv.entries, **gated_run(schema, nodes, EPOCH + 9)})), schema, "web")
    assert resumed["status"] == "running" and not _progress.run_over(resumed)


def test_a_paused_run_with_a_failed_canary_is_a_problem():
    schema = Schema("fireap/")
    kv = FakeKV(gated_run(schema, ["n0", "n1", "n2", "n3"]))
    finishes(schema, "n1")(kv.entries)
    finishes(schema, "n2", "failed")(kv.entries)
    paused = _progress.info(FakeClient(kv), schema, "web")
    assert paused["status"] == "paused"
    assert _progress.outcome_problem(paused).startswith(
        "run run-1 of app 'web' (version 2) is paused at its canary gate with failed canaries: 2 done, 1 failed")


def test_info_shows_a_nodes_download_of_the_artifact_apart_from_its_commands():
    schema = Schema("fireap/")
    entries = recorded_run(schema, ["n0", "n1", "n2"])
    release = ReleaseRecord(app="web", version="2", run_id="run-1", fanout=2, leader="n0", target_count=3,
                            fired_at=EPOCH, checksum="sha256:" + "0" * 64,
                            artifact=ReleaseArtifact(name="web-2.tar.gz", length=4000, info_hash="0" * 40))
    entries[schema.release("web")] = (release.to_json(), None)
    pulling = NodeState(version="2", run_id="run-1", status="pulling", started=EPOCH + 1, source="n0", depth=1,
                        downloaded=1000, rate=250)
    done = NodeState(version="2", run_id="run-1", status="done", started=EPOCH + 1, finished=EPOCH + 5, source="n0",
                     depth=1, fetched=EPOCH + 4)
    entries[schema.node("web", "n1")] = (pulling.to_json(), "session-1")
    entries[schema.node("web", "n2")] = (done.to_json(), None)
    rows = {row["node"]: row for row in _progress.info(FakeClient(FakeKV(entries)), schema, "web")["nodes"]}
    assert {key: rows["n1"][key] for key in ("downloaded", "download_percent", "rate", "fetched", "download_seconds")} \
        == {"downloaded": 1000, "download_percent": 25.0, "rate": 250, "fetched": None, "download_seconds": None}
    assert {key: rows["n2"][key] for key in ("downloaded", "download_percent", "rate", "fetched", "download_seconds")} \
        == {"downloaded": 4000, "download_percent": 100.0, "rate": None, "fetched": EPOCH + 4, "download_seconds": 3.0}
    assert rows["n2"]["fetched_iso"] == "2023-11-14T22:13:24.000Z"
    assert rows["n0"]["download_percent"] is None and rows["n0"]["download_seconds"] is None
