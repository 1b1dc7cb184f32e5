"""A running double, however it runs: what DevCluster and ServeProcess both offer.

DevCluster (embedded.py) serves the double from a thread of this process; ServeProcess
(serve_process.py) runs ``python -m devcluster serve`` as a child process, which can be killed
as a crash would and started again on the same ports. They are the two ways to start it;
everything else (the demo, the benchmark, the chaos suite, the tests' harness) uses one of them.

    with DevCluster(20, workdir) as double:      # or ServeProcess(20, workdir): the same calls
        node = double.nodes[3]                    # NodeInfo(name, host, port, scheme, config_dir, root, log_path)
        double.stop_agent("node-003")             # or an index; start_agent(), is_running()
        double.leave_agent("node-004")            # a clean leave: deregistered at once
        double.set_address("node-005", "10.0.0.6")  # its catalog address (an advertise address)
        double.stats()                            # per-agent HTTP counters; reset_stats()

It is as unkind as Consul by default (realism.py); ``realism=Realism.kind()`` gives the double's
older, deterministic behaviour to a test that needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .ports import find_free_port_range
from .realism import Gossip, Realism
from .workdir import INVENTORY_FILE, NodeInfo

#: How a double runs: in a thread of this process, or as a child process of its own.
EMBEDDED = "embedded"
SUBPROCESS = "subprocess"

D = TypeVar("D", bound="Double")


class Double:
    """Started with ``start()`` (which returns the double) or ``with``; ``stop()`` ends it.

    Both ways take the same settings: ``nodes`` agents publishing to ``workdir``, node k on
    ``http_port + k`` (None: a free port range taken at the first start and kept), default-deny
    ACLs with ``acl_token``, state kept in ``data_dir`` across restarts, HTTPS with ``tls_cert``
    and ``tls_key`` (client certificates signed by ``tls_client_ca`` required with it), Consul's
    unkind behaviour as ``realism`` says.
    """

    #: EMBEDDED or SUBPROCESS.
    kind: ClassVar[str]
    #: Every node, node 0 first; known once the double has started.
    nodes: list[NodeInfo]

    def __init__(
        self,
        nodes: int,
        workdir: str | Path,
        *,
        http_port: int | None = None,
        acl_token: str | None = None,
        data_dir: str | Path | None = None,
        datacenter: str = "dc1",
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        realism: Realism | None = None,
        tls_client_ca: str | Path | None = None,
    ) -> None:
        self.node_count = nodes
        self.workdir = Path(workdir).absolute()
        self.http_port = http_port
        self.acl_token = acl_token
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.datacenter = datacenter
        self.tls_cert = Path(tls_cert) if tls_cert is not None else None
        self.tls_key = Path(tls_key) if tls_key is not None else None
        self.tls_client_ca = Path(tls_client_ca) if tls_client_ca is not None else None
        self.realism = realism or Realism()

    def _port_range(self) -> int:
        """The first HTTP port: the one given, else a free range taken now and kept for later starts."""
        if self.http_port is None:
            self.http_port = find_free_port_range(self.node_count)
        return self.http_port

    @property
    def leader(self) -> NodeInfo:
        """Node 0, where the Raft server runs."""
        return self.nodes[0]

    @property
    def inventory(self) -> Path:
        """The Ansible inventory the double publishes (see workdir.py)."""
        return self.workdir / INVENTORY_FILE

    def node(self, node: str | int) -> NodeInfo:
        """A node by name ("node-007") or index (7)."""
        if isinstance(node, int):
            return self.nodes[node]
        for info in self.nodes:
            if info.name == node:
                return info
        raise KeyError(f"unknown node {node!r}")

    def start(self: D) -> D:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def stop_agent(self, node: str | int) -> None:
        """Crash-stop a node's agent: its port refuses, it misses events; once failure detection
        has run (``realism.failure_detection``) its serfHealth is critical and its sessions die."""
        raise NotImplementedError

    def leave_agent(self, node: str | int) -> None:
        """The node's agent leaves: stopped, its node deregistered (checks gone, sessions invalidated)."""
        raise NotImplementedError

    def set_gossip(self, node: str | int, gossip: Gossip) -> None:
        """How user events reach this node's agent from now on."""
        raise NotImplementedError

    def set_address(self, node: str | int, address: str) -> None:
        """The node's catalog address from now on (its agent's advertise address), kept when
        its agent starts again; ClusterError or ServeError for what is not an IP address."""
        raise NotImplementedError

    def start_agent(self, node: str | int) -> None:
        """Start a stopped agent again: empty event ring, config dir re-read, watches fire."""
        raise NotImplementedError

    def is_running(self, node: str | int) -> bool:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Per-agent HTTP counters: {"agents": {name: {requests, bytes_in, bytes_out}}, "total": {...}}."""
        raise NotImplementedError

    def reset_stats(self) -> None:
        raise NotImplementedError

    def __enter__(self: D) -> D:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
