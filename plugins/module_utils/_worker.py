"""One node's pull for one app: the thin Consul adapter that drives ``PullMachine``.

``pull()`` reads the release, the node's plan entry and its own state, then performs each
action the machine asks for against the local agent and reports what it saw. All
decisions live in ``_propagation``; this module only does the I/O:

* a session (TTL, behavior release, lock-delay 0 so a crashed puller's slot is reusable at
  once, node check serfHealth) is created on the first write, renewed every TTL/2 by a
  background thread and destroyed at the end, also on errors;
* the node's own record is written with ``acquire`` of that session, so watchers can tell a
  crashed worker (record not finished, key no longer held) from a slow one; when the
  session was lost the write falls back to CAS on the record last written;
* waits are blocking queries on one key (``nodes/<node>``) or one source's slots prefix,
  at most ``max_wait`` s each, with a release re-read after each so an abort is noticed;
* Consul errors that a restarting agent causes (connection refused, 5xx, 429) are retried
  with backoff for up to ``retry_window`` s; the task itself is never run twice.

Requests per node do not grow with the cluster size, except in the fallback listing.
Only stdlib and py-consul: nodes run this without Ansible.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import consul
import requests

from ansible_collections.fireap.consul.plugins.module_utils._connection import backoff_delay
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    KVRecordError,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    Schema,
    check_name,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import (
    ClaimSlot,
    ListNodes,
    NodeView,
    PullMachine,
    PullResult,
    PullTimings,
    ReleaseSlot,
    Restart,
    RunTask,
    Sleep,
    WaitForNode,
    WaitForSlots,
    WriteState,
)

DEFAULT_SESSION_TTL = 15
DEFAULT_RETRY_WINDOW = 60.0


@dataclass(frozen=True)
class SourceInfo:
    """The node to pull from: its Consul node name and catalog address."""

    name: str
    address: str


#: ``run_task(source) -> (ok, error)``: runs the app's commands against ``source``.
RunTaskFn = Callable[[SourceInfo], "tuple[bool, str | None]"]


class PullError(Exception):
    """The pull could not proceed: Consul unreachable beyond the retries, or a malformed
    release or plan record (the message names the key)."""


class _SessionLost(Exception):
    """Consul no longer knows our session ("invalid session" on acquire or release)."""


def _is_session_error(err: Exception) -> bool:
    return isinstance(err, consul.ConsulException) and "session" in str(err).lower()


def _is_transient(err: Exception) -> bool:
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    if isinstance(err, consul.ConsulException) and not _is_session_error(err):
        return str(err)[:3] in ("429", "500", "502", "503", "504")
    return False


def _go_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class _Renewer(threading.Thread):
    """Renews the session every TTL/2 until stopped; flags the session lost on 404."""

    def __init__(self, client, session_id: str, ttl: float, log) -> None:
        super().__init__(name=f"fireap-renew-{session_id[:8]}", daemon=True)
        self.client = client
        self.session_id = session_id
        self.interval = ttl / 2
        self.log = log
        self.stopped = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        delay = self.interval
        while not self.stopped.wait(delay):
            try:
                self.client.session.renew(self.session_id)
                delay = self.interval
            except consul.NotFound:
                self.log(f"session {self.session_id} expired or was invalidated; slots it held may be lost")
                self.lost.set()
                return
            except Exception as err:  # keep renewing through agent restarts
                if not _is_transient(err):
                    self.log(f"renewing session {self.session_id} failed: {err}")
                delay = min(self.interval, 1.0)

    def stop(self) -> None:
        self.stopped.set()


class _Worker:
    def __init__(self, client, schema, app, node, run_task, timings, log, clock, sleep, session_ttl, retry_window):
        self.client = client
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

    # -- Consul calls with retries ----------------------------------------------------

    def call(self, what: str, fn, *args, **kwargs):
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if _is_session_error(err):
                    raise _SessionLost(f"{what}: {err}") from err
                if isinstance(err, consul.ConsulException) and not _is_transient(err):
                    raise PullError(f"Consul refused {what}: {err}") from err
                if not _is_transient(err):
                    raise
                attempt += 1
                delay = backoff_delay(attempt)
                if time.monotonic() - started + delay > self.retry_window:
                    raise PullError(f"Consul did not answer while {what} for {self.retry_window:g}s: {err}") from err
                self.log(f"{what}: {err}; retrying in {delay:.1f}s")
                self.sleep(delay)

    def read(self, key: str, index: int = 0, wait: float = 0.0, **kwargs):
        """``(index, value)`` of a KV read; blocks while the index is ``index`` (0: never)."""
        params = {"index": index, "wait": _go_duration(wait)} if index else {}
        new_index, value = self.call(f"reading {key}", self.client.kv.get, key, **params, **kwargs)
        # py-consul hands the X-Consul-Index header over as text.
        return int(new_index), value

    def read_release(self) -> ReleaseRecord | None:
        key = self.schema.release(self.app)
        _index, entry = self.read(key)
        return self.parse(ReleaseRecord, key, entry, strict=True)

    def parse(self, cls, key, entry, strict=False):
        if entry is None:
            return None
        try:
            return cls.from_json(entry.get("Value"), key)
        except KVRecordError as err:
            if strict:
                raise PullError(str(err)) from err
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
        try:
            self.session_id = self.call(
                "creating a session",
                self.client.session.create,
                name=f"fireap pull {self.app} on {self.node}",
                node=self.node,
                checks=["serfHealth"],
                lock_delay=0,
                behavior="release",
                ttl=self.session_ttl,
            )
        except _SessionLost as err:
            raise PullError(f"Consul refused to create a session for node {self.node}: {err}") from err
        self.renewer = _Renewer(self.client, self.session_id, self.session_ttl, self.log)
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

    def write_state(self, state: NodeState, in_pull: bool) -> bool:
        """Write our record holding it with the session; CAS when the session is gone mid-pull."""
        key = self.schema.node(self.app, self.node)
        value = state.to_json().encode("utf-8")
        if not in_pull:
            self.ensure_session()
        if not self.session_lost():
            try:
                ok = self.call(f"writing {key}", self.client.kv.put, key, value, acquire=self.session_id)
            except _SessionLost:
                self.renewer.lost.set()
            else:
                if ok:
                    self.written = value
                return ok
        self.log(f"session lost: writing {key} with check-and-set instead")
        _index, entry = self.read(key)
        if entry is not None and (entry.get("Session") not in (None, "", self.session_id) or entry["Value"] != self.written):
            return False
        ok = self.call(f"writing {key}", self.client.kv.put, key, value, cas=entry["ModifyIndex"] if entry else 0)
        if not ok:  # a retried write may have landed already
            _index, entry = self.read(key)
            ok = entry is not None and entry.get("Value") == value
        if ok:
            self.written = value
        return ok

    def claim(self, action: ClaimSlot) -> tuple[int | None, int, str | None]:
        self.ensure_session()
        prefix = self.schema.slots_prefix(self.app, action.source)
        index, entries = self.read(prefix, recurse=True)
        held = set()
        for entry in entries or ():
            if entry.get("Session"):
                held.add(entry["Key"][len(prefix):])
        for j in action.slots:
            if str(j) in held:
                continue
            key = self.schema.slot(self.app, action.source, j)
            try:
                got = self.call(f"acquiring {key}", self.client.kv.put, key, self.node, acquire=self.session_id)
            except _SessionLost:
                self.renewer.lost.set()
                return None, 0, None
            if not got:
                continue
            _idx, info = self.call(f"looking up node {action.source}", self.client.catalog.node, action.source)
            address = ((info or {}).get("Node") or {}).get("Address")
            if not address:
                self.release_slot(action.source, j)
                return None, index, f"node {action.source} has no address in the catalog"
            self.address = address
            return j, index, None
        return None, index, None

    def release_slot(self, source: str, slot: int) -> None:
        key = self.schema.slot(self.app, source, slot)
        if self.session_lost():
            self.log(f"session lost while holding {key}: the slot was freed when the session ended")
            return
        try:
            released = self.call(f"releasing {key}", self.client.kv.put, key, self.node, release=self.session_id)
        except _SessionLost:
            released = False
        if not released:
            self.log(f"{key} was no longer held by this worker (session lost while the task ran)")

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

    def run(self, action: RunTask):
        source = SourceInfo(action.source, self.address)
        self.log(f"pulling from {source.name} ({source.address}) over slot {action.slot}")
        try:
            ok, error = self.run_task(source)
        except Exception as err:  # a task runner bug must still leave a failed record
            ok, error = False, f"task runner raised {type(err).__name__}: {err}"
        if self.renewer is not None and self.renewer.lost.is_set():
            self.log("the session ended while the task ran: its slot may have been taken by another puller")
        return bool(ok), error

    # -- the loop ---------------------------------------------------------------------

    def drive(self) -> PullResult:
        while True:
            result = self.drive_run()
            if isinstance(result, PullResult):
                return result
            self.log(f"{result.reason}: starting over")

    def drive_run(self):
        release = self.read_release()
        plan_key = self.schema.plan(self.app, self.node)
        own_key = self.schema.node(self.app, self.node)
        plan = self.parse(PlanEntry, plan_key, self.read(plan_key)[1], strict=True)
        _index, own_entry = self.read(own_key)
        own = self.parse(NodeState, own_key, own_entry)
        self.written = own_entry.get("Value") if own_entry else None
        machine = PullMachine(self.node, release, plan, own, self.timings)
        action = machine.start(self.clock())
        in_pull = False
        while True:
            if isinstance(action, (PullResult, Restart)):
                return action
            if isinstance(action, WriteState):
                ok = self.write_state(action.state, in_pull)
                action = machine.on_written(ok, self.clock())
            elif isinstance(action, WaitForNode):
                key = self.schema.node(self.app, action.node)
                index, entry = self.read(key, action.index, action.wait)
                action = self.after_wait(machine, blocked=action.index > 0) or machine.on_node(
                    action.node, self.node_view(key, entry), index, self.clock()
                )
            elif isinstance(action, ClaimSlot):
                slot, index, unusable = self.claim(action)
                in_pull = slot is not None
                if in_pull:
                    self.log(f"claimed slot {slot} on {action.source}")
                action = machine.on_claim(slot, index, self.clock(), unusable=unusable)
            elif isinstance(action, WaitForSlots):
                prefix = self.schema.slots_prefix(self.app, action.source)
                self.read(prefix, action.index, action.wait, keys=True)
                action = self.after_wait(machine, blocked=action.index > 0) or machine.on_slots_changed(self.clock())
            elif isinstance(action, ListNodes):
                self.log(f"looking for another source: {action.reason}")
                action = machine.on_nodes(self.list_nodes(), self.clock())
            elif isinstance(action, Sleep):
                self.sleep(action.seconds)
                action = self.after_wait(machine) or machine.on_slept(self.clock())
            elif isinstance(action, RunTask):
                ok, error = self.run(action)
                action = machine.on_task(ok, error, self.clock())
            elif isinstance(action, ReleaseSlot):
                self.release_slot(action.source, action.slot)
                action = machine.on_released(self.clock())
            else:
                raise TypeError(f"unknown action {action!r}")

    def after_wait(self, machine: PullMachine, blocked: bool = True):
        """Re-read the release after a wait (not after a plain read) so an abort is seen."""
        if not blocked:
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
    and returns ``(ok, error)``; it is called at most once per run. ``log`` receives one
    line per decision. ``clock`` (epoch seconds) stamps records and measures graces and
    ``timings.watch_timeout``. Raises ``PullError`` when Consul stays unreachable beyond
    ``retry_window`` s or refuses a request, or when the release or plan record is malformed;
    ValueError for an invalid app or node name. The session is destroyed in every case.
    """
    if isinstance(session_ttl, bool) or not isinstance(session_ttl, int) or not 10 <= session_ttl <= 86400:
        raise ValueError(f"session_ttl must be an integer number of seconds in 10..86400, got {session_ttl!r}")
    worker = _Worker(
        client, schema, app, node, run_task, timings, log or (lambda _msg: None), clock, sleep, session_ttl, retry_window
    )
    try:
        result = worker.drive()
    finally:
        worker.end_session()
    worker.log(result.reason)
    return result
