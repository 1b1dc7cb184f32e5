"""The fault suite's command line: the double's realism options, and the settings it reports."""

from __future__ import annotations

import pytest

from devcluster.chaos.cli import build_parser, main
from devcluster.consul import CONSUL_GOSSIP, Realism
from devcluster.consul.realism import from_args

#: What the suite's JSON says, under ``consul``, of the double it ran on.
CONSUL_KEYS = {"consul_version", "txn_max_ops", "failure_detection_s", "missing_key", "event_delay_ms",
               "event_jitter_ms", "event_loss", "event_duplicate", "event_reorder", "gossip_seed"}


def test_the_suite_runs_on_consul_s_behaviour_unless_told_otherwise():
    args = build_parser().parse_args([])
    assert from_args(args, args.nodes) == Realism().for_nodes(args.nodes)
    described = from_args(args, 50).describe(50)
    assert set(described) == CONSUL_KEYS
    assert described["failure_detection_s"] == pytest.approx(7.796, abs=0.001)
    gossip_ms = (CONSUL_GOSSIP.delay * 1000, CONSUL_GOSSIP.jitter * 1000)
    assert (described["event_delay_ms"], described["event_jitter_ms"]) == gossip_ms
    assert (described["event_loss"], described["event_reorder"]) == (CONSUL_GOSSIP.loss, CONSUL_GOSSIP.reorder)
    assert (described["missing_key"], described["txn_max_ops"], described["consul_version"]) == ("block", 128, "1.22.0")


def test_realism_options_reach_the_settings():
    args = build_parser().parse_args(["--nodes", "20", "--consul-version", "1.13.0", "--gossip-loss", "0.2",
                                      "--failure-detection", "3"])
    described = from_args(args, args.nodes).describe(args.nodes)
    assert (described["txn_max_ops"], described["event_loss"], described["failure_detection_s"]) == (64, 0.2, 3.0)
    kind = from_args(build_parser().parse_args(["--kind"]), 50).describe(50)
    assert (kind["failure_detection_s"], kind["event_loss"], kind["missing_key"]) == (0.0, 0.0, "exact")


def test_a_bad_realism_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--consul-version", "one"])
    assert exited.value.code == 2
    assert "consul_version must look like 1.22.0" in capsys.readouterr().err
