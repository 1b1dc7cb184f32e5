# SPDX-License-Identifier: MIT
"""Documentation of the Consul connection options every fireap module accepts."""

from __future__ import annotations


class ModuleDocFragment:
    """Use with ``extends_documentation_fragment: [fireap.consul.connection]``.

    The matching argument spec comes from ``fireap_argument_spec()`` in module_utils/_module.py.
    """

    DOCUMENTATION = r"""
options:
  host:
    description:
      - Host name or IP address of the Consul agent whose HTTP API the module talks to.
      - An IPv6 address may be given with or without brackets.
      - When unset, the host's variable C(fireap_node_consul_host) is used (see the notes), else the host
        of the E(CONSUL_HTTP_ADDR) environment variable (V(host:port), V(http://host:port) or
        V(https://host:port); a V(unix://) socket address is refused), else V(127.0.0.1).
    type: str
  port:
    description:
      - TCP port of the agent's HTTP API.
      - When unset, the host's variable C(fireap_node_consul_port) is used; when that is unset too and
        O(host) is unset, the port of E(CONSUL_HTTP_ADDR) (V(80) or V(443) by its scheme when the address
        names none, as with the Consul CLI), else V(8500).
      - When O(host) is set, the port defaults to V(8500).
    type: int
  scheme:
    description:
      - Protocol of the agent's HTTP API.
      - When unset, the host's variable C(fireap_node_consul_scheme) is used, else V(https) if
        E(CONSUL_HTTP_ADDR) starts with V(https://) (and supplied the host) or if E(CONSUL_HTTP_SSL) is true,
        otherwise V(http).
    type: str
    choices: [http, https]
  validate_certs:
    description:
      - Whether to verify the agent's TLS certificate when O(scheme=https).
      - When unset, the host's variable C(fireap_node_consul_validate_certs) is used, else the value of
        E(CONSUL_HTTP_SSL_VERIFY), else V(true).
      - V(false) disables verification even when O(ca_path) is set.
    type: bool
  ca_path:
    description:
      - CA certificate file (PEM), or directory of CA certificates prepared with C(openssl rehash),
        to verify the agent's certificate with when O(scheme=https) and O(validate_certs=true); the
        system's CAs are used when unset.
      - When unset, the host's variable C(fireap_node_consul_ca_path) is used, else the value of
        E(CONSUL_CACERT), else that of E(CONSUL_CAPATH).
      - The path must exist on the host the module runs on.
    type: path
  client_cert:
    description:
      - Client certificate file (PEM) to present to an agent that verifies its HTTPS clients (Consul's
        C(verify_incoming)), with O(client_key). Only used when O(scheme=https).
      - When unset, the host's variable C(fireap_node_consul_client_cert) is used, else the value of
        E(CONSUL_CLIENT_CERT).
      - O(client_cert) and O(client_key) go together; the files must exist on the host the module runs on.
    type: path
  client_key:
    description:
      - Private key file (PEM, not encrypted) of O(client_cert).
      - When unset, the host's variable C(fireap_node_consul_client_key) is used, else the value of
        E(CONSUL_CLIENT_KEY).
    type: path
  token:
    description:
      - ACL token sent with every request (header C(X-Consul-Token)).
      - When unset, the host's variable C(fireap_node_consul_token) is used, else the content of the file
        named by E(CONSUL_HTTP_TOKEN_FILE) (surrounding whitespace removed), else the value of
        E(CONSUL_HTTP_TOKEN); as with the Consul CLI, the token file wins over the token variable.
      - When no token is found, requests are anonymous.
      - The token never appears in results or error messages.
    type: str
  timeout:
    description:
      - Seconds to wait for the agent to accept a connection and to answer a request.
      - A blocking query adds its wait time and Consul's jitter (wait/16) to it.
      - Defaults to V(30).
    type: float
  retries:
    description:
      - How many times a request is sent again after a failure that is safe to retry, with
        exponential backoff and jitter between attempts (under half a second at first, doubling up
        to at most 8 seconds).
      - Reads are retried when no connection could be made, after a timeout or a dropped
        connection, and on HTTP 429, 500, 502, 503 and 504.
      - Writes are retried only when Consul cannot have acted on them, that is when no connection
        could be made or on HTTP 429; never after a timeout, a dropped connection or another error.
      - V(0) disables retries. Defaults to V(3).
    type: int
notes:
  - The module's action plugin fills each connection option left unset (neither given nor set in
    C(module_defaults)) from the host's variable of the M(fireap.consul.fireap_node) role, C(fireap_node_consul_host),
    C(_port), C(_scheme), C(_validate_certs), C(_ca_path), C(_client_cert), C(_client_key) and C(_token), and
    O(kv_prefix) from C(fireap_node_kv_prefix), so the inventory the role was applied with is all an ad hoc
    command on the leader needs. Variables that are unset or empty set nothing; the token is never shown.
  - When the host sets no C(ansible_python_interpreter) (and no C(interpreter_python) is configured), the
    module runs with the role's Python on that host when it exists there, C(fireap_node_python), else
    C(<fireap_node_prefix>/venv/bin/python) (V(/opt/fireap/venv/bin/python) by default), which has
    py-consul; otherwise Ansible picks the Python as usual.
  - The environment variable fallbacks of the connection options are applied by the module
    itself, on the host it runs on, and only to options still unset. They are the same variables
    the Consul CLI reads, and the node handler resolves them in the same way.
requirements:
  - py-consul (Python library) on the host the module runs on
"""
