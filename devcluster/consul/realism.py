"""Where the double may be as unkind as Consul is: each such behaviour a setting.

The defaults keep the double's older, kinder behaviour (instant failure detection, instant and
lossless gossip, missing keys that wake only on their own write, a 100-byte event payload
limit); ``Realism.consul()`` gives the values Consul shows. ``python -m devcluster serve``
takes them as options (``--realistic`` for all of them), the Double classes as ``realism=``.

    failure_detection  seconds a crashed (stopped) agent's node stays serfHealth passing,
                       its sessions valid: memberlist's probe plus suspicion timeout
    missing_key        how a blocking read of a missing KV key behaves (MISSING_KEY_* below)
    gossip             user event delivery to each agent: delay, jitter, loss, duplication,
                       reordering, drawn from a random generator seeded per agent
    event_payload_limit  bytes of event payload past which the fire answers 413 (None: only
                       Serf's 512-byte limit on the whole encoded event, as Consul)
    consul_version     the version agents report; below 1.14 /v1/txn takes 64 operations
                       (128 from 1.14) and refuses the "get-or-empty" verb
"""

from __future__ import annotations

import argparse
import math
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .state import CONSUL_VERSION

#: The key's own write wakes it; a timed-out read runs once more, so it reports the KV table's
#: index of that moment (the double's older rule, not Consul's). In the two Consul modes a
#: blocking query that times out answers from its last run, as blockingquery.Query does.
MISSING_KEY_EXACT = "exact"
#: Consul before blocking queries kept blocking on "not found" (hashicorp/consul#9449): the read
#: watches memdb's radix node for the key, so any write under the longest prefix it shares with a
#: stored key returns it, with the KV table's index.
MISSING_KEY_WAKE = "wake"
#: Consul since (agent/blockingquery: KVS.Get reports ErrNotFound): such writes re-run the read,
#: which keeps blocking with the raised table index; a timeout answers from that last run. A read
#: whose index is behind the table's returns at once (in every mode).
MISSING_KEY_BLOCK = "block"
MISSING_KEY_MODES = (MISSING_KEY_EXACT, MISSING_KEY_WAKE, MISSING_KEY_BLOCK)

#: How much later than the previous one an in-order delivery to an agent is at least.
IN_ORDER_GAP_SECONDS = 1e-6
#: memberlist's LAN defaults: probe every second, suspicion 4 x max(1, log10 N) probe intervals.
PROBE_INTERVAL_SECONDS = 1.0
SUSPICION_MULT = 4

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class RealismError(ValueError):
    """A realism setting out of range; the message names it and what is expected."""


def failure_detection_seconds(nodes: int) -> float:
    """How long memberlist takes at least to declare a crashed node failed in a LAN of ``nodes``:
    one probe interval, then the suspicion timeout (more when few members confirm it)."""
    return PROBE_INTERVAL_SECONDS * (1 + SUSPICION_MULT * max(1.0, math.log10(max(1, nodes))))


def _probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise RealismError(f"{name} must be a probability within 0..1, got {value!r}")
    return float(value)


def _seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RealismError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Gossip:
    """How user events reach one agent: after ``delay`` + uniform(0, ``jitter``) seconds; lost with
    probability ``loss``; delivered twice with ``duplicate``; free to overtake (or be overtaken by)
    the agent's other events with ``reorder``, else delivered in fire order."""

    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds, at most, on top of the delay
    loss: float = 0.0  # probabilities from here on
    duplicate: float = 0.0
    reorder: float = 0.0

    def __post_init__(self) -> None:
        kinds = {"delay": _seconds, "jitter": _seconds, "loss": _probability, "duplicate": _probability,
                 "reorder": _probability}
        for name, check in kinds.items():
            object.__setattr__(self, name, check(f"gossip {name}", getattr(self, name)))

    @property
    def instant(self) -> bool:
        """Every event at once, in order, exactly once (the double's older behaviour)."""
        return self == Gossip()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Gossip:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RealismError(f"unknown gossip setting(s) {unknown}: expected {sorted(known)}")
        return cls(**data)


@dataclass
class GossipLink:
    """One agent's end of gossip: its settings and its own random generator, so each agent's
    draws depend only on the seed, its name and the events fired, not on the other agents."""

    gossip: Gossip
    rng: random.Random
    #: When the last in-order delivery to this agent happens (loop time).
    last_arrival: float = 0.0

    @classmethod
    def seeded(cls, gossip: Gossip, seed: int, agent: str) -> GossipLink:
        return cls(gossip, random.Random(f"{seed}:{agent}"))

    def arrivals(self, now: float) -> list[float]:
        """The loop times at which one event reaches the agent: [] when lost, two when duplicated.
        Every draw is made for every event, so one setting's outcome does not shift another's."""
        gossip, rng = self.gossip, self.rng
        lost, late, free, twice, again = (rng.random() for _draw in range(5))
        if lost < gossip.loss:
            return []
        at = now + gossip.delay + late * gossip.jitter
        if free >= gossip.reorder:
            # Strictly after the previous one: the loop does not order timers due at the same time.
            at = max(at, self.last_arrival + IN_ORDER_GAP_SECONDS)
            self.last_arrival = at
        if twice < gossip.duplicate:
            return [at, at + gossip.delay + again * gossip.jitter]
        return [at]


def parse_version(version: str) -> tuple[int, int, int]:
    match = _VERSION.match(version)
    if match is None:
        raise RealismError(f"consul_version must look like 1.22.0, got {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@dataclass(frozen=True)
class Realism:
    """The double's realism settings (see the module docstring); the defaults are its older,
    kinder behaviour, ``Realism.consul(nodes)`` Consul's."""

    failure_detection: float = 0.0
    missing_key: str = MISSING_KEY_EXACT
    gossip: Gossip = field(default_factory=Gossip)
    gossip_seed: int = 0
    event_payload_limit: int | None = 100
    consul_version: str = CONSUL_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "failure_detection", _seconds("failure_detection", self.failure_detection))
        if self.missing_key not in MISSING_KEY_MODES:
            raise RealismError(f"missing_key must be one of {', '.join(MISSING_KEY_MODES)}, got {self.missing_key!r}")
        if not isinstance(self.gossip, Gossip):
            raise RealismError(f"gossip must be a Gossip, got {self.gossip!r}")
        if isinstance(self.gossip_seed, bool) or not isinstance(self.gossip_seed, int):
            raise RealismError(f"gossip_seed must be an integer, got {self.gossip_seed!r}")
        limit = self.event_payload_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise RealismError(f"event_payload_limit must be a number of bytes >= 1 or None, got {limit!r}")
        parse_version(self.consul_version)

    @classmethod
    def consul(cls, nodes: int = 3, **overrides: Any) -> Realism:
        """Consul's behaviour for a LAN of ``nodes``: failure detection after probe and suspicion,
        gossip that is late, reordered and sometimes lost (Serf's push/pull re-sends recent events,
        so a loss stands for a node that missed them for good), missing keys as Consul 1.22 blocks
        on them, and no payload limit but Serf's."""
        realistic = cls(
            failure_detection=failure_detection_seconds(nodes),
            missing_key=MISSING_KEY_BLOCK,
            gossip=Gossip(delay=0.05, jitter=0.5, loss=0.01, reorder=0.2),
            event_payload_limit=None,
        )
        return replace(realistic, **overrides)

    @property
    def txn_max_ops(self) -> int:
        """Consul's maxTxnOps: 64 before 1.14, 128 from 1.14."""
        return 128 if parse_version(self.consul_version) >= (1, 14, 0) else 64

    @property
    def serves_get_or_empty(self) -> bool:
        """The read-only txn verb "get-or-empty" came with 1.14."""
        return parse_version(self.consul_version) >= (1, 14, 0)

    def to_args(self) -> list[str]:
        """The ``python -m devcluster serve`` options (``add_arguments``) that give these settings
        (none for a setting at its default)."""
        args: list[str] = []
        default = Realism()
        for name in ("failure_detection", "missing_key", "gossip_seed", "consul_version"):
            if getattr(self, name) != getattr(default, name):
                args += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        if self.event_payload_limit != default.event_payload_limit:
            args += ["--event-payload-limit", str(self.event_payload_limit or 0)]
        for name, value in asdict(self.gossip).items():
            if value != getattr(default.gossip, name):
                args += [f"--gossip-{name}", repr(value)]
        return args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The realism options of ``python -m devcluster serve``; ``from_args`` reads them back."""
    group = parser.add_argument_group("realism", "Consul's unkind behaviour (default: the double's older, kinder one)")
    group.add_argument("--realistic", action="store_true",
                       help="Consul's values for every setting below; the options given override them")
    group.add_argument("--failure-detection", type=float, metavar="SECONDS",
                       help="a stopped (crashed) agent's node stays serfHealth passing this long")
    group.add_argument("--missing-key", choices=MISSING_KEY_MODES,
                       help="blocking reads of a missing key: exact (older double), wake (Consul before "
                            "not-found blocking), block (Consul 1.22)")
    for name, what in (("delay", "seconds before an agent has an event"), ("jitter", "plus up to this many seconds"),
                       ("loss", "probability an agent never gets an event"),
                       ("duplicate", "probability an agent gets an event twice"),
                       ("reorder", "probability an event is delivered out of fire order")):
        group.add_argument(f"--gossip-{name}", type=float, metavar="N", help=what)
    group.add_argument("--gossip-seed", type=int, metavar="N", help="seed of the agents' gossip draws (default 0)")
    group.add_argument("--event-payload-limit", type=int, metavar="BYTES",
                       help="answer 413 past this event payload size (0: none but Serf's 512-byte event limit)")
    group.add_argument("--consul-version", metavar="X.Y.Z",
                       help="the version agents report; before 1.14: 64 txn operations, no get-or-empty")


def from_args(args: argparse.Namespace, nodes: int) -> Realism:
    """The settings ``add_arguments`` parsed: Consul's with --realistic, else the defaults, then
    each option given."""
    base = Realism.consul(nodes) if args.realistic else Realism()
    gossip = {name: value for name in ("delay", "jitter", "loss", "duplicate", "reorder")
              if (value := getattr(args, f"gossip_{name}")) is not None}
    changes: dict[str, Any] = {"gossip": replace(base.gossip, **gossip)}
    for name in ("failure_detection", "missing_key", "gossip_seed", "consul_version"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.event_payload_limit is not None:
        changes["event_payload_limit"] = args.event_payload_limit or None
    return replace(base, **changes)
