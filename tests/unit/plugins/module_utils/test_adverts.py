"""The nodes' adverts of their apps and the choice of a run's targets, without Consul: the record
and its checks, the one filter rule (AppAdvert.accepts), whole-name node filters, choose_targets,
the documented example of docs/configuration.md, and the swarm neighbours a fire plans."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.module_utils import _firing
from ansible_collections.fireap.consul.plugins.module_utils._firing import (
    choose_targets,
    event_node_filter,
)
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    ADVERT_APPS_MAX,
    AppAdvert,
    KVRecordError,
    NodeAdvert,
    Schema,
)
from ansible_collections.fireap.consul.plugins.module_utils._progress import ReleaseError
from ansible_collections.fireap.consul.plugins.module_utils._propagation import plan_release, swarm_neighbours
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import ConfigError, parse_config

REPO_ROOT = Path(__file__).resolve().parents[4]
KEY = "fireap/.apps/node-1"

ADVERT = NodeAdvert({
    "web": AppAdvert(max_semaphores=3, service_filter="^nginx$", tag_filter="^blue$"),
    "db": AppAdvert(max_semaphores=5),
})


# --- the record ------------------------------------------------------------------------------


def test_the_advert_key_cannot_be_an_app_s_key():
    schema = Schema()
    assert schema.adverts_prefix() == "fireap/.apps/"
    assert schema.advert("node-1") == KEY
    with pytest.raises(ValueError, match="app name '.apps' may only contain"):
        schema.app_prefix(".apps")
    with pytest.raises(ValueError, match="node name 'a/b' may only contain"):
        schema.advert("a/b")


def test_an_advert_round_trips_as_compact_sorted_json_without_commands():
    text = ADVERT.to_json()
    assert text == ('{"apps":{"db":{"max_semaphores":5,"service_filter":null,"tag_filter":null},'
                    '"web":{"max_semaphores":3,"service_filter":"^nginx$","tag_filter":"^blue$"}}}')
    assert NodeAdvert.from_json(text.encode(), KEY) == ADVERT


def test_the_task_config_advertises_each_app_s_fanout_and_filters_and_nothing_else():
    config = parse_config({
        "consul": {"token": "secret-token"},
        "defaults": {"max_semaphores": 4, "exec_commands": ["rsync -a {{ remote.address }}::x/ /x/"]},
        "apps": {"web": {"service": "nginx", "tag_regexp": "^blue"}, "db": {"max_semaphores": 2}},
    })
    advert = config.advert()
    assert advert == NodeAdvert({
        "web": AppAdvert(max_semaphores=4, service_filter="^nginx$", tag_filter="^blue"),
        "db": AppAdvert(max_semaphores=2),
    })
    assert "secret-token" not in advert.to_json() and "rsync" not in advert.to_json()


@pytest.mark.parametrize("value, reason", [
    ("[]", "expected a JSON object, got list"),
    ("{}", "missing field 'apps'"),
    ('{"apps": []}', "field 'apps' must be dict, got []"),
    ('{"apps": {"-x": {"max_semaphores": 1}}}', "app '-x': app name '-x' may only contain"),
    ('{"apps": {"web": 5}}', "app 'web': must be an object, got 5"),
    ('{"apps": {"web": {}}}', "app 'web': missing field 'max_semaphores'"),
    ('{"apps": {"web": {"max_semaphores": 1000000000000}}}',
     "app 'web': field 'max_semaphores': max_semaphores must be an integer from 1 to 64, got 1000000000000"),
    ('{"apps": {"web": {"max_semaphores": true}}}', "must be an integer from 1 to 64, got True"),
    ('{"apps": {"web": {"max_semaphores": 1, "service_filter": "web["}}}',
     "field 'service_filter': service_filter 'web[' is not a valid regular expression"),
    ('{"apps": {"web": {"max_semaphores": 1, "service_filter": ""}}}', "service_filter must not be empty"),
    ('{"apps": {"web": {"max_semaphores": 1, "service_filter": "a\\nb"}}}', "must not contain control characters"),
    ('{"apps": {"web": {"max_semaphores": 1, "service_filter": "' + "a" * 1025 + '"}}}',
     "service_filter has 1025 characters; at most 1024"),
    ('{"apps": {"web": {"max_semaphores": 1, "tag_filter": "blue"}}}',
     "app 'web': field 'tag_filter' requires a 'service_filter'"),
])
def test_a_hostile_or_malformed_advert_is_refused_naming_the_key(value, reason):
    with pytest.raises(KVRecordError) as refused:
        NodeAdvert.from_json(value, KEY)
    assert str(refused.value).startswith(f"malformed KV key '{KEY}': ")
    assert reason in str(refused.value)


def test_an_advert_lists_a_bounded_number_of_apps():
    apps = {f"app{i}": {"max_semaphores": 1} for i in range(ADVERT_APPS_MAX + 1)}
    with pytest.raises(KVRecordError, match=f"lists {ADVERT_APPS_MAX + 1} apps; at most {ADVERT_APPS_MAX}"):
        NodeAdvert.from_json(json.dumps({"apps": apps}), KEY)


def test_unknown_fields_of_a_newer_writer_are_ignored():
    value = {"apps": {"web": {"max_semaphores": 2, "since": 1.0}}, "written_by": "fireap 9"}
    assert NodeAdvert.from_json(json.dumps(value), KEY) == NodeAdvert({"web": AppAdvert(max_semaphores=2)})


# --- the filter rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings, services, accepted", [
    ({}, [], True),
    ({"service": "nosuchservice"}, [("web", ["blue"])], False),
    ({"service": "web"}, [("web", [])], True),
    ({"service": "web"}, [("web2", []), ("my-web", [])], False),
    ({"service_regexp": "^web"}, [("web2", [])], True),
    ({"service_regexp": "web"}, [("my-web", [])], True),
    ({"service": "web", "tag": "blue"}, [("web", ["green"]), ("db", ["blue"])], False),
    ({"service": "web", "tag": "blue"}, [("web", ["green"]), ("web", ["blue"])], True),
    ({"service": "web", "tag": "blue"}, [("web", ["blue-1"])], False),
    ({"service": "web", "tag_regexp": "^blue"}, [("web", ["blue-1"])], True),
])
def test_a_node_takes_an_app_when_one_of_its_services_matches_its_filters(settings, services, accepted):
    config = parse_config({"apps": {"app": dict(settings, exec_commands=["true"])}})
    assert config.app("app").advert().accepts(services) is accepted


def test_filters_are_bounded_printable_text():
    with pytest.raises(ConfigError, match="apps.app.service: has 257 characters; at most 256"):
        parse_config({"apps": {"app": {"service": "s" * 257, "exec_commands": ["true"]}}})
    with pytest.raises(ConfigError, match="apps.app.tag_regexp: must not contain control characters"):
        parse_config({"apps": {"app": {"service": "s", "tag_regexp": "a\tb", "exec_commands": ["true"]}}})
    longest = parse_config({"apps": {"app": {"service": "." * 256, "exec_commands": ["true"]}}})
    assert NodeAdvert.from_json(longest.advert().to_json()) == longest.advert(), "its regexp fits an advert"


# --- node filters match whole names ---------------------------------------------------------------


@pytest.mark.parametrize("node_filter, selected", [
    ("web1", ["web1"]),
    ("web[0-9]+", ["web1", "web10", "web2"]),
    ("web1|web2", ["web1", "web2"]),
    ("WEB1", []),
    ("web", []),
])
def test_a_node_filter_selects_whole_names_here_and_in_the_event(node_filter, selected):
    names = ["web1", "web10", "web2", "old-web1"]
    anchored = event_node_filter(node_filter)
    assert [name for name in names if re.search(anchored, name)] == selected  # as Consul's agents search it
    assert [name for name in names if re.fullmatch(node_filter, name)] == selected  # as the targets are chosen
    assert event_node_filter(None) is None


def test_the_event_of_a_run_with_an_artifact_reaches_its_leader_whatever_the_filter():
    names = ["web1", "web10", "web2", "lead.1", "leadx1"]
    anchored = event_node_filter("web[0-9]", "lead.1")
    assert [name for name in names if re.search(anchored, name)] == ["web1", "web2", "lead.1"]
    assert event_node_filter(None, "lead.1") is None  # no filter: every node hears it


# --- choosing the targets ---------------------------------------------------------------------------


def _adverts(**apps_by_node):
    return {node: NodeAdvert(apps) for node, apps in apps_by_node.items()}


def test_the_targets_are_the_leader_then_the_nodes_that_take_the_app():
    adverts = _adverts(
        leader={"web": AppAdvert(max_semaphores=8)},
        b={"web": AppAdvert(max_semaphores=4)},
        a={"web": AppAdvert(max_semaphores=6, service_filter="^nginx$")},
        c={"web": AppAdvert(max_semaphores=1, service_filter="^nginx$")},
        d={"db": AppAdvert(max_semaphores=2)},
    )
    services = {"a": [("nginx", [])], "c": [("apache", [])]}
    targets = choose_targets("web", "leader", ["a", "b", "c", "d", "e", "leader"], adverts, services, ["b", "e"])
    assert targets.names == ["leader", "a", "b"]
    assert targets.fanout == 4, "the smallest max_semaphores of the targets, the leader's included"
    assert (targets.unreachable, targets.without_app, targets.not_accepting) == (["b"], ["d", "e"], ["c"])


def test_without_adverts_of_the_app_there_is_no_fanout_to_take():
    targets = choose_targets("web", "leader", ["leader", "x"], {}, {})
    assert (targets.names, targets.fanout, targets.without_app) == (["leader"], None, ["x"])


# --- the documented example -------------------------------------------------------------------------


def _documented(heading: str) -> str:
    """The first ```yaml block after ``heading`` in docs/configuration.md."""
    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index(heading):]
    return section[section.index("```yaml\n") + len("```yaml\n"):section.index("\n```", section.index("```yaml"))]


def test_the_documented_filters_pick_the_nodes_the_docs_say():
    config = parse_config(yaml.safe_load(_documented("### Which nodes take an app")))
    web, canary = config.app("web").advert(), config.app("web-canary").advert()
    assert web.accepts([("nginx", ["blue"])]) and not web.accepts([("nginx-exporter", [])])
    assert canary.accepts([("nginx", ["canary-2"])]) and not canary.accepts([("nginx", ["blue"])])
    assert not canary.accepts([("haproxy", ["canary"])])


# --- the swarm's neighbours at fire time ---------------------------------------------------------

ARTIFACT = "/srv/builds/{{ app }}-{{ version }}.tar.gz"
RUN_ID = "0123456789abcdef0123456789abcdef"


def swarm_adverts(ports):
    return {name: NodeAdvert({"web": AppAdvert(max_semaphores=2, artifact=ARTIFACT, artifact_port=port)})
            for name, port in ports.items()}


def test_the_targets_carry_the_swarm_ports_they_advertise():
    ports = {"node-0": 6881, "node-1": 6882, "node-2": 7000}
    targets = choose_targets("web", "node-0", list(ports), swarm_adverts(ports), {})
    assert (dict(targets.artifacts), dict(targets.artifact_ports)) == ({name: ARTIFACT for name in ports}, ports)


def test_each_node_keeps_the_artifact_in_its_own_directory_under_one_file_name():
    templates = {"node-0": ARTIFACT, "node-1": "/data/{{ app }}-{{ version }}.tar.gz", "node-2": "/opt/web-{{ version }}.tar.gz"}
    assert _firing.leader_artifact_path("web", "1.2", "node-0", templates, ["node-1", "node-2"]) == "/srv/builds/web-1.2.tar.gz"


def test_targets_whose_artifact_paths_render_other_file_names_fire_nothing():
    templates = {"node-0": ARTIFACT, "node-1": "/data/{{ version }}.tar.gz", "node-2": "/opt/{{ app }}-{{ version }}.tar.gz"}
    with pytest.raises(ReleaseError, match=r"name its artifact of version 1\.2 differently \('1\.2\.tar\.gz' on node-1; "
                                           r"'web-1\.2\.tar\.gz' on node-0, node-2\)"):
        _firing.leader_artifact_path("web", "1.2", "node-0", templates, ["node-1", "node-2"])


def test_a_leader_without_the_artifact_fires_nothing():
    with pytest.raises(ReleaseError, match=r"the leader node-0 does not \(it serves the file from its own artifact\.path\)"):
        _firing.leader_artifact_path("web", "1", "node-0", {"node-1": ARTIFACT}, ["node-1"])


@pytest.mark.parametrize("addresses, ports, message", [
    ({"node-0": "10.0.0.1", "node-1": "node-1.example.com", "node-2": "10.0.0.3"},
     {"node-0": 6881, "node-1": 6881, "node-2": 6881},
     r"node node-1 cannot join the swarm of app 'web': its catalog peer address 'node-1\.example\.com' must be the unicast IP"),
    ({"node-0": "10.0.0.1", "node-2": "10.0.0.3"}, {"node-0": 6881, "node-1": 6881, "node-2": 6881},
     r"node node-1 cannot join the swarm of app 'web': its catalog peer address None must be the unicast IP"),
    ({"node-0": "10.0.0.1", "node-1": "0.0.0.0", "node-2": "10.0.0.3"}, {"node-0": 6881, "node-1": 6881, "node-2": 6881},
     r"node node-1 cannot join the swarm of app 'web': its catalog peer address '0\.0\.0\.0' must be the unicast IP"),
    ({"node-0": "10.0.0.1", "node-1": "10.0.0.2", "node-2": "10.0.0.3"}, {"node-0": 6881, "node-2": 6881},
     r"node node-1 advertises no swarm port for app 'web'"),
])
def test_a_node_the_swarm_cannot_reach_fires_nothing(addresses, ports, message):
    plan = plan_release(["node-0", "node-1", "node-2"], "node-0", 2, RUN_ID)
    with pytest.raises(ReleaseError, match=message):
        _firing._with_swarm_peers("web", plan, ["node-0", "node-1", "node-2"], "node-0", RUN_ID, addresses, ports)


def test_each_plan_entry_lists_its_neighbours_at_their_catalog_ip_and_advertised_port():
    names = [f"node-{index:02d}" for index in range(20)]
    addresses = {name: f"10.0.0.{index + 1}" for index, name in enumerate(names)}
    ports = {name: 6881 for name in names}
    plan = plan_release(names, names[0], 2, RUN_ID)
    with_peers, swarm = _firing._with_swarm_peers("web", plan, names, names[0], RUN_ID, addresses, ports)
    graph = swarm_neighbours(names, names[0], RUN_ID)
    assert all(entry.peers == tuple(f"{addresses[other]}:6881" for other in graph[name])
               for name, entry in with_peers.items())
    assert swarm.leader_peers == tuple(f"{addresses[other]}:6881" for other in graph[names[0]])
    assert {name: dataclasses.replace(entry, peers=None) for name, entry in with_peers.items()} == plan
