"""The swarm scenarios' judging of the nodes' files, and the apps they release: each node an
artifact directory and swarm ports of its own, a task config the handler accepts."""

from __future__ import annotations

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import parse_config
from devcluster.chaos.apps import SWARM_APPS, SWARM_RATE_LIMIT, artifact_file, swarm_apps
from devcluster.chaos.scenarios import SCENARIOS
from devcluster.chaos.swarm_scenarios import DIFFERS, EQUAL, MISSING, artifact_problems, artifact_states

BUILD = b"the leader's build"


def test_each_file_is_equal_missing_or_differs(tmp_path):
    (tmp_path / "a").write_bytes(BUILD)
    (tmp_path / "b").write_bytes(BUILD[:-1] + b"!")
    files = {name: tmp_path / name for name in ("a", "b", "c")}
    assert artifact_states(files, BUILD) == {"a": EQUAL, "b": DIFFERS, "c": MISSING}


@pytest.mark.parametrize("states, may_lack, problems", [
    ({"a": EQUAL, "b": EQUAL}, set(), []),
    ({"a": EQUAL, "b": MISSING}, set(), ["b has no artifact"]),
    ({"a": EQUAL, "b": MISSING}, {"b"}, []),
    ({"a": DIFFERS, "b": EQUAL}, {"a"}, ["a holds an artifact that differs from the leader's build"]),
])
def test_a_differing_file_is_always_a_problem_a_missing_one_unless_the_node_may_lack_it(states, may_lack, problems):
    assert artifact_problems(states, may_lack) == problems


def test_the_swarm_apps_give_each_node_its_own_directory_and_ports_and_a_valid_config(tmp_path):
    ports = {app: 20000 + index for index, app in enumerate(SWARM_APPS)}
    apps = swarm_apps(tmp_path, "node-001", ports)
    config = parse_config({"apps": apps})
    for app in SWARM_APPS:
        artifact = config.app(app).artifact
        assert (artifact.port, artifact.rate_limit) == (ports[app], SWARM_RATE_LIMIT)
        assert artifact.path.replace("{{ app }}-{{ version }}", f"{app}-1") == str(
            artifact_file(tmp_path, "node-001", app, "1"))


def test_the_suite_runs_the_swarm_scenarios():
    assert {"swarm_peer_crash", "swarm_late_join", "swarm_corrupt_peer", "swarm_leader_gone"} <= set(SCENARIOS)
