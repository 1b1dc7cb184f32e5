# SPDX-License-Identifier: MIT
"""Filter release_report_html: the HTML report of a fireap release run."""

from __future__ import annotations

DOCUMENTATION = r"""
name: release_report_html
short_description: Render the HTML report of a fireap release run
version_added: 0.1.0
description:
  - Turns the result of M(fireap.consul.fireap_info) or M(fireap.consul.fireap_wait) into one self-contained
    HTML page (no external resources) - a summary (app, version, counts, duration, status), the failed nodes
    with their error text, the propagation tree as nested lists from the leader, and a timeline as inline SVG
    with one bar per node from its claim of a slot to its finish, coloured by its depth in the tree.
  - Every text that comes from Consul (node names, versions, errors, reasons) is escaped.
  - The same page is written by C(fireap-monitor --app APP --report FILE), which the C(fireap.consul.fireap_node)
    role installs on every node.
options:
  _input:
    description:
      - The registered result of M(fireap.consul.fireap_info) or M(fireap.consul.fireap_wait).
    type: dict
    required: true
seealso:
  - module: fireap.consul.fireap_info
  - module: fireap.consul.fireap_wait
author:
  - fireap maintainers (@fireap)
"""

EXAMPLES = r"""
- name: Read the progress of the current run of web
  fireap.consul.fireap_info:
    app: web
  register: progress

- name: Write it as an HTML report on the controller
  ansible.builtin.copy:
    content: "{{ progress | fireap.consul.release_report_html }}"
    dest: /tmp/web-release.html
    mode: "0644"
  delegate_to: localhost
"""

RETURN = r"""
_value:
  description: The HTML page, a complete document starting with C(<!DOCTYPE html>).
  type: str
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.fireap.consul.plugins.module_utils._report import ReportError, render_report


def release_report_html(info):
    """The HTML page of the run described by ``info``; AnsibleFilterError says what is missing."""
    try:
        return render_report(info)
    except ReportError as err:
        raise AnsibleFilterError(f"release_report_html: {err}") from None


class FilterModule:
    """The collection's filters."""

    def filters(self):
        return {"release_report_html": release_report_html}
