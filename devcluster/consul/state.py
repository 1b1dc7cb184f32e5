"""The replicated state of the cluster: what Consul's servers keep in Raft.

A pure synchronous state machine holding the KV store (with tombstones and
lock-delays), sessions, the catalog (nodes, services, serfHealth checks) and the
table indexes Consul reports as X-Consul-Index.  Every mutating operation is one
Raft apply: it takes the next index, journals its effects (see persistence.py)
and then wakes the blocking queries whose watched topics it touched.

The KV semantics follow Consul's state store (agent/consul/state/kvs.go and
txn.go) closely, including its quirks: a plain PUT resets LockIndex, an
unchanged PUT keeps ModifyIndex, a CAS delete of a missing key succeeds, a
recursive delete leaves one tombstone at the prefix.
"""

from __future__ import annotations

import base64
import time
import uuid
from bisect import bisect_left, insort
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .goparse import HOUR, SECOND, DurationError, format_duration, go_quote, parse_duration

if TYPE_CHECKING:
    from .persistence import Journal  # persistence imports this module

CONSUL_VERSION = "1.22.0"
SERF_CHECK = "serfHealth"
SERF_CHECK_NAME = "Serf Health Status"
SERF_ALIVE = "Agent alive and reachable"
SERF_FAILED = "Agent not live or unreachable"
DEFAULT_LOCK_DELAY = 15 * SECOND
MAX_LOCK_DELAY = 60 * SECOND
SESSION_TTL_MIN = 10 * SECOND
SESSION_TTL_MAX = 24 * HOUR
SESSION_TTL_MULTIPLIER = 2
TOMBSTONE_TTL_SECONDS = 15 * 60
BEHAVIOR_RELEASE = "release"
BEHAVIOR_DELETE = "delete"

# Txn KV verbs (api/txn.go) that go through Raft; the others are reads.
KV_WRITE_VERBS = frozenset({"set", "cas", "lock", "unlock", "delete", "delete-cas", "delete-tree"})

Topic = Hashable


class StateError(Exception):
    """An error Consul's servers return from an RPC; the HTTP layer answers 500."""


def _b64(value: bytes | None) -> str | None:
    return base64.b64encode(value).decode("ascii") if value else None


def _unb64(value: str | None) -> bytes | None:
    return base64.b64decode(value) if value else None


def node_id_for(name: str) -> str:
    """A stable node ID, so restarts with a data dir keep the same identity."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"devcluster:node:{name}"))


@dataclass(slots=True)
class KVEntry:
    key: str
    flags: int = 0
    value: bytes | None = None
    session: str | None = None
    lock_index: int = 0
    create_index: int = 0
    modify_index: int = 0

    def same_content(self, other: KVEntry) -> bool:
        """DirEntry.Equal: an identical write does not touch the entry's indexes."""
        return (
            self.lock_index == other.lock_index
            and self.flags == other.flags
            and self.value == other.value
            and self.session == other.session
        )

    def to_api(self, with_value: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": _b64(self.value) if with_value else None,
        }
        if self.session:
            out["Session"] = self.session
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out

    def to_record(self) -> list[Any]:
        return [
            self.key,
            self.flags,
            _b64(self.value),
            self.session,
            self.lock_index,
            self.create_index,
            self.modify_index,
        ]

    @classmethod
    def from_record(cls, rec: list[Any]) -> KVEntry:
        return cls(rec[0], rec[1], _unb64(rec[2]), rec[3], rec[4], rec[5], rec[6])


@dataclass(slots=True)
class Session:
    id: str
    node: str
    name: str = ""
    lock_delay: int = DEFAULT_LOCK_DELAY
    behavior: str = BEHAVIOR_RELEASE
    ttl: str = ""
    node_checks: list[str] | None = None
    service_checks: list[str] | None = None
    checks: list[str] | None = None
    create_index: int = 0
    modify_index: int = 0

    def check_ids(self) -> list[str]:
        return [*(self.checks or ()), *(self.node_checks or ()), *(self.service_checks or ())]

    def ttl_nanos(self) -> int:
        return parse_duration(self.ttl) if self.ttl else 0

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": self.lock_delay,
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": None if self.node_checks is None else list(self.node_checks),
            "ServiceChecks": (
                None if self.service_checks is None else [{"ID": c, "Namespace": ""} for c in self.service_checks]
            ),
        }
        if self.checks:
            out["Checks"] = list(self.checks)
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out

    def to_record(self) -> list[Any]:
        return [
            self.id,
            self.node,
            self.name,
            self.lock_delay,
            self.behavior,
            self.ttl,
            self.node_checks,
            self.service_checks,
            self.checks,
            self.create_index,
            self.modify_index,
        ]

    @classmethod
    def from_record(cls, rec: list[Any]) -> Session:
        return cls(*rec)


@dataclass(slots=True)
class Node:
    name: str
    address: str
    node_id: str
    create_index: int = 0
    modify_index: int = 0

    def to_api(self, datacenter: str) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.name,
            "Address": self.address,
            "Datacenter": datacenter,
            "TaggedAddresses": self.tagged_addresses(),
            "Meta": self.meta(),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def tagged_addresses(self) -> dict[str, str]:
        a = self.address
        return {"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a}

    @staticmethod
    def meta() -> dict[str, str]:
        return {"consul-network-segment": "", "consul-version": CONSUL_VERSION}

    def to_record(self) -> list[Any]:
        return [self.name, self.address, self.node_id, self.create_index, self.modify_index]

    @classmethod
    def from_record(cls, rec: list[Any]) -> Node:
        return cls(*rec)


@dataclass(slots=True)
class Service:
    node: str
    id: str
    name: str
    tags: list[str] = field(default_factory=list)
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    enable_tag_override: bool = False
    # False for the "consul" service the leader registers: not in any agent's local state.
    local: bool = True
    create_index: int = 0
    modify_index: int = 0

    def same_definition(self, other: Service) -> bool:
        return (
            self.name == other.name
            and self.tags == other.tags
            and self.address == other.address
            and self.port == other.port
            and self.meta == other.meta
            and self.enable_tag_override == other.enable_tag_override
            and self.local == other.local
        )

    def to_agent_api(self, datacenter: str) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
            "Port": self.port,
            "Address": self.address,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": self.enable_tag_override,
            "Datacenter": datacenter,
        }

    def to_node_service_api(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "Meta": dict(self.meta),
            "Port": self.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": self.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def to_catalog_api(self, node: Node, datacenter: str) -> dict[str, Any]:
        return {
            "ID": node.node_id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": datacenter,
            "TaggedAddresses": node.tagged_addresses(),
            "NodeMeta": node.meta(),
            "ServiceKind": "",
            "ServiceID": self.id,
            "ServiceName": self.name,
            "ServiceTags": list(self.tags),
            "ServiceAddress": self.address,
            "ServiceWeights": {"Passing": 1, "Warning": 1},
            "ServiceMeta": dict(self.meta),
            "ServicePort": self.port,
            "ServiceSocketPath": "",
            "ServiceEnableTagOverride": self.enable_tag_override,
            "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "ServiceConnect": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def to_record(self) -> list[Any]:
        return [
            self.node,
            self.id,
            self.name,
            self.tags,
            self.address,
            self.port,
            self.meta,
            self.enable_tag_override,
            self.local,
            self.create_index,
            self.modify_index,
        ]

    @classmethod
    def from_record(cls, rec: list[Any]) -> Service:
        return cls(*rec)


@dataclass(slots=True)
class Check:
    node: str
    check_id: str
    name: str
    status: str
    output: str
    create_index: int = 0
    modify_index: int = 0

    def to_api(self) -> dict[str, Any]:
        return {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": "",
            "Output": self.output,
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def to_record(self) -> list[Any]:
        return [self.node, self.check_id, self.name, self.status, self.output, self.create_index, self.modify_index]

    @classmethod
    def from_record(cls, rec: list[Any]) -> Check:
        return cls(*rec)


@dataclass(slots=True)
class SessionRequest:
    """A session create request after the HTTP layer applied the agent's defaults."""

    node: str
    name: str = ""
    lock_delay: int = DEFAULT_LOCK_DELAY
    behavior: str = BEHAVIOR_RELEASE
    ttl: str = ""
    node_checks: list[str] | None = None
    service_checks: list[str] | None = None
    checks: list[str] | None = None


@dataclass(slots=True)
class TxnOp:
    """One KV operation of a /v1/txn request (api.KVTxnOp)."""

    verb: str
    key: str = ""
    value: bytes | None = None
    flags: int = 0
    index: int = 0
    session: str = ""


def _scan(keys: list[str], prefix: str) -> Iterator[str]:
    """Keys of a sorted list that start with prefix, in order."""
    i = bisect_left(keys, prefix)
    n = len(keys)
    while i < n and keys[i].startswith(prefix):
        yield keys[i]
        i += 1


class _KVView:
    """The KV store as one Raft apply sees it: live data plus this apply's writes.

    Operations are evaluated against the view; `effects` are replayed onto the
    live store only if the whole apply succeeds, which makes a txn atomic.
    """

    __slots__ = ("_overlay", "_state", "effects")

    def __init__(self, state: ConsulState) -> None:
        self._state = state
        self._overlay: dict[str, KVEntry | None] = {}
        self.effects: list[tuple[Any, ...]] = []

    def get(self, key: str) -> KVEntry | None:
        if key in self._overlay:
            return self._overlay[key]
        return self._state.kv.get(key)

    def put(self, entry: KVEntry) -> None:
        self._overlay[entry.key] = entry
        self.effects.append(("put", entry))

    def delete(self, key: str) -> None:
        self._overlay[key] = None
        self.effects.append(("delete", key))

    def delete_tree(self, prefix: str) -> None:
        keys = self.scan(prefix)
        if not keys:
            return
        for key in keys:
            self._overlay[key] = None
        self.effects.append(("tree", prefix))

    def scan(self, prefix: str) -> list[str]:
        live = [k for k in _scan(self._state._kv_keys, prefix) if k not in self._overlay]
        added = [k for k, e in self._overlay.items() if e is not None and k.startswith(prefix)]
        return sorted(live + added) if added else live

    def session_exists(self, session_id: str) -> bool:
        return session_id in self._state.sessions


class ConsulState:
    """Cluster-wide state with Consul's index bookkeeping and blocking-query wake-ups."""

    def __init__(self, datacenter: str = "dc1") -> None:
        self.datacenter = datacenter
        self.index = 0
        self.tables: dict[str, int] = dict.fromkeys(("kvs", "tombstones", "sessions", "nodes", "services", "checks"), 0)
        self.kv: dict[str, KVEntry] = {}
        self._kv_keys: list[str] = []
        # key -> (index of the delete, monotonic time it was created)
        self.tombstones: dict[str, tuple[int, float]] = {}
        self._tomb_keys: list[str] = []
        self.sessions: dict[str, Session] = {}
        self._session_keys: dict[str, set[str]] = {}
        self._node_sessions: dict[str, set[str]] = {}
        # key -> monotonic time until which ?acquire is refused (lock-delay)
        self.lock_delays: dict[str, float] = {}
        self.nodes: dict[str, Node] = {}
        self.services: dict[str, dict[str, Service]] = {}
        self.checks: dict[str, dict[str, Check]] = {}
        # Serf's user-event Lamport clock starts at 1.
        self.ltime = 1
        self.journal: Journal | None = None
        self._watchers: dict[Topic, set[Callable[[], None]]] = {}
        self._changes: list[list[Any]] | None = None
        self._fired: set[Topic] | None = None

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _apply(self) -> Iterator[int]:
        """One Raft apply: a new index, a journal record, then wake-ups."""
        self.index += 1
        self._changes = []
        self._fired = set()
        try:
            yield self.index
        finally:
            record = {"i": self.index, "c": self._changes}
            fired = self._fired
            self._changes = None
            self._fired = None
            if self.journal is not None:
                self.journal.append(record)
            self._fire(fired)

    def _record(self, *change: Any) -> None:
        if self._changes is not None:
            self._changes.append(list(change))

    def _touch(self, topic: Topic) -> None:
        if self._fired is not None:
            self._fired.add(topic)

    def _touch_key(self, key: str) -> None:
        fired = self._fired
        if fired is None:
            return
        fired.add(("kv", key))
        watchers = self._watchers
        for i in range(len(key) + 1):
            topic = ("kvp", key[:i])
            if topic in watchers:
                fired.add(topic)

    def _touch_tree(self, prefix: str) -> None:
        """A recursive delete wakes every watcher at or below the prefix and its parents."""
        fired = self._fired
        if fired is None:
            return
        for topic in list(self._watchers):
            if isinstance(topic, tuple) and topic[0] in ("kv", "kvp"):
                key = topic[1]
                if key.startswith(prefix) or (topic[0] == "kvp" and prefix.startswith(key)):
                    fired.add(topic)

    def watch(
        self, topics: Iterable[Topic], callback: Callable[[], None]
    ) -> tuple[tuple[Topic, ...], Callable[[], None]]:
        """Call `callback` once when an apply touches any of `topics`; returns a handle for unwatch."""
        topics = tuple(topics)
        for topic in topics:
            self._watchers.setdefault(topic, set()).add(callback)
        return topics, callback

    def unwatch(self, handle: tuple[tuple[Topic, ...], Callable[[], None]]) -> None:
        topics, callback = handle
        for topic in topics:
            waiters = self._watchers.get(topic)
            if waiters is not None:
                waiters.discard(callback)
                if not waiters:
                    del self._watchers[topic]

    def _fire(self, topics: set[Topic]) -> None:
        callbacks: set[Callable[[], None]] = set()
        for topic in topics:
            waiters = self._watchers.pop(topic, None)
            if waiters:
                callbacks |= waiters
        for callback in callbacks:
            callback()

    def _bump(self, table: str, index: int) -> None:
        if index > self.tables[table]:
            self.tables[table] = index

    # ------------------------------------------------------------ primitives
    # Every mutation goes through these, both live and when replaying the journal.

    def _put_kv(self, entry: KVEntry) -> None:
        old = self.kv.get(entry.key)
        if old is None:
            insort(self._kv_keys, entry.key)
        elif old.session and old.session != entry.session:
            self._session_keys.get(old.session, set()).discard(entry.key)
        self.kv[entry.key] = entry
        if entry.session:
            self._session_keys.setdefault(entry.session, set()).add(entry.key)
        self._bump("kvs", entry.modify_index)
        self._record("kv", entry.to_record())
        self._touch_key(entry.key)

    def _del_kv(self, key: str, index: int) -> None:
        old = self.kv.pop(key, None)
        if old is None:
            return
        del self._kv_keys[bisect_left(self._kv_keys, key)]
        if old.session:
            self._session_keys.get(old.session, set()).discard(key)
        self._bump("kvs", index)
        self._record("kvdel", key, index)
        self._touch_key(key)

    def _put_tomb(self, key: str, index: int) -> None:
        if key not in self.tombstones:
            insort(self._tomb_keys, key)
        self.tombstones[key] = (index, time.monotonic())
        self._bump("tombstones", index)
        self._record("tomb", key, index)

    def _del_tomb(self, key: str) -> None:
        if self.tombstones.pop(key, None) is not None:
            del self._tomb_keys[bisect_left(self._tomb_keys, key)]
            self._record("tombdel", key)

    def _put_session(self, session: Session) -> None:
        self.sessions[session.id] = session
        self._node_sessions.setdefault(session.node, set()).add(session.id)
        self._bump("sessions", session.modify_index)
        self._record("sess", session.to_record())
        self._touch(("session", session.id))
        self._touch(("sessions",))
        self._touch(("node-sessions", session.node))

    def _del_session(self, session_id: str, index: int) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        ids = self._node_sessions.get(session.node)
        if ids is not None:
            ids.discard(session_id)
            if not ids:
                del self._node_sessions[session.node]
        self._bump("sessions", index)
        self._record("sessdel", session_id, index)
        self._touch(("session", session_id))
        self._touch(("sessions",))
        self._touch(("node-sessions", session.node))

    def _put_node(self, node: Node) -> None:
        self.nodes[node.name] = node
        self._bump("nodes", node.modify_index)
        self._record("node", node.to_record())
        self._touch(("nodes",))

    def _del_node(self, name: str, index: int) -> None:
        if self.nodes.pop(name, None) is None:
            return
        self.services.pop(name, None)
        self.checks.pop(name, None)
        for table in ("nodes", "services", "checks"):
            self._bump(table, index)
        self._record("nodedel", name, index)
        for topic in (("nodes",), ("services",), ("checks",)):
            self._touch(topic)

    def _put_service(self, service: Service) -> None:
        self.services.setdefault(service.node, {})[service.id] = service
        self._bump("services", service.modify_index)
        self._record("svc", service.to_record())
        self._touch(("services",))

    def _del_service(self, node: str, service_id: str, index: int) -> None:
        services = self.services.get(node, {})
        if services.pop(service_id, None) is None:
            return
        self._bump("services", index)
        self._record("svcdel", node, service_id, index)
        self._touch(("services",))

    def _put_check(self, check: Check) -> None:
        self.checks.setdefault(check.node, {})[check.check_id] = check
        self._bump("checks", check.modify_index)
        self._record("check", check.to_record())
        self._touch(("checks",))

    # ------------------------------------------------------------ persistence

    def apply_record(self, record: dict[str, Any]) -> None:
        """Replay one journal record written by a previous process."""
        if "i" in record:
            self.index = max(self.index, record["i"])
        for change in record["c"]:
            kind, args = change[0], change[1:]
            if kind == "kv":
                self._put_kv(KVEntry.from_record(args[0]))
            elif kind == "kvdel":
                self._del_kv(args[0], args[1])
            elif kind == "tomb":
                self._put_tomb(args[0], args[1])
            elif kind == "tombdel":
                self._del_tomb(args[0])
            elif kind == "sess":
                self._put_session(Session.from_record(args[0]))
            elif kind == "sessdel":
                self._del_session(args[0], args[1])
            elif kind == "node":
                self._put_node(Node.from_record(args[0]))
            elif kind == "nodedel":
                self._del_node(args[0], args[1])
            elif kind == "svc":
                self._put_service(Service.from_record(args[0]))
            elif kind == "svcdel":
                self._del_service(args[0], args[1], args[2])
            elif kind == "check":
                self._put_check(Check.from_record(args[0]))
            elif kind == "ltime":
                self.ltime = max(self.ltime, args[0])
            else:
                raise ValueError(f"unknown journal change {kind!r}")

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "datacenter": self.datacenter,
            "index": self.index,
            "tables": dict(self.tables),
            "ltime": self.ltime,
            "kv": [e.to_record() for e in self.kv.values()],
            "tombstones": [[k, v[0]] for k, v in self.tombstones.items()],
            "sessions": [s.to_record() for s in self.sessions.values()],
            "nodes": [n.to_record() for n in self.nodes.values()],
            "services": [s.to_record() for svcs in self.services.values() for s in svcs.values()],
            "checks": [c.to_record() for chks in self.checks.values() for c in chks.values()],
        }

    def load_snapshot(self, data: dict[str, Any]) -> None:
        for rec in data["nodes"]:
            self._put_node(Node.from_record(rec))
        for rec in data["services"]:
            self._put_service(Service.from_record(rec))
        for rec in data["checks"]:
            self._put_check(Check.from_record(rec))
        for rec in data["sessions"]:
            self._put_session(Session.from_record(rec))
        for rec in data["kv"]:
            self._put_kv(KVEntry.from_record(rec))
        for key, index in data["tombstones"]:
            self._put_tomb(key, index)
        self.tables.update(data["tables"])
        self.index = data["index"]
        self.ltime = data["ltime"]

    # ------------------------------------------------------------------- KV reads

    def kv_max_index(self) -> int:
        return max(self.tables["kvs"], self.tables["tombstones"])

    def kv_get(self, key: str) -> tuple[int, KVEntry | None]:
        """KVS.Get: the entry's ModifyIndex, or the table index (at least 1) when missing."""
        entry = self.kv.get(key)
        if entry is not None:
            return entry.modify_index, entry
        return self.kv_max_index() or 1, None

    def kv_nearest_prefix(self, key: str) -> str:
        """The longest prefix ``key`` shares with a stored key: the path of memdb's radix node a
        read of a missing ``key`` (or an empty prefix) watches. The sorted neighbours of ``key``
        share the longest one."""
        keys = self._kv_keys
        i = bisect_left(keys, key)
        shared = 0
        for other in keys[max(0, i - 1) : i + 1]:
            n = 0
            for a, b in zip(key, other):
                if a != b:
                    break
                n += 1
            shared = max(shared, n)
        return key[:shared]

    def kv_list(self, prefix: str) -> tuple[int, list[KVEntry]]:
        """KVS.List: index is the max ModifyIndex under the prefix, deletions included."""
        entries = [self.kv[k] for k in _scan(self._kv_keys, prefix)]
        if prefix:
            index = max((e.modify_index for e in entries), default=0)
            for key in _scan(self._tomb_keys, prefix):
                index = max(index, self.tombstones[key][0])
        else:
            index = self.kv_max_index()
        return (index or self.kv_max_index()) or 1, entries

    def kv_keys(self, prefix: str, separator: str) -> tuple[int, list[str]]:
        """KVS.ListKeys: keys under prefix, cut after the first separator past it."""
        index, entries = self.kv_list(prefix)
        if not separator:
            return index, [e.key for e in entries]
        keys: list[str] = []
        seen: set[str] = set()
        plen = len(prefix)
        for entry in entries:
            cut = entry.key.find(separator, plen)
            if cut < 0:
                keys.append(entry.key)
                continue
            key = entry.key[: cut + len(separator)]
            if key not in seen:
                seen.add(key)
                keys.append(key)
        return index, keys

    def lock_delay_active(self, key: str) -> bool:
        expires = self.lock_delays.get(key)
        if expires is None:
            return False
        if expires > time.monotonic():
            return True
        del self.lock_delays[key]
        return False

    # ------------------------------------------------------------- KV semantics
    # Mirrors of kvsSetTxn, kvsSetCASTxn, kvsLockTxn, ... evaluated on a view.

    @staticmethod
    def _kv_set(view: _KVView, idx: int, entry: KVEntry, update_session: bool = False) -> KVEntry:
        existing = view.get(entry.key)
        entry.create_index = existing.create_index if existing is not None else idx
        if not update_session:
            entry.session = existing.session if existing is not None else None
        if existing is not None and existing.same_content(entry):
            entry.modify_index = existing.modify_index
            return entry
        entry.modify_index = idx
        view.put(entry)
        return entry

    def _kv_cas(self, view: _KVView, idx: int, entry: KVEntry, cas: int) -> bool:
        existing = view.get(entry.key)
        if cas == 0 and existing is not None:
            return False
        if cas != 0 and (existing is None or existing.modify_index != cas):
            return False
        self._kv_set(view, idx, entry)
        return True

    def _kv_lock(self, view: _KVView, idx: int, entry: KVEntry) -> bool:
        if not entry.session:
            raise StateError("missing session")
        if not view.session_exists(entry.session):
            raise StateError(f"invalid session {go_quote(entry.session)}")
        existing = view.get(entry.key)
        if existing is not None:
            if existing.session == entry.session:
                entry.lock_index = existing.lock_index
            elif existing.session:
                return False
            else:
                entry.lock_index = existing.lock_index + 1
        else:
            entry.lock_index = 1
        self._kv_set(view, idx, entry, update_session=True)
        return True

    def _kv_unlock(self, view: _KVView, idx: int, entry: KVEntry) -> bool:
        if not entry.session:
            raise StateError("missing session")
        existing = view.get(entry.key)
        if existing is None or existing.session != entry.session:
            return False
        entry.session = None
        entry.lock_index = existing.lock_index
        self._kv_set(view, idx, entry, update_session=True)
        return True

    @staticmethod
    def _kv_delete_cas(view: _KVView, key: str, cas: int) -> bool:
        existing = view.get(key)
        if existing is None:
            return True
        if existing.modify_index != cas:
            return False
        view.delete(key)
        return True

    def _commit(self, idx: int, view: _KVView) -> None:
        for effect in view.effects:
            kind = effect[0]
            if kind == "put":
                self._put_kv(effect[1])
            elif kind == "delete":
                key = effect[1]
                if key in self.kv:
                    self._put_tomb(key, idx)
                    self._del_kv(key, idx)
            else:
                prefix = effect[1]
                keys = list(_scan(self._kv_keys, prefix))
                self._touch_tree(prefix)
                for key in keys:
                    self._del_kv(key, idx)
                if keys and prefix:
                    self._put_tomb(prefix, idx)

    # --------------------------------------------------------------- KV writes

    def kv_set(self, key: str, value: bytes | None, flags: int) -> bool:
        with self._apply() as idx:
            view = _KVView(self)
            self._kv_set(view, idx, KVEntry(key, flags, value or None))
            self._commit(idx, view)
        return True

    def kv_cas(self, key: str, value: bytes | None, flags: int, cas: int) -> bool:
        with self._apply() as idx:
            view = _KVView(self)
            ok = self._kv_cas(view, idx, KVEntry(key, flags, value or None), cas)
            self._commit(idx, view)
        return ok

    def kv_lock(self, key: str, value: bytes | None, flags: int, session: str) -> bool:
        # Lock-delay is enforced by the leader before Raft: no index is consumed.
        if self.lock_delay_active(key):
            return False
        with self._apply() as idx:
            view = _KVView(self)
            ok = self._kv_lock(view, idx, KVEntry(key, flags, value or None, session))
            self._commit(idx, view)
        return ok

    def kv_unlock(self, key: str, value: bytes | None, flags: int, session: str) -> bool:
        with self._apply() as idx:
            view = _KVView(self)
            ok = self._kv_unlock(view, idx, KVEntry(key, flags, value or None, session))
            self._commit(idx, view)
        return ok

    def kv_delete(self, key: str) -> bool:
        with self._apply() as idx:
            view = _KVView(self)
            if view.get(key) is not None:
                view.delete(key)
            self._commit(idx, view)
        return True

    def kv_delete_cas(self, key: str, cas: int) -> bool:
        with self._apply() as idx:
            view = _KVView(self)
            ok = self._kv_delete_cas(view, key, cas)
            self._commit(idx, view)
        return ok

    def kv_delete_tree(self, prefix: str) -> bool:
        with self._apply() as idx:
            view = _KVView(self)
            view.delete_tree(prefix)
            self._commit(idx, view)
        return True

    # ------------------------------------------------------------------------ txn

    def txn(
        self, ops: list[TxnOp], get_or_empty: bool = True
    ) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        """Run a KV transaction atomically: (results, None) or (None, errors). Without
        ``get_or_empty`` (Consul before 1.14) that verb is unknown."""
        errors: list[dict[str, Any]] = []
        for i, op in enumerate(ops):
            if op.verb == "get-or-empty" and not get_or_empty:
                errors.append({"OpIndex": i, "What": f"unknown KV verb {go_quote(op.verb)}"})
            elif not op.key and op.verb != "delete-tree":
                errors.append({"OpIndex": i, "What": "Must provide key"})
            elif op.verb == "lock" and self.lock_delay_active(op.key):
                errors.append({"OpIndex": i, "What": f"failed to lock key {go_quote(op.key)} due to lock delay"})
        if errors:
            return None, errors
        if not any(op.verb in KV_WRITE_VERBS for op in ops):
            return self._txn_dispatch(_KVView(self), 0, ops)
        with self._apply() as idx:
            view = _KVView(self)
            results, errors_out = self._txn_dispatch(view, idx, ops)
            if errors_out is None:
                self._commit(idx, view)
        return results, errors_out

    def _txn_dispatch(
        self, view: _KVView, idx: int, ops: list[TxnOp]
    ) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for i, op in enumerate(ops):
            try:
                results.extend(self._txn_op(view, idx, op))
            except StateError as err:
                errors.append({"OpIndex": i, "What": str(err)})
        if errors:
            return None, errors
        return results, None

    def _txn_op(self, view: _KVView, idx: int, op: TxnOp) -> list[dict[str, Any]]:
        key = op.key
        quoted = go_quote(key)
        entry = KVEntry(key, op.flags, op.value or None, op.session or None)
        verb = op.verb
        if verb == "set":
            return [{"KV": self._kv_set(view, idx, entry).to_api(with_value=False)}]
        if verb == "cas":
            if not self._kv_cas(view, idx, entry, op.index):
                raise StateError(f"failed to set key {quoted}, index is stale")
            return [{"KV": entry.to_api(with_value=False)}]
        if verb == "lock":
            if not self._kv_lock(view, idx, entry):
                raise StateError(f"failed to lock key {quoted}, lock is already held")
            return [{"KV": entry.to_api(with_value=False)}]
        if verb == "unlock":
            if not self._kv_unlock(view, idx, entry):
                raise StateError(f"failed to unlock key {quoted}, lock isn't held, or is held by another session")
            return [{"KV": entry.to_api(with_value=False)}]
        if verb == "delete":
            if view.get(key) is not None:
                view.delete(key)
            return []
        if verb == "delete-cas":
            if not self._kv_delete_cas(view, key, op.index):
                raise StateError(f"failed to delete key {quoted}, index is stale")
            return []
        if verb == "delete-tree":
            view.delete_tree(key)
            return []
        if verb in ("get", "get-or-empty"):
            found = view.get(key)
            if found is None:
                if verb == "get":
                    raise StateError(f"key {quoted} doesn't exist")
                return [{"KV": KVEntry(key, op.flags, None, op.session or None, 0, 0, op.index).to_api()}]
            return [{"KV": found.to_api()}]
        if verb == "get-tree":
            return [{"KV": view.get(k).to_api()} for k in view.scan(key)]  # type: ignore[union-attr]
        if verb == "check-session":
            found = view.get(key)
            if found is None:
                raise StateError(f"failed to check session, key {quoted} doesn't exist")
            if (found.session or "") != op.session:
                raise StateError(
                    f"failed session check for key {quoted}, current session {go_quote(found.session or '')} "
                    f"!= {go_quote(op.session)}"
                )
            return [{"KV": found.to_api(with_value=False)}]
        if verb == "check-index":
            found = view.get(key)
            if found is None:
                raise StateError(f"failed to check index, key {quoted} doesn't exist")
            if found.modify_index != op.index:
                raise StateError(
                    f"failed index check for key {quoted}, current modify index {found.modify_index} != {op.index}"
                )
            return [{"KV": found.to_api(with_value=False)}]
        if verb == "check-not-exists":
            if view.get(key) is not None:
                raise StateError(f"key {quoted} exists")
            return []
        raise StateError(f"unknown KV verb {go_quote(verb)}")

    # ------------------------------------------------------------------ sessions

    def session_create(self, req: SessionRequest) -> Session:
        """Session.Apply(create): validation on the leader, then the FSM apply."""
        if not req.node:
            raise StateError("Must provide Node")
        if req.behavior not in (BEHAVIOR_RELEASE, BEHAVIOR_DELETE):
            raise StateError(f"Invalid Behavior setting '{req.behavior}'")
        if req.ttl:
            try:
                ttl = parse_duration(req.ttl)
            except DurationError as err:
                raise StateError(f"Session TTL '{req.ttl}' invalid: {err}") from None
            if ttl != 0 and not SESSION_TTL_MIN <= ttl <= SESSION_TTL_MAX:
                raise StateError(
                    f"Invalid Session TTL '{ttl}', must be between "
                    f"[{format_duration(SESSION_TTL_MIN)}={format_duration(SESSION_TTL_MAX)}]"
                )
        session_id = str(uuid.uuid4())
        while session_id in self.sessions:
            session_id = str(uuid.uuid4())
        with self._apply() as idx:
            if req.node not in self.nodes:
                raise StateError("Missing node registration")
            node_checks = self.checks.get(req.node, {})
            probe = Session(
                session_id, req.node, node_checks=req.node_checks, service_checks=req.service_checks, checks=req.checks
            )
            for check_id in probe.check_ids():
                check = node_checks.get(check_id)
                if check is None:
                    raise StateError(f"Missing check '{check_id}' registration")
                if check.status == "critical":
                    raise StateError(f"Check '{check_id}' is in critical state")
            session = Session(
                id=session_id,
                node=req.node,
                name=req.name,
                lock_delay=req.lock_delay,
                behavior=req.behavior,
                ttl=req.ttl,
                node_checks=req.node_checks,
                service_checks=req.service_checks,
                checks=req.checks,
                create_index=idx,
                modify_index=idx,
            )
            self._put_session(session)
        return session

    def session_destroy(self, session_id: str) -> None:
        """Session.Apply(destroy); destroying an unknown session is not an error."""
        with self._apply() as idx:
            session = self.sessions.get(session_id)
            if session is not None:
                self._invalidate(session, idx)

    def _invalidate(self, session: Session, idx: int) -> None:
        """deleteSessionTxn: drop the session, release or delete its locks, arm lock-delay."""
        self._del_session(session.id, idx)
        delay = min(session.lock_delay, MAX_LOCK_DELAY)
        now = time.monotonic()
        for key in sorted(self._session_keys.pop(session.id, ())):
            entry = self.kv.get(key)
            if entry is None:
                continue
            if session.behavior == BEHAVIOR_DELETE:
                self._put_tomb(key, idx)
                self._del_kv(key, idx)
            else:
                self._put_kv(replace(entry, session=None, modify_index=idx))
            if delay > 0:
                self.lock_delays[key] = now + delay / SECOND

    def session_get(self, session_id: str) -> tuple[int, Session | None]:
        return self.tables["sessions"] or 1, self.sessions.get(session_id)

    def session_list(self) -> tuple[int, list[Session]]:
        return self.tables["sessions"] or 1, [self.sessions[k] for k in sorted(self.sessions)]

    def node_sessions(self, node: str) -> tuple[int, list[Session]]:
        ids = sorted(self._node_sessions.get(node, ()))
        return self.tables["sessions"] or 1, [self.sessions[i] for i in ids]

    # ------------------------------------------------------------------- catalog

    def register_node(self, name: str, address: str) -> None:
        """Register a node with its serfHealth check (what joining the LAN pool does)."""
        existing = self.nodes.get(name)
        if existing is not None and existing.address == address and SERF_CHECK in self.checks.get(name, {}):
            return
        with self._apply() as idx:
            existing = self.nodes.get(name)
            if existing is None or existing.address != address:
                create = existing.create_index if existing is not None else idx
                self._put_node(Node(name, address, node_id_for(name), create, idx))
            if SERF_CHECK not in self.checks.get(name, {}):
                self._put_check(Check(name, SERF_CHECK, SERF_CHECK_NAME, "passing", SERF_ALIVE, idx, idx))

    def deregister_node(self, name: str) -> None:
        with self._apply() as idx:
            for session_id in sorted(self._node_sessions.get(name, ())):
                self._invalidate(self.sessions[session_id], idx)
            self._del_node(name, idx)

    def set_node_health(self, name: str, alive: bool) -> None:
        """Flip serfHealth; going critical invalidates the sessions bound to it."""
        check = self.checks.get(name, {}).get(SERF_CHECK)
        status, output = ("passing", SERF_ALIVE) if alive else ("critical", SERF_FAILED)
        if check is None or (check.status == status and check.output == output):
            return
        with self._apply() as idx:
            self._put_check(replace(check, status=status, output=output, modify_index=idx))
            if not alive:
                for session_id in sorted(self._node_sessions.get(name, ())):
                    session = self.sessions[session_id]
                    if SERF_CHECK in session.check_ids():
                        self._invalidate(session, idx)

    def register_service(self, service: Service) -> None:
        existing = self.services.get(service.node, {}).get(service.id)
        if existing is not None and existing.same_definition(service):
            return
        with self._apply() as idx:
            service.create_index = existing.create_index if existing is not None else idx
            service.modify_index = idx
            self._put_service(service)

    def deregister_service(self, node: str, service_id: str) -> bool:
        if service_id not in self.services.get(node, {}):
            return False
        with self._apply() as idx:
            self._del_service(node, service_id, idx)
        return True

    def local_services(self, node: str) -> list[Service]:
        """Services in the node's agent-local state (the event service/tag filters match these)."""
        return [s for s in self.services.get(node, {}).values() if s.local]

    def catalog_index(self, *tables: str) -> int:
        return max(self.tables[t] for t in tables) or 1

    def service_names(self) -> dict[str, list[str]]:
        names: dict[str, list[str]] = {}
        for node in sorted(self.services):
            for service in self.services[node].values():
                tags = names.setdefault(service.name, [])
                for tag in service.tags:
                    if tag not in tags:
                        tags.append(tag)
        return {name: names[name] for name in sorted(names)}

    def service_instances(self, name: str, tags: list[str]) -> list[tuple[Node, Service]]:
        out = []
        for node_name in sorted(self.services):
            node = self.nodes.get(node_name)
            if node is None:
                continue
            for service in sorted(self.services[node_name].values(), key=lambda s: s.id):
                if service.name == name and all(t in service.tags for t in tags):
                    out.append((node, service))
        return out

    def node_checks(self, node: str) -> list[Check]:
        return [self.checks[node][c] for c in sorted(self.checks.get(node, {}))]

    # ------------------------------------------------------------ events, upkeep

    def next_ltime(self) -> int:
        """Take the Lamport time for a new user event (serf's event clock)."""
        ltime = self.ltime
        self.ltime += 1
        if self.journal is not None:
            self.journal.append({"c": [["ltime", self.ltime]]})
        return ltime

    def reap(self) -> None:
        """Tombstone GC (after tombstone_ttl) and expired lock-delay cleanup."""
        now = time.monotonic()
        for key in [k for k, exp in self.lock_delays.items() if exp <= now]:
            del self.lock_delays[key]
        expired = [k for k, (_index, created) in self.tombstones.items() if created + TOMBSTONE_TTL_SECONDS <= now]
        if not expired:
            return
        with self._apply():
            for key in expired:
                self._del_tomb(key)
