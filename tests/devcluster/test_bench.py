"""The benchmark's own logic: the ideal, percentiles, latencies, records, the command line,
and one tiny in-process run against the double (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release
from devcluster.bench import cli as bench
from devcluster.bench.baselines import ansible_playbook
from devcluster.bench.double import MARKER, BenchError, fresh_dir, running_double
from devcluster.bench.core import (
    INPROC,
    NETNS,
    RunResult,
    TaskTiming,
    busy_fraction,
    combine,
    coordination_latencies,
    ideal_seconds,
    make_record,
    node_costs,
    percentile,
    stage_delays,
)
from devcluster.bench.inproc import run_inproc, split
from devcluster.bench.process import bwlimit_kib, rsync_command, write_tree
from devcluster.consul import EMBEDDED, SUBPROCESS

RECORD_KEYS = {
    "nodes",
    "fanout",
    "task_seconds",
    "mode",
    "ideal_seconds",
    "fireap_seconds",
    "ratio",
    "ansible_seconds",
    "parallel_seconds",
    "max_depth",
    "stages",
    "requests_per_node",
    "bytes_per_node",
    "leader",
    "coordination_latency_ms",
    "handoff_latency_ms",
    "stage_start_delay_ms",
    "failures",
    "failed_nodes",
}


# --- the ideal -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "fanout", "stages"),
    [
        (1, 5, 0),
        (2, 5, 1),
        (6, 5, 1),
        (7, 5, 2),
        (36, 5, 2),
        (37, 5, 3),
        (200, 5, 3),
        (1000, 5, 4),
        (1296, 5, 4),
        (1297, 5, 5),
        (8, 1, 3),
        (9, 1, 4),
        (10000, 5, 6),
    ],
)
def test_ideal_is_whole_stages_of_log_k_plus_1_of_n(nodes, fanout, stages):
    assert ideal_seconds(nodes, fanout, 0.5) == pytest.approx(stages * 0.5)


def test_ideal_refuses_a_bad_fanout():
    with pytest.raises(ValueError, match="fanout"):
        ideal_seconds(10, 0, 0.5)


# --- percentiles ---------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks():
    values = [40, 10, 30, 20]  # sorted 10 20 30 40: rank of p50 is 1.5
    assert percentile(values, 50) == pytest.approx(25)
    assert percentile(values, 0) == 10
    assert percentile(values, 100) == 40
    assert percentile(values, 99) == pytest.approx(30 + 10 * 0.97)
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize(("values", "q", "message"), [([], 50, "no values"), ([1], 101, "0..100"), ([1], -1, "0..100")])
def test_percentile_refuses_bad_input(values, q, message):
    with pytest.raises(ValueError, match=message):
        percentile(values, q)


def test_busy_fraction():
    assert busy_fraction((100, 1000), (150, 1100)) == pytest.approx(0.5)
    assert busy_fraction((100, 1000), (100, 1000)) is None


# --- latencies, delays, costs ----------------------------------------------------------------


def _plan(nodes: int, fanout: int):
    names = [f"n{i:02d}" for i in range(nodes)]
    return names, plan_release(names, names[0], fanout, "run")


def test_coordination_latency_counts_from_the_source_and_the_slot_predecessor():
    names, plan = _plan(6, 2)  # n01, n02 from n00; n03 after n01 and n04 after n02 on n00; n05 from n01
    assert (plan["n03"].source, plan["n03"].after) == ("n00", "n01")
    assert (plan["n05"].source, plan["n05"].after) == ("n01", None)
    tasks = {
        "n01": TaskTiming("n00", started=10.010, finished=11.0),
        "n02": TaskTiming("n00", started=10.030, finished=11.2),
        "n03": TaskTiming("n00", started=11.005, finished=12.0),  # n01's slot frees at 11.0
        "n04": TaskTiming("n00", started=11.240, finished=12.0),  # n02's slot frees at 11.2
        "n05": TaskTiming("n01", started=11.050, finished=12.0),  # n01 done at 11.0
    }
    latencies = coordination_latencies(tasks, plan, "n00", leader_ready=10.0)
    assert latencies == pytest.approx({"n01": 0.010, "n02": 0.030, "n03": 0.005, "n04": 0.040, "n05": 0.050})


def test_coordination_latency_counts_from_the_done_write_and_the_handoff_from_the_task_end():
    names, plan = _plan(6, 2)
    tasks = {
        "n01": TaskTiming("n00", started=10.010, finished=11.0, done_written=11.004),
        "n02": TaskTiming("n00", started=10.030, finished=11.2),  # no done write known: its task end
        "n03": TaskTiming("n00", started=11.010, finished=12.0),
        "n04": TaskTiming("n00", started=11.240, finished=12.0),
        "n05": TaskTiming("n01", started=11.050, finished=12.0),
    }
    latencies = coordination_latencies(tasks, plan, "n00", leader_ready=10.0)
    assert latencies == pytest.approx({"n01": 0.010, "n02": 0.030, "n03": 0.006, "n04": 0.040, "n05": 0.046})
    handoffs = coordination_latencies(tasks, plan, "n00", leader_ready=10.0, from_task_end=True)
    assert handoffs == pytest.approx({"n01": 0.010, "n02": 0.030, "n03": 0.010, "n04": 0.040, "n05": 0.050})


def test_coordination_latency_of_a_fallback_counts_from_its_actual_source():
    names, plan = _plan(5, 2)
    tasks = {
        "n01": TaskTiming("n00", 10.0, 11.0),
        "n02": TaskTiming("n00", 10.0, 11.5),
        "n03": TaskTiming("n02", 11.6, 12.0),  # planned on n00 after n01, pulled from n02 instead
    }
    assert coordination_latencies(tasks, plan, "n00", 10.0)["n03"] == pytest.approx(0.1)


def test_coordination_latency_skips_pullers_whose_predecessor_has_no_timing():
    names, plan = _plan(5, 2)
    tasks = {"n03": TaskTiming("n00", 11.0, 12.0)}  # its predecessor n01 did not report
    assert coordination_latencies(tasks, plan, "n00", 10.0) == {}


def test_stage_delays_are_measured_against_the_ideal_schedule():
    names, plan = _plan(6, 2)
    tasks = {
        "n01": TaskTiming("n00", 100.2, 101.2),
        "n02": TaskTiming("n00", 100.4, 101.4),
        "n03": TaskTiming("n00", 101.5, 102.5),
        "n05": TaskTiming("n01", 101.3, 102.3),
    }
    assert stage_delays(tasks, plan, fired=100.0, task_seconds=1.0) == pytest.approx({1: 0.3, 2: 0.4})


def _stats(**agents):
    return {"agents": {name: {"requests": r, "bytes_in": i, "bytes_out": o} for name, (r, i, o) in agents.items()}}


def test_node_costs_leave_the_leader_apart():
    costs = node_costs(_stats(n00=(50, 9000, 1000), n01=(10, 100, 900), n02=(14, 300, 1700)), "n00")
    assert costs == {
        "requests_per_node": {"mean": 12, "max": 14},
        "bytes_per_node": {"mean": 1500, "max": 2000},
        "leader": {"requests": 50, "bytes": 10000},
    }


def test_node_costs_need_a_node_besides_the_leader():
    with pytest.raises(ValueError, match="besides the leader"):
        node_costs(_stats(n00=(1, 1, 1)), "n00")


# --- records -----------------------------------------------------------------------------------


def _result(fired=100.0, completed=101.2, failures=None) -> RunResult:
    names, plan = _plan(5, 2)
    return RunResult(
        mode=INPROC,
        nodes=5,
        fanout=2,
        task_seconds=0.5,
        leader="n00",
        fired=fired,
        leader_ready=fired + 0.01,
        completed=completed,
        depths={"n00": 0, "n01": 1, "n02": 1, "n03": 1, "n04": 1},
        tasks={
            "n01": TaskTiming("n00", fired + 0.02, fired + 0.52, fired + 0.53),
            "n02": TaskTiming("n00", fired + 0.03, fired + 0.53, fired + 0.54),
            "n03": TaskTiming("n00", fired + 0.54, fired + 1.04, fired + 1.05),
            "n04": TaskTiming("n00", fired + 0.56, fired + 1.06, fired + 1.07),
        },
        plan=plan,
        stats=_stats(
            n00=(20, 5000, 5000), n01=(10, 1000, 1000), n02=(12, 1000, 1000), n03=(10, 1000, 1000), n04=(8, 1000, 1000)
        ),
        failures=failures or {},
        details={"double": SUBPROCESS},
    )


def test_record_shape_and_figures():
    record = make_record(_result(), {"parallel": 2.0})
    assert RECORD_KEYS <= set(record)
    assert record["ideal_seconds"] == pytest.approx(1.0)  # ceil(log_3 5) = 2 stages of 0.5 s
    assert record["fireap_seconds"] == pytest.approx(1.2)
    assert record["ratio"] == pytest.approx(1.2)
    assert record["parallel_seconds"] == 2.0 and record["ansible_seconds"] is None
    assert record["max_depth"] == 1 and record["stages"] == 2
    assert record["requests_per_node"] == {"mean": 10, "max": 12}
    assert record["coordination_latency_ms"]["samples"] == 4
    # n01 10 ms, n02 20 ms after the event; n03 10 ms after n01's done write, n04 20 ms after n02's
    assert record["coordination_latency_ms"]["p50"] == pytest.approx(15.0)
    # from the end of the tasks: n03 20 ms after n01's, n04 30 ms after n02's
    assert record["handoff_latency_ms"]["p50"] == pytest.approx(20.0)
    assert record["double"] == SUBPROCESS
    assert record["failures"] == 0
    json.dumps(record)  # plain JSON


def test_record_refuses_an_unknown_baseline():
    with pytest.raises(ValueError, match="unknown baseline"):
        make_record(_result(), {"pdsh": 1.0})


def test_combine_takes_medians_and_adds_up_failures():
    records = [
        make_record(_result(completed=101.2)),
        make_record(_result(completed=101.6, failures={"n03": "boom"})),
        make_record(_result(completed=101.4)),
    ]
    combined = combine(records)
    assert combined["fireap_seconds"] == pytest.approx(1.4)
    assert combined["ratio"] == pytest.approx(1.4)
    assert combined["fireap_runs"] == pytest.approx([1.2, 1.6, 1.4])
    assert combined["repeat"] == 3
    assert combined["failures"] == 1 and combined["failed_nodes"] == {"n03": "boom"}
    assert combined["stages"] == 2 and isinstance(combined["stages"], int)


def test_combine_refuses_different_configurations():
    other = make_record(_result())
    other["fanout"] = 3
    with pytest.raises(ValueError, match="different configurations"):
        combine([make_record(_result()), other])


# --- helpers of the modes ------------------------------------------------------------------------


def test_split_deals_round_robin():
    assert split(list(range(5)), 2) == [[0, 2, 4], [1, 3]]
    assert split([1], 4) == [[1]]
    with pytest.raises(ValueError):
        split([1], 0)


def test_bwlimit_makes_the_transfer_take_the_task_time():
    assert bwlimit_kib(12_000_000, 2.0) == 5860  # ceil(12e6 / 1024 / 2)
    with pytest.raises(ValueError):
        bwlimit_kib(1, 0)


def test_rsync_command_adds_the_bandwidth_limit(tmp_path):
    command = rsync_command(tmp_path, 500)
    assert command.startswith("rsync --bwlimit=500 -a --delete ")
    assert "{{ remote.name }}" in command and "{{ node }}" in command


def test_write_tree_has_the_files_and_bytes_asked_for(tmp_path):
    assert write_tree(tmp_path / "app", "v1", files=50, total_bytes=100_000) == 100_000
    files = [path for path in (tmp_path / "app").rglob("*") if path.is_file()]
    assert len(files) == 50
    assert sum(path.stat().st_size for path in files) == 100_000
    assert (tmp_path / "app" / "VERSION").read_text() == "v1\n"


def test_ansible_baseline_playbook_runs_the_command_on_every_node_but_the_leader():
    play = yaml.safe_load(ansible_playbook("sleep 0.5"))[0]
    assert play["hosts"] == "fireap_nodes:!fireap_leader"
    assert play["tasks"][0]["ansible.builtin.command"] == "sleep 0.5"


def test_fresh_dir_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(BenchError, match="not made by the benchmark"):
        fresh_dir(tmp_path)
    mine = fresh_dir(tmp_path / "bench")
    (mine / "old").write_text("x")
    assert not (fresh_dir(mine) / "old").exists()
    assert (mine / MARKER).exists()


# --- command line --------------------------------------------------------------------------------


def _configs(*argv):
    parser = bench.build_parser()
    return bench.configs_from_args(parser, parser.parse_args(list(argv)))


def test_cli_builds_one_configuration():
    (config,) = _configs("--nodes", "30", "--fanout", "3", "--baseline", "parallel,ansible", "--repeat", "2")
    assert config == bench.Config(30, 3, 0.5, INPROC, ("parallel", "ansible"), 2)


def test_cli_process_mode_always_compares_with_parallel():
    (config,) = _configs("--nodes", "30", "--mode", "process")
    assert config.baselines == ("parallel",) and config.task_seconds == 2.0


def test_cli_netns_push_concurrencies():
    (config,) = _configs("--nodes", "60", "--mode", "netns", "--push-jobs", "59,5,5")
    assert (config.mode, config.push_jobs) == (NETNS, (5, 59))
    (config,) = _configs("--nodes", "60", "--mode", "netns")
    assert config.push_jobs == ()


def test_cli_standard_set():
    assert [c for c in _configs("--standard") if c.mode != NETNS] == [c for c in bench.STANDARD if c.mode != NETNS]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "1"], "must be at least 2"),
        (["--nodes", "10", "--fanout", "65"], "from 1 to 64"),
        (["--nodes", "10", "--task-seconds", "0"], "must be > 0"),
        (["--nodes", "10", "--baseline", "pdsh"], "unknown: pdsh"),
        (["--nodes", "10", "--repeat", "0"], "must be at least 1"),
        (["--standard", "--nodes", "10"], "--standard runs its own set"),
        ([], "give --nodes"),
        (["--nodes", "10", "--mode", "netns", "--push-jobs", "10"], "no concurrency above that"),
        (["--nodes", "10", "--mode", "netns", "--push-jobs", "0"], "must be at least 1"),
        (["--nodes", "10", "--mode", "netns", "--push-jobs", ","], "give a comma-separated list"),
        (["--nodes", "10", "--push-jobs", "5"], "--push-jobs is for --mode netns"),
    ],
)
def test_cli_refuses_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _configs(*argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# --- a tiny real run ---------------------------------------------------------------------------------


@pytest.mark.double_only
def test_tiny_inproc_run_reaches_every_node(tmp_path):
    with running_double(5, tmp_path / "cluster", EMBEDDED) as double:
        result = run_inproc(double, fanout=2, task_seconds=0.05, version="1", timeout=60, processes=2)
        stats_after = double.stats()
    assert result.failures == {}
    assert set(result.tasks) == {"node-001", "node-002", "node-003", "node-004"}
    assert max(result.depths.values()) <= 2  # ceil(log_3 5) = 2 stages
    record = make_record(result)
    assert RECORD_KEYS <= set(record)
    assert record["requests_per_node"]["mean"] > 0 and record["bytes_per_node"]["mean"] > 0
    assert record["coordination_latency_ms"]["samples"] == 4
    assert stats_after["total"]["requests"] >= sum(a["requests"] for a in result.stats["agents"].values())
