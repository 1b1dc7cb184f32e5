# SPDX-License-Identifier: MIT
"""One node's pull for one app: the thin Consul adapter that drives ``PullMachine``.

``pull()`` reads the release, the node's plan entry and its own state (one read-only
/v1/txn), then performs each action the machine asks for against the local agent and
reports what it saw. All decisions live in ``_propagation``; this module only does the I/O:

* a session (TTL, behavior release, lock-delay 0 so a crashed puller's slot is reusable at
  once, node check serfHealth) is created once the node waited on is pulling, or at the
  claim (a node waiting for a node that has not started holds none), renewed every TTL/2 by a
  background thread and destroyed at the end, also on errors;
* the claim is one /v1/txn that checks the release record's ModifyIndex (as last read) and
  locks the slot and the node's own record (``pulling``) with that session, so watchers can
  tell a crashed worker (record not finished, key no longer held) from a slow one, and a
  release aborted or replaced since it was read is seen before anything runs; the end is one
  /v1/txn that unlocks the slot and writes the final record. When the session was lost the
  final write falls back to CAS on the record last written;
* waits are blocking queries on one key (``nodes/<node>``) or one source's slots prefix,
  at most ``max_wait`` s each and none past the machine's ``release_due``; the release is
  re-read when one came back unchanged or ended past that time, so an abort is noticed
  within ``max_wait`` even while Consul keeps raising the index of a missing key read
  (reads of a missing record are spaced by the machine's ``pause``);
* the source's address comes from the plan entry (the catalog only for other sources);
  when the task fails, the source node's health (health endpoint of the local agent) tells
  the machine whether the source went down: serfHealth critical, or no checks at all (the
  node left the catalog); while it still passes, a blocking read waits up to
  ``failure_detection`` s for Consul's gossip to notice a crash;
* Consul errors that a restarting agent causes (connection refused, 5xx, 429) are retried
  with backoff for up to ``retry_window`` s (``_connection.retry_transient``); the task
  itself is never retried after one.

Requests per node do not grow with the cluster size, except in the fallback listing.
Only stdlib and py-consul: nodes run this without Ansible.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    DEFAULT_RETRY_WINDOW,
    ConsulOptions,
    ConsulSessionInvalid,
    ConsulTxnRefused,
    FireapConsulError,
    client_options,
    consul_errors,
    retry_transient,
)
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    KVRecordError,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    Schema,
    run_of,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import check_address, check_name
from ansible_collections.fireap.consul.plugins.module_utils._propagation import (
    CheckStart,
    ClaimOutcome,
    ClaimSlot,
    ListNodes,
    NodeView,
    PullMachine,
    PullProtocolError,
    PullResult,
    PullTimings,
    ReleaseSlot,
    Restart,
    RunTask,
    Sleep,
    WaitForNode,
    WaitForSlots,
    WriteState,
    read_run,
)

DEFAULT_SESSION_TTL = 15

T = TypeVar("T")


@dataclass(frozen=True)
class SourceInfo:
    """The node to pull from: its Consul node name and catalog address."""

    name: str
    address: str


#: ``run_task(source) -> (ok, error)``: runs the app's commands against ``source``.
RunTaskFn = Callable[[SourceInfo], "tuple[bool, str | None]"]


class PullError(FireapError):
    """The pull could not proceed: a malformed release or plan record (the message names the key)."""


class _ReleaseMalformed(Exception):
    """The release record became malformed while the worker waited: start over, so that the
    run is recorded as failed (``read_run``) if it can still be named."""


class _ReleaseChanged(Exception):
    """A claim was refused because the release record changed since the worker read it."""


def _txn_put(client, ops: list[dict]) -> list[dict]:
    """Run a /v1/txn; its results (a rollback raises ConsulTxnRefused under consul_errors)."""
    return client.txn.put(ops).get("Results") or []


def _txn_entry(result: dict) -> dict | None:
    """A "get-or-empty" result as ``kv.get`` returns it (Value decoded), None for a missing key."""
    entry = dict(result["KV"])
    if not entry.get("ModifyIndex"):
        return None
    if entry.get("Value") is not None:
        entry["Value"] = base64.b64decode(entry["Value"])
    return entry


def _value(entry: dict | None) -> bytes | None:
    return None if entry is None else entry.get("Value")


def _kv_op(
    verb: str, key: str, value: bytes | None = None, session: str | None = None, index: int | None = None
) -> dict:
    op = {"Verb": verb, "Key": key}
    if value is not None:
        op["Value"] = base64.b64encode(value).decode("ascii")
    if session is not None:
        op["Session"] = session
    if index is not None:
        op["Index"] = index
    return {"KV": op}


def _go_duration(seconds: float) -> str:
    """Rounded up: a blocking read never ends before the time the machine asked for."""
    return f"{max(1, math.ceil(seconds * 1000))}ms"


def _down(checks) -> bool:
    """Whether a node's health checks say it is down: serfHealth critical, or no serfHealth at
    all (the node left and was deregistered, its checks gone)."""
    serf = [check for check in checks or () if check.get("CheckID") == "serfHealth"]
    return not serf or any(check.get("Status") == "critical" for check in serf)


class _Renewer(threading.Thread):
    """Renews the session every TTL/2 until stopped; flags the session lost once Consul no
    longer knows it."""

    def __init__(self, client, options: ConsulOptions, session_id: str, ttl: float, log: Callable[[str], None]) -> None:
        super().__init__(name=f"fireap-renew-{session_id[:8]}", daemon=True)
        self.client = client
        self.options = options
        self.session_id = session_id
        self.interval = ttl / 2
        self.log = log
        self.stopped = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        delay = self.interval
        while not self.stopped.wait(delay):
            try:
                with consul_errors(self.options, f"renewing session {self.session_id}"):
                    self.client.session.renew(self.session_id)
                delay = self.interval
            except ConsulSessionInvalid:
                self.log(f"session {self.session_id} expired or was invalidated; slots it held may be lost")
                self.lost.set()
                return
            except FireapConsulError as err:  # keep renewing through agent restarts
                if not err.transient:
                    self.log(f"renewing session {self.session_id} failed: {err}")
                delay = min(self.interval, 1.0)

    def stop(self) -> None:
        self.stopped.set()


class _PullDriver:
    """Drives a ``PullMachine`` for each run the pull meets: performs each action it asks for
    against Consul and reports back what it saw."""

    def __init__(self, client, schema, app, node, run_task, timings, log, clock, sleep, session_ttl, retry_window):
        self.client = client
        self.options = client_options(client)
        self.schema = schema
        self.app = check_name(app, "app")
        self.node = check_name(node, "node")
        self.run_task = run_task
        self.timings = timings
        self.log = log
        self.clock = clock
        self.sleep = sleep
        self.session_ttl = session_ttl
        self.retry_window = retry_window
        self.session_id: str | None = None
        self.renewer: _Renewer | None = None
        self.written: bytes | None = None  # the last record this worker wrote
        self.address: str | None = None  # the claimed source's address
        self.plan: PlanEntry | None = None
        self.run_id: str | None = None
        self.release_index = 0  # ModifyIndex of the release record as last read; claims check it
        self.txn_reads = True  # False once Consul refused a read-only txn ("get-or-empty")

    # -- Consul calls with retries ----------------------------------------------------

    def call(self, what: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """``fn(*args, **kwargs)``, its Consul errors turned into FireapConsulError and made
        again while Consul does not answer, for up to ``retry_window`` s."""

        def attempt() -> T:
            with consul_errors(self.options, what):
                return fn(*args, **kwargs)

        return retry_transient(attempt, self.retry_window, log=self.log, sleep=self.sleep)

    def read(self, key: str, index: int = 0, wait: float = 0.0, **kwargs):
        """``(index, value)`` of a KV read; blocks while the index is ``index`` (0: never)."""
        params = {"index": index, "wait": _go_duration(wait)} if index else {}
        new_index, value = self.call(f"reading {key}", self.client.kv.get, key, **params, **kwargs)
        # py-consul hands the X-Consul-Index header over as text.
        return int(new_index), value

    def read_keys(self, *keys: str) -> list[dict | None]:
        """The entries of ``keys`` (None where missing) in one read-only /v1/txn; key by key
        when this Consul does not serve "get-or-empty" (older than 1.14)."""
        if self.txn_reads:
            ops = [_kv_op("get-or-empty", key) for key in keys]
            try:
                results = self.call(f"reading {', '.join(keys)}", _txn_put, self.client, ops)
                return [_txn_entry(result) for result in results]
            except FireapConsulError as err:
                self.log(f"Consul refused a read-only transaction ({err}); reading key by key")
                self.txn_reads = False
        return [self.read(key)[1] for key in keys]

    def read_release(self) -> ReleaseRecord | None:
        key = self.schema.release(self.app)
        _index, entry = self.read(key)
        self.release_index = entry["ModifyIndex"] if entry else 0
        try:
            return None if entry is None else ReleaseRecord.from_json(entry.get("Value"), key)
        except KVRecordError as err:
            raise _ReleaseMalformed(str(err)) from err

    def parse(self, cls, key, entry):
        """The record of a KV entry; None when it is missing or malformed (logged)."""
        if entry is None:
            return None
        try:
            return cls.from_json(entry.get("Value"), key)
        except KVRecordError as err:
            self.log(f"ignoring {err}")
            return None

    def node_view(self, key, entry) -> NodeView:
        if entry is None:
            return NodeView(None, False)
        return NodeView(self.parse(NodeState, key, entry), bool(entry.get("Session")))

    # -- session ----------------------------------------------------------------------

    def ensure_session(self) -> None:
        if self.session_id is not None and not self.renewer.lost.is_set():
            return
        replacing = self.session_id is not None
        if replacing:
            self.log(f"session {self.session_id} was lost; creating a new one")
            self.end_session()
        self.session_id = self.call(
            f"creating a session for node {self.node}",
            self.client.session.create,
            name=f"fireap pull {self.app} on {self.node}",
            node=self.node,
            checks=["serfHealth"],
            lock_delay=0,
            behavior="release",
            ttl=self.session_ttl,
        )
        self.renewer = _Renewer(self.client, self.options, self.session_id, self.session_ttl, self.log)
        self.renewer.start()
        if replacing and self.written is not None:
            # Hold our record again, or watchers would take this live worker for a crashed one.
            key = self.schema.node(self.app, self.node)
            self.call(f"writing {key}", self.client.kv.put, key, self.written, acquire=self.session_id)

    def session_lost(self) -> bool:
        return self.session_id is None or self.renewer.lost.is_set()

    def end_session(self) -> None:
        if self.renewer is not None:
            self.renewer.stop()
        if self.session_id is not None:
            try:
                self.call("destroying the session", self.client.session.destroy, self.session_id)
            except Exception as err:  # it expires on its own after 2 x TTL
                self.log(f"could not destroy session {self.session_id}: {err}")
        self.session_id = self.renewer = None

    # -- actions ----------------------------------------------------------------------

    def write_state(self, state: NodeState) -> bool:
        """Write a final record: holding it with the session when there is one; else (no
        session yet, or it was lost mid-pull) with CAS on the record last seen."""
        key = self.schema.node(self.app, self.node)
        value = state.to_json().encode("utf-8")
        if self.session_id is None:
            return self.write_checked(key, value)
        if not self.session_lost():
            try:
                ok = self.call(f"writing {key}", self.client.kv.put, key, value, acquire=self.session_id)
            except ConsulSessionInvalid:
                self.renewer.lost.set()
            else:
                if ok:
                    self.written = value
                return ok
        self.log(f"session lost: writing {key} with check-and-set instead")
        return self.write_checked(key, value)

    def write_checked(self, key: str, value: bytes) -> bool:
        """Write our record unless another worker holds or changed it since we last saw it."""
        _index, entry = self.read(key)
        held_by_another = entry is not None and entry.get("Session") not in (None, "", self.session_id)
        if held_by_another or (entry is not None and entry["Value"] != self.written):
            return False
        ok = self.call(f"writing {key}", self.client.kv.put, key, value, cas=entry["ModifyIndex"] if entry else 0)
        if not ok:  # a retried write may have landed already
            _index, entry = self.read(key)
            ok = entry is not None and entry.get("Value") == value
        if ok:
            self.written = value
        return ok

    def source_address(self, source: str) -> tuple[str | None, str | None]:
        """``(address, None)``, or ``(None, why the source cannot be used)``. The catalog's
        answer is checked like every other value read from Consul (``check_address``)."""
        if self.plan is not None and source == self.plan.source and self.plan.source_address:
            return self.plan.source_address, None
        _idx, info = self.call(f"looking up node {source}", self.client.catalog.node, source)
        address = ((info or {}).get("Node") or {}).get("Address")
        if not address:
            return None, f"node {source} has no address in the catalog"
        try:
            return check_address(address, f"the catalog address of node {source}"), None
        except ValueError as err:
            return None, str(err)

    def claim(self, action: ClaimSlot) -> ClaimOutcome:
        """Lock a free slot and our own record (``pulling``) together, if the release record is
        still the one last read (else _ReleaseChanged); the slots are read only once the
        preferred one is refused."""
        address, unusable = self.source_address(action.source)
        if address is None:
            return ClaimOutcome(unusable=unusable)
        self.ensure_session()
        own_key = self.schema.node(self.app, self.node)
        value = action.state.to_json().encode("utf-8")
        prefix = self.schema.slots_prefix(self.app, action.source)
        index, held = 0, set()
        for n, j in enumerate(action.slots):
            if str(j) in held:
                continue
            key = self.schema.slot(self.app, action.source, j)
            ops = [
                _kv_op("check-index", self.schema.release(self.app), index=self.release_index),
                _kv_op("lock", key, self.node.encode("utf-8"), self.session_id),
                _kv_op("lock", own_key, value, self.session_id),
            ]
            try:
                self.call(f"acquiring {key}", _txn_put, self.client, ops)
            except ConsulTxnRefused as err:
                if 0 in err.errors:
                    raise _ReleaseChanged(err.errors[0]) from None
                if isinstance(err, ConsulSessionInvalid):
                    self.renewer.lost.set()  # retried with a new session
                    return ClaimOutcome()
                if 2 in err.errors:
                    return ClaimOutcome(refused=True)
                if n == 0:
                    index, entries = self.read(prefix, recurse=True)
                    held = {entry["Key"][len(prefix):] for entry in entries or () if entry.get("Session")}
                continue
            self.written = value
            self.address = address
            return ClaimOutcome(slot=j, index=index)
        return ClaimOutcome(index=index)

    def release_and_record(self, action: ReleaseSlot) -> bool:
        """Unlock the slot and write the final record in one txn; when the session no longer
        holds both, release what it still can and write the record with check-and-set."""
        key = self.schema.slot(self.app, action.source, action.slot)
        own_key = self.schema.node(self.app, self.node)
        value = action.state.to_json().encode("utf-8")
        if not self.session_lost():
            ops = [
                _kv_op("unlock", key, self.node.encode("utf-8"), self.session_id),
                _kv_op("lock", own_key, value, self.session_id),
            ]
            try:
                self.call(f"releasing {key}", _txn_put, self.client, ops)
            except ConsulTxnRefused as err:
                self.log(f"could not release {key} and record the outcome together: {err}")
            else:
                self.written = value
                return True
        self.release_slot(action.source, action.slot)
        return self.write_state(action.state)

    def release_slot(self, source: str, slot: int) -> None:
        key = self.schema.slot(self.app, source, slot)
        if self.session_lost():
            self.log(f"session lost while holding {key}: the slot was freed when the session ended")
            return
        try:
            released = self.call(f"releasing {key}", self.client.kv.put, key, self.node, release=self.session_id)
        except ConsulSessionInvalid:
            released = False
        if not released:
            self.log(f"{key} was no longer held by this worker (session lost while the task ran)")

    def check_start(self, action: CheckStart) -> tuple[PlanEntry | None, NodeView, NodeView]:
        """The plan entry of a node not started yet and the records of the nodes it waits for."""
        if self.run_id is None:
            raise PullProtocolError("CheckStart before a run was read")
        plan_key = self.schema.plan(self.app, self.run_id, action.node)
        plan = self.parse(PlanEntry, plan_key, self.read(plan_key)[1])
        if plan is None:
            return None, NodeView(None), NodeView(None)
        keys = [self.schema.node(self.app, plan.source)]
        if plan.after:
            keys.append(self.schema.node(self.app, plan.after))
        views = [self.node_view(key, entry) for key, entry in zip(keys, self.read_keys(*keys))]
        return plan, views[0], views[1] if plan.after else NodeView(None)

    def list_nodes(self) -> dict[str, NodeView]:
        prefix = self.schema.nodes_prefix(self.app)
        _index, entries = self.read(prefix, recurse=True)
        views = {}
        for entry in entries or ():
            try:
                name = self.schema.node_name(self.app, entry["Key"])
            except ValueError as err:
                self.log(f"ignoring {err}")
                continue
            views[name] = self.node_view(entry["Key"], entry)
        return views

    def node_down(self, name: str, within: float) -> bool:
        """Whether Consul sees node ``name`` as down (``_down``), waiting up to ``within`` s for
        a crash to be detected (gossip marks it seconds later). When the health cannot be read,
        the node counts as up, so the failed task is recorded as such."""
        deadline = self.clock() + within
        blocking: dict = {}
        try:
            while True:
                index, checks = self.call(f"reading the health of node {name}", self.client.health.node, name,
                                          **blocking)
                remaining = deadline - self.clock()
                if _down(checks) or remaining <= 0:
                    return _down(checks)
                blocking = {"index": int(index), "wait": _go_duration(remaining)}
        except FireapConsulError as err:
            self.log(f"could not read the health of node {name}: {err}")
            return False

    def run(self, action: RunTask) -> tuple[bool, str | None, bool]:
        """``(ok, error, source_down)``; the source's health is read only when the task failed."""
        source = SourceInfo(action.source, self.address)
        self.log(f"pulling from {source.name} ({source.address}) over slot {action.slot}")
        try:
            ok, error = self.run_task(source)
        except Exception as err:  # a task runner bug must still leave a failed record
            ok, error = False, f"task runner raised {type(err).__name__}: {err}"
        if self.renewer is not None and self.renewer.lost.is_set():
            self.log("the session ended while the task ran: its slot may have been taken by another puller")
        source_down = not ok and self.node_down(source.name, self.timings.failure_detection)
        if source_down:
            self.log(f"the task failed ({error}) and node {source.name} is down (serfHealth critical or deregistered)")
        return bool(ok), error, source_down

    # -- the loop ---------------------------------------------------------------------

    def drive(self) -> PullResult:
        while True:
            try:
                result = self.drive_run()
            except _ReleaseMalformed as err:
                self.log(f"{err}: starting over")
                continue
            if isinstance(result, PullResult):
                return result
            self.log(f"{result.reason}: starting over")

    def drive_run(self):
        release_key = self.schema.release(self.app)
        own_key = self.schema.node(self.app, self.node)
        release_entry, own_entry = self.read_keys(release_key, own_key)
        run = None if release_entry is None else run_of(_value(release_entry), release_key)
        plan_key = plan_entry = None
        if run is not None:
            plan_key = self.schema.plan(self.app, run[0], self.node)
            plan_entry = self.read(plan_key)[1]
        try:
            release, plan, problem = read_run(release_key, _value(release_entry), plan_key, _value(plan_entry))
        except KVRecordError as err:
            raise PullError(str(err)) from err
        self.plan = plan
        self.run_id = run[0] if run else None
        own = self.parse(NodeState, own_key, own_entry)
        self.written = own_entry.get("Value") if own_entry else None
        self.release_index = release_entry["ModifyIndex"] if release_entry and release else 0
        machine = PullMachine(self.node, release, plan, own, self.timings, self.release_index, problem=problem)
        action = machine.start(self.clock())
        while True:
            if isinstance(action, (PullResult, Restart)):
                return action
            if isinstance(action, WriteState):
                ok = self.write_state(action.state)
                action = machine.on_written(ok, self.clock())
            elif isinstance(action, WaitForNode):
                key = self.schema.node(self.app, action.node)
                if action.claim_soon:
                    self.ensure_session()
                if action.pause:
                    self.sleep(action.pause)
                index, entry = self.read(key, action.index, action.wait)
                action = self.after_wait(machine, action.index, index) or machine.on_node(
                    action.node, self.node_view(key, entry), index, self.clock()
                )
            elif isinstance(action, CheckStart):
                plan_of, source, after = self.check_start(action)
                action = machine.on_start_check(plan_of, source, after, self.clock())
            elif isinstance(action, ClaimSlot):
                try:
                    outcome = self.claim(action)
                except _ReleaseChanged as err:
                    self.log(f"not claiming a slot on {action.source}: the release record changed ({err})")
                    # The machine ends the run, or (same run, still running) the claim is made again.
                    action = machine.on_release(self.read_release(), self.clock()) or action
                    continue
                if outcome.slot is not None:
                    self.log(f"claimed slot {outcome.slot} on {action.source}")
                action = machine.on_claim(outcome, self.clock())
            elif isinstance(action, WaitForSlots):
                prefix = self.schema.slots_prefix(self.app, action.source)
                index, _keys = self.read(prefix, action.index, action.wait, keys=True)
                action = self.after_wait(machine, action.index, index) or machine.on_slots_changed(self.clock())
            elif isinstance(action, ListNodes):
                self.log(f"looking for another source: {action.reason}")
                action = machine.on_nodes(self.list_nodes(), self.clock())
            elif isinstance(action, Sleep):
                self.sleep(action.seconds)
                action = machine.on_release(self.read_release(), self.clock()) or machine.on_slept(self.clock())
            elif isinstance(action, RunTask):
                ok, error, source_down = self.run(action)
                action = machine.on_task(ok, error, self.clock(), source_down)
            elif isinstance(action, ReleaseSlot):
                recorded = self.release_and_record(action)
                action = machine.on_released(recorded, self.clock())
            else:
                raise TypeError(f"unknown action {action!r}")

    def after_wait(self, machine: PullMachine, waited: int, index: int):
        """Re-read the release when a blocking read came back unchanged (it timed out) or ended
        at or past ``machine.release_due``: Consul may return reads with a raised index although
        nothing changed, and an abort must still be seen within ``max_wait``. Otherwise the
        change of the key read is handled at once."""
        if not waited or (index != waited and self.clock() < machine.release_due):
            return None
        return machine.on_release(self.read_release(), self.clock())


def pull(
    client,
    app: str,
    node: str,
    run_task: RunTaskFn,
    *,
    schema: Schema = Schema(),
    timings: PullTimings = PullTimings(),
    log: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    session_ttl: int = DEFAULT_SESSION_TTL,
    retry_window: float = DEFAULT_RETRY_WINDOW,
) -> PullResult:
    """Bring ``node`` to the current release of ``app``; return how it ended.

    ``client`` is a ``consul.Consul`` talking to ``node``'s own agent. The fan-out and the
    version come from the release record. ``run_task(SourceInfo)`` runs the app's commands
    and returns ``(ok, error)``; it is called once per run, again only after a failure while
    its source's node was down (then against another source). ``log`` receives one
    line per decision. ``clock`` (epoch seconds) stamps records and measures graces and
    ``timings.watch_timeout``. Raises FireapConsulError when Consul stays unreachable beyond
    ``retry_window`` s or refuses a request, ``PullError`` when the release or plan record is
    malformed; ValueError for an invalid app or node name. The session is destroyed in every
    case.
    """
    if isinstance(session_ttl, bool) or not isinstance(session_ttl, int) or not 10 <= session_ttl <= 86400:
        raise ValueError(f"session_ttl must be an integer number of seconds in 10..86400, got {session_ttl!r}")
    driver = _PullDriver(
        client, schema, app, node, run_task, timings, log or (lambda _msg: None), clock, sleep, session_ttl,
        retry_window,
    )
    try:
        result = driver.drive()
    finally:
        driver.end_session()
    driver.log(result.reason)
    return result
