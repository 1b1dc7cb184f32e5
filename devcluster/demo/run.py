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

With ``--swarm`` (``make demo SWARM=1``) the app has an artifact instead: the build as one tar
in the leader's ``<root>/builds/``, which every node downloads from the swarm into its own
``<root>/builds/`` (each node's directory and swarm port its own, from its inventory
variables: the nodes share 127.0.0.1), verifies, and unpacks into its app directory. Each
node's swarm is capped at SWARM_RATE_LIMIT so that the monitor shows the downloads' progress;
at the end every node's artifact is compared byte for byte with the leader's, and its app
tree file by file.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from ansible_collections.fireap.consul.plugins.module_utils._connection import ConsulOptions, build_client
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.module_utils._progress import read_release
from ansible_collections.fireap.consul.plugins.module_utils._validation import check_fanout

from .. import REPO_ROOT
from ..consul import ServeError, ServeProcess, find_free_port_range
from ..consul.serve_process import stop_process
from ..consul.workdir import fresh_workdir
from .builds import APP_DIR, rsync_command, tree_difference, tree_manifest, write_build, write_tar
from .playbooks import (
    RELEASE_PLAYBOOK,
    SETUP_PLAYBOOK,
    DemoError,
    Unsafe,
    announce,
    run_playbook,
    vars_file_text,
    with_host_vars,
)
from .swarm import swarm_over

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
#: --swarm: each node's artifact directory under its root, the inventory variable holding its
#: artifact settings, its cap (bytes/s each way: a download of the few-MB build takes seconds,
#: long enough to watch) and how long it serves once the run is over (not at all: the demo
#: stops the cluster then).
SWARM_DIR = "builds"
SWARM_VAR = "demo_swarm_artifact"
SWARM_RATE_LIMIT = 512 * 1024
SWARM_SEED_SECONDS = 0
SWARM_INVENTORY = "swarm-inventory.yml"
#: Seconds the demo waits, after the release, for the leader to record the swarm run over.
SWARM_OVER_SECONDS = 30.0


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


def swarm_artifact_name(version: str) -> str:
    """The artifact's file name on every node (what its path template renders)."""
    return f"{APP}-{version}.tar"


def swarm_host_vars(nodes_dir: Path, names: list[str], first_port: int) -> dict[str, dict]:
    """Each node's artifact settings: a directory and a swarm port of its own (the dev
    cluster's nodes share one address), the path left to the node to render per release."""
    return {
        name: {SWARM_VAR: {"path": Unsafe(f"{nodes_dir}/{name}/{SWARM_DIR}/{{{{ app }}}}-{{{{ version }}}}.tar"),
                           "port": first_port + index, "rate_limit": SWARM_RATE_LIMIT,
                           "seed_seconds": SWARM_SEED_SECONDS}}
        for index, name in enumerate(names)
    }


def demo_app(nodes_dir: Path, swarm: bool) -> dict:
    """The demo's app: rsync from the source node, or (``swarm``) unpack the artifact the swarm
    delivered into the node's app directory, its settings from the node's inventory variable."""
    if not swarm:
        return {"exec_commands": [rsync_command(nodes_dir)]}
    app_dir = f"{shlex.quote(str(nodes_dir))}/{{{{ node }}}}/{APP_DIR}"
    return {
        "artifact": f"{{{{ {SWARM_VAR} }}}}",
        "exec_commands": [f"rm -rf {app_dir} && mkdir {app_dir} && tar -xf {{{{ artifact }}}} -C {app_dir}"],
    }


def leader_of(inventory: dict) -> str:
    leaders = list(inventory["all"]["children"]["fireap_leader"].get("hosts") or {})
    if len(leaders) != 1:
        raise DemoError(f"the dev cluster's inventory names {len(leaders)} leaders, expected 1")
    return leaders[0]


def run_demo(nodes: int, fanout: int, workdir: Path, swarm: bool = False) -> bool:
    """The whole demo; True when every node has the leader's build (``swarm``: and the leader's
    artifact)."""
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
            if swarm:
                (root / SWARM_DIR).mkdir(exist_ok=True)
        if swarm:
            first_port = find_free_port_range(nodes)
            inventory_path = with_host_vars(inventory_path, swarm_host_vars(nodes_dir, list(roots), first_port),
                                            workdir / SWARM_INVENTORY)
            print(f"swarm: each node's artifact in <its root>/{SWARM_DIR}/, its swarm on 127.0.0.1:"
                  f"{first_port}-{first_port + nodes - 1}, capped at {SWARM_RATE_LIMIT // 1024} KiB/s", flush=True)

        vars_path = workdir / VARS_FILE
        vars_path.write_text(vars_file_text({APP: demo_app(nodes_dir, swarm)}))
        setup_args = ["-i", str(inventory_path), "-e", f"@{vars_path}", str(SETUP_PLAYBOOK)]
        announce("install fireap", setup_args)
        status, _seconds = run_playbook(setup_args)
        if status != 0:
            raise DemoError(f"installing fireap failed: ansible-playbook exited with status {status}")

        version = time.strftime("%Y.%m%d.%H%M%S")
        files, size = write_build(roots[leader] / APP_DIR, version)
        print(f"\nnew build {version} on {leader}: {files} files, {size / 1e6:.1f} MB", flush=True)
        if swarm:
            artifact = roots[leader] / SWARM_DIR / swarm_artifact_name(version)
            print(f"its artifact: {artifact}, {write_tar(roots[leader] / APP_DIR, artifact) / 1e6:.1f} MB", flush=True)
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
        artifact_ok = True
        if swarm:
            await_swarm_end(cluster.leader.host, cluster.leader.port)
            artifact_ok = verify_artifacts(roots, leader, swarm_artifact_name(version))
        return verify(roots, leader, version, fanout, seconds, report_path) and artifact_ok and status == 0
    finally:
        cluster.stop()
        print("dev cluster stopped", flush=True)


def await_swarm_end(host: str, port: int) -> None:
    """Wait until the leader recorded the demo's swarm run over (the nodes stop serving then),
    so that the cluster is not stopped under workers still reading from it."""
    client = build_client(ConsulOptions(host=host, port=port))
    try:
        _entry, release = read_release(client, Schema(), APP)
        if release is not None and not swarm_over(client, APP, release.run_id, SWARM_OVER_SECONDS):
            print(f"\nthe leader did not record the swarm run over within {SWARM_OVER_SECONDS:g}s", flush=True)
    finally:
        client.http.close()


def verify_artifacts(roots: dict[str, Path], leader: str, name: str) -> bool:
    """Compare every node's artifact with the leader's, byte for byte, and say how many match."""
    expected = roots[leader] / SWARM_DIR / name
    problems = {}
    for node, root in sorted(roots.items()):
        path = root / SWARM_DIR / name
        if not path.is_file():
            problems[node] = f"no artifact at {path}"
        elif not filecmp.cmp(expected, path, shallow=False):
            problems[node] = f"{path} differs from the leader's"
    print(f"\nnodes whose artifact is byte for byte the leader's: {len(roots) - len(problems)}/{len(roots)}", flush=True)
    for node, problem in problems.items():
        print(f"  {node}: {problem}", flush=True)
    return not problems


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
        "--swarm",
        action="store_true",
        help="release the build as an artifact that every node downloads from the swarm (each node capped at "
        f"{SWARM_RATE_LIMIT // 1024} KiB/s, so that the downloads can be watched)",
    )
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
        ok = run_demo(args.nodes, args.fanout, args.workdir.absolute(), args.swarm)
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
