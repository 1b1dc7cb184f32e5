"""What a chaos scenario observes: its figures (Outcome) and the reads they come from (Probe)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ansible_collections.fireap.consul.plugins.module_utils._firing import event_payload, fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import NODE_DONE, NODE_FAILED, KVRecordError, NodeState

from ..polling import wait_until
from .apps import run_log
from .harness import RELEASE_TIMEOUT, ChaosCluster, ChaosError
from .processes import worker_pids

#: Longest a scenario waits for the workers of its apps to end after the release.
SETTLE_TIMEOUT = 90.0
POLL_SECONDS = 0.3
#: fireap_wait's straggler_retry_after default: how long a release waits before its event is
#: fired again to the nodes that have not taken the run up (gossip lost it for them).
STRAGGLER_RETRY_AFTER = 30.0


@dataclass
class Outcome:
    """One scenario's figures (see the package docstring, chaos/__init__.py)."""

    scenario: str
    nodes: int
    faults: int
    fault: str
    survivors: int = 0
    survivors_done: int = 0
    leaked_slots: int = 0
    duplicate_runs: int = 0
    lost_records: int = 0
    seconds: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.survivors_done == self.survivors and self.leaked_slots == 0 and self.duplicate_runs == 0
                and self.lost_records == 0 and not self.problems)

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok)


@dataclass(frozen=True)
class View:
    """A node record and whether a session holds it."""

    state: NodeState | None
    held: bool


class Probe:
    """Reads what one scenario needs from KV and the nodes' run logs."""

    def __init__(self, cluster: ChaosCluster) -> None:
        self.cluster = cluster
        self.client = cluster.client()
        self.schema = cluster.schema
        self.snapshots: list[dict[str, tuple[int, bytes | None]]] = []
        #: The events ``finished`` fired again, as fireap_wait does: {app, version, nodes, after}.
        self.refires: list[dict[str, Any]] = []
        #: When each app's event was last fired (loop time).
        self._fired_at: dict[str, float] = {}

    def fire(self, app: str, version: str, **kwargs) -> dict:
        fired = fire(self.client, self.schema, app, version=version, fanout=self.cluster.fanout,
                     holder="chaos", config_path=str(self.cluster.config_path(self.cluster.leader)), **kwargs)
        self._fired_at[app] = time.monotonic()
        return fired

    def views(self, app: str) -> dict[str, View]:
        _index, entries = self.client.kv.get(self.schema.nodes_prefix(app), recurse=True)
        views = {}
        for entry in entries or ():
            try:
                state = NodeState.from_json(entry["Value"], entry["Key"])
            except (KVRecordError, ValueError):
                state = None
            views[self.schema.node_name(app, entry["Key"])] = View(state, bool(entry.get("Session")))
        return views

    def held_slots(self, app: str) -> list[str]:
        _index, entries = self.client.kv.get(self.schema.app_prefix(app) + "slots/", recurse=True)
        return [entry["Key"] for entry in entries or () if entry.get("Session")]

    def runs(self, app: str, name: str) -> Counter:
        """How often ``name`` ran ``app``'s commands to the end, per version."""
        try:
            lines = (self.cluster.root(name) / run_log(app)).read_text().splitlines()
        except FileNotFoundError:
            return Counter()
        return Counter(line.split(" ", 1)[0] for line in lines if line)

    def snapshot(self, prefix: str) -> None:
        """Remember every record under ``prefix`` (slots and locks come and go: not kept)."""
        _index, entries = self.client.kv.get(prefix, recurse=True)
        self.snapshots.append({
            entry["Key"]: (entry["ModifyIndex"], entry["Value"]) for entry in entries or ()
            if "/slots/" not in entry["Key"] and not entry["Key"].endswith("/lock")
        })

    def lost_records(self) -> list[str]:
        """Records of an earlier snapshot that are missing or older in a later one, and done
        records that are no longer done at their version."""
        lost = []
        for earlier, later in zip(self.snapshots, self.snapshots[1:]):
            for key, (index, value) in earlier.items():
                if key not in later:
                    lost.append(f"{key} is missing")
                    continue
                if later[key][0] < index:
                    lost.append(f"{key} went back from index {index} to {later[key][0]}")
                elif "/nodes/" in key:
                    before, after = _state(value), _state(later[key][1])
                    if before is not None and before.status == NODE_DONE and not (after and after.has(before.version)):
                        lost.append(f"{key} was done at {before.version}, then not")
        return lost

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = RELEASE_TIMEOUT):
        return wait_until(predicate, timeout, what, POLL_SECONDS, ChaosError)

    def settled(self, apps: list[str], timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until no worker of ``apps`` runs any more on any node."""
        configs = [self.cluster.config_path(name) for name in self.cluster.names]
        self.wait(f"the workers of {', '.join(apps)} to end",
                  lambda: not any(worker_pids(config, app) for config in configs for app in apps), timeout)

    def finished(self, app: str, names: list[str], version: str) -> Callable[[], bool]:
        """A predicate: every node of ``names`` is done at ``version`` or failed in the current run.
        While it is not, it does what fireap_wait does every STRAGGLER_RETRY_AFTER seconds: fire the
        event again to those of ``names`` that have not taken ``version`` up (gossip lost it)."""
        def check() -> bool:
            views = self.views(app)
            if all(_terminal(views.get(name), version) for name in names):
                return True
            now = time.monotonic()
            since = now - self._fired_at.setdefault(app, now)
            if since >= STRAGGLER_RETRY_AFTER:
                self._fired_at[app] = now
                pending = [name for name in names if not _taken_up(views.get(name), version)]
                if pending:
                    self.cluster.fire_event(event_payload(app, version), pending)
                    self.refires.append({"app": app, "version": version, "nodes": pending, "after": round(since, 1)})
            return False
        return check

    def measure(self, outcome: Outcome, releases: list[tuple[str, str, list[str], set[str]]]) -> Outcome:
        """Fill the common figures in: ``releases`` = (app, version, targets, faulted targets) each."""
        outcome.survivors = outcome.survivors_done = 0
        for app, version, targets, faulted in releases:
            views = self.views(app)
            for name in targets:
                view = views.get(name)
                done = view is not None and view.state is not None and view.state.has(version)
                if name not in faulted:
                    outcome.survivors += 1
                    outcome.survivors_done += done
                runs = self.runs(app, name)
                outcome.duplicate_runs += sum(count - 1 for count in runs.values() if count > 1)
                if done and name != self.cluster.leader and not runs[version] and view.state.source:
                    outcome.problems.append(f"{name} is recorded done at {app} {version} without a run of its commands")
            outcome.leaked_slots += len(self.held_slots(app))
        if self.refires:
            outcome.facts["refires"] = self.refires
        lost = self.lost_records()
        outcome.lost_records = len(lost)
        if lost:
            outcome.facts["lost"] = lost[:10]
        return outcome


def _state(value: bytes | None) -> NodeState | None:
    try:
        return NodeState.from_json(value)
    except (KVRecordError, ValueError):
        return None


def _taken_up(view: View | None, version: str) -> bool:
    """The node has a record at ``version``: its worker got the event, whatever it is doing now."""
    return view is not None and view.state is not None and view.state.version == version


def _terminal(view: View | None, version: str) -> bool:
    if view is None or view.state is None:
        return False
    return view.state.has(version) or (view.state.version == version and view.state.status == NODE_FAILED)
