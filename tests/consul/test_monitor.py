"""fireap-monitor end to end against the Consul target: piped while a run goes on, one-shot and report after it.

Its rendering, views, watch loop and command line without Consul: tests/unit/plugins/module_utils/test_monitor.py.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import _monitor
from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._firing import fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.module_utils._worker import pull
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import advertise

BUILD = Path(__file__).resolve().parents[2] / "build"
RUNNER = "import sys; sys.path.insert(0, sys.argv.pop(1)); " \
         "from ansible_collections.fireap.consul.plugins.module_utils._monitor import main; sys.exit(main())"
MONITOR_TIMEOUT = 120


def _environ(agent, token) -> dict:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("CONSUL_")}
    environ["CONSUL_HTTP_ADDR"] = f"{agent.scheme}://{agent.host}:{agent.port}"
    if token:
        environ["CONSUL_HTTP_TOKEN"] = token
    return environ


def _release_and_pull(target, schema: Schema, app: str, version: str) -> dict:
    """Fire a run from agent 0 and pull it on every other agent, each in a thread of its own."""
    fired = fire(target.client(0), schema, app, version=version, fanout=2)
    agents = {agent.name: i for i, agent in enumerate(target.agents)}

    def task(_source):
        time.sleep(0.2)
        return True, None

    threads = [
        threading.Thread(target=pull, args=(target.client(agents[node]), app, node, task), kwargs={"schema": schema},
                         daemon=True)
        for node in fired["targets"][1:]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(MONITOR_TIMEOUT)
    return fired


@pytest.fixture
def app_release(consul_target, kv_prefix):
    """(app, schema); the run's fire lock is lifted afterwards."""
    app, schema = f"mon-{uuid.uuid4().hex[:8]}", Schema(kv_prefix)
    advertise(consul_target.client(0), schema, [app])
    yield app, schema
    clear(consul_target.client(0), schema, app)


def test_piped_the_monitor_waits_for_the_run_and_prints_each_change(consul_target, app_release):
    app, schema = app_release
    agent = consul_target.agents[0]
    monitor = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(BUILD), "--app", app, "--kv-prefix", schema.prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environ(agent, consul_target.token),
    )
    try:
        first = monitor.stdout.readline()  # the monitor is up and has read Consul: fire now
        fired = _release_and_pull(consul_target, schema, app, "3.0.1")
        rest, err = monitor.communicate(timeout=MONITOR_TIMEOUT)
    finally:
        monitor.kill()
    out = first + rest
    names = fired["targets"]
    assert monitor.returncode == 0, err
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == f"{app}: no release recorded yet"
    assert f"{app} 3.0.1  run {fired['run_id'][:12]}  fired " in out
    assert f"{names[0]} done (the leader)" in lines
    for name in names[1:]:
        assert any(line.startswith(f"{name} done from ") for line in lines), out
    total = len(names)
    assert f"{app} 3.0.1: {total}/{total} done, 0 failed, 0 pulling, 0 waiting, 0 pending (100.0%)" in out
    table = lines[max(i for i, line in enumerate(lines) if line.split() == list(_monitor.COLUMNS)):]
    assert [line.split()[:3] for line in table[1:]] == [[name, "3.0.1", "done"] for name in names]


def test_one_shot_and_report_read_a_finished_run(consul_target, app_release, tmp_path, monkeypatch):
    app, schema = app_release
    fired = _release_and_pull(consul_target, schema, app, "3.0.2")
    for name, value in _environ(consul_target.agents[0], consul_target.token).items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    assert _monitor.main(["--app", app, "--kv-prefix", schema.prefix, "--one-shot"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert re.fullmatch(rf"{app} 3\.0\.2  run {fired['run_id'][:12]}  fired .* UTC  finished after \d+\.\ds", lines[0])
    assert [line.split()[:3] for line in lines[4:]] == [[name, "3.0.2", "done"] for name in fired["targets"]]
    report = tmp_path / "report.html"
    written = io.StringIO()
    assert _monitor.main(["--app", app, "--kv-prefix", schema.prefix, "--report", str(report)], out=written) == 0
    assert written.getvalue() == f"fireap-monitor: wrote the report of app {app} (finished) to {report}\n"
    page = report.read_text()
    assert page.count('<rect class="bar ') == len(fired["targets"])
    for name in fired["targets"]:
        assert f'data-node="{name}"' in page
