"""The double a benchmark runs against: served by `python -m devcluster serve` or in this process.

Either way every figure comes from real HTTP: the release is fired through the collection's own
client (``_connection.build_client``, the client the node handler uses) talking to the leader's
agent, the nodes talk to their own agents' ports, and the per-agent request and byte counters
come from the double's ``/_devcluster/stats`` (``Double.stats``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ansible_collections.fireap.consul.plugins.module_utils._connection import ConsulOptions, build_client

from ..consul import EMBEDDED, SUBPROCESS, DevCluster, Double, ServeError, ServeProcess
from ..consul.workdir import fresh_workdir

#: Where the double is served: in a thread of the benchmark's own process, or in a process
#: of its own so that serving HTTP and the simulated nodes do not share one interpreter lock.
DOUBLE_KINDS = (EMBEDDED, SUBPROCESS)

#: Marks a directory as made by the benchmark, so that a later run may empty it.
MARKER = ".fireap-bench"
#: Seconds a node's client waits for a non-blocking answer (blocking queries add their wait).
CLIENT_TIMEOUT = 60.0


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def node_roots(double: Double) -> tuple[Path, dict[str, Path]]:
    """The directory holding the node directories and each node's root: the benchmarks' commands
    name a node's files by ``<dir>/<node name>``, so every root must be just that."""
    roots = {node.name: node.root for node in double.nodes}
    nodes_dir = double.leader.root.parent
    if any(root != nodes_dir / name for name, root in roots.items()):
        raise BenchError(f"the node directories are not all <dir>/<node name>: {roots}")
    return nodes_dir, roots


def cpu_times() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    # user nice system idle iowait irq softirq steal
    return sum(fields) - fields[3] - fields[4], sum(fields)


def fresh_dir(path: Path) -> Path:
    """Create ``path`` empty; an earlier benchmark's directory is emptied, any other content refused."""
    try:
        return fresh_workdir(path, MARKER, "the benchmark")
    except ValueError as err:
        raise BenchError(str(err)) from None


@contextmanager
def running_double(nodes: int, workdir: Path, kind: str = SUBPROCESS) -> Iterator[Double]:
    """N agents (node 0 leads releases) in ``workdir``, emptied first; stopped when the block ends."""
    if kind not in DOUBLE_KINDS:
        raise BenchError(f"unknown double kind {kind!r}; use one of {', '.join(DOUBLE_KINDS)}")
    workdir = fresh_dir(workdir)
    double: Double | None = None
    try:
        double = DevCluster(nodes, workdir) if kind == EMBEDDED else ServeProcess(nodes, workdir, new_session=True)
        double.start()
    except (ServeError, OSError, RuntimeError) as err:
        if double is not None:
            double.stop()
        raise BenchError(f"the dev cluster of {nodes} nodes did not start: {err}") from err
    try:
        yield double
    finally:
        double.stop()


def leader_client(double: Double):
    """A py-consul client of the leader's own agent, as the collection's modules build one."""
    leader = double.leader
    return build_client(ConsulOptions(host=leader.host, port=leader.port, timeout=CLIENT_TIMEOUT))
