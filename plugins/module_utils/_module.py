# SPDX-License-Identifier: MIT
"""What every fireap module does around its call into module_utils.

Modules only: this file imports ansible, so the node handler never loads it.
"""

from __future__ import annotations

from contextlib import contextmanager

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    HAS_PY_CONSUL,
    PY_CONSUL_IMPORT_ERROR,
    ConsulOptions,
    FireapConsulError,
    build_client,
    consul_errors,
)
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.module_utils._release import ReleaseError


@contextmanager
def fireap_consul(module, action: str):
    """Yield ``(client, schema)`` for the module's params; a fireap error ends it with fail_json.

    ``action`` names what the module does, for Consul error messages. The token joins the
    module's no_log values so that no result or message can show it.
    """
    if not HAS_PY_CONSUL:
        module.fail_json(msg=missing_required_lib("py-consul"), exception=str(PY_CONSUL_IMPORT_ERROR))
    try:
        options = ConsulOptions.from_params(module.params)
        if options.token:
            module.no_log_values.add(options.token)
        schema = Schema(module.params["kv_prefix"])
        with build_client(options) as client, consul_errors(options, action):
            yield client, schema
    except (FireapConsulError, ReleaseError, ValueError) as err:
        module.fail_json(msg=str(err))
