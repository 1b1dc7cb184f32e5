"""`python -m devcluster chaos`: fault injection against a dev cluster running the real node side.

The double runs as `python -m devcluster serve` in a process of its own, with ACLs on and a
data dir (so that it can be killed and restarted with its state). Every node gets what the
``fireap_node`` role installs, written directly from the inventory's role variables (the
role's own run takes minutes at this size): the task config with the Consul token (0600),
and the agent's watch on the FIREAP:TASK event running this tree's ``fireap-reap``. Releases
are fired with the modules' own ``_release`` functions; every node's agent runs its handler,
which starts real detached workers that run the app's commands.

Every app command ends by appending ``<version> <source>`` to ``runs-<app>.log`` in the
node's directory, so that a command run twice for one version on one node is counted, not
assumed. Per scenario the result holds:

``nodes``            targets of the scenario's releases (the leader included)
``faults``           faults injected (killed workers, stopped agents, bad inputs, ...)
``survivors``        targets the scenario meant to finish: those not faulted
``survivors_done``   of those, the ones done at the release's version at the end
``leaked_slots``     slot keys still held by a session once every worker has ended
``duplicate_runs``   extra command runs for one version on one node (run logs)
``lost_records``     KV records that went missing or back (lower ModifyIndex, done undone)
``seconds``          wall time of the scenario
``facts``            what the scenario checked beyond these, and ``problems`` if any failed

Scenarios run in sequence on one cluster, each with apps of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests
import yaml


from .collection_path import REPO_ROOT
from .polling import wait_until
from ansible_collections.fireap.consul.plugins.action.fireap_wait import too_many_failures
from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    ConsulOptions,
    FireapConsulError,
    build_client,
    consul_errors,
)
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_DONE,
    NODE_FAILED,
    NODE_PULLING,
    KVRecordError,
    NodeState,
    Schema,
)
from ansible_collections.fireap.consul.plugins.module_utils._reap import (
    handler_command,
    write_atomic,
)
from ansible_collections.fireap.consul.plugins.module_utils._release import (
    EVENT_NAME,
    EVENT_OVERHEAD,
    EVENT_SIZE_LIMIT,
    ReleaseError,
    anchored_node_filters,
    clear,
    event_payload,
    fire,
    info,
    retry_stragglers,
    wait,
)
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import load_config

from .serve_process import ServeError, ServeProcess
from .workdir import INVENTORY_FILE, fresh_workdir

MARKER = ".fireap-chaos"
DEFAULT_NODES = 50
DEFAULT_FANOUT = 3
#: Seconds the double stays down in the outage scenario (the issue asks for 5 to 10).
OUTAGE_SECONDS = 6.0
#: Longest a scenario waits for one release (fallbacks after a crash take a session TTL x 2).
RELEASE_TIMEOUT = 240.0
#: Longest a scenario waits for the workers of its apps to end after the release.
SETTLE_TIMEOUT = 90.0
POLL_SECONDS = 0.3
HTTP_TIMEOUT = 30.0
#: command_timeout of the app whose injected command hangs.
HANG_TIMEOUT = 3
#: The hung command: a sleep of a length nothing else uses, so leftovers can be found.
HANG_SECONDS = 987
HOSTILE_VERSION = "1;touch${IFS}PWNED;$(touch${IFS}PWNED2)"
#: The failure budget of the budget scenario: its first failure is past it.
MAX_FAIL_PERCENTAGE = 1.0


class ChaosError(Exception):
    """The suite cannot go on, or a scenario step did not happen in time; the message says which."""


# --- the apps' commands ----------------------------------------------------------------


def run_log(app: str) -> str:
    """The file in a node's directory where each run of ``app``'s commands leaves a line."""
    return f"runs-{app}.log"


def _in_node(nodes_dir: Path, command: str) -> str:
    return f"cd {shlex.quote(str(nodes_dir))}/{{{{ node }}}} && {command}"


def _record() -> str:
    return "printf '%s %s\\n' {{ version }} {{ remote.name }} >> runs-{{ app }}.log"


def pull_command(nodes_dir: Path, seconds: float) -> str:
    """The pull of every app: takes ``seconds``, then logs the run."""
    return _in_node(nodes_dir, f"sleep {seconds:g} && {_record()}")


def source_checked_command(nodes_dir: Path, seconds: float) -> str:
    """A pull that fails when its source has crashed, before or during the transfer."""
    alive = "test ! -e ../{{ remote.name }}/crashed"
    return _in_node(nodes_dir, f"{alive} && sleep {seconds:g} && {alive} && {_record()}")


def started_marker(app: str) -> str:
    """The file the failing step of ``app`` leaves in a node's directory when it runs."""
    return f"started-{app}"


def injected_failure_command(nodes_dir: Path) -> str:
    """Fails on the nodes whose directory holds ``inject-fail-<app>``. When that file names
    a node, the failure waits until that node's own step has left ``started-<app>`` (at
    most 30 s), so that it comes only after that node has begun its pull."""
    marker = started_marker("{{ app }}")
    inject = "inject-fail-{{ app }}"
    return _in_node(
        nodes_dir,
        f"touch {marker} && if [ -e {inject} ]; then if [ -s {inject} ]; then m=../$(cat {inject})/{marker}; "
        "timeout 30 sh -c 'until [ -e \"$0\" ]; do sleep 0.05; done' \"$m\"; fi; "
        "echo injected failure >&2; exit 3; fi",
    )


def injected_hang_command(nodes_dir: Path) -> str:
    """Hangs on the nodes whose directory holds ``inject-hang-<app>``."""
    return _in_node(nodes_dir, f"if [ -e inject-hang-{{{{ app }}}} ]; then sleep {HANG_SECONDS}; fi")


def chaos_apps(nodes_dir: Path) -> dict[str, dict[str, Any]]:
    """Every scenario's apps, as the role's ``fireap_node_apps``."""
    pull = {name: {"exec_commands": [pull_command(nodes_dir, seconds)]} for name, seconds in (
        ("crash", 3), ("outage", 1), ("replay", 0.3), ("twin-a", 0.3), ("twin-b", 0.3), ("race", 0.3),
        ("race-other", 0.3), ("input", 0.2), ("access", 0.2), ("missed", 0.3))}
    failing = [injected_failure_command(nodes_dir), pull_command(nodes_dir, 0.3)]
    return {
        **pull,
        "source": {"exec_commands": [source_checked_command(nodes_dir, 2)]},
        "fail-abort": {"exec_commands": failing, "on_command_failure": "abort"},
        "fail-ignore": {"exec_commands": failing, "on_command_failure": "ignore"},
        "hang": {"exec_commands": [injected_hang_command(nodes_dir), pull_command(nodes_dir, 0.3)],
                 "command_timeout": HANG_TIMEOUT},
        "budget": {"exec_commands": [injected_failure_command(nodes_dir), pull_command(nodes_dir, 2)]},
    }


# --- processes ----------------------------------------------------------------------------


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _proc_parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def worker_pids(config_path: Path, app: str | None = None) -> list[int]:
    """The pids of the fireap-reap workers started for the node of ``config_path`` (of ``app``)."""
    config = str(config_path)
    found = []
    for pid in _pids():
        argv = _proc_cmdline(pid)
        if "--worker" not in argv or config not in argv:
            continue
        if app is None or argv[argv.index("--worker") + 1:][:1] == [app]:
            found.append(pid)
    return found


def kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and every process below it (its commands run in sessions of their own).

    Each process is stopped before its children are looked up, so none can start another
    between the look-up and the kill: a command forked meanwhile would run on, orphaned.
    """
    victims, pending = [], [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(current, signal.SIGSTOP)
        victims.append(current)
        pending.extend(other for other in _pids() if _proc_parent(other) == current)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return len(victims)


def hung_commands() -> list[int]:
    """Processes of the injected hang still alive."""
    return [pid for pid in _pids() if _proc_cmdline(pid) == ["sleep", str(HANG_SECONDS)]]


# --- the cluster ----------------------------------------------------------------------------


class ChaosCluster:
    """N nodes with fireap installed on each, ACLs on, state in a data dir; close() stops all."""

    def __init__(self, nodes: int, fanout: int, workdir: Path) -> None:
        if nodes < 8:
            raise ChaosError(f"the scenarios need at least 8 nodes, got {nodes}")
        try:
            self.workdir = fresh_workdir(workdir, MARKER, "the chaos suite")
        except ValueError as err:
            raise ChaosError(str(err)) from None
        self.fanout = fanout
        self.token = str(uuid.uuid4())
        self.schema = Schema()
        # Ports fixed at the first start: killed and started again, the double comes back where it was.
        self.process = ServeProcess(nodes, self.workdir, acl_token=self.token, data_dir=self.workdir / "data",
                                    new_session=True)
        self.http = requests.Session()
        self.http.headers["X-Consul-Token"] = self.token
        self._clients: list = []
        info_ = self.serve()
        try:
            self.nodes = {node["name"]: node for node in info_["nodes"]}
            self.names = list(self.nodes)
            self.leader = self.names[0]
            self.nodes_dir = Path(self.nodes[self.leader]["root"]).parent
            self.install()
        except BaseException:
            self.close()
            raise

    # -- installation -----------------------------------------------------------------

    def install(self) -> None:
        """What the fireap_node role puts on each node, from the inventory's role variables,
        then an agent reload (whose watch start runs the handler once, as after the role)."""
        inventory = yaml.safe_load((self.workdir / INVENTORY_FILE).read_text())["all"]
        common = inventory["vars"]
        apps = chaos_apps(self.nodes_dir)
        for name, host in inventory["children"]["fireap_nodes"]["hosts"].items():
            config_path = self.config_path(name)
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config = {
                "consul": {"host": common["fireap_node_consul_host"], "port": host["fireap_node_consul_port"],
                           "token": self.token},
                "kv_prefix": self.schema.prefix,
                "state_dir": host["fireap_node_state_dir"],
                "log_file": f"{host['fireap_node_log_dir']}/reap.log",
                "defaults": {"max_semaphores": self.fanout, "watch_timeout": RELEASE_TIMEOUT, "command_timeout": 60},
                "apps": apps,
            }
            write_atomic(str(config_path), yaml.safe_dump(config, sort_keys=False, width=4096).encode(), 0o600)
            load_config(str(config_path))
            watch = {"type": "event", "name": EVENT_NAME, "args": handler_command(str(config_path)),
                     "token": self.token}
            write_atomic(str(Path(host["fireap_node_consul_config_dir"]) / "fireap.json"),
                         json.dumps({"watches": [watch]}, indent=2).encode(), 0o600)
        for name in self.names:
            self.agent_request("PUT", name, "/v1/agent/reload")

    def config_path(self, name: str) -> Path:
        return self.root(name) / "etc" / "fireap" / "config.yml"

    def root(self, name: str) -> Path:
        return Path(self.nodes[name]["root"])

    def reap_log(self, name: str) -> Path:
        return self.root(name) / "var" / "log" / "fireap" / "reap.log"

    # -- Consul ---------------------------------------------------------------------------

    def options(self, name: str | None = None, token: str | None = "") -> ConsulOptions:
        """Connection options for ``name``'s agent (default the leader's); token "" = the cluster's."""
        node = self.nodes[name or self.leader]
        return ConsulOptions(host=node["address"], port=node["http_port"], timeout=HTTP_TIMEOUT,
                             token=self.token if token == "" else token)

    def client(self, name: str | None = None, token: str | None = ""):
        client = build_client(self.options(name, token))
        self._clients.append(client)
        return client

    def agent_request(self, method: str, name: str, path: str, **kwargs) -> requests.Response:
        node = self.nodes[name]
        response = self.http.request(method, f"http://{node['address']}:{node['http_port']}{path}",
                                     timeout=HTTP_TIMEOUT, **kwargs)
        if response.status_code != 200:
            raise ChaosError(f"{method} {path} on {name}: {response.status_code} {response.text.strip()}")
        return response

    def stop_agent(self, name: str) -> None:
        """Crash-stop ``name``'s agent (sent to the leader's port: a stopped port refuses)."""
        self.agent_request("PUT", self.leader, f"/_devcluster/agents/{name}/stop")

    def start_agent(self, name: str) -> None:
        self.agent_request("PUT", self.leader, f"/_devcluster/agents/{name}/start")

    def fire_event(self, payload: bytes, nodes: list[str] | None = None) -> list[str]:
        """FIREAP:TASK events carrying ``payload`` (to exactly ``nodes`` when given); their IDs."""
        client = self.client()
        if nodes is None:
            return [client.event.fire(EVENT_NAME, payload)["ID"]]
        budget = EVENT_SIZE_LIMIT - EVENT_OVERHEAD - len(payload)
        return [client.event.fire(EVENT_NAME, payload, node=pattern)["ID"]
                for pattern in anchored_node_filters(nodes, budget)]

    def serve(self) -> dict:
        """Start the double; its cluster.json."""
        try:
            return self.process.start()
        except ServeError as err:
            raise ChaosError(str(err)) from None

    def outage(self, seconds: float) -> None:
        """Kill the whole double (servers and agents), keep it down, start it on the same data dir."""
        self.process.kill()
        time.sleep(seconds)
        self.serve()

    def run_handler(self, name: str, stdin: str, config: Path | None = None) -> subprocess.CompletedProcess:
        """Run the node's fireap-reap by hand as its watch does, with ``stdin`` as the event array."""
        return subprocess.run(handler_command(str(config or self.config_path(name))), input=stdin, text=True,
                              capture_output=True, timeout=HTTP_TIMEOUT, check=False)

    def close(self) -> None:
        for client in self._clients:
            client.http.close()
        self._clients = []
        self.http.close()
        for name in getattr(self, "names", ()):
            for pid in worker_pids(self.config_path(name)):
                kill_tree(pid)
        self.process.stop()

    def __enter__(self) -> ChaosCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- observing a scenario ---------------------------------------------------------------------


@dataclass
class Outcome:
    """One scenario's figures (see the module docstring)."""

    scenario: str
    nodes: int
    faults: int
    fault: str
    survivors: int = 0
    survivors_done: int = 0
    leaked_slots: int = 0
    duplicate_runs: int = 0
    lost_records: int = 0
    seconds: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.survivors_done == self.survivors and self.leaked_slots == 0 and self.duplicate_runs == 0
                and self.lost_records == 0 and not self.problems)

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok)


@dataclass(frozen=True)
class View:
    """A node record and whether a session holds it."""

    state: NodeState | None
    held: bool


class Probe:
    """Reads what one scenario needs from KV and the nodes' run logs."""

    def __init__(self, cluster: ChaosCluster) -> None:
        self.cluster = cluster
        self.client = cluster.client()
        self.schema = cluster.schema
        self.snapshots: list[dict[str, tuple[int, bytes | None]]] = []

    def fire(self, app: str, version: str, **kwargs) -> dict:
        return fire(self.client, self.schema, app, version=version, fanout=self.cluster.fanout,
                    holder="chaos", **kwargs)

    def views(self, app: str) -> dict[str, View]:
        _index, entries = self.client.kv.get(self.schema.nodes_prefix(app), recurse=True)
        views = {}
        for entry in entries or ():
            try:
                state = NodeState.from_json(entry["Value"], entry["Key"])
            except (KVRecordError, ValueError):
                state = None
            views[self.schema.node_name(app, entry["Key"])] = View(state, bool(entry.get("Session")))
        return views

    def held_slots(self, app: str) -> list[str]:
        _index, entries = self.client.kv.get(self.schema.app_prefix(app) + "slots/", recurse=True)
        return [entry["Key"] for entry in entries or () if entry.get("Session")]

    def runs(self, app: str, name: str) -> Counter:
        """How often ``name`` ran ``app``'s commands to the end, per version."""
        try:
            lines = (self.cluster.root(name) / run_log(app)).read_text().splitlines()
        except FileNotFoundError:
            return Counter()
        return Counter(line.split(" ", 1)[0] for line in lines if line)

    def snapshot(self, prefix: str) -> None:
        """Remember every record under ``prefix`` (slots and locks come and go: not kept)."""
        _index, entries = self.client.kv.get(prefix, recurse=True)
        self.snapshots.append({
            entry["Key"]: (entry["ModifyIndex"], entry["Value"]) for entry in entries or ()
            if "/slots/" not in entry["Key"] and not entry["Key"].endswith("/lock")
        })

    def lost_records(self) -> list[str]:
        """Records of an earlier snapshot that are missing or older in a later one, and done
        records that are no longer done at their version."""
        lost = []
        for earlier, later in zip(self.snapshots, self.snapshots[1:]):
            for key, (index, value) in earlier.items():
                if key not in later:
                    lost.append(f"{key} is missing")
                    continue
                if later[key][0] < index:
                    lost.append(f"{key} went back from index {index} to {later[key][0]}")
                elif "/nodes/" in key:
                    before, after = _state(value), _state(later[key][1])
                    if before is not None and before.status == NODE_DONE and not (after and after.has(before.version)):
                        lost.append(f"{key} was done at {before.version}, then not")
        return lost

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = RELEASE_TIMEOUT):
        return wait_until(predicate, timeout, what, POLL_SECONDS, ChaosError)

    def settled(self, apps: list[str], timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until no worker of ``apps`` runs any more on any node."""
        configs = [self.cluster.config_path(name) for name in self.cluster.names]
        self.wait(f"the workers of {', '.join(apps)} to end",
                  lambda: not any(worker_pids(config, app) for config in configs for app in apps), timeout)

    def finished(self, app: str, names: list[str], version: str) -> Callable[[], bool]:
        """A predicate: every node of ``names`` is done at ``version`` or failed in the current run."""
        def check() -> bool:
            views = self.views(app)
            return all(_terminal(views.get(name), version) for name in names)
        return check

    def measure(self, outcome: Outcome, releases: list[tuple[str, str, list[str], set[str]]]) -> Outcome:
        """Fill the common figures in: ``releases`` = (app, version, targets, faulted targets) each."""
        outcome.survivors = outcome.survivors_done = 0
        for app, version, targets, faulted in releases:
            views = self.views(app)
            for name in targets:
                view = views.get(name)
                done = view is not None and view.state is not None and view.state.has(version)
                if name not in faulted:
                    outcome.survivors += 1
                    outcome.survivors_done += done
                runs = self.runs(app, name)
                outcome.duplicate_runs += sum(count - 1 for count in runs.values() if count > 1)
                if done and name != self.cluster.leader and not runs[version] and view.state.source:
                    outcome.problems.append(f"{name} is recorded done at {app} {version} without a run of its commands")
            outcome.leaked_slots += len(self.held_slots(app))
        lost = self.lost_records()
        outcome.lost_records = len(lost)
        if lost:
            outcome.facts["lost"] = lost[:10]
        return outcome


def _state(value: bytes | None) -> NodeState | None:
    try:
        return NodeState.from_json(value)
    except (KVRecordError, ValueError):
        return None


def _done(view: View | None, version: str) -> bool:
    return view is not None and view.state is not None and view.state.has(version)


def _terminal(view: View | None, version: str) -> bool:
    if view is None or view.state is None:
        return False
    return view.state.has(version) or (view.state.version == version and view.state.status == NODE_FAILED)


def _status(view: View | None, run_id: str) -> str:
    if view is None or view.state is None or view.state.run_id != run_id:
        return "pending"
    held = " (held)" if view.held else ""
    return view.state.status + held


# --- the scenarios ----------------------------------------------------------------------------


def puller_crash(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "crash", "1"
    fired = probe.fire(app, version)
    targets, run_id = fired["targets"], fired["run_id"]
    count = max(1, (len(targets) - 1) // 10)
    outcome = Outcome("puller_crash", len(targets), count, f"kill -9 of {count} workers (and their commands) mid-pull")

    def pulling() -> list[str] | None:
        views = probe.views(app)
        ready = [name for name, view in views.items()
                 if view.held and view.state is not None and view.state.run_id == run_id
                 and view.state.status == NODE_PULLING and not probe.runs(app, name)[version]
                 and worker_pids(cluster.config_path(name), app)]
        return ready[:count] if len(ready) >= count else None

    killed = probe.wait(f"{count} nodes pulling {app}", pulling)
    for name in killed:
        for pid in worker_pids(cluster.config_path(name), app):
            kill_tree(pid)
    probe.snapshot(cluster.schema.app_prefix(app))
    others = [name for name in targets if name not in killed]
    probe.wait(f"the {len(others)} other nodes to finish", probe.finished(app, others, version))
    views = probe.views(app)
    if any(_done(views.get(name), version) for name in killed):
        outcome.problems.append("a killed node is recorded done")
    # The killed workers' sessions end after 2 x TTL; then their slots and records are free.
    probe.wait("the killed workers' sessions to end", lambda: not any(probe.views(app)[name].held for name in killed))
    views = probe.views(app)
    reported = {row["node"]: row["status"] for row in info(probe.client, cluster.schema, app)["nodes"]}
    outcome.facts["killed"] = {name: {"record": _status(views.get(name), run_id), "reported": reported[name]}
                               for name in killed}
    # What fireap_wait does after straggler_retry_after: fire again to the targets reported pending.
    stragglers = retry_stragglers(probe.client, cluster.schema, app, version)["stragglers"]
    outcome.facts["refired_to"] = stragglers
    if set(killed) - set(stragglers):
        left_out = sorted(set(killed) - set(stragglers))
        outcome.problems.append(f"the re-fire to stragglers left out the killed nodes {left_out} "
                                f"(reported {[reported[name] for name in left_out]})")
    else:
        probe.wait("the re-fired nodes to finish", probe.finished(app, targets, version))
    views = probe.views(app)
    outcome.facts["refired_done"] = sum(_done(views.get(name), version) for name in killed)
    probe.settled([app])
    probe.snapshot(cluster.schema.app_prefix(app))
    return probe.measure(outcome, [(app, version, targets, set())])


def source_crash(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "source", "1"
    fired = probe.fire(app, version)
    targets, run_id = fired["targets"], fired["run_id"]
    outcome = Outcome("source_crash", len(targets), 1, "a done source crashes (agent and processes) while serving")

    def serving() -> str | None:
        views = probe.views(app)
        sources = Counter(key.split("/")[-2] for key in probe.held_slots(app))
        busy = [name for name, _count in sources.most_common() if name != cluster.leader
                and views.get(name) is not None and views[name].state is not None and views[name].state.has(version)]
        return busy[0] if busy else None

    victim = probe.wait("a source other than the leader serving pullers", serving)
    serving_pullers = sorted(name for name, view in probe.views(app).items()
                             if view.held and view.state and view.state.status == NODE_PULLING
                             and view.state.source == victim)
    # The agent first, then what it serves: a puller that finds the data gone finds the node down too.
    cluster.stop_agent(victim)
    (cluster.root(victim) / "crashed").touch()
    for pid in worker_pids(cluster.config_path(victim)):
        kill_tree(pid)
    probe.snapshot(cluster.schema.app_prefix(app))
    others = [name for name in targets if name != victim]
    try:
        probe.wait("every other node to finish", probe.finished(app, others, version))
    finally:
        cluster.start_agent(victim)
        (cluster.root(victim) / "crashed").unlink()
    views = probe.views(app)
    outcome.facts.update(
        crashed=victim,
        pullers_at_crash=serving_pullers,
        moved={name: views[name].state.source for name in serving_pullers if views[name].state.has(version)},
        failed={name: view.state.error for name, view in views.items()
                if view.state is not None and view.state.run_id == run_id and view.state.status == NODE_FAILED},
    )
    probe.settled([app])
    probe.snapshot(cluster.schema.app_prefix(app))
    return probe.measure(outcome, [(app, version, targets, {victim})])


def consul_outage(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "outage", "1"
    fired = probe.fire(app, version)
    targets = fired["targets"]
    outcome = Outcome("consul_outage", len(targets), 1,
                      f"kill -9 of the whole double for {OUTAGE_SECONDS:g}s, restarted on its data dir")
    third = len(targets) // 3

    def some_done() -> int:
        done = sum(1 for view in probe.views(app).values() if view.state is not None and view.state.has(version))
        return done if done >= third else 0

    outcome.facts["done_at_outage"] = probe.wait(f"{third} nodes done", some_done)
    probe.snapshot(cluster.schema.prefix)
    cluster.outage(OUTAGE_SECONDS)
    probe.snapshot(cluster.schema.prefix)
    probe.wait("every node to finish after the outage", probe.finished(app, targets, version))
    probe.settled([app])
    probe.snapshot(cluster.schema.prefix)
    outcome.facts["workers_that_retried"] = sum(
        1 for name in targets if "retrying in" in _read(cluster.reap_log(name)))
    return probe.measure(outcome, [(app, version, targets, set())])


def replays_and_duplicates(cluster: ChaosCluster, probe: Probe) -> Outcome:
    outcome = Outcome("replays_duplicates", len(cluster.names), 0,
                      "agent reloads replaying old events, one event twice, an older version's event after a newer, "
                      "two apps in one handler invocation")
    targets = probe.fire("replay", "1")["targets"]
    probe.wait("replay 1 everywhere", probe.finished("replay", targets, "1"))
    for name in cluster.names:
        cluster.agent_request("PUT", name, "/v1/agent/reload")
    outcome.faults += len(cluster.names)
    twice = cluster.names[1:3]
    for name in twice:
        events = cluster.agent_request("GET", name, "/v1/event/list", params={"name": EVENT_NAME}).json()
        done = cluster.run_handler(name, json.dumps(events + events))
        if done.returncode != 0:
            outcome.problems.append(f"the handler on {name} fed one event twice exited {done.returncode}")
    outcome.faults += len(twice)
    probe.fire("replay", "2")
    probe.wait("replay 2 everywhere", probe.finished("replay", targets, "2"))
    outcome.facts["old_event"] = cluster.fire_event(event_payload("replay", "1"))
    outcome.faults += 1
    first = probe.fire("twin-a", "1")
    second = probe.fire("twin-b", "1")
    for app in ("twin-a", "twin-b"):
        probe.wait(f"{app} everywhere", probe.finished(app, targets, "1"))
    name = cluster.names[-1]
    listed = cluster.agent_request("GET", name, "/v1/event/list", params={"name": EVENT_NAME}).json()
    events = [event for event in listed if event["ID"] in (first["event_id"], second["event_id"])]
    both = cluster.run_handler(name, json.dumps(events))
    outcome.facts["two_apps_one_invocation"] = {"events": len(events), "exit": both.returncode}
    outcome.faults += 1
    probe.settled(["replay", "twin-a", "twin-b"])
    views = probe.views("replay")
    outcome.facts["downgraded"] = sorted(n for n, v in views.items() if v.state is None or v.state.version != "2")
    if outcome.facts["downgraded"]:
        outcome.problems.append(f"nodes not at replay 2 after the old event: {outcome.facts['downgraded']}")
    return probe.measure(outcome, [("replay", "2", targets, set()), ("twin-a", "1", targets, set()),
                                   ("twin-b", "1", targets, set())])


def concurrent_fires(cluster: ChaosCluster, probe: Probe) -> Outcome:
    outcome = Outcome("concurrent_fires", len(cluster.names), 1,
                      "two fires of one app at once, a third app fired at the same time")
    calls = {"race 1": ("race", "1"), "race 2": ("race", "2"), "race-other 1": ("race-other", "1")}
    barrier = threading.Barrier(len(calls))
    results: dict[str, Any] = {}

    def fire_one(label: str, app: str, version: str) -> None:
        client = cluster.client()
        barrier.wait()
        try:
            results[label] = fire(client, cluster.schema, app, version=version, fanout=cluster.fanout, holder=label)
        except (ReleaseError, ValueError) as err:
            results[label] = err

    threads = [threading.Thread(target=fire_one, args=(label, *call)) for label, call in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [label for label in ("race 1", "race 2") if isinstance(results[label], dict)]
    losers = [str(results[label]) for label in ("race 1", "race 2") if not isinstance(results[label], dict)]
    outcome.facts.update(race_winners=winners, race_loser_messages=losers)
    if len(winners) != 1 or len(losers) != 1 or "locked" not in losers[0]:
        outcome.problems.append(f"expected one winner and one clear refusal, got {results}")
    if not isinstance(results["race-other 1"], dict):
        outcome.problems.append(f"the other app's fire failed: {results['race-other 1']}")
        return outcome
    releases = [("race-other", "1", results["race-other 1"]["targets"], set())]
    if winners:
        won = results[winners[0]]
        releases.append(("race", won["version"], won["targets"], set()))
    for app, version, targets, _faulted in releases:
        probe.wait(f"{app} {version} everywhere", probe.finished(app, targets, version))
    probe.settled(["race", "race-other"])
    return probe.measure(outcome, releases)


def bad_input(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app = "input"
    outcome = Outcome("bad_input", len(cluster.names), 0, "malformed events, configs and module arguments")
    probe.snapshot(cluster.schema.prefix)
    receivers = cluster.names[1:4]
    events = {
        "payload not JSON": b"not json",
        "payload not UTF-8": b"\xff\xfe\xfd",
        "payload not an object": b"[1,2]",
        "no version": b'{"app":"input"}',
        "unknown app": b'{"app":"unknown","version":"1"}',
        "app with ../": b'{"app":"../etc","version":"1"}',
        "app with a shell metacharacter": b'{"app":"in;put","version":"1"}',
        "version with a newline": b'{"app":"input","version":"1\\n2"}',
    }
    handled: dict[str, str] = {}
    for label, payload in events.items():
        event_ids = cluster.fire_event(payload, receivers)
        handled[label] = event_ids[0]
    too_large = event_payload(app, "9" * 120)
    try:
        cluster.fire_event(too_large, receivers)
        handled["payload over 100 bytes"] = "accepted by Consul"
    except Exception as err:  # py-consul raises its own exception for the 413
        handled["payload over 100 bytes"] = f"refused by Consul: {err}"[:160]
    stdin_inputs = {
        "stdin not JSON": "garbage",
        "stdin not an array": '{"ID": "x"}',
        "payload not base64": json.dumps([{"ID": "bad-base64", "Name": EVENT_NAME, "LTime": 1, "Payload": "!!!"}]),
    }
    stdin_results = {}
    for label, text in stdin_inputs.items():
        offset = len(_read(cluster.reap_log(receivers[0])))
        exit_code = cluster.run_handler(receivers[0], text).returncode
        warnings = [line for line in _read(cluster.reap_log(receivers[0]))[offset:].splitlines() if " WARNING " in line]
        stdin_results[label] = {"exit": exit_code, "log": warnings[0].split(": ", 1)[-1] if warnings else ""}
    probe.wait("the handlers to log the malformed events",
               lambda: all(event_id in _read(cluster.reap_log(receivers[-1]))
                           for label, event_id in handled.items() if label in events))
    log = _read(cluster.reap_log(receivers[-1]))
    outcome.facts["events"] = {label: _line_with(log, event_id) for label, event_id in handled.items()
                               if label in events}
    outcome.facts["events"]["payload over 100 bytes"] = handled["payload over 100 bytes"]
    outcome.facts["stdin"] = stdin_results
    outcome.facts["configs"] = bad_configs(cluster)
    outcome.facts["module_arguments"] = bad_arguments(probe)
    outcome.faults = len(events) + 1 + len(stdin_inputs) + len(outcome.facts["configs"]) + len(
        outcome.facts["module_arguments"])
    stdin_logs = {label: result["log"] for label, result in stdin_results.items()}
    for label, fact in {**outcome.facts["events"], **stdin_logs, **outcome.facts["configs"],
                        **outcome.facts["module_arguments"]}.items():
        if not fact or "accepted" in str(fact):
            outcome.problems.append(f"{label}: no clear error ({fact!r})")
    probe.snapshot(cluster.schema.prefix)
    targets = probe.fire(app, HOSTILE_VERSION)["targets"]
    probe.wait("the hostile version everywhere", probe.finished(app, targets, HOSTILE_VERSION))
    probe.settled([app])
    planted = sorted(str(path) for path in cluster.nodes_dir.glob("*/PWNED*"))
    outcome.facts["hostile_version"] = {"version": HOSTILE_VERSION, "files_planted": planted}
    if planted:
        outcome.problems.append(f"the hostile version ran as shell code: {planted}")
    return probe.measure(outcome, [(app, HOSTILE_VERSION, targets, set())])


def bad_configs(cluster: ChaosCluster) -> dict[str, str]:
    """`fireap-reap --check` and the handler itself on broken configs: each must exit 2 naming the problem."""
    base = yaml.safe_load(cluster.config_path(cluster.names[1]).read_text())
    app = dict(base["apps"]["input"])
    broken = {
        "wrong type": {**base, "apps": {"input": {**app, "max_semaphores": "five"}}},
        "unknown key": {**base, "apps": {"input": {**app, "exec_command": ["true"]}}},
        "quoted variable": {**base, "apps": {"input": {"exec_commands": ['echo "{{ version }}"']}}},
        "Jinja filter": {**base, "apps": {"input": {"exec_commands": ["echo {{ version | upper }}"]}}},
        "bad Consul port": {**base, "consul": {**base["consul"], "port": "eighty"}},
    }
    directory = cluster.workdir / "bad-configs"
    directory.mkdir(exist_ok=True)
    results = {}
    for label, config in broken.items():
        path = directory / (label.replace(" ", "-") + ".yml")
        write_atomic(str(path), yaml.safe_dump(config).encode(), 0o600)
        checked = subprocess.run([*handler_command(str(path)), "--check"], capture_output=True, text=True,
                                 timeout=HTTP_TIMEOUT, check=False)
        if checked.returncode == 2:
            results[label] = checked.stderr.strip().splitlines()[-1]
        else:
            results[label] = f"accepted: --check exited {checked.returncode}"
    # The handler itself, as the watch runs it, refuses a broken config the same way.
    handled = cluster.run_handler(cluster.names[1], "[]", config=path)
    results["handler run on a broken config"] = (handled.stderr.strip() if handled.returncode == 2
                                                 else f"accepted: exit {handled.returncode}")
    return results


def bad_arguments(probe: Probe) -> dict[str, str]:
    """The modules' logic refusing arguments out of range, before anything is written."""
    client, schema = probe.client, probe.schema
    calls = {
        "fanout 0": lambda: fire(client, schema, "input", version="1", fanout=0),
        "fanout 65": lambda: fire(client, schema, "input", version="1", fanout=65),
        "version with a space": lambda: fire(client, schema, "input", version="1 2"),
        "version of 200 characters": lambda: fire(client, schema, "input", version="9" * 200),
        "app with ../": lambda: fire(client, schema, "../input", version="1"),
        "tag without service": lambda: fire(client, schema, "input", version="1", tag="web"),
        "negative wait timeout": lambda: wait(client, schema, "input", "run", timeout=-1),
        "empty abort reason": lambda: clear(client, schema, "input", abort=True, reason=" "),
    }
    results = {}
    for label, call in calls.items():
        try:
            call()
            results[label] = "accepted"
        except (ReleaseError, ValueError) as err:
            results[label] = str(err)[:200]
    return results


def command_failures(cluster: ChaosCluster, probe: Probe) -> Outcome:
    outcome = Outcome("command_failures", len(cluster.names), 0,
                      "a failing command under abort and ignore, a hung command past its timeout")
    fired = {app: probe.fire(app, "1") for app in ("fail-abort", "fail-ignore", "hang")}
    targets = fired["hang"]["targets"]
    injected = [targets[1], targets[-1]]
    for app in fired:
        for name in injected:
            kind = "hang" if app == "hang" else "fail"
            (cluster.root(name) / f"inject-{kind}-{app}").touch()
    for app in fired:
        probe.wait(f"{app} to finish", probe.finished(app, targets, "1"))
    outcome.faults = len(injected) * len(fired)
    probe.settled(list(fired))
    errors = {}
    for app in fired:
        views = probe.views(app)
        errors[app] = {name: {"status": views[name].state.status, "error": views[name].state.error or "",
                              "ran_to_the_end": probe.runs(app, name)["1"],
                              "logged": _line_with(_read(cluster.reap_log(name)), f"app={app} ", "ERROR")}
                       for name in injected}
    outcome.facts.update(injected=injected, outcomes=errors, hung_left=hung_commands())
    # (status, text in the record's error, text in the node's log, runs to the end)
    expected = {"fail-abort": (NODE_FAILED, "exit status 3", "exit status 3", 0),
                "fail-ignore": (NODE_DONE, "", "exit status 3", 1),
                "hang": (NODE_FAILED, f"timed out after {HANG_TIMEOUT}s", f"timed out after {HANG_TIMEOUT}s", 0)}
    for app, (status, text, logged, ran) in expected.items():
        for name, seen in errors[app].items():
            if (seen["status"], seen["ran_to_the_end"]) != (status, ran) or text not in seen["error"] \
                    or logged not in seen["logged"]:
                outcome.problems.append(f"{app} on {name}: expected {status} with {text!r}, got {seen}")
    if outcome.facts["hung_left"]:
        outcome.problems.append(f"hung commands still running: {outcome.facts['hung_left']}")
    for app in fired:
        for name in injected:
            for marker in cluster.root(name).glob(f"inject-*-{app}"):
                marker.unlink()
    faulted = set(injected)
    return probe.measure(outcome, [("fail-abort", "1", targets, faulted), ("hang", "1", targets, faulted),
                                   ("fail-ignore", "1", targets, set())])


def access(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app = "access"
    outcome = Outcome("access", len(cluster.names), 3, "the handler and the modules without a token, or a wrong one")
    node = cluster.names[1]
    directory = cluster.workdir / "access"
    directory.mkdir(exist_ok=True)
    config = yaml.safe_load(cluster.config_path(node).read_text())
    config["consul"].pop("token")
    config.update(state_dir=str(directory / "state"), log_file=str(directory / "reap.log"))
    tokenless = directory / "config.yml"
    write_atomic(str(tokenless), yaml.safe_dump(config).encode(), 0o600)
    handler = cluster.run_handler(node, "[]", config=tokenless)
    messages = {"handler without a token": f"exit {handler.returncode}: "
                + _line_with(_read(directory / "reap.log"), "403")}
    wrong = str(uuid.uuid4())
    for label, token in (("module without a token", None), ("module with a wrong token", wrong)):
        options = cluster.options(token=token)
        try:
            with consul_errors(options, f"reading the release of {app}"):
                info(cluster.client(token=token), cluster.schema, app)
            messages[label] = "accepted"
        except FireapConsulError as err:
            messages[label] = str(err)
    outcome.facts["refusals"] = messages
    for label, message in messages.items():
        if "403" not in message:
            outcome.problems.append(f"{label}: no clear refusal ({message!r})")
        if wrong in message:
            outcome.problems.append(f"{label}: the token was shown in the message")
    targets = probe.fire(app, "1")["targets"]
    probe.wait("the release with the token", probe.finished(app, targets, "1"))
    probe.settled([app])
    holders, leaks = {}, []
    for directory_ in (cluster.workdir / "nodes", cluster.workdir / "agents", cluster.workdir / "access"):
        for path in directory_.rglob("*"):
            if path.is_file() and not path.is_symlink() and cluster.token.encode() in path.read_bytes():
                mode = path.stat().st_mode & 0o777
                holders[str(path.relative_to(cluster.workdir))] = oct(mode)
                if mode & 0o077 or path.name not in ("config.yml", "fireap.json"):
                    leaks.append(f"{path} ({oct(mode)})")
    outcome.facts.update(files_holding_the_token=len(holders), token_leaks=leaks)
    outcome.problems.extend(f"the token is readable in {leak}" for leak in leaks)
    return probe.measure(outcome, [(app, "1", targets, set())])


def missed_events(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "missed", "1"
    order = [name for name in cluster.names if name != cluster.leader]
    count = max(1, len(order) // 10)
    # The last nodes of the schedule: no node waits for them, so only they are late.
    stopped = order[-count:]
    outcome = Outcome("missed_events", len(cluster.names), count, f"{count} agents down while the event is fired")
    for name in stopped:
        cluster.stop_agent(name)
    try:
        fired = probe.fire(app, version)
        targets, run_id = fired["targets"], fired["run_id"]
        others = [name for name in targets if name not in stopped]
        probe.wait("the running nodes to finish", probe.finished(app, others, version))
        views = probe.views(app)
        outcome.facts["while_down"] = {name: _status(views.get(name), run_id) for name in stopped}
    finally:
        for name in stopped:
            cluster.start_agent(name)
    probe.wait("the restarted nodes to catch up", probe.finished(app, targets, version))
    probe.settled([app])
    outcome.facts["events_fired"] = 1
    outcome.facts["caught_up"] = sum(probe.views(app)[name].state.has(version) for name in stopped)
    return probe.measure(outcome, [(app, version, targets, set())])


def failure_budget(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "budget", "1"
    order = [name for name in cluster.names if name != cluster.leader]
    # All of the first stage but one: they fail before most nodes start, once the one left
    # has begun its pull (which it finishes: the survivor).
    injected = order[:max(1, cluster.fanout - 1)]
    survivor = order[len(injected)]
    for name in injected:
        (cluster.root(name) / f"inject-fail-{app}").write_text(survivor)
    outcome = Outcome("failure_budget", len(cluster.names), len(injected),
                      f"the first stage fails; max_fail_percentage {MAX_FAIL_PERCENTAGE:g}")
    fired = probe.fire(app, version)
    targets = fired["targets"]

    def over_budget() -> dict | None:
        progress = info(probe.client, cluster.schema, app)
        return progress if too_many_failures(progress, MAX_FAIL_PERCENTAGE) else None

    progress = probe.wait("the failures to pass the budget", over_budget)
    reason = (f"{progress['counts']['failed']} of {progress['total']} targets failed, "
              f"more than max_fail_percentage {MAX_FAIL_PERCENTAGE:g}%")
    clear(probe.client, cluster.schema, app, abort=True, reason=reason)
    # Started: the nodes whose commands had begun (their marker is there). A node that had
    # claimed a slot but not begun its commands stops at the abort, as it should.
    started = {name for name in targets if (cluster.root(name) / started_marker(app)).exists()} - {cluster.leader}
    not_started = [name for name in targets if name not in started and name != cluster.leader]
    probe.settled([app])
    for name in injected:
        (cluster.root(name) / f"inject-fail-{app}").unlink()
    for name in targets:
        (cluster.root(name) / started_marker(app)).unlink(missing_ok=True)
    final = probe.views(app)
    ran_after_abort = sorted(name for name in not_started if probe.runs(app, name)[version]
                             or (final.get(name) and final[name].state and final[name].state.status == NODE_DONE))
    report = info(probe.client, cluster.schema, app)
    outcome.facts.update(
        started_before_abort=len(started), not_started=len(not_started), started_after_abort=ran_after_abort,
        report={"status": report["status"], "reason": report["release"]["aborted_reason"],
                "counts": report["counts"]},
    )
    if ran_after_abort:
        outcome.problems.append(f"{len(ran_after_abort)} nodes started after the abort: {ran_after_abort}")
    if report["status"] != "aborted" or "max_fail_percentage" not in (report["release"]["aborted_reason"] or ""):
        outcome.problems.append(f"the report does not say why the run stopped: {report['release']}")
    # Survivors: the nodes whose commands had begun when the abort came, which finish; the rest stop.
    faulted = set(injected) | set(not_started) | {cluster.leader}
    return probe.measure(outcome, [(app, version, targets, faulted)])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _line_with(text: str, *needles: str) -> str:
    """The last log line holding every one of ``needles``, without its timestamp and process prefix."""
    for line in reversed(text.splitlines()):
        if all(needle in line for needle in needles):
            return line.split(": ", 1)[-1][:300]
    return ""


SCENARIOS: dict[str, Callable[[ChaosCluster, Probe], Outcome]] = {
    "puller_crash": puller_crash,
    "source_crash": source_crash,
    "consul_outage": consul_outage,
    "replays_duplicates": replays_and_duplicates,
    "concurrent_fires": concurrent_fires,
    "bad_input": bad_input,
    "command_failures": command_failures,
    "access": access,
    "missed_events": missed_events,
    "failure_budget": failure_budget,
}


def run_scenario(cluster: ChaosCluster, name: str) -> Outcome:
    """Run one scenario; a step that did not happen in time is a problem of its outcome."""
    probe = Probe(cluster)
    began = time.monotonic()
    try:
        outcome = SCENARIOS[name](cluster, probe)
    except (ChaosError, ReleaseError, FireapConsulError) as err:
        outcome = Outcome(name, len(cluster.names), 0, "(did not complete)", problems=[str(err)])
    outcome.seconds = round(time.monotonic() - began, 1)
    return outcome


# --- report and command line ------------------------------------------------------------------


COLUMNS = ("scenario", "nodes", "faults", "survivors", "survivors_done", "leaked_slots", "duplicate_runs",
           "lost_records", "seconds")


def table(outcomes: list[Outcome]) -> str:
    rows = [[*COLUMNS, "ok"]]
    for outcome in outcomes:
        data = outcome.to_json()
        rows.append([str(data[column]) for column in COLUMNS] + ["ok" if outcome.ok else "FAILED"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    for outcome in outcomes:
        lines.extend(f"  {outcome.scenario}: {problem}" for problem in outcome.problems)
    return "\n".join(lines)


def run_chaos(nodes: int, fanout: int, workdir: Path, names: list[str], json_path: Path | None) -> list[Outcome]:
    began = time.time()
    outcomes = []
    with ChaosCluster(nodes, fanout, workdir) as cluster:
        for name in names:
            outcome = run_scenario(cluster, name)
            print(f"chaos: {name}: {'ok' if outcome.ok else 'FAILED'} in {outcome.seconds:.1f}s", flush=True)
            outcomes.append(outcome)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        report = {"nodes": nodes, "fanout": fanout, "started": began, "seconds": round(time.time() - began, 1),
                  "ok": all(outcome.ok for outcome in outcomes),
                  "scenarios": [outcome.to_json() for outcome in outcomes]}
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster chaos",
        description="Inject faults into releases across a local dev cluster running the real node handler.",
    )
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help=f"cluster size (default {DEFAULT_NODES})")
    parser.add_argument("--fanout", type=int, default=DEFAULT_FANOUT, help=f"fan-out k (default {DEFAULT_FANOUT})")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "build" / "chaos" / "work",
                        help="the cluster's work directory (default build/chaos/work)")
    parser.add_argument("--json", type=Path, help="write the figures of every scenario to this file")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                        help="run only this scenario (repeatable; default all, in order)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 8:
        parser.error(f"--nodes must be at least 8, got {args.nodes}")
    if not 1 <= args.fanout <= 16:
        parser.error(f"--fanout must be from 1 to 16, got {args.fanout}")
    try:
        outcomes = run_chaos(args.nodes, args.fanout, args.workdir.absolute(), args.scenario or list(SCENARIOS),
                             args.json)
    except ChaosError as err:
        print(f"chaos: error: {err}", file=sys.stderr)
        return 1
    print(table(outcomes), flush=True)
    if args.json:
        print(f"chaos: figures in {args.json}", flush=True)
    return 0 if all(outcome.ok for outcome in outcomes) else 1
