# SPDX-License-Identifier: MIT
"""Action plugin fireap_info: the module, run with the connection and Python of the host's fireap_node role.

Options the task leaves unset come from the host's fireap_node_consul_* variables (see
plugins/plugin_utils/_connection_vars.py); the module does the work.
"""

from __future__ import annotations

from ansible_collections.fireap.consul.plugins.plugin_utils._connection_vars import RoleConnectionAction


class ActionModule(RoleConnectionAction):
    """Runs fireap.consul.fireap_info on the host."""
