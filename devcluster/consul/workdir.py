"""The files a running cluster publishes in its workdir for the tools that use it.

DIR/cluster.json                 nodes, ports, dirs (written once every port listens)
DIR/inventory.yml                Ansible inventory: groups fireap_nodes (with the fireap_node role's
                                 variables for a simulated node) and fireap_leader
DIR/agents/<name>/config/        the agent's config dir (watch definitions, services)
DIR/agents/<name>/agent.log      the agent's log, watch handler output included
DIR/nodes/<name>/                a directory the node owns (its app files)
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CLUSTER_FILE = "cluster.json"
INVENTORY_FILE = "inventory.yml"


@dataclass(frozen=True)
class NodeInfo:
    """One node as clients see it: where its agent answers Consul's HTTP API (``host``, ``port``,
    ``scheme``, named as in the collection's connection options) and, on the double, the
    directories it owns. A real Consul agent has no ``config_dir``, ``root`` or ``log_path`` here.

    In ``cluster.json`` a node is ``{name, address, http_port, http_addr, config_dir, root}``
    (``to_json``, ``from_json``): ``address`` is ``host`` there, ``http_port`` is ``port``.
    """

    name: str
    host: str
    port: int
    scheme: str = "http"
    config_dir: Path | None = None
    root: Path | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.host,
            "http_port": self.port,
            "http_addr": f"{self.host}:{self.port}",
            "config_dir": str(self.config_dir),
            "root": str(self.root),
        }

    @classmethod
    def from_json(cls, node: dict[str, Any], scheme: str = "http") -> NodeInfo:
        """A node of ``cluster.json``; its agent's log is ``agent.log`` next to its config dir."""
        config_dir = Path(node["config_dir"])
        return cls(
            name=node["name"],
            host=node["address"],
            port=int(node["http_port"]),
            scheme=scheme,
            config_dir=config_dir,
            root=Path(node["root"]),
            log_path=config_dir.parent / "agent.log",
        )


def read_nodes(workdir: Path, scheme: str = "http") -> list[NodeInfo]:
    """The nodes a running double published in ``workdir/cluster.json``."""
    cluster = json.loads((Path(workdir) / CLUSTER_FILE).read_text())
    return [NodeInfo.from_json(node, scheme) for node in cluster["nodes"]]


def node_names(count: int) -> list[str]:
    """node-000 .. node-NNN, zero-padded to at least 3 digits so all names have one width."""
    width = max(3, len(str(count - 1)))
    return [f"node-{i:0{width}d}" for i in range(count)]


def plan_nodes(workdir: Path, count: int, http_port: int, host: str, scheme: str = "http") -> list[NodeInfo]:
    workdir = workdir.absolute()
    return [
        NodeInfo(
            name=name,
            host=host,
            port=http_port + i,
            scheme=scheme,
            config_dir=workdir / "agents" / name / "config",
            root=workdir / "nodes" / name,
            log_path=workdir / "agents" / name / "agent.log",
        )
        for i, name in enumerate(node_names(count))
    ]


def prepare_dirs(workdir: Path, nodes: list[NodeInfo]) -> None:
    """Create the per-node dirs and drop files a previous run published."""
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in (CLUSTER_FILE, INVENTORY_FILE):
        (workdir / stale).unlink(missing_ok=True)
    for node in nodes:
        node.config_dir.mkdir(parents=True, exist_ok=True)
        (node.root / "etc" / "logrotate.d").mkdir(parents=True, exist_ok=True)


def write_cluster_files(
    workdir: Path,
    datacenter: str,
    http_port: int,
    nodes: list[NodeInfo],
    acl_token: str | None,
    data_dir: Path | None,
) -> None:
    """Publish inventory.yml (owner-only when it carries the ACL token), then cluster.json last:
    waiters poll for cluster.json."""
    _atomic_write(workdir / INVENTORY_FILE, yaml.safe_dump(_inventory(nodes, acl_token), sort_keys=False),
                  0o600 if acl_token else 0o644)
    cluster = {
        "datacenter": datacenter,
        "http_port_base": http_port,
        "acl": bool(acl_token),
        "data_dir": str(data_dir.absolute()) if data_dir is not None else None,
        "nodes": [node.to_json() for node in nodes],
    }
    _atomic_write(workdir / CLUSTER_FILE, json.dumps(cluster, indent=2) + "\n")


def _inventory(nodes: list[NodeInfo], acl_token: str | None) -> dict[str, Any]:
    """The nodes as Ansible hosts, with the fireap_node role's variables for a simulated node.

    Every path a real host keeps under / lives under the node's own root here, and the
    handler runs with this venv's interpreter (no per-node venv, no downloads).
    """
    variables: dict[str, Any] = {
        "ansible_connection": "local",
        # The venv's interpreter as invoked: resolving the symlink would leave the venv.
        "ansible_python_interpreter": os.path.abspath(sys.executable),
        "fireap_node_python": os.path.abspath(sys.executable),
        "fireap_node_user": pwd.getpwuid(os.getuid()).pw_name,
        "fireap_node_group": grp.getgrgid(os.getgid()).gr_name,
        "fireap_node_consul_host": nodes[0].host,
    }
    if acl_token:
        variables["fireap_node_consul_token"] = acl_token
    hosts = {
        node.name: {
            "fireap_node_root": str(node.root),
            "fireap_node_consul_port": node.port,
            "fireap_node_consul_config_dir": str(node.config_dir),
            "fireap_node_prefix": str(node.root / "opt" / "fireap"),
            "fireap_node_config_dir": str(node.root / "etc" / "fireap"),
            "fireap_node_state_dir": str(node.root / "var" / "lib" / "fireap"),
            "fireap_node_log_dir": str(node.root / "var" / "log" / "fireap"),
            "fireap_node_logrotate_dir": str(node.root / "etc" / "logrotate.d"),
        }
        for node in nodes
    }
    return {
        "all": {
            "vars": variables,
            "children": {
                "fireap_nodes": {"hosts": hosts},
                "fireap_leader": {"hosts": {nodes[0].name: None}},
            },
        }
    }


def fresh_workdir(path: Path, marker: str, owner: str) -> Path:
    """Create ``path`` empty for a tool (demo, benchmark) that marks its dirs with ``marker``.

    A directory an earlier run of that tool left is emptied; any other non-empty one is
    refused with ValueError, so a mistyped path never loses someone's files.
    """
    path = path.absolute()
    if path.exists() and any(path.iterdir()):
        if not (path / marker).exists():
            raise ValueError(f"{path} is not empty and was not made by {owner}; choose another work directory")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text(f"made by {owner}; emptied by its next run\n")
    return path


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to a temporary file created with ``mode``, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(tmp, path)
