"""`python -m devcluster chaos`: run the scenarios on one cluster, print the table, write the figures."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ansible_collections.fireap.consul.plugins.module_utils._validation import check_fanout

from .. import REPO_ROOT
from ..consul import Realism
from ..consul.realism import RealismError, add_arguments, from_args
from .harness import ChaosCluster, ChaosError
from .probe import Outcome
from .scenarios import SCENARIOS, run_scenario

DEFAULT_NODES = 50
DEFAULT_FANOUT = 3

COLUMNS = ("scenario", "nodes", "faults", "survivors", "survivors_done", "leaked_slots", "duplicate_runs",
           "lost_records", "seconds")


def table(outcomes: list[Outcome]) -> str:
    rows = [[*COLUMNS, "ok"]]
    for outcome in outcomes:
        data = outcome.to_json()
        rows.append([str(data[column]) for column in COLUMNS] + ["ok" if outcome.ok else "FAILED"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    for outcome in outcomes:
        lines.extend(f"  {outcome.scenario}: {problem}" for problem in outcome.problems)
    return "\n".join(lines)


def run_chaos(nodes: int, fanout: int, workdir: Path, names: list[str], json_path: Path | None,
              realism: Realism | None = None) -> list[Outcome]:
    """Run the scenarios ``names`` in order on one cluster; the figures (and, under ``consul``,
    the double's realism settings) go to ``json_path``."""
    began = time.time()
    outcomes = []
    with ChaosCluster(nodes, fanout, workdir, realism) as cluster:
        consul = cluster.realism.describe(nodes)
        print("chaos: consul " + " ".join(f"{key}={value}" for key, value in consul.items()), flush=True)
        for name in names:
            outcome = run_scenario(cluster, name)
            print(f"chaos: {name}: {'ok' if outcome.ok else 'FAILED'} in {outcome.seconds:.1f}s", flush=True)
            outcomes.append(outcome)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        report = {"nodes": nodes, "fanout": fanout, "started": began, "seconds": round(time.time() - began, 1),
                  "consul": consul, "ok": all(outcome.ok for outcome in outcomes),
                  "scenarios": [outcome.to_json() for outcome in outcomes]}
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster chaos",
        description="Inject faults into releases across a local dev cluster running the real node handler.",
    )
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help=f"cluster size (default {DEFAULT_NODES})")
    parser.add_argument("--fanout", type=int, default=DEFAULT_FANOUT, help=f"fan-out k (default {DEFAULT_FANOUT})")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "build" / "chaos" / "work",
                        help="the cluster's work directory (default build/chaos/work)")
    parser.add_argument("--json", type=Path, help="write the figures of every scenario to this file")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                        help="run only this scenario (repeatable; default all, in order)")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 8:
        parser.error(f"--nodes must be at least 8, got {args.nodes}")
    try:
        check_fanout(args.fanout)
    except ValueError as err:
        parser.error(f"--{err}")
    try:
        realism = from_args(args, args.nodes)
    except RealismError as err:
        parser.error(str(err))
    try:
        outcomes = run_chaos(args.nodes, args.fanout, args.workdir.absolute(), args.scenario or list(SCENARIOS),
                             args.json, realism)
    except ChaosError as err:
        print(f"chaos: error: {err}", file=sys.stderr)
        return 1
    print(table(outcomes), flush=True)
    if args.json:
        print(f"chaos: figures in {args.json}", flush=True)
    return 0 if all(outcome.ok for outcome in outcomes) else 1
