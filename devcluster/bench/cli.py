"""`python -m devcluster bench`: how long a release takes against the ideal and push baselines.

    python -m devcluster bench --nodes N --fanout K [--task-seconds T] [--mode inproc|process]
        [--baseline ansible,parallel] [--repeat R] [--json FILE] [--double subprocess|embedded] [--processes P]
    python -m devcluster bench --standard [--json FILE]

N counts every node, the leader included; the ideal is ceil(log_(k+1) N) * t. ``inproc``
runs every node's real pull in a thread (threads spread over worker processes) with a task
sleeping t (inproc.py); ``process`` installs the real node side with Ansible and pulls a real
tree with rsync, beside a GNU parallel push of the same tree (process.py). With
``--repeat`` the figures are medians. ``--json`` writes the records and, next to them, a
plot (PNG and SVG). ``--standard`` runs the set `make bench` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ansible_collections.fireap.consul.plugins.module_utils._validation import FANOUT_MAX, FANOUT_MIN

from .. import REPO_ROOT
from ..consul import SUBPROCESS, Double
from .baselines import run_ansible, run_parallel, sleep_command
from .core import (
    ANSIBLE,
    BASELINES,
    INPROC,
    MODES,
    PARALLEL,
    PROCESS,
    combine,
    ideal_seconds,
    make_record,
)
from .double import DOUBLE_KINDS, BenchError, leader_client, running_double
from .inproc import run_inproc
from .plot import write_plot
from .process import ProcessBench

OUTPUT_DIR = REPO_ROOT / "build" / "bench"
STANDARD_JSON = OUTPUT_DIR / "bench.json"
DEFAULT_TASK_SECONDS = {INPROC: 0.5, PROCESS: 2.0}
#: Seconds a run may take beyond its ideal before its unfinished nodes count as failures.
TIMEOUT_BASE = 120.0
TIMEOUT_FACTOR = 20.0
#: Process mode serves the double in its own process: its agents run the nodes' handlers.
PROCESS_DOUBLE = SUBPROCESS


@dataclass(frozen=True)
class Config:
    """One configuration to measure, ``repeat`` times."""

    nodes: int
    fanout: int
    task_seconds: float
    mode: str = INPROC
    baselines: tuple[str, ...] = ()
    repeat: int = 1

    def describe(self) -> str:
        return f"{self.mode} N={self.nodes} k={self.fanout} t={self.task_seconds:g}s"


#: The set `make bench` runs: inproc across N (push baselines where they take minutes, not
#: tens of minutes), then the process mode with real rsync transfers.
STANDARD = (
    Config(10, 5, 0.5, INPROC, (ANSIBLE, PARALLEL), 3),
    Config(30, 5, 0.5, INPROC, (ANSIBLE, PARALLEL), 3),
    Config(100, 5, 0.5, INPROC, (ANSIBLE, PARALLEL), 3),
    Config(200, 5, 0.5, INPROC, (PARALLEL,), 3),
    Config(1000, 5, 0.5, INPROC, (), 3),
    Config(30, 5, 2.0, PROCESS, (PARALLEL,), 1),
)


def _versions(count: int) -> list[str]:
    stamp = time.strftime("%Y%m%d.%H%M%S")
    return [f"{stamp}.{i}" for i in range(count)]


def _timeout(config: Config) -> float:
    return TIMEOUT_BASE + TIMEOUT_FACTOR * ideal_seconds(config.nodes, config.fanout, config.task_seconds)


def run_config(config: Config, workdir: Path, double: str, processes: int | None = None) -> dict:
    """Measure one configuration ``config.repeat`` times on one cluster; the combined record."""
    records = []
    with running_double(config.nodes, workdir, PROCESS_DOUBLE if config.mode == PROCESS else double) as cluster:
        leader = leader_client(cluster)
        try:
            if config.mode == PROCESS:
                bench = ProcessBench(cluster, leader, config.fanout, config.task_seconds)
                bench.install()
            for i, version in enumerate(_versions(config.repeat), 1):
                if config.mode == PROCESS:
                    result, baselines = bench.run(version, _timeout(config), config.baselines)
                else:
                    result = run_inproc(
                        cluster, config.fanout, config.task_seconds, version, _timeout(config), processes, leader
                    )
                    baselines = _sleep_baselines(cluster, config)
                record = make_record(result, baselines)
                print(f"  run {i}/{config.repeat}: {summary(record)}", flush=True)
                records.append(record)
        finally:
            leader.http.close()
    return combine(records)


def _sleep_baselines(cluster: Double, config: Config) -> dict[str, float]:
    measured = {}
    command = sleep_command(config.task_seconds)
    hosts = [node.name for node in cluster.nodes if node.name != cluster.leader.name]
    if ANSIBLE in config.baselines:
        measured[ANSIBLE] = run_ansible(cluster.inventory, cluster.workdir, config.fanout, command)
    if PARALLEL in config.baselines:
        measured[PARALLEL] = run_parallel(hosts, config.fanout, command)
    return measured


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def summary(record: dict) -> str:
    """One line with the figures of a record."""
    parts = [
        f"fireap {record['fireap_seconds']:.2f}s",
        f"ideal {record['ideal_seconds']:.2f}s",
        f"ratio {record['ratio']:.2f}",
        f"max depth {record['max_depth']} ({record['stages']} stages)",
        f"requests/node mean {record['requests_per_node']['mean']:.1f} max {record['requests_per_node']['max']:.0f}",
        f"bytes/node mean {record['bytes_per_node']['mean'] / 1024:.1f} KiB",
        f"coordination p50 {_ms(record['coordination_latency_ms']['p50'])} "
        f"p99 {_ms(record['coordination_latency_ms']['p99'])}",
        f"hand-off p50 {_ms(record['handoff_latency_ms']['p50'])} p99 {_ms(record['handoff_latency_ms']['p99'])}",
    ]
    for name in BASELINES:
        seconds = record.get(f"{name}_seconds")
        if seconds is not None:
            parts.append(f"{name} {seconds:.2f}s ({seconds / record['fireap_seconds']:.1f}x fireap)")
    delays = record["stage_start_delay_ms"]
    if delays:
        parts.append(
            "stage start delays " + " ".join(f"{delays[stage]:.0f}" for stage in sorted(delays, key=int)) + " ms"
        )
    if record.get("cpu_busy") is not None:
        parts.append(f"CPU busy {100 * record['cpu_busy']:.0f}%")
    parts.append(f"failures {record['failures']}")
    return ", ".join(parts)


def write_json(path: Path, records: list[dict], argv: list[str]) -> list[Path]:
    """The records as JSON at ``path``, the plot next to it; the paths written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": "python -m devcluster bench " + " ".join(argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "records": records,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return [path, *write_plot(records, path.with_suffix(""))]


# --- command line ----------------------------------------------------------------------


def _int_at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and at most 3600, got {text}")
    return value


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of {', '.join(BASELINES)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return tuple(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster bench",
        description="Time a fireap release across a local dev cluster against the ideal "
        "ceil(log_(k+1) N) * t and push baselines.",
    )
    parser.add_argument("--nodes", type=_int_at_least(2), help="nodes N, the leader included")
    parser.add_argument("--fanout", type=_int_at_least(FANOUT_MIN, FANOUT_MAX), default=5, help="fan-out k (default 5)")
    parser.add_argument(
        "--task-seconds",
        type=_seconds,
        help="t: the task's seconds (inproc: a sleep, default 0.5; process: one rsync of the tree at the "
        "bandwidth limit, default 2)",
    )
    parser.add_argument("--mode", choices=MODES, default=INPROC, help="inproc (default) or process")
    parser.add_argument(
        "--baseline", type=_baselines, default=(), help="comma-separated push baselines: ansible, parallel"
    )
    parser.add_argument("--repeat", type=_int_at_least(1), default=1, help="runs of each configuration; medians")
    parser.add_argument("--json", type=Path, help="write the records here, the plot next to them")
    parser.add_argument(
        "--standard",
        action="store_true",
        help=f"run the standard set (`make bench`); --json defaults to {STANDARD_JSON.relative_to(REPO_ROOT)}",
    )
    parser.add_argument(
        "--double",
        choices=DOUBLE_KINDS,
        default=SUBPROCESS,
        help="inproc: serve the Consul double in its own process (default) or in a thread of this one",
    )
    parser.add_argument(
        "--processes",
        type=_int_at_least(1),
        help="inproc: worker processes the simulated nodes are spread over (default: one per CPU)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=OUTPUT_DIR / "work",
        help="where the dev cluster and its node directories go (default build/bench/work)",
    )
    return parser


def configs_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Config]:
    if args.standard:
        given = [flag for flag, value in (("--nodes", args.nodes), ("--task-seconds", args.task_seconds)) if value]
        if given or args.baseline or args.repeat != 1 or args.mode != INPROC:
            parser.error("--standard runs its own set: drop --nodes, --task-seconds, --mode, --baseline and --repeat")
        return list(STANDARD)
    if args.nodes is None:
        parser.error("give --nodes N (or --standard)")
    task_seconds = args.task_seconds if args.task_seconds is not None else DEFAULT_TASK_SECONDS[args.mode]
    baselines = args.baseline
    if args.mode == PROCESS and PARALLEL not in baselines:
        baselines = (*baselines, PARALLEL)  # the process mode always compares with the parallel push
    return [Config(args.nodes, args.fanout, task_seconds, args.mode, baselines, args.repeat)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    configs = configs_from_args(parser, args)
    json_path = args.json or (STANDARD_JSON if args.standard else None)
    records = []
    try:
        for config in configs:
            print(f"bench: {config.describe()}, {config.repeat} run(s)", flush=True)
            record = run_config(config, args.workdir.absolute(), args.double, args.processes)
            print(f"bench: {config.describe()}: {summary(record)}", flush=True)
            records.append(record)
    except BenchError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    if json_path is not None:
        for path in write_json(json_path.absolute(), records, argv):
            print(f"bench: wrote {path}", flush=True)
    return 1 if any(record["failures"] for record in records) else 0
