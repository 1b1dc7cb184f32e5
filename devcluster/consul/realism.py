"""Where the double is as unkind as Consul is: each such behaviour a setting.

``Realism()`` is Consul's behaviour (the values and why are at each default below);
``Realism.kind()`` is the double's older, deterministic one (instant failure detection, instant
and lossless gossip, missing keys that wake only on their own write), for a test that needs it
and says so. ``python -m devcluster serve`` takes them as options (``--kind`` for the older
behaviour), the Double classes as ``realism=``.

    failure_detection  seconds a crashed (stopped) agent's node stays serfHealth passing, its
                       sessions valid (None: memberlist's probe plus suspicion timeout for the
                       cluster's size, ``failure_detection_seconds``)
    missing_key        how a blocking read of a missing KV key behaves (MISSING_KEY_* below)
    gossip             user event delivery to each agent: delay, jitter, loss, duplication,
                       reordering, drawn from a random generator seeded per agent
    consul_version     the version agents report; below 1.14 /v1/txn takes 64 operations
                       (128 from 1.14) and refuses the "get-or-empty" verb

Event payloads have no limit of their own in either behaviour: only Serf's 512 bytes for the
whole encoded user event (agents.py), as in Consul.
"""

from __future__ import annotations

import argparse
import math
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
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
#: memberlist's LAN defaults, which Consul keeps (gossip_lan: probe_interval 1 s, suspicion_mult 4;
#: https://developer.hashicorp.com/consul/docs/agent/config/config-files#gossip_lan): probe every
#: second, then a suspicion timeout of 4 x max(1, log10 N) probe intervals (memberlist's
#: suspicionTimeout; Lifeguard starts it at up to 6 times that and shortens it as other members
#: confirm the suspicion, so this is the least it takes).
PROBE_INTERVAL_SECONDS = 1.0
SUSPICION_MULT = 4

#: Consul's gossip of a user event to one agent. memberlist gossips every 200 ms to 3 random
#: members (gossip_lan gossip_interval, gossip_nodes) and each member retransmits an event
#: retransmit_mult (4) x log10(N + 1) times, so an event crosses a LAN in a few gossip rounds:
#: 50 ms at least (the first round is due at once for some agents), up to half a second more
#: (about log3 N rounds of 200 ms for the tens of nodes the tests and the fault suite run).
#: Serf's push/pull (every 30 s, more in large clusters) re-sends the events of its recent
#: buffer, so a member rarely misses one for good: 1% stands for the agent that did (restarted
#: or cut off past that buffer). The broadcast queue sends the least-retransmitted messages
#: first and every member forwards to other members, so events fired close together arrive
#: in another order; 20% of them overtake or fall behind their neighbours. Serf's own
#: de-duplication (its event LTime buffer) keeps an agent's ring free of duplicates. The four
#: values are estimates drawn from those settings, not measurements of a cluster.
CONSUL_GOSSIP_DELAY_SECONDS = 0.05
CONSUL_GOSSIP_JITTER_SECONDS = 0.5
CONSUL_GOSSIP_LOSS = 0.01
CONSUL_GOSSIP_REORDER = 0.2

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


#: How Consul's gossip carries a user event to one agent (the constants above say why).
CONSUL_GOSSIP = Gossip(delay=CONSUL_GOSSIP_DELAY_SECONDS, jitter=CONSUL_GOSSIP_JITTER_SECONDS, loss=CONSUL_GOSSIP_LOSS,
                       reorder=CONSUL_GOSSIP_REORDER)


def parse_version(version: str) -> tuple[int, int, int]:
    match = _VERSION.match(version)
    if match is None:
        raise RealismError(f"consul_version must look like 1.22.0, got {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@dataclass(frozen=True)
class Realism:
    """The double's realism settings (see the module docstring): Consul's by default,
    ``Realism.kind()`` the double's older, deterministic behaviour."""

    #: None: memberlist's for the cluster's size (``for_nodes``).
    failure_detection: float | None = None
    #: Consul 1.22's: a missing key reports the KV table's index and keeps blocking through writes.
    missing_key: str = MISSING_KEY_BLOCK
    gossip: Gossip = CONSUL_GOSSIP
    gossip_seed: int = 0
    #: The Consul release the double stands for (state.CONSUL_VERSION, 1.22: 128 txn operations).
    consul_version: str = CONSUL_VERSION

    def __post_init__(self) -> None:
        if self.failure_detection is not None:
            object.__setattr__(self, "failure_detection", _seconds("failure_detection", self.failure_detection))
        if self.missing_key not in MISSING_KEY_MODES:
            raise RealismError(f"missing_key must be one of {', '.join(MISSING_KEY_MODES)}, got {self.missing_key!r}")
        if not isinstance(self.gossip, Gossip):
            raise RealismError(f"gossip must be a Gossip, got {self.gossip!r}")
        if isinstance(self.gossip_seed, bool) or not isinstance(self.gossip_seed, int):
            raise RealismError(f"gossip_seed must be an integer, got {self.gossip_seed!r}")
        parse_version(self.consul_version)

    @classmethod
    def kind(cls, **overrides: Any) -> Realism:
        """The double's older behaviour, kinder than Consul: a crash detected at once, every event
        at once, in order and exactly once, a missing key woken by its own write only (and a
        timed-out read run once more). For a test that needs that determinism and says why."""
        return replace(cls(failure_detection=0.0, missing_key=MISSING_KEY_EXACT, gossip=Gossip()), **overrides)

    def for_nodes(self, nodes: int) -> Realism:
        """These settings in a cluster of ``nodes``: failure detection in seconds."""
        if self.failure_detection is not None:
            return self
        return replace(self, failure_detection=failure_detection_seconds(nodes))

    @property
    def txn_max_ops(self) -> int:
        """Consul's maxTxnOps: 64 before 1.14, 128 from 1.14."""
        return 128 if parse_version(self.consul_version) >= (1, 14, 0) else 64

    @property
    def serves_get_or_empty(self) -> bool:
        """The read-only txn verb "get-or-empty" came with 1.14."""
        return parse_version(self.consul_version) >= (1, 14, 0)

    def describe(self, nodes: int) -> dict[str, Any]:
        """The settings in a cluster of ``nodes`` as a report's figures (the fault suite's ``consul``)."""
        settled = self.for_nodes(nodes)
        gossip = settled.gossip
        return {
            "consul_version": settled.consul_version,
            "txn_max_ops": settled.txn_max_ops,
            "failure_detection_s": round(settled.failure_detection or 0.0, 3),
            "missing_key": settled.missing_key,
            "event_delay_ms": round(gossip.delay * 1000, 3),
            "event_jitter_ms": round(gossip.jitter * 1000, 3),
            "event_loss": gossip.loss,
            "event_duplicate": gossip.duplicate,
            "event_reorder": gossip.reorder,
            "gossip_seed": settled.gossip_seed,
        }

    def to_args(self) -> list[str]:
        """The ``python -m devcluster serve`` options (``add_arguments``) that give these settings
        (none for a setting at its default)."""
        args: list[str] = []
        default = Realism()
        for name in ("failure_detection", "missing_key", "gossip_seed", "consul_version"):
            if getattr(self, name) != getattr(default, name):
                args += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        for name, value in asdict(self.gossip).items():
            if value != getattr(default.gossip, name):
                args += [f"--gossip-{name}", repr(value)]
        return args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The realism options of ``python -m devcluster serve``; ``from_args`` reads them back."""
    group = parser.add_argument_group("realism", "Consul's unkind behaviour (default: Consul's values)")
    group.add_argument("--kind", action="store_true",
                       help="the double's older, deterministic values for every setting below (instant failure "
                            "detection and gossip, exact missing keys); the options given override them")
    group.add_argument("--failure-detection", type=float, metavar="SECONDS",
                       help="a stopped (crashed) agent's node stays serfHealth passing this long "
                            "(default: 1 + 4 x max(1, log10 N), memberlist's)")
    group.add_argument("--missing-key", choices=MISSING_KEY_MODES,
                       help="blocking reads of a missing key: block (Consul 1.22, default), wake (Consul before "
                            "not-found blocking), exact (the older double)")
    for name, what in (("delay", "seconds before an agent has an event"), ("jitter", "plus up to this many seconds"),
                       ("loss", "probability an agent never gets an event"),
                       ("duplicate", "probability an agent gets an event twice"),
                       ("reorder", "probability an event is delivered out of fire order")):
        group.add_argument(f"--gossip-{name}", type=float, metavar="N",
                           help=f"{what} (default {getattr(CONSUL_GOSSIP, name):g})")
    group.add_argument("--gossip-seed", type=int, metavar="N", help="seed of the agents' gossip draws (default 0)")
    group.add_argument("--consul-version", metavar="X.Y.Z",
                       help=f"the version agents report (default {CONSUL_VERSION}); before 1.14: 64 txn operations, "
                            "no get-or-empty")


def from_args(args: argparse.Namespace, nodes: int) -> Realism:
    """The settings ``add_arguments`` parsed in a cluster of ``nodes``: Consul's, or the older
    double's with --kind, then each option given."""
    base = Realism.kind() if args.kind else Realism()
    gossip = {name: value for name in ("delay", "jitter", "loss", "duplicate", "reorder")
              if (value := getattr(args, f"gossip_{name}")) is not None}
    changes: dict[str, Any] = {"gossip": replace(base.gossip, **gossip)}
    for name in ("failure_detection", "missing_key", "gossip_seed", "consul_version"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return replace(base, **changes).for_nodes(nodes)
