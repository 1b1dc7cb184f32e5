"""The in-process benchmark: every node's real pull in a thread, the task a sleep of t seconds.

Each node but the leader gets a thread that does what its agent's watch and fireap-reap
would: it blocks on ``/v1/event/list?name=FIREAP:TASK`` of its own agent, and when the
event arrives runs the real ``_worker.pull`` with its own py-consul client (over a lean
keep-alive transport, see ``client.py``), the task sleeping ``t``. The release is fired
with the real ``_firing.fire`` against the leader's agent. Measured: from the start of the
fire until the last node's done record was acknowledged (its final /v1/txn; the destroy of
its session after that is cleanup and not counted). The handler's own reads before a worker
starts (1 to 3 KV reads) are not part of this mode; process mode runs the real handler.

The nodes are spread over worker processes (one per CPU by default). A worker process runs
its nodes as gevent greenlets (``monkey.patch_all``: threads, sockets and sleeps become
cooperative), so the unchanged threaded code of the worker and of py-consul runs with one
OS thread per process: hundreds of OS threads contending for one interpreter lock cost
more CPU in hand-overs than the nodes' own requests, and served them in no fair order.
The fire waits until the double holds every node's blocking event query, so the nodes' own
arming is not counted in the release.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace

from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._firing import EVENT_NAME, fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import NODE_DONE, AppAdvert, NodeAdvert, Schema
from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release
from ansible_collections.fireap.consul.plugins.module_utils._worker import SourceInfo, pull

from .. import REPO_ROOT
from ..consul import Double, NodeInfo
from .client import BenchConsul
from .core import INPROC, RunResult, TaskTiming, busy_fraction
from .double import CLIENT_TIMEOUT, BenchError, cpu_times, leader_client

APP = "bench"
#: How long a node waits for the event before it gives up (the run is then a failure).
EVENT_WAIT_SECONDS = 120
#: Requests each node's agent has seen once the node's blocking event query is parked: the
#: first list (for the index) and the blocking one.
ARMING_REQUESTS = 2
#: Pause between polls of the double's counters while the nodes park their event queries.
PARK_POLL_SECONDS = 0.05
#: Seconds the worker processes get to end once they reported.
WORKER_EXIT_SECONDS = 30.0
#: Import roots of a worker process: the repository (devcluster) and the collection's parent.
IMPORT_ROOTS = (str(REPO_ROOT), str(REPO_ROOT / "build"))
#: ``python -c`` program of a worker process: argv[1:] are the import roots; the job comes
#: on stdin as JSON. gevent patches the standard library before anything imports it.
_WORKER_PROGRAM = (
    "from gevent import monkey; monkey.patch_all(); "
    "import sys; sys.path[:0] = sys.argv[1:]; from devcluster.bench.inproc import worker_main; worker_main()"
)
ARMED = "armed"


@dataclass(frozen=True)
class NodeOutcome:
    """What one node's thread observed, as a worker process reports it."""

    node: str
    timing: TaskTiming | None
    depth: int | None
    error: str | None
    returned: float
    done_at: float | None

    @classmethod
    def from_dict(cls, data: dict) -> NodeOutcome:
        timing = data["timing"]
        return cls(
            data["node"],
            TaskTiming(**timing) if timing else None,
            data["depth"],
            data["error"],
            data["returned"],
            data["done_at"],
        )


class _NodeThread(threading.Thread):
    """One node: wait for the event on its own agent, then pull with a sleeping task (a
    greenlet in a worker process, see the module docstring)."""

    def __init__(self, node: NodeInfo, task_seconds: float, armed: threading.Semaphore) -> None:
        super().__init__(name=f"bench-{node.name}", daemon=True)
        self.client = BenchConsul(node.host, node.port, CLIENT_TIMEOUT)
        self.node = node.name
        self.task_seconds = task_seconds
        self.armed = armed
        self.timing: TaskTiming | None = None
        self.depth: int | None = None
        self.error: str | None = None
        self.returned = 0.0
        self.done_at: float | None = None

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:  # reported as this node's failure
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self.returned = time.time()
            self.client.http.close()

    def _run(self) -> None:
        try:
            index, events = self.client.event.list(name=EVENT_NAME)
            seen = {event["ID"] for event in events}
        finally:
            self.armed.release()
        deadline = time.monotonic() + EVENT_WAIT_SECONDS
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.error = f"no {EVENT_NAME} event within {EVENT_WAIT_SECONDS}s"
                return
            index, events = self.client.event.list(name=EVENT_NAME, index=index, wait=f"{max(1, int(remaining))}s")
            if any(event["ID"] not in seen for event in events):
                break
        result = pull(self.client, APP, self.node, self.task)
        state = result.state
        if state is None or state.status != NODE_DONE:
            self.error = result.reason
        else:
            self.depth = state.depth
            self.done_at = self.client.http.kv_written

    def task(self, source: SourceInfo) -> tuple[bool, None]:
        started = time.time()
        time.sleep(self.task_seconds)
        self.timing = TaskTiming(source.name, started, time.time())
        return True, None

    def outcome(self) -> NodeOutcome:
        return NodeOutcome(self.node, self.timing, self.depth, self.error, self.returned, self.done_at)


def worker_main() -> None:
    """A worker process: arm every node's event wait, print "armed", pull, print the outcomes.

    stdin: one JSON line ``{"nodes": [[name, host, port], ...], "task_seconds": t}``;
    stdout: the line ``armed``, then one JSON line with the list of outcomes.
    """
    job = json.loads(sys.stdin.readline())
    armed = threading.Semaphore(0)
    nodes = [NodeInfo(name, host, port) for name, host, port in job["nodes"]]
    threads = [_NodeThread(node, job["task_seconds"], armed) for node in nodes]
    for thread in threads:
        thread.start()
    for _thread in threads:
        armed.acquire()
    print(ARMED, flush=True)
    for thread in threads:
        thread.join()
    print(json.dumps([asdict(thread.outcome()) for thread in threads]), flush=True)


class _WorkerProcess:
    """A worker process running some nodes' threads; its output lines are read by a thread."""

    def __init__(self, nodes: list[NodeInfo], task_seconds: float) -> None:
        self.nodes = nodes
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_PROGRAM, *IMPORT_ROOTS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        job = {"nodes": [[n.name, n.host, n.port] for n in nodes], "task_seconds": task_seconds}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.close()
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"bench-worker-{self.process.pid}", daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout: float) -> str | None:
        """The next line printed, or None when none came in time or the process ended."""
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if line is None:
            self.lines.put(None)  # ended: every later call answers at once
        return line

    def stop(self) -> None:
        try:
            self.process.wait(WORKER_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def split(items: list, parts: int) -> list[list]:
    """``items`` dealt round-robin into at most ``parts`` non-empty lists."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    return [chunk for chunk in (items[i::parts] for i in range(parts)) if chunk]


def run_inproc(
    double: Double,
    fanout: int,
    task_seconds: float,
    version: str,
    timeout: float,
    processes: int | None = None,
    leader=None,
) -> RunResult:
    """Release ``version`` of the bench app across ``double`` once; see the module docstring.

    ``processes``: worker processes the nodes are spread over (default: one per
    CPU). ``timeout``: seconds after the fire to wait for the last node; nodes not done by
    then are failures and the run is aborted so that their threads end. ``leader``: the
    leader's client (``leader_client``), made for this run when not given.
    """
    pullers = [node for node in double.nodes if node.name != double.leader.name]
    double.reset_stats()
    own_leader = leader is None
    if own_leader:
        leader = leader_client(double)
    workers: list[_WorkerProcess] = []
    try:
        for share in split(pullers, processes or os.cpu_count() or 1):
            workers.append(_WorkerProcess(share, task_seconds))
        return _release(double, leader, fanout, task_seconds, version, timeout, workers)
    finally:
        for worker in workers:
            worker.stop()
        if own_leader:
            leader.http.close()


def _await_parked(double: Double, names: list[str]) -> None:
    """Return once every node's blocking event query has reached its agent, as a
    long-running watch's would have, so the fire does not race the nodes' own arming."""
    deadline = time.monotonic() + EVENT_WAIT_SECONDS
    while True:
        agents = double.stats()["agents"]
        late = [name for name in names if agents[name]["requests"] < ARMING_REQUESTS]
        if not late:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{len(late)} node(s) did not park their event query within {EVENT_WAIT_SECONDS}s")
        time.sleep(PARK_POLL_SECONDS)


def _release(
    double: Double,
    leader,
    fanout: int,
    task_seconds: float,
    version: str,
    timeout: float,
    workers: list[_WorkerProcess],
) -> RunResult:
    for worker in workers:
        if worker.line(EVENT_WAIT_SECONDS) != ARMED:
            raise BenchError(f"the nodes of worker process {worker.process.pid} did not start waiting for the event")
    _await_parked(double, [node.name for worker in workers for node in worker.nodes])

    schema = Schema()
    # As every node's handler does at agent start: advertise the app (the leader targets only
    # the nodes that have it). Set-up, not part of the figures.
    advert = NodeAdvert({APP: AppAdvert(max_semaphores=fanout)}).to_json()
    for node in leader.catalog.nodes()[1]:
        leader.kv.put(schema.advert(node["Node"]), advert)
    cpu_before = cpu_times()
    fired = time.time()
    outcome = fire(leader, schema, APP, version=version, fanout=fanout)
    leader_ready = time.time()
    outcomes: dict[str, NodeOutcome] = {}
    aborted = False
    for worker in workers:
        line = worker.line(fired + timeout - time.time())
        if line is None:
            if not aborted:
                clear(leader, schema, APP, abort=True, reason=f"the benchmark gave up after {timeout:g}s")
                aborted = True
            line = worker.line(EVENT_WAIT_SECONDS)
        if line is not None:
            outcomes.update((item["node"], NodeOutcome.from_dict(item)) for item in json.loads(line))
    cpu_after = cpu_times()
    stats = double.stats()

    failures = {}
    for node in (node for worker in workers for node in worker.nodes):
        item = outcomes.get(node.name)
        if item is None:
            failures[node.name] = f"its worker process did not report within {timeout:g}s of the fire"
        elif item.returned > fired + timeout:
            failures[node.name] = f"not done {timeout:g}s after the fire"
        elif item.error is not None:
            failures[node.name] = item.error
    return RunResult(
        mode=INPROC,
        nodes=len(double.nodes),
        fanout=fanout,
        task_seconds=task_seconds,
        leader=double.leader.name,
        fired=fired,
        leader_ready=leader_ready,
        completed=max((item.done_at or item.returned for item in outcomes.values()), default=leader_ready),
        depths={item.node: item.depth for item in outcomes.values() if item.depth is not None}
        | {double.leader.name: 0},
        tasks={
            item.node: replace(item.timing, done_written=item.done_at)
            for item in outcomes.values()
            if item.timing is not None
        },
        plan=plan_release(outcome["targets"], outcome["leader"], fanout, outcome["run_id"]),
        stats=stats,
        failures=failures,
        details={"double": double.kind, "processes": len(workers), "cpu_busy": busy_fraction(cpu_before, cpu_after)},
    )
