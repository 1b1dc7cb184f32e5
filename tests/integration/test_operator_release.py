"""playbooks/release.yml as an operator runs it on the dev cluster: the fan-out comes from the app's
config through the nodes' adverts, and a release of an app no node has fails at once.

The dev cluster's inventory puts each node's task config outside /etc/fireap
(``fireap_node_config_dir``), where fireap_fire used to look for the app's max_semaphores on the
leader, silently falling back to a fan-out of 5.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from devcluster.polling import wait_until

from ansible_collections.fireap.consul.plugins.module_utils._kv import NodeAdvert, Schema

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = REPO_ROOT / ".venv" / "bin" / "ansible-playbook"
SETUP = REPO_ROOT / "playbooks" / "setup.yml"
RELEASE = REPO_ROOT / "playbooks" / "release.yml"
NODES = 5
MAX_SEMAPHORES = 3
TOKEN = f"operator-test-{uuid.uuid4()}"
PLAYBOOK_TIMEOUT = 600
ADVERT_TIMEOUT = 60
#: The role variables of this test: the app ``paced`` serves 3 pullers per node, ``other`` the default 5.
APPS = {"fireap_node_apps": {"paced": {"max_semaphores": MAX_SEMAPHORES, "exec_commands": ["true"]},
                             "other": {"exec_commands": ["true"]}}}


def run_playbook(playbook: Path, inventory: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    """ansible-playbook with the project's ansible.cfg, the junit callback timing each task into ``work``/junit."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env.update(ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"), ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(work / ".ansible-tmp"),
               ANSIBLE_CALLBACKS_ENABLED="ansible.builtin.junit", JUNIT_OUTPUT_DIR=str(work / "junit"))
    done = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(inventory), *extra, str(playbook)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT, check=False)
    done.output = done.stdout + done.stderr
    return done


def task_seconds(work: Path, task: str) -> float:
    """How long ``task`` took in the last run, from the junit callback's report."""
    report = max((work / "junit").glob("*.xml"), key=lambda path: path.stat().st_mtime)
    # A case is named "[host] play: task args".
    times = [float(case.get("time")) for case in ElementTree.parse(report).iter("testcase")
             if f": {task} " in case.get("name", "")]
    assert times, f"no task {task!r} in {report}"
    return max(times)


@pytest.fixture(scope="module")
def installed(make_double, tmp_path_factory):
    """setup.yml applied to every node, every node's advert in KV."""
    with make_double(nodes=NODES, acl_token=TOKEN, name="operator-devcluster") as target:
        work = tmp_path_factory.mktemp("operator-run")
        inventory = target.double.workdir / "inventory.yml"
        extra_vars = work / "apps.yml"
        extra_vars.write_text(yaml.safe_dump(APPS))
        setup = run_playbook(SETUP, inventory, work, "-e", f"@{extra_vars}")
        assert setup.returncode == 0, setup.output
        client, schema = target.client(0), Schema()

        def advertised():
            _index, entries = client.kv.get(schema.adverts_prefix(), recurse=True)
            adverts = [NodeAdvert.from_json(entry["Value"]) for entry in entries or ()]
            return len(adverts) == NODES and all(set(advert.apps) == {"paced", "other"} for advert in adverts)

        wait_until(advertised, ADVERT_TIMEOUT, "every node's advert of its apps")
        yield {"target": target, "inventory": inventory, "work": work}


def release(installed, *variables: str) -> subprocess.CompletedProcess:
    extra = [arg for variable in variables for arg in ("-e", variable)]
    return run_playbook(RELEASE, installed["inventory"], installed["work"], *extra)


def test_the_fanout_is_the_app_s_max_semaphores_with_the_config_outside_etc_fireap(installed):
    inventory = yaml.safe_load(installed["inventory"].read_text())
    config_dirs = {host["fireap_node_config_dir"]
                   for host in inventory["all"]["children"]["fireap_nodes"]["hosts"].values()}
    assert "/etc/fireap" not in config_dirs and not Path("/etc/fireap/config.yml").exists()
    report = installed["work"] / "paced.json"
    run = release(installed, "fireap_app=paced", "fireap_version=1", "fireap_poll_interval=1",
                  f"fireap_report_path={report}")
    assert run.returncode == 0, run.output
    assert f"{NODES} target(s) at fan-out {MAX_SEMAPHORES};" in run.output
    assert json.loads(report.read_text())["release"]["fanout"] == MAX_SEMAPHORES

    given = release(installed, "fireap_app=paced", "fireap_version=2", "fireap_fanout=1", "fireap_poll_interval=1")
    assert given.returncode == 0, given.output
    assert f"{NODES} target(s) at fan-out 1;" in given.output


def test_an_app_no_node_has_fails_at_once_naming_the_apps_they_have(installed):
    started = time.monotonic()
    run = release(installed, "fireap_app=nosuchapp")
    took = time.monotonic() - started
    assert run.returncode != 0, run.output
    assert "app 'nosuchapp' is configured on no node" in run.output
    assert "(the apps the nodes have: other, paced)" in run.output
    assert "TASK [Wait for the nodes" not in run.output, "no wait until the timeout"
    assert task_seconds(installed["work"], "Fire the release") < 5
    assert took < 120
    client, schema = installed["target"].client(0), Schema()
    assert client.kv.get(schema.app_prefix("nosuchapp"), recurse=True)[1] is None, "no fire lock, no release"
