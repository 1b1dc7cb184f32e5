"""What a swarm release did on the links, read from the byte counters of every node's link.

A release's seconds split into start-up (fire to the first bytes: the event's gossip, the
handlers and their workers starting), transfer (until the targets' links carried the last
bytes) and finish (verification, the app's commands, the done records). How full the targets'
downlinks were during the transfer, and how many copies the leader sent, say whether the links
or the swarm's pace set the transfer's time.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Seconds between two readings of the counters (60 files at N=30: well under 1% of a core).
SAMPLE_SECONDS = 0.2
#: The share of the release's bytes after which data counts as flowing, and before the end of
#: which it counts as done: a few of the swarm's handshake and piece-announcement bytes come
#: before the first piece, and a straggler's last bytes after the others'.
EDGE_SHARE = 0.01
SYS_NET = Path("/sys/class/net")


@dataclass(frozen=True)
class LinkSample:
    """Bytes each node had sent and received over its link (the host end of its veth pair
    counts the other way round) at ``at`` (time.time())."""

    at: float
    sent: Mapping[str, int]
    received: Mapping[str, int]


def read_links(veths: Mapping[str, str]) -> LinkSample:
    """The counters of every node's link now; ``veths``: node name to its host-side veth."""
    sent, received = {}, {}
    for node, veth in veths.items():
        statistics_dir = SYS_NET / veth / "statistics"
        sent[node] = int((statistics_dir / "rx_bytes").read_text())
        received[node] = int((statistics_dir / "tx_bytes").read_text())
    return LinkSample(time.time(), sent, received)


class LinkRecorder:
    """``with LinkRecorder(read) as recorder``: ``read()`` every SAMPLE_SECONDS from a thread
    while the block runs, once more at its end; the readings in ``samples``."""

    def __init__(self, read: Callable[[], LinkSample], period: float = SAMPLE_SECONDS) -> None:
        self._read = read
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-recorder", daemon=True)
        self.samples: list[LinkSample] = []

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.samples.append(self._read())

    def __enter__(self) -> LinkRecorder:
        self.samples.append(self._read())
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._read())


def transfer_phases(samples: Sequence[LinkSample], fired: float, leader: str, targets: Sequence[str],
                    artifact_bytes: int, link_bytes_per_second: float) -> dict | None:
    """The release's transfer from its link readings (None with fewer than two, or no bytes):
    ``first_bytes_seconds`` and ``last_bytes_seconds`` after ``fired``, when the targets had
    received EDGE_SHARE and 1 - EDGE_SHARE of their bytes; ``downlink_use``, the share of the
    targets' downlinks those bytes filled in between; ``leader_copies``, the artifacts' worth of
    bytes the leader sent; ``received_copies``, what the median target received (headers,
    the swarm's messages and pieces that came twice included)."""
    if len(samples) < 2 or not targets:
        return None
    first, last = samples[0], samples[-1]

    def received(sample: LinkSample) -> int:
        return sum(sample.received[node] - first.received[node] for node in targets)

    total = received(last)
    if total <= 0:
        return None
    start = next(sample for sample in samples if received(sample) >= EDGE_SHARE * total)
    end = next(sample for sample in samples if received(sample) >= (1 - EDGE_SHARE) * total)
    seconds = end.at - start.at
    capacity = len(targets) * link_bytes_per_second * seconds
    return {
        "first_bytes_seconds": start.at - fired,
        "last_bytes_seconds": end.at - fired,
        "downlink_use": (received(end) - received(start)) / capacity if capacity > 0 else None,
        "leader_copies": (last.sent[leader] - first.sent[leader]) / artifact_bytes,
        "received_copies": statistics.median(last.received[node] - first.received[node]
                                             for node in targets) / artifact_bytes,
    }
