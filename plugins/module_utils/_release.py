"""Controller-side release logic shared by the modules: fire, retry, wait, info and clear.

Plain logic over a py-consul client talking to the leader's agent; no Ansible here (the
modules translate the exceptions into failures). ``ReleaseError`` and ``ValueError``
(which includes ``KVRecordError``) mean bad input or a state that forbids the operation;
py-consul and requests exceptions are left to the caller, which wraps the call in
``_connection.consul_errors`` so that messages name the agent and never show the token.

How one release is started (``fire``):

1. the app's fire lock (``<app>/lock``) is acquired with a session of the leader's agent
   (no TTL, lock-delay 0, bound to the leader's serfHealth): it stays held after the
   module exits and marks the run as in flight. A lock held by a run that has finished
   (every target done or failed) or was aborted is taken over; one held by a run still
   in progress is refused unless ``force``;
2. the targets are resolved from the catalog (node regex, service and tag), the leader
   first; the plan of every target is written in /v1/txn batches, then the leader's own
   state (done, depth 0) and the release record in one last transaction, so a node never
   sees a release record whose plan is not written yet;
3. the user event ``FIREAP:TASK`` carrying ``{"app", "version"}`` is fired with the
   release's filters. The event is only a wake-up: nodes read everything else from KV.

The controller may read O(N) keys (info, wait); nodes never do.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import replace
from typing import Callable

from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_DONE,
    NODE_FAILED,
    NODE_PULLING,
    NODE_TERMINAL_STATUSES,
    NODE_WAITING,
    RELEASE_ABORTED,
    RELEASE_RUNNING,
    TXN_MAX_OPS,
    KVRecordError,
    LockRecord,
    NodeState,
    PlanEntry,
    ReleaseFilters,
    ReleaseRecord,
    Schema,
    txn_set_batches,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    LINE_MAX_LENGTH,
    check_fanout,
    check_name,
    check_text,
    check_version,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import (
    plan_release,
    schedule_order,
    stage_count,
)

#: Name of the user event every node's watch listens for.
EVENT_NAME = "FIREAP:TASK"

#: The event body may not exceed this many bytes: Consul's documented budget for payloads.
PAYLOAD_LIMIT = 100
#: Serf refuses a user event whose encoding (payload and filters included) exceeds this.
EVENT_SIZE_LIMIT = 512
#: Bytes an encoded FIREAP:TASK event takes besides its payload and filters (about 190: the
#: Serf name "consul:event:FIREAP:TASK" twice, msgpack field names, event ID, times), with margin.
EVENT_OVERHEAD = 200

DEFAULT_FANOUT = 5
DEFAULT_ABORT_REASON = "aborted with fireap_clear"

#: Counted statuses of a target in info(): a node's own status, or "pending" when it has
#: no live record for the run (the event has not reached it, its worker has not started,
#: or its worker died before finishing).
PENDING = "pending"
TARGET_STATUSES = (NODE_DONE, NODE_PULLING, NODE_WAITING, NODE_FAILED, PENDING)
#: The order in which progress lines, the monitor and the report show the counts.
COUNT_ORDER = (NODE_DONE, NODE_FAILED, NODE_PULLING, NODE_WAITING, PENDING)

#: What info() reports as the release's status besides the record's own running/aborted.
STATUS_FINISHED = "finished"
STATUS_NONE = "none"

#: wait() never reads the whole app more often than this, however fast nodes finish.
MIN_POLL_INTERVAL = 0.5

_DIGITS = re.compile(r"[0-9]+")

# Constructs Python's re accepts but Consul's Go (RE2) regexes do not; found by _re2_problem.
_GROUP_PROBLEMS = (
    ("?<=", "a lookbehind"),
    ("?<!", "a lookbehind"),
    ("?=", "a lookahead"),
    ("?!", "a lookahead"),
    ("?>", "an atomic group"),
    ("?P=", "a named backreference"),
    ("?(", "a conditional group"),
)


class ReleaseError(Exception):
    """The operation is refused or cannot complete; the message says why and what to do."""


class FireLockHeld(ReleaseError):
    """The app's fire lock is held by a run that is still in progress (``lock``: LockRecord)."""

    def __init__(self, message: str, lock: LockRecord | None) -> None:
        super().__init__(message)
        self.lock = lock


class ReleaseWaitTimeout(ReleaseError):
    """wait() gave up before the run finished; ``info`` is the last progress read."""

    def __init__(self, message: str, info: dict) -> None:
        super().__init__(message)
        self.info = info


# --- input checks -----------------------------------------------------------------------


def next_version(previous: str | None) -> str:
    """The version after ``previous``: its last run of digits plus one, zero padding kept.

    ``1.4.2`` -> ``1.4.3``, ``v7`` -> ``v8``, ``r09`` -> ``r10``, ``2.0-rc1`` -> ``2.0-rc2``;
    no previous version -> ``1``. A version without digits cannot be incremented.
    """
    if previous is None:
        return "1"
    runs = list(_DIGITS.finditer(previous))
    if not runs:
        raise ReleaseError(
            f"cannot derive the next version from the previous version {previous!r}: it has no digits; give version"
        )
    last = runs[-1]
    bumped = str(int(last.group()) + 1).zfill(len(last.group()))
    return previous[: last.start()] + bumped + previous[last.end():]


def event_payload(app: str, version: str) -> bytes:
    """The FIREAP:TASK body: compact UTF-8 JSON ``{"app": ..., "version": ...}``."""
    return json.dumps({"app": app, "version": version}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check_payload(app: str, version: str) -> bytes:
    payload = event_payload(app, version)
    if len(payload) > PAYLOAD_LIMIT:
        fixed = len(event_payload("", ""))
        raise ReleaseError(
            f"the event payload for app {app!r} and version {version!r} is {len(payload)} bytes, over Consul's "
            f"{PAYLOAD_LIMIT}-byte budget for user events: app and version may take {PAYLOAD_LIMIT - fixed} bytes "
            f"together (as JSON), they take {len(payload) - fixed}; use a shorter app name or version"
        )
    return payload


def _re2_problem(pattern: str) -> str | None:
    """The first construct of ``pattern`` that Go's RE2 syntax lacks, or None.

    Walks the pattern once, skipping escapes and character classes, so that ``\\(?=`` or
    ``[(?=]`` are not mistaken for a lookahead.
    """
    i, size = 0, len(pattern)
    while i < size:
        char = pattern[i]
        if char == "\\":
            if i + 1 < size and pattern[i + 1] in "123456789":
                return "a backreference"
            i += 2
            continue
        if char == "[":
            i += 1
            if i < size and pattern[i] == "^":
                i += 1
            if i < size and pattern[i] == "]":
                i += 1
            while i < size and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
            continue
        if char == "(":
            for text, what in _GROUP_PROBLEMS:
                if pattern.startswith(text, i + 1):
                    return what
        if char in "*+?}" and pattern.startswith("+", i + 1) and not (char == "?" and i > 0 and pattern[i - 1] == "("):
            return "a possessive quantifier"
        i += 1
    return None


def check_filter_regex(pattern, what: str) -> str:
    """Return ``pattern`` if Consul can use it as an event filter (a Go RE2 regex)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{what} must be a non-empty regular expression, got {pattern!r}")
    if not pattern.isprintable():
        raise ValueError(f"{what} {pattern!r} must not contain control characters")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {err}") from None
    problem = _re2_problem(pattern)
    if problem:
        raise ValueError(
            f"{what} {pattern!r} uses {problem}, which Consul's regular expressions (Go RE2 syntax) do not support"
        )
    return pattern


def check_service(service) -> str:
    """Return ``service`` if it can name a Consul service in a catalog URL and an event filter."""
    if not isinstance(service, str) or not service:
        raise ValueError(f"service must be a non-empty string, got {service!r}")
    if not service.isprintable() or any(char.isspace() or char in "/?#%" for char in service):
        raise ValueError(f"service {service!r} must not contain whitespace, control characters or any of '/?#%'")
    return service


def check_tag(tag) -> str:
    """Return ``tag`` if it can be a service tag in a catalog query and an event filter."""
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"tag must be a non-empty string, got {tag!r}")
    if not tag.isprintable() or any(char.isspace() for char in tag):
        raise ValueError(f"tag {tag!r} must not contain whitespace or control characters")
    return tag


def _utf8_len(text: str | None) -> int:
    return len(text.encode("utf-8")) if text else 0


def _filter_budget(payload: bytes, service: str | None = None, tag: str | None = None) -> int:
    """Bytes left for the node filter of an event with ``payload`` and these filters."""
    return EVENT_SIZE_LIMIT - EVENT_OVERHEAD - len(payload) - _utf8_len(service) - _utf8_len(tag)


def _check_event_size(payload: bytes, filters: ReleaseFilters) -> None:
    budget = _filter_budget(payload, filters.service, filters.tag)
    node_bytes = _utf8_len(filters.node)
    if node_bytes > budget:
        raise ReleaseError(
            f"the event with its filters would not fit in one Consul user event: Serf sends an event, its payload "
            f"({len(payload)} bytes) and its filters (node {node_bytes}, service {_utf8_len(filters.service)}, "
            f"tag {_utf8_len(filters.tag)} bytes) in one message of at most {EVENT_SIZE_LIMIT} bytes, about "
            f"{EVENT_OVERHEAD} of which are taken by the event itself; shorten the filters"
        )


def anchored_node_filters(nodes, budget: int) -> list[str]:
    """Node filters ``^(a|b|c)$`` matching exactly ``nodes``, each at most ``budget`` bytes."""
    filters: list[str] = []
    current: list[str] = []
    for name in sorted(nodes):
        escaped = check_name(name, "node").replace(".", r"\.")
        if len(f"^({escaped})$") > budget:
            raise ReleaseError(f"node name {name!r} is too long for an event's node filter ({budget} bytes at most)")
        if current and len("^(" + "|".join(current + [escaped]) + ")$") > budget:
            filters.append("^(" + "|".join(current) + ")$")
            current = []
        current.append(escaped)
    if current:
        filters.append("^(" + "|".join(current) + ")$")
    return filters


def default_holder() -> str:
    """Who takes the fire lock when the caller does not say: this host and process."""
    return f"{socket.gethostname()} (pid {os.getpid()})"


# --- KV reads -----------------------------------------------------------------------------


def _read(client, key: str, **kwargs):
    """``client.kv.get`` with a consistent read: lock and release decisions must not be stale."""
    return client.kv.get(key, consistency="consistent", **kwargs)[1]


def _read_release(client, schema: Schema, app: str) -> tuple[dict | None, ReleaseRecord | None]:
    key = schema.release(app)
    entry = _read(client, key)
    if entry is None:
        return None, None
    try:
        return entry, ReleaseRecord.from_json(entry.get("Value"), key)
    except KVRecordError as err:
        raise ReleaseError(f"{err}; remove the app's state with fireap_clear wipe=true, then fire again") from None


def _read_lock(client, schema: Schema, app: str) -> tuple[dict | None, LockRecord | None]:
    """The lock key's entry and record; the record is None when absent or unreadable."""
    key = schema.lock(app)
    entry = _read(client, key)
    if entry is None or entry.get("Value") is None:
        return entry, None
    try:
        return entry, LockRecord.from_json(entry["Value"], key)
    except ValueError:
        return entry, None


def _read_tree(client, schema: Schema, app: str, prefix: str, cls, warnings: list[str]) -> tuple[int, dict, set[str]]:
    """Every record under ``prefix`` by node name (malformed ones are skipped with a warning),
    and the names of those whose key a session holds."""
    index, entries = client.kv.get(prefix, recurse=True, consistency="consistent")
    records, held = {}, set()
    for entry in entries or ():
        key = entry["Key"]
        try:
            name = schema.node_name(app, key)
            records[name] = cls.from_json(entry.get("Value"), key)
        except ValueError as err:
            warnings.append(f"ignored {err}")
            continue
        if entry.get("Session"):
            held.add(name)
    return int(index or 0), records, held


# --- progress ---------------------------------------------------------------------------


def _target_status(state: NodeState | None, release: ReleaseRecord) -> str:
    if state is not None and state.has(release.version):
        return NODE_DONE
    if state is not None and state.run_id == release.run_id:
        return state.status
    return PENDING


def _progress(client, schema: Schema, app: str, release: ReleaseRecord, warnings: list[str]):
    """(targets in schedule order, plan by node, states by node, index of the nodes prefix).

    A worker holds its unfinished record of the run with its session; a record no longer
    held belongs to a worker that died (kill -9, its node lost) and will not finish unless
    the node is woken again, so it is left out: the node counts as pending, and
    retry_stragglers fires to it.
    """
    _plan_index, plans, _held = _read_tree(client, schema, app, schema.plan_prefix(app), PlanEntry, warnings)
    nodes_index, states, held = _read_tree(client, schema, app, schema.nodes_prefix(app), NodeState, warnings)
    states = {name: state for name, state in states.items() if not state.crashed(release.run_id, name in held)}
    plans = {name: plan for name, plan in plans.items() if plan.run_id == release.run_id and name != release.leader}
    targets = schedule_order(list(plans), release.leader)
    if len(targets) != release.target_count:
        warnings.append(
            f"the release record counts {release.target_count} targets but {len(targets)} have a plan entry "
            f"for run {release.run_id} (the leader included)"
        )
    return targets, plans, states, nodes_index


def _finished(targets, states, release: ReleaseRecord) -> bool:
    return all(_target_status(states.get(name), release) in NODE_TERMINAL_STATUSES for name in targets)


def _empty_info(app: str, lock: dict | None, warnings: list[str]) -> dict:
    return {
        "app": app,
        "exists": False,
        "release": None,
        "run_id": None,
        "version": None,
        "status": STATUS_NONE,
        "finished": False,
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
        "timings": {"fired_at": None, "first_finished": None, "last_finished": None, "elapsed": None},
        "lock": lock,
        "warnings": warnings,
    }


def _lock_info(entry: dict | None, record: LockRecord | None) -> dict | None:
    if entry is None:
        return None
    lock = {"held": bool(entry.get("Session")), "session": entry.get("Session") or None}
    lock.update(record.to_dict() if record else {"run_id": None, "holder": None, "since": None})
    return lock


def _node_row(name, release, plan, state, status) -> dict:
    this_run = state is not None and state.run_id == release.run_id
    shown = state if state is not None and (this_run or status == NODE_DONE) else None
    duration = None
    if shown is not None and shown.finished is not None:
        duration = max(0.0, shown.finished - shown.started)
    return {
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
    }


def _build_info(app, release: ReleaseRecord, targets, plans, states, lock, warnings, now: float) -> dict:
    rows = [_node_row(name, release, plans.get(name), states.get(name), _target_status(states.get(name), release)) for name in targets]
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
    ends = [row["finished"] for row in rows if row["this_run"] and row["finished"] is not None and row["node"] != release.leader]
    last = max(ends) if ends else None
    if finished:
        elapsed = max(0.0, (last if last is not None else release.fired_at) - release.fired_at)
    else:
        elapsed = max(0.0, now - release.fired_at)
    if release.aborted:
        status = RELEASE_ABORTED
    elif finished:
        status = STATUS_FINISHED
    else:
        status = RELEASE_RUNNING
    return {
        "app": app,
        "exists": True,
        "release": release.to_dict(),
        "run_id": release.run_id,
        "version": release.version,
        "status": status,
        "finished": finished,
        "succeeded": finished and counts[NODE_FAILED] == 0,
        "counts": counts,
        "total": total,
        "percent": round(100.0 * (counts[NODE_DONE] + counts[NODE_FAILED]) / total, 1) if total else 0.0,
        "failed_nodes": [
            {"node": row["node"], "source": row["source"], "error": row["error"]} for row in rows if row["status"] == NODE_FAILED
        ],
        "nodes": rows,
        "tree": tree,
        "max_depth": max(depths) if depths else 0,
        "stages_planned": max((plan.stage for plan in plans.values()), default=0),
        "ideal_stages": stage_count(total, release.fanout) if total else 0,
        "timings": {
            "fired_at": release.fired_at,
            "first_finished": min(ends) if ends else None,
            "last_finished": last,
            "elapsed": round(elapsed, 3),
        },
        "lock": lock,
        "warnings": warnings,
    }


def _collect(client, schema: Schema, app: str, now: float | None = None) -> tuple[dict, int]:
    check_name(app, "app")
    warnings: list[str] = []
    lock = _lock_info(*_read_lock(client, schema, app))
    _entry, release = _read_release(client, schema, app)
    if release is None:
        return _empty_info(app, lock, warnings), 0
    targets, plans, states, nodes_index = _progress(client, schema, app, release, warnings)
    now = time.time() if now is None else now
    return _build_info(app, release, targets, plans, states, lock, warnings, now), nodes_index


def info(client, schema: Schema, app: str) -> dict:
    """The state of ``app``'s current run, read from KV (O(N) reads: controller only).

    Returns ``exists`` (a release record is present), ``release`` (the record), ``run_id``,
    ``version``, ``status`` (running / finished / aborted / none), ``finished`` (every target
    done or failed), ``succeeded`` (finished without failures), ``counts`` per status
    (done, pulling, waiting, failed, pending = no live record for this run: not started yet,
    or its worker died before finishing), ``total``,
    ``percent`` (share of targets finished), ``failed_nodes`` (node, source, error),
    ``nodes`` (one row per target in schedule order: status, planned and actual source,
    stage, depth, started, finished, duration, error), ``tree`` (source -> children of this
    run), ``max_depth``, ``stages_planned``, ``ideal_stages`` (ceil(log_{k+1} N)),
    ``timings`` (fired_at, first/last finished, elapsed), ``lock`` (held, session, run_id,
    holder, since; None without a lock key) and ``warnings`` (skipped malformed records).

    A node already done at the release's version in an earlier run counts as done: its
    worker skips the version (``this_run`` is false in its row).
    """
    return _collect(client, schema, app)[0]


# --- the fire lock ------------------------------------------------------------------------


def _describe_lock(lock: LockRecord | None, release: ReleaseRecord | None) -> str:
    if lock is None:
        return "a holder whose lock record cannot be read"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lock.since))
    version = release.version if release is not None and release.run_id == lock.run_id else None
    what = f"run {lock.run_id}" + (f" (version {version})" if version else "")
    return f"{what}, taken by {lock.holder} at {since}"


def _lock_blocker(client, schema: Schema, app: str, lock, release) -> str | None:
    """Why the held lock must not be taken over, or None when its run is over."""
    if lock is None:
        return "its lock record cannot be read"
    if release is None or release.run_id != lock.run_id:
        return "no release record describes that run: a fire of it is in progress or was interrupted"
    if release.aborted:
        return None
    targets, _plans, states, _index = _progress(client, schema, app, release, [])
    if _finished(targets, states, release):
        return None
    pending = sum(1 for name in targets if _target_status(states.get(name), release) not in NODE_TERMINAL_STATUSES)
    return f"that release is still running: {pending} of {len(targets)} targets have not finished"


def _check_lock(client, schema: Schema, app: str, force: bool, release: ReleaseRecord | None):
    """The held lock's entry and record when the caller may take it over, else FireLockHeld."""
    entry, lock = _read_lock(client, schema, app)
    if entry is None or not entry.get("Session"):
        return None, None
    blocker = _lock_blocker(client, schema, app, lock, release)
    if blocker and not force:
        raise FireLockHeld(
            f"app {app!r} is locked by {_describe_lock(lock, release)}; {blocker}. Wait for it to finish "
            f"(fireap_info), re-fire with force=true to take over, or lift the lock with fireap_clear "
            f"(abort=true also stops nodes that have not started)",
            lock,
        )
    return entry, lock


def _take_lock(client, schema: Schema, app: str, held: dict | None, record: LockRecord) -> str:
    """Acquire the lock for ``record``'s run; returns the session that holds it."""
    if held is not None:
        client.session.destroy(held["Session"])
    session = client.session.create(name=f"fireap fire lock {app} run {record.run_id}", lock_delay=0, behavior="release")
    key = schema.lock(app)
    if client.kv.put(key, record.to_json(), acquire=session):
        return session
    client.session.destroy(session)
    entry, lock = _read_lock(client, schema, app)
    if entry is not None and entry.get("Session"):
        _entry, release = _read_release(client, schema, app)
        raise FireLockHeld(
            f"app {app!r} was locked meanwhile by {_describe_lock(lock, release)}; another fire of the same app "
            "is running: check it with fireap_info",
            lock,
        )
    raise ReleaseError(
        f"could not acquire the fire lock {key} (the previous holder's lock-delay may still be running); "
        "try again in a few seconds"
    )


# --- targets ------------------------------------------------------------------------------


def resolve_targets(client, leader: str, filters: ReleaseFilters, nodes: list[dict] | None = None) -> list[str]:
    """The release's targets in schedule order: the leader, then the matching catalog nodes.

    ``filters.node`` is searched unanchored in each node name, as Consul matches event
    filters (``web1`` also selects ``web10``); ``filters.service`` (with ``filters.tag``)
    keeps the nodes the catalog lists for that service (and tag). ``nodes``: the answer of
    /v1/catalog/nodes when the caller read it already.
    """
    if nodes is None:
        _index, nodes = client.catalog.nodes()
    names = [node["Node"] for node in nodes or ()]
    if filters.node:
        pattern = re.compile(filters.node)
        names = [name for name in names if pattern.search(name)]
    if filters.service:
        _index, entries = client.catalog.service(filters.service, tag=filters.tag)
        providers = {entry["Node"] for entry in entries or ()}
        names = [name for name in names if name in providers]
    bad = []
    for name in names:
        try:
            check_name(name, "node")
        except ValueError:
            bad.append(name)
    if bad:
        raise ReleaseError(
            f"node name(s) {', '.join(repr(name) for name in sorted(bad))} cannot be fireap targets (KV keys take "
            "only letters, digits, '_', '.' and '-'); narrow node_filter to exclude them"
        )
    if any(getattr(filters, name) for name in ("node", "service")) and not set(names) - {leader}:
        raise ReleaseError(f"no node besides the leader {leader} matches the filters {_filters_text(filters)}")
    return schedule_order(names, leader)


def _filters_text(filters: ReleaseFilters) -> str:
    given = [f"{name}={getattr(filters, name)!r}" for name in ("node", "service", "tag") if getattr(filters, name)]
    return ", ".join(given) if given else "(none)"


def _leader(client) -> str:
    name = client.agent.self()["Config"]["NodeName"]
    try:
        return check_name(name, "leader node")
    except ValueError as err:
        raise ReleaseError(f"the agent's own node cannot lead a release: {err}") from None


# --- fire ---------------------------------------------------------------------------------


def _txn(client, batches) -> None:
    for batch in batches:
        client.txn.put(batch)


def _chunks(ops: list[dict]) -> list[list[dict]]:
    return [ops[start:start + TXN_MAX_OPS] for start in range(0, len(ops), TXN_MAX_OPS)]


def _record_run(client, schema: Schema, app: str, plan, stale, record: ReleaseRecord, release_entry) -> None:
    """Write the plan, delete stale plan keys, then switch the release record to the new run.

    The last transaction writes the leader's state and the release record together, only if
    the record is still the one read before (ops apply in order: the check comes first), so
    a node never sees a release whose plan is not written and a concurrent writer is noticed.
    """
    _txn(client, txn_set_batches([(schema.plan(app, name), entry.to_json()) for name, entry in plan.items()]))
    _txn(client, _chunks([{"KV": {"Verb": "delete", "Key": key}} for key in stale]))
    key = schema.release(app)
    if release_entry is None:
        check = {"KV": {"Verb": "check-not-exists", "Key": key}}
    else:
        check = {"KV": {"Verb": "check-index", "Key": key, "Index": release_entry["ModifyIndex"]}}
    leader_state = NodeState(
        version=record.version, run_id=record.run_id, status=NODE_DONE, started=record.fired_at,
        finished=record.fired_at, depth=0,
    )
    sets = txn_set_batches([(schema.node(app, record.leader), leader_state.to_json()), (key, record.to_json())])
    try:
        client.txn.put([check] + sets[0])
    except Exception as err:
        current = _read(client, key)
        if (current and current["ModifyIndex"]) != (release_entry and release_entry["ModifyIndex"]):
            raise ReleaseError(
                f"the release record of app {app!r} changed while run {record.run_id} was being recorded "
                "(fireap_clear or another fire); nothing was fired: check fireap_info and fire again"
            ) from err
        raise


def fire(
    client,
    schema: Schema,
    app: str,
    version: str | None = None,
    node_filter: str | None = None,
    service: str | None = None,
    tag: str | None = None,
    fanout: int = DEFAULT_FANOUT,
    force: bool = False,
    check_mode: bool = False,
    holder: str | None = None,
) -> dict:
    """Start a run of ``app`` at ``version`` (default: the previous version + 1).

    ``client`` talks to the leader's agent: its node is the run's leader and always target
    0. Returns ``run_id``, ``version``, ``previous_version``, ``targets`` (schedule order),
    ``target_count``, ``leader``, ``fanout``, ``filters``, ``event_id`` (None in check
    mode), ``release`` (the record written), ``previous_release``, ``took_over`` (the lock
    record of the finished or forced run whose lock was taken, else None) and
    ``stale_plans`` (plan keys of nodes no longer targeted, deleted). In check mode nothing
    is written and no event is fired, but the lock is still checked.

    Raises FireLockHeld when a run still in progress holds the lock (unless ``force``),
    ReleaseError / ValueError for bad input. When the event cannot be fired after the run
    was recorded, ReleaseError says so: retry_stragglers() fires it again.
    """
    check_name(app, "app")
    if version is not None:
        check_version(version)
    check_fanout(fanout)
    if node_filter is not None:
        check_filter_regex(node_filter, "node_filter")
    if service is not None:
        check_service(service)
    if tag is not None:
        check_tag(tag)
        if service is None:
            raise ValueError("tag selects instances of a service: give service too")
    filters = ReleaseFilters(node=node_filter, service=service, tag=tag)
    if version is not None:
        _check_event_size(_check_payload(app, version), filters)

    leader = _leader(client)
    release_entry, previous = _read_release(client, schema, app)
    previous_version = previous.version if previous else None
    if version is None:
        version = check_version(next_version(previous_version))
    payload = _check_payload(app, version)
    _check_event_size(payload, filters)

    held_entry, held_lock = _check_lock(client, schema, app, force, previous)
    _index, catalog = client.catalog.nodes()
    targets = resolve_targets(client, leader, filters, catalog)
    run_id = uuid.uuid4().hex
    addresses = {node["Node"]: node["Address"] for node in catalog or () if node.get("Address")}
    plan = plan_release(targets, leader, fanout, run_id, addresses)
    existing = client.kv.get(schema.plan_prefix(app), keys=True)[1] or []
    wanted = {schema.plan(app, name) for name in plan}
    stale = sorted(key for key in existing if key not in wanted)

    now = time.time()
    record = ReleaseRecord(
        app=app,
        version=version,
        run_id=run_id,
        fanout=fanout,
        leader=leader,
        target_count=len(targets),
        fired_at=now,
        filters=filters,
        status=RELEASE_RUNNING,
    )
    result = {
        "run_id": run_id,
        "version": version,
        "previous_version": previous_version,
        "targets": targets,
        "target_count": len(targets),
        "leader": leader,
        "fanout": fanout,
        "filters": filters.to_dict(),
        "event_id": None,
        "release": record.to_dict(),
        "previous_release": previous.to_dict() if previous else None,
        "took_over": held_lock.to_dict() if held_lock else None,
        "stale_plans": stale,
    }
    if check_mode:
        return result

    lock = LockRecord(run_id=run_id, holder=holder or default_holder(), since=now)
    session = _take_lock(client, schema, app, held_entry, lock)
    try:
        _record_run(client, schema, app, plan, stale, record, release_entry)
    except Exception:
        client.session.destroy(session)
        raise
    try:
        event = client.event.fire(EVENT_NAME, payload, node=filters.node, service=filters.service, tag=filters.tag)
    except Exception as err:
        raise ReleaseError(
            f"run {run_id} of app {app!r} (version {version}) was recorded, but firing the {EVENT_NAME} event "
            f"failed: {err}. Fire it again with retry_stragglers, or abort the run with fireap_clear abort=true"
        ) from err
    result["event_id"] = event["ID"]
    return result


def retry_stragglers(client, schema: Schema, app: str, version: str | None = None, check_mode: bool = False) -> dict:
    """Fire the current run's event again, only to its targets that never started or whose
    worker died.

    A straggler has no live record for the run and is not done at its version (the event
    was lost, the agent was down, or its worker died mid-pull). Each event's node filter
    anchors exactly some of them (``^(a|b)$``), split so that every event fits Consul's size
    limit; the run id and plan are unchanged. ``version``, when given, must be the run's.
    Returns ``run_id``, ``version``, ``stragglers``, ``events`` (list of ``{event_id,
    node_filter}``; event_id None in check mode).
    """
    check_name(app, "app")
    if version is not None:
        check_version(version)
    _entry, release = _read_release(client, schema, app)
    if release is None:
        raise ReleaseError(f"app {app!r} has no release to retry: fire one first")
    if release.aborted:
        raise ReleaseError(
            f"run {release.run_id} of app {app!r} was aborted ({release.aborted_reason or 'no reason given'}); "
            "fire a new run instead"
        )
    if version is not None and version != release.version:
        raise ReleaseError(
            f"version {version!r} is not the version of the current run {release.run_id} ({release.version!r}); "
            "fire a new run to release another version"
        )
    targets, _plans, states, _index = _progress(client, schema, app, release, [])
    stragglers = [
        name for name in targets if name != release.leader and _target_status(states.get(name), release) == PENDING
    ]
    payload = event_payload(app, release.version)
    node_filters = anchored_node_filters(stragglers, _filter_budget(payload))
    events = []
    for node_filter in node_filters:
        event_id = None
        if not check_mode:
            event_id = client.event.fire(EVENT_NAME, payload, node=node_filter)["ID"]
        events.append({"event_id": event_id, "node_filter": node_filter})
    return {"run_id": release.run_id, "version": release.version, "stragglers": stragglers, "events": events}


# --- wait -----------------------------------------------------------------------------------


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

    Blocks on ``<app>/nodes/`` (a Consul blocking query) for at most ``poll`` s at a time, so
    a finish is seen at once and an abort within ``poll`` s; ``on_progress(info)`` is called
    after every read. Raises ReleaseWaitTimeout (with the last info) after ``timeout`` s, and
    ReleaseError when the run was replaced by another or the app's state was wiped.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or poll <= 0:
        raise ValueError(f"poll must be a number of seconds > 0, got {poll!r}")
    deadline = time.monotonic() + timeout
    prefix = schema.nodes_prefix(app)
    while True:
        started = time.monotonic()
        current, index = _collect(client, schema, app)
        if current["run_id"] != run_id:
            now = "no release is recorded any more" if current["run_id"] is None else f"run {current['run_id']} replaced it"
            raise ReleaseError(f"stopped waiting for run {run_id} of app {app!r}: {now}")
        if on_progress is not None:
            on_progress(current)
        if current["finished"] or current["status"] == RELEASE_ABORTED:
            return current
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            counts = current["counts"]
            raise ReleaseWaitTimeout(
                f"run {run_id} of app {app!r} (version {current['version']}) did not finish within {timeout:g}s: "
                + ", ".join(f"{counts[status]} {status}" for status in TARGET_STATUSES)
                + f" of {current['total']} targets",
                current,
            )
        block = min(poll, remaining)
        client.kv.get(prefix, keys=True, index=max(index, 1), wait=f"{max(1, round(block * 1000))}ms")
        pause = min(MIN_POLL_INTERVAL - (time.monotonic() - started), deadline - time.monotonic())
        if pause > 0:
            time.sleep(pause)


# --- clear ----------------------------------------------------------------------------------


def clear(
    client,
    schema: Schema,
    app: str,
    lift_lock: bool = True,
    abort: bool = False,
    wipe: bool = False,
    reason: str | None = None,
    check_mode: bool = False,
) -> dict:
    """Lift ``app``'s fire lock, abort its running release, and/or wipe all its state.

    * ``abort``: a running release record becomes ``aborted`` with ``reason`` (CAS on the
      record); nodes that have not started do not start, waiting ones give up;
    * ``lift_lock``: the session holding the lock is destroyed (the key stays, unheld);
    * ``wipe``: every key under the app's prefix is deleted (the lock is lifted first).

    Returns ``changed``, ``lock_lifted`` (the lifted lock's record and session, else None),
    ``aborted`` (``{run_id, version, reason}`` else None), ``wiped`` (bool), ``deleted_keys``
    (count), ``before`` and ``after`` (``{release, lock}`` snapshots for a diff). In check
    mode nothing changes and the result says what would.
    """
    check_name(app, "app")
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise ValueError(f"reason must be a non-empty string, got {reason!r}")
    if reason is not None:
        check_text(reason, "reason", LINE_MAX_LENGTH)
    release_key = schema.release(app)
    try:
        release_entry, release = _read_release(client, schema, app)
    except ReleaseError:
        if abort:
            raise
        release_entry, release = None, None  # lifting the lock or wiping must work on a corrupt record
    lock_entry, lock = _read_lock(client, schema, app)
    before = {"release": release.to_dict() if release else None, "lock": _lock_info(lock_entry, lock)}
    after = {"release": before["release"], "lock": before["lock"]}
    result = {"changed": False, "lock_lifted": None, "aborted": None, "wiped": False, "deleted_keys": 0}

    if abort and release is not None and release.status == RELEASE_RUNNING:
        aborted = replace(release, status=RELEASE_ABORTED, aborted_reason=reason or DEFAULT_ABORT_REASON)
        if not check_mode and not client.kv.put(release_key, aborted.to_json(), cas=release_entry["ModifyIndex"]):
            raise ReleaseError(f"the release record of app {app!r} changed while aborting it; check fireap_info and retry")
        result["aborted"] = {"run_id": aborted.run_id, "version": aborted.version, "reason": aborted.aborted_reason}
        after["release"] = aborted.to_dict()
        result["changed"] = True

    if (lift_lock or wipe) and lock_entry is not None and lock_entry.get("Session"):
        if not check_mode:
            client.session.destroy(lock_entry["Session"])
        result["lock_lifted"] = dict(before["lock"])
        after["lock"] = dict(before["lock"], held=False, session=None)
        result["changed"] = True

    if wipe:
        keys = client.kv.get(schema.app_prefix(app), keys=True)[1] or []
        if keys:
            if not check_mode:
                client.kv.delete(schema.app_prefix(app), recurse=True)
            result["wiped"] = True
            result["deleted_keys"] = len(keys)
            result["changed"] = True
        after = {"release": None, "lock": None}

    result["before"] = before
    result["after"] = after
    return result


def counts_text(progress: dict) -> str:
    """``37/100 done, 2 failed, 3 pulling, 0 waiting, 58 pending``, from info()'s counts."""
    counts = progress["counts"]
    parts = [f"{counts.get(NODE_DONE, 0)}/{progress['total']} done"]
    parts += [f"{counts.get(status, 0)} {status}" for status in COUNT_ORDER[1:]]
    return ", ".join(parts)
