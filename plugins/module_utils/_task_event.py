# SPDX-License-Identifier: MIT
"""The FIREAP:TASK user event as the Consul watch hands it to fireap-reap.

The watch writes a JSON array of events on the handler's stdin. Each event is checked
before anything uses it: its ID (the handler remembers it), its name, its LTime and its
payload, the base64 of the compact JSON ``{"app": ..., "version": ...}`` that
``_firing.event_payload`` makes, checked as fireap_fire checks it. A malformed event
becomes a RejectedEvent saying why; an event is only a wake-up, the release record decides.

Only the standard library and sibling module_utils: nodes run this without Ansible.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Iterable

from ansible_collections.fireap.consul.plugins.module_utils._errors import InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import check_app_name
from ansible_collections.fireap.consul.plugins.module_utils._validation import check_version

#: Name of the user event every node's watch listens for.
EVENT_NAME = "FIREAP:TASK"
EVENT_ID_MAX_LENGTH = 64


@dataclass(frozen=True)
class TaskEvent:
    """A well-formed FIREAP:TASK event."""

    id: str
    ltime: int
    app: str
    version: str


@dataclass(frozen=True)
class RejectedEvent:
    """An event (or the whole input, ``id`` None) that cannot be used, and why."""

    id: str | None
    reason: str


def decode_payload(payload: object) -> tuple[str, str]:
    """``(app, version)`` from an event's ``Payload`` (base64 text); ValueError saying why not.

    The payload is what ``_firing.event_payload`` makes, checked as fireap_fire checks it:
    the app name by ``_taskconfig.check_app_name``, the version by ``_validation.check_version``.
    """
    if payload is None:
        raise InvalidValue("it has no payload")
    if not isinstance(payload, str):
        raise InvalidValue(f"its Payload must be base64 text, got {type(payload).__name__}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidValue(f"its payload is not valid base64 ({err})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidValue("its payload is not UTF-8 text") from None
    except ValueError as err:
        raise InvalidValue(f"its payload is not JSON ({err})") from None
    if not isinstance(data, dict):
        raise InvalidValue(f'its payload must be a JSON object {{"app": ..., "version": ...}}, got {type(data).__name__}')
    for field in ("app", "version"):
        if field not in data:
            raise InvalidValue(f"its payload has no {field!r} field")
    try:
        app = check_app_name(data["app"])
        version = check_version(data["version"])
    except ValueError as err:
        raise InvalidValue(f"its payload is invalid: {err}") from None
    return app, version


def _event_id(event: dict[str, object]) -> str | None:
    value = event.get("ID")
    if isinstance(value, str) and 0 < len(value) <= EVENT_ID_MAX_LENGTH and value.isascii() and value.isprintable():
        return value
    return None


def parse_event(event: object) -> TaskEvent | RejectedEvent:
    """One element of the watch's event array."""
    if not isinstance(event, dict):
        return RejectedEvent(None, f"an event must be a JSON object, got {type(event).__name__}")
    event_id = _event_id(event)
    if event_id is None:
        return RejectedEvent(None, f"an event has no usable ID (a string of 1 to {EVENT_ID_MAX_LENGTH} printable "
                                   f"ASCII characters): {event.get('ID')!r}")
    name = event.get("Name")
    if name != EVENT_NAME:
        return RejectedEvent(event_id, f"event {event_id} is named {name!r}, not {EVENT_NAME!r}")
    ltime = event.get("LTime")
    if isinstance(ltime, bool) or not isinstance(ltime, int) or ltime < 0:
        return RejectedEvent(event_id, f"event {event_id} has no valid LTime (an integer >= 0): {ltime!r}")
    try:
        app, version = decode_payload(event.get("Payload"))
    except ValueError as err:
        return RejectedEvent(event_id, f"event {event_id} is skipped: {err}")
    return TaskEvent(id=event_id, ltime=ltime, app=app, version=version)


def parse_events(text: str) -> tuple[list[TaskEvent], list[RejectedEvent]]:
    """The events of a watch invocation's stdin: empty input means none."""
    if not text.strip():
        return [], []
    try:
        data = json.loads(text)
    except ValueError as err:
        return [], [RejectedEvent(None, f"stdin is not JSON ({err}); expected the watch's array of events")]
    if not isinstance(data, list):
        return [], [RejectedEvent(None, f"stdin must be a JSON array of events, got {type(data).__name__}")]
    events: list[TaskEvent] = []
    rejected: list[RejectedEvent] = []
    for item in data:
        parsed = parse_event(item)
        if isinstance(parsed, TaskEvent):
            events.append(parsed)
        else:
            rejected.append(parsed)
    return events, rejected


def newest_per_app(events: Iterable[TaskEvent]) -> dict[str, TaskEvent]:
    """The event with the highest LTime of each app; on a tie the later one in the list wins
    (the agent lists events oldest first)."""
    newest: dict[str, TaskEvent] = {}
    for event in events:
        current = newest.get(event.app)
        if current is None or event.ltime >= current.ltime:
            newest[event.app] = event
    return newest
