"""The apps every node of the chaos suite runs, as the fireap_node role's ``fireap_node_apps``.

Every app command ends by appending ``<version> <source>`` to ``runs-<app>.log`` in the node's
directory (run_log), so that a command run twice for one version on one node is counted (an app
with an artifact has no single source: its line says ``swarm``).

The swarm scenarios' apps (swarm_apps) run on the first SWARM_NODES nodes only, each node with
an artifact directory and a swarm port of its own, capped at SWARM_RATE_LIMIT so that one
transfer of a SWARM_ARTIFACT_BYTES file lasts seconds even on the loopback.
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


def _record(source: str = "{{ remote.name }}") -> str:
    return f"printf '%s %s\\n' {{{{ version }}}} {source} >> runs-{{{{ app }}}}.log"


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


#: The apps of the swarm scenarios, one each.
SWARM_APPS = ("swarm-crash", "swarm-late", "swarm-corrupt", "swarm-leader")
#: How many nodes (the first of the cluster, the leader among them) take the swarm apps: a
#: cluster of any size runs the swarm scenarios at this N.
SWARM_NODES = 8
#: The artifact's size and every node's cap (bytes/s each way): 8 s for one node's download.
SWARM_ARTIFACT_BYTES = 2 * 1024 * 1024
SWARM_RATE_LIMIT = 256 * 1024
#: How long a node serves on once the run is over.
SWARM_SEED_SECONDS = 2


def artifact_dir(nodes_dir: Path, node: str) -> Path:
    """Where ``node`` keeps its artifacts: a directory of its own."""
    return nodes_dir / node / "builds"


def artifact_file(nodes_dir: Path, node: str, app: str, version: str) -> Path:
    """The file ``node``'s artifact path names for ``app`` at ``version``."""
    return artifact_dir(nodes_dir, node) / f"{app}-{version}.bin"


def swarm_apps(nodes_dir: Path, node: str, ports: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The swarm apps of ``node``, each on its port in ``ports``: the command logs its run once
    the artifact is in place (verified by then)."""
    return {app: {"artifact": {"path": str(artifact_dir(nodes_dir, node) / "{{ app }}-{{ version }}.bin"),
                               "seed_seconds": SWARM_SEED_SECONDS, "port": ports[app],
                               "rate_limit": SWARM_RATE_LIMIT},
                  "exec_commands": [_in_node(nodes_dir, f"test -s {{{{ artifact }}}} && {_record('swarm')}")]}
            for app in SWARM_APPS}
