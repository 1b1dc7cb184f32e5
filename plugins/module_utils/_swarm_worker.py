# SPDX-License-Identifier: MIT
"""One node's part in a release of an app with an artifact: the swarm instead of a source.

A target (``serve``, not the leader) records itself ``pulling`` (held by its session, so a
crash shows as today; the source it names is the run's leader, the artifact's origin, at depth
1), reads and checks the run's torrent metadata (``<app>/artifact/<run_id>``, by
``_swarm.check_metadata`` against the release's name, size and info-hash), opens a swarm on its
catalog address, publishes the port under ``<app>/swarm/<run_id>/<node>``, connects to every
peer published there as they appear (a blocking read of that folder in a thread of its own; a
peer's address is its node's catalog address), downloads the file into its own artifact path,
checks it against the release's checksum, and only then runs the app's commands with
``{{ artifact }}``. It records ``done`` or ``failed`` as a pull does, then keeps serving until
every target of the run is done or failed, and then for the app's ``seed_seconds`` at most.

The leader serves its own file, the one the metadata was made from, the same way. Every wait is
bounded by the app's ``watch_timeout``; a release replaced or aborted meanwhile ends the download
(within MAX_WAIT s; the node records the run failed) and the serving.

The session, the blocking reads and the record writes are the pull worker's (``_worker``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from ansible_collections.fireap.consul.plugins.module_utils._connection import DEFAULT_RETRY_WINDOW
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._integrity import file_mismatch
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_DONE,
    NODE_FAILED,
    NODE_PULLING,
    KVRecordError,
    NodeState,
    ReleaseRecord,
    Schema,
    SwarmPeer,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import PullTimings
from ansible_collections.fireap.consul.plugins.module_utils._swarm import (
    Metadata,
    Swarm,
    SwarmError,
    check_ip,
    check_metadata,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import artifact_path, clip, show
from ansible_collections.fireap.consul.plugins.module_utils._worker import (
    DEFAULT_SESSION_TTL,
    _PullDriver,
    _ReleaseMalformed,
)

#: Longest blocking read of the run's peers or node records.
MAX_WAIT = 10.0
#: Pause after a failed read of the peers before the next one.
RETRY_PAUSE = 1.0

#: ``run_task(path) -> (ok, error)``: the app's commands with ``{{ artifact }}`` = ``path``.
RunArtifactTask = Callable[[str], "tuple[bool, str | None]"]


class _Peers(threading.Thread):
    """Connects the swarm to every node that publishes a port under the run, as they come, and
    sets ``ended`` once the run is no longer the current one (checked at every wake-up, at
    least every MAX_WAIT s)."""

    def __init__(self, driver: _PullDriver, swarm: Swarm, prefix: str, deadline: float,
                 current: Callable[[], bool]) -> None:
        super().__init__(name="fireap-swarm-peers", daemon=True)
        self.driver = driver
        self.swarm = swarm
        self.prefix = prefix
        self.deadline = deadline
        self.current = current
        self.stopped = threading.Event()
        self.ended = threading.Event()
        self.addresses: dict[str, str] = {}

    def run(self) -> None:
        index = 0
        while not self.stopped.is_set() and time.monotonic() < self.deadline:
            try:
                index, entries = self.driver.read(self.prefix, index, MAX_WAIT, recurse=True)
                if not self.current():
                    self.ended.set()
                    return
                if not self.stopped.is_set():
                    self.swarm.connect(self.peers(entries or ()))
            except FireapError as err:
                self.driver.log(f"cannot read the swarm's peers: {err}")
                index = 0
                self.stopped.wait(RETRY_PAUSE)

    def peers(self, entries) -> list[tuple[str, int]]:
        """The published peers, each at its node's catalog address (read once per new node)."""
        found = []
        for entry in entries:
            node = entry["Key"][len(self.prefix):]
            try:
                port = SwarmPeer.from_json(entry.get("Value"), entry["Key"]).port
                if node not in self.addresses:
                    self.addresses[node] = catalog_address(self.driver, node)
            except (KVRecordError, FireapError, ValueError) as err:
                self.driver.log(f"ignoring the swarm peer {show(node)}: {err}")
                continue
            found.append((self.addresses[node], port))
        return found


def catalog_address(driver: _PullDriver, node: str) -> str:
    """The catalog address of ``node``, if it is an IP literal (SwarmError otherwise)."""
    _index, info = driver.call(f"looking up node {node}", driver.client.catalog.node, node)
    return check_ip(((info or {}).get("Node") or {}).get("Address"))


class _Serving:
    """What one node does for one run of an artifact (see the module docstring)."""

    def __init__(self, driver: _PullDriver, release: ReleaseRecord, template: str, seed_seconds: float,
                 timeout: float, upload_slots: int) -> None:
        self.driver = driver
        self.release = release
        self.schema = driver.schema
        self.path = artifact_path(template, release.app, release.version)
        self.seed_seconds = seed_seconds
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.upload_slots = upload_slots
        self.started = driver.clock()
        self.targets: set[str] | None = None

    def state(self, status: str, error: str | None = None) -> NodeState:
        finished = None if status == NODE_PULLING else self.driver.clock()
        return NodeState(version=self.release.version, run_id=self.release.run_id, status=status,
                         started=self.started, source=self.release.leader, depth=1, finished=finished,
                         error=None if error is None else clip(error))

    def metadata(self) -> Metadata:
        artifact = self.release.artifact
        if artifact is None:
            raise SwarmError(f"the app has an artifact on this node, but run {self.release.run_id} carries none: "
                             "its targets did not all advertise the artifact when it was fired; fire it again")
        if os.path.basename(self.path) != artifact.name:
            raise SwarmError(f"this node's artifact path {self.path} is not named {artifact.name} as the release's: "
                             "give the app the same artifact.path on every node")
        key = self.schema.artifact(self.release.app, self.release.run_id)
        _index, entry = self.driver.read(key)
        if entry is None:
            raise SwarmError(f"the run's artifact metadata {key} is missing")
        return check_metadata(entry.get("Value"), name=artifact.name, length=artifact.length,
                              info_hash=artifact.info_hash)

    def open_swarm(self) -> Swarm:
        """A swarm on this node's catalog address, its port published under the run."""
        swarm = Swarm(catalog_address(self.driver, self.driver.node), 0, self.upload_slots)
        key = self.schema.swarm_peer(self.release.app, self.release.run_id, self.driver.node)
        self.driver.ensure_session()
        self.driver.call(f"writing {key}", self.driver.client.kv.put, key, SwarmPeer(swarm.port).to_json(),
                         acquire=self.driver.session_id)
        return swarm

    def over(self, index: int = 0) -> tuple[int, bool]:
        """``(index, whether every target of the run is done or failed)``, from a read of the
        run's node records that blocks while their index is ``index`` (0: at once)."""
        app, run_id = self.release.app, self.release.run_id
        if self.targets is None:
            _index, keys = self.driver.read(self.schema.plan_prefix(app, run_id), keys=True)
            self.targets = {key.rpartition("/")[2] for key in keys or ()}
        prefix = self.schema.nodes_prefix(app)
        index, entries = self.driver.read(prefix, index, min(MAX_WAIT, max(0.0, self.deadline - time.monotonic())),
                                          recurse=True)
        finished = set()
        for entry in entries or ():
            state = self.driver.parse(NodeState, entry["Key"], entry)
            if state is not None and state.run_id == run_id and state.terminal:
                finished.add(entry["Key"][len(prefix):])
        return index, self.targets <= finished

    def serve_until_over(self) -> None:
        """Return once every target of the run is done or failed, then ``seed_seconds`` later,
        or once the run is no longer the current one."""
        index = 0
        while time.monotonic() < self.deadline:
            index, over = self.over(index)
            if not self.current():
                return
            if over:
                self.driver.sleep(max(0.0, min(self.seed_seconds, self.deadline - time.monotonic())))
                return
        self.driver.log(f"stopped serving after {self.timeout:g} s (watch_timeout): some targets have not finished")

    def current(self) -> bool:
        """Whether the release record still names this run, running."""
        try:
            release = self.driver.read_release()
        except _ReleaseMalformed:  # it names no run to serve
            return False
        return release is not None and release.run_id == self.release.run_id and not release.aborted


def serve(client, release: ReleaseRecord, node: str, template: str | None, run_task: RunArtifactTask, *,
          seed_seconds: float, timeout: float, upload_slots: int, schema: Schema = Schema(),
          log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
          sleep: Callable[[float], None] = time.sleep, session_ttl: int = DEFAULT_SESSION_TTL,
          retry_window: float = DEFAULT_RETRY_WINDOW) -> tuple[bool, str]:
    """Take part in ``release`` (a run of an app whose ``template`` is its artifact path, None:
    the app has none here) as ``node``: the leader serves its file, a target fetches it,
    runs ``run_task(path)`` and records the outcome; both serve until the run is over.
    ``(ok, what happened)``; FireapConsulError when Consul stays unreachable."""
    driver = _PullDriver(client, schema, release.app, node, None, PullTimings(), log or (lambda _msg: None),
                         clock, sleep, session_ttl, retry_window)
    try:
        return _serve(driver, release, template, run_task, seed_seconds, timeout, upload_slots)
    finally:
        driver.end_session()


def _serve(driver: _PullDriver, release: ReleaseRecord, template: str | None, run_task: RunArtifactTask,
           seed_seconds: float, timeout: float, upload_slots: int) -> tuple[bool, str]:
    leader = driver.node == release.leader
    if template is None:
        if leader:
            return False, f"run {release.run_id} carries an artifact, which this leader's task config does not declare"
        return _failed(driver, release, f"run {release.run_id} carries the artifact {release.artifact.name}, but "
                                        "the app has no artifact on this node: set its artifact.path and apply "
                                        "the role")
    serving = _Serving(driver, release, template, seed_seconds, timeout, upload_slots)
    if leader and serving.over()[1]:
        return True, f"run {release.run_id} is over: nothing to serve"
    own_key = driver.schema.node(release.app, driver.node)
    _index, own = driver.read(own_key)
    driver.written = None if own is None else own.get("Value")
    if not leader:
        driver.ensure_session()
        if not driver.write_state(serving.state(NODE_PULLING)):
            return False, f"{own_key} changed meanwhile: another worker of this node is at it"
    try:
        metadata = serving.metadata()
        swarm = serving.open_swarm()
    except (FireapError, ValueError) as err:
        return (False, f"cannot serve the artifact: {err}") if leader else _failed(driver, release, str(err), serving)
    peers = _Peers(driver, swarm, driver.schema.swarm_prefix(release.app, release.run_id), serving.deadline,
                   serving.current)
    peers.start()
    try:
        if leader:
            mismatch = file_mismatch(serving.path, release.checksum)
            if mismatch is not None:
                return False, f"cannot serve the artifact: {mismatch}"
            swarm.seed(metadata, serving.path)
            outcome = (True, f"served {serving.path}")
        else:
            outcome = _fetch_and_run(driver, serving, swarm, metadata, run_task, peers.ended)
            if not outcome[0] and not os.path.isfile(serving.path):
                return outcome
        serving.serve_until_over()
        return outcome
    finally:
        peers.stopped.set()
        swarm.close()


def _fetch_and_run(driver: _PullDriver, serving: _Serving, swarm: Swarm, metadata: Metadata,
                   run_task: RunArtifactTask, ended: threading.Event) -> tuple[bool, str]:
    release = serving.release
    try:
        swarm.fetch(metadata, serving.path, release.checksum, release.run_id, serving.deadline - time.monotonic(),
                    ended)
    except (FireapError, OSError) as err:
        return _failed(driver, release, f"the artifact could not be fetched: {err}", serving)
    driver.log(f"fetched and verified {serving.path}")
    try:
        ok, error = run_task(serving.path)
    except Exception as err:  # a task runner bug must still leave a failed record
        ok, error = False, f"task runner raised {type(err).__name__}: {err}"
    if not ok:
        return _failed(driver, release, error or "the app's commands failed", serving)
    if not driver.write_state(serving.state(NODE_DONE)):
        return False, "could not record done: the node's record changed meanwhile"
    return True, f"done at version {release.version}"


def _failed(driver: _PullDriver, release: ReleaseRecord, error: str,
            serving: _Serving | None = None) -> tuple[bool, str]:
    """Record the run failed on this node with ``error``."""
    started = serving.started if serving is not None else driver.clock()
    state = NodeState(version=release.version, run_id=release.run_id, status=NODE_FAILED, started=started,
                      finished=driver.clock(), error=clip(error))
    if driver.session_id is None and driver.written is None:
        _index, own = driver.read(driver.schema.node(release.app, driver.node))
        driver.written = None if own is None else own.get("Value")
    driver.write_state(state)
    return False, error

