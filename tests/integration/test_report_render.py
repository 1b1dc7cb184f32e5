"""The HTML report of a real release, rendered by headless Chromium.

A run is fired on a dev cluster and pulled by every node through the real pull protocol
(``_worker.pull``, one thread per node, each talking to its own agent); one node fails with
an error that holds markup. fireap-monitor writes the report; Chromium renders it and dumps
the DOM after rendering, which must show every node in the tree and the timeline, one SVG
bar per node, and the error as text. A screenshot is taken too (left in the test's tmp dir).
"""

from __future__ import annotations

import html.parser
import io
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import _monitor
from ansible_collections.fireap.consul.plugins.module_utils._firing import fire
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.module_utils._worker import pull
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import advertise

pytestmark = pytest.mark.double_only

CHROMIUM = Path("/usr/bin/chromium")
NODES = 8
FANOUT = 2
APP = "site"
VERSION = "4.2.0"
ERROR = 'exit status 3: <b>boom</b> & "quoted"'
PULL_TIMEOUT = 120
CHROMIUM_TIMEOUT = 120

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is not installed (Debian package chromium; `make setup` installs it)",
)


class Dom(html.parser.HTMLParser):
    """The rendered DOM: SVG bars, the tree's node names, and the page text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.bars: list[dict] = []
        self.tree_nodes: list[str] = []
        self.labels: list[str] = []
        self.text: list[str] = []
        self._section: str | None = None
        self._span: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs.get("id")
        if tag == "rect" and "bar" in (attrs.get("class") or "").split():
            self.bars.append(attrs)
        self._span = (attrs.get("class") or "") if tag in ("span", "text") else None

    def handle_endtag(self, tag):
        self._span = None

    def handle_data(self, data):
        self.text.append(data)
        if self._section == "tree" and self._span == "node":
            self.tree_nodes.append(data)
        if self._span == "label":
            self.labels.append(data)


@pytest.fixture(scope="module")
def released(make_double, tmp_path_factory):
    """A finished run on a NODES-node cluster; yields (info, report path)."""
    with make_double(nodes=NODES, name="report-devcluster") as target:
        schema = Schema()
        advertise(target.client(0), schema, [APP], max_semaphores=FANOUT)
        fired = fire(target.client(0), schema, APP, version=VERSION, fanout=FANOUT)
        failing = fired["targets"][-1]  # a leaf of the plan: nobody waits for it
        agents = {agent.name: i for i, agent in enumerate(target.agents)}

        def pull_on(node: str) -> None:
            def task(_source):
                time.sleep(0.3)
                return (False, ERROR) if node == failing else (True, None)

            pull(target.client(agents[node]), APP, node, task, schema=schema)

        threads = [threading.Thread(target=pull_on, args=(node,), daemon=True) for node in fired["targets"][1:]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(PULL_TIMEOUT)
        report = tmp_path_factory.mktemp("report") / "report.html"
        agent = target.agents[0]
        argv = ["--app", APP, "--host", agent.host, "--port", str(agent.port), "--report", str(report)]
        assert _monitor.main(argv, out=io.StringIO()) == 0
        argv[-2:] = ["--one-shot"]
        shown = io.StringIO()
        assert _monitor.main(argv, out=shown) == 0
        yield {"targets": fired["targets"], "failing": failing, "report": report, "table": shown.getvalue()}


def chromium(page: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page``; a profile of its own in ``cwd`` (root needs --no-sandbox)."""
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={cwd / 'profile'}",
               *args, page.as_uri()]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, check=False,
                          env={"HOME": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_run_finished_with_the_one_failure(released):
    lines = released["table"].splitlines()
    assert f"{NODES - 1}/{NODES} done, 1 failed" in lines[1]
    assert any(line.split()[:3] == [released["failing"], VERSION, "failed"] for line in lines)


@needs_chromium
def test_chromium_shows_every_node_one_bar_each_and_the_error_as_text(released, tmp_path):
    run = chromium(released["report"], "--dump-dom", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    dom = Dom(run.stdout)
    names = released["targets"]
    assert sorted(dom.tree_nodes) == sorted(names)
    assert sorted(entry["data-node"] for entry in dom.bars) == sorted(names)
    assert sorted(dom.labels) == sorted(names)
    failed = [entry for entry in dom.bars if "failed" in entry["class"].split()]
    assert [entry["data-node"] for entry in failed] == [released["failing"]]
    assert all(float(entry["width"]) > 0 for entry in dom.bars)
    text = "".join(dom.text)
    assert ERROR in text, "the error is shown as text, its markup not interpreted"
    assert "<b>boom</b>" not in run.stdout
    assert f"{NODES - 1} done" in " ".join(text.split())


@needs_chromium
def test_chromium_takes_a_screenshot(released, tmp_path):
    shot = tmp_path / "report.png"
    run = chromium(released["report"], f"--screenshot={shot}", "--window-size=1200,1300", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 1300)
    # The page is not blank: a rendered report compresses to far more than an empty page.
    assert len(data) > 20_000
