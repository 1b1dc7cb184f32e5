"""The swarm release's phases from link counters: readings, their recorder, the phases and the
line the benchmark prints (synthetic counters, no cluster)."""

from __future__ import annotations

import os
import time

import pytest

from devcluster.bench import cli as bench
from devcluster.bench import links
from devcluster.bench.core import busy_core_seconds
from devcluster.bench.links import LinkRecorder, LinkSample, read_links, transfer_phases


def _sample(at, leader_sent, received):
    return LinkSample(at, {"lead": leader_sent, "a": 0, "b": 0}, {"lead": 0, **received})


def test_the_phases_are_when_the_targets_bytes_began_and_ended_and_how_full_their_links_were():
    # fired at 100; two targets on 1000 B/s links, an artifact of 1000 bytes.
    samples = [
        _sample(100.0, 0, {"a": 0, "b": 0}),
        _sample(101.0, 5, {"a": 5, "b": 0}),          # handshakes: under 1% of the bytes
        _sample(102.0, 500, {"a": 500, "b": 300}),    # data flows
        _sample(103.0, 1000, {"a": 1000, "b": 900}),
        _sample(104.0, 1100, {"a": 1100, "b": 1100}),  # done
        _sample(105.0, 1100, {"a": 1100, "b": 1100}),
    ]
    phases = transfer_phases(samples, 100.0, "lead", ["a", "b"], 1000, 1000.0)
    assert phases["first_bytes_seconds"] == 2.0 and phases["last_bytes_seconds"] == 4.0
    assert phases["downlink_use"] == pytest.approx((2200 - 800) / (2 * 1000 * 2.0))
    assert phases["leader_copies"] == pytest.approx(1.1)
    assert phases["received_copies"] == pytest.approx(1.1)


def test_no_phases_without_two_readings_or_any_bytes():
    quiet = _sample(1.0, 0, {"a": 0, "b": 0})
    assert transfer_phases([quiet], 0.0, "lead", ["a", "b"], 1000, 1000.0) is None
    assert transfer_phases([quiet, quiet], 0.0, "lead", ["a", "b"], 1000, 1000.0) is None


def test_a_node_link_is_read_at_the_host_end_of_its_veth_the_other_way_round(tmp_path, monkeypatch):
    monkeypatch.setattr(links, "SYS_NET", tmp_path)
    statistics_dir = tmp_path / "fireap-v0" / "statistics"
    statistics_dir.mkdir(parents=True)
    (statistics_dir / "rx_bytes").write_text("700\n")
    (statistics_dir / "tx_bytes").write_text("300\n")
    sample = read_links({"node-000": "fireap-v0"})
    assert sample.sent == {"node-000": 700} and sample.received == {"node-000": 300}
    assert abs(sample.at - time.time()) < 5


def test_the_recorder_reads_when_the_block_begins_while_it_runs_and_when_it_ends():
    count = iter(range(1000))

    def read():
        return LinkSample(float(next(count)), {}, {})

    with LinkRecorder(read, period=0.01) as recorder:
        deadline = time.monotonic() + 30
        while len(recorder.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        during = len(recorder.samples)
    assert during >= 3
    assert recorder.samples[0].at == 0.0 and len(recorder.samples) >= during + 1
    assert [sample.at for sample in recorder.samples] == sorted(sample.at for sample in recorder.samples)


def test_busy_core_seconds_are_clock_ticks_over_the_tick_rate():
    assert busy_core_seconds((0, 0), (0, 0)) == 0
    assert busy_core_seconds((100, 1000), (100 + 2 * 100, 2000)) == pytest.approx(200 / os.sysconf("SC_CLK_TCK"))


def test_the_netns_line_says_where_the_swarms_seconds_went():
    record = {
        "swarm_phases": {"first_bytes_seconds": 5.9, "last_bytes_seconds": 16.4, "downlink_use": 0.62,
                         "leader_copies": 1.67, "received_copies": 1.15},
        "swarm_cpu_floor_seconds": 16.5,
    }
    assert bench._swarm_phases_summary(record) == [
        "swarm bytes from 5.9s to 16.4s after fire (62% of the targets' downlinks), leader sent 1.67 copies, "
        "a target received 1.15",
        "swarm CPU floor 16.5s",
    ]
    assert bench._swarm_phases_summary({}) == []  # a record written before they were measured
