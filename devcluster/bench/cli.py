"""`python -m devcluster bench`: how long a release takes against the ideal and push baselines.

    python -m devcluster bench --nodes N --fanout K [--task-seconds T] [--mode inproc|process]
        [--baseline ansible,parallel] [--repeat R] [--json FILE] [--double subprocess|embedded] [--processes P]
    python -m devcluster bench --mode netns --nodes N[,N...] [--artifact-mb M] [--link-mbit B] [--link-latency-ms L]
        [--repeat R] [--json FILE]
    python -m devcluster bench --standard [--json FILE]

N counts every node, the leader included; the ideal is ceil(log_(k+1) N) * t. ``inproc``
runs every node's real pull in a thread (threads spread over worker processes) with a task
sleeping t (inproc.py): the coordination overhead, no link has a bandwidth. ``process``
installs the real node side with Ansible and pulls a real tree with rsync, beside a GNU
parallel push of the same tree (process.py). ``netns`` (root only) puts every node in a
network namespace with a shaped link and moves a real build over it, fireap at k = 1, 2 and 5
and the build as one artifact over the swarm beside release.yml, push at its best and an HTTP
artifact server (netns.py); ``--nodes 10,30,60`` measures each N in turn, each on a cluster of
its own. With ``--repeat`` the figures are medians. ``--json`` writes the records and, next to them, a
plot (PNG and SVG). ``--standard`` runs the set `make bench` uses (its netns configuration
only as root).
"""

from __future__ import annotations

import argparse
import itertools
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
from ..netns import CONSUL_PORT, AgentRelay, LinkShape, NetnsCluster, NetnsError
from ..netns.cluster import require_root
from .baselines import run_ansible, run_parallel, sleep_command
from .core import (
    ANSIBLE,
    BASELINES,
    INPROC,
    MODES,
    NETNS,
    PARALLEL,
    PROCESS,
    combine,
    ideal_seconds,
    make_record,
)
from .double import DOUBLE_KINDS, BenchError, leader_client, running_double
from .inproc import run_inproc
from .netns import (
    NETNS_TIMEOUT,
    STAGE_FANOUTS,
    NetnsBench,
    lower_bound_seconds,
    netns_record,
    ram_workdir,
    stage_model_seconds,
)
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
    artifact_mb: int = 32
    link_mbit: float = 50.0
    latency_ms: float = 0.0
    #: netns: the concurrencies each push tries in the first run (empty: push_concurrencies).
    push_jobs: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.mode == NETNS:
            latency = f" +{self.latency_ms:g} ms" if self.latency_ms else ""
            return f"netns N={self.nodes} build {self.artifact_mb} MiB + tree, links {self.link_mbit:g} Mbit/s{latency}"
        return f"{self.mode} N={self.nodes} k={self.fanout} t={self.task_seconds:g}s"


#: The set `make bench` runs: inproc across N (push baselines where they take minutes, not
#: tens of minutes), the process mode with real rsync transfers, then (as root) the netns
#: mode over shaped links.
STANDARD = (
    Config(10, 5, 0.5, INPROC, (ANSIBLE, PARALLEL), 3),
    Config(30, 5, 0.5, INPROC, (ANSIBLE, PARALLEL), 3),
    Config(100, 5, 0.5, INPROC, (ANSIBLE, PARALLEL), 3),
    Config(200, 5, 0.5, INPROC, (PARALLEL,), 3),
    Config(1000, 5, 0.5, INPROC, (), 3),
    Config(30, 5, 2.0, PROCESS, (PARALLEL,), 1),
    Config(10, 5, 0.0, NETNS, (), 3),
    Config(30, 5, 0.0, NETNS, (), 3),
)


def _versions(count: int) -> list[str]:
    stamp = time.strftime("%Y%m%d.%H%M%S")
    return [f"{stamp}.{i}" for i in range(count)]


def _timeout(config: Config) -> float:
    return TIMEOUT_BASE + TIMEOUT_FACTOR * ideal_seconds(config.nodes, config.fanout, config.task_seconds)


def run_netns(config: Config, workdir: Path | None) -> dict:
    """The netns configuration ``config.repeat`` times on one cluster of namespaces; the record
    of medians. ``workdir`` None: in RAM (``ram_workdir``), else OUTPUT_DIR / "work"."""
    try:
        require_root()
        shape = LinkShape(config.link_mbit, config.latency_ms)
    except (NetnsError, ValueError) as err:
        raise BenchError(str(err)) from err
    if workdir is None:
        workdir = ram_workdir(config.nodes, config.artifact_mb * 1024 * 1024) or OUTPUT_DIR / "work"
        print(f"bench: the dev cluster and the nodes' files in {workdir}", flush=True)
    stamp = time.strftime("%Y%m%d.%H%M%S")
    versions = (f"{stamp}.{i}" for i in itertools.count())
    runs = []
    with running_double(config.nodes, workdir, SUBPROCESS) as double:
        leader = leader_client(double)
        try:
            with NetnsCluster([node.name for node in double.nodes], shape) as net:
                net.record_pid(double.proc.pid)
                routes = [(node.name, net.node(node.name).namespace, node.port) for node in double.nodes]
                with AgentRelay(routes, CONSUL_PORT) as relay:
                    bench = NetnsBench(double, leader, net, relay, config.artifact_mb * 1024 * 1024,
                                       config.push_jobs)
                    with bench.servers():
                        bench.install()
                        lower = lower_bound_seconds(bench.total_bytes, shape.bytes_per_second, shape.round_trip_seconds)
                        for i in range(1, config.repeat + 1):
                            run = bench.run(versions, NETNS_TIMEOUT, lower)
                            print(f"  run {i}/{config.repeat}: {netns_summary(run)}", flush=True)
                            runs.append(run)
        except NetnsError as err:
            raise BenchError(str(err)) from err
        finally:
            leader.http.close()
    transfer = bench.total_bytes / shape.bytes_per_second
    return netns_record(runs, {
        "nodes": config.nodes,
        "artifact_bytes": bench.total_bytes,
        "swarm_artifact_bytes": bench.swarm_bytes,
        "tree_files": len(list((double.leader.root / "app").rglob("part*.bin"))),
        "link_mbit": config.link_mbit,
        "link_latency_ms": config.latency_ms,
        "transfer_seconds": transfer,
        "stage_model_seconds": {str(k): stage_model_seconds(config.nodes, k, transfer) for k in STAGE_FANOUTS},
        "push_model_seconds": (config.nodes - 1) * transfer,
    })


def netns_summary(record: dict) -> str:
    """One line with the figures of a netns run or record."""
    stages = " ".join(f"k={k} {seconds:.1f}s" for k, seconds in record["stage_seconds"].items())
    failures = record["failures"]
    return ", ".join([
        f"lower bound {record['lower_bound_seconds']:.1f}s",
        f"stages {stages}",
        f"fireap {record['fireap_seconds']:.1f}s (k={record['best_k']}, "
        f"{record['ratio_to_lower_bound']['fireap']:.2f}x the bound)",
        f"swarm {record['swarm_seconds']:.1f}s ({record['ratio_to_lower_bound']['swarm']:.2f}x the bound, "
        f"best k/swarm {record['fireap_seconds'] / record['swarm_seconds']:.2f}, "
        f"push/swarm {record['push_best_seconds'] / record['swarm_seconds']:.2f})",
        f"release.yml {record['operator_seconds']:.1f}s",
        f"push best {record['push_best_seconds']:.1f}s ({record['push_best_method']})",
        f"HTTP pull {record['http_pull_seconds']:.1f}s",
        f"push/fireap {record['push_best_seconds'] / record['fireap_seconds']:.2f}",
        f"agent requests/node {record['agent_requests_per_node']['mean']:.1f}",
        f"bytes/node {record['agent_bytes_per_node']['mean'] / 1024:.1f} KiB",
        f"swarm requests/node {record['swarm_costs']['agent_requests_per_node']['mean']:.1f} "
        f"(leader {record['swarm_leader_costs']['agent_requests_per_node']['mean']:.0f})",
        *_cpu_busy_summary(record),
        *_swarm_phases_summary(record),
        f"failures {failures if isinstance(failures, int) else len(failures)}",
    ])


def _cpu_busy_summary(record: dict) -> list[str]:
    """The machine's busy CPU share during the swarm, the best stage model and push, when recorded."""
    busy = record.get("cpu_busy")
    if not busy:
        return []
    shares = {"swarm": busy.get("swarm"), f"k={record['best_k']}": busy.get(f"stage_k{record['best_k']}"),
              "push": busy.get("push_best")}
    shown = " ".join(f"{name} {share:.0%}" for name, share in shares.items() if isinstance(share, (int, float)))
    return [f"CPU busy {shown}"] if shown else []


def _swarm_phases_summary(record: dict) -> list[str]:
    """Where the swarm's seconds went (its link readings and the machine's CPU), when recorded."""
    phases, floor = record.get("swarm_phases"), record.get("swarm_cpu_floor_seconds")
    shown = []
    if isinstance(phases, dict):
        use = phases.get("downlink_use")
        shown.append(f"swarm bytes from {phases['first_bytes_seconds']:.1f}s to {phases['last_bytes_seconds']:.1f}s "
                     f"after fire ({'-' if use is None else f'{use:.0%}'} of the targets' downlinks), "
                     f"leader sent {phases['leader_copies']:.2f} copies, a target received "
                     f"{phases['received_copies']:.2f}")
    if isinstance(floor, (int, float)):
        shown.append(f"swarm CPU floor {floor:.1f}s")
    return shown


def run_config(config: Config, workdir: Path | None, double: str, processes: int | None = None) -> dict:
    """Measure one configuration ``config.repeat`` times on one cluster; the combined record."""
    if config.mode == NETNS:
        return run_netns(config, workdir)
    records = []
    workdir = workdir or OUTPUT_DIR / "work"
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


def _node_counts(text: str) -> tuple[int, ...]:
    """N, or N,N,... (netns: each measured in turn), each at least 2."""
    parse = _int_at_least(2)
    counts = tuple(parse(word.strip()) for word in text.split(","))
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: each N once")
    return counts


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and at most 3600, got {text}")
    return value


def _positive_float(maximum: float, zero: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (0 <= value if zero else 0 < value) or value > maximum:
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'} and at most {maximum:g}, got {text}")
        return value

    return parse


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of {', '.join(BASELINES)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return tuple(dict.fromkeys(names))


def _push_jobs(text: str) -> tuple[int, ...]:
    parse = _int_at_least(1)
    jobs = tuple(sorted({parse(word.strip()) for word in text.split(",") if word.strip()}))
    if not jobs:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of concurrencies")
    return jobs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster bench",
        description="Time a fireap release across a local dev cluster against the ideal "
        "ceil(log_(k+1) N) * t and push baselines.",
    )
    parser.add_argument(
        "--nodes", type=_node_counts, help="nodes N, the leader included (netns: a comma-separated list, each in turn)"
    )
    parser.add_argument("--fanout", type=_int_at_least(FANOUT_MIN, FANOUT_MAX), default=5, help="fan-out k (default 5)")
    parser.add_argument(
        "--task-seconds",
        type=_seconds,
        help="t: the task's seconds (inproc: a sleep, default 0.5; process: one rsync of the tree at the "
        "bandwidth limit, default 2)",
    )
    parser.add_argument(
        "--mode", choices=MODES, default=INPROC, help="inproc (default), process or netns (root: namespaces, shaped links)"
    )
    parser.add_argument(
        "--artifact-mb", type=_int_at_least(1, 4096), default=32, help="netns: the build's tarball in MiB (default 32)"
    )
    parser.add_argument(
        "--link-mbit", type=_positive_float(100_000), default=50.0, help="netns: every node's link rate up and down (default 50)"
    )
    parser.add_argument(
        "--link-latency-ms", type=_positive_float(10_000, zero=True), default=0.0,
        help="netns: one-way delay on every uplink (needs the kernel's netem; default 0)",
    )
    parser.add_argument(
        "--push-jobs", type=_push_jobs, default=(),
        help="netns: the concurrencies J each push tries in the first run, comma-separated, each at most N-1 "
        "(default: 1, 5 and N-1)",
    )
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
        help="where the dev cluster and its node directories go (default build/bench/work; netns: "
        "/dev/shm/fireap-bench, in RAM, when /dev/shm is a tmpfs with room for 5 builds per node)",
    )
    return parser


def configs_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Config]:
    if args.standard:
        given = [flag for flag, value in (("--nodes", args.nodes), ("--task-seconds", args.task_seconds)) if value]
        if given or args.baseline or args.repeat != 1 or args.mode != INPROC:
            parser.error("--standard runs its own set: drop --nodes, --task-seconds, --mode, --baseline and --repeat")
        if os.geteuid() == 0:
            return list(STANDARD)
        print("bench: not root: the standard set runs without its netns configurations", flush=True)
        return [config for config in STANDARD if config.mode != NETNS]
    if args.nodes is None:
        parser.error("give --nodes N (or --standard)")
    if args.mode == NETNS:
        if args.task_seconds is not None or args.baseline:
            parser.error("--mode netns moves a real build and runs every baseline: drop --task-seconds and --baseline")
        fewest = min(args.nodes)
        if any(jobs > fewest - 1 for jobs in args.push_jobs):
            parser.error(f"--push-jobs: a push reaches {fewest - 1} nodes; no concurrency above that")
        return [Config(nodes, args.fanout, 0.0, NETNS, (), args.repeat, args.artifact_mb, args.link_mbit,
                       args.link_latency_ms, args.push_jobs) for nodes in args.nodes]
    if len(args.nodes) > 1:
        parser.error("a list of N is for --mode netns: give one N")
    (nodes,) = args.nodes
    if args.push_jobs:
        parser.error("--push-jobs is for --mode netns")
    task_seconds = args.task_seconds if args.task_seconds is not None else DEFAULT_TASK_SECONDS[args.mode]
    baselines = args.baseline
    if args.mode == PROCESS and PARALLEL not in baselines:
        baselines = (*baselines, PARALLEL)  # the process mode always compares with the parallel push
    return [Config(nodes, args.fanout, task_seconds, args.mode, baselines, args.repeat)]


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
            record = run_config(config, args.workdir and args.workdir.absolute(), args.double, args.processes)
            line = netns_summary(record) if config.mode == NETNS else summary(record)
            print(f"bench: {config.describe()}: {line}", flush=True)
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
