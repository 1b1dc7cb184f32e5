"""playbooks/setup.yml and playbooks/release.yml with the real ansible-playbook, on the dev cluster.

The cluster enforces an ACL token, which the inventory hands to the role and to the release
play's module defaults. Every node gets fireap with three apps: ``demo`` rsyncs the source
node's app tree into its own, ``broken`` fails on one node, ``canary`` fails on the first
stage's nodes and is slow elsewhere (so that the run is still going when the failures show).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = REPO_ROOT / ".venv" / "bin" / "ansible-playbook"
SETUP = REPO_ROOT / "playbooks" / "setup.yml"
RELEASE = REPO_ROOT / "playbooks" / "release.yml"
NODES = 7
FANOUT = 2
TOKEN = f"release-test-{uuid.uuid4()}"
PLAYBOOK_TIMEOUT = 600
BROKEN_NODE = "node-003"
CANARY_FAILING = ("node-001", "node-002")
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)

#: The role's variables for a dev-cluster node, from the inventory's host variables.


def _apps(nodes_dir: Path) -> str:
    """The role variables beyond the inventory's, as YAML; commands are !unsafe so that Ansible leaves {{ }} to the node."""
    commands = {
        "demo": f"rsync -a --delete {nodes_dir}/{{{{ remote.name }}}}/app/ {nodes_dir}/{{{{ node }}}}/app/",
        "broken": f"[ {{{{ node }}}} != {BROKEN_NODE} ] || {{ echo simulated failure >&2; exit 3; }}",
        "canary": f"case {{{{ node }}}} in {'|'.join(CANARY_FAILING)}) echo bad build >&2; exit 4;; esac; sleep 4",
    }
    lines = ["fireap_node_defaults: {watch_timeout: 120, command_timeout: 60}", "fireap_node_apps:"]
    for app, command in commands.items():
        lines += [f"  {app}:", "    exec_commands:", f"      - !unsafe {json.dumps(command)}"]
    return "\n".join(lines) + "\n"


def playbook(playbook: Path, inventory: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run ansible-playbook with the project's ansible.cfg from a directory outside the project."""
    assert (REPO_ROOT / "build" / "ansible_collections" / "fireap" / "consul").exists(), "run `make setup` first"
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCAL_TEMP=str(cwd / ".ansible-tmp"),
    )
    command = [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), *extra, str(playbook)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
                          check=False)
    done.output = done.stdout + done.stderr
    return done


def recap(output: str) -> dict[str, tuple[int, ...]]:
    """PLAY RECAP: host -> (ok, changed, unreachable, failed)."""
    return {host: tuple(int(n) for n in counts) for host, *counts in RECAP.findall(output)}


def manifest(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in directory.rglob("*") if path.is_file()}


def write_build(app_dir: Path, version: str, files: int) -> None:
    for old in app_dir.rglob("*"):
        if old.is_file():
            old.unlink()
    for i in range(files):
        part = app_dir / f"lib{i % 3}" / f"part{i:03d}.txt"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(f"{version} part {i}\n" * (i + 1))
    (app_dir / "VERSION").write_text(version + "\n")


@pytest.fixture(scope="module")
def cluster(make_double):
    with make_double(nodes=NODES, acl_token=TOKEN, name="release-devcluster") as target:
        yield target.double, target


@pytest.fixture(scope="module")
def installed(cluster, tmp_path_factory):
    """setup.yml applied twice to every node; yields the paths the tests use and both outputs."""
    double, target = cluster
    work = tmp_path_factory.mktemp("release-run")
    nodes_dir = double.workdir / "nodes"
    for name in target.node_names:
        (nodes_dir / name / "app").mkdir(parents=True, exist_ok=True)
    extra_vars = work / "extra-vars.yml"
    extra_vars.write_text(_apps(nodes_dir))
    inventory = double.workdir / "inventory.yml"
    runs = [playbook(SETUP, inventory, work, "-e", f"@{extra_vars}") for _run in range(2)]
    for run in runs:
        assert run.returncode == 0, f"setup.yml failed:\n{run.output}"
    return {"double": double, "target": target, "work": work, "inventory": inventory, "nodes_dir": nodes_dir,
            "setup_outputs": [run.output for run in runs]}


def release(installed, app: str, *variables: str) -> subprocess.CompletedProcess:
    extra = [arg for variable in (f"fireap_app={app}", *variables) for arg in ("-e", variable)]
    return playbook(RELEASE, installed["inventory"], installed["work"], *extra)


def progress_lines(output: str, app: str, version: str) -> list[str]:
    counts = r"\d+ failed, \d+ pulling, \d+ waiting, \d+ pending \[\d+s\]"
    pattern = rf"^{app} {re.escape(version)}: \d+/{NODES} done, {counts}.*$"
    return re.findall(pattern, output, re.MULTILINE)


def test_setup_installs_every_node_and_a_second_run_changes_nothing(installed):
    first, second = (recap(output) for output in installed["setup_outputs"])
    names = installed["target"].node_names
    assert sorted(first) == sorted(second) == sorted(names)
    for name in names:
        assert first[name][1] > 0 and first[name][2:] == (0, 0), first[name]
        assert second[name][1:] == (0, 0, 0), f"{name} in the second run: {second[name]}"
    assert TOKEN not in "".join(installed["setup_outputs"])


def test_release_without_an_app_fails_before_touching_consul(installed):
    run = playbook(RELEASE, installed["inventory"], installed["work"])
    assert run.returncode != 0, run.output
    assert "Name the app to release: -e fireap_app=<app>" in run.output
    assert "TASK [Fire the release]" not in run.output


def test_release_copies_the_build_to_every_node_and_writes_the_report(installed):
    nodes_dir, leader = installed["nodes_dir"], installed["target"].node_names[0]
    write_build(nodes_dir / leader / "app", "1.0.1", files=30)
    report = installed["work"] / "report-1.0.1.json"
    run = release(installed, "demo", "fireap_version=1.0.1", f"fireap_fanout={FANOUT}", "fireap_poll_interval=1",
                  f"fireap_report_path={report}")
    assert run.returncode == 0, run.output
    lines = progress_lines(run.output, "demo", "1.0.1")
    assert lines and lines[-1].startswith(f"demo 1.0.1: {NODES}/{NODES} done, 0 failed"), run.output
    assert "TASK [Propagation tree" in run.output and f'"{leader} [done]"' in run.output
    expected = manifest(nodes_dir / leader / "app")
    assert len(expected) == 31
    for name in installed["target"].node_names:
        assert manifest(nodes_dir / name / "app") == expected, f"{name} differs from the leader"
    data = json.loads(report.read_text())
    assert (data["version"], data["status"], data["succeeded"]) == ("1.0.1", "finished", True)
    assert data["counts"]["done"] == NODES and data["total"] == NODES
    assert (data["timed_out"], data["aborted"], data["refired"]) == (False, False, [])
    assert data["release"]["fanout"] == FANOUT
    assert 1 <= data["max_depth"] <= data["ideal_stages"] + 1
    assert TOKEN not in run.output
    page = report.with_suffix(".html").read_text()  # next to the JSON report by default
    assert page.startswith("<!DOCTYPE html>") and "<h1>demo 1.0.1</h1>" in page
    assert page.count('<rect class="bar ') == NODES
    for name in installed["target"].node_names:
        assert f'data-node="{name}"' in page


def test_release_without_a_version_releases_the_next_one(installed):
    nodes_dir, leader = installed["nodes_dir"], installed["target"].node_names[0]
    write_build(nodes_dir / leader / "app", "1.0.2", files=12)
    run = release(installed, "demo", "fireap_poll_interval=1")
    assert run.returncode == 0, run.output
    assert progress_lines(run.output, "demo", "1.0.2"), run.output
    expected = manifest(nodes_dir / leader / "app")
    for name in installed["target"].node_names:
        assert manifest(nodes_dir / name / "app") == expected, f"{name} differs from the leader"


def test_a_node_whose_agent_is_down_gets_the_event_again_and_the_play_times_out(installed):
    target, straggler = installed["target"], installed["target"].node_names[-1]
    # The control endpoint is served by any agent; a stopped agent misses every event.
    stopped = target.http("PUT", f"/_devcluster/agents/{straggler}/stop", 0)
    assert stopped.status_code == 200, stopped.text
    try:
        run = release(installed, "demo", "fireap_version=1.0.3", "fireap_poll_interval=1",
                      "fireap_straggler_retry_after=1", "fireap_wait_timeout=8")
    finally:
        started = target.http("PUT", f"/_devcluster/agents/{straggler}/start", 0)
        assert started.status_code == 200, started.text
    assert run.returncode != 0, run.output
    assert f"demo 1.0.3: fired the event again to 1 target(s) that never started: {straggler}" in run.output
    assert "did not finish within 8s" in run.output
    assert f"unfinished (1): {straggler} (pending)" in run.output
    assert "TASK [Summary]" in run.output, "the summary is shown also when the play fails"
    assert recap(run.output)[target.node_names[0]][3] == 1


def test_a_failing_command_fails_the_play_naming_the_node_and_its_error(installed):
    run = release(installed, "broken", "fireap_version=7", "fireap_poll_interval=1")
    assert run.returncode != 0, run.output
    assert "finished with failures" in run.output
    failure = re.search(rf"^\s*{BROKEN_NODE}: (.*)$", run.output, re.MULTILINE)
    assert failure and "exit status 3" in failure.group(1), run.output
    assert "simulated failure" in run.output
    assert f"{NODES - 1}/{NODES} done, 1 failed" in run.output


def test_too_many_failures_abort_the_run(installed):
    report = installed["work"] / "report-canary.json"
    # 0: the first failure aborts; the slow nodes keep the run going meanwhile.
    run = release(installed, "canary", "fireap_version=1", f"fireap_fanout={FANOUT}", "fireap_poll_interval=1",
                  "fireap_max_fail_percentage=0", f"fireap_report_path={report}",
                  f"fireap_report_html_path={installed['work'] / 'canary.html'}")
    assert run.returncode != 0, run.output
    aborting = re.search(r"^canary 1: aborting the run: ([12]) of 7 targets failed \(\d+\.\d%\), "
                         r"more than max_fail_percentage 0%$", run.output, re.MULTILINE)
    assert aborting, run.output
    failed = re.findall(rf"^  ({'|'.join(CANARY_FAILING)}): .*\(exit status 4\)", run.output, re.MULTILINE)
    assert len(set(failed)) >= int(aborting.group(1)), run.output
    data = json.loads(report.read_text())
    assert (data["aborted"], data["status"], data["succeeded"]) == (True, "aborted", False)
    assert data["release"]["aborted_reason"].endswith("more than max_fail_percentage 0%")
    assert data["lock"]["held"] is False, "the abort lifts the fire lock"
    page = (installed["work"] / "canary.html").read_text()
    assert '<span class="status status-aborted">aborted</span>' in page
    assert re.search(r"<td class=\"node\">node-00[12]</td>.*?<pre>.*bad build.*</pre>", page, re.DOTALL), page
