"""The replay of recorded Consul answers: answers in the recorded order, and a loud failure for a
request nobody recorded, even where the code under test catches what the transport raises."""

from __future__ import annotations

import pytest
import requests

from ansible_collections.fireap.consul.tests.unit.plugins.modules.consul_answers import (
    ReplayedConsul,
    UnrecordedRequest,
    consul_transport,
    request_of,
)

URL = "http://127.0.0.1:8500/v1/kv/fireap/web/release"


def _exchange(query: str, value: str) -> dict:
    return {"request": request_of("GET", f"{URL}?{query}"),
            "response": {"status": 200, "headers": {"X-Consul-Index": "7"}, "json": [{"Value": value}]}}


def test_a_request_sent_twice_gets_its_answers_in_the_recorded_order_whatever_the_order_of_its_query():
    recorded = [_exchange("consistent=&recurse=", "first"), _exchange("consistent=&recurse=", "second")]
    consul = ReplayedConsul("order", recorded)
    with consul_transport(consul), requests.Session() as session:
        params = {"recurse": "", "consistent": ""}
        answers = [session.get(URL, params=params), session.get(URL, params=params)]
    assert [answer.json()[0]["Value"] for answer in answers] == ["first", "second"]
    assert answers[0].headers["X-Consul-Index"] == "7"
    assert consul.pending == [] and consul.unrecorded == []


def test_an_unrecorded_request_raises_and_is_remembered():
    consul = ReplayedConsul("loud", [_exchange("consistent=", "only")])
    with consul_transport(consul), requests.Session() as session:
        with pytest.raises(UnrecordedRequest, match="GET /v1/kv/fireap/web/release: the recording 'loud'"):
            session.get(URL)
        try:
            session.get(URL, params={"recurse": ""})
        except UnrecordedRequest:
            pass  # as code under test that catches every exception would
    assert consul.unrecorded == ["GET /v1/kv/fireap/web/release", "GET /v1/kv/fireap/web/release?recurse="]
