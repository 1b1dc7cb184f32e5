"""A test cluster on real, shaped links: one Linux network namespace per node.

cluster.py  set-up and teardown (namespaces, the bridge, veth links shaped with tc, the
            nodes' host names), always cleaned up, one cluster per machine at a time
relay.py    each node's Consul agent at 127.0.0.1:8500 inside its namespace, relayed to the
            double's agent over the host's loopback, every request classified and timed
"""

from .cluster import CONSUL_PORT, LinkShape, NetnsCluster, NetnsError, NetnsNode, sweep
from .relay import AgentRelay, RequestRecord

__all__ = [
    "CONSUL_PORT",
    "AgentRelay",
    "LinkShape",
    "NetnsCluster",
    "NetnsError",
    "NetnsNode",
    "RequestRecord",
    "sweep",
]
