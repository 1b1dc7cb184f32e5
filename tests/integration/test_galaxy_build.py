"""The collection as Galaxy ships it: built, installed into an empty path, documented, working.

``ansible-galaxy collection build`` makes the tarball from the repository; it must hold the
collection and none of the tree's build output, working files or caches, nor the workshop
that develops and tests it (the Consul double, the Makefile, the development requirements,
the molecule scenario, the benchmark's images). It names the collection's runtime Python
packages for ansible-builder: meta/execution-environment.yml points at a requirements file
that ships with it.
``ansible-galaxy collection install`` puts it into a fresh path, and everything below runs
with ANSIBLE_COLLECTIONS_PATH naming only that path, outside the repository (so its
ansible.cfg and build/ link play no part): ``ansible-doc`` of every module, filter and role,
and a playbook of the modules' EXAMPLES, taken from the installed modules' docs, against the
Consul double, after the installed fireap_node role has put the handler on its nodes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = REPO_ROOT / ".venv" / "bin"
GALAXY = yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())
FQCN = f"{GALAXY['namespace']}.{GALAXY['name']}"
MODULES = sorted(path.stem for path in (REPO_ROOT / "plugins" / "modules").glob("*.py"))
FILTERS = sorted(path.stem for path in (REPO_ROOT / "plugins" / "filter").glob("*.py"))
ROLES = sorted(path.name for path in (REPO_ROOT / "roles").iterdir() if path.is_dir())
#: ansible-test sanity's ignore files: they ship, so that it runs on the installed collection.
SANITY_IGNORES = sorted(f"tests/sanity/{path.name}" for path in (REPO_ROOT / "tests" / "sanity").glob("ignore-*.txt"))
NODES = 3
COMMAND_TIMEOUT = 600
#: Names no tarball may hold at any depth: caches, VCS data, compiled files, molecule scenarios.
NEVER_SHIPPED = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".ansible", ".ansible-tmp", ".venv",
                 "molecule"}
#: Top-level entries of the tree that are build output or local working files.
NOT_SHIPPED_AT_TOP = {"build", ".ci", "tests/output", "changelogs/.plugin-cache.yaml"}
#: Entries of the tree that develop and test the collection: the Consul double and its benchmark,
#: the commands, the development requirements, a checkout's settings, the molecule scenario,
#: the benchmark's images, and the tests that need the double (only tests/sanity ships).
WORKSHOP = {"devcluster", "Makefile", "requirements-dev.txt", ".ansible-lint", "pytest.ini", "ansible.cfg",
            ".gitignore", "extensions/molecule", "docs/bench.png", "docs/bench.svg", "tests/ansible-test-offline",
            "tests/unit", "tests/consul", "tests/devcluster", "tests/integration", "tests/conftest.py",
            "tests/consul_harness.py", "mypy.ini"}
#: The repository's development requirements; they include the runtime file with `-r`.
DEV_REQUIREMENTS = "requirements-dev.txt"
#: The Python packages the collection needs on the controller and the nodes.
RUNTIME_PACKAGES = {"py-consul", "pyyaml"}
CONNECTION_OPTIONS = {"host", "port", "scheme", "validate_certs", "ca_path", "token", "timeout", "retries"}
APP = "web"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=\d+\s+changed=\d+\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          check=False)
    assert done.returncode == 0, f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("galaxy-build")
    run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(out), str(REPO_ROOT)],
        cwd=out, env=dict(os.environ))
    built = out / f"{GALAXY['namespace']}-{GALAXY['name']}-{GALAXY['version']}.tar.gz"
    assert built.is_file(), sorted(out.iterdir())
    return built


@dataclass(frozen=True)
class Installed:
    """The collection installed under ``collections``; commands run in ``work`` with ``env``.

    ``work`` is an empty directory and ``env`` names only ``collections``, so that nothing
    of the repository (its ansible.cfg, its build/ link) takes part.
    """

    work: Path
    collections: Path
    env: dict[str, str]

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return run(list(command), cwd=self.work, env=self.env)


@pytest.fixture(scope="module")
def installed(tarball, tmp_path_factory) -> Installed:
    work = tmp_path_factory.mktemp("galaxy-install")
    collections = work / "collections"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "CONSUL_"))}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(collections),
        ANSIBLE_CONFIG=str(work / "ansible.cfg"),  # does not exist: Ansible's defaults apply
        ANSIBLE_LOCAL_TEMP=str(work / "tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    result = Installed(work=work, collections=collections, env=env)
    result.run(str(BIN / "ansible-galaxy"), "collection", "install", "--offline", "-p", str(collections), str(tarball))
    return result


def shipped_names(tarball: Path) -> list[str]:
    with tarfile.open(tarball) as archive:
        return [member.name.removeprefix("./") for member in archive.getmembers()]


def shipped_text(tarball: Path, name: str) -> str:
    with tarfile.open(tarball) as archive:
        member = archive.extractfile(name)
        assert member is not None, f"{name} in {tarball.name} is not a file"
        return member.read().decode()


def requirement_lines(text: str) -> list[str]:
    """The lines of a pip requirements file without comments and blank lines."""
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def requirement_name(line: str) -> str:
    """The normalised project name of a requirement line (PEP 503)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    assert match, f"not a requirement: {line!r}"
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def requirement_names(text: str) -> set[str]:
    """The projects a requirements file names itself (not through -r or other options)."""
    return {requirement_name(line) for line in requirement_lines(text) if not line.startswith("-")}


def test_the_tarball_holds_the_collection_and_no_build_output_or_caches(tarball):
    names = shipped_names(tarball)
    shipped = set(names)
    for required in ("MANIFEST.json", "FILES.json", "README.md", "LICENSE", "CHANGELOG.md", "meta/runtime.yml",
                     "meta/execution-environment.yml", *SANITY_IGNORES,
                     "changelogs/changelog.yaml", "docs/configuration.md", "playbooks/release.yml",
                     *(f"plugins/modules/{module}.py" for module in MODULES),
                     *(f"plugins/filter/{name}.py" for name in FILTERS),
                     *(f"roles/{role}/meta/argument_specs.yml" for role in ROLES)):
        assert required in shipped, f"{required} is missing from {tarball.name}"
    for name in names:
        parts = name.split("/")
        assert not NEVER_SHIPPED.intersection(parts), f"{tarball.name} holds {name}"
        assert not name.endswith((".pyc", ".tar.gz")), f"{tarball.name} holds {name}"
        assert not any(name == top or name.startswith(top + "/") for top in NOT_SHIPPED_AT_TOP), (
            f"{tarball.name} holds {name}")
        assert not any(name == top or name.startswith(top + "/") for top in WORKSHOP), (
            f"{tarball.name} holds {name}, which develops or tests the collection")


def test_the_tarball_names_its_runtime_python_packages_for_ansible_builder(tarball):
    shipped = set(shipped_names(tarball))
    meta = yaml.safe_load(shipped_text(tarball, "meta/execution-environment.yml"))
    dependencies = meta["dependencies"]
    # ansible-builder takes these paths relative to the collection's root, and only files that ship.
    for kind in ("python", "system"):
        path = dependencies.get(kind)
        if path is None:
            continue
        assert isinstance(path, str) and not path.startswith(("/", "..")), (kind, path)
        assert path in shipped, f"meta/execution-environment.yml names {path}, which {tarball.name} lacks"
    runtime_file = dependencies["python"]
    runtime = shipped_text(tarball, runtime_file)
    for line in requirement_lines(runtime):
        if line.startswith(("-r", "--requirement", "-c", "--constraint")):
            included = os.path.normpath(os.path.join(os.path.dirname(runtime_file), line.split(None, 1)[1]))
            assert included in shipped, f"{runtime_file} includes {included}, which {tarball.name} lacks"
    names = requirement_names(runtime)
    assert RUNTIME_PACKAGES <= names, f"{runtime_file} names {sorted(names)}"
    # An execution environment brings its own Ansible; the development tools stay in the repository.
    assert not names & {"ansible", "ansible-core"}, f"{runtime_file} names {sorted(names)}"
    dev_only = requirement_names((REPO_ROOT / DEV_REQUIREMENTS).read_text())
    assert not names & dev_only, f"{runtime_file} names development packages {sorted(names & dev_only)}"
    # No other requirements file ships beside the runtime one: the development ones stay home.
    extra = {name for name in shipped if re.fullmatch(r"requirements[^/]*\.txt", name)} - {runtime_file}
    assert not extra, f"{tarball.name} holds {sorted(extra)}"


def test_every_python_version_is_pinned_in_one_file():
    """requirements.txt pins the runtime packages, requirements-dev.txt the rest and includes it."""
    runtime_file = yaml.safe_load((REPO_ROOT / "meta" / "execution-environment.yml").read_text())["dependencies"][
        "python"]
    dev_lines = requirement_lines((REPO_ROOT / DEV_REQUIREMENTS).read_text())
    assert f"-r {runtime_file}" in dev_lines, f"{DEV_REQUIREMENTS} does not include {runtime_file}"
    pinned_in: dict[str, list[str]] = {}
    for path in (runtime_file, DEV_REQUIREMENTS, "tests/unit/requirements.txt"):
        for line in requirement_lines((REPO_ROOT / path).read_text()):
            if not line.startswith("-") and re.search(r"[=<>~!]=|[<>]", line):
                pinned_in.setdefault(requirement_name(line), []).append(path)
    twice = {name: paths for name, paths in pinned_in.items() if len(paths) > 1}
    assert not twice, f"pinned in more than one file: {twice}"
    for line in dev_lines + requirement_lines((REPO_ROOT / runtime_file).read_text()):
        assert line.startswith("-") or "==" in line, f"not pinned: {line}"


def test_the_installed_collection_is_the_built_version(installed):
    manifest = installed.collections / "ansible_collections" / GALAXY["namespace"] / GALAXY["name"] / "MANIFEST.json"
    info = json.loads(manifest.read_text())["collection_info"]
    assert (info["namespace"], info["name"], info["version"]) == (GALAXY["namespace"], GALAXY["name"],
                                                                  GALAXY["version"])


@pytest.mark.parametrize(
    ("plugin_type", "name"),
    [("module", module) for module in MODULES] + [("filter", name) for name in FILTERS]
    + [("role", role) for role in ROLES],
)
def test_ansible_doc_shows_the_installed_plugin(installed, plugin_type, name):
    ansible_doc = [str(BIN / "ansible-doc"), "-t", plugin_type, f"{FQCN}.{name}"]
    shown = installed.run(*ansible_doc).stdout
    assert f"{FQCN}.{name}" in shown and str(installed.collections) in shown, shown
    if plugin_type == "role":
        return
    assert "EXAMPLES:" in shown, shown
    doc = json.loads(installed.run(ansible_doc[0], "--json", *ansible_doc[1:]).stdout)
    source = REPO_ROOT / "plugins" / ("modules" if plugin_type == "module" else plugin_type) / f"{name}.py"
    expected = _doc_constant(source, "DOCUMENTATION")["short_description"]
    assert doc[f"{FQCN}.{name}"]["doc"]["short_description"] == expected


def _doc_constant(source: Path, name: str):
    """A YAML doc string (DOCUMENTATION, EXAMPLES) of a plugin's source, parsed."""
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            return yaml.safe_load(node.value.value)
    raise AssertionError(f"{source} has no {name}")


def installed_examples(installed: Installed, module: str) -> list[dict]:
    """The EXAMPLES of an installed module, as ansible-doc reads them: a list of tasks."""
    shown = installed.run(str(BIN / "ansible-doc"), "--json", "-t", "module", f"{FQCN}.{module}")
    tasks = yaml.safe_load(json.loads(shown.stdout)[f"{FQCN}.{module}"]["examples"])
    assert isinstance(tasks, list) and tasks, f"{module}: EXAMPLES is not a list of tasks"
    return tasks


def for_the_double(task: dict) -> dict:
    """An example task with its connection options left to module_defaults (the double's leader agent).

    The examples name hosts of an imagined network (consul-leader.example.com) and web01..web99;
    the double's nodes are node-000.., so a node filter is pointed at them.
    """
    adapted = dict(task)
    for key, args in task.items():
        if key.startswith(f"{FQCN}.") and isinstance(args, dict):
            args = {name: value for name, value in args.items() if name not in CONNECTION_OPTIONS}
            if "node_filter" in args:
                args["node_filter"] = "^node-[0-9]+$"
            if args.get("retry_failed"):
                # No node of the double fails: the example's retry is refused as documented.
                adapted["register"] = "fireap_example"
                adapted["failed_when"] = "'has no failed targets: nothing to retry' not in fireap_example.msg | default('')"
            adapted[key] = args
    return adapted


def wait_for_the_run() -> dict:
    """The test's own step between examples: a fire meets no lock of an unfinished run."""
    return {
        "name": "Wait for the current run to finish (the test's own step)",
        f"{FQCN}.fireap_wait": {"app": APP, "timeout": 120},
    }


def role_vars(out_dir: Path) -> str:
    """The app the handler serves: its command records the version on each node.

    The command is marked !unsafe so that Ansible leaves its placeholders to the node.
    """
    command = f"echo {{{{ app }}}} {{{{ version }}}} > {out_dir}/{{{{ node }}}}.txt"
    return f"fireap_node_apps:\n  {APP}:\n    exec_commands:\n      - !unsafe {json.dumps(command)}\n"


def examples_playbook(installed: Installed) -> list[dict]:
    """The installed role on every node, then the modules' EXAMPLES on the leader, module by module."""
    connection = {"host": "127.0.0.1", "port": "{{ fireap_node_consul_port }}", "retries": 1}
    plays = [{
        "name": "Install the handler with the installed role",
        "hosts": "fireap_nodes",
        "gather_facts": False,
        "roles": [{"role": f"{FQCN}.fireap_node"}],
    }]
    for module in ("fireap_fire", "fireap_info", "fireap_wait", "fireap_clear"):
        tasks = []
        for task in installed_examples(installed, module):
            tasks.append(for_the_double(task))
            if module == "fireap_fire" and not task[f"{FQCN}.fireap_fire"].get("wait"):
                tasks.append(wait_for_the_run())
        plays.append({
            "name": f"EXAMPLES of {FQCN}.{module}",
            "hosts": "fireap_leader",
            "gather_facts": False,
            "module_defaults": {f"group/{FQCN}.consul": connection},
            "tasks": tasks,
        })
    return plays


@pytest.fixture(scope="module")
def double(make_double):
    with make_double(nodes=NODES, name="galaxy-devcluster") as target:
        # The examples release to the nginx instances tagged blue: two nodes run one.
        for agent in (1, 2):
            registered = target.http("PUT", "/v1/agent/service/register", agent,
                                     json_body={"Name": "nginx", "ID": "nginx", "Tags": ["blue"], "Port": 80})
            assert registered.status_code == 200, registered.text
        yield target.double


def test_the_modules_examples_run_against_the_double(installed, double, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    playbook = tmp_path / "examples.yml"
    playbook.write_text(yaml.safe_dump(examples_playbook(installed), sort_keys=False))
    extra_vars = tmp_path / "vars.yml"
    extra_vars.write_text(role_vars(out_dir))
    done = installed.run(str(BIN / "ansible-playbook"), "-i", str(double.workdir / "inventory.yml"),
                         "-e", f"@{extra_vars}", str(playbook))
    for module in ("fireap_fire", "fireap_info", "fireap_wait", "fireap_clear"):
        assert f"PLAY [EXAMPLES of {FQCN}.{module}]" in done.stdout
    recap = {host: (int(unreachable), int(failed)) for host, unreachable, failed in RECAP.findall(done.stdout)}
    assert len(recap) == NODES and set(recap.values()) == {(0, 0)}, done.stdout
    # The last release of the examples (fireap_wait's) reached every node through the installed handler.
    names = [node["name"] for node in json.loads((double.workdir / "cluster.json").read_text())["nodes"]]
    for node in names[1:]:
        assert (out_dir / f"{node}.txt").read_text() == f"{APP} 1.4.3\n"
