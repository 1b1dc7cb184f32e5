"""playbooks/setup.yml and playbooks/release.yml with the real ansible-playbook, on the dev cluster,
and the playbooks that docs/playbooks.md and the modules' EXAMPLES show.

The cluster enforces an ACL token, which the inventory hands to the role and to the release
play's module defaults. Every node gets fireap with these apps: ``demo`` rsyncs the source
node's app tree into its own, ``broken`` and ``web`` (the examples' app) fail on one node,
``canary`` fails on the first stage's nodes and is slow elsewhere (so that the run is still
going when the failures show), ``site`` and ``myapp`` (the docs' app) succeed at once, and
``slow`` takes a while on every node.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import jinja2
import jinja2.meta
import pytest
import yaml

from ansible_collections.fireap.consul.plugins.filter import release_report_html
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.modules import fireap_info, fireap_wait

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = REPO_ROOT / ".venv" / "bin" / "ansible-playbook"
SETUP = REPO_ROOT / "playbooks" / "setup.yml"
RELEASE = REPO_ROOT / "playbooks" / "release.yml"
PLAYBOOKS_DOC = REPO_ROOT / "docs" / "playbooks.md"
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
        "web": f"[ {{{{ node }}}} != {BROKEN_NODE} ] || {{ echo web build broken >&2; exit 5; }}",
        "site": "exit 0",
        # Fails where the test leaves a marker file, so that a retry can succeed.
        "myapp": f"[ ! -e {nodes_dir}/{{{{ node }}}}/fail-myapp ] || {{ echo myapp broken here >&2; exit 6; }}",
        "slow": "sleep 15",
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
    report = installed["work"] / "reports" / "demo" / "report-1.0.1.json"  # directories created by the play
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
                  f"fireap_report_html_path={installed['work'] / 'html' / 'canary.html'}")
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
    page = (installed["work"] / "html" / "canary.html").read_text()
    assert '<span class="status status-aborted">aborted</span>' in page
    assert re.search(r"<td class=\"node\">node-00[12]</td>.*?<pre>.*bad build.*</pre>", page, re.DOTALL), page


# --- the documentation's playbooks ------------------------------------------------------------


def documented_commands(section: str = "Example") -> list[str]:
    """The ansible-playbook commands of the first sh block under the heading ``<section>`` in docs/playbooks.md."""
    text = PLAYBOOKS_DOC.read_text()
    block = re.search(rf"^##+ {re.escape(section)}\n.*?^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, f"no sh block under '## {section}' in {PLAYBOOKS_DOC}"
    return [line for line in block.group(1).splitlines() if line.startswith("ansible-playbook ")]


def run_documented(installed, command: str) -> subprocess.CompletedProcess:
    """A documented command against the dev cluster: its inventory (with the apps, which a real
    inventory's group_vars hold) for ``inventory``, the repository's playbooks for ``playbooks/``."""
    words = shlex.split(command)
    assert words[:3] == ["ansible-playbook", "-i", "inventory"] and words[3].startswith("playbooks/"), command
    extra = words[4:]
    if words[3] == "playbooks/setup.yml":
        extra = ["-e", f"@{installed['work'] / 'extra-vars.yml'}", *extra]
    return playbook(REPO_ROOT / words[3], installed["inventory"], installed["work"], *extra)


def task_lines(output: str, task: str) -> list[str]:
    """The result lines of ``TASK [...<task>]`` (or of the handler of that name) in ``output``."""
    found = re.search(rf"^(?:TASK|RUNNING HANDLER) \[[^\]]*{re.escape(task)}\] \**\n(.*?)(?:\n\n|\Z)", output,
                      re.MULTILINE | re.DOTALL)
    assert found, f"no task {task!r} in:\n{output}"
    return found.group(1).splitlines()


def test_the_documented_commands_install_check_reconfigure_and_release_with_reports(installed):
    *setup_commands, release_command = documented_commands()
    names = installed["target"].node_names
    outputs = []
    for command in setup_commands:  # on installed nodes: nothing to change
        run = run_documented(installed, command)
        assert run.returncode == 0, f"{command}:\n{run.output}"
        assert all(counts[1:] == (0, 0, 0) for counts in recap(run.output).values()), f"{command}:\n{run.output}"
        outputs.append(run.output)
    _setup, check, config = outputs
    assert sorted(task_lines(check, "Check that the handler's Python can run fireap-reap")) == [
        f"ok: [{name}]" for name in names], "check mode runs the read-only Python check"
    tasks = re.findall(r"^TASK \[fireap\.consul\.fireap_node : (.*?)\]", config, re.MULTILINE)
    assert tasks == ["Validating arguments against arg spec 'main' - Install the fireap-reap handler and its Consul "
                     "watch on a node", "Create the config directory", "Write the task config",
                     "Register the Consul watch that runs fireap-reap",
                     "Install the logrotate snippet of the handler's log"]

    run = run_documented(installed, release_command)
    assert run.returncode == 0, run.output
    report = installed["work"] / "reports" / "myapp" / "1.4.2.json"
    data = json.loads(report.read_text())
    assert (data["app"], data["version"], data["release"]["fanout"]) == ("myapp", "1.4.2", 3)
    assert (data["status"], data["all_finished"], data["succeeded"]) == ("finished", True, True)
    assert "finished" not in data
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["timings"]["fired_at_iso"])
    assert report.with_suffix(".html").read_text().startswith("<!DOCTYPE html>")


class _AnyName(dict):
    """Jinja's filters and tests for parsing only: Ansible's and the collection's are not loaded."""

    def get(self, name, default=None):
        return super().get(name, default) or (lambda *_args, **_kwargs: None)


def release_variables() -> set[str]:
    """The variables release.yml reads from -e or the inventory: every name its templates and
    conditions use that it does not set itself (registered results, vars) or get from Ansible."""
    plays = yaml.safe_load(RELEASE.read_text())
    env = jinja2.Environment()
    env.filters, env.tests = _AnyName(env.filters), _AnyName(env.tests)
    used: set[str] = set()
    own: set[str] = set()
    conditions = {"when", "that", "failed_when", "changed_when", "until"}

    def walk(node, key=None):
        if isinstance(node, dict):
            own.update(node.get("vars") or ())
            if isinstance(node.get("register"), str):
                own.add(node["register"])
            own.update(node.get("ansible.builtin.set_fact") or ())
            for name, value in node.items():
                walk(value, name)
        elif isinstance(node, list):
            for item in node:
                walk(item, key)
        elif isinstance(node, str) and (key in conditions or "{{" in node or "{%" in node):
            text = f"{{{{ {node} }}}}" if key in conditions else node
            used.update(jinja2.meta.find_undeclared_variables(env.parse(text)))

    walk(plays)
    return {name for name in used - own if name.startswith("fireap_")}


def test_every_variable_of_release_yml_is_documented_in_one_place():
    variables = release_variables()
    assert {"fireap_app", "fireap_fanout", "fireap_report_path", "fireap_node_consul_token"} <= variables
    section = PLAYBOOKS_DOC.read_text().split("\n## release.yml\n", 1)[1]
    documented = set(re.findall(r"^\| `(fireap_[a-z_]+)` \|", section, re.MULTILINE))
    assert documented == variables
    header = RELEASE.read_text().split("\n- name:", 1)[0]
    assert 'docs/playbooks.md, section "release.yml"' in header
    assert not re.search(r"^#\s+fireap_\w+\s{2,}", header, re.MULTILINE), "the header lists no variables itself"


# --- the modules' EXAMPLES, as they are written --------------------------------------------------


def leader_playbook(path: Path, name: str, tasks: list[dict]) -> Path:
    """A playbook of one play of ``tasks`` on the leader, the modules reaching its agent with its port and token."""
    play = {
        "name": name,
        "hosts": "fireap_leader",
        "gather_facts": False,
        "module_defaults": {"group/fireap.consul.consul": {"port": "{{ fireap_node_consul_port }}",
                                                           "token": "{{ fireap_node_consul_token }}"}},
        "tasks": tasks,
    }
    path.write_text(yaml.safe_dump([play], sort_keys=False))
    return path


def examples_playbook(path: Path, *plugins, replace: dict[str, str] | None = None) -> Path:
    """The plugins' EXAMPLES, in order, as a playbook on the leader; ``replace`` changes the texts
    (each must be somewhere) that the test needs elsewhere."""
    text = "\n".join(plugin.EXAMPLES for plugin in plugins)
    for old, new in (replace or {}).items():
        assert old in text, f"{old!r} is in no EXAMPLES"
        text = text.replace(old, new)
    return leader_playbook(path, "The examples", yaml.safe_load(text))


def test_the_wait_examples_show_the_failed_nodes_and_then_fail(installed):
    """The case the examples are written for: web fails on one node (1 of 7, past the 10% budget)."""
    run = playbook(examples_playbook(installed["work"] / "wait-examples.yml", fireap_wait), installed["inventory"],
                   installed["work"])
    assert run.returncode != 0, run.output
    shown = task_lines(run.output, "Show the nodes that failed")
    assert any(f'"msg": "{BROKEN_NODE}: ' in line and "exit status 5" in line for line in shown), run.output
    # Aborted past the budget, or finished first when the other nodes were quicker than a poll.
    failure = "\n".join(task_lines(run.output, "Fail unless every node has web 1.4.3"))
    assert re.search(r"(was aborted: 1 of 7 targets failed .* more than max_fail_percentage 10%|finished with "
                     r"failures)", failure), failure


def test_the_info_and_report_examples_read_the_run_the_wait_examples_left(installed):
    page = installed["work"] / "web-release.html"
    examples = examples_playbook(installed["work"] / "info-examples.yml", fireap_info, release_report_html,
                                 replace={"/tmp/web-release.html": str(page)})
    run = playbook(examples, installed["inventory"], installed["work"])
    assert run.returncode == 0, run.output
    assert re.search(r'"msg": "web 1\.4\.3: fired at \d{4}-\d\d-\d\dT[\d:.]+Z, [\d.]+s"', run.output), run.output
    assert any(f'"msg": "{BROKEN_NODE} failed pulling from ' in line
               for line in task_lines(run.output, "Show the failed nodes")), run.output
    assert "<h1>web 1.4.3</h1>" in page.read_text()


def test_the_wait_examples_pass_when_every_node_succeeds(installed):
    examples = examples_playbook(installed["work"] / "wait-examples-site.yml", fireap_wait,
                                 replace={"app: web": "app: site", "web 1.4.3": "site 1.4.3"})
    run = playbook(examples, installed["inventory"], installed["work"])
    assert run.returncode == 0, run.output
    leader = installed["target"].node_names[0]
    assert task_lines(run.output, "Show the nodes that failed") == [f"skipping: [{leader}]"]
    assert task_lines(run.output, "Fail unless every node has site 1.4.3") == [f"skipping: [{leader}]"]


def test_fireap_info_under_async_keeps_its_own_all_finished(installed):
    """Ansible sets ``finished`` on an async task's result to whether the job ended: the run's own
    flag must be another key, or a running release would read as finished."""
    result_file = installed["work"] / "async-info.json"
    path = leader_playbook(installed["work"] / "async-info.yml", "fireap_info as an async task", [
        {"name": "Fire a release that takes a while", "fireap.consul.fireap_fire": {"app": "slow", "version": "1"}},
        {"name": "Read its progress in the background", "fireap.consul.fireap_info": {"app": "slow"},
         "async": 60, "poll": 1, "register": "progress"},
        {"name": "Abort the run", "fireap.consul.fireap_clear": {"app": "slow", "abort": True, "reason": "seen"}},
        {"name": "Keep the result", "delegate_to": "localhost",
         "ansible.builtin.copy": {"content": "{{ progress | to_json }}", "dest": str(result_file), "mode": "0644"}},
    ])
    run = playbook(path, installed["inventory"], installed["work"])
    assert run.returncode == 0, run.output
    result = json.loads(result_file.read_text())
    assert result["ansible_job_id"] and result["finished"] is True, "Ansible's: the job ended"
    assert (result["status"], result["all_finished"], result["succeeded"]) == ("running", False, False)
    assert result["counts"]["pending"] + result["counts"]["pulling"] + result["counts"]["waiting"] > 0


def all_documented_commands(section: str) -> list[str]:
    """The ansible-playbook commands of every sh block of the section headed ``<section>``."""
    text = PLAYBOOKS_DOC.read_text()
    body = re.search(rf"^(#+) {re.escape(section)}\n(.*?)(?=^#{{1,3}} |\Z)", text, re.MULTILINE | re.DOTALL)
    assert body, f"no section {section!r} in {PLAYBOOKS_DOC}"
    blocks = re.findall(r"^```sh\n(.*?)^```", body.group(2), re.MULTILINE | re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("ansible-playbook ")]


def test_the_documented_retry_of_the_failed_nodes_and_rollback(installed):
    retry_command, rollback_command = all_documented_commands("Retry the failed nodes, roll back")
    assert "fireap_retry_failed=true" in retry_command and "fireap_rollback=true" in rollback_command
    assert release(installed, "myapp", "fireap_version=2.0").returncode == 0
    refused = run_documented(installed, retry_command)
    assert refused.returncode != 0 and "has no failed targets: nothing to retry" in refused.output, refused.output

    marker = installed["nodes_dir"] / BROKEN_NODE / "fail-myapp"
    marker.touch()
    try:
        broken = release(installed, "myapp", "fireap_version=2.1")
    finally:
        marker.unlink()
    assert broken.returncode != 0 and f"{NODES - 1}/{NODES} done, 1 failed" in broken.output, broken.output
    broken_run = re.search(r"myapp 2\.1 \(run (\w+)\)", broken.output).group(1)

    retried = run_documented(installed, retry_command)
    assert retried.returncode == 0, retried.output
    assert f"retry of version 2.1 (the failed targets of run {broken_run}): 2 target(s)" in retried.output
    assert "myapp 2.1: 2/2 done, 0 failed" in retried.output

    report = installed["work"] / "reports" / "myapp-rollback.json"
    rolled = run_documented(installed, f"{rollback_command} -e fireap_report_path={report}")
    assert rolled.returncode == 0, rolled.output
    assert f"rollback of version 2.0: {NODES} target(s)" in rolled.output
    assert f"myapp 2.0: {NODES}/{NODES} done, 0 failed" in rolled.output

    # The history as the report has it (fireap_info's), newest first: the rollback, the retry,
    # the run with a failed node (closed by the retry's fire), the first run.
    data = json.loads(report.read_text())
    rows = [(row["kind"], row["version"], row["outcome"], row["done"], row["failed"], row["target_count"])
            for row in data["history"][:4]]
    assert rows == [
        ("rollback", "2.0", "succeeded", NODES, 0, NODES),
        ("retry", "2.1", "succeeded", 2, 0, 2),
        ("release", "2.1", "failed", NODES - 1, 1, NODES),
        ("release", "2.0", "succeeded", NODES, 0, NODES),
    ], data["history"]
    assert data["history"][0]["run_id"] == data["run_id"] and data["history"][1]["retry_of"] == broken_run
    assert data["history"][2]["run_id"] == broken_run
    assert all(row["fired_by"] and row["fired_at"] and row["abort_reason"] is None for row in data["history"][:4])
    page = report.with_suffix(".html").read_text()
    assert '<section id="history"><h2>History</h2><table class="history">' in page
    assert all(row["run_id"] in page for row in data["history"][:4])


def test_a_rollback_without_an_earlier_good_version_is_refused_before_anything_is_written(installed):
    """First no run at all (``site``'s runs of other tests wiped), then one run that is the current version."""
    client, schema = installed["target"].client(), Schema()
    client.kv.delete(schema.app_prefix("site"), recurse=True)
    for released in (None, "9.0"):
        if released is not None:
            assert release(installed, "site", f"fireap_version={released}").returncode == 0
        before = client.kv.get(schema.app_prefix("site"), recurse=True)[1]
        refused = release(installed, "site", "fireap_rollback=true")
        assert refused.returncode != 0, refused.output
        assert "app 'site' has no earlier version that a run delivered to every target" in refused.output
        assert "nothing to roll back to" in refused.output
        assert client.kv.get(schema.app_prefix("site"), recurse=True)[1] == before, "a refusal writes nothing"


def held_activity(installed, run_id: str) -> dict[str, list[str]]:
    """The run's plan stages, and what the targets of stages > 1 wrote: node records, slot claims."""
    client = installed["target"].client()
    schema = Schema()
    plans = client.kv.get(schema.plan_prefix("myapp", run_id), recurse=True)[1] or []
    stages = {entry["Key"].rsplit("/", 1)[1]: json.loads(entry["Value"])["stage"] for entry in plans}
    held = sorted(name for name, stage in stages.items() if stage > 1)
    records = [name for name in held
               if (entry := client.kv.get(schema.node("myapp", name))[1]) and json.loads(entry["Value"])["run_id"] == run_id]
    slots = client.kv.get(schema.app_prefix("myapp") + "slots/", recurse=True)[1] or []
    claims = [entry["Key"] for entry in slots if entry.get("Session") or (entry.get("Value") or b"").decode() in held]
    return {"held": held, "records": records, "claims": claims}


def test_the_documented_canary_gate_holds_the_later_stages_until_resumed(installed):
    pause_command, resume_command, checked_command = all_documented_commands("Canary gate")
    paused = run_documented(installed, pause_command)
    assert paused.returncode == 0, paused.output
    assert re.search(r"myapp 3\.0: \d/7 done, 0 failed, 0 pulling, 0 waiting, \d pending \[\d+s\] \(paused\)", paused.output)
    assert "is paused after stage 1" in paused.output and "-e fireap_resume=true" in paused.output
    run_id = re.search(r"myapp 3\.0 \(run (\w+)\)", paused.output).group(1)
    time.sleep(10)
    activity = held_activity(installed, run_id)
    assert activity["held"], "the plan has a stage 2"
    assert (activity["records"], activity["claims"]) == ([], []), activity

    resumed = run_documented(installed, resume_command)
    assert resumed.returncode == 0, resumed.output
    assert f"myapp 3.0: {NODES}/{NODES} done, 0 failed" in resumed.output
    again = run_documented(installed, resume_command)
    assert again.returncode != 0 and "was resumed already" in again.output, again.output

    nodes_dir = installed["nodes_dir"]
    bad = nodes_dir / "node-001" / "unhealthy"
    bad.touch()
    try:
        check = f"test ! -e {nodes_dir}/$FIREAP_CANARY/unhealthy"
        command = checked_command.replace(re.search(r"'fireap_canary_check=.*'", checked_command).group(),
                                          shlex.quote(f"fireap_canary_check={json.dumps(check)}"))
        failed = run_documented(installed, command)
    finally:
        bad.unlink()
    assert failed.returncode != 0, failed.output
    assert "the canary check failed on node-001" in failed.output, failed.output
    info = installed["target"].client().kv.get(Schema().release("myapp"))[1]
    record = json.loads(info["Value"])
    assert (record["version"], record["status"], record["aborted_reason"]) == (
        "3.1", "aborted", "canary check failed on node-001")

    command = command.replace("fireap_version=3.1", "fireap_version=3.2")
    passed = run_documented(installed, command)
    assert passed.returncode == 0, passed.output
    assert "Resume the release, its canaries passed their check" in passed.output
    assert f"myapp 3.2: {NODES}/{NODES} done, 0 failed" in passed.output
