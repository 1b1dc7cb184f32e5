"""Command line: `python -m devcluster serve|demo|bench|chaos ...`; each command belongs to a room
(consul/serve.py, demo/run.py, bench/cli.py, chaos/cli.py), which parses the rest."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The commands, for --help and for an unknown command; each room has a parser of its own."""
    parser = argparse.ArgumentParser(
        prog="python -m devcluster", description="A Consul double: N agents with Consul's HTTP API on 127.0.0.1."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run a cluster until SIGTERM/SIGINT (see serve --help)")
    commands.add_parser("demo", help="release a build across a local cluster end to end (see demo --help)")
    commands.add_parser("bench", help="measure fireap against the ideal and push baselines (see bench --help)")
    commands.add_parser("chaos", help="inject faults into releases and report what survived (see chaos --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Imported on demand: serving needs neither Ansible nor the collection.
    if argv[:1] == ["serve"]:
        from .consul.serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["demo"]:
        from .demo.run import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["chaos"]:
        from .chaos.cli import main as chaos_main

        return chaos_main(argv[1:])
    build_parser().parse_args(argv)
    return 2
