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
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .serve_process import ServeError, ServeProcess, stop_process
from .workdir import INVENTORY_FILE, fresh_workdir

REPO_ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_CONFIG = REPO_ROOT / "ansible.cfg"
SETUP_PLAYBOOK = REPO_ROOT / "playbooks" / "setup.yml"
RELEASE_PLAYBOOK = REPO_ROOT / "playbooks" / "release.yml"

APP = "demo"
APP_DIR = "app"
#: Marks a workdir as the demo's own, so that a rerun may empty it.
MARKER = ".fireap-demo"
VARS_FILE = "demo-vars.yml"
REPORT_FILE = "report.json"
REPORT_HTML_FILE = "report.html"
RELEASE_LOG = "release.log"

BUILD_FILES = 1000
BUILD_DIRS = 20
BUILD_FILE_SIZES = (1024, 6 * 1024)

#: How long the monitor may take to show the end of the run after the playbook has seen it.
MONITOR_GRACE = 15.0
#: Lines of the release playbook's log shown when it failed.
LOG_TAIL_LINES = 40


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


def rsync_command(nodes_dir: Path) -> str:
    """The command template that copies the source node's app tree over this node's."""
    base = shlex.quote(f"{nodes_dir}/")
    return f"rsync -a --delete {base}{{{{ remote.name }}}}/{APP_DIR}/ {base}{{{{ node }}}}/{APP_DIR}/"


def vars_file_text(apps: dict[str, dict]) -> str:
    """An extra-vars YAML file with ``apps`` as fireap_node_apps (the inventory has the rest).

    Commands are tagged ``!unsafe`` so that Ansible leaves their ``{{ }}`` placeholders to
    the node.
    """

    class Dumper(yaml.SafeDumper):
        pass

    class Unsafe(str):
        pass

    Dumper.add_representer(Unsafe, lambda dumper, value: dumper.represent_scalar("!unsafe", str(value)))
    phases = ("before_commands", "exec_commands", "after_commands")
    tagged = {
        name: {key: [Unsafe(c) for c in value] if key in phases else value for key, value in settings.items()}
        for name, settings in apps.items()
    }
    return yaml.dump({"fireap_node_apps": tagged}, Dumper=Dumper, sort_keys=False, width=4096)


def ansible_env() -> dict[str, str]:
    """The environment the playbooks run in: the project's ansible.cfg, the venv first on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    return dict(
        os.environ,
        ANSIBLE_CONFIG=str(ANSIBLE_CONFIG),
        PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
    )


def ansible_tool(name: str) -> str:
    """An Ansible command of the interpreter's venv (ansible-playbook, ansible)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DemoError(f"{path} does not exist: run `make setup` first")
    return str(path)


def tree_manifest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` (symlinks by their target)."""
    manifest = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            manifest[relative] = "symlink:" + os.readlink(path)
        elif path.is_file():
            manifest[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            manifest[relative + "/"] = "dir"
    return manifest


def tree_difference(expected: dict[str, str], actual: dict[str, str]) -> str | None:
    """A short description of how ``actual`` differs from ``expected``, or None if equal."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(key for key in set(expected) & set(actual) if expected[key] != actual[key])
    parts = []
    for label, keys in (("missing", missing), ("unexpected", extra), ("different", changed)):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    return ", ".join(parts) or None


def write_build(app_dir: Path, version: str) -> tuple[int, int]:
    """Replace ``app_dir``'s content with a new build of ``version``; (files, bytes)."""
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    low, high = BUILD_FILE_SIZES
    total = 0
    for i in range(BUILD_FILES - 1):
        directory = app_dir / f"lib{i % BUILD_DIRS:02d}"
        directory.mkdir(exist_ok=True)
        data = os.urandom(low + (i * 7919) % (high - low))
        (directory / f"part{i:04d}.bin").write_bytes(data)
        total += len(data)
    version_file = app_dir / "VERSION"
    version_file.write_text(version + "\n")
    return BUILD_FILES, total + version_file.stat().st_size


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


def announce(what: str, args: list[str]) -> None:
    """Say which playbook runs now, before it or anything it starts writes to the terminal."""
    print(f"\n=== {what}: ansible-playbook {shlex.join(args)}", flush=True)


def run_playbook(args: list[str], log_path: Path | None = None) -> tuple[int, float]:
    """Run ansible-playbook from the project root; (exit status, seconds).

    Its output is shown live, or goes to ``log_path``. On Ctrl-C ansible-playbook gets SIGINT
    too and time to stop its workers, which run in sessions of their own and would be left
    behind if it were killed at once.
    """
    began = time.monotonic()
    with open(log_path, "wb") if log_path else contextlib.nullcontext() as log:
        proc = subprocess.Popen(
            [ansible_tool("ansible-playbook"), *args],
            cwd=REPO_ROOT,
            env=ansible_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
        )
        try:
            status = proc.wait()
        except KeyboardInterrupt:
            stop_process(proc, signal.SIGINT)
            raise
    return status, time.monotonic() - began


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
            info = cluster.start()
        except ServeError as err:
            raise DemoError(str(err)) from None
        inventory_path = workdir / INVENTORY_FILE
        inventory = yaml.safe_load(inventory_path.read_text())
        leader = leader_of(inventory)
        roots = {node["name"]: Path(node["root"]) for node in info["nodes"]}
        nodes_dir = roots[leader].parent
        if any(root != nodes_dir / name for name, root in roots.items()):
            raise DemoError(f"the node roots are not all <dir>/<node name>: {roots}")
        ports = [node["http_port"] for node in info["nodes"]]
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
    if not 1 <= args.fanout <= 64:
        parser.error(f"--fanout must be from 1 to 64, got {args.fanout}")
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
