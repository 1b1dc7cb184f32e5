"""The cluster the chaos scenarios run on: the double with fireap installed on every node.

The double runs as `python -m devcluster serve` in a process of its own (ServeProcess), with
ACLs on and a data dir, so that it can be killed and restarted with its state, and as unkind as
Consul (``Realism()``: late, reordered and lossy gossip, failure detection after memberlist's
suspicion timeout, missing keys that block, 1.22's transaction limit) unless told otherwise. Every node gets
what the ``fireap_node`` role installs, written directly from the inventory's role variables
(the role's own run takes minutes at this size): the task config with the Consul token (0600),
and the agent's watch on the FIREAP:TASK event running this tree's ``fireap-reap``. The first
SWARM_NODES nodes also take the swarm apps, each node on swarm ports of its own.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import requests
import yaml

from ansible_collections.fireap.consul.plugins.module_utils._connection import ConsulOptions, build_client
from ansible_collections.fireap.consul.plugins.module_utils._firing import (
    EVENT_NAME,
    EVENT_OVERHEAD,
    EVENT_SIZE_LIMIT,
    anchored_node_filters,
    read_adverts,
)
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.module_utils._processed_events import write_atomic
from ansible_collections.fireap.consul.plugins.module_utils._reap import handler_command
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import load_config

from ..consul import INVENTORY_FILE, Gossip, NodeInfo, Realism, ServeError, ServeProcess, find_free_port_range
from ..consul.workdir import fresh_workdir
from ..polling import wait_until
from .apps import SWARM_APPS, SWARM_NODES, chaos_apps, swarm_apps
from .processes import kill_tree, worker_pids

MARKER = ".fireap-chaos"
#: Longest a scenario waits for one release (fallbacks after a crash take a session TTL x 2).
RELEASE_TIMEOUT = 240.0
HTTP_TIMEOUT = 30.0
#: Seconds for every handler to advertise its apps after the reload.
ADVERT_TIMEOUT = 60.0


class ChaosError(Exception):
    """The suite cannot go on, or a scenario step did not happen in time; the message says which."""


class ChaosCluster:
    """N nodes with fireap installed on each, ACLs on, state in a data dir, the double as unkind
    as ``realism`` says (default Consul's); close() stops all."""

    def __init__(self, nodes: int, fanout: int, workdir: Path, realism: Realism | None = None) -> None:
        if nodes < 8:
            raise ChaosError(f"the scenarios need at least 8 nodes, got {nodes}")
        try:
            self.workdir = fresh_workdir(workdir, MARKER, "the chaos suite")
        except ValueError as err:
            raise ChaosError(str(err)) from None
        self.fanout = fanout
        self.token = str(uuid.uuid4())
        self.schema = Schema()
        #: The settings the double runs with, failure detection in seconds for this many nodes.
        self.realism = (realism or Realism()).for_nodes(nodes)
        # Ports fixed at the first start: killed and started again, the double comes back where it was.
        self.double = ServeProcess(nodes, self.workdir, acl_token=self.token, data_dir=self.workdir / "data",
                                   new_session=True, realism=self.realism)
        self.http = requests.Session()
        self.http.headers["X-Consul-Token"] = self.token
        self._clients: list = []
        self.serve()
        try:
            self.nodes: dict[str, NodeInfo] = {node.name: node for node in self.double.nodes}
            self.names = list(self.nodes)
            self.leader = self.names[0]
            self.nodes_dir = self.nodes[self.leader].root.parent
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
        # The swarm apps' nodes share 127.0.0.1: each node's swarm of each app has a port of its own.
        swarm_nodes = self.names[:SWARM_NODES]
        base = find_free_port_range(len(swarm_nodes) * len(SWARM_APPS))
        ports = {name: {app: base + index * len(SWARM_APPS) + offset for offset, app in enumerate(SWARM_APPS)}
                 for index, name in enumerate(swarm_nodes)}
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
                "apps": {**apps, **(swarm_apps(self.nodes_dir, name, ports[name]) if name in ports else {})},
            }
            write_atomic(str(config_path), yaml.safe_dump(config, sort_keys=False, width=4096).encode(), 0o600)
            load_config(str(config_path))
            watch = {"type": "event", "name": EVENT_NAME, "args": handler_command(str(config_path)),
                     "token": self.token}
            write_atomic(str(Path(host["fireap_node_consul_config_dir"]) / "fireap.json"),
                         json.dumps({"watches": [watch]}, indent=2).encode(), 0o600)
        for name in self.names:
            self.agent_request("PUT", name, "/v1/agent/reload")
        # The reload runs each node's handler, which advertises the node's apps; a fire before
        # every advert is in would leave the slower nodes out of the targets.
        client = self.client()
        wait_until(lambda: len(read_adverts(client, self.schema)[0]) >= len(self.names), ADVERT_TIMEOUT,
                   "every node's advert of its apps", error=ChaosError)

    def config_path(self, name: str) -> Path:
        return self.root(name) / "etc" / "fireap" / "config.yml"

    def root(self, name: str) -> Path:
        return self.nodes[name].root

    def reap_log(self, name: str) -> Path:
        return self.root(name) / "var" / "log" / "fireap" / "reap.log"

    # -- Consul ---------------------------------------------------------------------------

    def options(self, name: str | None = None, token: str | None = "") -> ConsulOptions:
        """Connection options for ``name``'s agent (default the leader's); token "" = the cluster's."""
        node = self.nodes[name or self.leader]
        return ConsulOptions(host=node.host, port=node.port, timeout=HTTP_TIMEOUT,
                             token=self.token if token == "" else token)

    def client(self, name: str | None = None, token: str | None = ""):
        client = build_client(self.options(name, token))
        self._clients.append(client)
        return client

    def agent_request(self, method: str, name: str, path: str, **kwargs) -> requests.Response:
        response = self.http.request(method, f"{self.nodes[name].base_url}{path}", timeout=HTTP_TIMEOUT, **kwargs)
        if response.status_code != 200:
            raise ChaosError(f"{method} {path} on {name}: {response.status_code} {response.text.strip()}")
        return response

    def stop_agent(self, name: str) -> None:
        """Crash-stop ``name``'s agent (sent to the leader's port: a stopped port refuses)."""
        try:
            self.double.stop_agent(name)
        except ServeError as err:
            raise ChaosError(str(err)) from None

    def leave_agent(self, name: str) -> None:
        """``name``'s agent leaves the cluster: stopped, its node deregistered at once."""
        try:
            self.double.leave_agent(name)
        except ServeError as err:
            raise ChaosError(str(err)) from None

    def start_agent(self, name: str) -> None:
        try:
            self.double.start_agent(name)
        except ServeError as err:
            raise ChaosError(str(err)) from None

    def set_gossip(self, names: list[str], gossip: Gossip | None = None) -> None:
        """How events reach the agents of ``names`` from now on (None: as the double's settings say)."""
        try:
            for name in names:
                self.double.set_gossip(name, gossip or self.realism.gossip)
        except ServeError as err:
            raise ChaosError(str(err)) from None

    def restart(self, realism: Realism) -> None:
        """Stop the double and start it again on its data dir with other settings (the nodes'
        agents come back with empty event rings; their watches run their handlers once)."""
        self.double.stop()
        self.realism = self.double.realism = realism.for_nodes(len(self.names))
        self.serve()

    def fire_event(self, payload: bytes, nodes: list[str] | None = None) -> list[str]:
        """FIREAP:TASK events carrying ``payload`` (to exactly ``nodes`` when given); their IDs."""
        client = self.client()
        if nodes is None:
            return [client.event.fire(EVENT_NAME, payload)["ID"]]
        budget = EVENT_SIZE_LIMIT - EVENT_OVERHEAD - len(payload)
        return [client.event.fire(EVENT_NAME, payload, node=pattern)["ID"]
                for pattern in anchored_node_filters(nodes, budget)]

    def serve(self) -> None:
        """Start the double (again, after an outage: same ports, same data dir)."""
        try:
            self.double.start()
        except ServeError as err:
            raise ChaosError(str(err)) from None

    def outage(self, seconds: float) -> None:
        """Kill the whole double (servers and agents), keep it down, start it on the same data dir."""
        self.double.kill()
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
        self.double.stop()

    def __enter__(self) -> ChaosCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
