"""Set-up and teardown of a cluster of network namespaces on one bridge, links shaped with tc.

Every node gets a namespace ``fireap-<node>`` holding its end of a veth pair (``eth0``, an
address in :data:`NETWORK`, a /16 route and no other: no default route) and its loopback;
the other end (``fireap-v<i>``) is a port of the bridge ``fireap-br``, which has no address,
so the host never routes to or from the cluster and no packet leaves it. Each link is shaped
in both directions with an HTB class at the link rate: the node's uplink on ``eth0``'s egress
(its queue a FIFO, netem's delay when a latency is given), its downlink on the bridge port's
egress. A node
serving k pullers thus splits its uplink among their TCP flows, as a NIC does.

Peers are reached by name: ``/etc/netns/fireap-<node>/hosts`` lists every node, and
``ip netns exec`` shows it as ``/etc/hosts`` to what runs in the namespace.

One cluster per machine at a time (an exclusive lock on :data:`LOCK_PATH`), so that whatever
carries the prefix and is not this cluster's is a leftover of a run that died: :func:`sweep`
removes it before a set-up, and a cluster removes its own on exit, on SIGTERM, SIGHUP and
Ctrl-C (the exception unwinds through ``with``) and at interpreter exit.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "fireap-"
BRIDGE = PREFIX + "br"
VETH = PREFIX + "v"
NODE_IFACE = "eth0"
NETWORK = ipaddress.ip_network("10.213.0.0/16")
#: Where a node's processes find its Consul agent, as on a host running one.
CONSUL_PORT = 8500
LOCK_PATH = Path("/run/fireap-netns.lock")
#: Processes a cluster started outside its namespaces (the Consul double), one pid a line.
PIDS_PATH = Path("/run/fireap-netns.pids")
NETNS_ETC = Path("/etc/netns")
LOCK_WAIT_SECONDS = 30.0
KILL_GRACE_SECONDS = 5.0
#: Packets netem holds at most (its default, 1000, drops at high rates with a delay).
NETEM_LIMIT = 100_000


class NetnsError(RuntimeError):
    """The cluster cannot be set up here; the message says why."""


@dataclass(frozen=True)
class LinkShape:
    """Every node's link: the same rate up and down (Mbit/s) and a one-way delay on the uplink."""

    mbit: float
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.mbit <= 100_000:
            raise ValueError(f"link rate must be > 0 and at most 100000 Mbit/s, got {self.mbit!r}")
        if not 0 <= self.latency_ms <= 10_000:
            raise ValueError(f"latency must be from 0 to 10000 ms, got {self.latency_ms!r}")

    @property
    def bytes_per_second(self) -> float:
        return self.mbit * 1_000_000 / 8

    @property
    def round_trip_seconds(self) -> float:
        """A request crosses one uplink, its answer another: twice the delay."""
        return 2 * self.latency_ms / 1000


@dataclass(frozen=True)
class NetnsNode:
    """One node: its name, namespace, address on the bridge and the bridge-side veth."""

    name: str
    namespace: str
    address: str
    veth: str

    def command(self, args: list[str]) -> list[str]:
        """``args`` run inside the node's namespace (and its /etc/hosts)."""
        return ["ip", "netns", "exec", self.namespace, *args]


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed (exit status {done.returncode}): {done.stderr.strip()}")
    return done


def require_root() -> None:
    """Refuse, with the reason, where namespaces cannot be made."""
    if os.geteuid() != 0:
        raise NetnsError("the netns cluster needs root (network namespaces, veth, tc): run it as root, or use --mode process")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsError(f"the netns cluster needs {' and '.join(missing)} (Debian: apt-get install iproute2)")


def own_namespaces() -> list[str]:
    names = []
    for line in _run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith(PREFIX):
            names.append(name)
    return names


def own_links() -> list[str]:
    """Links in the host's namespace carrying the prefix (the bridge, bridge-side veths)."""
    names = []
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        parts = line.split(": ", 2)
        if len(parts) >= 2:
            name = parts[1].split("@", 1)[0]
            if name.startswith(PREFIX):
                names.append(name)
    return names


def namespace_pids(namespace: str) -> list[int]:
    done = _run(["ip", "netns", "pids", namespace], check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def _kill(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL to what is still there after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive or sig == signal.SIGKILL:
            return
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in alive):
            time.sleep(0.1)
        pids = [pid for pid in alive if Path(f"/proc/{pid}").exists()]


def _recorded_pids() -> list[int]:
    try:
        text = PIDS_PATH.read_text()
    except FileNotFoundError:
        return []
    pids = [int(word) for word in text.split() if word.isdigit()]
    return [pid for pid in pids if _is_devcluster(pid)]


def _is_devcluster(pid: int) -> bool:
    """Only a process still running this project's code: a recorded pid may have been reused."""
    try:
        return b"devcluster" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def sweep() -> list[str]:
    """Remove every namespace, link, hosts directory and recorded process with the prefix; what was removed.

    Call it with the lock held (a running cluster's would go too).
    """
    removed = []
    recorded = [pid for pid in _recorded_pids() if pid != os.getpid()]
    if recorded:
        _kill(recorded)
        removed.append(f"processes {' '.join(map(str, recorded))}")
    PIDS_PATH.unlink(missing_ok=True)
    for namespace in own_namespaces():
        _kill(namespace_pids(namespace))
        _run(["ip", "netns", "del", namespace], check=False)
        removed.append(f"namespace {namespace}")
    for link in own_links():
        _run(["ip", "link", "del", link], check=False)
        removed.append(f"link {link}")
    if NETNS_ETC.is_dir():
        for path in NETNS_ETC.glob(PREFIX + "*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"directory {path}")
        try:
            NETNS_ETC.rmdir()  # only when empty: other tools may keep theirs there
        except OSError:
            pass
    return removed


def hosts_text(nodes: list[NetnsNode]) -> str:
    lines = ["127.0.0.1 localhost"] + [f"{node.address} {node.name}" for node in nodes]
    return "\n".join(lines) + "\n"


def _shape(prefix: list[str], device: str, rate_mbit: float, delay_ms: float) -> None:
    """An HTB class at ``rate_mbit`` as the root of ``device``'s egress; its queue a FIFO, or netem's delay."""
    rate = f"{rate_mbit:g}mbit"
    _run([*prefix, "tc", "qdisc", "replace", "dev", device, "root", "handle", "1:", "htb", "default", "1"])
    _run([*prefix, "tc", "class", "add", "dev", device, "parent", "1:", "classid", "1:1", "htb", "rate", rate, "ceil", rate])
    if delay_ms > 0:
        netem = ["netem", "delay", f"{delay_ms:g}ms", "limit", str(NETEM_LIMIT)]
        done = _run([*prefix, "tc", "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", *netem], check=False)
        if done.returncode != 0:
            raise NetnsError(f"tc cannot add netem on {device}: a link latency needs the kernel's netem qdisc "
                             f"(sch_netem): {done.stderr.strip()}")


class NetnsCluster:
    """``with NetnsCluster(names, shape) as cluster``: the namespaces up, removed when the block ends."""

    def __init__(self, names: list[str], shape: LinkShape) -> None:
        if not names:
            raise ValueError("a cluster needs at least one node")
        if len(names) >= NETWORK.num_addresses - 2:
            raise ValueError(f"{NETWORK} holds at most {NETWORK.num_addresses - 3} nodes")
        self.shape = shape
        self.nodes = [
            NetnsNode(name, PREFIX + name, str(NETWORK[i + 1]), f"{VETH}{i}") for i, name in enumerate(names)
        ]
        self._lock: int | None = None
        self._previous: dict[int, object] = {}

    def node(self, name: str) -> NetnsNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def __enter__(self) -> NetnsCluster:
        require_root()
        self._take_lock()
        atexit.register(self.teardown)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, _exit_on_signal)
        try:
            sweep()
            self._set_up()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.teardown()

    def _take_lock(self) -> None:
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise NetnsError(
                        f"another netns cluster holds {LOCK_PATH} (one at a time per machine); "
                        f"it did not end within {LOCK_WAIT_SECONDS:.0f}s"
                    ) from None
                time.sleep(0.5)
        self._lock = fd

    def _set_up(self) -> None:
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        # Bridged frames stay out of the host's iptables (br_netfilter): the cluster is a LAN of its own.
        _run(["ip", "link", "set", BRIDGE, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables", "0",
              "nf_call_arptables", "0"])
        _run(["ip", "link", "set", BRIDGE, "up"])
        hosts = hosts_text(self.nodes)
        for node in self.nodes:
            _run(["ip", "netns", "add", node.namespace])
            inside = ["ip", "netns", "exec", node.namespace]
            _run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", NODE_IFACE, "netns", node.namespace])
            _run(["ip", "link", "set", node.veth, "master", BRIDGE, "up"])
            _run(["ip", "-n", node.namespace, "addr", "add", f"{node.address}/{NETWORK.prefixlen}", "dev", NODE_IFACE])
            _run(["ip", "-n", node.namespace, "link", "set", NODE_IFACE, "up"])
            _run(["ip", "-n", node.namespace, "link", "set", "lo", "up"])
            _shape(inside, NODE_IFACE, self.shape.mbit, self.shape.latency_ms)
            _shape([], node.veth, self.shape.mbit, 0.0)
            etc = NETNS_ETC / node.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)

    def record_pid(self, pid: int) -> None:
        """A process started outside the namespaces, for a later sweep to end if this run dies."""
        with open(PIDS_PATH, "a", encoding="ascii") as pids:
            pids.write(f"{pid}\n")

    def teardown(self) -> None:
        """Every process in the namespaces ended, the namespaces, links and hosts files removed; idempotent."""
        if self._lock is None:
            return
        try:
            sweep()
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()
            atexit.unregister(self.teardown)
            os.close(self._lock)
            self._lock = None


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)
