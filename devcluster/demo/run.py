"""`python -m devcluster demo`: one real release across a local dev cluster, end to end.

Starts `python -m devcluster serve`, installs fireap on every node with playbooks/setup.yml
(app ``demo``: each node rsyncs its source node's ``<root>/app/`` into its own), puts a new
build (about a thousand files, a few MB, and a VERSION file) into the leader's app
directory, releases it with playbooks/release.yml, then checks that every node's app tree
equals the leader's, file by file. While the release runs, the terminal shows the leader's
installed ``fireap-monitor`` (the playbook's output goes to ``<workdir>/release.log``); the
playbook writes the run's JSON and HTML reports to ``<workdir>/report.json`` and
``<workdir>/report.html``. The cluster is stopped at the end, also after a failure or Ctrl-C.
Exit status 0 only when every node has the new build.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from ansible_collections.fireap.consul.plugins.module_utils._validation import check_fanout

from .. import REPO_ROOT
from ..consul import ServeError, ServeProcess
from ..consul.serve_process import stop_process
from ..consul.workdir import fresh_workdir
from .builds import APP_DIR, rsync_command, tree_difference, tree_manifest, write_build
from .playbooks import RELEASE_PLAYBOOK, SETUP_PLAYBOOK, DemoError, announce, run_playbook, vars_file_text

APP = "demo"
#: Marks a workdir as the demo's own, so that a rerun may empty it.
MARKER = ".fireap-demo"
VARS_FILE = "demo-vars.yml"
REPORT_FILE = "report.json"
REPORT_HTML_FILE = "report.html"
RELEASE_LOG = "release.log"

#: How long the monitor may take to show the end of the run after the playbook has seen it.
MONITOR_GRACE = 15.0
#: Lines of the release playbook's log shown when it failed.
LOG_TAIL_LINES = 40


def depth_bound(nodes: int, fanout: int) -> int:
    """ceil(log_{k+1} N) + 1: the deepest a node should sit in the propagation tree."""
    stages = 0
    reached = 1
    while reached < nodes:  # integer arithmetic: no floating-point surprises at exact powers
        reached *= fanout + 1
        stages += 1
    return stages + 1


def prepare_workdir(workdir: Path) -> None:
    """Create ``workdir``, emptying it when an earlier demo left it; refuse any other content."""
    try:
        fresh_workdir(workdir, MARKER, "the demo")
    except ValueError as err:
        raise DemoError(str(err)) from None


def monitor_command(host_vars: dict) -> list[str]:
    """The node's installed fireap-monitor for the demo app, with the node's own Consul settings."""
    return [
        str(Path(host_vars["fireap_node_prefix"]) / "bin" / "fireap-monitor"),
        "--config",
        str(Path(host_vars["fireap_node_config_dir"]) / "config.yml"),
        "--app",
        APP,
    ]


def release_with_monitor(args: list[str], what: str, monitor: list[str], log_path: Path) -> tuple[int, float]:
    """Run the release playbook into ``log_path`` while ``monitor`` shows the run live.

    The monitor starts first, waits for the run and exits when it is over; it is stopped when
    it has not within MONITOR_GRACE of the playbook's end (a run that timed out, or a playbook
    that failed before it fired). Nothing else writes to the terminal meanwhile, so that the
    monitor's in-place redraw stays intact. The log's tail is shown when the playbook failed.
    """
    announce(what, args)
    print(f"live display: {shlex.join(monitor)}", flush=True)
    proc = subprocess.Popen(monitor, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    try:
        status, seconds = run_playbook(args, log_path)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(MONITOR_GRACE)
    finally:
        stop_process(proc, signal.SIGTERM)
    print(f"release playbook output: {log_path}", flush=True)
    if status != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print("\n".join(["", f"--- the last {len(tail)} lines of {log_path}", *tail]), flush=True)
    return status, seconds


def leader_of(inventory: dict) -> str:
    leaders = list(inventory["all"]["children"]["fireap_leader"].get("hosts") or {})
    if len(leaders) != 1:
        raise DemoError(f"the dev cluster's inventory names {len(leaders)} leaders, expected 1")
    return leaders[0]


def run_demo(nodes: int, fanout: int, workdir: Path) -> bool:
    """The whole demo; True when every node has the leader's build."""
    prepare_workdir(workdir)
    # A session of its own: Ctrl-C reaches the playbooks, the cluster is stopped last.
    cluster = ServeProcess(nodes, workdir, new_session=True)
    try:
        try:
            cluster.start()
        except ServeError as err:
            raise DemoError(str(err)) from None
        inventory_path = cluster.inventory
        inventory = yaml.safe_load(inventory_path.read_text())
        leader = leader_of(inventory)
        roots = {node.name: node.root for node in cluster.nodes}
        nodes_dir = roots[leader].parent
        if any(root != nodes_dir / name for name, root in roots.items()):
            raise DemoError(f"the node roots are not all <dir>/<node name>: {roots}")
        ports = [node.port for node in cluster.nodes]
        print(
            f"dev cluster: {nodes} nodes, Consul HTTP API on 127.0.0.1:{ports[0]}-{ports[-1]} "
            f"(one port per agent), leader {leader}, workdir {workdir}",
            flush=True,
        )
        for root in roots.values():
            (root / APP_DIR).mkdir(parents=True, exist_ok=True)

        vars_path = workdir / VARS_FILE
        vars_path.write_text(vars_file_text({APP: {"exec_commands": [rsync_command(nodes_dir)]}}))
        setup_args = ["-i", str(inventory_path), "-e", f"@{vars_path}", str(SETUP_PLAYBOOK)]
        announce("install fireap", setup_args)
        status, _seconds = run_playbook(setup_args)
        if status != 0:
            raise DemoError(f"installing fireap failed: ansible-playbook exited with status {status}")

        version = time.strftime("%Y.%m%d.%H%M%S")
        files, size = write_build(roots[leader] / APP_DIR, version)
        print(f"\nnew build {version} on {leader}: {files} files, {size / 1e6:.1f} MB", flush=True)
        report_path = workdir / REPORT_FILE
        host_vars = inventory["all"]["children"]["fireap_nodes"]["hosts"][leader]
        status, seconds = release_with_monitor(
            [
                "-i",
                str(inventory_path),
                "-e",
                f"fireap_app={APP}",
                "-e",
                f"fireap_version={version}",
                "-e",
                f"fireap_fanout={fanout}",
                "-e",
                f"fireap_report_path={report_path}",
                "-e",
                f"fireap_report_html_path={workdir / REPORT_HTML_FILE}",
                str(RELEASE_PLAYBOOK),
            ],
            f"release {APP} {version}",
            monitor_command(host_vars),
            workdir / RELEASE_LOG,
        )
        if status != 0:
            print(f"\nthe release playbook exited with status {status}; checking the nodes anyway", flush=True)
        return verify(roots, leader, version, fanout, seconds, report_path) and status == 0
    finally:
        cluster.stop()
        print("dev cluster stopped", flush=True)


def verify(roots: dict[str, Path], leader: str, version: str, fanout: int, seconds: float, report_path: Path) -> bool:
    """Compare every node's app tree with the leader's and print the summary."""
    expected = tree_manifest(roots[leader] / APP_DIR)
    problems = {}
    for name, root in sorted(roots.items()):
        difference = tree_difference(expected, tree_manifest(root / APP_DIR))
        if difference:
            problems[name] = difference
    nodes = len(roots)
    lines = ["", "=== demo summary", f"nodes {nodes}, fanout {fanout}, version {version}"]
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as err:
        lines.append(f"release playbook {seconds:.1f}s; no report ({err})")
    else:
        lines.append(
            f"release playbook {seconds:.1f}s; from the fire to the last node {report['timings']['elapsed']:.1f}s"
        )
        lines.append(
            f"max depth {report['max_depth']} (bound ceil(log_{fanout + 1} {nodes})+1 = {depth_bound(nodes, fanout)})"
        )
    html_report = report_path.with_name(REPORT_HTML_FILE)
    if html_report.exists():
        lines.append(f"report: {html_report}")
    lines.append(f"nodes whose app tree equals the leader's: {nodes - len(problems)}/{nodes}")
    print("\n".join(lines), flush=True)
    for name, difference in problems.items():
        print(f"  {name}: {difference}", flush=True)
    return not problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster demo",
        description="Release a build across a local dev cluster with the project's playbooks and check every node.",
    )
    parser.add_argument("--nodes", type=int, default=20, help="number of nodes, the leader included (default 20)")
    parser.add_argument("--fanout", type=int, default=5, help="nodes one finished node serves at once (default 5)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO_ROOT / "build" / "demo",
        help="where the cluster, its nodes and the report go (default build/demo)",
    )
    return parser


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error(f"--nodes must be at least 2 (a leader and a node to release to), got {args.nodes}")
    try:
        check_fanout(args.fanout)
    except ValueError as err:
        parser.error(f"--{err}")
    # SIGTERM (a stopped `make demo`) unwinds like Ctrl-C, so the cluster is stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ok = run_demo(args.nodes, args.fanout, args.workdir.absolute())
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; the dev cluster was stopped", file=sys.stderr)
        return 130
    if not ok:
        print("demo: FAILED: some nodes do not have the new build", file=sys.stderr)
        return 1
    print("demo: OK: every node has the new build", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
