"""Consul targets for tests: a real agent named by the environment, or the project's Consul double.

A real agent is used when FIREAP_TEST_CONSUL_HTTP_ADDR is set (``host:port`` or
``http(s)://host:port``, token from FIREAP_TEST_CONSUL_HTTP_TOKEN). Otherwise the double is
started as ``python -m devcluster serve`` (devcluster.consul.ServeProcess) on a free port range
and stopped afterwards: tests start it with the ``make_double`` fixture (tests/conftest.py),
which calls start_double here. Agents are devcluster's node record, NodeInfo.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import urllib.parse
import uuid
from pathlib import Path

import consul
import requests

from devcluster.consul import NodeInfo, Realism, ServeError, ServeProcess

ADDR_ENV = "FIREAP_TEST_CONSUL_HTTP_ADDR"
TOKEN_ENV = "FIREAP_TEST_CONSUL_HTTP_TOKEN"

#: Marks "send the target's own token" in ConsulTarget.client() and .http(); pass None for no token.
TARGET_TOKEN = object()

DOUBLE_START_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0


class HarnessError(RuntimeError):
    """A Consul target could not be reached or started."""


class ConsulTarget:
    """The agents under test, with py-consul clients and a raw HTTP helper.

    ``double`` is the ServeProcess serving them when they are the project's double (None for a
    real agent): its ``workdir`` holds the inventory and node directories, ``kill()`` crashes it.
    ``close()`` (or the end of a ``with`` block) closes the clients and stops that double.
    """

    def __init__(self, agents: list[NodeInfo], token: str | None = None, double: ServeProcess | None = None) -> None:
        if not agents:
            raise HarnessError("a Consul target needs at least one agent")
        self.agents = list(agents)
        self.token = token
        self.double = double
        self._http = requests.Session()
        self._clients: dict[tuple[int, str | None], consul.Consul] = {}

    def __enter__(self) -> ConsulTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def multi_agent(self) -> bool:
        return len(self.agents) > 1

    @property
    def node_names(self) -> list[str]:
        return [agent.name for agent in self.agents]

    def client(self, agent: int = 0, token=TARGET_TOKEN) -> consul.Consul:
        """A py-consul client for agent number *agent* (the token is set explicitly, never from CONSUL_HTTP_TOKEN)."""
        chosen = self.token if token is TARGET_TOKEN else token
        client = self._clients.get((agent, chosen))
        if client is None:
            endpoint = self.agents[agent]
            client = consul.Consul(host=endpoint.host, port=endpoint.port, scheme=endpoint.scheme, token=chosen)
            # py-consul lets CONSUL_HTTP_TOKEN override the token argument; tests need exactly *chosen*.
            client.token = chosen
            self._clients[(agent, chosen)] = client
        return client

    def http(
        self,
        method: str,
        path: str,
        agent: int = 0,
        *,
        params=None,
        data: bytes | str | None = None,
        json_body=None,
        token=TARGET_TOKEN,
        timeout: float = HTTP_TIMEOUT,
    ) -> requests.Response:
        """Send one request to agent number *agent*; *path* starts with /v1/."""
        headers = {}
        chosen = self.token if token is TARGET_TOKEN else token
        if chosen:
            headers["X-Consul-Token"] = chosen
        return self._http.request(
            method,
            self.agents[agent].base_url + path,
            params=params,
            data=data,
            json=json_body,
            headers=headers,
            timeout=timeout,
        )

    def close(self) -> None:
        for client in self._clients.values():
            client.http.session.close()
        self._clients.clear()
        self._http.close()
        if self.double is not None:
            self.double.stop()


def parse_http_addr(value: str) -> tuple[str, str, int]:
    """Split ``host:port`` or ``http(s)://host:port`` into (scheme, host, port)."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parsed = urllib.parse.urlsplit(text)
    try:
        port = parsed.port
    except ValueError as err:
        raise HarnessError(f"{ADDR_ENV}={value!r}: bad port ({err})") from err
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
        raise HarnessError(f"{ADDR_ENV}={value!r} must be host:port, http://host:port or https://host:port")
    if parsed.path not in ("", "/") or parsed.query:
        raise HarnessError(f"{ADDR_ENV}={value!r} must not carry a path or query")
    return parsed.scheme, parsed.hostname, port


def real_target_from_env() -> ConsulTarget | None:
    """The real agent named by FIREAP_TEST_CONSUL_HTTP_ADDR, or None when it is unset."""
    addr = os.environ.get(ADDR_ENV)
    if not addr:
        return None
    scheme, host, port = parse_http_addr(addr)
    token = os.environ.get(TOKEN_ENV) or None
    probe = ConsulTarget([NodeInfo(name="", host=host, port=port, scheme=scheme)], token=token)
    try:
        response = probe.http("GET", "/v1/agent/self")
    except requests.RequestException as err:
        raise HarnessError(f"cannot reach the Consul agent at {addr}: {err}") from err
    finally:
        probe.close()
    if response.status_code != 200:
        raise HarnessError(f"GET /v1/agent/self on {addr}: {response.status_code} {response.text.strip()}")
    name = response.json()["Config"]["NodeName"]
    return ConsulTarget([NodeInfo(name=name, host=host, port=port, scheme=scheme)], token=token)


def start_double(
    workdir: Path,
    nodes: int = 3,
    *,
    acl_token: str | None = None,
    data_dir: Path | None = None,
    timeout: float = DOUBLE_START_TIMEOUT,
    realism: Realism | None = None,
) -> ConsulTarget:
    """Start ``python -m devcluster serve`` (as unkind as ``realism`` says) and wait until every
    agent listens; its target (``target.double`` is the ServeProcess). Tests call it through the
    ``make_double`` fixture."""
    if nodes < 1:
        raise HarnessError(f"the double needs at least one node, not {nodes}")
    double = ServeProcess(nodes, workdir, acl_token=acl_token, data_dir=data_dir, realism=realism)
    try:
        double.start(timeout)
    except ServeError as err:
        raise HarnessError(str(err)) from None
    return ConsulTarget(double.nodes, token=acl_token, double=double)


def unique_name(kind: str = "name") -> str:
    """A name no other test run uses, e.g. for events or services: ``fireap-test-<kind>-<hex>``."""
    return f"fireap-test-{kind}-{uuid.uuid4().hex}"


def event_index(event_id: str) -> int:
    """The X-Consul-Index /v1/event/list derives from an event UUID: XOR of its two 64-bit halves."""
    digits = event_id.replace("-", "")
    if len(digits) != 32:
        raise ValueError(f"not a UUID: {event_id!r}")
    return int(digits[:16], 16) ^ int(digits[16:], 16)


def in_background(fn, *args, **kwargs) -> concurrent.futures.Future:
    """Run *fn* in a daemon thread (a blocking query that never returns cannot hang the test run)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to the waiting test
            future.set_exception(err)

    threading.Thread(target=run, daemon=True).start()
    return future
