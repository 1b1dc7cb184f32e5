"""_task_event: the FIREAP:TASK events of the watch's input, checked before anything uses them."""

from __future__ import annotations

import json

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._firing import EVENT_NAME, event_payload
from ansible_collections.fireap.consul.plugins.module_utils._task_event import (
    RejectedEvent,
    TaskEvent,
    decode_payload,
    newest_per_app,
    parse_event,
    parse_events,
)
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import b64, event


def test_a_well_formed_event_is_parsed():
    assert parse_event(event("abc", 7, "web", "2024.1-rc1")) == TaskEvent("abc", 7, "web", "2024.1-rc1")


def test_decode_reads_what_fireap_fire_sends():
    payload = event_payload("my-app_1.x", "2024.11.26-build.1234+g1a2b3c")
    assert decode_payload(b64(payload)) == ("my-app_1.x", "2024.11.26-build.1234+g1a2b3c")


def _payload(obj) -> str:
    return b64(json.dumps(obj).encode())


@pytest.mark.parametrize("overrides, reason", [
    ({"Name": "OTHER"}, "is named 'OTHER', not 'FIREAP:TASK'"),
    ({"LTime": None}, "no valid LTime"),
    ({"LTime": -1}, "no valid LTime"),
    ({"LTime": True}, "no valid LTime"),
    ({"LTime": "5"}, "no valid LTime"),
    ({"Payload": None}, "it has no payload"),
    ({"Payload": 12}, "its Payload must be base64 text, got int"),
    ({"Payload": "not base64!"}, "its payload is not valid base64"),
    ({"Payload": "eyJhcHAi"}, "its payload is not JSON"),
    ({"Payload": b64(b'\xff\xfe{"app"}')}, "its payload is not UTF-8 text"),
    ({"Payload": b64(b"web 1.0")}, "its payload is not JSON"),
    ({"Payload": _payload(["web", "1.0"])}, "must be a JSON object"),
    ({"Payload": _payload({"version": "1.0"})}, "its payload has no 'app' field"),
    ({"Payload": _payload({"app": "web"})}, "its payload has no 'version' field"),
    ({"Payload": _payload({"app": 7, "version": "1.0"})}, "its payload is invalid: app name 7 must be a string"),
    ({"Payload": _payload({"app": "../etc", "version": "1.0"})}, "its payload is invalid: app name '../etc'"),
    ({"Payload": _payload({"app": "..", "version": "1.0"})}, "its payload is invalid: app name '..'"),
    ({"Payload": _payload({"app": "", "version": "1.0"})}, "its payload is invalid: app name"),
    ({"Payload": _payload({"app": "web", "version": 1.0})}, "its payload is invalid: version must be"),
    ({"Payload": _payload({"app": "web", "version": None})}, "its payload is invalid: version must be"),
    ({"Payload": _payload({"app": "web", "version": ""})}, "its payload is invalid: version must be"),
    ({"Payload": _payload({"app": "web", "version": "1.0\nrm -rf /"})}, "its payload is invalid: version '1.0\\nrm"),
    ({"Payload": _payload({"app": "web", "version": "1.0\x1b[31m"})}, "its payload is invalid: version '1.0\\x1b"),
    ({"Payload": _payload({"app": "web", "version": "1.0\x00"})}, "its payload is invalid: version '1.0\\x00'"),
    ({"Payload": _payload({"app": "web", "version": "1.0 "})}, "its payload is invalid: version '1.0 '"),
    ({"Payload": _payload({"app": "web", "version": "v" * 65})}, "its payload is invalid: version 'vvv"),
])
def test_a_malformed_event_is_rejected_with_its_id_and_a_precise_reason(overrides, reason):
    raw = dict(event("evt-1"), **overrides)
    rejected = parse_event(raw)
    assert isinstance(rejected, RejectedEvent)
    assert rejected.id == "evt-1"
    assert "event evt-1" in rejected.reason
    assert reason in rejected.reason


@pytest.mark.parametrize("raw, reason", [
    ("just a string", "an event must be a JSON object, got str"),
    ({"Name": EVENT_NAME}, "no usable ID"),
    (dict(event(), ID=""), "no usable ID"),
    (dict(event(), ID=42), "no usable ID"),
    (dict(event(), ID="x" * 65), "no usable ID"),
    (dict(event(), ID="id\nwith newline"), "no usable ID"),
])
def test_an_event_without_a_usable_id_is_rejected_without_one(raw, reason):
    rejected = parse_event(raw)
    assert isinstance(rejected, RejectedEvent)
    assert rejected.id is None
    assert reason in rejected.reason


@pytest.mark.parametrize("text", ["", "  \n", "[]"])
def test_no_input_or_an_empty_array_means_no_events(text):
    assert parse_events(text) == ([], [])


@pytest.mark.parametrize("text, reason", [
    ("[{", "stdin is not JSON"),
    ('{"ID": "e1"}', "stdin must be a JSON array of events, got dict"),
    ("null", "stdin must be a JSON array of events, got NoneType"),
])
def test_unusable_stdin_is_one_rejection(text, reason):
    events, rejected = parse_events(text)
    assert events == []
    assert [item.id for item in rejected] == [None]
    assert reason in rejected[0].reason


def test_good_and_bad_events_are_separated_in_order():
    text = json.dumps([event("e1", 1), event("e2", 2, payload="%%%"), event("e3", 3, version="2.0"), 5])
    events, rejected = parse_events(text)
    assert [e.id for e in events] == ["e1", "e3"]
    assert [r.id for r in rejected] == ["e2", None]


def test_the_newest_event_per_app_wins_by_ltime_then_by_position():
    events = [
        TaskEvent("a1", 10, "web", "3"),
        TaskEvent("a2", 4, "web", "1"),
        TaskEvent("b1", 7, "db", "x"),
        TaskEvent("b2", 7, "db", "y"),
        TaskEvent("c1", 0, "cache", "z"),
    ]
    newest = newest_per_app(events)
    assert {app: e.id for app, e in newest.items()} == {"web": "a1", "db": "b2", "cache": "c1"}
