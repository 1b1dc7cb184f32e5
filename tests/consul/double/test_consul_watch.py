"""Event-watch rules the project relies on (fireap-reap runs as the agent's watch handler).

Source: https://developer.hashicorp.com/consul/docs/dynamic-app-config/watches (type event, script
handler: JSON on stdin, CONSUL_INDEX in the environment) and Consul's watch plan (api/watch): the
handler runs when the watch starts, with the buffered events or [], and reload restarts watches.
Double only: installing a watch needs the agent's config directory.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
from consul_harness import event_index, unique_name

from devcluster.polling import wait_until

HANDLER_TIMEOUT = 20.0

# The handler appends one JSON line per invocation: the CONSUL_INDEX it saw and the events on stdin.
HANDLER_SCRIPT = """\
import json, os, sys
record = {"index": os.environ.get("CONSUL_INDEX"), "events": json.load(sys.stdin)}
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(record) + "\\n")
"""


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _records_after(path: Path, count: int, what: str) -> list[dict]:
    """The handler's records past the first *count*, once there is at least one."""
    return wait_until(lambda: _records(path)[count:], HANDLER_TIMEOUT, what)


def _fire(target, name: str, payload: bytes) -> dict:
    response = target.http("PUT", f"/v1/event/fire/{name}", data=payload)
    assert response.status_code == 200, response.text
    return response.json()


def _reload(target) -> None:
    response = target.http("PUT", "/v1/agent/reload")
    assert response.status_code == 200, response.text


@pytest.mark.double_only
def test_event_watch_handler_invocations(consul_target, tmp_path):
    """At watch start the handler gets the buffered events of its name, or []; a new event arrives on
    stdin as a JSON array with a base64 Payload and CONSUL_INDEX derived from its ID; a reload restarts
    the watch, which hands over the whole buffer again."""
    config_dir = consul_target.agents[0].config_dir
    assert config_dir is not None, "cluster.json names no config_dir for agent 0"
    script = tmp_path / "handler.py"
    script.write_text(HANDLER_SCRIPT)
    busy_name, quiet_name = unique_name("watch"), unique_name("watch")
    busy_out, quiet_out = tmp_path / "busy.jsonl", tmp_path / "quiet.jsonl"

    before = _fire(consul_target, busy_name, b"before")
    wait_until(
        lambda: consul_target.http("GET", "/v1/event/list", params={"name": busy_name}).json(),
        HANDLER_TIMEOUT,
        "the first event in agent 0's list",
    )
    watch_file = Path(config_dir) / f"{unique_name('watch')}.json"
    watches = [
        {"type": "event", "name": busy_name, "args": [sys.executable, str(script), str(busy_out)]},
        {"type": "event", "name": quiet_name, "args": [sys.executable, str(script), str(quiet_out)]},
    ]
    watch_file.write_text(json.dumps({"watches": watches}))
    try:
        _reload(consul_target)

        quiet_start = _records_after(quiet_out, 0, "the handler of a watch without events")[0]
        assert quiet_start == {"index": "1", "events": []}

        busy_start = _records_after(busy_out, 0, "the handler of a watch with a buffered event")[0]
        assert [e["ID"] for e in busy_start["events"]] == [before["ID"]]
        assert base64.b64decode(busy_start["events"][0]["Payload"]) == b"before"
        assert busy_start["index"] == str(event_index(before["ID"]))

        seen = len(_records(busy_out))
        after = _fire(consul_target, busy_name, b"after")
        delivered = wait_until(
            lambda: [r for r in _records(busy_out)[seen:] if after["ID"] in [e["ID"] for e in r["events"]]],
            HANDLER_TIMEOUT,
            "the handler call carrying the new event",
        )[0]
        [event] = [e for e in delivered["events"] if e["ID"] == after["ID"]]
        assert event["Name"] == busy_name
        assert base64.b64decode(event["Payload"]) == b"after"
        assert before["ID"] not in [e["ID"] for e in delivered["events"]]
        assert delivered["index"] == str(event_index(after["ID"]))

        seen = len(_records(busy_out))
        _reload(consul_target)
        replayed = wait_until(
            lambda: [r for r in _records(busy_out)[seen:] if len(r["events"]) == 2],
            HANDLER_TIMEOUT,
            "the handler call replaying the buffer after reload",
        )[0]
        assert [e["ID"] for e in replayed["events"]] == [before["ID"], after["ID"]]
    finally:
        watch_file.unlink(missing_ok=True)
        _reload(consul_target)
