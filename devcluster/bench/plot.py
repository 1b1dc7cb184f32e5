"""The benchmark's pictures: release time against N (fireap, ideal, push baselines) and requests
per node; for the netns records, release time against N of the swarm, the stage model at each k
and push at its best beside the lower bound, and what each costs Consul per node."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402

from .core import INPROC, NETNS  # noqa: E402

FORMATS = ("png", "svg")
#: The netns picture's file name ends so: ``<stem>-netns.png`` beside ``<stem>.png``.
NETNS_SUFFIX = "-netns"


def _series(records: Sequence[Mapping], key) -> tuple[list[int], list[float]]:
    points = sorted((r["nodes"], key(r)) for r in records if key(r) is not None)
    return [n for n, _value in points], [v for _nodes, v in points]


def _save(figure, stem: Path) -> list[Path]:
    figure.tight_layout()
    paths = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        figure.savefig(path, dpi=120)
        paths.append(path)
    plt.close(figure)
    return paths


def write_plot(records: Sequence[Mapping], stem: Path) -> list[Path]:
    """The pictures of ``records`` next to ``stem``: the inproc one and the netns one, each
    when there are such records; the paths written."""
    return _write_inproc_plot(records, stem) + write_netns_plot(records, stem.with_name(stem.name + NETNS_SUFFIX))


def _netns_lines(stages: Sequence[str]) -> list[tuple[str, object, str]]:
    """(label, figure of a record, style) of each line of the netns time plot."""
    lines: list[tuple[str, object, str]] = [("swarm", lambda r: r["swarm_seconds"], "o-")]
    lines += [(f"stage model k={k}", lambda r, k=k: r["stage_seconds"].get(k), "s-") for k in stages]
    lines += [
        ("push at its best", lambda r: r["push_best_seconds"], "^-"),
        ("lower bound", lambda r: r["lower_bound_seconds"], "x--"),
    ]
    return lines


def write_netns_plot(records: Sequence[Mapping], stem: Path) -> list[Path]:
    """``<stem>.png`` and ``<stem>.svg`` from the netns records: release time against N (the
    swarm, each k of the stage model, push at its best, the lower bound) and Consul requests per
    node (the swarm's targets, its leader, the stage model at its best k), one set of lines per
    (build, link) setting."""
    netns = [r for r in records if r["mode"] == NETNS]
    if not netns:
        return []
    groups: dict[tuple[int, float, float], list[Mapping]] = {}
    for record in netns:
        groups.setdefault((record["artifact_bytes"], record["link_mbit"], record["link_latency_ms"]), []).append(record)
    stages = sorted({k for record in netns for k in record["stage_seconds"]}, key=int)

    figure, (times, costs) = plt.subplots(1, 2, figsize=(12, 4.8))
    for (size, mbit, latency), group in sorted(groups.items()):
        setting = f"{size / 2**20:.0f} MiB, {mbit:g} Mbit/s" + (f", +{latency:g} ms" if latency else "")
        suffix = f" ({setting})" if len(groups) > 1 else ""
        for name, key, style in _netns_lines(stages):
            xs, ys = _series(group, key)
            if xs:
                times.plot(xs, ys, style, label=name + suffix)
        for name, key, style in (
            ("swarm", lambda r: r["swarm_costs"]["agent_requests_per_node"]["mean"], "o-"),
            ("swarm's leader", lambda r: r["swarm_leader_costs"]["agent_requests_per_node"]["mean"], "D:"),
            ("stage model, best k", lambda r: r["agent_requests_per_node"]["mean"], "s-"),
        ):
            xs, ys = _series(group, key)
            costs.plot(xs, ys, style, label=name + suffix)
    title = "" if len(groups) > 1 else f" ({setting})"
    times.set_yscale("log")
    times.set_xlabel("nodes N (leader included)")
    times.set_ylabel("seconds from the start to the last node done")
    times.set_title("Release time over shaped links" + title)
    times.grid(True, which="both", alpha=0.3)
    times.legend(fontsize="small")
    costs.set_ylim(bottom=0)
    costs.set_xlabel("nodes N (leader included)")
    costs.set_ylabel("HTTP requests to its agent per node (mean)")
    costs.set_title("Consul cost per node")
    costs.grid(True, alpha=0.3)
    costs.legend(fontsize="small")
    return _save(figure, stem)


def _write_inproc_plot(records: Sequence[Mapping], stem: Path) -> list[Path]:
    """``<stem>.png`` and ``<stem>.svg`` from the inproc records, one line per (fan-out, task time)."""
    inproc = [r for r in records if r["mode"] == INPROC]
    if not inproc:
        return []
    groups: dict[tuple[int, float], list[Mapping]] = {}
    for record in inproc:
        groups.setdefault((record["fanout"], record["task_seconds"]), []).append(record)

    figure, (times, costs) = plt.subplots(1, 2, figsize=(12, 4.8))
    for (fanout, seconds), group in sorted(groups.items()):
        label = f"k={fanout}, t={seconds:g}s"
        lines = (
            ("fireap", lambda r: r["fireap_seconds"], "o-"),
            ("ideal", lambda r: r["ideal_seconds"], "x--"),
            ("ansible forks=k", lambda r: r["ansible_seconds"], "s-"),
            ("parallel -j k", lambda r: r["parallel_seconds"], "^-"),
        )
        for name, key, style in lines:
            xs, ys = _series(group, key)
            if xs:
                times.plot(xs, ys, style, label=f"{name} ({label})")
        for name, key, style in (
            ("mean", lambda r: r["requests_per_node"]["mean"], "o-"),
            ("max", lambda r: r["requests_per_node"]["max"], "v:"),
        ):
            xs, ys = _series(group, key)
            costs.plot(xs, ys, style, label=f"{name} ({label})")

    times.set_xscale("log")
    times.set_yscale("log")
    times.set_xlabel("nodes N (leader included)")
    times.set_ylabel("seconds from fire to the last node done")
    times.set_title("Release time")
    times.grid(True, which="both", alpha=0.3)
    times.legend(fontsize="small")
    costs.set_xscale("log")
    costs.set_ylim(0, 1.15 * max(r["requests_per_node"]["max"] for r in inproc))
    costs.set_xlabel("nodes N (leader included)")
    costs.set_ylabel("HTTP requests to its agent per node")
    costs.set_title("Cost per node (leader apart)")
    costs.grid(True, which="both", alpha=0.3)
    costs.legend(fontsize="small")
    return _save(figure, stem)
