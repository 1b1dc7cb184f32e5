"""fireap-monitor: its rendering as pure functions, its views, its watch loop and its command line.

End to end against Consul: tests/consul/test_monitor.py.
"""

from __future__ import annotations

import io
import os

import pytest
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.release_info import finished_release, info_of, no_release, row, running_release

from ansible_collections.fireap.consul.plugins.module_utils import _monitor, _progress
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema


class Terminal(io.StringIO):
    def isatty(self):
        return True


# --- pure rendering ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "total", "drawn"),
    [
        ({}, 0, "[" + "." * 10 + "]"),
        ({"done": 10}, 10, "[" + "#" * 10 + "]"),
        ({"done": 5, "failed": 1}, 10, "[#####!....]"),
        ({"done": 1, "failed": 1}, 30, "[!.........]"),  # one failure always shows
        ({"done": 29, "failed": 1}, 30, "[#########!]"),
    ],
)
def test_progress_bar(counts, total, drawn):
    assert _monitor.progress_bar(counts, total, width=10) == drawn


def test_the_frame_shows_every_node_with_version_status_source_depth_and_times():
    lines = _monitor.render_frame(finished_release())
    assert lines[0] == "web 1.4.3  run 0f3c0f3c0f3c  fired 2023-11-14 22:13:20 UTC  finished after 2.4s"
    assert lines[1] == "[##################################!!!!!!] 6/7 done, 1 failed, 0 pulling, 0 waiting, 0 pending (100.0%)"
    assert lines[2] == ""
    assert lines[3:6] == [
        "NODE      VERSION  STATUS  SOURCE    DEPTH  FINISHED  TOOK",
        "node-000  1.4.3    done    -         0      +0.0s     -",
        "node-001  1.4.3    done    node-000  1      +1.0s     0.9s",
    ]
    assert lines[7] == "node-003  1.4.3    done    node-000  1      +2.0s     1.8s"
    assert lines[-1] == 'failed: node-004 (from node-001): exit status 3: <script>alert("x")</script> & more'
    assert len(lines) == 4 + 7 + 1


def test_a_running_frame_marks_pending_and_earlier_nodes():
    lines = _monitor.render_frame(running_release())
    assert lines[0].endswith("  running")
    assert "node-002  1.4.3    pulling  node-000  1      -            -" in lines
    assert "node-003  -        pending  -         -      -            -" in lines
    assert "node-004  1.4.3    done     node-002  2      earlier run  -" in lines


def test_control_characters_from_nodes_never_reach_the_terminal():
    rows = finished_release()["nodes"]
    rows[4]["error"] = "\x1b[2J\x1b[31mred\x07 alert\tend"
    info = info_of(rows, aborted_reason="stop\x1b[H")
    text = "\n".join(_monitor.render_frame(info) + _monitor.change_lines(None, info))
    assert "\x1b" not in text and "\x07" not in text and "\t" not in text
    assert "failed: node-004 (from node-001): ?[2J?[31mred? alert?end" in text
    assert "aborted (stop?[H)" in text


def test_no_release_yet():
    assert _monitor.render_frame(no_release("shop")) == ["shop: no release recorded yet"]


def test_the_frame_is_cut_to_the_width_and_the_table_to_its_rows():
    rows = [row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None)]
    rows += [row(f"node-{i:03d}", "done", source="node-000", depth=1, started=0.0, finished=1.0) for i in range(1, 30)]
    rows[7] = row("node-007", "pulling", source="node-000", depth=1, started=0.5)
    rows[9] = row("node-009", "pending", this_run=False)
    lines = _monitor.render_frame(info_of(rows), width=40, max_rows=5)
    assert all(len(line) <= 40 for line in lines) and len(lines[0]) == 40
    table = lines[3:]
    assert [line.split()[0] for line in table[1:6]] == ["node-000", "node-001", "node-002", "node-007", "node-009"]
    assert table[6] == "... and 25 more nodes (25 done)"


def test_failures_and_warnings_below_the_table_are_bounded():
    rows = [row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None)]
    rows += [row(f"node-{i:03d}", "failed", started=0.0, finished=1.0, error=f"error {i}") for i in range(1, 15)]
    lines = _monitor.render_frame(info_of(rows, warnings=[f"ignored record {i}" for i in range(5)]))
    assert sum(line.startswith("failed: node-") for line in lines) == _monitor.MAX_FAILED_LINES
    assert "failed: ... and 4 more" in lines
    assert lines[-1] == "warning: ... and 2 more"


def test_the_rows_budget_leaves_room_for_the_rest_of_the_frame():
    info = finished_release()
    budget = _monitor.frame_rows_budget(20, info)
    lines = _monitor.render_frame(info_of([row(f"node-{i:03d}", "pending", this_run=False) for i in range(50)]),
                                  max_rows=budget)
    assert len(lines) <= 20 - 1


def test_change_lines_report_each_transition_once():
    before = running_release()
    first = _monitor.change_lines(None, before)
    assert first == [
        "web 1.4.3  run 0f3c0f3c0f3c  fired 2023-11-14 22:13:20 UTC  running",
        "node-000 done (the leader)",
        "node-001 done from node-000 (depth 1) in 0.9s",
        "node-002 pulling from node-000 (depth 1)",
        "node-004 done in an earlier run",
        "web 1.4.3: 3/5 done, 0 failed, 1 pulling, 0 waiting, 1 pending (60.0%) [3.0s]",
    ]
    assert _monitor.change_lines(before, before) == []
    rows = [dict(one) for one in before["nodes"]]
    rows[2].update(status="failed", finished=rows[2]["started"] + 2.0, error="exit status 1\ndetails")
    rows[3].update(status="done", this_run=True, source="node-001", depth=2, started=rows[0]["started"] + 0.2,
                   finished=rows[0]["started"] + 3.0, duration=2.8)
    after = info_of(rows)
    assert _monitor.change_lines(before, after) == [
        "node-002 failed from node-000: exit status 1",
        "node-003 done from node-001 (depth 2) in 2.8s",
        "web 1.4.3: 4/5 done, 1 failed, 0 pulling, 0 waiting, 0 pending (100.0%) [3.0s]; finished",
    ]


def test_change_lines_while_there_is_no_release():
    assert _monitor.change_lines(None, no_release()) == ["web: no release recorded yet"]
    assert _monitor.change_lines(no_release(), no_release()) == []


def test_exit_code_and_run_over():
    assert _monitor.exit_code(info_of(finished_release()["nodes"][:2])) == 0
    assert _monitor.exit_code(finished_release()) == 1
    assert _monitor.run_over(finished_release()) and not _monitor.run_over(running_release())
    assert _monitor.run_over(info_of(running_release()["nodes"], aborted_reason="bad build"))
    assert not _monitor.run_over(no_release())


# --- views ------------------------------------------------------------------------------------


def test_the_terminal_view_redraws_in_place_and_only_on_change(monkeypatch):
    monkeypatch.setattr(_monitor.shutil, "get_terminal_size", lambda: os.terminal_size((100, 40)))
    screen = Terminal()
    view = _monitor.TerminalView(screen)
    view.show(running_release())
    first = screen.getvalue()
    assert first.startswith(_monitor._HIDE_CURSOR + "web 1.4.3  run ")
    assert "\x1b[" not in first[len(_monitor._HIDE_CURSOR):].split(_monitor._CLEAR_LINE)[0]
    height = len(_monitor.render_frame(running_release()))
    view.show(running_release())
    assert screen.getvalue() == first, "nothing changed: nothing drawn"
    view.finish(finished_release())
    second = screen.getvalue()[len(first):]
    assert second.startswith(f"\x1b[{height}F")
    assert second.endswith(_monitor._CLEAR_DOWN)
    assert all(line.endswith(_monitor._CLEAR_LINE) for line in second.split("\n")[:-1])
    view.close()
    assert screen.getvalue().endswith(_monitor._SHOW_CURSOR)


def test_the_log_view_appends_plain_lines_and_ends_with_the_table():
    stream = io.StringIO()
    view = _monitor.LogView(stream)
    view.show(running_release())
    view.show(running_release())
    view.finish(finished_release())
    view.close()
    text = stream.getvalue()
    assert "\x1b" not in text
    assert text.count("node-001 done from node-000") == 1
    assert text.endswith("\n".join(_monitor.render_frame(finished_release())) + "\n")


# --- the watch loop -----------------------------------------------------------------------------


class FakeKV:
    """Answers the app-prefix listing with the next index of ``indexes`` and records each call."""

    def __init__(self, indexes):
        self.indexes = list(indexes)
        self.calls = []

    def get(self, key, **kwargs):
        self.calls.append((key, kwargs))
        return self.indexes.pop(0), [key + "release"]


class FakeClient:
    def __init__(self, indexes):
        self.kv = FakeKV(indexes)


class Recorder:
    def __init__(self):
        self.shown, self.finished = [], []

    def show(self, info):
        self.shown.append(info)

    def finish(self, info):
        self.finished.append(info)


def test_watch_blocks_on_the_app_prefix_between_reads_until_the_run_is_over(monkeypatch):
    states = [no_release(), running_release(), running_release(), finished_release()]
    monkeypatch.setattr(_monitor, "release_info", lambda _client, _schema, _app: states.pop(0))
    monkeypatch.setattr(_progress, "MIN_POLL_INTERVAL", 0)
    client, view = FakeClient([7, 9, 4, 12]), Recorder()
    assert _monitor.watch(client, Schema("fireap/"), "web", view) == 1, "finished with a failure"
    assert view.shown[0]["run_id"] is None and len(view.shown) == 3 and view.finished == [finished_release()]
    waits = [kwargs for _key, kwargs in client.kv.calls]
    assert {key for key, _kwargs in client.kv.calls} == {"fireap/web/"}
    assert all(kwargs["keys"] and kwargs["separator"] == "/" for kwargs in waits)
    assert "index" not in waits[0], "the first read does not block"
    assert (waits[1]["index"], waits[2]["index"]) == (7, 9)
    assert "index" not in waits[3], "the index went backwards (9 -> 4): start again from 0"
    assert waits[1]["wait"] == f"{round(_monitor.BLOCK_WAIT * 1000)}ms"


def test_watch_with_follow_goes_on_after_the_run(monkeypatch):
    states = [finished_release(), finished_release()]

    def read(_client, _schema, _app):
        if not states:
            raise KeyboardInterrupt
        return states.pop(0)

    monkeypatch.setattr(_monitor, "release_info", read)
    monkeypatch.setattr(_progress, "MIN_POLL_INTERVAL", 0)
    view = Recorder()
    with pytest.raises(KeyboardInterrupt):
        _monitor.watch(FakeClient([3, 5, 8]), Schema(), "web", view, follow=True)
    assert len(view.shown) == 2 and view.finished == []


# --- command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--app", "my app"], {}, "fireap-monitor: app name 'my app' may only contain"),
        (["--app", "web", "--port", "0"], {}, "port must be an integer between 1 and 65535, got 0"),
        (["--app", "web"], {"CONSUL_HTTP_ADDR": "unix:///tmp/consul.sock"}, "CONSUL_HTTP_ADDR 'unix:///tmp/consul.sock' names a unix socket"),
        (["--app", "web", "--kv-prefix", "bad prefix/"], {}, "fireap-monitor: "),
        (["--app", "web", "--config", "/nonexistent/config.yml"], {}, "/nonexistent/config.yml: cannot read the config"),
    ],
)
def test_bad_usage_exits_2_with_a_precise_message(argv, environ, message, monkeypatch, capsys):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert _monitor.main(argv, out=io.StringIO()) == _monitor.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_the_modes_exclude_each_other(capsys):
    assert _monitor.main(["--app", "web", "--one-shot", "--follow"]) == _monitor.EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_an_unreachable_agent_exits_1_naming_it(capsys):
    assert _monitor.main(["--app", "web", "--one-shot", "--port", "1", "--retries", "0"], out=io.StringIO()) == 1
    assert "cannot reach the Consul agent at http://127.0.0.1:1" in capsys.readouterr().err


def test_connection_settings_come_from_the_config_then_the_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    config = tmp_path / "config.yml"
    config.write_text("consul: {host: 10.0.0.5, port: 8501, scheme: https, validate_certs: false}\n"
                      "kv_prefix: releases/\napps: {}\n")
    args = _monitor._parser().parse_args(["--app", "web", "--config", str(config), "--port", "9500"])
    options, schema = _monitor.connection_settings(args)
    assert (options.host, options.port, options.scheme, options.validate_certs) == ("10.0.0.5", 9500, "https", False)
    assert schema.prefix == "releases/"


def test_a_report_that_cannot_be_written_says_where(tmp_path):
    with pytest.raises(OSError, match=f"cannot write the report to {tmp_path}/missing/r.html"):
        _monitor.write_report(str(tmp_path / "missing" / "r.html"), finished_release())


def test_a_paused_run_says_so_and_exits_0_unless_a_canary_failed():
    paused = info_of(finished_release()["nodes"], status="paused", all_finished=False)
    paused["release"]["pause_after_stage"] = 1
    assert "paused after stage 1 (resume to go on)" in _monitor.header_line(paused)
    assert _monitor.exit_code(paused) == 1  # node-004 failed
    paused["counts"] = dict(paused["counts"], failed=0)
    assert _monitor.exit_code(paused) == 0


def swarm_release():
    """Three nodes of an app with an artifact: one fetched it and ran its commands, one fetches it."""
    return info_of([
        row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None),
        row("node-001", "done", source="node-000", depth=1, started=0.1, finished=3.0, downloaded=4000, percent=100.0,
            fetched=2.1),
        row("node-002", "pulling", source="node-000", depth=1, started=0.1, downloaded=2000, percent=50.0,
            rate=12_300_000),
    ], elapsed=3.0)


def test_the_frame_shows_a_download_while_it_runs_and_how_long_it_took():
    lines = _monitor.render_frame(swarm_release())
    assert "node-001  1.4.3    done                      node-000  1      +3.0s     2.9s (downloaded in 2.0s)" in lines
    assert "node-002  1.4.3    pulling 50% at 12.3 MB/s  node-000  1      -         -" in lines


def test_change_lines_follow_a_download_and_say_how_long_it_took():
    before = swarm_release()
    later = swarm_release()
    later["nodes"][2] = row("node-002", "pulling", source="node-000", depth=1, started=0.1, downloaded=3000,
                            percent=75.0, rate=9_000_000)
    assert _monitor.change_lines(before, later)[:1] == ["node-002 pulling from node-000 (depth 1) 75% at 9.0 MB/s"]
    assert _monitor.change_lines(later, later) == []
    first = _monitor.change_lines(None, before)
    assert "node-001 done from node-000 (depth 1) in 2.9s (downloaded in 2.0s)" in first
    assert "node-002 pulling from node-000 (depth 1) 50% at 12.3 MB/s" in first
