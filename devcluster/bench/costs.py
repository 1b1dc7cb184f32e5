"""What the real node path costs Consul, from the requests the agent relay recorded (no I/O).

Per node: requests and bytes at its agent, and what of it reaches the servers by kind (Raft
writes, session renewals, default-consistency reads, stale reads, blocking reads). Per stage
transition: the requests in the window from the first task of stage s ending to the last task
of stage s + 1 starting (s = 0: from the fire; after the last stage: to the last done record
plus :data:`TAIL_SECONDS`), with the highest count of writes in one second.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from ansible_collections.fireap.consul.plugins.module_utils._kv import PlanEntry

from ..netns.relay import AGENT, BLOCKING_READ, CATEGORIES, READ, RENEWAL, STALE_READ, WRITE, RequestRecord
from .core import TaskTiming

SERVER_CATEGORIES = (WRITE, RENEWAL, READ, STALE_READ, BLOCKING_READ)
SESSION_DESTROY = "/v1/session/destroy/"
#: Seconds after the last done record in which the last transition's writes (session destroys) still count.
TAIL_SECONDS = 2.0


def _spread(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "max": max(values)}


def node_costs(records: Sequence[RequestRecord], answered: Mapping[str, int], nodes: Sequence[str]) -> dict:
    """Per node of ``nodes``: requests and bytes at its agent, and requests per kind (means, maxima)."""
    if not nodes:
        raise ValueError("no nodes to count")
    requests = {name: 0 for name in nodes}
    sizes = {name: answered.get(name, 0) for name in nodes}
    kinds = {name: dict.fromkeys(CATEGORIES, 0) for name in nodes}
    for record in records:
        if record.node in requests:
            requests[record.node] += 1
            sizes[record.node] += record.size
            kinds[record.node][record.category] += 1
    return {
        "agent_requests_per_node": _spread(list(requests.values())),
        "agent_bytes_per_node": _spread(list(sizes.values())),
        "agent_only_requests_per_node": statistics.fmean(k[AGENT] for k in kinds.values()),
        "server_requests_per_node": {
            kind: statistics.fmean(k[kind] for k in kinds.values()) for kind in SERVER_CATEGORIES
        },
    }


def _window_counts(records: Sequence[RequestRecord], begin: float, end: float) -> dict:
    inside = [record for record in records if begin <= record.at <= end]
    counts = {kind: sum(1 for record in inside if record.category == kind) for kind in SERVER_CATEGORIES}
    buckets: dict[int, int] = {}
    for record in inside:
        if record.category == WRITE:
            second = math.floor(record.at - begin)
            buckets[second] = buckets.get(second, 0) + 1
    return {
        "seconds": end - begin,
        **counts,
        "session_destroys": sum(1 for record in inside if record.path.startswith(SESSION_DESTROY)),
        "peak_writes_per_second": max(buckets.values(), default=0),
    }


def transition_costs(
    records: Sequence[RequestRecord],
    tasks: Mapping[str, TaskTiming],
    plan: Mapping[str, PlanEntry],
    fired: float,
    completed: float,
) -> dict[str, dict]:
    """Server-bound requests per stage transition, keyed "s->s+1" (0 is the fire)."""
    by_stage: dict[int, list[TaskTiming]] = {}
    for name, timing in tasks.items():
        entry = plan.get(name)
        if entry is not None:
            by_stage.setdefault(entry.stage, []).append(timing)
    if not by_stage:
        return {}
    last = max(by_stage)
    transitions = {}
    for stage in range(0, last + 1):
        if stage == 0:
            begin = fired
        elif stage in by_stage:
            begin = min(timing.finished for timing in by_stage[stage])
        else:
            continue
        following = by_stage.get(stage + 1)
        end = max(timing.started for timing in following) if following else completed + TAIL_SECONDS
        transitions[f"{stage}->{stage + 1}"] = _window_counts(records, begin, max(begin, end))
    return transitions


def worst_transition(transitions: Mapping[str, dict]) -> dict | None:
    """The transition with the most writes, named."""
    if not transitions:
        return None
    name = max(transitions, key=lambda key: (transitions[key][WRITE], transitions[key]["peak_writes_per_second"]))
    return {"transition": name, **transitions[name]}
