"""ACL rules the project relies on: requests carry the token in X-Consul-Token.

Sources: https://developer.hashicorp.com/consul/api-docs/api-structure#authentication,
https://developer.hashicorp.com/consul/api-docs/kv, https://developer.hashicorp.com/consul/api-docs/event
"""

from __future__ import annotations

import uuid

import consul
import pytest
from consul_harness import unique_name

WRITES = [
    ("/v1/kv/{prefix}acl", b"v"),
    ("/v1/event/fire/{event}", b"v"),
    ("/v1/session/create", b"{}"),
]


@pytest.fixture
def acl_prefix(acl_target):
    prefix = f"fireap-test/{uuid.uuid4()}/"
    yield prefix
    acl_target.http("DELETE", f"/v1/kv/{prefix}", params={"recurse": ""})


@pytest.mark.parametrize("path, body", WRITES)
def test_write_without_a_token_is_permission_denied(acl_target, acl_prefix, path, body):
    """Without a token (anonymous, no write rights) the write is refused: 403 Permission denied."""
    url = path.format(prefix=acl_prefix, event=unique_name("event"))
    response = acl_target.http("PUT", url, data=body, token=None)
    assert response.status_code == 403
    assert "Permission denied" in response.text


@pytest.mark.parametrize("path, body", WRITES)
def test_write_with_an_unknown_token_is_refused(acl_target, acl_prefix, path, body):
    """A token the servers do not know is refused (403)."""
    url = path.format(prefix=acl_prefix, event=unique_name("event"))
    assert acl_target.http("PUT", url, data=body, token=str(uuid.uuid4())).status_code == 403


def test_requests_with_the_token_succeed(acl_target, acl_prefix):
    """With a token granting the rights, KV write and read, event fire and session create answer 200."""
    key = acl_prefix + "acl"
    assert acl_target.http("PUT", f"/v1/kv/{key}", data=b"v").json() is True
    assert acl_target.http("GET", f"/v1/kv/{key}", params={"raw": ""}).content == b"v"
    assert acl_target.http("PUT", f"/v1/event/fire/{unique_name('event')}", data=b"v").status_code == 200
    created = acl_target.http("PUT", "/v1/session/create")
    assert created.status_code == 200
    assert acl_target.http("PUT", f"/v1/session/destroy/{created.json()['ID']}").json() is True


def test_py_consul_client_sends_the_token(acl_target, acl_prefix):
    """py-consul sends its token as X-Consul-Token; without one it gets ACLPermissionDenied."""
    key = acl_prefix + "client"
    assert acl_target.client().kv.put(key, "v") is True
    with pytest.raises(consul.ACLPermissionDenied):
        acl_target.client(token=None).kv.put(key, "w")
    assert acl_target.client().kv.get(key)[1]["Value"] == b"v"
