# SPDX-License-Identifier: MIT
"""The fireap_node role's variables of a host as the connection of the fireap modules run there.

The role gives each node's handler the address, TLS files, token and KV prefix of its local
agent (``fireap_node_consul_*``, ``fireap_node_kv_prefix``) and a Python that has py-consul. The
modules' action plugins run a module on a host with the same settings, so that
``ansible <leader> -m fireap.consul.fireap_fire -a app=web`` needs nothing but the inventory the
role was applied with, as a play with ``module_defaults`` set from those variables would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible import constants as C
from ansible.plugins.action import ActionBase
from ansible.utils.vars import merge_hash

#: Module option -> the role variable that sets it for a host (roles/fireap_node/defaults/main.yml).
ROLE_VARIABLES = {
    "host": "fireap_node_consul_host",
    "port": "fireap_node_consul_port",
    "scheme": "fireap_node_consul_scheme",
    "validate_certs": "fireap_node_consul_validate_certs",
    "ca_path": "fireap_node_consul_ca_path",
    "client_cert": "fireap_node_consul_client_cert",
    "client_key": "fireap_node_consul_client_key",
    "token": "fireap_node_consul_token",
    "kv_prefix": "fireap_node_kv_prefix",
}
#: The role's default fireap_node_prefix, where its venv is when the host does not set the prefix.
DEFAULT_PREFIX = "/opt/fireap"
#: The role variables that say which Python the role runs the handler with.
PYTHON_VARIABLES = ("fireap_node_python", "fireap_node_prefix")
INTERPRETER_VARIABLE = "ansible_python_interpreter"


def with_role_options(args: Mapping[str, Any], role_vars: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` with every option they leave unset (absent or None) taken from ``role_vars``.

    A variable that is None or empty sets nothing: the role reads an empty ca_path, client
    certificate or token as none, and the module then applies the environment and its defaults.
    """
    filled = dict(args)
    for option, variable in ROLE_VARIABLES.items():
        value = role_vars.get(variable)
        if filled.get(option) is None and value is not None and value != "":
            filled[option] = value
    return filled


def role_python(role_vars: Mapping[str, Any]) -> str:
    """The Python the role runs the handler with: fireap_node_python, else the role's venv."""
    python = role_vars.get("fireap_node_python")
    if python:
        return str(python)
    prefix = str(role_vars.get("fireap_node_prefix") or DEFAULT_PREFIX).rstrip("/")
    return f"{prefix}/venv/bin/python"


def python_chosen(host_vars: Mapping[str, Any]) -> bool:
    """Whether the host's variables or the configuration name the Python for modules."""
    if INTERPRETER_VARIABLE in host_vars:
        return True
    _value, origin = C.config.get_config_value_and_origin("INTERPRETER_PYTHON", variables=host_vars)
    return origin != "default"


def role_connection(action: ActionBase, task_vars: dict[str, Any]) -> dict[str, Any]:
    """The task's args with the connection options and kv_prefix they leave unset taken from the
    host's role variables (the task's args include ``module_defaults``, so both win).

    When the host names no Python and the role's exists there, ``task_vars`` get it as
    ``ansible_python_interpreter`` for the rest of the task, so that the module and, under
    ``async``, the polling of its job run with it. With ``delegate_to``, the delegated host's
    variables count.
    """
    delegate = action._task.delegate_to
    host_vars = task_vars["ansible_delegated_vars"][delegate] if delegate else task_vars
    templar = action._templar.copy_with_new_env(available_variables=host_vars) if delegate else action._templar
    wanted = (*ROLE_VARIABLES.values(), *PYTHON_VARIABLES)
    role_vars = {name: templar.template(host_vars[name]) for name in wanted if name in host_vars}
    if not python_chosen(host_vars):
        python = role_python(role_vars)
        if action._remote_file_exists(python):
            host_vars[INTERPRETER_VARIABLE] = python
    return with_role_options(action._task.args, role_vars)


class RoleConnectionAction(ActionBase):
    """Run the task's module with the connection and Python of the host's fireap_node role (role_connection)."""

    _supports_check_mode = True
    _supports_async = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp  # no longer has any effect
        task_vars = {} if task_vars is None else task_vars
        args = self.module_args(task_vars)
        wrap_async = self._task.async_val and not self._connection.has_native_async
        ran = self._execute_module(module_args=args, task_vars=task_vars, wrap_async=wrap_async)
        result = merge_hash(result, ran)
        if not wrap_async:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result

    def module_args(self, task_vars: dict[str, Any]) -> dict[str, Any]:
        """The module's arguments: the task's with the role's connection (role_connection)."""
        return role_connection(self, task_vars)
