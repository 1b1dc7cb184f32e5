# SPDX-License-Identifier: MIT
"""Action plugin fireap_fire: the module, run with the connection and Python of the host's fireap_node role.

Options the task leaves unset come from the host's fireap_node_consul_* variables (see
plugins/plugin_utils/_connection_vars.py), and config_path from its fireap_node_config_dir: the
leader's own task config, which names the artifact the fire publishes. The module does the work.
"""

from __future__ import annotations

from typing import Any

from ansible_collections.fireap.consul.plugins.plugin_utils._connection_vars import RoleConnectionAction, role_connection

#: The role variable of the directory of a node's task config (roles/fireap_node/defaults/main.yml).
CONFIG_DIR_VARIABLE = "fireap_node_config_dir"


def with_config_path(args: dict[str, Any], config_dir: Any) -> dict[str, Any]:
    """``args`` with config_path the role's config.yml in ``config_dir`` when the task leaves it unset."""
    if args.get("config_path") is None and config_dir:
        return dict(args, config_path=f"{str(config_dir).rstrip('/')}/config.yml")
    return args


class ActionModule(RoleConnectionAction):
    """Runs fireap.consul.fireap_fire on the host, with the host's task config."""

    def module_args(self, task_vars: dict[str, Any]) -> dict[str, Any]:
        """The role's connection and the role's task config of the host (of the delegated host with delegate_to)."""
        delegate = self._task.delegate_to
        host_vars = task_vars["ansible_delegated_vars"][delegate] if delegate else task_vars
        templar = self._templar.copy_with_new_env(available_variables=host_vars) if delegate else self._templar
        config_dir = templar.template(host_vars[CONFIG_DIR_VARIABLE]) if CONFIG_DIR_VARIABLE in host_vars else None
        return with_config_path(role_connection(self, task_vars), config_dir)
