"""The netns benchmark: a real build moved over real, shaped links, fireap beside push at its best.

Every node is a network namespace with the same link rate B up and down (devcluster/netns),
its agent at 127.0.0.1:8500 inside it (the relay), an rsync daemon on its address (module
``app`` serves its app tree, ``push`` takes a pushed one), and the fireap_node role installed
with Ansible, whose modules and handler run inside the namespace. The build (:func:`write_build`)
is a tarball of ``artifact_bytes`` and a 1000-file tree, the same bytes every run.

One run measures, every node but the leader starting without the build each time:

* the stage model at each k of :data:`STAGE_FANOUTS`: ``fire`` (the library call) to the last
  done record, every node pulling with rsync from its source over the links;
* the swarm: the same build as one tar, the artifact of app :data:`SWARM_APP`, ``fire`` (which
  hashes the leader's file) to the last done record, every node downloading it from its swarm
  neighbours over the links into an artifact directory of its own, its swarm on its own
  namespace address (its catalog address), then unpacking it;
* the operator's view at the best k: ``ansible-playbook release.yml``, start to exit;
* push from the leader: GNU parallel -j J and ansible-playbook -f J running the same rsync
  into every node's ``push`` module, inside the leader's namespace, each at every J of
  :func:`push_concurrencies` (or ``--push-jobs``) in the first run and at its fastest J in the later ones;
* every node pulling one tar of the build from the leader over HTTP, all at once.

Every node's copy is compared with the leader's, file by file, after every transfer; a swarm
node's artifact byte for byte as well. Every figure is compared with one lower bound, the
build's bytes (tarball and tree) over one link: the swarm's tar holds those bytes and its
headers, so its ratio to the bound is if anything a little high.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml

from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._firing import fire, retry_stragglers
from ansible_collections.fireap.consul.plugins.module_utils._integrity import file_checksum
from ansible_collections.fireap.consul.plugins.module_utils._kv import NODE_DONE, KVRecordError, NodeState, Schema
from ansible_collections.fireap.consul.plugins.module_utils._progress import ReleaseWaitTimeout, wait
from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release, stage_count
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    DEFAULT_SWARM_PORT,
    SWARM_PEERS_MAX,
    artifact_path,
)

from ..consul import Double
from ..demo import builds
from ..demo.playbooks import (
    RELEASE_PLAYBOOK,
    SETUP_PLAYBOOK,
    DemoError,
    Unsafe,
    dump_yaml,
    run_playbook,
    vars_file_text,
)
from ..demo.swarm import swarm_over
from ..netns import CONSUL_PORT, AgentRelay, NetnsCluster
from .baselines import run_ansible, run_parallel
from .core import NETNS, TaskTiming, busy_core_seconds, busy_fraction
from .costs import node_costs, transition_costs, worst_transition
from .double import BenchError, cpu_times, node_roots
from .links import LinkRecorder, read_links, transfer_phases

APP = "bench"
APP_DIR = builds.APP_DIR
PUSH_DIR = "push"
TASK_STARTED = "task-started"
STAGE_FANOUTS = (1, 2, 5)
TREE_FILES = 1000
TREE_DIRS = 20
TREE_FILE_SIZES = (1024, 6 * 1024)
TARBALL = "release.tar"
TARBALL_MEMBERS = 8
BUILD_SEED = 20130
HTTP_PORT = 8080
HTTP_TAR = "build.tar"
#: The app whose release the swarm delivers: the build as one tar (its artifact), which each
#: node keeps in its own SWARM_DIR and unpacks into its SWARM_UNPACKED.
SWARM_APP = "bench-swarm"
SWARM_DIR = "swarm"
SWARM_UNPACKED = "swarm-app"
#: The inventory variable holding each node's artifact path (its own directory).
SWARM_ARTIFACT_VAR = "bench_swarm_artifact"
#: Upload slots per node (the app's max_semaphores): as many as a node has swarm neighbours.
SWARM_UPLOAD_SLOTS = SWARM_PEERS_MAX
#: Seconds the benchmark waits, after the last node is done, for the leader to record the swarm
#: run over (it reads the records every few seconds), so that no node serves into the next figure.
SWARM_OVER_SECONDS = 30.0
#: Seconds a netns release may take before the benchmark gives up on it (and the swarm app's
#: watch_timeout: how long a node serves at most).
NETNS_TIMEOUT = 900.0
WAIT_POLL_SECONDS = 0.5
#: Seconds after which the event goes again to targets that never started, as release.yml does
#: (fireap_wait's straggler_retry_after): Consul's gossip may lose an event for an agent.
STRAGGLER_RETRY_SECONDS = 30.0
#: Seconds the agents' handlers get after the role's reload (they advertise the app) before the first run.
INSTALL_SETTLE_SECONDS = 5.0
#: Where the dev cluster and the nodes' files go by default: in RAM. On the disk of this kind of
#: test host (one ext4 that every node shares) creating a file cost about 0.7 ms of CPU once
#: trees of 1,000 files had been deleted and written again (perf: ext4's inode allocator
#: scanning for recently deleted inodes), so 30 nodes writing one release's tree took about
#: 17 s of the 2 cores, which a real node spends on its own disk, in tens of milliseconds.
RAM_DIR = Path("/dev/shm")
RAM_WORKDIR = RAM_DIR / "fireap-bench"
#: Copies of the build a node holds at most at once: the stage model's tree, push's, the
#: swarm's tarball and its unpacked tree, and one to spare.
NODE_COPIES = 5
RSYNC_CONFIG = """uid = root
gid = root
use chroot = no
max connections = 0
log file = {log}
pid file = {pid}

[app]
path = {root}/{app}
read only = yes

[push]
path = {root}/{push}
read only = no
"""


def build_bytes(artifact_bytes: int) -> tuple[list[int], list[int]]:
    """Sizes of the tarball's members and of the tree's files (deterministic)."""
    member = artifact_bytes // TARBALL_MEMBERS
    members = [member] * (TARBALL_MEMBERS - 1) + [artifact_bytes - member * (TARBALL_MEMBERS - 1)]
    low, high = TREE_FILE_SIZES
    files = [low + (i * 7919) % (high - low) for i in range(TREE_FILES)]
    return members, files


def write_build(app_dir: Path, artifact_bytes: int) -> int:
    """The build in ``app_dir`` (emptied): ``release.tar`` and ``lib*/part*.bin``; the bytes written.

    The content comes from a seeded generator: every run and every machine moves the same bytes.
    VERSION is written apart, per release (:func:`write_version`).
    """
    if app_dir.exists():
        subprocess.run(["rm", "-rf", str(app_dir)], check=True)
    app_dir.mkdir(parents=True)
    rng = random.Random(BUILD_SEED)
    members, files = build_bytes(artifact_bytes)
    with tarfile.open(app_dir / TARBALL, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, size in enumerate(members):
            info = tarfile.TarInfo(f"release/blob{i}.bin")
            info.size = size
            info.mode = 0o644
            info.mtime = 0
            scratch = app_dir / ".member"
            scratch.write_bytes(rng.randbytes(size))
            with open(scratch, "rb") as data:
                tar.addfile(info, data)
            scratch.unlink()
    for i, size in enumerate(files):
        directory = app_dir / f"lib{i % TREE_DIRS:02d}"
        directory.mkdir(exist_ok=True)
        (directory / f"part{i:04d}.bin").write_bytes(rng.randbytes(size))
    return sum(path.stat().st_size for path in app_dir.rglob("*") if path.is_file())


def write_version(app_dir: Path, version: str) -> None:
    (app_dir / "VERSION").write_text(version + "\n")


def swarm_artifact_template(nodes_dir: Path, node: str) -> str:
    """``node``'s artifact path: a directory of its own, the file name every node shares."""
    return f"{nodes_dir}/{node}/{SWARM_DIR}/{{{{ app }}}}-{{{{ version }}}}.tar"


def swarm_app(nodes_dir: Path) -> dict:
    """The swarm's app: each node's artifact path from its inventory variable, its swarm on the
    default port of its own address, no rate cap (the links are the limit), no serving once the
    run is over; its command unpacks the verified artifact."""
    unpacked = f"{nodes_dir}/{{{{ node }}}}/{SWARM_UNPACKED}"
    return {
        "max_semaphores": SWARM_UPLOAD_SLOTS,
        "watch_timeout": NETNS_TIMEOUT,
        "artifact": {"path": f"{{{{ {SWARM_ARTIFACT_VAR} }}}}", "seed_seconds": 0, "port": DEFAULT_SWARM_PORT},
        "exec_commands": [f"rm -rf {unpacked} && mkdir {unpacked} && tar -xf {{{{ artifact }}}} -C {unpacked}"],
    }


def push_concurrencies(pushed: int) -> tuple[int, ...]:
    """The concurrencies a push tries: one at a time, 5 (Ansible's default forks), all at once."""
    return tuple(sorted({1, min(5, pushed), pushed}))


def lower_bound_seconds(total_bytes: int, bytes_per_second: float, round_trip: float) -> float:
    """No release can beat one transfer of the build at the link rate plus one round trip."""
    return total_bytes / bytes_per_second + round_trip


def ram_workdir(nodes: int, artifact_bytes: int) -> Path | None:
    """RAM_WORKDIR when RAM_DIR is a tmpfs with room for NODE_COPIES builds per node, else None."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    if not any(len(fields) > 2 and fields[1] == str(RAM_DIR) and fields[2] == "tmpfs" for fields in mounts):
        return None
    return RAM_WORKDIR if shutil.disk_usage(RAM_DIR).free >= nodes * NODE_COPIES * artifact_bytes else None


def _wrapper_text(namespace: str) -> str:
    return f"#!/bin/sh\nexec ip netns exec {namespace} {sys.executable} \"$@\"\n"


class NetnsBench:
    """The double's nodes in their namespaces with fireap installed; run() measures one repeat."""

    def __init__(self, double: Double, leader_client, net: NetnsCluster, relay: AgentRelay, artifact_bytes: int,
                 push_jobs: Sequence[int] = ()) -> None:
        """``push_jobs``: the concurrencies each push tries in the first run (default push_concurrencies)."""
        self.double = double
        self.client = leader_client
        self.net = net
        self.relay = relay
        self.artifact_bytes = artifact_bytes
        self.leader = double.leader.name
        self.nodes_dir, self.roots = node_roots(double)
        self.pushed = [name for name in self.roots if name != self.leader]
        self.push_jobs = tuple(push_jobs) or push_concurrencies(len(self.pushed))
        self.work = double.workdir / NETNS
        self.total_bytes = 0
        self.swarm_bytes = 0
        self.best_push: dict[str, int] = {}
        self._servers: list[subprocess.Popen] = []

    # --- set-up --------------------------------------------------------------------------

    def _inventory(self) -> Path:
        """The double's inventory with each node's Python run inside its namespace, its agent at :8500."""
        inventory = yaml.safe_load(self.double.inventory.read_text())
        hosts = inventory["all"]["children"]["fireap_nodes"]["hosts"]
        inventory["all"]["vars"]["fireap_node_consul_host"] = "127.0.0.1"
        for name, variables in hosts.items():
            wrapper = self.work / "python" / name
            wrapper.parent.mkdir(parents=True, exist_ok=True)
            wrapper.write_text(_wrapper_text(self.net.node(name).namespace))
            wrapper.chmod(0o755)
            variables.update(
                ansible_python_interpreter=str(wrapper), fireap_node_python=str(wrapper), fireap_node_consul_port=CONSUL_PORT
            )
            variables[SWARM_ARTIFACT_VAR] = Unsafe(swarm_artifact_template(self.nodes_dir, name))
        path = self.work / "inventory.yml"
        path.write_text(dump_yaml(inventory))
        return path

    def _push_inventory(self) -> Path:
        """Every node a local host of the controller: for the push tools run inside the leader's namespace."""
        inventory = {
            "all": {
                "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
                "children": {
                    "fireap_nodes": {"hosts": dict.fromkeys(self.roots)},
                    "fireap_leader": {"hosts": {self.leader: None}},
                },
            }
        }
        path = self.work / "push-inventory.yml"
        path.write_text(yaml.safe_dump(inventory, sort_keys=False))
        return path

    @contextmanager
    def servers(self) -> Iterator[None]:
        """Every node's rsync daemon and the leader's HTTP server, stopped when the block ends."""
        try:
            for name, root in self.roots.items():
                node = self.net.node(name)
                for directory in (APP_DIR, PUSH_DIR):
                    (root / directory).mkdir(parents=True, exist_ok=True)
                config = self.work / "rsyncd" / f"{name}.conf"
                config.parent.mkdir(parents=True, exist_ok=True)
                config.write_text(RSYNC_CONFIG.format(
                    log=config.with_suffix(".log"), pid=config.with_suffix(".pid"), root=root, app=APP_DIR, push=PUSH_DIR
                ))
                self._start(node.command(["rsync", "--daemon", "--no-detach", f"--address={node.address}",
                                          f"--config={config}"]))
            http_dir = self.work / "http"
            http_dir.mkdir(parents=True, exist_ok=True)
            leader = self.net.node(self.leader)
            self._start(leader.command([sys.executable, "-m", "http.server", "--bind", leader.address,
                                        "--directory", str(http_dir), str(HTTP_PORT)]))
            time.sleep(1.0)
            for proc in self._servers:
                if proc.poll() is not None:
                    raise BenchError(f"a server exited at once (status {proc.returncode}): {proc.args}")
            yield
        finally:
            for proc in self._servers:
                proc.terminate()
            for proc in self._servers:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._servers = []
            # The builds go (in RAM by default); the logs and the configs stay.
            for root in self.roots.values():
                for directory in (APP_DIR, PUSH_DIR, SWARM_DIR, SWARM_UNPACKED):
                    subprocess.run(["rm", "-rf", str(root / directory)], check=False)

    def _start(self, args: list[str]) -> None:
        self._servers.append(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))

    def install(self) -> None:
        """The build on the leader; each node's catalog address its namespace's; the fireap_node
        role on every node, its app pulling from the source's daemon and the swarm's app."""
        self.work.mkdir(parents=True, exist_ok=True)
        for name in self.roots:
            self.double.set_address(name, self.net.node(name).address)
        self.total_bytes = write_build(self.roots[self.leader] / APP_DIR, self.artifact_bytes)
        base = f"{self.nodes_dir}/"
        app = {
            "max_semaphores": max(STAGE_FANOUTS),
            "before_commands": [f"date +%s.%N > {base}{{{{ node }}}}/{TASK_STARTED}"],
            "exec_commands": [f"rsync -a --delete rsync://{{{{ remote.name }}}}/{APP_DIR}/ {base}{{{{ node }}}}/{APP_DIR}/"],
        }
        vars_path = self.work / "vars.yml"
        vars_path.write_text(vars_file_text({APP: app, SWARM_APP: swarm_app(self.nodes_dir)}))
        self.inventory = self._inventory()
        self.push_inventory = self._push_inventory()
        log_path = self.work / "install.log"
        try:
            status, _seconds = run_playbook(["-i", str(self.inventory), "-e", f"@{vars_path}", str(SETUP_PLAYBOOK)],
                                            log_path)
        except DemoError as err:
            raise BenchError(str(err)) from err
        if status != 0:
            raise BenchError(f"installing fireap failed: ansible-playbook exited with status {status}; see {log_path}")
        time.sleep(INSTALL_SETTLE_SECONDS)

    # --- one repeat ----------------------------------------------------------------------

    def _fresh_nodes(self, directory: str, version: str) -> dict[str, str]:
        """Every node but the leader without ``directory``'s content; the leader's build at ``version``."""
        for name in self.pushed:
            target = self.roots[name] / directory
            subprocess.run(["rm", "-rf", str(target)], check=True)
            target.mkdir(parents=True)
            (self.roots[name] / TASK_STARTED).unlink(missing_ok=True)
        write_version(self.roots[self.leader] / APP_DIR, version)
        return builds.tree_manifest(self.roots[self.leader] / APP_DIR)

    def _check(self, expected: dict[str, str], directory: str, what: str) -> dict[str, str]:
        problems = {}
        for name in self.pushed:
            difference = builds.tree_difference(expected, builds.tree_manifest(self.roots[name] / directory))
            if difference:
                problems[f"{name} ({what})"] = f"differs from the leader's build: {difference}"
        return problems

    def _states(self, schema: Schema, app: str = APP) -> dict[str, NodeState]:
        _index, entries = self.client.kv.get(schema.nodes_prefix(app), recurse=True)
        states = {}
        for entry in entries or ():
            try:
                states[schema.node_name(app, entry["Key"])] = NodeState.from_json(entry["Value"], entry["Key"])
            except (KVRecordError, ValueError) as err:
                raise BenchError(f"unreadable node record: {err}") from err
        return states

    def _not_done(self, states: Mapping[str, NodeState], version: str, what: str) -> dict[str, str]:
        failures = {}
        for name in self.pushed:
            state = states.get(name)
            if state is None or state.version != version or state.status != NODE_DONE:
                shown = "no record" if state is None else f"{state.status} at {state.version}"
                failures[f"{name} ({what})"] = f"not done at {version}: {shown}"
        return failures

    def release(self, version: str, fanout: int, timeout: float) -> dict:
        """One fireap release at ``fanout``: its seconds, failures and what it cost Consul."""
        expected = self._fresh_nodes(APP_DIR, version)
        schema = Schema()
        self.relay.reset()
        cpu_before = cpu_times()
        fired = time.time()
        outcome = fire(self.client, schema, APP, version=version, fanout=fanout)
        refired = self._wait(schema, outcome["run_id"], version, timeout)
        cpu_busy = busy_fraction(cpu_before, cpu_times())
        states = self._states(schema)
        time.sleep(1.0)  # the last nodes' session destroys and slot releases
        records, answered = self.relay.snapshot()
        what = f"fireap k={fanout}"
        failures = self._not_done(states, version, what)
        failures.update(self._check(expected, APP_DIR, what))
        finished = [states[name].finished for name in self.pushed if name in states and states[name].finished]
        completed = max(finished, default=time.time())
        tasks = {}
        for name in self.pushed:
            state = states.get(name)
            started = self.roots[name] / TASK_STARTED
            if state is not None and state.finished and started.exists():
                tasks[name] = TaskTiming(state.source, float(started.read_text()), state.finished)
        plan = plan_release(outcome["targets"], outcome["leader"], fanout, outcome["run_id"])
        transitions = transition_costs(records, tasks, plan, fired, completed)
        return {
            "seconds": completed - fired,
            "cpu_busy": cpu_busy,
            "failures": failures,
            "refired": refired,
            "max_depth": max((state.depth for state in states.values() if state.depth is not None), default=0),
            "costs": {**node_costs(records, answered, self.pushed), "transitions": transitions,
                      "worst_transition": worst_transition(transitions)},
        }

    def _wait(self, schema: Schema, run_id: str, version: str, timeout: float, app: str = APP) -> int:
        """Wait for the run, the event fired again to its stragglers every STRAGGLER_RETRY_SECONDS; how many were."""
        deadline = time.monotonic() + timeout
        refired = 0
        while True:
            left = deadline - time.monotonic()
            try:
                wait(self.client, schema, app, run_id, max(0.0, min(STRAGGLER_RETRY_SECONDS, left)), poll=WAIT_POLL_SECONDS)
                return refired
            except ReleaseWaitTimeout:
                if left <= STRAGGLER_RETRY_SECONDS:
                    clear(self.client, schema, app, abort=True, reason=f"the benchmark gave up after {timeout:g}s")
                    return refired
                refired += len(retry_stragglers(self.client, schema, app, version)["stragglers"])

    def swarm_release(self, version: str, timeout: float) -> dict:
        """One release of the swarm's app: the build as one tar on the leader, every other node
        downloading it from the swarm and unpacking it; its seconds, failures and Consul costs."""
        expected = self._fresh_nodes(SWARM_UNPACKED, version)
        for root in self.roots.values():
            subprocess.run(["rm", "-rf", str(root / SWARM_DIR)], check=True)
            (root / SWARM_DIR).mkdir()
        artifact = Path(artifact_path(swarm_artifact_template(self.nodes_dir, self.leader), SWARM_APP, version))
        self.swarm_bytes = builds.write_tar(self.roots[self.leader] / APP_DIR, artifact)
        schema = Schema()
        self.relay.reset()
        veths = {name: self.net.node(name).veth for name in self.roots}
        with LinkRecorder(lambda: read_links(veths)) as links:
            cpu_before = cpu_times()
            fired = time.time()
            try:
                outcome = fire(self.client, schema, SWARM_APP, version=version,
                               config_path=str(self.roots[self.leader] / "etc" / "fireap" / "config.yml"))
            except FireapError as err:
                raise BenchError(f"the swarm's release could not be fired: {err}") from err
            refired = self._wait(schema, outcome["run_id"], version, timeout, SWARM_APP)
            cpu_after = cpu_times()
        cpu_busy = busy_fraction(cpu_before, cpu_after)
        states = self._states(schema, SWARM_APP)
        over = swarm_over(self.client, SWARM_APP, outcome["run_id"], SWARM_OVER_SECONDS, schema)
        time.sleep(1.0)  # the nodes' last requests once the run is over (session destroys)
        records, answered = self.relay.snapshot()
        failures: dict[str, str] = {}
        # A node's first problem is named: one not done has no artifact or tree either.
        for problems in (self._not_done(states, version, "swarm"), self._check_artifacts(artifact, states, "swarm"),
                         self._check(expected, SWARM_UNPACKED, "swarm")):
            for node, problem in problems.items():
                failures.setdefault(node, problem)
        if not over:
            failures["swarm run"] = f"the leader did not record the run over within {SWARM_OVER_SECONDS:g}s"
        finished = [states[name].finished for name in self.pushed if name in states and states[name].finished]
        fetched = [states[name].fetched for name in self.pushed if name in states and states[name].fetched]
        for name in self.pushed:
            subprocess.run(["rm", "-rf", str(self.roots[name] / SWARM_DIR), str(self.roots[name] / SWARM_UNPACKED)],
                           check=True)
        return {
            "seconds": max(finished, default=time.time()) - fired,
            "fetched_seconds": max(fetched, default=time.time()) - fired,
            "cpu_busy": cpu_busy,
            "cpu_floor_seconds": busy_core_seconds(cpu_before, cpu_after) / (os.cpu_count() or 1),
            "phases": transfer_phases(links.samples, fired, self.leader, self.pushed, self.swarm_bytes,
                                      self.net.shape.bytes_per_second),
            "failures": failures,
            "refired": refired,
            "costs": node_costs(records, answered, self.pushed),
            "leader_costs": node_costs(records, answered, [self.leader]),
        }

    def _check_artifacts(self, leaders: Path, states: Mapping[str, NodeState], what: str) -> dict[str, str]:
        """Every other node's artifact byte for byte the leader's, all of it from the swarm."""
        expected = file_checksum(str(leaders))
        size = leaders.stat().st_size
        problems = {}
        for name in self.pushed:
            path = self.roots[name] / SWARM_DIR / leaders.name
            if not path.is_file():
                problems[f"{name} ({what})"] = f"no artifact at {path}"
            elif file_checksum(str(path)) != expected:
                problems[f"{name} ({what})"] = f"its artifact {path} differs from the leader's"
            elif name in states and states[name].downloaded != size:
                problems[f"{name} ({what})"] = (f"{states[name].downloaded} of the artifact's {size} bytes came from "
                                                "the swarm")
        return problems

    def operator(self, version: str, fanout: int, timeout: float) -> tuple[float, float | None, dict[str, str]]:
        """``ansible-playbook release.yml`` at ``fanout``, start to exit, as an operator runs it:
        its seconds, the machine's busy CPU share meanwhile and its failures."""
        expected = self._fresh_nodes(APP_DIR, version)
        log_path = self.work / "release.log"
        args = ["-i", str(self.inventory), "-e", f"fireap_app={APP}", "-e", f"fireap_version={version}",
                "-e", f"fireap_fanout={fanout}", "-e", f"fireap_wait_timeout={timeout:g}", str(RELEASE_PLAYBOOK)]
        cpu_before = cpu_times()
        try:
            status, seconds = run_playbook(args, log_path)
        except DemoError as err:
            raise BenchError(str(err)) from err
        cpu_busy = busy_fraction(cpu_before, cpu_times())
        failures = {} if status == 0 else {"release.yml": f"exit status {status}; see {log_path}"}
        failures.update(self._not_done(self._states(Schema()), version, "release.yml"))
        failures.update(self._check(expected, APP_DIR, "release.yml"))
        return seconds, cpu_busy, failures

    def push(self, version: str, tool: str, jobs: int) -> tuple[float, float | None, dict[str, str]]:
        """``tool`` (parallel or ansible) rsyncing the build from the leader into every node, ``jobs`` at a
        time: its seconds, the machine's busy CPU share meanwhile and its failures."""
        expected = self._fresh_nodes(PUSH_DIR, version)
        source = f"{self.roots[self.leader] / APP_DIR}/"
        leader = self.net.node(self.leader).command([])
        cpu_before = cpu_times()
        if tool == "parallel":
            seconds = run_parallel(self.pushed, jobs, f"rsync -a --delete {source} rsync://{{}}/{PUSH_DIR}/", leader)
        else:
            command = f"rsync -a --delete {source} rsync://{{{{ inventory_hostname }}}}/{PUSH_DIR}/"
            seconds = run_ansible(self.push_inventory, self.work, jobs, command, leader)
        cpu_busy = busy_fraction(cpu_before, cpu_times())
        return seconds, cpu_busy, self._check(expected, PUSH_DIR, push_method(tool, jobs))

    def http_pull(self, version: str) -> tuple[float, float | None, dict[str, str]]:
        """Every node but the leader fetching one tar of the build from the leader over HTTP, all at once:
        its seconds, the machine's busy CPU share meanwhile and its failures."""
        expected = self._fresh_nodes(PUSH_DIR, version)
        builds.write_tar(self.roots[self.leader] / APP_DIR, self.work / "http" / HTTP_TAR)
        url = f"http://{self.leader}:{HTTP_PORT}/{HTTP_TAR}"
        cpu_before = cpu_times()
        began = time.monotonic()
        procs = [
            subprocess.Popen(self.net.node(name).command(
                ["sh", "-c", 'curl -sSf "$1" | tar -x -C "$2"', "pull", url, str(self.roots[name] / PUSH_DIR)]
            ), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for name in self.pushed
        ]
        failures = {}
        for name, proc in zip(self.pushed, procs):
            _out, err = proc.communicate()
            if proc.returncode != 0:
                failures[f"{name} (http)"] = f"exit status {proc.returncode}: {err.decode(errors='replace').strip()}"
        seconds = time.monotonic() - began
        cpu_busy = busy_fraction(cpu_before, cpu_times())
        failures.update(self._check(expected, PUSH_DIR, "http"))
        return seconds, cpu_busy, failures

    def run(self, versions: Iterator[str], timeout: float, lower_bound: float) -> dict:
        """One repeat: every figure of the record, the failures named."""
        failures: dict[str, str] = {}
        stages = {}
        for k in STAGE_FANOUTS:
            stages[k] = self.release(next(versions), k, timeout)
            failures.update(stages[k]["failures"])
        best_k = min(STAGE_FANOUTS, key=lambda k: stages[k]["seconds"])
        swarm = self.swarm_release(next(versions), timeout)
        failures.update(swarm["failures"])
        operator_seconds, operator_busy, problems = self.operator(next(versions), best_k, timeout)
        failures.update(problems)

        candidates: dict[str, float] = {}
        candidates_busy: dict[str, float | None] = {}
        for tool in ("parallel", "ansible"):
            tried = (self.best_push[tool],) if tool in self.best_push else self.push_jobs
            for jobs in tried:
                seconds, busy, problems = self.push(next(versions), tool, jobs)
                failures.update(problems)
                candidates[push_method(tool, jobs)] = seconds
                candidates_busy[push_method(tool, jobs)] = busy
            self.best_push[tool] = min(tried, key=lambda jobs: candidates[push_method(tool, jobs)])
        http_seconds, http_busy, problems = self.http_pull(next(versions))
        failures.update(problems)
        push_best = min(candidates, key=candidates.__getitem__)

        figures = {
            "lower_bound_seconds": lower_bound,
            "fireap_seconds": stages[best_k]["seconds"],
            "operator_seconds": operator_seconds,
            **{f"stage_k{k}_seconds": stages[k]["seconds"] for k in STAGE_FANOUTS},
            "swarm_seconds": swarm["seconds"],
            "parallel_best_seconds": candidates[push_method("parallel", self.best_push["parallel"])],
            "ansible_best_seconds": candidates[push_method("ansible", self.best_push["ansible"])],
            "http_pull_seconds": http_seconds,
        }
        best = stages[best_k]
        return {
            "lower_bound_seconds": lower_bound,
            "stage_seconds": {str(k): stages[k]["seconds"] for k in STAGE_FANOUTS},
            "best_k": best_k,
            "fireap_seconds": best["seconds"],
            "operator_seconds": operator_seconds,
            "push_best_seconds": candidates[push_best],
            "push_best_method": push_best,
            "parallel_best_method": push_method("parallel", self.best_push["parallel"]),
            "ansible_best_method": push_method("ansible", self.best_push["ansible"]),
            "push_tried_seconds": candidates,
            "http_pull_seconds": http_seconds,
            "swarm_seconds": swarm["seconds"],
            "swarm_fetched_seconds": swarm["fetched_seconds"],
            "swarm_refired": swarm["refired"],
            "swarm_phases": swarm["phases"],
            # The core-seconds the machine was busy during the swarm's release over its cores:
            # the least time the same work could take on this machine, which all nodes share.
            "swarm_cpu_floor_seconds": swarm["cpu_floor_seconds"],
            "swarm_costs": swarm["costs"],
            "swarm_leader_costs": swarm["leader_costs"],
            "ratio_to_lower_bound": {name[: -len("_seconds")]: value / lower_bound for name, value in figures.items()},
            # The machine's busy share of CPU time while each method ran (1.0: every core busy, so
            # the figure measures this machine's CPU, which all N nodes share, and not the links).
            "cpu_busy": {
                **{f"stage_k{k}": stages[k]["cpu_busy"] for k in STAGE_FANOUTS},
                "swarm": swarm["cpu_busy"],
                "operator": operator_busy,
                "push_best": candidates_busy[push_best],
                "http_pull": http_busy,
            },
            "max_depth": best["max_depth"],
            "refired": {str(k): stages[k]["refired"] for k in STAGE_FANOUTS},
            **best["costs"],
            "failures": failures,
        }


def push_method(tool: str, jobs: int) -> str:
    return f"parallel -j {jobs}" if tool == "parallel" else f"ansible-playbook forks={jobs}"


def _median_of(values: Sequence):
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        return statistics.median(values)
    if all(isinstance(value, dict) for value in values):
        keys = [key for key in values[0] if all(key in value for value in values)]
        return {key: _median_of([value[key] for value in values]) for key in keys}
    return values[0]


def netns_record(runs: Sequence[dict], config: Mapping) -> dict:
    """The record of ``runs`` repeats: every figure the median over the runs (key by key);
    ``best_k`` and the push methods the most frequent; failures all named. The swarm's
    comparisons are ratios of medians: ``swarm_vs_best_stage`` the best stage model's seconds
    over the swarm's, ``push_best_over_swarm`` push's at its best over the swarm's."""
    failures: dict[str, str] = {}
    for run in runs:
        failures.update(run["failures"])
    record = {"mode": NETNS, **config, "runs": len(runs)}
    for key in runs[0]:
        if key == "failures":
            continue
        values = [run[key] for run in runs]
        if key in ("best_k", "push_best_method", "parallel_best_method", "ansible_best_method"):
            record[key] = statistics.mode(values)
        elif key == "push_tried_seconds":
            record[key] = runs[0][key]  # every concurrency is tried in the first run only
        else:
            record[key] = _median_of(values)
    record["fireap_runs"] = [run["fireap_seconds"] for run in runs]
    record["push_best_over_fireap"] = record["push_best_seconds"] / record["fireap_seconds"]
    record["fireap_over_lower_bound_seconds"] = record["fireap_seconds"] - record["lower_bound_seconds"]
    record["swarm_runs"] = [run["swarm_seconds"] for run in runs]
    record["swarm_over_lower_bound_seconds"] = record["swarm_seconds"] - record["lower_bound_seconds"]
    record["swarm_vs_best_stage"] = record["fireap_seconds"] / record["swarm_seconds"]
    record["push_best_over_swarm"] = record["push_best_seconds"] / record["swarm_seconds"]
    record["failures"] = len(failures)
    record["failed_nodes"] = dict(sorted(failures.items()))
    return record


def stage_model_seconds(nodes: int, fanout: int, transfer_seconds: float) -> float:
    """ceil(log_(k+1) N) stages, each k transfers sharing the source's uplink."""
    return stage_count(nodes, fanout) * fanout * transfer_seconds
