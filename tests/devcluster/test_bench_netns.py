"""The netns benchmark's own logic: the build, the bound and models, the costs per node and per
stage transition, the swarm's app and artifact paths, the record of medians, its picture and
the command line (no cluster, no timing)."""

from __future__ import annotations

import json
import os
import tarfile

import matplotlib
import pytest

from ansible_collections.fireap.consul.plugins.module_utils._kv import NodeState, PlanEntry
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import parse_config
from ansible_collections.fireap.consul.plugins.module_utils._validation import artifact_path
from devcluster.bench import cli as bench
from devcluster.bench.core import NETNS, TaskTiming
from devcluster.bench.costs import TAIL_SECONDS, node_costs, transition_costs, worst_transition
from devcluster.bench.netns import (
    SWARM_APP,
    SWARM_ARTIFACT_VAR,
    SWARM_DIR,
    NetnsBench,
    TREE_FILES,
    build_bytes,
    lower_bound_seconds,
    netns_record,
    push_concurrencies,
    stage_model_seconds,
    swarm_app,
    swarm_artifact_template,
    write_build,
)
from devcluster.bench.plot import write_plot
from devcluster.demo.builds import tree_manifest, write_tar
from devcluster.demo.playbooks import Unsafe, dump_yaml, vars_file_text
from devcluster.netns.relay import BLOCKING_READ, READ, RENEWAL, WRITE, RequestRecord

RUN_ID = "20260101T000000-0123abcd"


def test_the_build_is_the_same_bytes_every_time(tmp_path):
    first = write_build(tmp_path / "a", 64 * 1024)
    second = write_build(tmp_path / "b", 64 * 1024)
    assert first == second
    assert tree_manifest(tmp_path / "a") == tree_manifest(tmp_path / "b")
    members, files = build_bytes(64 * 1024)
    assert sum(members) == 64 * 1024 and len(files) == TREE_FILES
    assert len(list((tmp_path / "a").rglob("part*.bin"))) == TREE_FILES


def test_the_swarm_moves_the_whole_build_as_one_tar(tmp_path):
    files = write_build(tmp_path / "build", 64 * 1024)
    size = write_tar(tmp_path / "build", tmp_path / "build.tar")
    assert size == (tmp_path / "build.tar").stat().st_size and size > files
    with tarfile.open(tmp_path / "build.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert tree_manifest(tmp_path / "unpacked") == tree_manifest(tmp_path / "build")


def test_the_swarm_app_gives_each_node_its_own_artifact_directory(tmp_path):
    """The task config takes the app (validated as a node reads it); Ansible renders the path from
    each node's inventory variable, which it must not template: the node renders it per release."""
    settings = swarm_app(tmp_path)
    assert settings["artifact"]["path"] == f"{{{{ {SWARM_ARTIFACT_VAR} }}}}"  # Ansible renders it per node
    settings["artifact"]["path"] = swarm_artifact_template(tmp_path, "a")
    app = parse_config({"apps": {SWARM_APP: settings}}).apps[SWARM_APP]
    assert app.artifact.seed_seconds == 0 and app.artifact.rate_limit is None
    paths = {node: artifact_path(swarm_artifact_template(tmp_path, node), SWARM_APP, "1.2") for node in ("a", "b")}
    assert paths == {node: f"{tmp_path}/{node}/swarm/bench-swarm-1.2.tar" for node in ("a", "b")}
    inventory = dump_yaml({"hosts": {"a": {SWARM_ARTIFACT_VAR: Unsafe(swarm_artifact_template(tmp_path, "a"))}}})
    assert f"{SWARM_ARTIFACT_VAR}: !unsafe '{tmp_path}/a/swarm/{{{{ app }}}}-{{{{ version }}}}.tar'" in inventory
    extra_vars = vars_file_text({SWARM_APP: swarm_app(tmp_path)})
    assert f"path: '{{{{ {SWARM_ARTIFACT_VAR} }}}}'" in extra_vars and "- !unsafe 'rm -rf" in extra_vars


def test_every_nodes_artifact_must_be_the_leaders_and_come_from_the_swarm(tmp_path):
    bench = object.__new__(NetnsBench)  # the comparison alone: no cluster
    bench.roots = {name: tmp_path / name for name in ("leader", "a", "b", "c", "d")}
    bench.pushed = ["a", "b", "c", "d"]
    for root in bench.roots.values():
        (root / SWARM_DIR).mkdir(parents=True)
    leaders = bench.roots["leader"] / SWARM_DIR / "bench-swarm-1.tar"
    leaders.write_bytes(b"build" * 100)
    for name in ("a", "c", "d"):
        (bench.roots[name] / SWARM_DIR / leaders.name).write_bytes(b"build" * 100)
    (bench.roots["d"] / SWARM_DIR / leaders.name).write_bytes(b"build" * 99 + b"bu1ld")
    states = {name: NodeState(version="1", run_id=RUN_ID, status="done", started=1.0, finished=2.0, source="leader",
                              depth=1, downloaded=500 if name != "c" else 0) for name in bench.pushed}
    problems = bench._check_artifacts(leaders, states, "swarm")
    assert sorted(problems) == ["b (swarm)", "c (swarm)", "d (swarm)"]
    assert "no artifact" in problems["b (swarm)"] and "0 of the artifact's 500 bytes" in problems["c (swarm)"]
    assert "differs from the leader's" in problems["d (swarm)"]


def test_bound_and_models():
    assert lower_bound_seconds(10_000_000, 1_000_000, 0.02) == pytest.approx(10.02)
    # N=30: k=1 takes 5 stages of one transfer, k=5 two stages of five transfers sharing the uplink.
    assert stage_model_seconds(30, 1, 2.0) == 10.0
    assert stage_model_seconds(30, 5, 2.0) == 20.0
    assert push_concurrencies(29) == (1, 5, 29)
    assert push_concurrencies(3) == (1, 3)


def _record(node, at, category, path="/v1/kv/x", size=100):
    return RequestRecord(node, at, "PUT" if category == WRITE else "GET", path, category, size)


def test_node_costs_count_each_node_and_kind():
    records = [_record("a", 1, WRITE), _record("a", 2, READ), _record("b", 3, BLOCKING_READ), _record("leader", 4, WRITE)]
    costs = node_costs(records, {"a": 50, "b": 10}, ["a", "b"])
    assert costs["agent_requests_per_node"] == {"mean": 1.5, "max": 2}
    assert costs["agent_bytes_per_node"] == {"mean": 180, "max": 250}
    assert costs["server_requests_per_node"][WRITE] == 0.5
    assert costs["server_requests_per_node"][RENEWAL] == 0


def test_transitions_run_from_a_stage_ending_to_the_next_starting():
    plan = {
        "a": PlanEntry(RUN_ID, "leader", 1, 0),
        "b": PlanEntry(RUN_ID, "leader", 2, 0, after="a"),
        "c": PlanEntry(RUN_ID, "a", 2, 0),
    }
    tasks = {"a": TaskTiming("leader", 100.5, 110.0), "b": TaskTiming("leader", 110.2, 120.0),
             "c": TaskTiming("a", 110.4, 121.0)}
    records = [
        _record("a", 100.1, WRITE),  # 0->1: the first puller's claim
        _record("a", 110.0, WRITE, "/v1/session/destroy/s1"),
        _record("b", 110.1, WRITE),
        _record("c", 110.3, WRITE),
        _record("c", 115.0, READ),  # during the transfers: in no transition
        _record("c", 121.0 + TAIL_SECONDS / 2, WRITE, "/v1/session/destroy/s2"),
    ]
    transitions = transition_costs(records, tasks, plan, fired=100.0, completed=121.0)
    assert list(transitions) == ["0->1", "1->2", "2->3"]
    assert transitions["0->1"][WRITE] == 1
    assert transitions["1->2"][WRITE] == 3 and transitions["1->2"]["session_destroys"] == 1
    assert transitions["1->2"]["peak_writes_per_second"] == 3
    assert transitions["2->3"]["session_destroys"] == 1 and transitions["2->3"][READ] == 0
    assert worst_transition(transitions)["transition"] == "1->2"


def _costs(requests):
    return {"agent_requests_per_node": {"mean": requests, "max": requests + 2}}


def _run(fireap, push, k=1, swarm=10.0):
    return {
        "lower_bound_seconds": 6.0,
        "stage_seconds": {"1": fireap, "2": fireap * 2, "5": fireap * 3},
        "best_k": k,
        "fireap_seconds": fireap,
        "push_best_seconds": push,
        "push_best_method": "parallel -j 1",
        "push_tried_seconds": {"parallel -j 1": push},
        "swarm_seconds": swarm,
        "swarm_costs": _costs(swarm),
        "failures": {},
    }


def test_the_record_holds_medians_and_the_run_count():
    record = netns_record([_run(30, 180), _run(32, 170, k=2), _run(31, 175)], {"nodes": 30})
    assert record["mode"] == NETNS and record["runs"] == 3 and record["nodes"] == 30
    assert record["fireap_seconds"] == 31 and record["stage_seconds"]["2"] == 62
    assert record["best_k"] == 1 and record["push_best_seconds"] == 175
    assert record["push_tried_seconds"] == {"parallel -j 1": 180}
    assert record["fireap_runs"] == [30, 32, 31]
    assert record["fireap_over_lower_bound_seconds"] == 25
    assert record["failures"] == 0


def test_the_record_compares_the_swarm_by_its_medians():
    record = netns_record([_run(30, 180, swarm=9), _run(32, 170, swarm=12), _run(31, 175, swarm=10)], {"nodes": 30})
    assert record["swarm_seconds"] == 10 and record["swarm_runs"] == [9, 12, 10]
    assert record["swarm_costs"]["agent_requests_per_node"] == {"mean": 10, "max": 12}
    assert record["swarm_over_lower_bound_seconds"] == 4
    assert record["swarm_vs_best_stage"] == pytest.approx(3.1)
    assert record["push_best_over_swarm"] == pytest.approx(17.5)


def test_the_record_and_its_line_say_how_busy_the_machine_was():
    runs = []
    for swarm, busy in ((9, 0.99), (12, 1.0), (10, 0.97)):
        run = _run(30, 180, swarm=swarm)
        run.update({
            "operator_seconds": 40, "http_pull_seconds": 190,
            "ratio_to_lower_bound": {"fireap": 5, "swarm": swarm / 6},
            "swarm_leader_costs": _costs(40), **_costs(9), "agent_bytes_per_node": {"mean": 4096},
            "cpu_busy": {"stage_k1": 0.5, "swarm": busy, "push_best": 0.2, "http_pull": None},
        })
        runs.append(run)
    record = netns_record(runs, {"nodes": 30})
    assert record["cpu_busy"] == {"stage_k1": 0.5, "swarm": 0.99, "push_best": 0.2, "http_pull": None}
    assert "CPU busy swarm 99% k=1 50% push 20%" in bench.netns_summary(record)
    del record["cpu_busy"]  # a record written before it was measured
    assert "CPU busy" not in bench.netns_summary(record)


def _configs(*argv):
    parser = bench.build_parser()
    return bench.configs_from_args(parser, parser.parse_args(list(argv)))


def test_cli_measures_each_n_of_a_list_in_netns_mode():
    configs = _configs("--mode", "netns", "--nodes", "10,30,60", "--repeat", "3")
    expected = [(10, 3, NETNS), (30, 3, NETNS), (60, 3, NETNS)]
    assert [(config.nodes, config.repeat, config.mode) for config in configs] == expected


def _netns_record(nodes, swarm, stage, push):
    return {"mode": NETNS, "nodes": nodes, "artifact_bytes": 36 * 2**20, "link_mbit": 50.0, "link_latency_ms": 0.0,
            "lower_bound_seconds": 6.0, "swarm_seconds": swarm, "push_best_seconds": push,
            "stage_seconds": {"1": stage, "2": stage * 1.5, "5": stage * 2},
            "swarm_costs": _costs(12), "swarm_leader_costs": _costs(40), **_costs(9)}


def test_the_netns_picture_is_written_next_to_the_json(tmp_path):
    document = {"records": [_netns_record(30, 11.0, 35.0, 300.0), _netns_record(10, 9.0, 25.0, 90.0)]}
    (tmp_path / "bench.json").write_text(json.dumps(document))
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # labels as text
        paths = write_plot(records, tmp_path / "bench")
    assert paths == [tmp_path / "bench-netns.png", tmp_path / "bench-netns.svg"]
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    svg = paths[1].read_text()
    for label in ("swarm", "stage model k=1", "stage model k=5", "push at its best", "lower bound", "swarm's leader"):
        assert label in svg
    assert write_plot([], tmp_path / "none") == []


def test_cli_builds_a_netns_configuration():
    (config,) = _configs("--mode", "netns", "--nodes", "30", "--artifact-mb", "32", "--link-mbit", "50", "--repeat", "3")
    assert (config.mode, config.nodes, config.artifact_mb, config.link_mbit, config.repeat) == (NETNS, 30, 32, 50.0, 3)
    assert "links 50 Mbit/s" in config.describe()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "netns", "--nodes", "10", "--task-seconds", "2"], "drop --task-seconds"),
        (["--mode", "netns", "--nodes", "10", "--link-mbit", "0"], "must be > 0"),
        (["--mode", "netns", "--nodes", "10", "--link-latency-ms", "-1"], "must be >= 0"),
        (["--mode", "netns", "--nodes", "10", "--artifact-mb", "0"], "from 1 to 4096"),
        (["--mode", "netns", "--nodes", "10,1"], "at least 2"),
        (["--mode", "netns", "--nodes", "10,10"], "each N once"),
        (["--mode", "netns", "--nodes", "10,x"], "is not an integer"),
        (["--mode", "netns", "--nodes", "10,30", "--push-jobs", "9,10"], "reaches 9 nodes"),
        (["--nodes", "10,30"], "a list of N is for --mode netns"),
    ],
)
def test_cli_refuses_bad_netns_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _configs(*argv)
    assert message in capsys.readouterr().err


def test_the_standard_set_has_netns_only_as_root():
    modes = [config.mode for config in _configs("--standard")]
    assert (NETNS in modes) == (os.geteuid() == 0)
