"""The fireap KV schema: every key and every record under the prefix, in one place.

Keys (``<p>`` = prefix, default ``fireap/``)::

    <p><app>/release               ReleaseRecord   written by fireap_fire / fireap_clear
    <p><app>/lock                  LockRecord      fire lock, acquired with a session
    <p><app>/plan/<node>           PlanEntry       the node's preferred source (and its address), written by the leader
    <p><app>/nodes/<node>          NodeState       written only by that node (leader: fireap_fire)
    <p><app>/slots/<source>/<j>    puller name     j in 0..fanout-1, acquired with the puller's session
    <p><app>/artifact/<run_id>     torrent info    the bencoded info dict of the run's artifact (apps with one), by the leader
    <p><app>/swarm/<run_id>        SwarmRun        the run's swarm: the leader's neighbours, then when it finished (by the leader;
                                                   a re-fire to stragglers reopens it)
    <p>.apps/<node>                NodeAdvert      the apps of the node's task config, written by its handler

``.apps`` starts with a dot, which no app name does, so no app's keys can collide with it.

A worker writes its ``nodes/<node>`` record with ``acquire`` of its session, so a record
that is not finished (waiting/pulling) and no longer held belongs to a crashed worker.

Records are JSON objects. Reading validates every field by ``_validation``'s rules, the
ones the leader writes by: a malformed record raises ``KVRecordError`` naming the key, so a
corrupt or hostile value never crashes a worker, reaches a command or sizes an allocation. Unknown fields are ignored so that a newer
writer does not break an older reader. Times are float epoch seconds. Versions are
opaque strings compared by equality, never ordered.

This module is imported on nodes: stdlib only.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, ClassVar, TypeVar

from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError, InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    ARTIFACT_MAX,
    ERROR_MAX_LENGTH,
    FANOUT_MAX,
    FANOUT_MIN,
    LINE_MAX_LENGTH,
    STAGE_MAX,
    TARGETS_MAX,
    check_address,
    check_artifact_length,
    check_artifact_name,
    check_artifact_path,
    check_checksum,
    check_fanout,
    check_info_hash,
    check_int,
    check_name,
    check_peers,
    check_run_id,
    check_swarm_port,
    check_text,
    check_time,
    check_version,
    show,
)

DEFAULT_PREFIX = "fireap/"

PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.,/-]+")

RELEASE_RUNNING = "running"
RELEASE_ABORTED = "aborted"
RELEASE_STATUSES = (RELEASE_RUNNING, RELEASE_ABORTED)

# A node's progress for one run: "waiting" (worker started, looking for a source),
# "pulling" (slot held, task running), then "done" or "failed".
NODE_WAITING = "waiting"
NODE_PULLING = "pulling"
NODE_DONE = "done"
NODE_FAILED = "failed"
NODE_STATUSES = (NODE_WAITING, NODE_PULLING, NODE_DONE, NODE_FAILED)
NODE_TERMINAL_STATUSES = (NODE_DONE, NODE_FAILED)

FILTER_NAMES = ("node", "service", "tag")

# Consul's /v1/txn accepts up to 128 operations (64 on older releases).
TXN_MAX_OPS = 64

#: The KV folder (under the prefix) of the nodes' adverts.
ADVERTS_FOLDER = ".apps/"
#: Most apps one advert may list: what a reader of a hostile advert allocates stays bounded.
ADVERT_APPS_MAX = 1024


class KVRecordError(FireapError):
    """A value read from (or about to be written to) KV is not a valid record."""

    def __init__(self, key: str | None, reason: str) -> None:
        self.key = key
        self.reason = reason
        where = f"KV key {key!r}" if key else "record"
        super().__init__(f"malformed {where}: {reason}")


def check_prefix(prefix: Any) -> str:
    """Return ``prefix`` if it is a valid KV prefix (``fireap/``, ``ops/fireap/``); else ValueError."""
    if not isinstance(prefix, str) or not prefix:
        raise InvalidValue(f"KV prefix must be a non-empty string, got {prefix!r}")
    if prefix.startswith("/"):
        raise InvalidValue(f"KV prefix {prefix!r} must not start with '/'")
    if not prefix.endswith("/"):
        raise InvalidValue(f"KV prefix {prefix!r} must end with '/'")
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise InvalidValue(f"KV prefix {prefix!r} may only contain letters, digits and '_.,/-'")
    if "//" in prefix or any(part in (".", "..") for part in prefix[:-1].split("/")):
        raise InvalidValue(f"KV prefix {prefix!r} must not contain empty, '.' or '..' segments")
    return prefix


@dataclass(frozen=True)
class Schema:
    """Names every fireap key. All methods validate their name arguments."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    def app_prefix(self, app: str) -> str:
        """``<p><app>/``: everything fireap stores for one app (fireap_clear deletes it)."""
        return f"{self.prefix}{check_name(app, 'app')}/"

    def release(self, app: str) -> str:
        return self.app_prefix(app) + "release"

    def lock(self, app: str) -> str:
        return self.app_prefix(app) + "lock"

    def plans_prefix(self, app: str) -> str:
        """``<p><app>/plan/``: the plans of the app's runs, one folder per run ID."""
        return self.app_prefix(app) + "plan/"

    def plan_prefix(self, app: str, run_id: str) -> str:
        """``<p><app>/plan/<run_id>/``: one run's plan. A run's plan is complete before the
        release record names the run, however many transactions it took to write."""
        return self.plans_prefix(app) + check_run_id(run_id) + "/"

    def plan(self, app: str, run_id: str, node: str) -> str:
        return self.plan_prefix(app, run_id) + check_name(node, "node")

    def artifacts_prefix(self, app: str) -> str:
        """``<p><app>/artifact/``: the artifact metadata of the app's runs, one key per run ID."""
        return self.app_prefix(app) + "artifact/"

    def artifact(self, app: str, run_id: str) -> str:
        """``<p><app>/artifact/<run_id>``: the run's torrent metadata (a bencoded info dict). Derived
        from the run, never named by a record, so no record can send a node to another key."""
        return self.artifacts_prefix(app) + check_run_id(run_id)

    def swarms_prefix(self, app: str) -> str:
        """``<p><app>/swarm/``: the swarm peers of the app's runs, one folder per run ID."""
        return self.app_prefix(app) + "swarm/"

    def swarm_run(self, app: str, run_id: str) -> str:
        """``<p><app>/swarm/<run_id>``: the run's swarm (see SwarmRun), written by the fire so
        that it exists (a blocking read of a missing key wakes on every KV write)."""
        return self.swarms_prefix(app) + check_run_id(run_id)

    def history(self, app: str) -> str:
        """``<p><app>/history``: the app's last runs (see History)."""
        return self.app_prefix(app) + "history"

    def nodes_prefix(self, app: str) -> str:
        return self.app_prefix(app) + "nodes/"

    def node(self, app: str, node: str) -> str:
        return self.nodes_prefix(app) + check_name(node, "node")

    def slots_prefix(self, app: str, source: str) -> str:
        return self.app_prefix(app) + "slots/" + check_name(source, "source node") + "/"

    def slot(self, app: str, source: str, j: int) -> str:
        if not isinstance(j, int) or isinstance(j, bool) or j < 0:
            raise InvalidValue(f"slot number must be an integer >= 0, got {j!r}")
        return self.slots_prefix(app, source) + str(j)

    def adverts_prefix(self) -> str:
        """``<p>.apps/``: every node's advert of its apps (see NodeAdvert)."""
        return self.prefix + ADVERTS_FOLDER

    def advert(self, node: str) -> str:
        return self.adverts_prefix() + check_name(node, "node")

    def node_name(self, app: str, key: str) -> str:
        """The node a ``nodes/<node>`` or ``plan/<run_id>/<node>`` key belongs to (for listings)."""
        nodes, plans = self.nodes_prefix(app), self.plans_prefix(app)
        if key.startswith(nodes):
            return check_name(key[len(nodes):], "node")
        if key.startswith(plans):
            run_id, slash, node = key[len(plans):].partition("/")
            if slash and check_run_id(run_id):
                return check_name(node, "node")
        raise InvalidValue(f"KV key {key!r} is neither under {nodes!r} nor under {plans!r}<run_id>/")


# --- record field readers: each raises KVRecordError naming the key and the field ---


def _load_object(data: str | bytes | None, key: str | None) -> dict[str, Any]:
    if data is None:
        raise KVRecordError(key, "empty value")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KVRecordError(key, f"not UTF-8: {exc}") from None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise KVRecordError(key, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise KVRecordError(key, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _get(obj: dict[str, Any], name: str, key: str | None, kinds: tuple[type, ...], *, optional: bool = False) -> Any:
    if name not in obj or obj[name] is None:
        if optional:
            return None
        raise KVRecordError(key, f"missing field {name!r}")
    value = obj[name]
    # bool is an int in Python; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in kinds:
        raise KVRecordError(key, f"field {name!r} must be {'/'.join(k.__name__ for k in kinds)}, got {show(value)}")
    if not isinstance(value, kinds):
        raise KVRecordError(key, f"field {name!r} must be {'/'.join(k.__name__ for k in kinds)}, got {show(value)}")
    return value


def _checked(
    obj: dict[str, Any], name: str, key: str | None, check: Callable[[Any], Any], *, optional: bool = False
) -> Any:
    """Field ``name`` passed through ``check`` (one of ``_validation``'s rules)."""
    if name not in obj or obj[name] is None:
        if optional:
            return None
        raise KVRecordError(key, f"missing field {name!r}")
    try:
        return check(obj[name])
    except ValueError as exc:
        raise KVRecordError(key, f"field {name!r}: {exc}") from None


def _name(obj: dict[str, Any], name: str, key: str | None, *, optional: bool = False) -> str | None:
    return _checked(obj, name, key, lambda value: check_name(value, name), optional=optional)


def _int(obj: dict[str, Any], name: str, key: str | None, low: int, high: int) -> int:
    return _checked(obj, name, key, lambda value: check_int(value, name, low, high))


def _time(obj: dict[str, Any], name: str, key: str | None, *, optional: bool = False) -> float | None:
    return _checked(obj, name, key, lambda value: check_time(value, name), optional=optional)


def _line(obj: dict[str, Any], name: str, key: str | None, *, optional: bool = False) -> str | None:
    return _checked(obj, name, key, lambda value: check_text(value, name, LINE_MAX_LENGTH), optional=optional)


def _choice(obj: dict[str, Any], name: str, key: str | None, choices: tuple[str, ...]) -> str:
    value = _get(obj, name, key, (str,))
    if value not in choices:
        raise KVRecordError(key, f"field {name!r} must be one of {', '.join(choices)}, got {show(value)}")
    return value


def run_of(data: str | bytes | None, key: str | None = None) -> tuple[str, str] | None:
    """``(run_id, version)`` of a release value whose other fields may be malformed, or None
    when these two are not valid either: enough for a node to record that it failed the run."""
    try:
        obj = _load_object(data, key)
        return _checked(obj, "run_id", key, check_run_id), _checked(obj, "version", key, check_version)
    except KVRecordError:
        return None


def _revalidate(cls: type[_Record], record: _Record) -> None:
    """Run a record built in code through the reader, so writers and readers agree."""
    cls.from_json(record.to_json())


_RecordT = TypeVar("_RecordT", bound="_Record")


class _Record:
    """JSON (de)serialisation shared by the records below (each a dataclass with a reader)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    #: Fields left out when None: a record without them is written as before they existed.
    OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """Field name -> value, nested records as dicts. The fields hold JSON scalars only, so
        this skips dataclasses.asdict's deep copy, a third of a fire's CPU at 1000 targets."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is None and name in self.OPTIONAL_FIELDS:
                continue
            out[name] = value.to_dict() if isinstance(value, _Record) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls: type[_RecordT], data: str | bytes | None, key: str | None = None) -> _RecordT:
        """Parse and validate a KV value (py-consul returns bytes); ``key`` names it in errors."""
        return cls.from_dict(_load_object(data, key), key)

    @classmethod
    def from_dict(cls: type[_RecordT], obj: dict[str, Any], key: str | None = None) -> _RecordT:
        """Validate a parsed KV value field by field: each record has its own reader."""
        raise NotImplementedError


@dataclass(frozen=True)
class ReleaseFilters(_Record):
    """The event filters of a release (Go regexes, matched unanchored by Consul)."""

    node: str | None = None
    service: str | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        for name in FILTER_NAMES:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise KVRecordError(None, f"filter {name!r} must be a string or null, got {value!r}")
        if self.tag and not self.service:
            raise KVRecordError(None, "filter 'tag' requires filter 'service'")

    @classmethod
    def from_dict(cls, obj: Any, key: str | None = None) -> ReleaseFilters:
        if not isinstance(obj, dict):
            raise KVRecordError(key, f"field 'filters' must be an object, got {obj!r}")
        values = {name: _line(obj, name, key, optional=True) for name in FILTER_NAMES}
        if values["tag"] and not values["service"]:
            raise KVRecordError(key, "filter 'tag' requires filter 'service'")
        return cls(**values)


@dataclass(frozen=True)
class ReleaseArtifact(_Record):
    """The artifact of a release: the file ``name`` (the basename of the app's artifact path at
    the release's version), its ``length`` in bytes and the ``info_hash`` (v1, hex) of its torrent
    metadata, which lives at ``Schema.artifact(app, run_id)``."""

    name: str
    length: int
    info_hash: str

    def __post_init__(self) -> None:
        _revalidate(ReleaseArtifact, self)

    @classmethod
    def from_dict(cls, obj: Any, key: str | None = None) -> ReleaseArtifact:
        if not isinstance(obj, dict):
            raise KVRecordError(key, f"field 'artifact' must be an object, got {show(obj)}")
        record = object.__new__(cls)
        for name, value in (
            ("name", _checked(obj, "name", key, check_artifact_name)),
            ("length", _checked(obj, "length", key, check_artifact_length)),
            ("info_hash", _checked(obj, "info_hash", key, check_info_hash)),
        ):
            object.__setattr__(record, name, value)
        return record


@dataclass(frozen=True)
class ReleaseRecord(_Record):
    """``<app>/release``: the authoritative description of the current run of an app.

    ``target_count`` counts every node in the run, the leader included. ``pause_after_stage``:
    the canary gate: no target of a later plan stage starts until ``resumed_at`` is set.
    ``checksum``: the build's digest, which targets verify before their after_commands.
    ``artifact``: the file the swarm delivers (apps with an artifact), which requires the checksum:
    every target checks the whole file against it before any command runs.
    """

    app: str
    version: str
    run_id: str
    fanout: int
    leader: str
    target_count: int
    fired_at: float
    filters: ReleaseFilters = field(default_factory=ReleaseFilters)
    status: str = RELEASE_RUNNING
    aborted_reason: str | None = None
    pause_after_stage: int | None = None
    resumed_at: float | None = None
    checksum: str | None = None
    artifact: ReleaseArtifact | None = None

    OPTIONAL_FIELDS = ("artifact",)

    def __post_init__(self) -> None:
        if not isinstance(self.filters, ReleaseFilters):
            raise KVRecordError(None, f"filters must be a ReleaseFilters, got {self.filters!r}")
        if self.artifact is not None and not isinstance(self.artifact, ReleaseArtifact):
            raise KVRecordError(None, f"artifact must be a ReleaseArtifact, got {self.artifact!r}")
        _revalidate(ReleaseRecord, self)

    @property
    def aborted(self) -> bool:
        return self.status == RELEASE_ABORTED

    @property
    def paused(self) -> bool:
        """The run has a canary gate that is still closed."""
        return self.pause_after_stage is not None and self.resumed_at is None

    def holds(self, stage: int) -> bool:
        """Whether the closed canary gate holds a target of plan ``stage``."""
        return self.paused and stage > (self.pause_after_stage or 0)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> ReleaseRecord:
        record = object.__new__(cls)  # validated field by field here; skip __post_init__
        values = dict(
            app=_name(obj, "app", key),
            version=_checked(obj, "version", key, check_version),
            run_id=_checked(obj, "run_id", key, check_run_id),
            fanout=_checked(obj, "fanout", key, check_fanout),
            leader=_name(obj, "leader", key),
            target_count=_int(obj, "target_count", key, 1, TARGETS_MAX),
            fired_at=_time(obj, "fired_at", key),
            filters=ReleaseFilters.from_dict(obj.get("filters") or {}, key),
            status=_choice(obj, "status", key, RELEASE_STATUSES),
            aborted_reason=_line(obj, "aborted_reason", key, optional=True),
            pause_after_stage=_checked(obj, "pause_after_stage", key,
                                       lambda value: check_int(value, "pause_after_stage", 1, STAGE_MAX), optional=True),
            resumed_at=_time(obj, "resumed_at", key, optional=True),
            checksum=_checked(obj, "checksum", key, check_checksum, optional=True),
            artifact=None if obj.get("artifact") is None else ReleaseArtifact.from_dict(obj["artifact"], key),
        )
        if values["artifact"] is not None and values["checksum"] is None:
            raise KVRecordError(key, "field 'artifact' requires a 'checksum'")
        for name, value in values.items():
            object.__setattr__(record, name, value)
        return record


#: How a run was started: a release of a version, a retry of a run's failed targets, or a
#: rollback to the last version a run delivered to every target.
RUN_KINDS = ("release", "retry", "rollback")
#: A run's outcome in the history: ``running`` until the next fire closes the entry.
OUTCOME_RUNNING = "running"
OUTCOME_SUCCEEDED = "succeeded"
OUTCOME_FAILED = "failed"
OUTCOME_ABORTED = "aborted"
OUTCOME_UNFINISHED = "unfinished"  # replaced while targets were still pending
RUN_OUTCOMES = (OUTCOME_RUNNING, OUTCOME_SUCCEEDED, OUTCOME_FAILED, OUTCOME_ABORTED, OUTCOME_UNFINISHED)
#: Runs kept in ``<app>/history`` (newest first): about 300 bytes each, so the value stays far
#: below Consul's 512 KB and a reader's allocation is bounded.
HISTORY_MAX = 50


@dataclass(frozen=True)
class RunSummary(_Record):
    """One run in ``<app>/history``: written when the run is fired, closed (outcome, counts,
    end) by the next fire."""

    run_id: str
    version: str
    kind: str
    fired_by: str
    fired_at: float
    target_count: int
    outcome: str = OUTCOME_RUNNING
    done: int = 0
    failed: int = 0
    finished_at: float | None = None
    abort_reason: str | None = None
    retry_of: str | None = None
    checksum: str | None = None

    def __post_init__(self) -> None:
        _revalidate(RunSummary, self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> RunSummary:
        record = object.__new__(cls)
        for name, value in (
            ("run_id", _checked(obj, "run_id", key, check_run_id)),
            ("version", _checked(obj, "version", key, check_version)),
            ("kind", _choice(obj, "kind", key, RUN_KINDS)),
            ("fired_by", _line(obj, "fired_by", key)),
            ("fired_at", _time(obj, "fired_at", key)),
            ("target_count", _int(obj, "target_count", key, 1, TARGETS_MAX)),
            ("outcome", _choice(obj, "outcome", key, RUN_OUTCOMES)),
            ("done", _int(obj, "done", key, 0, TARGETS_MAX)),
            ("failed", _int(obj, "failed", key, 0, TARGETS_MAX)),
            ("finished_at", _time(obj, "finished_at", key, optional=True)),
            ("abort_reason", _line(obj, "abort_reason", key, optional=True)),
            ("retry_of", _checked(obj, "retry_of", key, check_run_id, optional=True)),
            ("checksum", _checked(obj, "checksum", key, check_checksum, optional=True)),
        ):
            object.__setattr__(record, name, value)
        return record


@dataclass(frozen=True)
class History(_Record):
    """``<app>/history``: the app's last runs, newest first, at most ``HISTORY_MAX``."""

    runs: tuple[RunSummary, ...] = ()

    def __post_init__(self) -> None:
        _revalidate(History, self)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": [run.to_dict() for run in self.runs]}

    def with_run(self, run: RunSummary) -> History:
        """This history with ``run`` first (an entry of the same run replaced), cut to HISTORY_MAX."""
        return History((run,) + tuple(entry for entry in self.runs if entry.run_id != run.run_id)[:HISTORY_MAX - 1])

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> History:
        runs = _get(obj, "runs", key, (list,))
        if len(runs) > HISTORY_MAX:
            raise KVRecordError(key, f"field 'runs' holds {len(runs)} runs; at most {HISTORY_MAX}")
        checked = []
        for index, value in enumerate(runs):
            if not isinstance(value, dict):
                raise KVRecordError(key, f"run {index}: must be an object, got {show(value)}")
            try:
                checked.append(RunSummary.from_dict(value, key))
            except KVRecordError as exc:
                raise KVRecordError(key, f"run {index}: {exc.reason}") from None
        record = object.__new__(cls)
        object.__setattr__(record, "runs", tuple(checked))
        return record


@dataclass(frozen=True)
class LockRecord(_Record):
    """``<app>/lock``: who holds the app's fire lock (the key is acquired with a session)."""

    run_id: str
    holder: str
    since: float

    def __post_init__(self) -> None:
        _revalidate(LockRecord, self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> LockRecord:
        record = object.__new__(cls)
        for name, value in (
            ("run_id", _checked(obj, "run_id", key, check_run_id)),
            ("holder", _line(obj, "holder", key)),
            ("since", _time(obj, "since", key)),
        ):
            object.__setattr__(record, name, value)
        return record


@dataclass(frozen=True)
class PlanEntry(_Record):
    """``<app>/plan/<node>``: where a node should pull from in the doubling schedule.

    ``source`` is the preferred source and ``slot`` the preferred slot on it; ``stage``
    (1-based) is the stage in which the pull is scheduled. ``after`` is the node that
    holds the same source slot one stage earlier (None in the source's first stage):
    waiting for it keeps later stages from jumping the queue on a shared slot.
    ``source_address`` is the source's catalog address when the plan was made, so that a
    puller need not look it up (None: look it up). ``peers`` (a run with an artifact only): the
    node's swarm neighbours as ``ADDRESS:PORT``, at most SWARM_PEERS_MAX (see
    ``_propagation.swarm_neighbours``): catalog IP literals and the ports the nodes advertise.
    """

    run_id: str
    source: str
    stage: int
    slot: int
    after: str | None = None
    source_address: str | None = None
    peers: tuple[str, ...] | None = None

    OPTIONAL_FIELDS = ("peers",)

    def __post_init__(self) -> None:
        _revalidate(PlanEntry, self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> PlanEntry:
        record = object.__new__(cls)
        for name, value in (
            ("run_id", _checked(obj, "run_id", key, check_run_id)),
            ("source", _name(obj, "source", key)),
            ("stage", _int(obj, "stage", key, 1, STAGE_MAX)),
            ("slot", _int(obj, "slot", key, 0, FANOUT_MAX - 1)),
            ("after", _name(obj, "after", key, optional=True)),
            ("source_address", _checked(obj, "source_address", key, check_address, optional=True)),
            ("peers", _checked(obj, "peers", key, check_peers, optional=True)),
        ):
            object.__setattr__(record, name, value)
        return record


#: Highest download rate a record may give, in bytes per second (a terabit link).
RATE_MAX = 125_000_000_000


@dataclass(frozen=True)
class NodeState(_Record):
    """``<app>/nodes/<node>``: one node's progress for one run.

    ``source`` is the node pulled from (None for the leader, depth 0, and for a node that
    failed or is still waiting before it claimed a source; its depth is then None too).
    ``depth`` is the source's depth + 1. ``started`` is when the worker began this run,
    ``finished`` when it reached done/failed; ``error`` explains a failure.

    A node fetching a run's artifact from the swarm adds ``downloaded`` (bytes it holds) and
    ``rate`` (bytes per second) at coarse steps while ``pulling``, and ``fetched`` (when the
    download ended) from then on, so the download shows apart from the commands; its ``done``
    record's ``downloaded`` is the bytes that came from the swarm (0: the file was there already).
    """

    version: str
    run_id: str
    status: str
    started: float
    source: str | None = None
    depth: int | None = None
    finished: float | None = None
    error: str | None = None
    downloaded: int | None = None
    rate: int | None = None
    fetched: float | None = None

    OPTIONAL_FIELDS = ("downloaded", "rate", "fetched")

    def __post_init__(self) -> None:
        _revalidate(NodeState, self)

    def has(self, version: str) -> bool:
        """True if this node finished pulling ``version``: it may serve it to others."""
        return self.status == NODE_DONE and self.version == version

    @property
    def terminal(self) -> bool:
        return self.status in NODE_TERMINAL_STATUSES

    def crashed(self, run_id: str, held: bool) -> bool:
        """True if this record's worker died in run ``run_id``: it had not finished and no
        live session holds the key any more (a running worker always holds its record)."""
        return self.run_id == run_id and not self.terminal and not held

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> NodeState:
        version = _checked(obj, "version", key, check_version)
        run_id = _checked(obj, "run_id", key, check_run_id)
        status = _choice(obj, "status", key, NODE_STATUSES)
        started = _time(obj, "started", key)
        source = _name(obj, "source", key, optional=True)
        depth = None if obj.get("depth") is None else _int(obj, "depth", key, 0, TARGETS_MAX)
        finished = _time(obj, "finished", key, optional=True)
        error = _checked(obj, "error", key, lambda value: check_text(value, "error", ERROR_MAX_LENGTH, lines=True),
                         optional=True)
        if source is None and depth not in (None, 0):
            raise KVRecordError(key, f"depth {depth} without a source")
        if source is not None and (depth is None or depth < 1):
            raise KVRecordError(key, f"source {source!r} requires a depth >= 1, got {depth!r}")
        if status == NODE_PULLING and source is None:
            raise KVRecordError(key, "status 'pulling' requires a source")
        if status == NODE_DONE and depth is None:
            raise KVRecordError(key, "status 'done' requires a depth")
        if status in NODE_TERMINAL_STATUSES and finished is None:
            raise KVRecordError(key, f"status {status!r} requires 'finished'")
        if status not in NODE_TERMINAL_STATUSES and finished is not None:
            raise KVRecordError(key, f"status {status!r} must not have 'finished'")
        if status == NODE_FAILED and not error:
            raise KVRecordError(key, "status 'failed' requires an 'error'")
        downloaded = _checked(obj, "downloaded", key, lambda value: check_int(value, "downloaded", 0, ARTIFACT_MAX),
                              optional=True)
        rate = _checked(obj, "rate", key, lambda value: check_int(value, "rate", 0, RATE_MAX), optional=True)
        fetched = _time(obj, "fetched", key, optional=True)
        if fetched is not None and started is not None and fetched < started:
            raise KVRecordError(key, f"field 'fetched' ({fetched}) is before 'started' ({started})")
        record = object.__new__(cls)
        for name, value in (
            ("version", version),
            ("run_id", run_id),
            ("status", status),
            ("started", started),
            ("source", source),
            ("depth", depth),
            ("finished", finished),
            ("error", error),
            ("downloaded", downloaded),
            ("rate", rate),
            ("fetched", fetched),
        ):
            object.__setattr__(record, name, value)
        return record


@dataclass(frozen=True)
class SwarmRun(_Record):
    """``<app>/swarm/<run_id>``: one run's swarm, the one key every node of the run blocks on.

    The fire writes it with ``leader_peers``, the leader's neighbours (the leader has no plan
    entry). The leader's worker sets ``finished`` (when every target was done, failed or
    crashed) or ``refused`` (why it cannot serve its file: the targets fail with it at once);
    a re-fire to the stragglers clears ``finished`` again (``_firing.retry_stragglers``).
    """

    leader_peers: tuple[str, ...]
    finished: float | None = None
    refused: str | None = None

    def __post_init__(self) -> None:
        _revalidate(SwarmRun, self)

    @property
    def over(self) -> bool:
        return self.finished is not None or self.refused is not None

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> SwarmRun:
        record = object.__new__(cls)
        for name, value in (
            ("leader_peers", _checked(obj, "leader_peers", key, check_peers)),
            ("finished", _time(obj, "finished", key, optional=True)),
            ("refused", _checked(obj, "refused", key,
                                 lambda value: check_text(value, "refused", ERROR_MAX_LENGTH, lines=True),
                                 optional=True)),
        ):
            object.__setattr__(record, name, value)
        return record


#: A service of a node, as the leader reads it from the catalog and the node from its agent: (name, tags).
Service = tuple[str, Sequence[str]]


def _regexp(value: Any, what: str) -> str:
    """Return ``value`` if it is a non-empty regular expression of bounded length that compiles."""
    check_text(value, what, LINE_MAX_LENGTH)
    if not value:
        raise InvalidValue(f"{what} must not be empty")
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidValue(f"{what} {show(value)} is not a valid regular expression: {exc}") from None
    return value


@dataclass(frozen=True)
class AppAdvert(_Record):
    """One app as a node advertises it: its fan-out and its filters, never its commands.

    ``service_filter`` and ``tag_filter`` are regular expressions (an exact name of the task
    config is ``^name$``); ``accepts`` is the one rule that applies them, on the leader to the
    catalog's services of the node and on the node to its agent's own. ``artifact``: the path
    template of the app's artifact (see ``_validation.check_artifact_path``), which the leader
    publishes to the swarm with each release of the app, and ``artifact_port`` (required with
    it) the port the node's swarm listens on, which the leader gives the node's neighbours.
    """

    max_semaphores: int
    service_filter: str | None = None
    tag_filter: str | None = None
    artifact: str | None = None
    artifact_port: int | None = None

    OPTIONAL_FIELDS = ("artifact", "artifact_port")

    def __post_init__(self) -> None:
        _revalidate(AppAdvert, self)

    def accepts(self, services: Iterable[Service]) -> bool:
        """True if a node running ``services`` takes the app: the app has no service filter, or
        the name of one service matches it (searched: unanchored) and, with a tag filter, one of
        that same service's tags matches the tag filter."""
        if self.service_filter is None:
            return True
        by_name = re.compile(self.service_filter)
        by_tag = None if self.tag_filter is None else re.compile(self.tag_filter)
        return any(
            by_name.search(name) and (by_tag is None or any(by_tag.search(tag) for tag in tags))
            for name, tags in services
        )

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> AppAdvert:
        service_filter = _checked(obj, "service_filter", key, lambda v: _regexp(v, "service_filter"), optional=True)
        tag_filter = _checked(obj, "tag_filter", key, lambda v: _regexp(v, "tag_filter"), optional=True)
        if tag_filter is not None and service_filter is None:
            raise KVRecordError(key, "field 'tag_filter' requires a 'service_filter'")
        record = object.__new__(cls)
        for name, value in (
            ("max_semaphores", _int(obj, "max_semaphores", key, FANOUT_MIN, FANOUT_MAX)),
            ("service_filter", service_filter),
            ("tag_filter", tag_filter),
            ("artifact", _checked(obj, "artifact", key, check_artifact_path, optional=True)),
            ("artifact_port", _checked(obj, "artifact_port", key, check_swarm_port, optional=True)),
        ):
            object.__setattr__(record, name, value)
        if (record.artifact is None) != (record.artifact_port is None):
            raise KVRecordError(key, "fields 'artifact' and 'artifact_port' go together")
        return record


@dataclass(frozen=True)
class NodeAdvert(_Record):
    """``.apps/<node>``: the apps of the node's task config, by name, as its handler last wrote
    them; the leader targets only nodes that advertise the app of a release."""

    apps: Mapping[str, AppAdvert]

    def __post_init__(self) -> None:
        _revalidate(NodeAdvert, self)

    def to_dict(self) -> dict[str, Any]:
        return {"apps": {name: self.apps[name].to_dict() for name in sorted(self.apps)}}

    @classmethod
    def from_dict(cls, obj: dict[str, Any], key: str | None = None) -> NodeAdvert:
        apps = _get(obj, "apps", key, (dict,))
        if len(apps) > ADVERT_APPS_MAX:
            raise KVRecordError(key, f"field 'apps' lists {len(apps)} apps; at most {ADVERT_APPS_MAX}")
        checked: dict[str, AppAdvert] = {}
        for name, value in apps.items():
            try:
                check_name(name, "app")
                if not isinstance(value, dict):
                    raise InvalidValue(f"must be an object, got {show(value)}")
                checked[name] = AppAdvert.from_dict(value, key)
            except KVRecordError as exc:
                raise KVRecordError(key, f"app {show(name)}: {exc.reason}") from None
            except ValueError as exc:
                raise KVRecordError(key, f"app {show(name)}: {exc}") from None
        record = object.__new__(cls)
        object.__setattr__(record, "apps", checked)
        return record


def txn_set_batches(
    items: Iterable[tuple[str, str | bytes]], max_ops: int = TXN_MAX_OPS
) -> list[list[dict[str, Any]]]:
    """Turn ``(key, value)`` pairs into /v1/txn payloads of at most ``max_ops`` "set" ops.

    Each payload is all-or-nothing on its own; payloads are independent of each other.
    Use with ``client.txn.put(payload)``.
    """
    if not isinstance(max_ops, int) or not 1 <= max_ops <= 128:
        raise InvalidValue(f"max_ops must be within 1..128 (Consul's txn limit), got {max_ops!r}")
    batches: list[list[dict[str, Any]]] = []
    for key, value in items:
        if not isinstance(key, str) or not key or key.startswith("/"):
            raise InvalidValue(f"txn key must be a non-empty string without a leading '/', got {key!r}")
        raw = value.encode("utf-8") if isinstance(value, str) else value
        if not isinstance(raw, bytes):
            raise InvalidValue(f"txn value for {key!r} must be str or bytes, got {type(value).__name__}")
        op = {"KV": {"Verb": "set", "Key": key, "Value": base64.b64encode(raw).decode("ascii")}}
        if not batches or len(batches[-1]) >= max_ops:
            batches.append([])
        batches[-1].append(op)
    return batches
