"""A Consul double: real HTTP agents with Consul's semantics, all in one process.

``python -m devcluster serve ...`` runs it from the command line (serve.py). Other code starts
it one of two ways (double.py): ``DevCluster`` in a thread of its own process, ``ServeProcess``
as a child process.
"""

from .cluster import Cluster, ClusterError
from .double import EMBEDDED, SUBPROCESS, Double
from .embedded import DevCluster
from .ports import find_free_port_range
from .realism import CONSUL_GOSSIP, MISSING_KEY_BLOCK, MISSING_KEY_EXACT, MISSING_KEY_WAKE, Gossip, Realism, RealismError
from .serve_process import ServeError, ServeProcess
from .workdir import CLUSTER_FILE, INVENTORY_FILE, NodeInfo, node_names

__all__ = [
    "CLUSTER_FILE",
    "CONSUL_GOSSIP",
    "EMBEDDED",
    "MISSING_KEY_BLOCK",
    "MISSING_KEY_EXACT",
    "MISSING_KEY_WAKE",
    "INVENTORY_FILE",
    "SUBPROCESS",
    "Cluster",
    "ClusterError",
    "DevCluster",
    "Double",
    "Gossip",
    "NodeInfo",
    "Realism",
    "RealismError",
    "ServeError",
    "ServeProcess",
    "find_free_port_range",
    "node_names",
]
