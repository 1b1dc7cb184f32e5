"""A Consul double: real HTTP agents with Consul's semantics, all in one process.

``python -m devcluster serve ...`` runs it from the command line (serve.py). Other code starts
it one of two ways (double.py): ``DevCluster`` in a thread of its own process, ``ServeProcess``
as a child process.
"""

from .cluster import Cluster, ClusterError
from .double import EMBEDDED, SUBPROCESS, Double
from .embedded import DevCluster
from .ports import find_free_port_range
from .serve_process import ServeError, ServeProcess
from .workdir import CLUSTER_FILE, INVENTORY_FILE, NodeInfo, node_names

__all__ = [
    "CLUSTER_FILE",
    "EMBEDDED",
    "INVENTORY_FILE",
    "SUBPROCESS",
    "Cluster",
    "ClusterError",
    "DevCluster",
    "Double",
    "NodeInfo",
    "ServeError",
    "ServeProcess",
    "find_free_port_range",
    "node_names",
]
