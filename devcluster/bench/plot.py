"""The benchmark's picture: release time against N (fireap, ideal, push baselines) and requests per node."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402

from .core import INPROC  # noqa: E402

FORMATS = ("png", "svg")


def _series(records: Sequence[Mapping], key) -> tuple[list[int], list[float]]:
    points = sorted((r["nodes"], key(r)) for r in records if key(r) is not None)
    return [n for n, _value in points], [v for _nodes, v in points]


def write_plot(records: Sequence[Mapping], stem: Path) -> list[Path]:
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
    figure.tight_layout()
    paths = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        figure.savefig(path, dpi=120)
        paths.append(path)
    plt.close(figure)
    return paths
