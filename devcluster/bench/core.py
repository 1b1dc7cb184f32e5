"""What one benchmark run measured, and the figures derived from it (no I/O).

A run yields a :class:`RunResult`; :func:`make_record` turns it into the JSON record the
benchmark reports and :func:`combine` takes the median of several repeats of one
configuration.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ansible_collections.fireap.consul.plugins.module_utils._kv import PlanEntry
from ansible_collections.fireap.consul.plugins.module_utils._propagation import stage_count

INPROC = "inproc"
PROCESS = "process"
NETNS = "netns"
MODES = (INPROC, PROCESS, NETNS)

ANSIBLE = "ansible"
PARALLEL = "parallel"
BASELINES = (ANSIBLE, PARALLEL)

#: What makes two records the same configuration (repeats of it can be combined).
CONFIG_FIELDS = ("nodes", "fanout", "mode")


@dataclass(frozen=True)
class TaskTiming:
    """When one node's task ran (epoch seconds), which node it pulled from, and when Consul
    acknowledged its done record (None when not known)."""

    source: str
    started: float
    finished: float
    done_written: float | None = None


@dataclass
class RunResult:
    """The raw observations of one release across the cluster.

    ``fired`` is when the fire began; ``leader_ready`` when the event was out (the leader is
    done from then on); ``completed`` when the last node was done. ``stats`` is the double's
    ``/_devcluster/stats`` after the run (reset before it). ``failures`` maps every node that
    did not end done at the version to the reason.
    """

    mode: str
    nodes: int
    fanout: int
    task_seconds: float
    leader: str
    fired: float
    leader_ready: float
    completed: float
    depths: dict[str, int]
    tasks: dict[str, TaskTiming]
    plan: dict[str, PlanEntry]
    stats: dict
    failures: dict[str, str]
    details: dict = field(default_factory=dict)

    @property
    def fireap_seconds(self) -> float:
        return self.completed - self.fired


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of the machine's CPU time that was busy between two (busy, total) readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def busy_core_seconds(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Core-seconds the machine was busy between two (busy, total) /proc/stat readings in
    clock ticks; over the machine's cores, the least wall time that work could take here."""
    return (after[0] - before[0]) / os.sysconf("SC_CLK_TCK")


def ideal_seconds(nodes: int, fanout: int, task_seconds: float) -> float:
    """ceil(log_(k+1) N) * t: N nodes (the leader included) reached in whole stages of t seconds."""
    return stage_count(nodes, fanout) * task_seconds


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q!r}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def coordination_latencies(
    tasks: Mapping[str, TaskTiming],
    plan: Mapping[str, PlanEntry],
    leader: str,
    leader_ready: float,
    from_task_end: bool = False,
) -> dict[str, float]:
    """Seconds from the moment each puller could start to the start of its task.

    A puller can start once its source's done record is written (the leader's: once the
    event is out) and, when it took the slot its plan shares with an earlier puller of the
    same source (``after``), once that puller's is written too. ``from_task_end`` counts
    from the end of those nodes' tasks instead (the hand-off: the done write included).
    Pullers whose source or predecessor has no timing are left out.
    """
    ready_at = {
        name: timing.finished if from_task_end or timing.done_written is None else timing.done_written
        for name, timing in tasks.items()
    }
    ready_at[leader] = leader_ready
    latencies = {}
    for name, timing in tasks.items():
        if timing.source not in ready_at:
            continue
        ready = ready_at[timing.source]
        entry = plan.get(name)
        if entry is not None and entry.source == timing.source and entry.after is not None:
            before = tasks.get(entry.after)
            if before is None or before.source != timing.source:
                continue
            ready = max(ready, ready_at[entry.after])
        latencies[name] = timing.started - ready
    return latencies


def _latency_ms(latencies: Sequence[float]) -> dict:
    return {
        "p50": 1000 * percentile(latencies, 50) if latencies else None,
        "p99": 1000 * percentile(latencies, 99) if latencies else None,
        "max": 1000 * max(latencies) if latencies else None,
        "samples": len(latencies),
    }


def stage_delays(
    tasks: Mapping[str, TaskTiming], plan: Mapping[str, PlanEntry], fired: float, task_seconds: float
) -> dict[int, float]:
    """Median seconds by which the tasks of each planned stage started after the ideal schedule.

    In the ideal schedule stage s starts (s - 1) * t after the fire; the delay of stage s
    is what the release lost up to then (fire, wake-up, coordination, contention).
    """
    delays: dict[int, list[float]] = {}
    for name, timing in tasks.items():
        entry = plan.get(name)
        if entry is not None:
            delays.setdefault(entry.stage, []).append(timing.started - fired - (entry.stage - 1) * task_seconds)
    return {stage: statistics.median(values) for stage, values in sorted(delays.items())}


def node_costs(stats: Mapping, leader: str) -> dict:
    """Requests and bytes (in + out) per node from ``/_devcluster/stats``, the leader apart.

    The per-node figures count every agent but the leader's, which also carries the fire
    (plan transactions, catalog reads) and is reported on its own.
    """
    agents = stats["agents"]
    others = [counters for name, counters in agents.items() if name != leader]
    if not others:
        raise ValueError("the stats name no agent besides the leader's")
    requests = [counters["requests"] for counters in others]
    sizes = [counters["bytes_in"] + counters["bytes_out"] for counters in others]
    own = agents[leader]
    return {
        "requests_per_node": {"mean": statistics.fmean(requests), "max": max(requests)},
        "bytes_per_node": {"mean": statistics.fmean(sizes), "max": max(sizes)},
        "leader": {"requests": own["requests"], "bytes": own["bytes_in"] + own["bytes_out"]},
    }


def make_record(result: RunResult, baselines: Mapping[str, float] | None = None) -> dict:
    """The JSON record of one run; baseline times are None unless measured."""
    baselines = dict(baselines or {})
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(sorted(unknown))}; known: {', '.join(BASELINES)}")
    ideal = ideal_seconds(result.nodes, result.fanout, result.task_seconds)
    args = (result.tasks, result.plan, result.leader, result.leader_ready)
    latencies = list(coordination_latencies(*args).values())
    handoffs = list(coordination_latencies(*args, from_task_end=True).values())
    record = {
        "nodes": result.nodes,
        "fanout": result.fanout,
        "task_seconds": result.task_seconds,
        "mode": result.mode,
        "ideal_seconds": ideal,
        "fireap_seconds": result.fireap_seconds,
        "ratio": result.fireap_seconds / ideal,
        "ansible_seconds": baselines.get(ANSIBLE),
        "parallel_seconds": baselines.get(PARALLEL),
        "max_depth": max(result.depths.values(), default=0),
        "stages": stage_count(result.nodes, result.fanout),
        **node_costs(result.stats, result.leader),
        "coordination_latency_ms": _latency_ms(latencies),
        "handoff_latency_ms": _latency_ms(handoffs),
        "stage_start_delay_ms": {
            str(stage): 1000 * delay
            for stage, delay in stage_delays(result.tasks, result.plan, result.fired, result.task_seconds).items()
        },
        "failures": len(result.failures),
        "failed_nodes": dict(sorted(result.failures.items())),
    }
    record.update(result.details)
    return record


def _median(values):
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def combine(records: Sequence[Mapping]) -> dict:
    """One record for several repeats of one configuration.

    Every figure that varies run to run is the median over the repeats (nested figures key
    by key), except ``max_depth`` (the deepest of all) and ``failures`` (added up);
    ``fireap_runs`` keeps each repeat's fireap time and ``repeat`` their count.
    """
    if not records:
        raise ValueError("no records to combine")
    first = records[0]
    for record in records[1:]:
        if any(record[key] != first[key] for key in CONFIG_FIELDS):
            raise ValueError("records of different configurations cannot be combined")
    combined = dict(first)
    for name, value in first.items():
        if name in CONFIG_FIELDS or name in ("max_depth", "failures", "failed_nodes"):
            continue
        if all(r[name] == value for r in records):
            continue
        if isinstance(value, dict):
            combined[name] = {key: _median([r[name][key] for r in records]) for key in value}
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            combined[name] = _median([r[name] for r in records])
    combined["max_depth"] = max(r["max_depth"] for r in records)
    combined["failures"] = sum(r["failures"] for r in records)
    failed: dict[str, str] = {}
    for record in records:
        failed.update(record["failed_nodes"])
    combined["failed_nodes"] = dict(sorted(failed.items()))
    combined["repeat"] = len(records)
    combined["fireap_runs"] = [r["fireap_seconds"] for r in records]
    return combined
