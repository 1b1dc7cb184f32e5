"""Release states shaped as _progress.info() returns them, for the rendering and outcome tests."""

from __future__ import annotations

from ansible_collections.fireap.consul.plugins.module_utils._progress import iso_utc

FIRED = 1_700_000_000.0
COUNT_KEYS = ("done", "pulling", "waiting", "failed", "pending")


def row(node, status, *, source=None, depth=None, started=None, finished=None, error=None, this_run=True,
        planned_source=None, stage=1, slot=0, downloaded=None, percent=None, rate=None, fetched=None):
    """One node row; times are seconds after FIRED (``fetched``: when an artifact's download ended)."""
    started_at = None if started is None else FIRED + started
    finished_at = None if finished is None else FIRED + finished
    fetched_at = None if fetched is None else FIRED + fetched
    return {
        "node": node,
        "status": status,
        "this_run": this_run,
        "planned_source": planned_source if planned_source is not None else source,
        "stage": stage,
        "slot": slot,
        "source": source,
        "depth": depth,
        "started": started_at,
        "started_iso": iso_utc(started_at),
        "finished": finished_at,
        "finished_iso": iso_utc(finished_at),
        "duration": None if finished is None or started is None else finished - started,
        "error": error,
        "downloaded": downloaded,
        "download_percent": percent,
        "rate": rate,
        "fetched": fetched_at,
        "fetched_iso": iso_utc(fetched_at),
        "download_seconds": None if fetched is None or started is None else fetched - started,
    }


def info_of(rows, *, app="web", version="1.4.3", status=None, elapsed=None, fanout=2, aborted_reason=None, **extra):
    """An info() result for ``rows`` (the first is the leader), counts and tree derived from them."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for one in rows:
        counts[one["status"]] += 1
    all_finished = counts["pending"] == counts["waiting"] == counts["pulling"] == 0
    if status is None:
        status = "aborted" if aborted_reason else "finished" if all_finished else "running"
    tree = {}
    for one in rows:
        if one["this_run"] and one["source"]:
            tree.setdefault(one["source"], []).append(one["node"])
    ends = [one["finished"] for one in rows[1:] if one["this_run"] and one["finished"] is not None]
    first, last = (min(ends), max(ends)) if ends else (None, None)
    if elapsed is None:
        elapsed = (last - FIRED) if ends else 0.0
    total = len(rows)
    info = {
        "app": app,
        "exists": True,
        "release": {"app": app, "version": version, "run_id": "0f3c" * 8, "fanout": fanout, "leader": rows[0]["node"],
                    "target_count": total, "fired_at": FIRED, "fired_at_iso": iso_utc(FIRED), "filters": {},
                    "status": "aborted" if aborted_reason else "running", "aborted_reason": aborted_reason,
                    "pause_after_stage": None, "resumed_at": None, "checksum": None},
        "run_id": "0f3c" * 8,
        "version": version,
        "status": status,
        "all_finished": all_finished,
        "succeeded": all_finished and counts["failed"] == 0,
        "counts": counts,
        "total": total,
        "percent": round(100.0 * (counts["done"] + counts["failed"]) / total, 1),
        "failed_nodes": [{"node": one["node"], "source": one["source"], "error": one["error"]}
                         for one in rows if one["status"] == "failed"],
        "nodes": rows,
        "tree": tree,
        "max_depth": max((one["depth"] for one in rows if one["depth"] is not None), default=0),
        "stages_planned": 2,
        "ideal_stages": 2,
        "timings": {"fired_at": FIRED, "fired_at_iso": iso_utc(FIRED), "first_finished": first,
                    "first_finished_iso": iso_utc(first), "last_finished": last, "last_finished_iso": iso_utc(last),
                    "elapsed": elapsed},
        "lock": None,
        "warnings": [],
        "history": [],
        "canaries": [],
    }
    info.update(extra)
    return info


def finished_release():
    """Seven nodes, fan-out 2: two stages, one failure whose error holds markup."""
    return info_of([
        row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None),
        row("node-001", "done", source="node-000", depth=1, started=0.1, finished=1.0, slot=0),
        row("node-002", "done", source="node-000", depth=1, started=0.1, finished=1.2, slot=1),
        row("node-003", "done", source="node-000", depth=1, started=0.2, finished=2.0, stage=2, slot=0),
        row("node-004", "failed", source="node-001", depth=2, started=0.1, finished=1.8, stage=2, slot=0,
            error='exit status 3: <script>alert("x")</script> & more\nsecond line'),
        row("node-005", "done", source="node-001", depth=2, started=0.3, finished=2.4, stage=2, slot=1),
        row("node-006", "done", source="node-002", depth=2, started=0.1, finished=2.2, stage=2, slot=0),
    ], history=[
        history_row("0f3c" * 8, "1.4.3", "failed", done=6, failed=1, finished_at=FIRED + 2.4),
        history_row("9a1b" * 8, "1.4.2", "aborted", fired_at=FIRED - 3600, done=3, abort_reason="bad <build>"),
    ])


def history_row(run_id, version, outcome, fired_at=FIRED, done=7, failed=0, finished_at=None, abort_reason=None,
                kind="release"):
    """One line of info()'s history."""
    return {"run_id": run_id, "version": version, "kind": kind, "retry_of": None, "fired_by": "ops@ctl",
            "fired_at": fired_at, "fired_at_iso": iso_utc(fired_at), "target_count": 7, "outcome": outcome,
            "done": done, "failed": failed, "finished_at": finished_at, "finished_at_iso": iso_utc(finished_at),
            "abort_reason": abort_reason, "checksum": None}


def running_release():
    """Five nodes: the leader, one done, one pulling, one pending, one done in an earlier run."""
    return info_of([
        row("node-000", "done", depth=0, started=0.0, finished=0.0, stage=0, slot=None),
        row("node-001", "done", source="node-000", depth=1, started=0.1, finished=1.0),
        row("node-002", "pulling", source="node-000", depth=1, started=0.1, slot=1),
        row("node-003", "pending", planned_source="node-001", stage=2, this_run=False),
        row("node-004", "done", source="node-002", depth=2, started=-50.0, finished=-45.0, this_run=False,
            planned_source="node-001", stage=2, slot=1),
    ], elapsed=3.0)


def no_release(app="web"):
    """What info() returns for an app without a release record."""
    return {
        "app": app, "exists": False, "release": None, "run_id": None, "version": None, "status": "none",
        "all_finished": False, "succeeded": False, "counts": dict.fromkeys(COUNT_KEYS, 0), "total": 0,
        "percent": 0.0, "failed_nodes": [], "nodes": [], "tree": {}, "max_depth": 0, "stages_planned": 0,
        "ideal_stages": 0,
        "timings": {"fired_at": None, "fired_at_iso": None, "first_finished": None, "first_finished_iso": None,
                    "last_finished": None, "last_finished_iso": None, "elapsed": None},
        "lock": None, "warnings": [], "history": [], "canaries": [],
    }
