# SPDX-License-Identifier: MIT
"""Documentation of the options besides the connection that every fireap module accepts."""

from __future__ import annotations


class ModuleDocFragment:
    """Use with ``extends_documentation_fragment: [fireap.consul.app]``.

    The matching argument spec comes from ``fireap_argument_spec()`` in module_utils/_module.py.
    """

    DOCUMENTATION = r"""
options:
  app:
    description:
      - Name of the app, as configured on the nodes (a key of C(apps) in their task config).
      - Letters, digits, V(_), V(.) and V(-) only.
    type: str
    required: true
  kv_prefix:
    description:
      - Consul KV prefix under which fireap keeps its state; must match the nodes' configuration.
      - Must end with V(/).
    type: str
    default: fireap/
"""
