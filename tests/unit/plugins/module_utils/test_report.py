"""The HTML report: structure, escaping, the propagation tree and the SVG timeline."""

from __future__ import annotations

import html.parser

import pytest
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.release_info import FIRED, finished_release, info_of, no_release, row, running_release

from ansible_collections.fireap.consul.plugins.module_utils._report import (
    DEPTH_COLOURS,
    NO_DEPTH_COLOUR,
    ReportError,
    claim_times,
    format_seconds,
    outcome,
    render_report,
    timeline_bars,
)


class Page(html.parser.HTMLParser):
    """Elements (tag, attributes, parent tags) and the text of a rendered page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict, tuple[str, ...]]] = []
        self.stack: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), tuple(self.stack)))
        if tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), tuple(self.stack)))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data):
        self.text.append(data)

    def bars(self) -> list[dict]:
        return [attrs for tag, attrs, _parents in self.elements if tag == "rect" and "bar" in attrs.get("class", "").split()]


def test_the_page_is_complete_and_self_contained():
    page = render_report(finished_release())
    assert page.startswith("<!DOCTYPE html>\n<html lang=\"en\">")
    assert page.rstrip().endswith("</html>")
    parsed = Page(page)
    assert parsed.stack == [], "every element is closed"
    for tag, attrs, _parents in parsed.elements:
        assert tag not in ("script", "link", "img", "iframe"), tag
        assert not attrs.get("src") and not attrs.get("href"), (tag, attrs)
    assert [tag for tag, _attrs, _parents in parsed.elements if tag == "svg"] == ["svg"]


def test_the_summary_shows_app_version_counts_duration_and_status():
    parsed = Page(render_report(finished_release()))
    text = " ".join(" ".join(parsed.text).split())
    assert "web 1.4.3" in text
    assert "failed 6/7 done" in text
    assert "6 done 1 failed 0 pulling 0 waiting 0 pending" in text
    assert "2.4s from the fire to the last node" in text
    assert "Fan-out 2" in text and "Targets 7 (the leader included)" in text
    assert "2023-11-14 22:13:20 UTC" in text


def test_node_text_is_escaped_everywhere():
    rows = finished_release()["nodes"]
    rows[4]["error"] = '<script>alert("x")</script> & <blink>bold</blink>'
    page = render_report(info_of(rows, version='1.0<img src=x onerror="y">', aborted_reason="<marquee>stop"))
    for markup in ("<script", "<blink", "<img", "<marquee"):
        assert markup not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;blink&gt;bold&lt;/blink&gt;" in page
    assert "1.0&lt;img src=x onerror=&quot;y&quot;&gt;" in page
    assert "&lt;marquee&gt;stop" in page


def test_failed_nodes_are_listed_with_their_source_and_whole_error():
    parsed = Page(render_report(finished_release()))
    text = "".join(parsed.text)
    assert "Failed nodes (1)" in text
    assert 'node-004node-001exit status 3: <script>alert("x")</script> & more\nsecond line' in text


def test_the_history_lists_the_app_s_runs_newest_first_with_the_current_one_marked():
    page = render_report(finished_release())
    text = "".join(Page(page).text)
    assert "History" in text
    assert "1.4.3releasefailed6/7 done, 1 failedops@ctl" in text
    assert "1.4.2releaseaborted3/7 done, 0 failedops@ctl" + "9a1b" * 8 + "bad <build>" in text
    assert page.index("<td>1.4.3</td>") < page.index("<td>1.4.2</td>")
    assert '<tr class="current"><td>' in page and "bad &lt;build&gt;" in page


def test_a_result_without_history_says_so():
    assert "No history recorded." in "".join(Page(render_report(running_release())).text)


def test_the_tree_nests_every_node_under_its_source():
    parsed = Page(render_report(finished_release()))
    tree_items = [(attrs, parents) for tag, attrs, parents in parsed.elements if tag == "li"]
    # leader li > ul > li (depth 1) > ul > li (depth 2): a depth-2 node sits under three lists
    assert max(parents.count("ul") for _attrs, parents in tree_items) == 3
    text = " ".join("".join(parsed.text).split())
    assert "node-000 done, leader node-001 done, depth 1, 0.9s node-004 failed, depth 2, 1.7s" in text
    assert "node-002 done, depth 1, 1.1s node-006 done, depth 2, 2.1s node-003 done, depth 1, 1.8s" in text
    assert "Not served by a node in this run" not in text


def test_nodes_outside_the_tree_are_listed_with_their_status():
    text = " ".join("".join(Page(render_report(running_release())).text).split())
    assert "Not served by a node in this run (2)" in text
    assert "node-003 pending" in text
    assert "node-004 done, depth 2, 5.0s, done in an earlier run" in text


def test_one_bar_per_node_of_the_run_coloured_by_depth():
    info = finished_release()
    bars = Page(render_report(info)).bars()
    assert sorted(entry["data-node"] for entry in bars) == [one["node"] for one in info["nodes"]]
    by_node = {entry["data-node"]: entry for entry in bars}
    for one in info["nodes"]:
        assert by_node[one["node"]]["fill"] == DEPTH_COLOURS[one["depth"]]
        assert f"depth-{one['depth']}" in by_node[one["node"]]["class"].split()
    assert "failed" in by_node["node-004"]["class"].split()
    assert float(by_node["node-000"]["width"]) >= 2.0, "the leader's zero-length bar stays visible"
    legend = [attrs for tag, attrs, _parents in Page(render_report(info)).elements
              if tag == "rect" and "swatch" in attrs.get("class", "")]
    assert [swatch["fill"] for swatch in legend[:3]] == list(DEPTH_COLOURS[:3])


def test_bars_run_from_the_claim_to_the_finish():
    info = finished_release()
    bars = {entry.node: entry for entry in timeline_bars(info)}
    # node-003 (stage 2, slot 0 of the leader) claimed only when node-001, slot 0's stage-1 holder, finished
    assert bars["node-003"].start == pytest.approx(1.0) and bars["node-003"].end == pytest.approx(2.0)
    # node-005 pulled from node-001, done at +1.0s
    assert bars["node-005"].start == pytest.approx(1.0)
    # node-001 pulled from the leader at once: its worker's start is its claim
    assert bars["node-001"].start == pytest.approx(0.1)
    assert [entry.node for entry in timeline_bars(info)][:3] == ["node-000", "node-001", "node-002"]


def test_the_claim_is_never_after_the_finish():
    rows = [row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None),
            row("node-001", "failed", source="node-000", depth=1, started=0.5, finished=0.4, error="clock skew")]
    assert claim_times(info_of(rows))["node-001"] == FIRED + 0.4


def test_a_running_node_is_drawn_up_to_now_and_pending_nodes_not_at_all():
    info = running_release()
    bars = {entry.node: entry for entry in timeline_bars(info)}
    assert sorted(bars) == ["node-000", "node-001", "node-002"]
    assert bars["node-002"].running and bars["node-002"].end == pytest.approx(3.0)
    drawn = {entry["data-node"]: entry for entry in Page(render_report(info)).bars()}
    assert "running" in drawn["node-002"]["class"].split()


def test_a_node_that_failed_before_claiming_a_source_has_a_grey_bar():
    rows = [row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None),
            row("node-001", "failed", started=0.1, finished=5.0, error="timed out waiting for a source",
                planned_source="node-000")]
    bars = Page(render_report(info_of(rows))).bars()
    assert bars[1]["fill"] == NO_DEPTH_COLOUR and "no-depth" in bars[1]["class"]


def test_large_runs_drop_the_labels_but_keep_one_bar_per_node():
    rows = [row("node-0000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None)]
    rows += [row(f"node-{i:04d}", "done", source="node-0000", depth=1, started=0.0, finished=i / 100)
             for i in range(1, 400)]
    parsed = Page(render_report(info_of(rows)))
    assert len(parsed.bars()) == 400
    assert not [attrs for tag, attrs, _parents in parsed.elements if tag == "text" and attrs.get("class") == "label"]


def test_no_release():
    page = render_report(no_release("shop"))
    assert "No release of app shop is recorded." in page and "<svg" not in page


def test_wait_results_add_the_outcome_and_the_refires():
    info = info_of(running_release()["nodes"], elapsed=8.0, timed_out=True,
                   refired=[{"after": 2.0, "stragglers": ["node-003"]}])
    text = " ".join(" ".join(Page(render_report(info)).text).split())
    assert "timed out" in text
    assert "Event fired again 1 time(s), to node-003" in text


@pytest.mark.parametrize(
    ("changes", "expected"),
    [({}, "succeeded"), ({"status": "running"}, "running"), ({"status": "aborted"}, "aborted"),
     ({"status": "none"}, "none"), ({"timed_out": True}, "timed-out"), ({"status": "paused"}, "paused")],
)
def test_outcome(changes, expected):
    info = info_of(finished_release()["nodes"][:2])
    info.update(changes)
    assert outcome(info) == expected


def test_outcome_of_a_finished_run_with_failures():
    assert outcome(finished_release()) == "failed"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.04, "0.0s"), (12.34, "12.3s"), (245, "4m 05s"), (7380, "2h 03m")],
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "a mapping), got NoneType"),
        ({"app": "web"}, "lacks 'version', 'run_id', 'status', 'counts', 'total', 'nodes', 'tree', 'timings', 'release'"),
        (dict(finished_release(), nodes="node-000"), "'nodes' must be a list of node rows"),
        (dict(finished_release(), tree=[]), "'tree' must map a source to its pullers, got list"),
    ],
)
def test_bad_input_says_what_is_wrong(data, message):
    with pytest.raises(ReportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render_report(data)


def test_the_timeline_shows_a_nodes_download_apart_from_its_commands():
    info = info_of([
        row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None),
        row("node-001", "done", source="node-000", depth=1, started=0.5, finished=3.0, percent=100.0, fetched=2.5),
        row("node-002", "pulling", source="node-000", depth=1, started=0.5, percent=40.0, rate=2_000_000),
    ], elapsed=4.0)
    bars = {entry.node: entry for entry in timeline_bars(info)}
    assert (bars["node-001"].start, bars["node-001"].fetched, bars["node-001"].end) == pytest.approx((0.5, 2.5, 3.0))
    assert bars["node-002"].fetched is None and bars["node-000"].fetched is None
    page = Page(render_report(info))
    downloads = [attrs for tag, attrs, _parents in page.elements
                 if tag == "rect" and attrs.get("class") == "download" and "data-node" in attrs]
    node_bar = {entry["data-node"]: entry for entry in page.bars()}["node-001"]
    assert [entry["data-node"] for entry in downloads] == ["node-001"]
    assert downloads[0]["x"] == node_bar["x"] and float(downloads[0]["width"]) < float(node_bar["width"])
    text = "".join(page.text)
    assert "download, then commands" in text
    assert "downloaded in 2.0s" in text and "40% at 2.0 MB/s" in text
