# SPDX-License-Identifier: MIT
"""Starting a release run: fire (the fire lock, the targets, the plan, the event), retry_stragglers
and resume (opening a run's canary gate).

Plain logic over a py-consul client talking to the leader's agent; no Ansible here (the
modules translate the exceptions into failures). ``InvalidValue`` means bad input,
``ReleaseError`` a state that forbids the operation (both are FireapErrors); py-consul
and requests exceptions are left to the caller, which wraps the call in
``_connection.consul_errors`` so that messages name the agent and never show the token.

How one release is started (``fire``):

1. the app's fire lock (``<app>/lock``) is acquired with a session of the leader's agent
   (no TTL, lock-delay 0, bound to the leader's serfHealth): it stays held after the
   module exits and marks the run as in flight. A lock held by a run that has finished
   (every target done or failed) or was aborted is taken over; one held by a run still
   in progress is refused unless ``force``;
2. the targets are the catalog's nodes that the release's filters select (the node regex
   matching the whole name, the service and tag) and that take the app: they advertise it
   (``<prefix>.apps/<node>``, written by each node's handler) and, when the app has
   service/tag filters there, the catalog lists a service of theirs that matches them
   (``AppAdvert.accepts``). The leader comes first. The fan-out, when not given, is the
   smallest ``max_semaphores`` the targets advertise. An app no node advertises is refused
   before the lock is taken. The plan of every target is written under the new run's ID
   (``<app>/plan/<run_id>/``) in /v1/txn batches, then the leader's own state (done, depth 0)
   and the release record in one last transaction: the run's plan is complete before any
   record names the run, and the plan in force never changes. Earlier runs' plans are
   deleted after that;

   An app whose targets advertise an artifact (``AppAdvert.artifact``: each node's own path
   template, whose file name must render the same on every target for the version, as the
   metadata names only that; the directories may differ) is released with its file: the
   leader renders its own template for the version, creates the torrent metadata of its own file (``_swarm.create_metadata``), writes it under
   the new run's ID (``<app>/artifact/<run_id>``) with the plan, and records its name, size
   and info-hash in the release record with the file's checksum (computed when not given;
   a checksum given must be the file's). Each target's plan entry lists its swarm neighbours
   (``_propagation.swarm_neighbours``: at most 8, at their catalog IP and advertised
   ``artifact_port``), and ``<app>/swarm/<run_id>`` (``SwarmRun``) holds the leader's, a key
   that exists so that the run's nodes can block on it until the leader says the run is
   over. The targets fetch the file from the swarm;
3. the user event ``FIREAP:TASK`` carrying ``{"app", "version"}`` is fired with the
   release's node filter only (Consul would match a service filter against service IDs, not
   the names the targets were chosen by). The event is only a wake-up: nodes read
   everything else from KV, and a node without a plan entry for the run does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ansible_collections.fireap.consul.plugins.module_utils._errors import InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._integrity import file_checksum
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_DONE,
    NODE_FAILED,
    NODE_TERMINAL_STATUSES,
    OUTCOME_RUNNING,
    OUTCOME_UNFINISHED,
    RELEASE_RUNNING,
    TXN_MAX_OPS,
    KVRecordError,
    LockRecord,
    NodeAdvert,
    NodeState,
    PlanEntry,
    ReleaseArtifact,
    ReleaseFilters,
    ReleaseRecord,
    RunSummary,
    Schema,
    Service,
    SwarmRun,
    txn_set_batches,
)
from ansible_collections.fireap.consul.plugins.module_utils._progress import (
    PENDING,
    ReleaseError,
    history_rows,
    info,
    last_good_run,
    read_history,
    read_lock,
    read_release,
    read_run,
    summarise,
    target_status,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import (
    plan_release,
    schedule_order,
    swarm_neighbours,
)
from ansible_collections.fireap.consul.plugins.module_utils._swarm import Metadata, create_metadata
from ansible_collections.fireap.consul.plugins.module_utils._task_event import EVENT_NAME
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import DEFAULT_PATH, ConfigError, load_config
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    STAGE_MAX,
    artifact_path,
    check_checksum,
    check_ip,
    endpoint,
    check_fanout,
    check_int,
    check_name,
    check_version,
)

#: The event body may not exceed this many bytes: Consul's docs advise payloads of about 100
#: bytes (Serf itself refuses only a whole event over EVENT_SIZE_LIMIT).
PAYLOAD_LIMIT = 100
#: Serf refuses a user event whose encoding (payload and filters included) exceeds this.
EVENT_SIZE_LIMIT = 512
#: Bytes an encoded FIREAP:TASK event takes besides its payload and filters (about 190: the
#: Serf name "consul:event:FIREAP:TASK" twice, msgpack field names, event ID, times), with margin.
EVENT_OVERHEAD = 200

#: How many names (of apps, of nodes) a refusal lists at most.
NAMES_SHOWN_MAX = 20
#: The check whose state tells whether a node's agent is alive.
SERF_CHECK = "serfHealth"

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


class FireLockHeld(ReleaseError):
    """The app's fire lock is held by a run that is still in progress (``lock``: LockRecord)."""

    def __init__(self, message: str, lock: LockRecord | None) -> None:
        super().__init__(message)
        self.lock = lock


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
            f"the event payload for app {app!r} and version {version!r} is {len(payload)} bytes, over the "
            f"{PAYLOAD_LIMIT}-byte budget Consul advises for user event payloads: app and version may take {PAYLOAD_LIMIT - fixed} bytes "
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
        raise InvalidValue(f"{what} must be a non-empty regular expression, got {pattern!r}")
    if not pattern.isprintable():
        raise InvalidValue(f"{what} {pattern!r} must not contain control characters")
    try:
        re.compile(pattern)
    except re.error as err:
        raise InvalidValue(f"{what} {pattern!r} is not a valid regular expression: {err}") from None
    problem = _re2_problem(pattern)
    if problem:
        raise InvalidValue(
            f"{what} {pattern!r} uses {problem}, which Consul's regular expressions (Go RE2 syntax) do not support"
        )
    return pattern


def _check_word(value, what: str, forbidden: str = "") -> str:
    """Return ``value`` if it is one printable word without any of the ``forbidden`` characters."""
    if not isinstance(value, str) or not value:
        raise InvalidValue(f"{what} must be a non-empty string, got {value!r}")
    if not value.isprintable() or any(char.isspace() or char in forbidden for char in value):
        banned = "whitespace or control characters"
        if forbidden:
            banned = f"whitespace, control characters or any of {forbidden!r}"
        raise InvalidValue(f"{what} {value!r} must not contain {banned}")
    return value


def check_service(service) -> str:
    """Return ``service`` if it can name a Consul service in a catalog URL and an event filter."""
    return _check_word(service, "service", "/?#%")


def check_tag(tag) -> str:
    """Return ``tag`` if it can be a service tag in a catalog query and an event filter."""
    return _check_word(tag, "tag")


def _utf8_len(text: str | None) -> int:
    return len(text.encode("utf-8")) if text else 0


def _filter_budget(payload: bytes) -> int:
    """Bytes left for the node filter of an event with ``payload``."""
    return EVENT_SIZE_LIMIT - EVENT_OVERHEAD - len(payload)


def _check_event_size(payload: bytes, filters: ReleaseFilters, leader: str | None = None) -> None:
    budget = _filter_budget(payload)
    node_bytes = _utf8_len(event_node_filter(filters.node, leader))
    if node_bytes > budget:
        raise ReleaseError(
            f"the event with its node filter would not fit in one Consul user event: Serf sends an event, its "
            f"payload ({len(payload)} bytes) and its filters (node {node_bytes} bytes) in one message of at most "
            f"{EVENT_SIZE_LIMIT} bytes, about {EVENT_OVERHEAD} of which are taken by the event itself; shorten "
            "the node filter"
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
    targets, _plans, states = read_run(client, schema, app, release, [])
    unfinished = sum(1 for name in targets if target_status(states.get(name), release) not in NODE_TERMINAL_STATUSES)
    if not unfinished:
        return None
    return f"that release is still running: {unfinished} of {len(targets)} targets have not finished"


def _check_lock(client, schema: Schema, app: str, force: bool, release: ReleaseRecord | None):
    """The held lock's entry and record when the caller may take it over, else FireLockHeld."""
    entry, lock = read_lock(client, schema, app)
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
    session = client.session.create(
        name=f"fireap fire lock {app} run {record.run_id}", lock_delay=0, behavior="release"
    )
    key = schema.lock(app)
    if client.kv.put(key, record.to_json(), acquire=session):
        return session
    client.session.destroy(session)
    entry, lock = read_lock(client, schema, app)
    if entry is not None and entry.get("Session"):
        _entry, release = read_release(client, schema, app)
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


def event_node_filter(node_filter: str | None, leader: str | None = None) -> str | None:
    """The event's node filter for ``node_filter``, anchored: Consul's agents search it
    unanchored, and it must select whole names, as the targets are chosen (``web1`` is not
    ``web10``). ``leader``: a node the event must reach too, whatever the filter (the leader of
    a run with an artifact serves the file, and only the event starts its worker)."""
    if node_filter is None:
        return None
    if leader is None:
        return f"^(?:{node_filter})$"
    escaped = check_name(leader, "node").replace(".", r"\.")
    return f"^(?:(?:{node_filter})|{escaped})$"


@dataclass(frozen=True)
class Targets:
    """Who a run goes to, and the nodes the release's filters select that it leaves out."""

    names: list[str]  # schedule order, the leader first
    fanout: int | None  # the smallest max_semaphores the targets advertise; None when none does
    unreachable: list[str]  # targets whose serfHealth is critical: they catch up when their agent is back
    without_app: list[str]  # do not advertise the app
    not_accepting: list[str]  # advertise it, but its service/tag filters match none of their services
    artifacts: Mapping[str, str] = dataclasses.field(default_factory=dict)  # node -> its artifact path template
    artifact_ports: Mapping[str, int] = dataclasses.field(default_factory=dict)  # node -> its swarm's port


def choose_targets(
    app: str,
    leader: str,
    names: Iterable[str],
    adverts: Mapping[str, NodeAdvert],
    services: Mapping[str, list[Service]],
    critical: Iterable[str] = (),
) -> Targets:
    """The targets among ``names`` (the nodes the release's own filters select): the leader,
    then every node whose advert lists ``app`` and accepts the node's ``services`` (from the
    catalog). ``critical``: nodes whose serfHealth is critical."""
    chosen: list[str] = []
    without_app: list[str] = []
    not_accepting: list[str] = []
    for name in names:
        if name == leader:
            continue
        advert = adverts.get(name)
        app_advert = advert.apps.get(app) if advert is not None else None
        if app_advert is None:
            without_app.append(name)
        elif app_advert.accepts(services.get(name, ())):
            chosen.append(name)
        else:
            not_accepting.append(name)
    ordered = schedule_order(chosen, leader)
    fanouts = [adverts[name].apps[app].max_semaphores for name in ordered
               if name in adverts and app in adverts[name].apps]
    down = set(critical)
    ports = {name: adverts[name].apps[app].artifact_port for name in ordered
             if name in adverts and app in adverts[name].apps and adverts[name].apps[app].artifact_port is not None}
    return Targets(ordered, min(fanouts, default=None), [name for name in ordered if name in down],
                   sorted(without_app), sorted(not_accepting), _artifact_templates(app, ordered, adverts), ports)


def _artifact_templates(app: str, targets: list[str], adverts: Mapping[str, NodeAdvert]) -> dict[str, str]:
    """Node -> the artifact path template it advertises for ``app``, for the ``targets`` that
    advertise the app (empty: the app has no artifact); ReleaseError when some of them declare
    an artifact and others none, since every target of a run fetches the file."""
    templates: dict[str, str] = {}
    without: list[str] = []
    for name in targets:
        app_advert = adverts[name].apps.get(app) if name in adverts else None
        if app_advert is not None and app_advert.artifact is not None:
            templates[name] = app_advert.artifact
        elif app_advert is not None:
            without.append(name)
    if templates and without:
        raise ReleaseError(f"the targets of app {app!r} do not agree on its artifact (no artifact on "
                           f"{_listed(without)}; an artifact on {_listed(list(templates))}): give the app an "
                           "artifact.path on every node or on none (the fireap_node role's fireap_node_apps) and apply "
                           "the role")
    return templates


def local_artifact_template(app: str, leader: str, config_path: str, advertised: Mapping[str, str]) -> str:
    """The artifact path template of ``app`` in the leader's task config at ``config_path``: the
    fire runs on the leader, and the file it hashes and publishes must be named by the leader's
    own config, not by its advert in KV, which whoever can write KV can change. ReleaseError
    when the config has no artifact for the app or the advert names another template."""
    try:
        artifact = load_config(config_path).app(app).artifact
    except ConfigError as exc:
        raise ReleaseError(f"the targets of app {app!r} declare an artifact, but the leader's task config does not "
                           f"give it: {exc}; nothing was fired") from None
    if artifact is None:
        raise ReleaseError(f"the targets of app {app!r} declare an artifact, but the leader's task config "
                           f"{config_path} gives the app none; nothing was fired")
    if leader in advertised and advertised[leader] != artifact.path:
        raise ReleaseError(f"the leader {leader}'s advert of app {app!r} in Consul KV names the artifact path "
                           f"{advertised[leader]!r}, its task config {config_path} {artifact.path!r}: the fire "
                           "serves only what the config names (reload the leader's agent to advertise it again); "
                           "nothing was fired")
    return artifact.path


def leader_artifact_path(app: str, version: str, leader: str, templates: Mapping[str, str], fired: Iterable[str]) -> str:
    """The path of the leader's artifact of ``app`` at ``version``, from the leader's own
    template. The metadata names only the file, so each of the ``fired`` targets' templates
    must render the same file name (in a directory of the node's own); ReleaseError otherwise."""
    if leader not in templates:
        raise ReleaseError(f"the targets of app {app!r} declare an artifact, but the leader {leader} does not "
                           "(it serves the file from its own artifact.path): give the app the artifact on the leader "
                           "too; nothing was fired")
    names: dict[str, list[str]] = {}
    for name in dict.fromkeys([leader, *fired]):
        if name in templates:
            names.setdefault(artifact_path(templates[name], app, version).rpartition("/")[2], []).append(name)
    if len(names) > 1:
        shown = "; ".join(f"{rendered!r} on {_listed(nodes)}" for rendered, nodes in sorted(names.items()))
        raise ReleaseError(f"the targets of app {app!r} name its artifact of version {version} differently "
                           f"({shown}): each node may keep it in a directory of its own, but the file name its "
                           "artifact.path renders must be the same on every node; nothing was fired")
    return artifact_path(templates[leader], app, version)


def read_adverts(client, schema: Schema) -> tuple[dict[str, NodeAdvert], list[str]]:
    """Every node's advert (``<prefix>.apps/<node>``) and a message for each unreadable one
    (its node counts as having no app)."""
    prefix = schema.adverts_prefix()
    _index, entries = client.kv.get(prefix, recurse=True)
    adverts: dict[str, NodeAdvert] = {}
    errors: list[str] = []
    for entry in entries or ():
        key = entry["Key"]
        try:
            node = check_name(key[len(prefix):], "node")
            adverts[node] = NodeAdvert.from_json(entry.get("Value"), key)
        except (KVRecordError, ValueError) as err:
            errors.append(f"{err}; that node counts as having no app until its handler writes the advert again")
    return adverts, errors


def _catalog_services(client, patterns: set[str]) -> dict[str, list[Service]]:
    """Node -> (name, tags) of each catalog service whose name one of ``patterns`` matches:
    one request for the names, one per matching name."""
    if not patterns:
        return {}
    _index, catalog = client.catalog.services()
    compiled = [re.compile(pattern) for pattern in sorted(patterns)]
    services: dict[str, list[Service]] = {}
    for name in sorted(catalog or {}):
        if not isinstance(name, str) or not any(pattern.search(name) for pattern in compiled):
            continue
        _index, entries = client.catalog.service(urllib.parse.quote(name, safe=""))
        for entry in entries or ():
            tags = entry.get("ServiceTags") or []
            if isinstance(entry.get("Node"), str) and isinstance(tags, list):
                services.setdefault(entry["Node"], []).append((name, [tag for tag in tags if isinstance(tag, str)]))
    return services


def _critical_nodes(client) -> set[str]:
    _index, checks = client.health.state("critical")
    return {check.get("Node") for check in checks or () if check.get("CheckID") == SERF_CHECK}


def _selected(client, leader: str, filters: ReleaseFilters, nodes: list[dict]) -> list[str]:
    """The catalog's node names the release's own filters select (``filters.node`` matching
    the whole name, ``filters.service`` with ``filters.tag`` as listed by the catalog)."""
    names = [node["Node"] for node in nodes]
    if filters.node:
        names = [name for name in names if re.fullmatch(filters.node, name)]
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
    return names


def _listed(names: list[str]) -> str:
    """``names`` for a message: the first NAMES_SHOWN_MAX of them, and how many more."""
    if not names:
        return "none"
    shown = ", ".join(names[:NAMES_SHOWN_MAX])
    return shown + (f" and {len(names) - NAMES_SHOWN_MAX} more" if len(names) > NAMES_SHOWN_MAX else "")


def resolve_targets(client, schema: Schema, app: str, leader: str, filters: ReleaseFilters,
                    nodes: list[dict]) -> tuple[Targets, list[str]]:
    """The run's targets (``choose_targets`` over what Consul says) and the adverts' errors.

    ``nodes``: the answer of /v1/catalog/nodes. ReleaseError, before anything is written,
    when no node of the catalog advertises ``app`` (naming the apps the nodes have) or no
    node besides the leader takes it.
    """
    adverts, errors = read_adverts(client, schema)
    catalog = [node["Node"] for node in nodes]
    apps = sorted({name for node in catalog if node in adverts for name in adverts[node].apps})
    if app not in apps:
        raise ReleaseError(
            f"app {app!r} is configured on no node: none advertises it in {schema.adverts_prefix()}<node> (the "
            f"apps the nodes have: {_listed(apps)}). Check the app name, or add the app to the nodes' task "
            "config (the fireap_node role's fireap_node_apps) and apply the role"
        )
    names = _selected(client, leader, filters, nodes)
    wanted = [adverts[name].apps[app] for name in names if name in adverts and app in adverts[name].apps]
    services = _catalog_services(client, {advert.service_filter for advert in wanted if advert.service_filter})
    targets = choose_targets(app, leader, names, adverts, services, _critical_nodes(client))
    if len(targets.names) == 1:
        left_out = []
        if targets.without_app:
            left_out.append(f"{len(targets.without_app)} do not have it ({_listed(targets.without_app)})")
        if targets.not_accepting:
            left_out.append(f"{len(targets.not_accepting)} have it, but its service/tag filters there match none of "
                            f"their services in the catalog ({_listed(targets.not_accepting)})")
        raise ReleaseError(
            f"no node besides the leader {leader} takes app {app!r}"
            + (f" among the nodes the filters {_filters_text(filters)} select" if any(filters.to_dict().values())
               else "")
            + (": " + "; ".join(left_out) if left_out else "")
        )
    return targets, errors


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


def _record_run(client, schema: Schema, app: str, plan, record: ReleaseRecord, release_entry, history,
                metadata: Metadata | None, swarm: SwarmRun | None) -> None:
    """Write the plan (and the artifact's ``metadata`` with the run's ``swarm`` record, in a
    transaction of their own: the metadata may take most of one) under the new run's ID, then
    switch the release record to the run.

    The plan may take several transactions (Consul takes 64 operations in one before 1.14); a
    fire interrupted between them leaves a partial plan under a run ID no record names, and
    the run in force keeps its own (the next fire deletes it). The last transaction writes the
    leader's state, the ``history`` (a History) and the release record together, only if the
    record is still the one read before (ops apply in order: the check comes first), so a
    concurrent writer is noticed.
    """
    run_id = record.run_id
    if metadata is not None and swarm is not None:
        _txn(client, txn_set_batches([(schema.artifact(app, run_id), metadata.info),
                                      (schema.swarm_run(app, run_id), swarm.to_json())]))
    _txn(client, txn_set_batches([(schema.plan(app, run_id, name), entry.to_json()) for name, entry in plan.items()]))
    key = schema.release(app)
    if release_entry is None:
        check = {"KV": {"Verb": "check-not-exists", "Key": key}}
    else:
        check = {"KV": {"Verb": "check-index", "Key": key, "Index": release_entry["ModifyIndex"]}}
    leader_state = NodeState(
        version=record.version, run_id=run_id, status=NODE_DONE, started=record.fired_at,
        finished=record.fired_at, depth=0,
    )
    sets = txn_set_batches([(schema.node(app, record.leader), leader_state.to_json()),
                            (schema.history(app), history.to_json()), (key, record.to_json())])
    try:
        client.txn.put([check] + sets[0])
    except Exception as err:
        current = client.kv.get(key, consistency="consistent")[1]
        if (current and current["ModifyIndex"]) != (release_entry and release_entry["ModifyIndex"]):
            raise ReleaseError(
                f"the release record of app {app!r} changed while run {run_id} was being recorded "
                "(fireap_clear or another fire); nothing was fired: check fireap_info and fire again"
            ) from err
        raise


def _stale(client, prefix: str, current: str) -> list[str]:
    """The keys under ``prefix`` other than the current run's: its folder ``current`` (ending
    in ``/``: the plans) or its one key ``current`` (the artifact's metadata)."""
    keys = client.kv.get(prefix, keys=True)[1] or []
    if current.endswith("/"):
        return sorted(key for key in keys if not key.startswith(current))
    return sorted(key for key in keys if key != current)


def _deletes(base: str, stale: list[str]) -> list[dict]:
    """Txn ops deleting ``stale`` (keys under ``base``): each run's folder at once, any other key alone."""
    folders, keys = set(), []
    for key in stale:
        run, slash, _node = key[len(base):].partition("/")
        if slash:
            folders.add(base + run + "/")
        else:
            keys.append(key)
    return ([{"KV": {"Verb": "delete-tree", "Key": folder}} for folder in sorted(folders)]
            + [{"KV": {"Verb": "delete", "Key": key}} for key in keys])


def _retry_targets(app: str, current: dict | None, targets: list[str]) -> list[str]:
    """The leader and those of ``targets`` that failed in the run ``current`` shows."""
    if current is None:
        raise ReleaseError(f"app {app!r} has no run whose failed targets could be retried: fire one first")
    run = f"run {current['run_id']} of app {app!r} (version {current['version']})"
    if current["status"] == "aborted":
        raise ReleaseError(f"{run} was aborted; fire a new run instead of retrying its failed targets")
    if not current["all_finished"]:
        unfinished = current["total"] - current["counts"][NODE_DONE] - current["counts"][NODE_FAILED]
        raise ReleaseError(f"{run} is not over ({unfinished} targets have not finished): wait for it, or re-fire "
                           "the event to its stragglers with retry_stragglers")
    failed = {row["node"] for row in current["failed_nodes"]}
    if not failed:
        raise ReleaseError(f"{run} has no failed targets: nothing to retry")
    chosen = [name for name in targets[1:] if name in failed]
    if not chosen:
        raise ReleaseError(f"none of the failed targets of {run} ({_listed(sorted(failed))}) is still selected "
                           "by the filters and has the app")
    return targets[:1] + chosen


def _closed(history, current: dict) -> RunSummary:
    """The history's line of the run ``current`` shows, closed now that a new run replaces it."""
    entry = next((run for run in history.runs if run.run_id == current["run_id"]), None)
    if entry is None:  # a run fired before the history existed, or whose line was lost
        release = current["release"]
        entry = RunSummary(run_id=current["run_id"], version=current["version"], kind="release", fired_by="unknown",
                           fired_at=release["fired_at"], target_count=release["target_count"])
    closed = summarise(entry, current)
    if closed.outcome == OUTCOME_RUNNING:
        closed = RunSummary(**{**closed.to_dict(), "outcome": OUTCOME_UNFINISHED})
    return closed


def _history_text(rows: list[dict]) -> str:
    """The newest runs of ``rows`` (history_rows) for a message: version and outcome."""
    shown = [f"{row['version']} {row['outcome']}" for row in rows[:5]]
    return ", ".join(shown) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "") if shown else "empty"


def fire(
    client,
    schema: Schema,
    app: str,
    version: str | None = None,
    node_filter: str | None = None,
    service: str | None = None,
    tag: str | None = None,
    fanout: int | None = None,
    force: bool = False,
    check_mode: bool = False,
    holder: str | None = None,
    retry_failed: bool = False,
    rollback: bool = False,
    pause_after_stage: int | None = None,
    checksum: str | None = None,
    config_path: str = DEFAULT_PATH,
) -> dict:
    """Start a run of ``app`` at ``version`` (default: the previous version + 1).

    ``retry_failed``: a run of the current version to the current run's failed targets only
    (those the filters still select and that still have the app), once that run is over, with
    its checksum. ``rollback``: a run of the last version a run delivered to every target (from
    the history), other than the current one, with the checksum that run had. ``pause_after_stage``: the canary gate (targets of
    later plan stages start only once ``resume`` opens it). ``checksum``: the build's
    ``sha256:<hex>`` digest, which each target verifies before its after_commands. Either is refused with ReleaseError when there is
    nothing to do; neither takes ``version``. ``config_path``: the leader's own task config, read
    only when the targets advertise an artifact: the file hashed and published is the one its
    artifact.path names, never one a KV writer put in the leader's advert.

    ``client`` talks to the leader's agent: its node is the run's leader and always target
    0. ``node_filter`` must match a node's whole name. ``fanout`` None: the smallest
    ``max_semaphores`` the targets advertise. Returns ``run_id``, ``version``,
    ``previous_version``, ``targets`` (schedule order), ``target_count``, ``leader``,
    ``fanout``, ``filters``, ``event_id`` (None in check mode), ``release`` (the record
    written), ``previous_release``, ``took_over`` (the lock record of the finished or forced
    run whose lock was taken, else None), ``stale_plans`` (plan keys of earlier runs,
    deleted once the new run is recorded), ``unreachable_targets`` (targets whose serfHealth is critical: they pull when
    their agent is back), ``without_app`` and ``not_accepting`` (selected nodes left out: no
    advert of the app; its filters match none of their services) and ``advert_errors``
    (unreadable adverts), ``kind`` (release, retry or rollback), ``retry_of`` (the run whose
    failed targets a retry runs, else None) and ``history`` (the app's last runs, newest
    first, this one included). In check mode nothing is written and no event is fired, but
    the lock is still checked.

    Raises FireLockHeld when a run still in progress holds the lock (unless ``force``),
    ReleaseError / ValueError for bad input, and ReleaseError before taking the lock when
    no node advertises the app or none besides the leader takes it. When the event cannot be
    fired after the run was recorded, ReleaseError says so: retry_stragglers() fires it again.
    """
    check_name(app, "app")
    if version is not None:
        check_version(version)
    if retry_failed and rollback:
        raise InvalidValue("retry_failed and rollback start different runs: give one of them")
    if (retry_failed or rollback) and version is not None:
        raise InvalidValue(f"{'retry_failed' if retry_failed else 'rollback'} decides the version itself: "
                           "leave version out")
    if fanout is not None:
        check_fanout(fanout)
    if pause_after_stage is not None:
        check_int(pause_after_stage, "pause_after_stage", 1, STAGE_MAX)
    if checksum is not None:
        check_checksum(checksum)
    if node_filter is not None:
        check_filter_regex(node_filter, "node_filter")
    if service is not None:
        check_service(service)
    if tag is not None:
        check_tag(tag)
        if service is None:
            raise InvalidValue("tag selects instances of a service: give service too")
    filters = ReleaseFilters(node=node_filter, service=service, tag=tag)
    if version is not None:
        _check_event_size(_check_payload(app, version), filters)

    leader = _leader(client)
    _index, catalog = client.catalog.nodes()
    chosen, advert_errors = resolve_targets(client, schema, app, leader, filters, catalog or [])
    targets = chosen.names
    if fanout is None:
        fanout = chosen.fanout
    release_entry, previous = read_release(client, schema, app)
    previous_version = previous.version if previous else None
    current = info(client, schema, app) if previous is not None else None
    history_warnings: list[str] = []
    _history_entry, history = read_history(client, schema, app, history_warnings)
    kind, retry_of = "release", None
    if retry_failed:
        # The same version and build: the retried targets verify it against the same checksum.
        kind, targets = "retry", _retry_targets(app, current, targets)
        version, retry_of = previous_version, current["run_id"] if current else None
        checksum = checksum or (previous.checksum if previous else None)
    elif rollback:
        kind = "rollback"
        rows = history_rows(history, current or {"run_id": None})
        good = last_good_run(rows, previous_version)
        if good is None:
            raise ReleaseError(
                f"app {app!r} has no earlier version that a run delivered to every target (history: "
                f"{_history_text(rows)}); nothing to roll back to"
            )
        version, checksum = good["version"], checksum or good["checksum"]
    if version is None:
        version = check_version(next_version(previous_version))
    payload = _check_payload(app, version)
    _check_event_size(payload, filters, leader if chosen.artifacts else None)
    path = None
    if chosen.artifacts:
        templates = dict(chosen.artifacts, **{leader: local_artifact_template(app, leader, config_path, chosen.artifacts)})
        path = leader_artifact_path(app, version, leader, templates, targets)
    metadata, checksum = _artifact_of(app, version, path, checksum)

    held_entry, held_lock = _check_lock(client, schema, app, force, previous)
    run_id = uuid.uuid4().hex
    addresses = {node["Node"]: node["Address"] for node in catalog or () if node.get("Address")}
    plan = plan_release(targets, leader, fanout, run_id, addresses)
    swarm = None
    if metadata is not None:
        plan, swarm = _with_swarm_peers(app, plan, targets, leader, run_id, addresses, chosen.artifact_ports)
    stale = _stale(client, schema.plans_prefix(app), schema.plan_prefix(app, run_id))
    # Only a run with an artifact, or after one, has metadata to replace: other apps' fires
    # make the requests they always made.
    swarmed = metadata is not None or (previous is not None and previous.artifact is not None)
    stale_artifacts = _stale(client, schema.artifacts_prefix(app), schema.artifact(app, run_id)) if swarmed else []
    stale_swarms = _stale(client, schema.swarms_prefix(app), schema.swarm_run(app, run_id)) if swarmed else []

    now = time.time()
    holder = holder or default_holder()
    if current is not None:
        history = history.with_run(_closed(history, current))
    history = history.with_run(RunSummary(run_id=run_id, version=version, kind=kind, fired_by=holder, fired_at=now,
                                          target_count=len(targets), retry_of=retry_of, checksum=checksum))
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
        pause_after_stage=pause_after_stage,
        checksum=checksum,
        artifact=None if metadata is None else ReleaseArtifact(name=metadata.name, length=metadata.length,
                                                               info_hash=metadata.info_hash),
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
        "unreachable_targets": chosen.unreachable,  # Ansible reads "unreachable" as the host's own state
        "without_app": chosen.without_app,
        "not_accepting": chosen.not_accepting,
        "advert_errors": advert_errors + history_warnings,
        "kind": kind,
        "retry_of": retry_of,
        "history": history_rows(history, {"run_id": None}),
    }
    if check_mode:
        return result

    lock = LockRecord(run_id=run_id, holder=holder, since=now)
    session = _take_lock(client, schema, app, held_entry, lock)
    try:
        _record_run(client, schema, app, plan, record, release_entry, history, metadata, swarm)
    except Exception:
        client.session.destroy(session)
        raise
    # Once no record names them: a node reading them now finds a release of another run.
    _txn(client, _chunks(_deletes(schema.plans_prefix(app), stale)
                         + _deletes(schema.artifacts_prefix(app), stale_artifacts)
                         + _deletes(schema.swarms_prefix(app), stale_swarms)))
    try:
        # No service or tag filter: Consul matches an event's service filter against the IDs of
        # each agent's services, the targets were chosen by service name. The node filter
        # selects by name as the targets were; a node woken without a plan entry does nothing.
        event = client.event.fire(EVENT_NAME, payload,
                                  node=event_node_filter(filters.node, leader if metadata is not None else None))
    except Exception as err:
        raise ReleaseError(
            f"run {run_id} of app {app!r} (version {version}) was recorded, but firing the {EVENT_NAME} event "
            f"failed: {err}. Fire it again with retry_stragglers, or abort the run with fireap_clear abort=true"
        ) from err
    result["event_id"] = event["ID"]
    return result


def _with_swarm_peers(app: str, plan: Mapping[str, PlanEntry], targets: list[str], leader: str, run_id: str,
                      addresses: Mapping[str, str], ports: Mapping[str, int]) -> tuple[dict[str, PlanEntry], SwarmRun]:
    """The plan with each target's swarm neighbours (``swarm_neighbours``) as ``ADDRESS:PORT``,
    and the run's swarm record with the leader's: ReleaseError when a node's catalog address is
    not an IP literal, it advertises no swarm port, or two nodes would serve at one endpoint."""
    neighbours = swarm_neighbours(targets, leader, run_id)
    endpoints = {}
    for name in neighbours:
        if name not in ports:
            raise ReleaseError(f"node {name} advertises no swarm port for app {app!r}: apply the fireap_node role "
                               "there; nothing was fired")
        try:
            endpoints[name] = endpoint(check_ip(addresses.get(name)), ports[name])
        except InvalidValue as exc:
            raise ReleaseError(f"node {name} cannot join the swarm of app {app!r}: its catalog {exc}; nothing was "
                               "fired") from None
    shared: dict[str, str] = {}
    for name, where in endpoints.items():
        if where in shared:
            raise ReleaseError(f"nodes {shared[where]} and {name} would both serve app {app!r} at {where}: give "
                               "nodes that share an address different artifact ports; nothing was fired")
        shared[where] = name
    peers = {name: tuple(endpoints[other] for other in near) for name, near in neighbours.items()}
    with_peers = {name: dataclasses.replace(entry, peers=peers[name]) for name, entry in plan.items()}
    return with_peers, SwarmRun(leader_peers=peers[leader])


def _artifact_of(app: str, version: str, path: str | None,
                 checksum: str | None) -> tuple[Metadata | None, str | None]:
    """The metadata of the leader's artifact of ``app`` at ``version``, the file at ``path``
    (None: the app has none), and the release's checksum: the file's, which ``checksum``, when
    given, must be."""
    if path is None:
        return None, checksum
    metadata = create_metadata(path)
    actual = file_checksum(path)
    if checksum is not None and checksum != actual:
        raise ReleaseError(f"the artifact {path} of app {app!r} version {version} has the checksum {actual}, not "
                           f"{checksum} as given; nothing was fired")
    return metadata, actual


def _running_release(client, schema: Schema, app: str, version: str | None, what: str, hint: str):
    """The entry and record of ``app``'s current run, which ``what`` (retry, resume) acts on:
    ReleaseError when there is none, it was aborted, or ``version`` is not its version."""
    check_name(app, "app")
    if version is not None:
        check_version(version)
    entry, release = read_release(client, schema, app)
    if release is None:
        raise ReleaseError(f"app {app!r} has no release to {what}: {hint}")
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
    return entry, release


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
    _entry, release = _running_release(client, schema, app, version, "retry", "fire one first")
    targets, plans, states = read_run(client, schema, app, release, [])
    stragglers = [
        name for name in targets
        if name != release.leader and target_status(states.get(name), release) == PENDING
        and not release.holds(plans[name].stage)  # the canary gate holds it: resume wakes it
    ]
    # The leader of a run with an artifact serves the file: woken too, in case its worker
    # stopped (after watch_timeout); a worker still serving holds the app's lock, so none doubles it.
    woken = [release.leader] + stragglers if release.artifact is not None and stragglers else stragglers
    if woken is not stragglers and not check_mode:
        _reopen_swarm(client, schema, release)
    payload = event_payload(app, release.version)
    node_filters = anchored_node_filters(woken, _filter_budget(payload))
    events = []
    for node_filter in node_filters:
        event_id = None
        if not check_mode:
            event_id = client.event.fire(EVENT_NAME, payload, node=node_filter)["ID"]
        events.append({"event_id": event_id, "node_filter": node_filter})
    return {"run_id": release.run_id, "version": release.version, "stragglers": stragglers, "events": events}


def wake(client, release: ReleaseRecord, nodes) -> None:
    """Fire the run's event again to ``nodes`` only (the run and its plan unchanged): a target
    saw the leader's serving worker end before the run was over, or the leader sees targets
    that gossip did not reach, and only the event starts their workers."""
    payload = event_payload(release.app, release.version)
    for node_filter in anchored_node_filters(nodes, _filter_budget(payload)):
        client.event.fire(EVENT_NAME, payload, node=node_filter)


def _reopen_swarm(client, schema: Schema, release: ReleaseRecord) -> None:
    """Reopen the run's swarm record if the leader recorded it finished: it counts a target
    whose worker died as over, and a straggler started again would find the run ended and
    no node serving. The leader's handler serves an open record again (a new attempt); a
    record that says the leader cannot serve stays as it is."""
    key = schema.swarm_run(release.app, release.run_id)
    _index, entry = client.kv.get(key)
    if entry is None:
        return
    try:
        record = SwarmRun.from_json(entry.get("Value"), key)
    except KVRecordError:  # no node reads it as over: nothing to reopen
        return
    if record.finished is not None and record.refused is None:
        reopen_swarm_run(client, key, record, entry["ModifyIndex"])


def reopen_swarm_run(client, key: str, record: SwarmRun, modify_index: int) -> bool:
    """Write the finished swarm record ``record`` (read at ``modify_index``) back open. A
    check-and-set: only the leader writes an over record, so a failed write means a newer one."""
    return bool(client.kv.put(key, dataclasses.replace(record, finished=None).to_json(), cas=modify_index))


def resume(client, schema: Schema, app: str, version: str | None = None, check_mode: bool = False) -> dict:
    """Open the canary gate of ``app``'s current run: record ``resumed_at`` on the release record
    (only if it is still the one read: compare-and-set) and fire the event, so that the targets
    of later stages start. ``version``, when given, must be the run's.

    Returns ``run_id``, ``version``, ``pause_after_stage``, ``resumed_at``, ``release`` (the
    record written) and ``event_id`` (None in check mode). ReleaseError when there is no run,
    it was aborted, it has no canary gate or the gate is open already.
    """
    entry, release = _running_release(client, schema, app, version, "resume", "fire one with pause_after_stage first")
    run = f"run {release.run_id} of app {app!r} (version {release.version})"
    if release.pause_after_stage is None:
        raise ReleaseError(f"{run} has no canary gate (pause_after_stage): there is nothing to resume")
    if release.resumed_at is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(release.resumed_at))
        raise ReleaseError(f"{run} was resumed already, at {when}")
    resumed = dataclasses.replace(release, resumed_at=time.time())
    result = {"run_id": release.run_id, "version": release.version, "pause_after_stage": release.pause_after_stage,
              "resumed_at": resumed.resumed_at, "release": resumed.to_dict(), "event_id": None}
    if check_mode:
        return result
    if not client.kv.put(schema.release(app), resumed.to_json(), cas=entry["ModifyIndex"]):
        raise ReleaseError(f"the release record of app {app!r} changed while {run} was being resumed: check "
                           "fireap_info and resume again")
    payload = event_payload(app, release.version)
    leader = release.leader if release.artifact is not None else None
    result["event_id"] = client.event.fire(EVENT_NAME, payload,
                                           node=event_node_filter(release.filters.node, leader))["ID"]
    return result
