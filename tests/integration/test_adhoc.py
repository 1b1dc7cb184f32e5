"""The fireap modules from the `ansible` command line, against the dev cluster.

No handler is installed on the nodes, so a fired run stays in progress: the fire lock it
holds is then certain to refuse a second fire of the same app.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._kv import ReleaseRecord, Schema

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = REPO_ROOT / ".venv" / "bin" / "ansible"
COLLECTIONS_PATH = REPO_ROOT / "build"
NODES = 4
COMMAND_TIMEOUT = 300
#: `ansible` prints one result per host: "node-000 | CHANGED => {...json...}".
RESULT = re.compile(r"^(?P<host>\S+) \| (?P<state>[A-Z]+)!? => (?P<json>\{.*?^\})$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def cluster(make_double):
    with make_double(nodes=NODES, name="adhoc-devcluster") as target:
        yield target.double, target


def adhoc(inventory: Path, module: str, module_args: str, cwd: Path, with_config: bool) -> tuple[int, str, dict]:
    """Run `ansible fireap_leader -m <module> -a <args>`; (exit status, output, the leader's result).

    ``with_config`` names the collection through the environment, as for any directory;
    without it the run relies on the project's ansible.cfg being in ``cwd``.
    """
    assert (COLLECTIONS_PATH / "ansible_collections" / "fireap" / "consul").exists(), "run `make setup` first"
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(cwd / ".ansible-tmp"))
    if with_config:
        env.update(ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS_PATH), ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"))
    command = [str(ANSIBLE), "fireap_leader", "-i", str(inventory), "-m", module, "-a", module_args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          check=False)
    output = done.stdout + done.stderr
    match = RESULT.search(done.stdout)
    assert match, f"no module result in the output of {command}:\n{output}"
    return done.returncode, output, json.loads(match["json"])


def unique_app() -> str:
    return f"adhoc-{uuid.uuid4().hex[:8]}"


def test_fqcn_fire_starts_a_run_on_the_leader(cluster, tmp_path):
    double, target = cluster
    app = unique_app()
    leader = target.agents[0]
    status, output, result = adhoc(
        double.workdir / "inventory.yml",
        "fireap.consul.fireap_fire",
        f"app={app} version=1.4.2 fanout=2 port={leader.port}",
        cwd=tmp_path,
        with_config=True,
    )
    assert status == 0, output
    assert result["changed"] is True
    assert (result["version"], result["leader"], result["target_count"]) == ("1.4.2", leader.name, NODES)
    assert result["targets"] == target.node_names
    _index, entry = target.client().kv.get(Schema().release(app))
    record = ReleaseRecord.from_json(entry["Value"])
    assert (record.run_id, record.version, record.fanout, record.status) == (result["run_id"], "1.4.2", 2, "running")


def test_a_second_fire_while_the_run_is_in_progress_is_refused(cluster, tmp_path):
    double, target = cluster
    app = unique_app()
    inventory = double.workdir / "inventory.yml"
    port = target.agents[0].port
    status, output, first = adhoc(inventory, "fireap.consul.fireap_fire", f"app={app} version=1 port={port}",
                                  cwd=tmp_path, with_config=True)
    assert status == 0, output
    status, output, second = adhoc(inventory, "fireap.consul.fireap_fire", f"app={app} version=2 port={port}",
                                   cwd=tmp_path, with_config=True)
    assert status != 0, output
    assert first["run_id"] in second["msg"] and "still running" in second["msg"], second["msg"]
    _index, entry = target.client().kv.get(Schema().release(app))
    assert ReleaseRecord.from_json(entry["Value"]).run_id == first["run_id"], "the refused fire changed the release"


def test_short_module_names_work_from_the_project_root(cluster):
    double, target = cluster
    app = unique_app()
    inventory = double.workdir / "inventory.yml"
    port = target.agents[0].port
    status, output, fired = adhoc(inventory, "fireap_fire", f"app={app} port={port}", cwd=REPO_ROOT, with_config=False)
    assert status == 0, output
    assert fired["version"] == "1", "without a version nor a previous run, the first version is 1"
    status, output, progress = adhoc(inventory, "fireap_info", f"app={app} port={port}", cwd=REPO_ROOT,
                                     with_config=False)
    assert status == 0, output
    assert (progress["run_id"], progress["status"], progress["total"]) == (fired["run_id"], "running", NODES)
    assert progress["counts"] == {"done": 1, "pulling": 0, "waiting": 0, "failed": 0, "pending": NODES - 1}
