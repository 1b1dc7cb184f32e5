"""The release_report_html filter: registered under its name, renders the page, fails clearly.

Its use in a playbook (release.yml) is covered by tests/integration/test_release_playbook.py.
"""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.fireap.consul.plugins.filter.release_report_html import FilterModule, release_report_html
from ansible_collections.fireap.consul.plugins.module_utils._report import render_report

FIRED = 1_700_000_000.0

#: A finished two-node run as fireap_wait registers it (info() plus the wait's own keys).
WAITED = {
    "app": "web",
    "exists": True,
    "release": {"app": "web", "version": "2.0", "run_id": "a1" * 16, "fanout": 1, "leader": "node-a",
                "target_count": 2, "fired_at": FIRED, "filters": {}, "status": "running", "aborted_reason": None},
    "run_id": "a1" * 16,
    "version": "2.0",
    "status": "finished",
    "all_finished": True,
    "succeeded": True,
    "counts": {"done": 2, "pulling": 0, "waiting": 0, "failed": 0, "pending": 0},
    "total": 2,
    "percent": 100.0,
    "failed_nodes": [],
    "nodes": [
        {"node": "node-a", "status": "done", "this_run": True, "planned_source": None, "stage": 0, "slot": None,
         "source": None, "depth": 0, "started": FIRED, "finished": FIRED, "duration": 0.0, "error": None},
        {"node": "node-b", "status": "done", "this_run": True, "planned_source": "node-a", "stage": 1, "slot": 0,
         "source": "node-a", "depth": 1, "started": FIRED + 0.1, "finished": FIRED + 1.5, "duration": 1.4,
         "error": None},
    ],
    "tree": {"node-a": ["node-b"]},
    "max_depth": 1,
    "stages_planned": 1,
    "ideal_stages": 1,
    "timings": {"fired_at": FIRED, "first_finished": FIRED + 1.5, "last_finished": FIRED + 1.5, "elapsed": 1.5},
    "lock": None,
    "timed_out": False,
    "aborted": False,
    "refired": [],
    "polls": 3,
}


def test_the_filter_is_registered_under_its_documented_name():
    assert FilterModule().filters() == {"release_report_html": release_report_html}


def test_the_filter_renders_the_report():
    page = release_report_html(WAITED)
    assert page == render_report(WAITED)
    assert page.count('<rect class="bar ') == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not a result", "needs the result of fireap_info or fireap_wait (a mapping), got str"),
        ({"app": "web", "msg": "failed"}, "lacks 'version', 'run_id'"),
    ],
)
def test_bad_input_fails_naming_the_filter_and_the_problem(value, message):
    with pytest.raises(AnsibleFilterError, match=r"^release_report_html: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        release_report_html(value)
