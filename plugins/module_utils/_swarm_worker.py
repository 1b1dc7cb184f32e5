# SPDX-License-Identifier: MIT
"""One node's part in a release of an app with an artifact: the swarm instead of a source.

A target (``serve``, not the leader) records itself ``pulling`` (held by its session, so a
crash shows as today; the source it names is the run's leader, the artifact's origin, at depth
1), reads and checks the run's torrent metadata (``<app>/artifact/<run_id>``, by
``_swarm.check_metadata`` against the release's name, size and info-hash), opens a swarm on its
catalog address at its app's ``artifact.port``, connects to the neighbours its plan entry lists
(``ADDRESS:PORT``, checked again; the nodes that connect to it are the ones that list it),
downloads the file into its own artifact path, checks it against the release's checksum, and
only then runs the app's commands with ``{{ artifact }}``. While it downloads it adds its
progress to its record at each quarter of the file, at most every PROGRESS_SECONDS (at most 3
writes), and its final record keeps when the download ended (``fetched``). It records ``done``
or ``failed`` as a pull does.

The run ends on one key, ``<app>/swarm/<run_id>`` (``SwarmRun``, created by the fire): the
leader's worker reads the run's node records (one recursive read, at its own node only, at
most every SCAN_SECONDS, blocking while nothing changes) and once every target is done, failed
or crashed (unfinished and no longer held by a session) it writes there when the run finished;
when it cannot serve its file (changed since the fire, say) it writes why instead and the
targets fail with that at once. Targets with no record in the run SILENT_SECONDS after it began
serving (gossip lost their event) get the event again from it, alone (``wake_silent``). Every
other node blocks on that key (and re-reads the release after each wake-up, at least every
MAX_WAIT s, so an abort or a new run ends its part) and stops serving ``seed_seconds`` after
the run finished (blocking on the release record meanwhile: an abort or a newer run ends those
at once), or after ``watch_timeout``. So a target makes O(1) requests whatever the number of
nodes; only the leader reads O(N) bytes, throttled.

While it serves, the leader's worker holds its own node record with its session, as a target
holds its ``pulling`` record. When that worker ends before the run is over (killed, crashed, its
agent gone), the record is no longer held once Consul ends the session (at once for a destroyed
session or a failed serfHealth, within 2 x the session's TTL for a killed process); every target
still in the run sees it at its next wake-up (at most MAX_WAIT s later: one more read per
wake-up) and fires the run's event to the leader alone, once per hold that ended, so that the
leader's handler starts a worker that serves again and ends the run. The targets do not fail:
other nodes may hold the whole file and keep serving it.
A target that finds the run finished while it still fetches was counted as over by the leader
(its earlier worker crashed) before it recorded itself pulling: it reopens the run and fires the
event to the leader (``_RunWatch.reopen``).

The session, the blocking reads and the record writes are the pull worker's (``_worker``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Iterator

from ansible_collections.fireap.consul.plugins.module_utils._connection import DEFAULT_RETRY_WINDOW
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError, InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._firing import reopen_swarm_run, wake
from ansible_collections.fireap.consul.plugins.module_utils._integrity import file_mismatch
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_DONE,
    NODE_FAILED,
    NODE_PULLING,
    KVRecordError,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    Schema,
    SwarmRun,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import PullTimings
from ansible_collections.fireap.consul.plugins.module_utils._swarm import (
    Metadata,
    Swarm,
    SwarmError,
    check_metadata,
)
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import ArtifactConfig
from ansible_collections.fireap.consul.plugins.module_utils._validation import artifact_path, check_ip, clip
from ansible_collections.fireap.consul.plugins.module_utils._worker import (
    DEFAULT_SESSION_TTL,
    _PullDriver,
)

#: Longest blocking read of the run's swarm record or node records: an abort is seen within it.
MAX_WAIT = 10.0
#: The leader reads the run's node records at most once per SCAN_SECONDS.
SCAN_SECONDS = 3.0
#: Pause after a failed read before the next one.
RETRY_PAUSE = 1.0
#: A target writes its download progress at most once per PROGRESS_SECONDS and per quarter.
PROGRESS_SECONDS = 2.0
#: Seconds after the leader began serving, and then between two tries, after which it fires the
#: event again to the targets that have no record in the run: gossip did not bring it to them
#: (an operator's wait re-fires to stragglers only every 30 s by default).
SILENT_SECONDS = 10.0

#: ``run_task(path) -> (ok, error)``: the app's commands with ``{{ artifact }}`` = ``path``.
RunArtifactTask = Callable[[str], "tuple[bool, str | None]"]


class _RunWatch(threading.Thread):
    """Blocks on the run's swarm record and sets ``ended`` once the leader wrote that the run
    finished or that it cannot serve (``record``), or the run is no longer the current one
    (the release is re-read after every wake-up, at least every MAX_WAIT s)."""

    def __init__(self, serving: _Serving) -> None:
        super().__init__(name="fireap-swarm-run", daemon=True)
        self.serving = serving
        self.stopped = threading.Event()
        self.ended = threading.Event()
        self.record: SwarmRun | None = None
        #: The leader's hold (LockIndex) whose end this node fired the event for.
        self.woken_for: int | None = None
        #: Whether the download is still under way (see ``reopen``).
        self.fetching = True

    def run(self) -> None:
        driver, key = self.serving.driver, self.serving.run_key
        index = 0
        while not self.stopped.is_set() and time.monotonic() < self.serving.deadline:
            try:
                index, entry = driver.read(key, index, min(MAX_WAIT, max(0.0, self.serving.deadline - time.monotonic())))
                record = driver.parse(SwarmRun, key, entry)
                if record is not None and record.over:
                    if self.fetching and record.refused is None:
                        self.reopen(record, entry)
                        continue
                    self.record = record
                    self.ended.set()
                    return
                if not self.serving.current():
                    self.ended.set()
                    return
                self.wake_leader_if_gone()
            except FireapError as err:
                driver.log(f"cannot read {key}: {err}")
                index = 0
                self.stopped.wait(RETRY_PAUSE)

    def reopen(self, record: SwarmRun, entry) -> None:
        """The run was recorded finished while this node still fetches: the leader counted this
        node's earlier worker (crashed: its record no longer held) as over before this one
        recorded itself pulling, as a re-fire or a replayed event can start it. Reopen the run
        (``reopen_swarm_run``; after a failed write the newer record is read next) and fire
        the event to the leader, whose handler serves an open record again; should its worker
        still be seeding, its hold's end wakes it (``wake_leader_if_gone``)."""
        driver, release = self.serving.driver, self.serving.release
        key = self.serving.run_key
        driver.log(f"the leader recorded run {release.run_id} over while this node fetches (it counted this "
                   "node's earlier worker as over): reopening the run and firing the event to the leader")
        if driver.call(f"reopening {key}", reopen_swarm_run, driver.client, key, record, entry["ModifyIndex"]):
            driver.call(f"firing the event to {release.leader}", wake, driver.client, release, [release.leader])

    def wake_leader_if_gone(self) -> None:
        """The leader's worker holds the leader's node record with its session while it serves:
        held once (LockIndex) and no longer while the run is not over, the worker ended (crashed,
        killed, its agent gone). Fire the event to the leader again, once per hold that ended."""
        driver, release = self.serving.driver, self.serving.release
        key = driver.schema.node(release.app, release.leader)
        _index, entry = driver.read(key)
        hold = None if entry is None else entry.get("LockIndex")
        if not isinstance(hold, int) or hold < 1 or entry.get("Session") or hold == self.woken_for:
            return
        self.woken_for = hold
        driver.log(f"the leader {release.leader} stopped serving before the run was over ({key} no longer held): "
                   "firing the event to it again")
        driver.call(f"firing the event to {release.leader}", wake, driver.client, release, [release.leader])

    def why_ended(self) -> str:
        """Why the download stopped early, for the target's failed record."""
        if self.record is not None and self.record.refused is not None:
            return f"the leader cannot serve the artifact: {self.record.refused}"
        if self.record is not None:
            return "the leader recorded the run over before the artifact arrived"
        return "the run ended before the artifact arrived"


def end_run(driver: _PullDriver, release: ReleaseRecord, refused: str | None = None) -> None:
    """The leader's last word on the run in its swarm record: when it finished, or why the
    leader cannot serve (``refused``). Written by check-and-set; a record already over stays."""
    key = driver.schema.swarm_run(release.app, release.run_id)
    for _attempt in range(3):
        _index, entry = driver.read(key)
        record = driver.parse(SwarmRun, key, entry)
        if record is None or record.over:
            return
        if refused is None:
            update = dataclasses.replace(record, finished=driver.clock())
        else:
            update = dataclasses.replace(record, refused=clip(refused))
        if driver.call(f"writing {key}", driver.client.kv.put, key, update.to_json(), cas=entry["ModifyIndex"]):
            return
    driver.log(f"could not write {key}: it kept changing")


def catalog_address(driver: _PullDriver, node: str) -> str:
    """The catalog address of ``node``, if it is an IP literal (InvalidValue otherwise)."""
    _index, info = driver.call(f"looking up node {node}", driver.client.catalog.node, node)
    return check_ip(((info or {}).get("Node") or {}).get("Address"))


class _Serving:
    """What one node does for one run of an artifact (see the module docstring)."""

    def __init__(self, driver: _PullDriver, release: ReleaseRecord, app: ArtifactConfig, timeout: float,
                 upload_slots: int) -> None:
        self.driver = driver
        self.release = release
        self.schema = driver.schema
        self.path = artifact_path(app.path, release.app, release.version)
        self.seed_seconds = app.seed_seconds
        self.port = app.port
        self.rate_limit = app.rate_limit
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.upload_slots = upload_slots
        self.started = driver.clock()
        self.run_key = self.schema.swarm_run(release.app, release.run_id)
        self.fetched: float | None = None
        self.progress_step = 0
        self.progress_at = time.monotonic()

    def state(self, status: str, error: str | None = None, downloaded: int | None = None,
              rate: int | None = None) -> NodeState:
        finished = None if status == NODE_PULLING else self.driver.clock()
        return NodeState(version=self.release.version, run_id=self.release.run_id, status=status,
                         started=self.started, source=self.release.leader, depth=1, finished=finished,
                         error=None if error is None else clip(error), downloaded=downloaded, rate=rate,
                         fetched=self.fetched)

    def progress(self, downloaded: int, rate: int) -> None:
        """Add the download's progress to the node's record at each quarter of the file it
        passes (the last one is the done record), at most every PROGRESS_SECONDS."""
        step = downloaded * 4 // self.release.artifact.length
        if step <= self.progress_step or step >= 4 or time.monotonic() - self.progress_at < PROGRESS_SECONDS:
            return
        self.progress_step, self.progress_at = step, time.monotonic()
        if not self.driver.write_state(self.state(NODE_PULLING, downloaded=downloaded, rate=rate)):
            self.driver.log("could not record the download's progress: the node's record changed meanwhile")

    def metadata(self) -> Metadata:
        artifact = self.release.artifact
        if artifact is None:
            raise SwarmError(f"the app has an artifact on this node, but run {self.release.run_id} carries none: "
                             "its targets did not all advertise the artifact when it was fired; fire it again")
        if os.path.basename(self.path) != artifact.name:
            raise SwarmError(f"this node's artifact path {self.path} is not named {artifact.name} as the release's: "
                             "its artifact.path must render the same file name on every node")
        key = self.schema.artifact(self.release.app, self.release.run_id)
        _index, entry = self.driver.read(key)
        if entry is None:
            raise SwarmError(f"the run's artifact metadata {key} is missing")
        return check_metadata(entry.get("Value"), name=artifact.name, length=artifact.length,
                              info_hash=artifact.info_hash)

    def neighbours(self) -> tuple[str, ...]:
        """This node's swarm neighbours: the leader's from the run's swarm record, a target's
        from its plan entry (both checked when read: IP literals, ports, at most 8)."""
        if self.driver.node == self.release.leader:
            _index, entry = self.driver.read(self.run_key)
            record = self.driver.parse(SwarmRun, self.run_key, entry)
            if record is None:
                raise SwarmError(f"the run's swarm record {self.run_key} is missing or malformed")
            return record.leader_peers
        key = self.schema.plan(self.release.app, self.release.run_id, self.driver.node)
        _index, entry = self.driver.read(key)
        plan = self.driver.parse(PlanEntry, key, entry)
        if plan is None or plan.peers is None:
            raise SwarmError(f"the run's plan gives this node no swarm neighbours ({key})")
        return plan.peers

    def open_swarm(self) -> Swarm:
        """A swarm on this node's catalog address and the app's port, joined to its neighbours."""
        swarm = Swarm(catalog_address(self.driver, self.driver.node), self.port, self.upload_slots, self.rate_limit)
        try:
            swarm.connect(self.neighbours())
        except BaseException:
            swarm.close()
            raise
        return swarm

    def hold_own_record(self) -> None:
        """The leader holds its own node record with its session while it serves (its value
        unchanged), so that the targets see its worker end before the run is over as a
        target's crash is seen: a record no longer held (``_RunWatch.wake_leader_if_gone``)."""
        key = self.schema.node(self.release.app, self.driver.node)
        _index, entry = self.driver.read(key)
        if entry is None:
            self.driver.log(f"{key} is missing: the targets cannot see this worker end")
            return
        self.driver.written = entry.get("Value")
        self.driver.ensure_session()
        if not self.driver.call(f"holding {key}", self.driver.client.kv.put, key, self.driver.written,
                                acquire=self.driver.session_id):
            self.driver.log(f"{key} is held by another session: the targets cannot see this worker end")

    def finished_targets(self, entries) -> int:
        """How many records among ``entries`` (the app's node records) are the run's and done,
        failed or left by a crashed worker (the leader's own is done)."""
        count = 0
        for entry in entries or ():
            state = self.driver.parse(NodeState, entry["Key"], entry)
            if state is not None and (state.run_id == self.release.run_id
                                      and (state.terminal or state.crashed(self.release.run_id,
                                                                           bool(entry.get("Session"))))):
                count += 1
        return count

    def lead_until_over(self) -> bool:
        """The leader: wait until every target of the run is done, failed or crashed, reading
        their records at most every SCAN_SECONDS, then record the run finished. False when the
        run stopped being the current one or watch_timeout passed first."""
        prefix = self.schema.nodes_prefix(self.release.app)
        index = 0
        wake_at = time.monotonic() + SILENT_SECONDS
        while time.monotonic() < self.deadline:
            began = time.monotonic()
            index, entries = self.driver.read(prefix, index, min(MAX_WAIT, max(0.0, self.deadline - began)),
                                              recurse=True)
            if not self.current():
                return False
            if self.finished_targets(entries) >= self.release.target_count:
                end_run(self.driver, self.release)
                return True
            if began >= wake_at:
                self.wake_silent(entries)
                wake_at = began + SILENT_SECONDS
            self.driver.sleep(max(0.0, min(began + SCAN_SECONDS, self.deadline) - time.monotonic()))
        self.driver.log(f"stopped serving after {self.timeout:g} s (watch_timeout): some targets have not finished")
        return False

    def wake_silent(self, entries) -> None:
        """Fire the event again to the targets with no record in the run (``entries``: the
        app's node records), but those whose stage a canary gate holds: they start on resume."""
        release = self.release
        recorded = {release.leader}
        for name, state in self._records(NodeState, entries):
            if state.run_id == release.run_id:
                recorded.add(name)
        if len(recorded) >= release.target_count:
            return
        _index, plans = self.driver.read(self.schema.plan_prefix(release.app, release.run_id), recurse=True)
        silent = [name for name, plan in self._records(PlanEntry, plans)
                  if name not in recorded and not release.holds(plan.stage)]
        if silent:
            self.driver.log(f"{len(silent)} targets have no record in run {release.run_id} after {SILENT_SECONDS:g} s "
                            "or more (gossip did not bring them the event): firing it to them again")
            self.driver.call("firing the event to the silent targets", wake, self.driver.client, release, silent)

    def _records(self, cls, entries) -> Iterator[tuple[str, Any]]:
        """``(node, record)`` of the well-formed entries of nodes/ or a run's plan/ (others logged and skipped)."""
        for entry in entries or ():
            try:
                name = self.schema.node_name(self.release.app, entry["Key"])
            except InvalidValue as err:
                self.driver.log(f"ignoring {err}")
                continue
            record = self.driver.parse(cls, entry["Key"], entry)
            if record is not None:
                yield name, record

    def follow_until_over(self, watch: _RunWatch) -> bool:
        """Another node: wait until the leader recorded the run finished (True) or the run ended
        otherwise (False)."""
        if not watch.ended.wait(max(0.0, self.deadline - time.monotonic())):
            self.driver.log(f"stopped serving after {self.timeout:g} s (watch_timeout): the run was not over")
            return False
        return watch.record is not None and watch.record.finished is not None

    def seed_on(self) -> None:
        """Serve ``seed_seconds`` more (no longer than watch_timeout allows), blocking on the
        release record meanwhile, so that an abort or a newer run ends it at once: until then
        the node's worker, its lock and its port are this run's."""
        end = min(time.monotonic() + self.seed_seconds, self.deadline)
        key = self.schema.release(self.release.app)
        index = 0
        while time.monotonic() < end:
            try:
                index, entry = self.driver.read(key, index, min(MAX_WAIT, max(0.0, end - time.monotonic())))
            except FireapError as err:
                self.driver.log(f"cannot read {key}: {err}")
                index = 0
                self.driver.sleep(max(0.0, min(RETRY_PAUSE, end - time.monotonic())))
                continue
            if not self.names_run(entry):
                self.driver.log(f"run {self.release.run_id} is no longer current: serving no more")
                return

    def names_run(self, entry) -> bool:
        """Whether the release record ``entry`` still names this run, running."""
        if entry is None:
            return False
        try:
            release = ReleaseRecord.from_json(entry.get("Value"), self.schema.release(self.release.app))
        except KVRecordError:  # it names no run to serve
            return False
        return release.run_id == self.release.run_id and not release.aborted

    def current(self) -> bool:
        """Whether the release record still names this run, running (one read)."""
        _index, entry = self.driver.read(self.schema.release(self.release.app))
        return self.names_run(entry)


def serve(client, release: ReleaseRecord, node: str, artifact: ArtifactConfig | None, run_task: RunArtifactTask, *,
          timeout: float, upload_slots: int, schema: Schema = Schema(),
          log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
          sleep: Callable[[float], None] = time.sleep, session_ttl: int = DEFAULT_SESSION_TTL,
          retry_window: float = DEFAULT_RETRY_WINDOW) -> tuple[bool, str]:
    """Take part in ``release`` (a run of an app whose ``artifact`` is as given, None: the app
    has none here) as ``node``: the leader serves its file, a target fetches it, runs
    ``run_task(path)`` and records the outcome; both serve until the run is over.
    ``(ok, what happened)``; FireapConsulError when Consul stays unreachable."""
    driver = _PullDriver(client, schema, release.app, node, None, PullTimings(), log or (lambda _msg: None),
                         clock, sleep, session_ttl, retry_window)
    try:
        return _serve(driver, release, artifact, run_task, timeout, upload_slots)
    finally:
        driver.end_session()


def _serve(driver: _PullDriver, release: ReleaseRecord, artifact: ArtifactConfig | None, run_task: RunArtifactTask,
           timeout: float, upload_slots: int) -> tuple[bool, str]:
    if driver.node == release.leader:
        return _lead(driver, release, artifact, timeout, upload_slots)
    if artifact is None:
        return _failed(driver, release, f"run {release.run_id} carries the artifact {release.artifact.name}, but "
                                        "the app has no artifact on this node: set its artifact.path and apply "
                                        "the role")
    serving = _Serving(driver, release, artifact, timeout, upload_slots)
    own_key = driver.schema.node(release.app, driver.node)
    _index, own = driver.read(own_key)
    driver.written = None if own is None else own.get("Value")
    driver.ensure_session()
    if not driver.write_state(serving.state(NODE_PULLING)):
        return False, f"{own_key} changed meanwhile: another worker of this node is at it"
    try:
        metadata = serving.metadata()
        swarm = serving.open_swarm()
    except (FireapError, ValueError) as err:
        return _failed(driver, release, str(err), serving)
    watch = _RunWatch(serving)
    watch.start()
    try:
        outcome = _fetch_and_run(driver, serving, swarm, metadata, run_task, watch)
        if swarm.seeding and serving.follow_until_over(watch):
            serving.seed_on()
        return outcome
    finally:
        watch.stopped.set()
        swarm.close()


def _lead(driver: _PullDriver, release: ReleaseRecord, artifact: ArtifactConfig | None, timeout: float,
          upload_slots: int) -> tuple[bool, str]:
    """The leader serves its own file until the run is over, then ``seed_seconds`` more; when
    it cannot, it says why in the run's swarm record, so that the targets fail at once."""
    if artifact is None:
        reason = f"run {release.run_id} carries an artifact, which this leader's task config does not declare"
        end_run(driver, release, reason)
        return False, reason
    serving = _Serving(driver, release, artifact, timeout, upload_slots)
    _index, entry = driver.read(serving.run_key)
    record = driver.parse(SwarmRun, serving.run_key, entry)
    if record is not None and record.over:
        return True, f"run {release.run_id} is over: nothing to serve"
    try:
        metadata = serving.metadata()
        mismatch = file_mismatch(serving.path, release.checksum)
        if mismatch is not None:
            raise SwarmError(mismatch)
        swarm = serving.open_swarm()
    except (FireapError, ValueError) as err:
        reason = f"cannot serve the artifact: {err}"
        end_run(driver, release, reason)
        return False, reason
    try:
        swarm.seed(metadata, serving.path)
        serving.hold_own_record()
        if serving.lead_until_over():
            serving.seed_on()
        return True, f"served {serving.path}"
    finally:
        swarm.close()


def _fetch_and_run(driver: _PullDriver, serving: _Serving, swarm: Swarm, metadata: Metadata,
                   run_task: RunArtifactTask, watch: _RunWatch) -> tuple[bool, str]:
    release = serving.release
    try:
        downloaded = swarm.fetch(metadata, serving.path, release.checksum, release.run_id,
                                 serving.deadline - time.monotonic(), watch.ended, serving.progress, app=release.app)
    except (FireapError, OSError) as err:
        watch.fetching = False
        reason = watch.why_ended() if watch.ended.is_set() else f"the artifact could not be fetched: {err}"
        return _failed(driver, release, reason, serving)
    watch.fetching = False
    serving.fetched = driver.clock()
    rejected = ""
    if swarm.hash_failures:
        rejected = (f"; {swarm.hash_failures} pieces failed their hash check and were fetched again"
                    + (f" (peers banned for them: {', '.join(sorted(swarm.banned))})" if swarm.banned else ""))
    driver.log(f"fetched and verified {serving.path}{rejected}")
    try:
        ok, error = run_task(serving.path)
    except Exception as err:  # a task runner bug must still leave a failed record
        ok, error = False, f"task runner raised {type(err).__name__}: {err}"
    if not ok:
        return _failed(driver, release, error or "the app's commands failed", serving)
    if not driver.write_state(serving.state(NODE_DONE, downloaded=downloaded)):
        return False, "could not record done: the node's record changed meanwhile"
    return True, f"done at version {release.version}"


def _failed(driver: _PullDriver, release: ReleaseRecord, error: str,
            serving: _Serving | None = None) -> tuple[bool, str]:
    """Record the run failed on this node with ``error``."""
    started = serving.started if serving is not None else driver.clock()
    state = NodeState(version=release.version, run_id=release.run_id, status=NODE_FAILED, started=started,
                      finished=driver.clock(), error=clip(error), fetched=serving.fetched if serving else None)
    if driver.session_id is None and driver.written is None:
        _index, own = driver.read(driver.schema.node(release.app, driver.node))
        driver.written = None if own is None else own.get("Value")
    driver.write_state(state)
    return False, error
