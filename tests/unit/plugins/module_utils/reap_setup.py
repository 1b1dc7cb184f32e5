"""What fireap-reap's tests hand it: a task config file, a watch event, the records a fire leaves in KV,
and the adverts the handlers leave there for a fire.

Shared by the unit tests (tests/unit/plugins/module_utils/test_reap.py, test_task_event.py) and the
tests against Consul (tests/consul/test_reap.py).
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import yaml

from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    AppAdvert,
    NodeAdvert,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    Schema,
)
from ansible_collections.fireap.consul.plugins.module_utils._firing import EVENT_NAME

APP = "web"
ME = "node-me"
LEADER = "node-leader"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def event(event_id: str = "e1", ltime: int = 5, app: str = APP, version: str = "1.0", *, payload: object = None,
          name: str = EVENT_NAME) -> dict:
    """One element of the watch's event array, as the agent writes it."""
    if payload is None:
        payload = b64(json.dumps({"app": app, "version": version}).encode())
    return {"ID": event_id, "Name": name, "Payload": payload, "NodeFilter": "", "ServiceFilter": "",
            "TagFilter": "", "Version": 1, "LTime": ltime}


def release(version: str = "1.0", run_id: str = "run-1", leader: str = LEADER,
            status: str = "running") -> ReleaseRecord:
    return ReleaseRecord(app=APP, version=version, run_id=run_id, fanout=2, leader=leader, target_count=3,
                         fired_at=1700000000.0, status=status,
                         aborted_reason="stopped by hand" if status == "aborted" else None)


def plan(run_id: str = "run-1", source: str = LEADER) -> PlanEntry:
    return PlanEntry(run_id=run_id, source=source, stage=1, slot=0)


def state(status: str, version: str = "1.0", run_id: str = "run-1") -> NodeState:
    if status == "done":
        return NodeState(version=version, run_id=run_id, status="done", started=1.0, source=LEADER, depth=1,
                         finished=2.0)
    if status == "failed":
        return NodeState(version=version, run_id=run_id, status="failed", started=1.0, finished=2.0,
                         error="exec_commands[0] failed (exit status 1)")
    return NodeState(version=version, run_id=run_id, status=status, started=1.0)


def write_config(path: Path, consul_section: dict, kv_prefix: str, apps: dict, **extra: object) -> Path:
    """A task config at ``path``; state_dir and the log file (log/reap.log) go beside it."""
    config = {
        "consul": consul_section,
        "kv_prefix": kv_prefix,
        "state_dir": str(path.parent / "state"),
        "log_file": str(path.parent / "log" / "reap.log"),
        "apps": apps,
        **extra,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def artifact_config(path: Path, template: str, app: str = APP) -> str:
    """The leader's task config at ``path``, giving ``app`` the artifact ``template``: the fire
    publishes the file this config names (fire's config_path)."""
    apps = {app: {"exec_commands": ["tar -xzf {{ artifact }}"], "artifact": {"path": template}}}
    return str(write_config(path, {}, "fireap/", apps))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Spawns:
    """The injected worker starter: records calls, starts nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, config_path: str, app: str, log_file: str) -> int:
        self.calls.append((config_path, app, log_file))
        return 4242


def advertise(client, schema: Schema, apps, nodes=None, **settings) -> list[str]:
    """Write, as each node's handler does, an advert of ``apps`` (each with ``settings``: max_semaphores,
    default 5, service_filter, tag_filter) for ``nodes`` (default: every node of the catalog); returns them."""
    settings.setdefault("max_semaphores", 5)
    if nodes is None:
        nodes = [node["Node"] for node in client.catalog.nodes()[1]]
    record = NodeAdvert({app: AppAdvert(**settings) for app in apps})
    for node in nodes:
        assert client.kv.put(schema.advert(node), record.to_json())
    return nodes
