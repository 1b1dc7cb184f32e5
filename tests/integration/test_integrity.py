"""The build's checksum through playbooks/release.yml on the dev cluster, with the example of
docs/configuration.md ("Verifying the build") as written: its role variables applied with
setup.yml, its release command run on the leader's build.

A dev-cluster node keeps under its own root (``<workdir>/nodes/<node>``) what a real host keeps
under /, so the example's ``/srv/`` is read as each node's, and its rsync daemon module
``{{ remote.address }}::builds`` as the source node's ``srv/builds`` directory.

A copy that differs from the build is made the way it happens: a file of the build's size and
modification time left on a node, which rsync's quick check takes for the build and skips.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shlex
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._kv import NodeState, ReleaseRecord, Schema
from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC = REPO_ROOT / "docs" / "configuration.md"
ANSIBLE_PLAYBOOK = REPO_ROOT / ".venv" / "bin" / "ansible-playbook"
NODES = 7
FANOUT = 2
TOKEN = f"integrity-test-{uuid.uuid4()}"
PLAYBOOK_TIMEOUT = 600
APP = "web"
SCHEMA = Schema("fireap/")


def example() -> tuple[str, str]:
    """The role variables (yaml) and the release command (sh) of the docs' "Verifying the build"."""
    text = DOC.read_text(encoding="utf-8")
    section = re.split(r"^#+ ", text.split("\n### Verifying the build\n", 1)[1], maxsplit=1, flags=re.MULTILINE)[0]
    (role_vars,) = re.findall(r"^```yaml\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    (command,) = re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    return role_vars, command.strip()


def on_nodes(text: str, nodes_dir: Path, node: str = "{{ node }}") -> str:
    """``text`` with the example's paths as the dev cluster's: ``/srv/`` under ``node``'s root, the
    rsync module under the source node's."""
    own = {"{{ remote.address }}::builds/": f"{nodes_dir}/{{{{ remote.name }}}}/srv/builds/", "/srv/": f"{nodes_dir}/{node}/srv/"}
    return re.sub("|".join(re.escape(documented) for documented in own), lambda match: own[match.group(0)], text)


def playbook(name: str, inventory: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """ansible-playbook with the project's ansible.cfg, from a directory outside the project."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env.update(ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"), ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(cwd / ".ansible-tmp"))
    command = [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), *extra, str(REPO_ROOT / name)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
                          check=False)
    done.output = done.stdout + done.stderr
    return done


def build(version: str) -> bytes:
    """A web build: a gzipped tar of index.html naming the version."""
    page = f"<h1>web {version}</h1>\n".encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("index.html")
        info.size, info.mtime = len(page), 1700000000
        archive.addfile(info, io.BytesIO(page))
    return buffer.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def installed(make_double, tmp_path_factory):
    """setup.yml with the docs' role variables on every node of a fresh dev cluster."""
    with make_double(nodes=NODES, acl_token=TOKEN, name="integrity-devcluster") as target:
        double = target.double
        work = tmp_path_factory.mktemp("integrity-run")
        nodes_dir = double.workdir / "nodes"
        for name in target.node_names:  # the directory each node serves as the rsync module builds
            (nodes_dir / name / "srv" / "builds").mkdir(parents=True)
        role_vars, command = example()
        extra_vars = work / "extra-vars.yml"
        extra_vars.write_text("fireap_node_defaults: {watch_timeout: 120, command_timeout: 60}\n"
                              + on_nodes(role_vars, nodes_dir))
        inventory = double.workdir / "inventory.yml"
        setup = playbook("playbooks/setup.yml", inventory, work, "-e", f"@{extra_vars}")
        assert setup.returncode == 0, f"setup.yml failed:\n{setup.output}"
        names = target.node_names
        yield {"target": target, "work": work, "inventory": inventory, "nodes_dir": nodes_dir, "command": command,
               "leader": names[0], "names": names}


def leader_build(installed, version: str, data: bytes) -> Path:
    path = installed["nodes_dir"] / installed["leader"] / "srv" / "builds" / APP / f"{APP}-{version}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (1700000000, 1700000000))
    return path


def release(installed, command: str) -> subprocess.CompletedProcess:
    """A documented release.yml command line against the dev cluster, with the leader's paths."""
    words = shlex.split(on_nodes(command, installed["nodes_dir"], installed["leader"]))
    assert words[:4] == ["ansible-playbook", "-i", "inventory", "playbooks/release.yml"], command
    return playbook(words[3], installed["inventory"], installed["work"], *words[4:], "-e", f"fireap_fanout={FANOUT}",
                    "-e", "fireap_poll_interval=1")


def node_state(installed, node: str) -> NodeState:
    return NodeState.from_json(installed["target"].client().kv.get(SCHEMA.node(APP, node))[1]["Value"])


def page(installed, node: str) -> str:
    return (installed["nodes_dir"] / node / "srv" / APP / "index.html").read_text()


def test_the_documented_release_is_verified_on_every_node(installed):
    command = installed["command"]
    assert "fireap_checksum_file=/srv/builds/web/web-2.0.0.tar.gz" in command
    data = build("2.0.0")
    leader_build(installed, "2.0.0", data)
    run = release(installed, command)
    assert run.returncode == 0, run.output
    assert f"{APP} 2.0.0: {NODES}/{NODES} done, 0 failed" in run.output, run.output
    record = ReleaseRecord.from_json(installed["target"].client().kv.get(SCHEMA.release(APP))[1]["Value"])
    assert record.checksum == digest(data)
    for name in installed["names"][1:]:
        assert page(installed, name) == "<h1>web 2.0.0</h1>\n", f"{name} did not install the build"
        assert node_state(installed, name).status == "done"


def test_a_copy_that_differs_fails_its_node_and_its_pullers_take_another_source(installed):
    names, leader, nodes_dir = installed["names"], installed["leader"], installed["nodes_dir"]
    plan = plan_release(names, leader, FANOUT, "any")
    # A node that the leader serves and that serves others in turn.
    corrupt = next(plan[name].source for name in names[1:] if plan[name].source != leader)
    pullers = sorted(name for name in names[1:] if plan[name].source == corrupt)
    data = build("2.0.1")
    good = leader_build(installed, "2.0.1", data)
    bad = bytes(byte ^ 0xFF for byte in data)
    copy = nodes_dir / corrupt / "srv" / "builds" / APP / good.name
    copy.write_bytes(bad)
    os.utime(copy, (1700000000, 1700000000))

    # The checksum given as such this time, not computed from the leader's file.
    command = installed["command"].replace("2.0.0", "2.0.1").replace(
        "fireap_checksum_file=/srv/builds/web/web-2.0.1.tar.gz", f"fireap_checksum={digest(data)}")
    run = release(installed, command)
    assert run.returncode != 0, run.output
    assert f"{APP} 2.0.1: {NODES - 1}/{NODES} done, 1 failed" in run.output, run.output
    failure = re.search(rf"^\s*{corrupt}: (.*)$", run.output, re.MULTILINE)
    assert failure and "checksum mismatch" in failure.group(1), run.output

    failed = node_state(installed, corrupt)
    assert failed.status == "failed"
    assert (f"verify_file failed: checksum mismatch: {copy} has {digest(bad)}, the release expects {digest(data)}"
            in failed.error)
    assert page(installed, corrupt) == "<h1>web 2.0.0</h1>\n", "after_commands ran on an unverified build"
    assert pullers, f"nobody pulls from {corrupt} in {plan}"
    for name in pullers:
        state = node_state(installed, name)
        assert (state.status, state.version) == ("done", "2.0.1"), state
        assert state.source != corrupt, f"{name} pulled from the failed node"
        assert page(installed, name) == "<h1>web 2.0.1</h1>\n"


def test_a_release_without_a_checksum_fails_the_verifying_nodes_before_any_command(installed):
    leader_build(installed, "2.0.2", build("2.0.2"))
    command = re.sub(r" -e fireap_checksum_file=\S+", "", installed["command"].replace("2.0.0", "2.0.2"))
    run = release(installed, command)
    assert run.returncode != 0, run.output
    assert f"{APP} 2.0.2: 1/{NODES} done, {NODES - 1} failed" in run.output, run.output
    for name in installed["names"][1:]:
        state = node_state(installed, name)
        assert state.status == "failed" and "the release carries no checksum" in state.error, state
        assert not (installed["nodes_dir"] / name / "srv" / "builds" / APP / f"{APP}-2.0.2.tar.gz").exists()
