"""A Consul double: real HTTP agents with Consul's semantics, all in one process.

`python -m devcluster serve ...` runs a cluster from the command line;
`DevCluster` runs one inside a test or benchmark process.
"""

from .cluster import Cluster, ClusterError
from .embedded import DevCluster, find_free_port_range
from .workdir import NodeInfo, node_names

__all__ = ["Cluster", "ClusterError", "DevCluster", "NodeInfo", "find_free_port_range", "node_names"]
