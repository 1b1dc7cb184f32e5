# SPDX-License-Identifier: MIT
"""A release run's progress: what fireap_info reports, the one wait loop, the failure budget, the outcome text.

Controller side (fireap_info, fireap_wait, fireap_fire with wait, fireap-monitor): a read
takes O(N) keys, which nodes never do. Plain logic over a py-consul client; py-consul and
requests exceptions are left to the caller, which wraps the call in
``_connection.consul_errors`` so that messages name the agent and never show the token.

``follow_run`` is the only loop that waits for a run: ``wait`` (fireap_fire), the
fireap_wait action plugin and fireap-monitor drive it, each with its own way to read the
progress and to wait for a change.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Callable, Iterator

from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError, InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_DONE,
    NODE_FAILED,
    NODE_PULLING,
    NODE_TERMINAL_STATUSES,
    NODE_WAITING,
    OUTCOME_ABORTED,
    OUTCOME_FAILED,
    OUTCOME_RUNNING,
    OUTCOME_SUCCEEDED,
    RELEASE_ABORTED,
    RELEASE_RUNNING,
    History,
    KVRecordError,
    LockRecord,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    RunSummary,
    Schema,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import schedule_order, stage_count
from ansible_collections.fireap.consul.plugins.module_utils._validation import check_name

#: Counted statuses of a target in info(): a node's own status, or "pending" when it has
#: no live record for the run (the event has not reached it, its worker has not started,
#: or its worker died before finishing).
PENDING = "pending"
TARGET_STATUSES = (NODE_DONE, NODE_PULLING, NODE_WAITING, NODE_FAILED, PENDING)
#: The order in which progress lines, outcome texts, the monitor and the report show the counts.
COUNT_ORDER = (NODE_DONE, NODE_FAILED, NODE_PULLING, NODE_WAITING, PENDING)

#: What info() reports as the release's status besides the record's own running/aborted.
STATUS_FINISHED = "finished"
#: A run whose canary gate holds its later stages once every canary (stages 1..N) is over.
STATUS_PAUSED = "paused"
STATUS_NONE = "none"

#: info()'s key for "every target is done or failed". Not ``finished``: Ansible's async_status
#: sets that key of an async task's result to whether the job ended.
ALL_FINISHED = "all_finished"

#: follow_run() never reads the progress more often than this, however fast nodes finish.
MIN_POLL_INTERVAL = 0.5

#: Failed or unfinished targets an outcome text names; the rest are counted.
MAX_NAMED = 10


class ReleaseError(FireapError):
    """A release operation is refused or cannot complete; the message says why and what to do."""


class ReleaseWaitTimeout(ReleaseError):
    """wait() gave up before the run was over; ``info`` is the last progress read."""

    def __init__(self, message: str, info: dict) -> None:
        super().__init__(message)
        self.info = info


# --- KV reads -----------------------------------------------------------------------------


def _read(client, key: str) -> dict | None:
    """``client.kv.get`` with a consistent read: lock and release decisions must not be stale."""
    return client.kv.get(key, consistency="consistent")[1]


def read_release(client, schema: Schema, app: str) -> tuple[dict | None, ReleaseRecord | None]:
    """The release key's entry and record (both None when absent); ReleaseError when malformed."""
    key = schema.release(app)
    entry = _read(client, key)
    if entry is None:
        return None, None
    try:
        return entry, ReleaseRecord.from_json(entry.get("Value"), key)
    except KVRecordError as err:
        raise ReleaseError(f"{err}; remove the app's state with fireap_clear wipe=true, then fire again") from None


def read_lock(client, schema: Schema, app: str) -> tuple[dict | None, LockRecord | None]:
    """The lock key's entry and record; the record is None when absent or unreadable."""
    key = schema.lock(app)
    entry = _read(client, key)
    if entry is None or entry.get("Value") is None:
        return entry, None
    try:
        return entry, LockRecord.from_json(entry["Value"], key)
    except KVRecordError:
        return entry, None


def lock_info(entry: dict | None, record: LockRecord | None) -> dict | None:
    """The lock as results show it: held, session, run_id, holder, since; None without a lock key."""
    if entry is None:
        return None
    lock = {"held": bool(entry.get("Session")), "session": entry.get("Session") or None}
    lock.update(record.to_dict() if record else {"run_id": None, "holder": None, "since": None})
    return lock


def read_history(client, schema: Schema, app: str, warnings: list[str]) -> tuple[dict | None, History]:
    """The history key's entry and record; an unreadable one counts as empty (with a warning),
    so that a damaged history never blocks a release: the next fire writes it afresh."""
    key = schema.history(app)
    entry = _read(client, key)
    if entry is None or entry.get("Value") is None:
        return entry, History()
    try:
        return entry, History.from_json(entry["Value"], key)
    except KVRecordError as err:
        warnings.append(f"ignored {err}; the next fire starts the history afresh")
        return entry, History()


def run_outcome(progress: dict) -> str:
    """The outcome of the run ``progress`` (an info() result) shows, as the history records it."""
    if progress["status"] == RELEASE_ABORTED:
        return OUTCOME_ABORTED
    if not progress[ALL_FINISHED]:
        return OUTCOME_RUNNING
    return OUTCOME_FAILED if progress["counts"][NODE_FAILED] else OUTCOME_SUCCEEDED


def summarise(entry: RunSummary, progress: dict) -> RunSummary:
    """``entry`` (the history's line for the run ``progress`` shows) with the run's outcome,
    counts and end as they are now."""
    release = progress["release"]
    return RunSummary(
        run_id=entry.run_id, version=entry.version, kind=entry.kind, fired_by=entry.fired_by,
        fired_at=entry.fired_at, target_count=entry.target_count, outcome=run_outcome(progress),
        done=progress["counts"][NODE_DONE], failed=progress["counts"][NODE_FAILED],
        finished_at=progress["timings"]["last_finished"] if progress[ALL_FINISHED] else None,
        abort_reason=release.get("aborted_reason") if release else None, retry_of=entry.retry_of,
        checksum=entry.checksum,
    )


def history_rows(history: History, progress: dict) -> list[dict]:
    """The history as results show it, newest first; the current run's line as it is now."""
    rows = []
    for entry in history.runs:
        if entry.run_id == progress["run_id"]:
            entry = summarise(entry, progress)
        rows.append(_with_iso(entry.to_dict(), "fired_at", "finished_at"))
    return rows


def last_good_run(rows: list[dict], current_version: str | None) -> dict | None:
    """The newest run that reached every target (history_rows order) at a version other than
    ``current_version``: what a rollback releases again, with its checksum."""
    for row in rows:
        if row["outcome"] == OUTCOME_SUCCEEDED and row["version"] != current_version:
            return row
    return None


def _read_tree(client, schema: Schema, app: str, prefix: str, cls, warnings: list[str]) -> tuple[dict, set[str]]:
    """Every record under ``prefix`` by node name (malformed ones are skipped with a warning),
    and the names of those whose key a session holds."""
    _index, entries = client.kv.get(prefix, recurse=True, consistency="consistent")
    records, held = {}, set()
    for entry in entries or ():
        key = entry["Key"]
        try:
            name = schema.node_name(app, key)
            records[name] = cls.from_json(entry.get("Value"), key)
        except (KVRecordError, ValueError) as err:
            warnings.append(f"ignored {err}")
            continue
        if entry.get("Session"):
            held.add(name)
    return records, held


def read_run(
    client, schema: Schema, app: str, release: ReleaseRecord, warnings: list[str]
) -> tuple[list[str], dict[str, PlanEntry], dict[str, NodeState]]:
    """(targets in schedule order, plan by node, live states by node) of ``release``'s run.

    A worker holds its unfinished record of the run with its session; a record no longer
    held belongs to a worker that died (kill -9, its node lost) and will not finish unless
    the node is woken again, so it is left out: the node counts as pending, and
    retry_stragglers fires to it.
    """
    plans, _held = _read_tree(client, schema, app, schema.plan_prefix(app, release.run_id), PlanEntry, warnings)
    states, held = _read_tree(client, schema, app, schema.nodes_prefix(app), NodeState, warnings)
    states = {name: state for name, state in states.items() if not state.crashed(release.run_id, name in held)}
    plans = {name: plan for name, plan in plans.items() if plan.run_id == release.run_id and name != release.leader}
    targets = schedule_order(list(plans), release.leader)
    if len(targets) != release.target_count:
        warnings.append(
            f"the release record counts {release.target_count} targets but {len(targets)} have a plan entry "
            f"for run {release.run_id} (the leader included)"
        )
    return targets, plans, states


def target_status(state: NodeState | None, release: ReleaseRecord) -> str:
    """A target's counted status: done at the version (in any run), its status in this run, else pending."""
    if state is not None and state.has(release.version):
        return NODE_DONE
    if state is not None and state.run_id == release.run_id:
        return state.status
    return PENDING


# --- info -----------------------------------------------------------------------------------

#: The times of a node row and of ``timings``, given as epoch seconds and, under ``<key>_iso``, as
#: ISO 8601 in UTC: the epoch for arithmetic, the ISO text for people and date parsers.
ROW_TIMES = ("started", "finished", "fetched")
TIMING_TIMES = ("fired_at", "first_finished", "last_finished")


def iso_utc(epoch: float | None) -> str | None:
    """``epoch`` as ISO 8601 in UTC with milliseconds (``2026-11-26T16:30:01.250Z``); None for None.
    Times come from records whose readers bound them (``check_time``)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _with_iso(values: dict, *keys: str) -> dict:
    """``values`` with ``<key>_iso`` (iso_utc) right after each of ``keys``."""
    shown = {}
    for key, value in values.items():
        shown[key] = value
        if key in keys:
            shown[f"{key}_iso"] = iso_utc(value)
    return shown


def _empty_info(app: str, lock: dict | None, warnings: list[str]) -> dict:
    return {
        "app": app,
        "exists": False,
        "release": None,
        "run_id": None,
        "version": None,
        "status": STATUS_NONE,
        ALL_FINISHED: False,
        "succeeded": False,
        "counts": {status: 0 for status in TARGET_STATUSES},
        "total": 0,
        "percent": 0.0,
        "failed_nodes": [],
        "nodes": [],
        "tree": {},
        "max_depth": 0,
        "stages_planned": 0,
        "ideal_stages": 0,
        "timings": _with_iso({"fired_at": None, "first_finished": None, "last_finished": None, "elapsed": None},
                             *TIMING_TIMES),
        "lock": lock,
        "warnings": warnings,
        "canaries": [],
    }


def _node_row(name: str, release: ReleaseRecord, plan: PlanEntry | None, state: NodeState | None) -> dict:
    status = target_status(state, release)
    this_run = state is not None and state.run_id == release.run_id
    shown = state if state is not None and (this_run or status == NODE_DONE) else None
    duration = None
    if shown is not None and shown.finished is not None:
        duration = max(0.0, shown.finished - shown.started)
    return _with_iso({
        "node": name,
        "status": status,
        "this_run": this_run,
        "planned_source": plan.source if plan else None,
        "stage": plan.stage if plan else 0,
        "slot": plan.slot if plan else None,
        "source": shown.source if shown else None,
        "depth": shown.depth if shown else None,
        "started": shown.started if shown else None,
        "finished": shown.finished if shown else None,
        "duration": duration,
        "error": shown.error if shown else None,
        **_download(release, shown if this_run else None),
    }, *ROW_TIMES)


def _download(release: ReleaseRecord, state: NodeState | None) -> dict:
    """How far a node of this run got with the release's artifact: ``downloaded`` (bytes) and
    ``rate`` (bytes/s) as its record last gave them, ``download_percent`` of the file,
    ``fetched`` (when the download ended) and ``download_seconds`` (from the worker's start)."""
    downloaded = None if state is None else state.downloaded
    fetched = None if state is None else state.fetched
    if fetched is not None and release.artifact is not None:
        downloaded = release.artifact.length
    percent = None
    if downloaded is not None and release.artifact is not None:
        percent = round(100.0 * min(downloaded, release.artifact.length) / release.artifact.length, 1)
    return {
        "downloaded": downloaded,
        "download_percent": percent,
        "rate": None if state is None or fetched is not None else state.rate,
        "fetched": fetched,
        "download_seconds": None if fetched is None or state is None else max(0.0, fetched - state.started),
    }


def _build_info(app: str, release: ReleaseRecord, targets, plans, states, lock, warnings, now: float) -> dict:
    rows = [_node_row(name, release, plans.get(name), states.get(name)) for name in targets]
    counts = {status: 0 for status in TARGET_STATUSES}
    for row in rows:
        counts[row["status"]] += 1
    total = len(rows)
    finished = counts[PENDING] == counts[NODE_WAITING] == counts[NODE_PULLING] == 0
    tree: dict[str, list[str]] = {}
    for row in rows:
        if row["this_run"] and row["source"]:
            tree.setdefault(row["source"], []).append(row["node"])
    depths = [row["depth"] for row in rows if row["this_run"] and row["depth"] is not None]
    ends = [
        row["finished"] for row in rows
        if row["this_run"] and row["finished"] is not None and row["node"] != release.leader
    ]
    last = max(ends) if ends else None
    if finished:
        elapsed = max(0.0, (last if last is not None else release.fired_at) - release.fired_at)
    else:
        elapsed = max(0.0, now - release.fired_at)
    canaries = [row["node"] for row in rows if release.pause_after_stage is not None
                and 1 <= row["stage"] <= release.pause_after_stage]
    if release.aborted:
        status = RELEASE_ABORTED
    elif finished:
        status = STATUS_FINISHED
    elif release.paused and all(row["status"] in NODE_TERMINAL_STATUSES for row in rows
                                if row["node"] in canaries):
        status = STATUS_PAUSED
    else:
        status = RELEASE_RUNNING
    return {
        "app": app,
        "exists": True,
        "release": _with_iso(release.to_dict(), "fired_at"),
        "run_id": release.run_id,
        "version": release.version,
        "status": status,
        ALL_FINISHED: finished,
        "succeeded": finished and counts[NODE_FAILED] == 0,
        "counts": counts,
        "total": total,
        "percent": round(100.0 * (counts[NODE_DONE] + counts[NODE_FAILED]) / total, 1) if total else 0.0,
        "failed_nodes": [
            {"node": row["node"], "source": row["source"], "error": row["error"]}
            for row in rows if row["status"] == NODE_FAILED
        ],
        "nodes": rows,
        "tree": tree,
        "max_depth": max(depths) if depths else 0,
        "stages_planned": max((plan.stage for plan in plans.values()), default=0),
        "ideal_stages": stage_count(total, release.fanout) if total else 0,
        "timings": _with_iso({
            "fired_at": release.fired_at,
            "first_finished": min(ends) if ends else None,
            "last_finished": last,
            "elapsed": round(elapsed, 3),
        }, *TIMING_TIMES),
        "lock": lock,
        "warnings": warnings,
        "canaries": canaries,
    }


def info(client, schema: Schema, app: str) -> dict:
    """The state of ``app``'s current run, read from KV (O(N) reads: controller only).

    Returns ``exists`` (a release record is present), ``release`` (the record), ``run_id``,
    ``version``, ``status`` (running / paused / finished / aborted / none), ``all_finished`` (every target
    done or failed), ``succeeded`` (finished without failures), ``counts`` per status
    (done, pulling, waiting, failed, pending = no live record for this run: not started yet,
    or its worker died before finishing), ``total``,
    ``percent`` (share of targets finished), ``failed_nodes`` (node, source, error),
    ``canaries`` (the targets of stages 1..N of a run with a canary gate; status ``paused`` once
    they are over and the gate is still closed),
    ``nodes`` (one row per target in schedule order: status, planned and actual source,
    stage, depth, started, finished, duration, error), ``tree`` (source -> children of this
    run), ``max_depth``, ``stages_planned``, ``ideal_stages`` (ceil(log_{k+1} N)),
    ``timings`` (fired_at, first/last finished, elapsed), ``lock`` (held, session, run_id,
    holder, since; None without a lock key), ``history`` (the app's last runs, newest first:
    run_id, version, kind, fired_by, fired_at, target_count, outcome, done, failed,
    finished_at, abort_reason, retry_of; the current run's line as it is now) and
    ``warnings`` (skipped malformed records).
    Each time is epoch seconds, and ISO 8601 UTC under ``<name>_iso`` (release, node rows,
    timings, lock).

    A node already done at the release's version in an earlier run counts as done: its
    worker skips the version (``this_run`` is false in its row).
    """
    check_name(app, "app")
    warnings: list[str] = []
    lock = lock_info(*read_lock(client, schema, app))
    if lock is not None:
        lock = _with_iso(lock, "since")
    _entry, release = read_release(client, schema, app)
    _entry, history = read_history(client, schema, app, warnings)
    if release is None:
        progress = _empty_info(app, lock, warnings)
    else:
        targets, plans, states = read_run(client, schema, app, release, warnings)
        progress = _build_info(app, release, targets, plans, states, lock, warnings, time.time())
    progress["history"] = history_rows(history, progress)
    return progress


def run_over(progress: dict) -> bool:
    """Whether the recorded run will change no more until someone acts: every target finished,
    it was aborted, or its canary gate holds it (until resumed)."""
    return progress["run_id"] is not None and (
        progress[ALL_FINISHED] or progress["status"] in (RELEASE_ABORTED, STATUS_PAUSED))


def counts_text(progress: dict) -> str:
    """``37/100 done, 2 failed, 3 pulling, 0 waiting, 58 pending``, from info()'s counts."""
    counts = progress["counts"]
    parts = [f"{counts.get(NODE_DONE, 0)}/{progress['total']} done"]
    parts += [f"{counts.get(status, 0)} {status}" for status in COUNT_ORDER[1:]]
    return ", ".join(parts)


# --- the failure budget and the outcome ------------------------------------------------------


def over_failure_budget(progress: dict, max_fail_percentage: float | None) -> str | None:
    """Why the run must be aborted: more than ``max_fail_percentage`` percent of all its targets
    failed (the abort reason to record); None while within the budget or without one."""
    failed, total = progress["counts"][NODE_FAILED], progress["total"]
    if max_fail_percentage is None or not total or 100.0 * failed / total <= max_fail_percentage:
        return None
    return (
        f"{failed} of {total} targets failed ({100.0 * failed / total:.1f}%), "
        f"more than max_fail_percentage {max_fail_percentage:g}%"
    )


def outcome_problem(progress: dict, timed_out_after: float | None = None) -> str | None:
    """Why a waited-for run did not succeed, or None: its first line says what happened with
    the counts, then the failed targets with their errors and the unfinished ones.

    ``timed_out_after``: the wait gave up after that many seconds, the run not being over.
    """
    counts = progress["counts"]
    run = f"run {progress['run_id']} of app {progress['app']!r} (version {progress['version']})"
    if timed_out_after is not None:
        head = f"{run} did not finish within {timed_out_after:g}s"
    elif progress["status"] == RELEASE_ABORTED:
        head = f"{run} was aborted: {progress['release']['aborted_reason'] or 'no reason given'}"
    elif progress["status"] == STATUS_PAUSED:
        if not counts[NODE_FAILED]:
            return None
        head = f"{run} is paused at its canary gate with failed canaries"
    elif counts[NODE_FAILED]:
        head = f"{run} finished with failures"
    else:
        return None
    shown_counts = ", ".join(f"{counts[status]} {status}" for status in COUNT_ORDER)
    lines = [f"{head}: {shown_counts} of {progress['total']} targets"]
    failed = progress["failed_nodes"]
    if failed:
        lines.append(f"failed ({len(failed)}):")
        lines += [f"  {row['node']}: {row['error'] or 'no error recorded'}" for row in failed[:MAX_NAMED]]
        if len(failed) > MAX_NAMED:
            lines.append(f"  ... and {len(failed) - MAX_NAMED} more")
    unfinished = [row for row in progress["nodes"] if row["status"] not in NODE_TERMINAL_STATUSES]
    if unfinished:
        shown = ", ".join(f"{row['node']} ({row['status']})" for row in unfinished[:MAX_NAMED])
        more = f" and {len(unfinished) - MAX_NAMED} more" if len(unfinished) > MAX_NAMED else ""
        lines.append(f"unfinished ({len(unfinished)}): {shown}{more}")
    return "\n".join(lines)


# --- the wait loop ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One read of the progress while waiting: ``info``, ``elapsed`` seconds since the wait
    began, and ``timed_out`` (the timeout passed and the run is not over: the last snapshot)."""

    info: dict
    elapsed: float
    timed_out: bool


class PrefixChanges:
    """follow_run's ``block`` on Consul: a blocking read of one KV prefix, which returns once
    something under it changed since the previous call, at the latest after ``seconds``.

    Lists only the prefix's first level (``separator``), whose index still covers every key
    below it. The first call (index 0) returns at once; an index that went backwards (a
    restarted agent) starts again from 0.
    """

    def __init__(self, client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.index = 0

    def __call__(self, seconds: float) -> None:
        kwargs = {"index": self.index, "wait": f"{max(1, round(seconds * 1000))}ms"} if self.index else {}
        index, _keys = self.client.kv.get(self.prefix, keys=True, separator="/", **kwargs)
        index = int(index or 0)
        self.index = index if index >= self.index else 0


def _same_run(progress: dict, run_id: str | None) -> str:
    """The run to follow: ``run_id``, or the current one when None; ReleaseError when there is
    none, or when another run replaced it or the app's state was wiped."""
    current = progress["run_id"]
    if run_id is None:
        if current is None:
            raise ReleaseError(f"app {progress['app']!r} has no release to wait for: fire one first")
        return current
    if current != run_id:
        if current is None:
            now = "no release is recorded any more"
        else:
            now = f"run {current} (version {progress['version']}) replaced it"
        raise ReleaseError(f"stopped waiting for run {run_id} of app {progress['app']!r}: {now}")
    return run_id


def follow_run(
    read: Callable[[], dict],
    block: Callable[[float], None],
    run_id: str | None = None,
    pin: bool = True,
    timeout: float | None = None,
    poll: float = 2.0,
) -> Iterator[Snapshot]:
    """Read a run's progress each time it may have changed, as Snapshots: the one wait loop.

    ``read()`` returns an info(); ``block(seconds)`` returns once the progress may have
    changed, at the latest after ``seconds`` (at most ``poll``): a blocking Consul read
    (PrefixChanges), or a sleep for a caller that cannot block. The first read comes at once;
    reads are at least MIN_POLL_INTERVAL apart.

    ``pin``: the snapshots are of run ``run_id`` (None: the run current at the first read),
    the last one is the first whose run is over, and ReleaseError says when there is no such
    run or another replaced it. Without ``pin`` they follow whatever run is current (waiting
    for a first one) and the caller says when it has seen enough. After ``timeout`` seconds
    (None: never) a snapshot whose run is not over has ``timed_out`` and is the last.
    """
    started = time.monotonic()
    deadline = math.inf if timeout is None else started + timeout
    seconds = 0.0
    last_read = None
    while True:
        block(seconds)
        if last_read is not None:
            pause = min(MIN_POLL_INTERVAL - (time.monotonic() - last_read), deadline - time.monotonic())
            if pause > 0:
                time.sleep(pause)
        last_read = time.monotonic()
        progress = read()
        if pin:
            run_id = _same_run(progress, run_id)
        now = time.monotonic()
        over = run_over(progress)
        snapshot = Snapshot(progress, now - started, now >= deadline and not over)
        yield snapshot
        if snapshot.timed_out or (pin and over):
            return
        seconds = max(0.0, min(poll, deadline - time.monotonic()))


def wait(
    client,
    schema: Schema,
    app: str,
    run_id: str,
    timeout: float,
    poll: float = 2.0,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Wait until run ``run_id`` of ``app`` has finished or was aborted; return its info().

    Blocks on the app's KV prefix for at most ``poll`` s at a time, so a finish or an abort
    is seen at once; ``on_progress(info)`` is called after every read. Raises
    ReleaseWaitTimeout (the outcome text, with the last info) after ``timeout`` s, and
    ReleaseError when the run was replaced by another or the app's state was wiped.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise InvalidValue(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or poll <= 0:
        raise InvalidValue(f"poll must be a number of seconds > 0, got {poll!r}")
    check_name(app, "app")
    snapshots = follow_run(partial(info, client, schema, app), PrefixChanges(client, schema.app_prefix(app)), run_id,
                           timeout=timeout, poll=poll)
    for snapshot in snapshots:
        if on_progress is not None:
            on_progress(snapshot.info)
    if snapshot.timed_out:
        raise ReleaseWaitTimeout(outcome_problem(snapshot.info, timeout), snapshot.info)
    return snapshot.info
