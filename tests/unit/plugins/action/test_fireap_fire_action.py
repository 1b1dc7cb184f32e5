"""The fireap_fire action plugin's config_path: the host's role config, unless the task names one."""

from __future__ import annotations

from ansible_collections.fireap.consul.plugins.action.fireap_fire import with_config_path


def test_config_path_is_the_roles_config_file_of_the_host():
    assert with_config_path({"app": "web"}, "/srv/fireap/etc/") == {"app": "web", "config_path": "/srv/fireap/etc/config.yml"}


def test_a_config_path_the_task_gives_or_a_host_without_the_role_variable_is_left_alone():
    assert with_config_path({"app": "web", "config_path": "/tmp/c.yml"}, "/etc/fireap") == {
        "app": "web", "config_path": "/tmp/c.yml"}
    assert with_config_path({"app": "web", "config_path": None}, None) == {"app": "web", "config_path": None}
