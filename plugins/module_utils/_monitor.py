"""fireap-monitor: a release's progress, live in a terminal, as log lines, once, or as an HTML report.

Reads the same state as the fireap_info module (``_progress.info``) through the same
connection options and CONSUL_HTTP_* variables (``_connection.ConsulOptions``), or through a
node's task config (``--config``). The rendering is pure functions of that state:

* on a terminal the table is redrawn in place (ANSI cursor moves), only when it changed;
* when the output is not a terminal, each change is one plain appended line per node
  (and one with the counts), no escape codes, then the final table;
* ``--one-shot`` prints the table once; ``--report FILE`` writes the HTML report.

Without ``--follow`` the watch ends when the run has finished or was aborted (waiting first
for a release if none is recorded yet). It drives the wait loop ``_progress.follow_run``,
which between reads blocks on the app's KV prefix (a Consul blocking query), so every change
is seen at once and nothing is polled. Standard library, py-consul and PyYAML only: the
fireap_node role installs it on nodes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
from functools import partial

from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    OPTION_NAMES,
    ConsulOptions,
    build_client,
    consul_errors,
)
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._kv import DEFAULT_PREFIX, Schema
from ansible_collections.fireap.consul.plugins.module_utils._progress import (
    COUNT_ORDER,
    STATUS_FINISHED,
    STATUS_PAUSED,
    PrefixChanges,
    counts_text,
    follow_run,
    info as release_info,
    run_over,
)
from ansible_collections.fireap.consul.plugins.module_utils._report import (
    download_text,
    format_seconds,
    format_time,
    render_report,
)
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import load_config
from ansible_collections.fireap.consul.plugins.module_utils._validation import check_name

PROG = "fireap-monitor"

EXIT_OK = 0
#: The run finished with failures or was aborted, or Consul could not be read.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Longest a blocking read of the app's prefix waits for a change (seconds).
BLOCK_WAIT = 30.0

COLUMNS = ("NODE", "VERSION", "STATUS", "SOURCE", "DEPTH", "FINISHED", "TOOK")
BAR_DONE, BAR_FAILED, BAR_LEFT = "#", "!", "."
BAR_WIDTH = 40
#: Failures and warnings listed below the table; the rest are counted.
MAX_FAILED_LINES = 10
MAX_WARNING_LINES = 3
#: Which rows stay visible when the terminal is too small for the table: unfinished and
#: failed nodes first.
ROW_PRIORITY = {"failed": 0, "pulling": 1, "waiting": 2, "pending": 3, "done": 4}

# Cursor to the start of the line n lines up; clear to the end of the line / of the screen.
_UP = "\x1b[{}F"
_CLEAR_LINE = "\x1b[K"
_CLEAR_DOWN = "\x1b[J"
_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"


# --- rendering (pure) ---------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with every control character shown as ``?``: an error message (a command's
    stderr) must not move the cursor or recolour the terminal."""
    return "".join(char if char.isprintable() else "?" for char in text)


def progress_bar(counts: dict, total: int, width: int = BAR_WIDTH) -> str:
    """``[####!!......]``: done nodes as ``#``, failed as ``!``, the rest as ``.``."""
    if total <= 0:
        return "[" + BAR_LEFT * width + "]"
    done = counts.get("done", 0) * width // total
    failed = min(width - done, -(-counts.get("failed", 0) * width // total))
    return "[" + BAR_DONE * done + BAR_FAILED * failed + BAR_LEFT * (width - done - failed) + "]"


def progress_text(info: dict) -> str:
    """``12/20 done, 1 failed, 3 pulling, 0 waiting, 4 pending (65.0%)``."""
    return f"{counts_text(info)} ({info['percent']:.1f}%)"


def header_line(info: dict) -> str:
    """What run this is and how it stands; the duration only once it is final."""
    if info["run_id"] is None:
        return f"{info['app']}: no release recorded yet"
    fired = format_time(info["timings"].get("fired_at"))
    status = info["status"]
    if status == "aborted":
        reason = (info.get("release") or {}).get("aborted_reason") or "no reason given"
        status = f"aborted ({reason})"
    elif status == STATUS_PAUSED:
        status = f"paused after stage {(info.get('release') or {}).get('pause_after_stage')} (resume to go on)"
    line = f"{info['app']} {info['version']}  run {info['run_id'][:12]}  fired {fired}  {status}"
    if run_over(info):
        line += f" after {format_seconds(info['timings'].get('elapsed'))}"
    return line


def node_cells(row: dict, info: dict) -> tuple[str, ...]:
    """One table row: what a node has or is getting, from where, how deep, when and how long.

    A node's version is the run's when it is done or has a record of this run; a node
    without one (pending) shows ``-``: info() reads nothing else of it. With an artifact, a
    pulling node's status shows how much it has and at what rate, a finished one's TOOK how
    long the download took.
    """
    fired = info["timings"].get("fired_at")
    this_run = row.get("this_run")
    finished = row.get("finished")
    if not this_run:
        at = "earlier run" if row["status"] == "done" else "-"
    elif finished is not None and fired is not None:
        at = f"+{format_seconds(max(0.0, finished - fired))}"
    else:
        at = "-"
    took = format_seconds(row.get("duration")) if this_run and row.get("depth") != 0 else "-"
    download = download_text(row)
    status = row["status"]
    if download is not None and row.get("download_seconds") is not None:
        took += f" ({download})"
    elif download is not None and status == "pulling":
        status += f" {download}"
    depth = row.get("depth")
    return (
        row["node"],
        info["version"] if this_run or row["status"] == "done" else "-",
        status,
        row.get("source") or "-",
        "-" if depth is None else str(depth),
        at,
        took,
    )


def select_rows(rows: list[dict], limit: int | None) -> tuple[list[dict], list[dict]]:
    """(shown, hidden): at most ``limit`` rows, unfinished and failed ones first, in table order."""
    if limit is None or len(rows) <= limit:
        return rows, []
    ranked = sorted(range(len(rows)), key=lambda i: (ROW_PRIORITY.get(rows[i]["status"], 5), i))
    keep = set(ranked[:max(0, limit)])
    return [row for i, row in enumerate(rows) if i in keep], [row for i, row in enumerate(rows) if i not in keep]


def render_table(info: dict, max_rows: int | None = None) -> list[str]:
    """The node table with aligned columns; past ``max_rows`` rows, a line counts the rest."""
    shown, hidden = select_rows(info["nodes"], max_rows)
    cells = [COLUMNS] + [node_cells(row, info) for row in shown]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    if hidden:
        by_status = {}
        for row in hidden:
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        counted = ", ".join(f"{by_status[status]} {status}" for status in COUNT_ORDER if status in by_status)
        lines.append(f"... and {len(hidden)} more nodes ({counted})")
    return lines


def render_frame(info: dict, width: int | None = None, max_rows: int | None = None) -> list[str]:
    """The whole display: header, progress bar with counts, node table, failures, warnings.

    ``width`` cuts every line to that many characters; ``max_rows`` bounds the table.
    """
    lines = [header_line(info)]
    if info["run_id"] is not None:
        lines.append(f"{progress_bar(info['counts'], info['total'])} {progress_text(info)}")
        lines.append("")
        lines += render_table(info, max_rows)
        failed = [row for row in info["nodes"] if row["status"] == "failed"]
        for row in failed[:MAX_FAILED_LINES]:
            error = (row.get("error") or "no error recorded").splitlines() or [""]
            source = f" (from {row['source']})" if row.get("source") else ""
            lines.append(f"failed: {row['node']}{source}: {error[0]}")
        if len(failed) > MAX_FAILED_LINES:
            lines.append(f"failed: ... and {len(failed) - MAX_FAILED_LINES} more")
    warnings = list(info.get("warnings") or ())
    lines += [f"warning: {warning}" for warning in warnings[:MAX_WARNING_LINES]]
    if len(warnings) > MAX_WARNING_LINES:
        lines.append(f"warning: ... and {len(warnings) - MAX_WARNING_LINES} more")
    lines = [printable(line) for line in lines]
    if width is not None:
        lines = [line[:width] for line in lines]
    return lines


def frame_rows_budget(height: int, info: dict) -> int:
    """Table rows that fit a terminal of ``height`` lines with the rest of the frame (and the cursor's line)."""
    failed = min(info["counts"].get("failed", 0), MAX_FAILED_LINES + 1)
    warnings = min(len(info.get("warnings") or ()), MAX_WARNING_LINES + 1)
    fixed = 4 + 1 + failed + warnings  # header, bar, blank line, column names; the "... more nodes" line
    return max(1, height - fixed - 1)


def change_lines(before: dict | None, info: dict) -> list[str]:
    """Plain lines for what changed since ``before``: one per node whose state (or download's
    progress) changed, then the counts."""
    if info["run_id"] is None:
        return [] if before is not None and before["run_id"] is None else [header_line(info)]
    lines = []
    new_run = before is None or before["run_id"] != info["run_id"]
    if new_run:
        lines.append(header_line(info))
    old = {} if new_run else {row["node"]: row for row in before["nodes"]}
    for row in info["nodes"]:
        previous = old.get(row["node"])
        if previous is not None and ((previous["status"], previous.get("source"), previous.get("download_percent"))
                                     == (row["status"], row.get("source"), row.get("download_percent"))):
            continue
        if new_run and row["status"] == "pending":
            continue
        lines.append(node_change(row, info))
    status_changed = before is None or new_run or before["status"] != info["status"]
    if lines or status_changed:
        elapsed = format_seconds(info["timings"].get("elapsed"))
        suffix = "" if info["status"] == "running" else f"; {info['status']}"
        lines.append(f"{info['app']} {info['version']}: {progress_text(info)} [{elapsed}]{suffix}")
    return [printable(line) for line in lines]


def node_change(row: dict, info: dict) -> str:
    """``node-004 done from node-001 (depth 2) in 3.1s``, ``node-003 failed: <error>``..."""
    node, status = row["node"], row["status"]
    source = f" from {row['source']}" if row.get("source") else ""
    depth = f" (depth {row['depth']})" if row.get("depth") is not None else ""
    if status == "done" and not row.get("this_run"):
        return f"{node} done in an earlier run"
    if status == "done" and row.get("depth") == 0:
        return f"{node} done (the leader)"
    if status == "done":
        took = f" in {format_seconds(row['duration'])}" if row.get("duration") is not None and row.get("depth") else ""
        if row.get("download_seconds") is not None:
            took += f" ({download_text(row)})"
        return f"{node} done{source}{depth}{took}"
    if status == "failed":
        error = (row.get("error") or "no error recorded").splitlines() or [""]
        return f"{node} failed{source}: {error[0]}"
    download = f" {download_text(row)}" if status == "pulling" and download_text(row) is not None else ""
    return f"{node} {status}{source}{depth}{download}"


def exit_code(info: dict) -> int:
    """0 for a run that finished, or is held by its canary gate, without failures; else 1."""
    if info["status"] == STATUS_PAUSED:
        return EXIT_FAILED if info["counts"]["failed"] else EXIT_OK
    return EXIT_OK if info["status"] == STATUS_FINISHED and info["succeeded"] else EXIT_FAILED


# --- output -------------------------------------------------------------------------------


class TerminalView:
    """Redraws the frame in place: back up over the previous frame, rewrite, clear what is left."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.drawn: list[str] = []
        self.stream.write(_HIDE_CURSOR)

    def show(self, info: dict) -> None:
        size = shutil.get_terminal_size()
        # One column spare: a line as wide as the terminal wraps on some terminals.
        lines = render_frame(info, size.columns - 1, frame_rows_budget(size.lines, info))
        if lines == self.drawn:
            return
        text = _UP.format(len(self.drawn)) if self.drawn else ""
        text += "".join(line + _CLEAR_LINE + "\n" for line in lines) + _CLEAR_DOWN
        self.stream.write(text)
        self.stream.flush()
        self.drawn = lines

    def finish(self, info: dict) -> None:
        self.show(info)

    def close(self) -> None:
        self.stream.write(_SHOW_CURSOR)
        self.stream.flush()


class LogView:
    """Appends plain lines for each change and prints the full table when the run is over."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.last: dict | None = None

    def show(self, info: dict) -> None:
        lines = change_lines(self.last, info)
        self.last = info
        if lines:
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()

    def finish(self, info: dict) -> None:
        self.show(info)
        self.stream.write("\n" + "".join(line + "\n" for line in render_frame(info)))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


# --- reading Consul ------------------------------------------------------------------------


def watch(client, schema: Schema, app: str, view, follow: bool = False) -> int:
    """Show every change of ``app``'s state until its run is over (forever with ``follow``)."""
    changes = PrefixChanges(client, schema.app_prefix(app))
    for snapshot in follow_run(partial(release_info, client, schema, app), changes, pin=False, poll=BLOCK_WAIT):
        if run_over(snapshot.info) and not follow:
            view.finish(snapshot.info)
            return exit_code(snapshot.info)
        view.show(snapshot.info)


def write_report(path: str, info: dict) -> None:
    """Write the HTML report to ``path`` atomically (a reader never sees half a page)."""
    page = render_report(info)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=".fireap-report-", suffix=".html", dir=directory)
    except OSError as err:
        raise OSError(f"cannot write the report to {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(page)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# --- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Show the progress of an app's fireap release: live (redrawn in place on a terminal, "
                    "appended lines otherwise), once, or as an HTML report.",
        epilog="The connection options fall back to the Consul CLI's variables (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, "
               "CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_SSL, CONSUL_HTTP_SSL_VERIFY, CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT, "
               "CONSUL_CLIENT_KEY), as "
               "the modules' do; the token is taken only from those (or --config), never from the command line. "
               "Exit codes: 0 the run succeeded (or was shown or written once), 1 it failed or was aborted or "
               "Consul could not be read, 2 bad usage, 130 interrupted.",
    )
    parser.add_argument("--app", required=True, help="the app whose release to show")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--one-shot", action="store_true", help="print the table once and exit")
    mode.add_argument("--follow", action="store_true", help="keep watching after the run is over, for the next runs")
    mode.add_argument("--report", metavar="FILE", help="write the run's HTML report to FILE and exit")
    parser.add_argument("--kv-prefix", help=f"Consul KV prefix of fireap's state (default {DEFAULT_PREFIX}, or the config's)")
    parser.add_argument("--config", metavar="FILE",
                        help="take the Consul connection and kv_prefix from this fireap-reap task config (for "
                             "example /etc/fireap/config.yml on a node); the options below override it")
    connection = parser.add_argument_group("Consul connection")
    connection.add_argument("--host", help="the agent's host (default 127.0.0.1)")
    connection.add_argument("--port", type=int, help="the agent's HTTP port (default 8500)")
    connection.add_argument("--scheme", choices=("http", "https"), help="default http")
    connection.add_argument("--validate-certs", action=argparse.BooleanOptionalAction, default=None,
                            help="verify the agent's TLS certificate (default yes)")
    connection.add_argument("--ca-path", help="CA certificate file or directory for TLS")
    connection.add_argument("--client-cert", help="client certificate file (PEM) for agents that verify clients")
    connection.add_argument("--client-key", help="the client certificate's private key file (PEM)")
    connection.add_argument("--timeout", type=float, help="seconds per request (default 30)")
    connection.add_argument("--retries", type=int, help="retries of a failed read (default 3)")
    return parser


def connection_settings(args) -> tuple[ConsulOptions, Schema]:
    """Options and KV schema from ``--config`` (if given), the flags and the environment."""
    params: dict = {}
    prefix = DEFAULT_PREFIX
    if args.config:
        config = load_config(args.config)
        params.update(config.consul)
        prefix = config.kv_prefix
    params.update({name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name, None) is not None})
    if args.kv_prefix is not None:
        prefix = args.kv_prefix
    return ConsulOptions.from_config(params), Schema(prefix)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args, options: ConsulOptions, schema: Schema, out) -> int:
    with build_client(options) as client, consul_errors(options, f"reading the release of app {args.app!r}"):
        if args.one_shot or args.report:
            current = release_info(client, schema, args.app)
            if args.report:
                write_report(args.report, current)
                out.write(f"{PROG}: wrote the report of app {args.app} ({current['status']}) to {args.report}\n")
            else:
                out.write("".join(line + "\n" for line in render_frame(current)))
            return EXIT_OK
        view = TerminalView(out) if out.isatty() else LogView(out)
        try:
            return watch(client, schema, args.app, view, args.follow)
        finally:
            view.close()


def main(argv=None, out=None) -> int:
    """Run fireap-monitor with ``argv`` (default: the command line); return the exit code."""
    out = out or sys.stdout
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        check_name(args.app, "app")
        options, schema = connection_settings(args)
    except FireapError as err:
        sys.stderr.write(f"{PROG}: {err}\n")
        return EXIT_USAGE
    # SIGTERM unwinds like Ctrl-C, so that a live view gives the cursor back.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return run(args, options, schema, out)
    except (FireapError, OSError) as err:
        sys.stderr.write(f"{PROG}: {err}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
