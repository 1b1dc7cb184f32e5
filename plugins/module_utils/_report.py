"""The HTML report of one release run: a single self-contained page rendered from info().

``render_report(info)`` takes what ``_progress.info()`` (the fireap_info module) or the
fireap_wait action returns and gives one HTML page without external resources: a summary,
the failed nodes with their error text, the propagation tree as nested lists, and a
timeline as inline SVG with one bar per node from its claim to its finish, coloured by its
depth in the tree (for an app with an artifact, the download part lighter than the commands').
Every text that comes from Consul (names, versions, errors, reasons) is
escaped. Pure functions, standard library only: fireap-monitor runs this on nodes.

A node record holds when its worker started and when it finished, not when it claimed its
slot (it writes nothing while it waits). The claim cannot have been earlier than the
worker's start, its source's finish, and the finish of the node that held the same slot one
stage earlier; ``claim_times`` takes the latest of these as the claim.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass

from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._progress import ALL_FINISHED, COUNT_ORDER

#: Keys of an info() result the report reads.
REQUIRED_KEYS = ("app", "version", "run_id", "status", "counts", "total", "nodes", "tree", "timings", "release")

#: Bar colours by depth (Okabe-Ito, distinguishable with colour-blindness); depths past the
#: end reuse them from the start.
DEPTH_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
#: Bars of nodes without a depth (failed before they claimed a source).
NO_DEPTH_COLOUR = "#999999"

_PLOT_WIDTH = 720
_LABEL_CHAR_WIDTH = 7
_LABEL_MAX_WIDTH = 260
_AXIS_HEIGHT = 28
_LEGEND_HEIGHT = 26
_MIN_BAR_WIDTH = 2.0

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: .25em .8em .25em 0; vertical-align: top; }
table.summary th { font-weight: 600; color: #555; }
table.failed td, table.failed th { border-bottom: 1px solid #eee; }
table.history td, table.history th { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; }
table.history tr.current { font-weight: bold; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; font-size: 12px; }
.status { display: inline-block; padding: .1em .6em; border-radius: .8em; font-weight: 600; color: #fff; }
.status-succeeded { background: #2e7d32; } .status-failed, .status-aborted, .status-timed-out { background: #c62828; }
.status-running { background: #ef6c00; } .status-paused { background: #1565c0; } .status-none { background: #777; }
.count { display: inline-block; margin-right: 1.2em; } .count b { font-size: 1.3em; }
ul.tree, ul.tree ul { list-style: none; padding-left: 1.4em; border-left: 1px dotted #bbb; }
ul.tree { border-left: none; padding-left: 0; }
.node { font-family: ui-monospace, monospace; }
.meta { color: #666; font-size: 12px; }
.st-failed { color: #c62828; font-weight: 600; } .st-pulling, .st-waiting, .st-pending { color: #ef6c00; }
svg text { font: 11px ui-monospace, monospace; fill: #333; }
svg .axis line { stroke: #ccc; } svg .bar.failed { stroke: #c62828; stroke-width: 2; }
svg .bar.running { fill-opacity: .45; }
svg .download { fill: #fff; fill-opacity: .55; }
"""


class ReportError(FireapError):
    """The data given is not a release's info; the message says what is missing."""


@dataclass(frozen=True)
class Bar:
    """One node's pull on the timeline, in seconds since the fire."""

    node: str
    depth: int | None
    source: str | None
    status: str
    start: float
    end: float
    fetched: float | None = None  # when the download of the artifact ended, for an app with one

    @property
    def running(self) -> bool:
        return self.status not in ("done", "failed")


def check_info(info) -> dict:
    """Return ``info`` if it has what the report reads; ReportError names what is missing."""
    if not isinstance(info, dict):
        raise ReportError(
            f"a release report needs the result of fireap_info or fireap_wait (a mapping), got {type(info).__name__}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in info]
    if missing:
        raise ReportError(
            f"a release report needs the result of fireap_info or fireap_wait; the data given lacks "
            f"{', '.join(repr(key) for key in missing)}"
        )
    if not isinstance(info["nodes"], list) or not all(isinstance(row, dict) and "node" in row for row in info["nodes"]):
        raise ReportError("'nodes' must be a list of node rows, each with a 'node' name")
    if not isinstance(info["tree"], dict):
        raise ReportError(f"'tree' must map a source to its pullers, got {type(info['tree']).__name__}")
    return info


def escape(value) -> str:
    """Text for HTML and SVG: quotes escaped too, so the result is safe in attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def format_seconds(seconds: float | None) -> str:
    """``0.4s``, ``12.3s``, ``4m 05s``, ``2h 03m``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_rate(rate: float | None) -> str:
    """Bytes per second as ``850.0 kB/s``, ``12.3 MB/s``; ``-`` for None."""
    if rate is None:
        return "-"
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= size:
            return f"{rate / size:.1f} {unit}"
    return f"{rate:.0f} B/s"


def download_text(row: dict) -> str | None:
    """A node's download of the artifact in words: ``45% at 12.3 MB/s`` while it downloads,
    ``downloaded in 2.1s`` once it has the file; None for a node (or an app) without one."""
    if row.get("download_seconds") is not None:
        return f"downloaded in {format_seconds(row['download_seconds'])}"
    if row.get("download_percent") is None:
        return None
    rate = f" at {format_rate(row['rate'])}" if row.get("rate") is not None else ""
    return f"{row['download_percent']:g}%{rate}"


def format_time(epoch: float | None) -> str:
    """An epoch time as ``2026-11-26 16:30:01 UTC``; ``-`` for None."""
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def outcome(info: dict) -> str:
    """One word for the run: succeeded, failed, aborted, timed-out, paused, running or none."""
    if info.get("timed_out"):
        return "timed-out"
    if info["status"] in ("aborted", "none", "paused"):
        return info["status"]
    if info["status"] == "finished":
        return "failed" if info["counts"].get("failed") else "succeeded"
    return "running"


def claim_times(info: dict) -> dict[str, float]:
    """When each node of this run claimed its slot, as late as the records show it can have been.

    The latest of: the worker's start, its source's finish, and the finish of the node that
    held the same planned slot one stage earlier (when the node pulled from its planned source).
    """
    rows = [row for row in info["nodes"] if row.get("this_run") and row.get("started") is not None]
    finished = {row["node"]: row["finished"] for row in rows if row.get("finished") is not None}
    holders = {
        (row.get("planned_source"), row.get("slot"), row.get("stage")): row["node"]
        for row in info["nodes"]
        if row.get("planned_source") is not None
    }
    claims = {}
    for row in rows:
        candidates = [row["started"]]
        source = row.get("source")
        if source is not None and source in finished:
            candidates.append(finished[source])
        if source is not None and source == row.get("planned_source") and row.get("stage"):
            previous = holders.get((source, row.get("slot"), row["stage"] - 1))
            if previous in finished:
                candidates.append(finished[previous])
        claim = max(candidates)
        if row.get("finished") is not None:
            claim = min(claim, row["finished"])
        claims[row["node"]] = claim
    return claims


def timeline_bars(info: dict) -> list[Bar]:
    """One bar per node that started in this run, from its claim to its finish (or to now if
    it is still pulling), in seconds since the fire, ordered by start; with an artifact, the
    time its download ended splits the bar into the download and the commands."""
    fired = info["timings"].get("fired_at")
    if fired is None:
        return []
    now = fired + (info["timings"].get("elapsed") or 0.0)
    claims = claim_times(info)
    bars = []
    for row in info["nodes"]:
        if row["node"] not in claims:
            continue
        end = row.get("finished")
        start = max(0.0, claims[row["node"]] - fired)
        stop = max(0.0, (end if end is not None else max(now, claims[row["node"]])) - fired)
        fetched = row.get("fetched")
        bars.append(
            Bar(
                node=row["node"],
                depth=row.get("depth"),
                source=row.get("source"),
                status=row["status"],
                start=start,
                end=stop,
                fetched=None if fetched is None else min(stop, max(start, fetched - fired)),
            )
        )
    bars.sort(key=lambda entry: (entry.start, entry.end, entry.node))
    return bars


def depth_colour(depth: int | None) -> str:
    return NO_DEPTH_COLOUR if depth is None else DEPTH_COLOURS[depth % len(DEPTH_COLOURS)]


def _tick_step(span: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving 4 to 10 ticks over ``span``."""
    raw = span / 6
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def render_timeline(bars: list[Bar]) -> str:
    """The timeline as an inline ``<svg>``: a seconds axis, one bar per node, a depth legend."""
    if not bars:
        return '<p class="meta">No node has started in this run yet.</p>'
    count = len(bars)
    row_height = 18 if count <= 60 else 12 if count <= 300 else 6
    show_labels = row_height >= 12
    longest = max(len(entry.node) for entry in bars)
    label_width = min(_LABEL_MAX_WIDTH, longest * _LABEL_CHAR_WIDTH + 12) if show_labels else 8
    span = max(entry.end for entry in bars) or 1.0
    step = _tick_step(span)
    span = math.ceil(span / step) * step
    scale = _PLOT_WIDTH / span
    top = _LEGEND_HEIGHT + _AXIS_HEIGHT
    width = label_width + _PLOT_WIDTH + 24
    height = top + count * row_height + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline of {count} nodes">'
    ]
    depths = sorted({entry.depth for entry in bars}, key=lambda depth: (depth is None, depth or 0))
    x = label_width
    parts.append('<g class="legend">')
    for depth in depths:
        name = "no source" if depth is None else f"depth {depth}"
        parts.append(
            f'<rect class="swatch" x="{x}" y="6" width="12" height="12" fill="{depth_colour(depth)}"/>'
            f'<text x="{x + 16}" y="16">{name}</text>'
        )
        x += 16 + len(name) * _LABEL_CHAR_WIDTH + 14
    parts.append(
        f'<rect class="swatch failed" x="{x}" y="6" width="12" height="12" fill="#fff" stroke="#c62828" '
        f'stroke-width="2"/><text x="{x + 16}" y="16">failed</text>'
    )
    if any(entry.fetched is not None for entry in bars):
        x += 16 + len("failed") * _LABEL_CHAR_WIDTH + 14
        parts.append(
            f'<rect class="swatch" x="{x}" y="6" width="12" height="12" fill="{depth_colour(depths[0])}"/>'
            f'<rect class="download" x="{x}" y="6" width="12" height="12"/>'
            f'<text x="{x + 16}" y="16">download, then commands</text>'
        )
    parts.append("</g>")
    parts.append('<g class="axis">')
    ticks = int(round(span / step))
    for i in range(ticks + 1):
        seconds = i * step
        tick_x = label_width + seconds * scale
        parts.append(
            f'<line x1="{tick_x:.1f}" y1="{top - 4}" x2="{tick_x:.1f}" y2="{height - 8}"/>'
            f'<text x="{tick_x:.1f}" y="{top - 8}" text-anchor="middle">{seconds:g}s</text>'
        )
    parts.append("</g>")
    parts.append('<g class="bars">')
    bar_height = max(3, row_height - 4)
    for i, entry in enumerate(bars):
        y = top + i * row_height
        bar_x = label_width + entry.start * scale
        bar_width = max(_MIN_BAR_WIDTH, (entry.end - entry.start) * scale)
        classes = " ".join(
            ["bar", f"depth-{entry.depth}" if entry.depth is not None else "no-depth"]
            + (["failed"] if entry.status == "failed" else [])
            + (["running"] if entry.running else [])
        )
        source = f", from {entry.source}" if entry.source else ""
        depth = "no depth" if entry.depth is None else f"depth {entry.depth}"
        tip = f"{entry.node}: {entry.status}, {depth}{source}, +{entry.start:.2f}s to +{entry.end:.2f}s"
        if entry.fetched is not None:
            tip += f", downloaded by +{entry.fetched:.2f}s"
        if show_labels:
            parts.append(
                f'<text class="label" x="{label_width - 6}" y="{y + bar_height - 1}" '
                f'text-anchor="end">{escape(entry.node)}</text>'
            )
        parts.append(
            f'<rect class="{classes}" data-node="{escape(entry.node)}" x="{bar_x:.1f}" y="{y}" '
            f'width="{bar_width:.1f}" height="{bar_height}" fill="{depth_colour(entry.depth)}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if entry.fetched is not None:
            parts.append(
                f'<rect class="download" data-node="{escape(entry.node)}" x="{bar_x:.1f}" y="{y}" '
                f'width="{(entry.fetched - entry.start) * scale:.1f}" height="{bar_height}">'
                f"<title>{escape(tip)}</title></rect>"
            )
    parts.append("</g></svg>")
    return "".join(parts)


def _node_line(row: dict, leader: str | None) -> str:
    status = row["status"]
    details = [f'<span class="st-{escape(status)}">{escape(status)}</span>']
    if row["node"] == leader:
        details.append("leader")
    elif row.get("depth") is not None:
        details.append(f"depth {row['depth']}")
    if row.get("duration") is not None and row["node"] != leader:
        details.append(format_seconds(row["duration"]))
    download = download_text(row)
    if download is not None:
        details.append(escape(download))
    if status == "done" and not row.get("this_run"):
        details.append("done in an earlier run")
    return f'<span class="node">{escape(row["node"])}</span> <span class="meta">{", ".join(details)}</span>'


def render_tree(info: dict) -> str:
    """The propagation tree as nested lists from the leader, then the nodes no source served."""
    rows = {row["node"]: row for row in info["nodes"]}
    leader = (info.get("release") or {}).get("leader")
    tree = info["tree"]
    placed: set[str] = set()

    def branch(node: str) -> str:
        placed.add(node)
        row = rows.get(node) or {"node": node, "status": "unknown"}
        children = [child for child in tree.get(node, []) if child not in placed]
        inner = "".join(branch(child) for child in children)
        return f"<li>{_node_line(row, leader)}" + (f"\n<ul>\n{inner}</ul>" if inner else "") + "</li>\n"

    parts = []
    if leader is not None:
        parts.append(f'<ul class="tree">\n{branch(leader)}</ul>')
    rest = [row for row in info["nodes"] if row["node"] not in placed]
    if rest:
        parts.append(f"<h3>Not served by a node in this run ({len(rest)})</h3>")
        parts.append('<ul class="rest">\n' + "".join(f"<li>{_node_line(row, leader)}</li>\n" for row in rest) + "</ul>")
    return "".join(parts)


def _failed_section(info: dict) -> str:
    failed = [row for row in info["nodes"] if row["status"] == "failed"]
    if not failed:
        return '<p class="meta">No node failed.</p>'
    rows = "".join(
        f'<tr><td class="node">{escape(row["node"])}</td><td class="node">{escape(row.get("source") or "-")}</td>'
        f'<td><pre>{escape(row.get("error") or "no error recorded")}</pre></td></tr>'
        for row in failed
    )
    return f'<table class="failed"><thead><tr><th>Node</th><th>Source</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table>'


def _history_section(info: dict) -> str:
    """The app's last runs (info's ``history``, absent from older results), newest first."""
    history = info.get("history") or []
    if not isinstance(history, list) or not history:
        return '<p class="meta">No history recorded.</p>'
    rows = []
    for run in history:
        if not isinstance(run, dict):
            continue
        note = run.get("abort_reason") or (f"retry of run {run['retry_of']}" if run.get("retry_of") else "")
        current = ' class="current"' if run.get("run_id") == info.get("run_id") else ""
        rows.append(
            f'<tr{current}><td>{escape(run.get("fired_at_iso") or "-")}</td><td>{escape(run.get("version"))}</td>'
            f'<td>{escape(run.get("kind"))}</td><td>{escape(run.get("outcome"))}</td>'
            f'<td>{escape(run.get("done"))}/{escape(run.get("target_count"))} done, {escape(run.get("failed"))} failed</td>'
            f'<td>{escape(run.get("fired_by"))}</td><td class="node">{escape(run.get("run_id"))}</td>'
            f"<td>{escape(note)}</td></tr>"
        )
    labels = ("Fired", "Version", "Kind", "Outcome", "Targets", "Fired by", "Run", "Note")
    head = "".join(f"<th>{label}</th>" for label in labels)
    return f'<table class="history"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _summary(info: dict) -> str:
    release = info.get("release") or {}
    timings = info["timings"]
    counts = info["counts"]
    total = info["total"]
    elapsed = timings.get("elapsed")
    duration = format_seconds(elapsed)
    if elapsed is not None:
        duration += " from the fire to the last node" if info.get(ALL_FINISHED) else " since the fire"
    fanout = release.get("fanout")
    stages = f"max depth {escape(info.get('max_depth', '-'))}, planned stages {escape(info.get('stages_planned', '-'))}"
    if isinstance(fanout, int):
        stages += f", ideal ceil(log<sub>{fanout + 1}</sub> {escape(total)}) = {escape(info.get('ideal_stages', '-'))}"
    rows = [
        ("App", escape(info["app"])),
        ("Version", escape(info["version"])),
        ("Run", f'<span class="node">{escape(info["run_id"])}</span>'),
        ("Status", escape(info["status"])),
        ("Leader", f'<span class="node">{escape(release.get("leader"))}</span>'),
        ("Fan-out", escape(fanout)),
        ("Targets", f"{escape(total)} (the leader included)"),
        ("Fired at", format_time(timings.get("fired_at"))),
        ("Duration", duration),
        ("Depth", stages),
    ]
    if release.get("aborted_reason"):
        rows.append(("Aborted", escape(release["aborted_reason"])))
    refired = info.get("refired")
    if refired:
        names = sorted({name for entry in refired for name in entry.get("stragglers", [])})
        rows.append(("Event fired again", f"{len(refired)} time(s), to {escape(', '.join(names))}"))
    table = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    badges = "".join(
        f'<span class="count{f" st-{status}" if counts.get(status) else ""}"><b>{escape(counts.get(status, 0))}</b> {status}</span>'
        for status in COUNT_ORDER
    )
    return f'<table class="summary">{table}</table><p class="counts">{badges}</p>'


def render_report(info) -> str:
    """The whole page for ``info`` (what fireap_info or fireap_wait returns) as a string."""
    info = check_info(info)
    word = outcome(info)
    if not info.get("exists", True) or info["run_id"] is None:
        title = f"fireap: no release of {info['app']}"
        body = f"<h1>{escape(title)}</h1><p>No release of app {escape(info['app'])} is recorded.</p>"
    else:
        title = f"fireap release: {info['app']} {info['version']}"
        failed = info["counts"].get("failed", 0)
        body = (
            f"<header><h1>{escape(info['app'])} {escape(info['version'])}</h1>"
            f'<p><span class="status status-{word}">{word.replace("-", " ")}</span> '
            f'{escape(info["counts"].get("done", 0))}/{escape(info["total"])} done</p></header>'
            f'<section id="summary"><h2>Summary</h2>{_summary(info)}</section>'
            f'<section id="failed"><h2>Failed nodes ({escape(failed)})</h2>{_failed_section(info)}</section>'
            f'<section id="tree"><h2>Propagation tree</h2>{render_tree(info)}</section>'
            f'<section id="timeline"><h2>Timeline</h2><p class="meta">One bar per node from its claim of a slot '
            f"to its finish, in seconds since the fire, coloured by its depth in the tree.</p>"
            f"{render_timeline(timeline_bars(info))}</section>"
            f'<section id="history"><h2>History</h2>{_history_section(info)}</section>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
