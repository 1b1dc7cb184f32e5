"""The fireap_node role's variables as the fireap modules' connection, and the role's Python for them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ansible_collections.fireap.consul.plugins.action import fireap_clear, fireap_fire, fireap_info
from ansible_collections.fireap.consul.plugins.module_utils._connection import CONNECTION_ARGUMENT_SPEC
from ansible_collections.fireap.consul.plugins.plugin_utils import _connection_vars
from ansible_collections.fireap.consul.plugins.plugin_utils._connection_vars import (
    DEFAULT_PREFIX,
    ROLE_VARIABLES,
    role_connection,
    role_python,
    with_role_options,
)

ROOT = Path(__file__).resolve().parents[4]
ROLE_DEFAULTS = yaml.safe_load((ROOT / "roles" / "fireap_node" / "defaults" / "main.yml").read_text(encoding="utf-8"))
TOKEN = "role-token-0000-4000-8000"
#: The variables of a leader in an inventory the role was applied with.
LEADER_VARS = {
    "fireap_node_consul_host": "10.0.0.7",
    "fireap_node_consul_port": 8501,
    "fireap_node_consul_scheme": "https",
    "fireap_node_consul_validate_certs": False,
    "fireap_node_consul_ca_path": "/etc/consul.d/ca.pem",
    "fireap_node_consul_client_cert": "/etc/consul.d/client.pem",
    "fireap_node_consul_client_key": "/etc/consul.d/client-key.pem",
    "fireap_node_consul_token": TOKEN,
    "fireap_node_kv_prefix": "releases/",
}


def test_every_agent_setting_of_the_role_is_a_module_option():
    """Each connection option but the HTTP timing has a role variable, and each one the role has."""
    assert set(ROLE_VARIABLES) == set(CONNECTION_ARGUMENT_SPEC) - {"timeout", "retries"} | {"kv_prefix"}
    assert set(ROLE_VARIABLES.values()) <= set(ROLE_DEFAULTS)
    assert DEFAULT_PREFIX == ROLE_DEFAULTS["fireap_node_prefix"]


def test_unset_options_come_from_the_role_variables():
    assert with_role_options({"app": "web"}, LEADER_VARS) == {
        "app": "web", "host": "10.0.0.7", "port": 8501, "scheme": "https", "validate_certs": False,
        "ca_path": "/etc/consul.d/ca.pem", "client_cert": "/etc/consul.d/client.pem",
        "client_key": "/etc/consul.d/client-key.pem", "token": TOKEN, "kv_prefix": "releases/",
    }


def test_options_the_task_sets_win_and_none_counts_as_unset():
    args = {"app": "web", "port": 8600, "validate_certs": True, "token": None}
    filled = with_role_options(args, LEADER_VARS)
    assert (filled["port"], filled["validate_certs"], filled["token"]) == (8600, True, TOKEN)


def test_empty_role_variables_set_nothing():
    """The role's defaults for the TLS files and the token are empty strings: none."""
    role_vars = {"fireap_node_consul_ca_path": "", "fireap_node_consul_token": "", "fireap_node_consul_port": None,
                 "fireap_node_consul_validate_certs": False}
    assert with_role_options({"app": "web"}, role_vars) == {"app": "web", "validate_certs": False}


def test_the_role_s_python_is_its_own_setting_else_its_venv():
    assert role_python({}) == "/opt/fireap/venv/bin/python"
    venv = role_python({"fireap_node_prefix": "/srv/fireap/", "fireap_node_python": ""})
    assert venv == "/srv/fireap/venv/bin/python"
    assert role_python({"fireap_node_prefix": "/srv/fireap", "fireap_node_python": "/usr/bin/python3.12"}) == (
        "/usr/bin/python3.12")


class Templar:
    """Resolves ``{{ name }}`` from the variables it was made with, as Ansible's templar does."""

    def __init__(self, variables: dict) -> None:
        self.variables = variables

    def template(self, value):
        if isinstance(value, str) and value.startswith("{{ ") and value.endswith(" }}"):
            return self.variables[value[3:-3]]
        return value

    def copy_with_new_env(self, available_variables: dict) -> Templar:
        return Templar(available_variables)


def action(task_vars: dict, args: dict, existing: set[str], delegate_to: str | None = None) -> SimpleNamespace:
    """What role_connection uses of an action plugin; ``existing`` are the files on its host."""
    checked: list[str] = []

    def exists(path: str) -> bool:
        checked.append(path)
        return path in existing

    return SimpleNamespace(_task=SimpleNamespace(args=args, delegate_to=delegate_to), _templar=Templar(task_vars),
                           _remote_file_exists=exists, checked=checked)


@pytest.fixture(autouse=True)
def no_interpreter_configured(monkeypatch):
    """Ansible's configuration as it is by default: no interpreter_python set."""
    monkeypatch.delenv("ANSIBLE_PYTHON_INTERPRETER", raising=False)


def test_the_role_s_venv_runs_the_module_when_the_host_names_no_python():
    task_vars = dict(LEADER_VARS, fireap_node_prefix="/srv/fireap", vault_port=8502,
                     fireap_node_consul_port="{{ vault_port }}")
    plugin = action(task_vars, {"app": "web"}, {"/srv/fireap/venv/bin/python"})
    args = role_connection(plugin, task_vars)
    assert args["port"] == 8502 and args["token"] == TOKEN
    # For the rest of the task: the module and, under async, the polling of its job.
    assert task_vars["ansible_python_interpreter"] == "/srv/fireap/venv/bin/python"
    role_connection(plugin, task_vars)
    assert plugin.checked == ["/srv/fireap/venv/bin/python"], "a retry of the task checks no more"


def test_the_host_s_own_python_and_a_missing_venv_are_left_to_ansible():
    chosen = dict(LEADER_VARS, ansible_python_interpreter="/usr/bin/python3")
    plugin = action(chosen, {"app": "web"}, {"/opt/fireap/venv/bin/python"})
    role_connection(plugin, chosen)
    assert chosen["ansible_python_interpreter"] == "/usr/bin/python3" and plugin.checked == []
    task_vars = dict(LEADER_VARS)
    plugin = action(task_vars, {"app": "web"}, set())
    role_connection(plugin, task_vars)
    assert task_vars == LEADER_VARS and plugin.checked == ["/opt/fireap/venv/bin/python"]


def test_a_configured_interpreter_is_left_to_ansible(monkeypatch):
    monkeypatch.setenv("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
    task_vars = dict(LEADER_VARS)
    role_connection(action(task_vars, {"app": "web"}, {"/opt/fireap/venv/bin/python"}), task_vars)
    assert task_vars == LEADER_VARS


def test_a_delegated_task_takes_the_delegated_host_s_variables():
    leader = dict(LEADER_VARS, fireap_node_consul_port="{{ agent_port }}", agent_port=8503)
    task_vars = {"ansible_python_interpreter": "/usr/bin/python3", "ansible_delegated_vars": {"leader": leader}}
    plugin = action(task_vars, {"app": "web"}, {"/opt/fireap/venv/bin/python"}, delegate_to="leader")
    args = role_connection(plugin, task_vars)
    assert (args["host"], args["port"]) == ("10.0.0.7", 8503)
    assert leader["ansible_python_interpreter"] == "/opt/fireap/venv/bin/python"
    assert task_vars["ansible_python_interpreter"] == "/usr/bin/python3"


def test_the_plugins_of_the_modules_use_it():
    for plugin in (fireap_fire, fireap_info, fireap_clear):
        assert issubclass(plugin.ActionModule, _connection_vars.RoleConnectionAction)
