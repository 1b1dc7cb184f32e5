"""The apps every node of the chaos suite runs, as the fireap_node role's ``fireap_node_apps``.

Every app command ends by appending ``<version> <source>`` to ``runs-<app>.log`` in the node's
directory (run_log), so that a command run twice for one version on one node is counted.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

#: The pull of the app whose workers are killed mid-pull: long enough that a kill aimed at a
#: pull in progress does not land after its command ended on a loaded machine.
CRASH_PULL_SECONDS = 8
#: command_timeout of the app whose injected command hangs.
HANG_TIMEOUT = 3
#: The hung command: a sleep of a length nothing else uses, so leftovers can be found.
HANG_SECONDS = 987


def run_log(app: str) -> str:
    """The file in a node's directory where each run of ``app``'s commands leaves a line."""
    return f"runs-{app}.log"


def _in_node(nodes_dir: Path, command: str) -> str:
    return f"cd {shlex.quote(str(nodes_dir))}/{{{{ node }}}} && {command}"


def _record() -> str:
    return "printf '%s %s\\n' {{ version }} {{ remote.name }} >> runs-{{ app }}.log"


def pull_command(nodes_dir: Path, seconds: float) -> str:
    """The pull of every app: takes ``seconds``, then logs the run."""
    return _in_node(nodes_dir, f"sleep {seconds:g} && {_record()}")


def source_checked_command(nodes_dir: Path, seconds: float) -> str:
    """A pull that fails when its source has crashed, before or during the transfer."""
    alive = "test ! -e ../{{ remote.name }}/crashed"
    return _in_node(nodes_dir, f"{alive} && sleep {seconds:g} && {alive} && {_record()}")


def started_marker(app: str) -> str:
    """The file the failing step of ``app`` leaves in a node's directory when it runs."""
    return f"started-{app}"


def injected_failure_command(nodes_dir: Path) -> str:
    """Fails on the nodes whose directory holds ``inject-fail-<app>``. When that file names
    a node, the failure waits until that node's own step has left ``started-<app>`` (at
    most 30 s), so that it comes only after that node has begun its pull."""
    marker = started_marker("{{ app }}")
    inject = "inject-fail-{{ app }}"
    return _in_node(
        nodes_dir,
        f"touch {marker} && if [ -e {inject} ]; then if [ -s {inject} ]; then m=../$(cat {inject})/{marker}; "
        "timeout 30 sh -c 'until [ -e \"$0\" ]; do sleep 0.05; done' \"$m\"; fi; "
        "echo injected failure >&2; exit 3; fi",
    )


def injected_hang_command(nodes_dir: Path) -> str:
    """Hangs on the nodes whose directory holds ``inject-hang-<app>``."""
    return _in_node(nodes_dir, f"if [ -e inject-hang-{{{{ app }}}} ]; then sleep {HANG_SECONDS}; fi")


def chaos_apps(nodes_dir: Path) -> dict[str, dict[str, Any]]:
    """Every scenario's apps, as the role's ``fireap_node_apps``."""
    pull = {name: {"exec_commands": [pull_command(nodes_dir, seconds)]} for name, seconds in (
        ("crash", CRASH_PULL_SECONDS), ("outage", 1), ("replay", 0.3), ("twin-a", 0.3), ("twin-b", 0.3), ("race", 0.3),
        ("race-other", 0.3), ("input", 0.2), ("access", 0.2), ("missed", 0.3), ("lossy", 0.3), ("late", 0.3),
        ("late-other", 0.3), ("absent", 0.3), ("service-id", 0.3), ("old-txn", 0.3))}
    failing = [injected_failure_command(nodes_dir), pull_command(nodes_dir, 0.3)]
    return {
        **pull,
        "source": {"exec_commands": [source_checked_command(nodes_dir, 2)]},
        "source-leave": {"exec_commands": [source_checked_command(nodes_dir, 2)]},
        "fail-abort": {"exec_commands": failing, "on_command_failure": "abort"},
        "fail-ignore": {"exec_commands": failing, "on_command_failure": "ignore"},
        "hang": {"exec_commands": [injected_hang_command(nodes_dir), pull_command(nodes_dir, 0.3)],
                 "command_timeout": HANG_TIMEOUT},
        "budget": {"exec_commands": [injected_failure_command(nodes_dir), pull_command(nodes_dir, 2)]},
    }
