"""Installing the collection from the checkout's root, and the checkout's own collection in its runs.

``ansible-galaxy collection install`` run in the checkout's root reads its ansible.cfg: that must
not make the checkout itself count as an installed fireap.consul ("Nothing to do"), so the
collection is installed into the path given with ``-p``, or else into Ansible's default path.
The playbooks and ad hoc commands run from the checkout keep using the checkout's collection,
through the playbook-adjacent ``playbooks/collections`` (``make setup`` links it to build/), even
when another copy is installed where Ansible looks by default.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = REPO_ROOT / ".venv" / "bin"
GALAXY = yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())
COLLECTION_DIR = Path("ansible_collections") / GALAXY["namespace"] / GALAXY["name"]
ADJACENT = REPO_ROOT / "playbooks" / "collections" / COLLECTION_DIR
COMMAND_TIMEOUT = 300


def run(command: list[str], home: Path, cwd: Path = REPO_ROOT) -> str:
    """``command`` in ``cwd`` (the checkout's root: its ansible.cfg applies) with ANSIBLE_HOME=``home``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "CONSUL_"))}
    env.update(ANSIBLE_HOME=str(home), ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(home / "tmp"))
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} exited with {done.returncode}:\n{output}"
    return output


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkout-build")
    run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(out)], out / "home")
    [built] = out.glob("*.tar.gz")
    return built


def installed_version(collections: Path) -> str:
    manifest = collections / COLLECTION_DIR / "MANIFEST.json"
    assert manifest.is_file(), f"nothing installed under {collections}"
    return yaml.safe_load(manifest.read_text())["collection_info"]["version"]


def test_install_from_the_root_goes_to_ansible_s_default_path(tarball, tmp_path):
    output = run([str(BIN / "ansible-galaxy"), "collection", "install", "--offline", str(tarball)], tmp_path)
    assert "Nothing to do" not in output
    assert installed_version(tmp_path / "collections") == GALAXY["version"]


@pytest.mark.parametrize("source", ["tarball", "checkout"])
def test_install_from_the_root_goes_to_the_path_given(tarball, tmp_path, source):
    target = tmp_path / "elsewhere"
    what = str(tarball) if source == "tarball" else "."
    output = run([str(BIN / "ansible-galaxy"), "collection", "install", "--offline", "-p", str(target), what],
                 tmp_path)
    assert "Nothing to do" not in output
    assert installed_version(target) == GALAXY["version"]


def test_the_tarball_leaves_out_the_checkout_s_link(tarball):
    """playbooks/collections belongs to the checkout (galaxy.yml's build_ignore): installed, it would point nowhere."""
    with tarfile.open(tarball) as archive:
        names = {member.name.removeprefix("./") for member in archive.getmembers()}
    assert "playbooks/setup.yml" in names and "playbooks/collections" not in names


@pytest.fixture
def installed_copy(tarball, tmp_path) -> Path:
    """ANSIBLE_HOME with the collection installed in its default path, its role's tasks renamed."""
    run([str(BIN / "ansible-galaxy"), "collection", "install", "--offline", str(tarball)], tmp_path)
    tasks = tmp_path / "collections" / COLLECTION_DIR / "roles" / "fireap_node" / "tasks" / "main.yml"
    tasks.write_text(yaml.safe_dump([{"name": "A task of the installed copy", "ansible.builtin.meta": "noop"}]))
    assert ADJACENT.exists(), "run `make setup` first (it links playbooks/collections to build/)"
    return tmp_path


def test_a_playbook_of_the_checkout_uses_the_checkout_s_collection(installed_copy):
    output = run([str(BIN / "ansible-playbook"), "-i", "localhost,", "--list-tasks", "playbooks/setup.yml"],
                 installed_copy)
    first_task = yaml.safe_load((REPO_ROOT / "roles" / "fireap_node" / "tasks" / "python.yml").read_text())[0]["name"]
    assert f"fireap.consul.fireap_node : {first_task}" in output, output
    assert "A task of the installed copy" not in output


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_an_ad_hoc_command_of_the_checkout_uses_the_checkout_s_collection(installed_copy, cwd):
    """From the root its ansible.cfg applies; from elsewhere ANSIBLE_CONFIG names it."""
    command = [str(BIN / "ansible"), "localhost", "-m", "fireap.consul.fireap_info", "-a", "app=any port=1",
               "-vvv"]
    if cwd == "elsewhere":
        command = ["env", f"ANSIBLE_CONFIG={REPO_ROOT / 'ansible.cfg'}", *command]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "CONSUL_"))}
    env.update(ANSIBLE_HOME=str(installed_copy), ANSIBLE_NOCOLOR="1")
    done = subprocess.run(command, cwd=REPO_ROOT if cwd == "root" else installed_copy, env=env, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT, check=False)
    output = done.stdout + done.stderr
    module = re.search(r"^Using module file (\S+)$", output, re.MULTILINE)
    assert module, output
    assert Path(module[1]).resolve() == REPO_ROOT / "plugins" / "modules" / "fireap_info.py"
