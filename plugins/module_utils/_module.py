# SPDX-License-Identifier: MIT
"""What every fireap module does around its call into module_utils.

Modules only: this file imports ansible, so the node handler never loads it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    CONNECTION_ARGUMENT_SPEC,
    HAS_PY_CONSUL,
    PY_CONSUL_IMPORT_ERROR,
    ConsulOptions,
    build_client,
    consul_errors,
)
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._kv import DEFAULT_PREFIX, Schema

#: Options every module takes besides the connection (doc fragment fireap.consul.app).
APP_ARGUMENT_SPEC = {
    "app": {"type": "str", "required": True},
    "kv_prefix": {"type": "str", "default": DEFAULT_PREFIX},
}


def fireap_argument_spec(**own) -> dict:
    """A module's argument spec: the options every fireap module shares, then its ``own``.

    The shared options are the Consul connection options (doc fragment fireap.consul.connection)
    and those of APP_ARGUMENT_SPEC (fireap.consul.app); :func:`fireap_consul` reads them. The
    result is a new dict, free to change. A module option may not reuse a shared option's name,
    which would silently give that name another meaning in this module.
    """
    shared = dict(CONNECTION_ARGUMENT_SPEC, **APP_ARGUMENT_SPEC)
    clash = sorted(set(own) & set(shared))
    if clash:
        raise ValueError(f"module options {', '.join(clash)} would replace shared options of the same name")
    return copy.deepcopy(dict(shared, **own))


@contextmanager
def fireap_consul(module, action: str):
    """Yield ``(client, schema)`` for the module's params; a fireap error ends it with fail_json.

    ``action`` names what the module does, for Consul error messages. The token joins the
    module's no_log values so that no result or message can show it.
    """
    if not HAS_PY_CONSUL:
        module.fail_json(msg=missing_required_lib("py-consul"), exception=str(PY_CONSUL_IMPORT_ERROR))
    try:
        schema = Schema(module.params["kv_prefix"])
    except ValueError as err:  # kv_prefix is one of the options this helper reads
        module.fail_json(msg=str(err))
    try:
        options = ConsulOptions.from_params(module.params)
        if options.token:
            module.no_log_values.add(options.token)
        with build_client(options) as client, consul_errors(options, action):
            yield client, schema
    except FireapError as err:
        module.fail_json(msg=str(err))
