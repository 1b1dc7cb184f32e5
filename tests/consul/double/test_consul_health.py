"""Health endpoint rules the project relies on (a crashed source is a node whose serfHealth is
critical; fire leaves such nodes reported as unreachable).

Sources: https://developer.hashicorp.com/consul/api-docs/health and hashicorp/consul
agent/health_endpoint.go (HealthChecksInState, HealthNodeChecks, healthServiceNodes with
getBoolQueryParam) with agent/consul/health_endpoint.go (no check of the state asked for: the
state store looks checks up by status).
"""

from __future__ import annotations

from consul_harness import unique_name


def test_a_node_s_checks_include_serf_health_passing(consul_target):
    """GET /health/node/:node lists the agent's serfHealth check, passing while it runs."""
    node = consul_target.node_names[0]
    response = consul_target.http("GET", f"/v1/health/node/{node}")
    assert response.status_code == 200, response.text
    serf = [check for check in response.json() if check["CheckID"] == "serfHealth"]
    assert [(check["Node"], check["Status"], check["ServiceTags"]) for check in serf] == [(node, "passing", [])]


def test_an_unknown_node_has_no_checks_and_an_index(consul_target):
    """A node the catalog does not hold (or no longer holds: it left) answers 200 [] with the
    checks table's index, not 404."""
    response = consul_target.http("GET", f"/v1/health/node/{unique_name('node')}")
    assert response.status_code == 200 and response.json() == []
    assert int(response.headers["X-Consul-Index"]) >= 1


def test_checks_in_an_unknown_state_are_an_empty_list(consul_target):
    """The state is not checked: a state no check is in answers 200 [] (only a missing one is a 400)."""
    response = consul_target.http("GET", "/v1/health/state/no-such-state")
    assert response.status_code == 200 and response.json() == []
    assert int(response.headers["X-Consul-Index"]) >= 1
    missing = consul_target.http("GET", "/v1/health/state/")
    assert missing.status_code == 400 and missing.text == "Missing check state"


def test_checks_in_state_any_list_every_node_s_serf_health(consul_target):
    response = consul_target.http("GET", "/v1/health/state/any")
    assert response.status_code == 200
    listed = {check["Node"] for check in response.json() if check["CheckID"] == "serfHealth"}
    assert set(consul_target.node_names) <= listed


def test_passing_takes_go_booleans_and_refuses_others(consul_target):
    """getBoolQueryParam: a bare ?passing (or ?passing=true) keeps only instances whose checks all
    pass, ?passing=false keeps every instance, and a value strconv.ParseBool refuses is a 400."""
    name = unique_name("service")
    for value in ("", "true", "1", "false", "F"):
        response = consul_target.http("GET", f"/v1/health/service/{name}", params={"passing": value})
        assert response.status_code == 200 and response.json() == [], (value, response.text)
    refused = consul_target.http("GET", f"/v1/health/service/{name}", params={"passing": "yes"})
    assert refused.status_code == 400 and refused.text == "Invalid value for ?passing"
