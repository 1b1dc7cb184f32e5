"""The task list: ``fireap-reap --list`` of a node's task config, and the apps view of the nodes' adverts
(``_task_list.group_adverts``, what fireap_info reports with view=apps), without Consul."""

from __future__ import annotations

import io
import json

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._kv import AppAdvert, NodeAdvert
from ansible_collections.fireap.consul.plugins.module_utils._reap import main
from ansible_collections.fireap.consul.plugins.module_utils._task_list import APPS_MAX, group_adverts
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import write_config

APPS = {
    "web": {
        "service": "web",
        "tag_regexp": "^(blue|green)$",
        "before_commands": ["systemctl stop web"],
        "exec_commands": ["rsync -a {{ remote.address }}::apps/{{ app }}/ /srv/{{ app }}/"],
        "after_commands": ["systemctl start web"],
    },
    "batch": {"max_semaphores": 2, "command_timeout": 12.5, "on_command_failure": "ignore",
              "exec_commands": ["printf 'one\\ntwo\\n'\nexit 0"]},
}


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


# --- fireap-reap --list ----------------------------------------------------------------------------


def test_list_shows_each_app_s_merged_settings_and_its_commands_as_configured(tmp_path):
    config = write_config(tmp_path / "c.yml", {"port": 8500}, "fireap/", APPS,
                          defaults={"watch_timeout": 90, "max_semaphores": 4}, log_level="warning")
    code, text = run("--config", str(config), "--list")
    assert code == 0
    assert text.splitlines() == [
        f"{config}: 2 app(s); log_level warning",
        "APP    MAX_SEMAPHORES  WATCH_TIMEOUT  COMMAND_TIMEOUT  ON_COMMAND_FAILURE  SERVICE_FILTER  TAG_FILTER",
        "web    4               90             300              abort               ^web$           ^(blue|green)$",
        "batch  2               90             12.5             ignore              -               -",
        "",
        "web:",
        "  before_commands: systemctl stop web",
        "  exec_commands: rsync -a {{ remote.address }}::apps/{{ app }}/ /srv/{{ app }}/",
        "  after_commands: systemctl start web",
        "",
        "batch:",
        "  exec_commands: printf 'one\\ntwo\\n'\\nexit 0",  # one line per command: the newline is escaped
    ]
    assert not (tmp_path / "state").exists() and not (tmp_path / "log").exists()


def test_list_json_is_the_config_s_apps_in_order_with_their_commands_unescaped(tmp_path):
    config = write_config(tmp_path / "c.yml", {"port": 8500}, "fireap/", APPS)
    code, text = run("--config", str(config), "--list", "--json")
    assert code == 0
    listed = json.loads(text)
    assert (listed["config"], listed["log_level"], list(listed["apps"])) == (str(config), "info", ["web", "batch"])
    assert listed["apps"]["batch"] == {
        "max_semaphores": 2, "watch_timeout": 600, "command_timeout": 12.5, "on_command_failure": "ignore",
        "before_commands": [], "exec_commands": ["printf 'one\\ntwo\\n'\nexit 0"], "after_commands": [],
        "service_filter": None, "tag_filter": None, "verify_file": None, "verify_commands": [],
    }
    assert listed["apps"]["web"]["service_filter"] == "^web$"


def test_list_of_a_config_without_apps(tmp_path):
    config = write_config(tmp_path / "c.yml", {}, "fireap/", {})
    assert run("--config", str(config), "--list") == (0, f"{config}: 0 app(s); log_level info\n")


@pytest.mark.parametrize("consul, apps, message", [
    ({}, {"web": {"exec_comands": ["true"]}}, "apps.web.exec_comands: unknown key; did you mean 'exec_commands'?"),
    ({"port": "8500"}, {"web": {"exec_commands": ["true"]}}, "consul: port must be an integer"),
])
@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_list_refuses_an_invalid_config_as_check_does(tmp_path, capsys, consul, apps, message, as_json):
    config = write_config(tmp_path / "c.yml", consul, "fireap/", apps)
    assert run("--config", str(config), "--list", *as_json) == (2, "")
    err = capsys.readouterr().err
    assert err.startswith("fireap-reap: invalid config:\n") and message in err
    assert run("--config", str(config), "--check") == (2, "")
    assert capsys.readouterr().err == err


@pytest.mark.parametrize("argv", [["--json"], ["--check", "--json"], ["--list", "--check"], ["--list", "--worker", "web"]])
def test_json_goes_with_list_only_and_list_with_no_other_mode(argv, capsys):
    assert run(*argv)[0] == 2
    assert "usage: fireap-reap" in capsys.readouterr().err


# --- the apps view of the nodes' adverts ---------------------------------------------------------


WEB = AppAdvert(max_semaphores=3, service_filter="^web$")
WEB_WIDE = AppAdvert(max_semaphores=8, service_filter="^web$")
BATCH = AppAdvert(max_semaphores=5)


def test_the_view_groups_the_nodes_of_each_app_by_the_settings_they_advertise():
    adverts = {
        "node-1": NodeAdvert({"web": WEB, "batch": BATCH}),
        "node-2": NodeAdvert({"web": WEB_WIDE}),
        "node-3": NodeAdvert({"web": WEB}),
        "node-4": NodeAdvert({}),
        "gone-1": NodeAdvert({"web": WEB, "old": BATCH}),
    }
    catalog = ["node-1", "node-2", "node-3", "node-4", "node-5", "bad name"]
    view = group_adverts(adverts, catalog, warnings=["an unreadable advert"])
    assert list(view["apps"]) == ["batch", "old", "web"]
    assert view["apps"]["web"] == {
        "nodes": ["node-1", "node-2", "node-3"],
        "fanout": 3,
        "settings": [{"max_semaphores": 3, "service_filter": "^web$", "tag_filter": None, "nodes": ["node-1", "node-3"]},
                     {"max_semaphores": 8, "service_filter": "^web$", "tag_filter": None, "nodes": ["node-2"]}],
        "absent_nodes": ["gone-1"],
    }
    assert view["apps"]["batch"]["nodes"] == ["node-1"] and view["apps"]["batch"]["fanout"] == 5
    assert view["apps"]["old"] == {"nodes": [], "fanout": None, "settings": [], "absent_nodes": ["gone-1"]}
    assert view["nodes_without_apps"] == ["node-4", "node-5"]
    assert view["warnings"] == ["an unreadable advert"]


def test_the_view_of_one_app():
    adverts = {"node-1": NodeAdvert({"web": WEB, "batch": BATCH}), "node-2": NodeAdvert({"batch": BATCH})}
    view = group_adverts(adverts, ["node-1", "node-2"], app="web")
    assert list(view["apps"]) == ["web"] and view["apps"]["web"]["nodes"] == ["node-1"]
    assert group_adverts(adverts, ["node-1", "node-2"], app="nosuchapp")["apps"] == {}


def test_a_flood_of_made_up_apps_is_cut_at_apps_max_with_a_warning():
    names = [f"app{index:05d}" for index in range(2 * APPS_MAX)]
    adverts = {"node-1": NodeAdvert({name: BATCH for name in names[:APPS_MAX]}),
               "node-2": NodeAdvert({name: BATCH for name in names[APPS_MAX:]})}
    view = group_adverts(adverts, ["node-1", "node-2"])
    assert list(view["apps"]) == names[:APPS_MAX]
    assert view["warnings"] == [f"the nodes advertise {2 * APPS_MAX} apps; listed are the first {APPS_MAX} by name"]
