"""The chaos scenarios: each injects its faults into releases of apps of its own and returns
its Outcome (see the package docstring for the figures)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from dataclasses import asdict, replace
from typing import Any, Callable

import yaml

from ansible_collections.fireap.consul.plugins.module_utils._clearing import clear
from ansible_collections.fireap.consul.plugins.module_utils._connection import FireapConsulError, consul_errors
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.plugins.module_utils._firing import (
    EVENT_NAME,
    event_payload,
    fire,
    retry_stragglers,
)
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_DONE,
    NODE_FAILED,
    NODE_PULLING,
    NODE_WAITING,
    NodeState,
)
from ansible_collections.fireap.consul.plugins.module_utils._processed_events import write_atomic
from ansible_collections.fireap.consul.plugins.module_utils._progress import (
    info,
    over_failure_budget,
    wait,
)
from ansible_collections.fireap.consul.plugins.module_utils._reap import handler_command

from ..consul import Gossip
from .apps import HANG_TIMEOUT, run_log, started_marker
from .harness import HTTP_TIMEOUT, ChaosCluster, ChaosError
from .probe import Outcome, Probe, View
from .processes import handler_pids, hung_commands, kill_tree, worker_pids
from .swarm_scenarios import swarm_corrupt_peer, swarm_late_join, swarm_leader_gone, swarm_peer_crash

#: Seconds the double stays down in the outage scenario (an outage of 5 to 10 s).
OUTAGE_SECONDS = 6.0
HOSTILE_VERSION = "1;touch${IFS}PWNED;$(touch${IFS}PWNED2)"
#: Records the hostile-KV part of the bad-input scenario writes in its three runs on five targets.
HOSTILE_KV_RECORDS = 15
#: The share of events gossip loses to each agent in the event loss scenario.
EVENT_LOSS = 0.2
#: Seconds from an event's arrival to its handler's worker showing (a Python start).
HANDLER_START_SECONDS = 2.0
#: Gossip of the reordering scenario: late by seconds, half of the events out of fire order.
REORDER_GOSSIP = Gossip(delay=1.0, jitter=2.0, reorder=0.5)
#: The service of the service-ID scenario, and how many nodes run it.
SERVICE_NAME = "fireap-chaos-web"
SERVICE_ID_NODES = 8
#: The Consul release of the transaction limit scenario (before 1.14: 64 operations).
OLD_CONSUL_VERSION = "1.13.0"
#: A version that makes a FIREAP:TASK event longer than Serf's 512 bytes.
SERF_REFUSED_VERSION = 450
#: The failure budget of the budget scenario: its first failure is past it.
MAX_FAIL_PERCENTAGE = 1.0


def _done(view: View | None, version: str) -> bool:
    return view is not None and view.state is not None and view.state.has(version)


def _status(view: View | None, run_id: str) -> str:
    if view is None or view.state is None or view.state.run_id != run_id:
        return "pending"
    held = " (held)" if view.held else ""
    return view.state.status + held


def puller_crash(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "crash", "1"
    fired = probe.fire(app, version)
    targets, run_id = fired["targets"], fired["run_id"]
    count = max(1, (len(targets) - 1) // 10)
    outcome = Outcome("puller_crash", len(targets), count, f"kill -9 of {count} workers (and their commands) mid-pull")

    def pulling() -> list[str] | None:
        views = probe.views(app)
        ready = [name for name, view in views.items()
                 if view.held and view.state is not None and view.state.run_id == run_id
                 and view.state.status == NODE_PULLING and not probe.runs(app, name)[version]
                 and worker_pids(cluster.config_path(name), app)]
        return ready[:count] if len(ready) >= count else None

    killed = probe.wait(f"{count} nodes pulling {app}", pulling)
    for name in killed:
        for pid in worker_pids(cluster.config_path(name), app):
            kill_tree(pid)
    probe.snapshot(cluster.schema.app_prefix(app))
    others = [name for name in targets if name not in killed]
    probe.wait(f"the {len(others)} other nodes to finish", probe.finished(app, others, version))
    views = probe.views(app)
    if any(_done(views.get(name), version) for name in killed):
        outcome.problems.append("a killed node is recorded done")
    # The killed workers' sessions end after 2 x TTL; then their slots and records are free.
    probe.wait("the killed workers' sessions to end", lambda: not any(probe.views(app)[name].held for name in killed))
    views = probe.views(app)
    reported = {row["node"]: row["status"] for row in info(probe.client, cluster.schema, app)["nodes"]}
    outcome.facts["killed"] = {name: {"record": _status(views.get(name), run_id), "reported": reported[name]}
                               for name in killed}
    # What fireap_wait does after straggler_retry_after: fire again to the targets reported pending.
    stragglers = retry_stragglers(probe.client, cluster.schema, app, version)["stragglers"]
    outcome.facts["refired_to"] = stragglers
    if set(killed) - set(stragglers):
        left_out = sorted(set(killed) - set(stragglers))
        outcome.problems.append(f"the re-fire to stragglers left out the killed nodes {left_out} "
                                f"(reported {[reported[name] for name in left_out]})")
    else:
        probe.wait("the re-fired nodes to finish", probe.finished(app, targets, version))
    views = probe.views(app)
    outcome.facts["refired_done"] = sum(_done(views.get(name), version) for name in killed)
    probe.settled([app])
    probe.snapshot(cluster.schema.app_prefix(app))
    return probe.measure(outcome, [(app, version, targets, set())])


def source_crash(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """A done source crashes while serving: its pullers see it fail before Consul's failure
    detection marks it (``realism.failure_detection`` later), its sessions still valid."""
    return _source_goes(cluster, probe, "source_crash", "source", leave=False)


def source_leave(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """A done source leaves while serving (a client agent's SIGTERM): its node is deregistered at
    once, so its pullers find no checks at all for it rather than a critical one."""
    return _source_goes(cluster, probe, "source_leave", "source-leave", leave=True)


def _source_goes(cluster: ChaosCluster, probe: Probe, scenario: str, app: str, leave: bool) -> Outcome:
    version = "1"
    fired = probe.fire(app, version)
    targets, run_id = fired["targets"], fired["run_id"]
    how = "leaves (agent deregistered at once)" if leave else "crashes (agent and processes)"
    outcome = Outcome(scenario, len(targets), 1, f"a done source {how} while serving")

    def serving() -> str | None:
        views = probe.views(app)
        sources = Counter(key.split("/")[-2] for key in probe.held_slots(app))
        busy = [name for name, _count in sources.most_common() if name != cluster.leader
                and views.get(name) is not None and views[name].state is not None and views[name].state.has(version)]
        return busy[0] if busy else None

    victim = probe.wait("a source other than the leader serving pullers", serving)
    serving_pullers = sorted(name for name, view in probe.views(app).items()
                             if view.held and view.state and view.state.status == NODE_PULLING
                             and view.state.source == victim)
    # The agent first, then what it serves: a puller that finds the data gone finds the node gone too.
    gone = time.monotonic()
    (cluster.leave_agent if leave else cluster.stop_agent)(victim)
    (cluster.root(victim) / "crashed").touch()
    for pid in worker_pids(cluster.config_path(victim)):
        kill_tree(pid)
    probe.snapshot(cluster.schema.app_prefix(app))
    others = [name for name in targets if name != victim]
    try:
        if not leave:
            probe.wait(f"{victim}'s serfHealth critical", lambda: _serf_status(probe, victim) == "critical")
            outcome.facts["detected_after_s"] = round(time.monotonic() - gone, 1)
        probe.wait("every other node to finish", probe.finished(app, others, version))
    finally:
        cluster.start_agent(victim)
        (cluster.root(victim) / "crashed").unlink()
    views = probe.views(app)
    outcome.facts.update(
        crashed=victim,
        failure_detection_s=round(cluster.realism.failure_detection or 0.0, 1),
        pullers_at_crash=serving_pullers,
        moved={name: views[name].state.source for name in serving_pullers if views[name].state.has(version)},
        failed={name: view.state.error for name, view in views.items()
                if view.state is not None and view.state.run_id == run_id and view.state.status == NODE_FAILED},
    )
    probe.settled([app])
    probe.snapshot(cluster.schema.app_prefix(app))
    return probe.measure(outcome, [(app, version, targets, {victim})])


def _serf_status(probe: Probe, name: str) -> str | None:
    """``name``'s serfHealth status, None when its node has no checks (it left)."""
    _index, checks = probe.client.health.node(name)
    return next((check["Status"] for check in checks or () if check.get("CheckID") == "serfHealth"), None)


def consul_outage(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "outage", "1"
    fired = probe.fire(app, version)
    targets = fired["targets"]
    outcome = Outcome("consul_outage", len(targets), 1,
                      f"kill -9 of the whole double for {OUTAGE_SECONDS:g}s, restarted on its data dir")
    third = len(targets) // 3

    def some_done() -> int:
        done = sum(1 for view in probe.views(app).values() if view.state is not None and view.state.has(version))
        return done if done >= third else 0

    outcome.facts["done_at_outage"] = probe.wait(f"{third} nodes done", some_done)
    probe.snapshot(cluster.schema.prefix)
    cluster.outage(OUTAGE_SECONDS)
    probe.snapshot(cluster.schema.prefix)
    probe.wait("every node to finish after the outage", probe.finished(app, targets, version))
    probe.settled([app])
    probe.snapshot(cluster.schema.prefix)
    outcome.facts["workers_that_retried"] = sum(
        1 for name in targets if "retrying in" in _read(cluster.reap_log(name)))
    return probe.measure(outcome, [(app, version, targets, set())])


def replays_and_duplicates(cluster: ChaosCluster, probe: Probe) -> Outcome:
    outcome = Outcome("replays_duplicates", len(cluster.names), 0,
                      "agent reloads replaying old events, one event twice, an older version's event after a newer, "
                      "two apps in one handler invocation")
    targets = probe.fire("replay", "1")["targets"]
    probe.wait("replay 1 everywhere", probe.finished("replay", targets, "1"))
    for name in cluster.names:
        cluster.agent_request("PUT", name, "/v1/agent/reload")
    outcome.faults += len(cluster.names)
    twice = cluster.names[1:3]
    for name in twice:
        events = cluster.agent_request("GET", name, "/v1/event/list", params={"name": EVENT_NAME}).json()
        done = cluster.run_handler(name, json.dumps(events + events))
        if done.returncode != 0:
            outcome.problems.append(f"the handler on {name} fed one event twice exited {done.returncode}: "
                                    f"{done.stderr.strip()[-300:]!r}")
    outcome.faults += len(twice)
    probe.fire("replay", "2")
    probe.wait("replay 2 everywhere", probe.finished("replay", targets, "2"))
    outcome.facts["old_event"] = cluster.fire_event(event_payload("replay", "1"))
    outcome.faults += 1
    first = probe.fire("twin-a", "1")
    second = probe.fire("twin-b", "1")
    for app in ("twin-a", "twin-b"):
        probe.wait(f"{app} everywhere", probe.finished(app, targets, "1"))
    name = cluster.names[-1]
    listed = cluster.agent_request("GET", name, "/v1/event/list", params={"name": EVENT_NAME}).json()
    events = [event for event in listed if event["ID"] in (first["event_id"], second["event_id"])]
    both = cluster.run_handler(name, json.dumps(events))
    outcome.facts["two_apps_one_invocation"] = {"events": len(events), "exit": both.returncode}
    outcome.faults += 1
    probe.settled(["replay", "twin-a", "twin-b"])
    views = probe.views("replay")
    outcome.facts["downgraded"] = sorted(n for n, v in views.items() if v.state is None or v.state.version != "2")
    if outcome.facts["downgraded"]:
        outcome.problems.append(f"nodes not at replay 2 after the old event: {outcome.facts['downgraded']}")
    return probe.measure(outcome, [("replay", "2", targets, set()), ("twin-a", "1", targets, set()),
                                   ("twin-b", "1", targets, set())])


def concurrent_fires(cluster: ChaosCluster, probe: Probe) -> Outcome:
    outcome = Outcome("concurrent_fires", len(cluster.names), 1,
                      "two fires of one app at once, a third app fired at the same time")
    calls = {"race 1": ("race", "1"), "race 2": ("race", "2"), "race-other 1": ("race-other", "1")}
    barrier = threading.Barrier(len(calls))
    results: dict[str, Any] = {}

    def fire_one(label: str, app: str, version: str) -> None:
        client = cluster.client()
        barrier.wait()
        try:
            results[label] = fire(client, cluster.schema, app, version=version, fanout=cluster.fanout, holder=label)
        except FireapError as err:
            results[label] = err

    threads = [threading.Thread(target=fire_one, args=(label, *call)) for label, call in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [label for label in ("race 1", "race 2") if isinstance(results[label], dict)]
    losers = [str(results[label]) for label in ("race 1", "race 2") if not isinstance(results[label], dict)]
    outcome.facts.update(race_winners=winners, race_loser_messages=losers)
    if len(winners) != 1 or len(losers) != 1 or "locked" not in losers[0]:
        outcome.problems.append(f"expected one winner and one clear refusal, got {results}")
    if not isinstance(results["race-other 1"], dict):
        outcome.problems.append(f"the other app's fire failed: {results['race-other 1']}")
        return outcome
    releases = [("race-other", "1", results["race-other 1"]["targets"], set())]
    if winners:
        won = results[winners[0]]
        releases.append(("race", won["version"], won["targets"], set()))
    for app, version, targets, _faulted in releases:
        probe.wait(f"{app} {version} everywhere", probe.finished(app, targets, version))
    probe.settled(["race", "race-other"])
    return probe.measure(outcome, releases)


def bad_input(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app = "input"
    outcome = Outcome("bad_input", len(cluster.names), 0, "malformed events, configs and module arguments")
    probe.snapshot(cluster.schema.prefix)
    receivers = cluster.names[1:4]
    events = {
        "payload not JSON": b"not json",
        "payload not UTF-8": b"\xff\xfe\xfd",
        "payload not an object": b"[1,2]",
        "no version": b'{"app":"input"}',
        "unknown app": b'{"app":"unknown","version":"1"}',
        "app with ../": b'{"app":"../etc","version":"1"}',
        "app with a shell metacharacter": b'{"app":"in;put","version":"1"}',
        "version with a newline": b'{"app":"input","version":"1\\n2"}',
        # Consul takes it (only Serf's 512 bytes for the whole event apply); the handler must not.
        "version of 120 characters": event_payload(app, "9" * 120),
    }
    handled: dict[str, str] = {}
    for label, payload in events.items():
        event_ids = cluster.fire_event(payload, receivers)
        handled[label] = event_ids[0]
    try:
        cluster.client().event.fire(EVENT_NAME, event_payload(app, "9" * SERF_REFUSED_VERSION),
                                    node=f"^{receivers[0]}$")
        serf_limit = "accepted by Consul"
    except Exception as err:  # py-consul raises its own exception for Serf's 500
        serf_limit = f"refused by Consul: {err}"[:160]
    stdin_inputs = {
        "stdin not JSON": "garbage",
        "stdin not an array": '{"ID": "x"}',
        "payload not base64": json.dumps([{"ID": "bad-base64", "Name": EVENT_NAME, "LTime": 1, "Payload": "!!!"}]),
    }
    stdin_results = {}
    for label, text in stdin_inputs.items():
        offset = len(_read(cluster.reap_log(receivers[0])))
        exit_code = cluster.run_handler(receivers[0], text).returncode
        # Not the lines of the events fired above: gossip may deliver one of them meanwhile.
        warnings = [line for line in _read(cluster.reap_log(receivers[0]))[offset:].splitlines()
                    if " WARNING " in line and not any(event_id in line for event_id in handled.values())]
        stdin_results[label] = {"exit": exit_code, "log": warnings[0].split(": ", 1)[-1] if warnings else ""}
    probe.wait("the handlers to log the malformed events",
               lambda: all(event_id in _read(cluster.reap_log(receivers[-1]))
                           for label, event_id in handled.items() if label in events))
    log = _read(cluster.reap_log(receivers[-1]))
    outcome.facts["events"] = {label: _line_with(log, event_id) for label, event_id in handled.items()
                               if label in events}
    outcome.facts["events"]["event over Serf's 512 bytes"] = serf_limit
    outcome.facts["stdin"] = stdin_results
    outcome.facts["configs"] = bad_configs(cluster)
    outcome.facts["module_arguments"] = bad_arguments(probe)
    outcome.faults = len(events) + 1 + len(stdin_inputs) + len(outcome.facts["configs"]) + len(
        outcome.facts["module_arguments"])
    stdin_logs = {label: result["log"] for label, result in stdin_results.items()}
    for label, fact in {**outcome.facts["events"], **stdin_logs, **outcome.facts["configs"],
                        **outcome.facts["module_arguments"]}.items():
        if not fact or "accepted" in str(fact):
            outcome.problems.append(f"{label}: no clear error ({fact!r})")
    probe.snapshot(cluster.schema.prefix)
    targets = probe.fire(app, "2")["targets"]
    probe.wait("the release everywhere", probe.finished(app, targets, "2"))
    probe.settled([app])
    probe.measure(outcome, [(app, "2", targets, set())])
    # After the figures: the hostile runs below overwrite some of these nodes' records on purpose.
    facts, problems = hostile_kv(cluster, probe, app)
    outcome.facts["hostile_kv"] = facts
    outcome.problems.extend(problems)
    outcome.faults += HOSTILE_KV_RECORDS
    return outcome


#: A line as fireap-reap writes it to reap.log: any other line there was forged or is a stray.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (DEBUG|INFO|WARNING|ERROR|CRITICAL) fireap-reap\[\d+\] ")


def hostile_kv(cluster: ChaosCluster, probe: Probe, app: str) -> tuple[dict[str, Any], list[str]]:
    """Runs written straight into KV by someone who may write KV under the prefix but neither
    fire events nor edit task configs; a later legitimate event wakes the nodes. Every target
    must end with a record (done, or failed naming the problem), no hostile value may run,
    and no value may forge a line of a node's log. Returns (facts, problems)."""
    client, schema, leader = probe.client, cluster.schema, cluster.leader
    targets = [name for name in cluster.names if name != leader][:5]
    planted = cluster.nodes_dir / "PWNED-kv"
    hostile = f"-oProxyCommand=touch${{IFS}}{planted}"
    address = cluster.options(leader).host
    facts: dict[str, Any] = {}
    problems: list[str] = []

    def write_run(run_id: str, version: str, plans: dict[str, Any], **release: Any) -> None:
        now = time.time()
        for name, entry in plans.items():
            value = entry if isinstance(entry, str) else json.dumps(
                {"run_id": run_id, "source": leader, "stage": 1, "slot": 0, "source_address": address, **entry})
            client.kv.put(schema.plan(app, run_id, name), value)
        if "\n" not in version:
            client.kv.put(schema.node(app, leader), NodeState(
                version=version, run_id=run_id, status=NODE_DONE, started=now, finished=now, depth=0).to_json())
        client.kv.put(schema.release(app), json.dumps({
            "app": app, "version": version, "run_id": run_id, "fanout": 5, "leader": leader,
            "target_count": len(plans) + 1, "fired_at": now, "filters": {}, "status": "running", **release}))
        cluster.fire_event(event_payload(app, "1"), targets)

    def outcome_of(run_id: str, version: str, expected: dict[str, str | None]) -> dict[str, str]:
        probe.wait(f"every target of run {run_id} to end", probe.finished(app, targets, version))
        views = probe.views(app)
        seen = {}
        for name, needle in expected.items():
            state = views[name].state if views.get(name) else None
            seen[name] = "no record" if state is None else f"{state.status}: {(state.error or '')[:160]}"
            if state is None or state.run_id != run_id:
                problems.append(f"{name} has no record of run {run_id}")
            elif needle is None and state.status != NODE_DONE:
                problems.append(f"{name} should be done in run {run_id}: {seen[name]}")
            elif needle is not None and (state.status != NODE_FAILED or needle not in (state.error or "")):
                problems.append(f"{name} should have failed run {run_id} naming {needle!r}: {seen[name]}")
        return seen

    write_run("hostile-plans", "7", {
        targets[0]: {"source_address": hostile},
        targets[1]: {"source": targets[1]},
        targets[2]: json.dumps({"run_id": "hostile-plans", "source": leader, "stage": "one", "slot": 0}),
        targets[3]: {"source": hostile},
        targets[4]: {"slot": 1},
    })
    facts["hostile plans"] = outcome_of("hostile-plans", "7", {
        targets[0]: "source_address", targets[1]: "own source", targets[2]: "stage", targets[3]: "source",
        targets[4]: None})
    write_run("huge-fanout", "8", {name: {"slot": index} for index, name in enumerate(targets)}, fanout=10**12)
    facts["fan-out 10**12"] = outcome_of("huge-fanout", "8", {name: "fanout" for name in targets})

    offsets = {name: len(_read(cluster.reap_log(name))) for name in targets}
    forged = "9\n2026-01-01T00:00:00+0000 INFO fireap-reap[1] app=input version=9: forged line\n" + "x" * 10_000
    write_run("forged-log", forged, {name: {} for name in targets})
    probe.wait("the handlers to log the malformed release",
               lambda: all("field 'version'" in _read(cluster.reap_log(name))[offsets[name]:] for name in targets))
    try:
        info(client, schema, app)
        facts["controller on a release with a forged version"] = "accepted"
        problems.append("fireap_info accepted a release whose version holds a newline")
    except FireapError as err:
        facts["controller on a release with a forged version"] = str(err)[:200]
    probe.settled([app])
    stray = {name: [line[:120] for line in _read(cluster.reap_log(name)).splitlines() if not LOG_LINE.match(line)]
             for name in targets}
    facts["log lines not written by fireap-reap"] = {name: lines[:3] for name, lines in stray.items() if lines}
    longest = max(len(line) for name in targets for line in _read(cluster.reap_log(name)).splitlines())
    facts["longest log line"] = longest
    if any(stray.values()):
        problems.append(f"reap.log holds lines fireap-reap did not write: {facts['log lines not written by fireap-reap']}")
    modes = {name: oct(cluster.reap_log(name).stat().st_mode & 0o777) for name in targets}
    facts["reap.log modes"] = sorted(set(modes.values()))
    if any(int(mode, 8) & 0o007 for mode in modes.values()):
        problems.append(f"reap.log is readable by others: {modes}")
    held = probe.held_slots(app)
    if held:
        problems.append(f"slots still held after the hostile runs: {held}")
    found = sorted(str(path) for path in cluster.nodes_dir.rglob("PWNED*"))
    facts["files planted"] = found
    if found:
        problems.append(f"a hostile KV value ran as code: {found}")
    # The KV release is left malformed; restore a valid one so later runs of the app start clean.
    client.kv.delete(schema.release(app))
    return facts, problems


def bad_configs(cluster: ChaosCluster) -> dict[str, str]:
    """`fireap-reap --check` and the handler itself on broken configs: each must exit 2 naming the problem."""
    base = yaml.safe_load(cluster.config_path(cluster.names[1]).read_text())
    app = dict(base["apps"]["input"])
    broken = {
        "wrong type": {**base, "apps": {"input": {**app, "max_semaphores": "five"}}},
        "unknown key": {**base, "apps": {"input": {**app, "exec_command": ["true"]}}},
        "quoted variable": {**base, "apps": {"input": {"exec_commands": ['echo "{{ version }}"']}}},
        "Jinja filter": {**base, "apps": {"input": {"exec_commands": ["echo {{ version | upper }}"]}}},
        "bad Consul port": {**base, "consul": {**base["consul"], "port": "eighty"}},
    }
    directory = cluster.workdir / "bad-configs"
    directory.mkdir(exist_ok=True)
    results = {}
    for label, config in broken.items():
        path = directory / (label.replace(" ", "-") + ".yml")
        write_atomic(str(path), yaml.safe_dump(config).encode(), 0o600)
        checked = subprocess.run([*handler_command(str(path)), "--check"], capture_output=True, text=True,
                                 timeout=HTTP_TIMEOUT, check=False)
        if checked.returncode == 2:
            results[label] = checked.stderr.strip().splitlines()[-1]
        else:
            results[label] = f"accepted: --check exited {checked.returncode}"
    # The handler itself, as the watch runs it, refuses a broken config the same way.
    handled = cluster.run_handler(cluster.names[1], "[]", config=path)
    results["handler run on a broken config"] = (handled.stderr.strip() if handled.returncode == 2
                                                 else f"accepted: exit {handled.returncode}")
    return results


def bad_arguments(probe: Probe) -> dict[str, str]:
    """The modules' logic refusing arguments out of range, before anything is written."""
    client, schema = probe.client, probe.schema
    calls = {
        "fanout 0": lambda: fire(client, schema, "input", version="1", fanout=0),
        "fanout 65": lambda: fire(client, schema, "input", version="1", fanout=65),
        "version with a space": lambda: fire(client, schema, "input", version="1 2"),
        "version of 200 characters": lambda: fire(client, schema, "input", version="9" * 200),
        "version with shell code": lambda: fire(client, schema, "input", version=HOSTILE_VERSION),
        "version taken for an option": lambda: fire(client, schema, "input", version="-oProxyCommand=id"),
        "app with ../": lambda: fire(client, schema, "../input", version="1"),
        "tag without service": lambda: fire(client, schema, "input", version="1", tag="web"),
        "negative wait timeout": lambda: wait(client, schema, "input", "run", timeout=-1),
        "empty abort reason": lambda: clear(client, schema, "input", abort=True, reason=" "),
    }
    results = {}
    for label, call in calls.items():
        try:
            call()
            results[label] = "accepted"
        except FireapError as err:
            results[label] = str(err)[:200]
    return results


def command_failures(cluster: ChaosCluster, probe: Probe) -> Outcome:
    outcome = Outcome("command_failures", len(cluster.names), 0,
                      "a failing command under abort and ignore, a hung command past its timeout")
    fired = {app: probe.fire(app, "1") for app in ("fail-abort", "fail-ignore", "hang")}
    targets = fired["hang"]["targets"]
    injected = [targets[1], targets[-1]]
    for app in fired:
        for name in injected:
            kind = "hang" if app == "hang" else "fail"
            (cluster.root(name) / f"inject-{kind}-{app}").touch()
    for app in fired:
        probe.wait(f"{app} to finish", probe.finished(app, targets, "1"))
    outcome.faults = len(injected) * len(fired)
    probe.settled(list(fired))
    errors = {}
    for app in fired:
        views = probe.views(app)
        errors[app] = {name: {"status": views[name].state.status, "error": views[name].state.error or "",
                              "ran_to_the_end": probe.runs(app, name)["1"],
                              "logged": _line_with(_read(cluster.reap_log(name)), f"app={app} ", "ERROR")}
                       for name in injected}
    outcome.facts.update(injected=injected, outcomes=errors, hung_left=hung_commands())
    # (status, text in the record's error, text in the node's log, runs to the end)
    expected = {"fail-abort": (NODE_FAILED, "exit status 3", "exit status 3", 0),
                "fail-ignore": (NODE_DONE, "", "exit status 3", 1),
                "hang": (NODE_FAILED, f"timed out after {HANG_TIMEOUT}s", f"timed out after {HANG_TIMEOUT}s", 0)}
    for app, (status, text, logged, ran) in expected.items():
        for name, seen in errors[app].items():
            if (seen["status"], seen["ran_to_the_end"]) != (status, ran) or text not in seen["error"] \
                    or logged not in seen["logged"]:
                outcome.problems.append(f"{app} on {name}: expected {status} with {text!r}, got {seen}")
    if outcome.facts["hung_left"]:
        outcome.problems.append(f"hung commands still running: {outcome.facts['hung_left']}")
    for app in fired:
        for name in injected:
            for marker in cluster.root(name).glob(f"inject-*-{app}"):
                marker.unlink()
    faulted = set(injected)
    return probe.measure(outcome, [("fail-abort", "1", targets, faulted), ("hang", "1", targets, faulted),
                                   ("fail-ignore", "1", targets, set())])


def access(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app = "access"
    outcome = Outcome("access", len(cluster.names), 3, "the handler and the modules without a token, or a wrong one")
    node = cluster.names[1]
    directory = cluster.workdir / "access"
    directory.mkdir(exist_ok=True)
    config = yaml.safe_load(cluster.config_path(node).read_text())
    config["consul"].pop("token")
    config.update(state_dir=str(directory / "state"), log_file=str(directory / "reap.log"))
    tokenless = directory / "config.yml"
    write_atomic(str(tokenless), yaml.safe_dump(config).encode(), 0o600)
    handler = cluster.run_handler(node, "[]", config=tokenless)
    messages = {"handler without a token": f"exit {handler.returncode}: "
                + _line_with(_read(directory / "reap.log"), "403")}
    wrong = str(uuid.uuid4())
    for label, token in (("module without a token", None), ("module with a wrong token", wrong)):
        options = cluster.options(token=token)
        try:
            with consul_errors(options, f"reading the release of {app}"):
                info(cluster.client(token=token), cluster.schema, app)
            messages[label] = "accepted"
        except FireapConsulError as err:
            messages[label] = str(err)
    outcome.facts["refusals"] = messages
    for label, message in messages.items():
        if "403" not in message:
            outcome.problems.append(f"{label}: no clear refusal ({message!r})")
        if wrong in message:
            outcome.problems.append(f"{label}: the token was shown in the message")
    targets = probe.fire(app, "1")["targets"]
    probe.wait("the release with the token", probe.finished(app, targets, "1"))
    probe.settled([app])
    holders, leaks = {}, []
    for directory_ in (cluster.workdir / "nodes", cluster.workdir / "agents", cluster.workdir / "access"):
        for path in directory_.rglob("*"):
            if path.is_file() and not path.is_symlink() and cluster.token.encode() in path.read_bytes():
                mode = path.stat().st_mode & 0o777
                holders[str(path.relative_to(cluster.workdir))] = oct(mode)
                if mode & 0o077 or path.name not in ("config.yml", "fireap.json"):
                    leaks.append(f"{path} ({oct(mode)})")
    outcome.facts.update(files_holding_the_token=len(holders), token_leaks=leaks)
    outcome.problems.extend(f"the token is readable in {leak}" for leak in leaks)
    return probe.measure(outcome, [(app, "1", targets, set())])


def missed_events(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "missed", "1"
    order = [name for name in cluster.names if name != cluster.leader]
    count = max(1, len(order) // 10)
    # The last nodes of the schedule: no node waits for them, so only they are late.
    stopped = order[-count:]
    outcome = Outcome("missed_events", len(cluster.names), count, f"{count} agents down while the event is fired")
    for name in stopped:
        cluster.stop_agent(name)
    try:
        fired = probe.fire(app, version)
        targets, run_id = fired["targets"], fired["run_id"]
        others = [name for name in targets if name not in stopped]
        probe.wait("the running nodes to finish", probe.finished(app, others, version))
        views = probe.views(app)
        outcome.facts["while_down"] = {name: _status(views.get(name), run_id) for name in stopped}
    finally:
        for name in stopped:
            cluster.start_agent(name)
    probe.wait("the restarted nodes to catch up", probe.finished(app, targets, version))
    probe.settled([app])
    outcome.facts["events_fired"] = 1
    outcome.facts["caught_up"] = sum(probe.views(app)[name].state.has(version) for name in stopped)
    return probe.measure(outcome, [(app, version, targets, set())])


def failure_budget(cluster: ChaosCluster, probe: Probe) -> Outcome:
    app, version = "budget", "1"
    order = [name for name in cluster.names if name != cluster.leader]
    # All of the first stage but one: they fail before most nodes start, once the one left
    # has begun its pull (which it finishes: the survivor).
    injected = order[:max(1, cluster.fanout - 1)]
    survivor = order[len(injected)]
    for name in injected:
        (cluster.root(name) / f"inject-fail-{app}").write_text(survivor)
    outcome = Outcome("failure_budget", len(cluster.names), len(injected),
                      f"the first stage fails; max_fail_percentage {MAX_FAIL_PERCENTAGE:g}")
    fired = probe.fire(app, version)
    targets = fired["targets"]

    def over_budget() -> dict | None:
        progress = info(probe.client, cluster.schema, app)
        return progress if over_failure_budget(progress, MAX_FAIL_PERCENTAGE) else None

    progress = probe.wait("the failures to pass the budget", over_budget)
    reason = over_failure_budget(progress, MAX_FAIL_PERCENTAGE)
    clear(probe.client, cluster.schema, app, abort=True, reason=reason)
    # Started: the nodes whose commands had begun (their marker is there) or whose claim of a
    # slot was recorded before the abort (its record of the run, pulling or done): the claim's
    # transaction checks the release record, so no claim succeeds after the abort, but one made
    # just before it may still run its commands. A failed record of the run is no claim: a
    # node that was waiting for its source writes it when it reads the abort.
    run_id = fired["run_id"]
    views = probe.views(app)

    def claimed(view: View | None) -> bool:
        return bool(view and view.state and view.state.run_id == run_id and view.state.status != NODE_FAILED)

    started = {name for name in targets if (cluster.root(name) / started_marker(app)).exists()
               or claimed(views.get(name))} - {cluster.leader}
    not_started = [name for name in targets if name not in started and name != cluster.leader]
    probe.settled([app])
    for name in injected:
        (cluster.root(name) / f"inject-fail-{app}").unlink()
    for name in targets:
        (cluster.root(name) / started_marker(app)).unlink(missing_ok=True)
    final = probe.views(app)
    ran_after_abort = sorted(name for name in not_started if probe.runs(app, name)[version]
                             or (final.get(name) and final[name].state and final[name].state.status == NODE_DONE))
    report = info(probe.client, cluster.schema, app)
    outcome.facts.update(
        started_before_abort=len(started), not_started=len(not_started), started_after_abort=ran_after_abort,
        report={"status": report["status"], "reason": report["release"]["aborted_reason"],
                "counts": report["counts"]},
    )
    if ran_after_abort:
        outcome.problems.append(f"{len(ran_after_abort)} nodes started after the abort: {ran_after_abort}")
    if report["status"] != "aborted" or "max_fail_percentage" not in (report["release"]["aborted_reason"] or ""):
        outcome.problems.append(f"the report does not say why the run stopped: {report['release']}")
    # Survivors: the nodes whose commands had begun when the abort came, which finish; the rest stop.
    faulted = set(injected) | set(not_started) | {cluster.leader}
    return probe.measure(outcome, [(app, version, targets, faulted)])


def event_loss(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """Gossip loses EVENT_LOSS of the events to every agent but the leader's: the nodes that missed
    the fire stay pending until what fireap_wait does (the event fired again to them every
    straggler_retry_after, itself as lossy) reaches them."""
    app, version = "lossy", "1"
    others = [name for name in cluster.names if name != cluster.leader]
    cluster.set_gossip(others, replace(cluster.realism.gossip, loss=EVENT_LOSS))
    outcome = Outcome("event_loss", len(cluster.names), 0, f"gossip loses {EVENT_LOSS:.0%} of the events to each agent")
    try:
        targets = probe.fire(app, version)["targets"]
        probe.wait("every node to finish, with fireap_wait's re-fires", probe.finished(app, targets, version))
    finally:
        cluster.set_gossip(others)
    probe.settled([app])
    rounds = [refire["nodes"] for refire in probe.refires if refire["app"] == app]
    outcome.faults = sum(len(nodes) for nodes in rounds)
    # Those fired at again include nodes that got the event but still wait for their source without a record.
    outcome.facts.update(event_loss=EVENT_LOSS, no_record_at_first_refire=len(rounds[0]) if rounds else 0,
                         refire_rounds=len(rounds))
    probe.snapshot(cluster.schema.app_prefix(app))
    return probe.measure(outcome, [(app, version, targets, set())])


def _round_over(cluster: ChaosCluster, probe: Probe, app: str, run_id: str) -> None:
    """Wait until a fire's round is over: gossip has delivered what it will (its delay and jitter
    have passed), no worker of ``app`` runs and no node took up the run for HANDLER_START_SECONDS."""
    time.sleep(cluster.realism.gossip.delay + cluster.realism.gossip.jitter)
    configs = [cluster.config_path(name) for name in cluster.names]

    def started() -> set[str]:
        return {name for name, view in probe.views(app).items() if view.state and view.state.run_id == run_id}

    def quiet() -> bool:
        before = started()
        time.sleep(HANDLER_START_SECONDS)
        return not any(worker_pids(config, app) for config in configs) and started() == before

    probe.wait(f"the workers of {app} to end and no node to take the run up", quiet)


def gossip_reorder(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """Events late by up to REORDER_GOSSIP's delay + jitter, half of them out of fire order: an app
    fired at version 1 and at once again at 2 (forced), and another app, fired back to back. Every
    node ends at 2 and never runs 1 after 2."""
    others = [name for name in cluster.names if name != cluster.leader]
    cluster.set_gossip(others, REORDER_GOSSIP)
    outcome = Outcome("gossip_reorder", len(cluster.names), 3,
                      f"events {REORDER_GOSSIP.delay:g}..{REORDER_GOSSIP.delay + REORDER_GOSSIP.jitter:g}s late, "
                      f"{REORDER_GOSSIP.reorder:.0%} out of order; version 1 then 2 fired back to back")
    try:
        probe.fire("late", "1")
        second = probe.fire("late", "2", force=True)
        other = probe.fire("late-other", "1")
        probe.wait("late 2 everywhere", probe.finished("late", second["targets"], "2"))
        probe.wait("late-other 1 everywhere", probe.finished("late-other", other["targets"], "1"))
    finally:
        cluster.set_gossip(others)
        # Events still on their way wake handlers, which catch up on every app: let them land.
        time.sleep(REORDER_GOSSIP.delay + REORDER_GOSSIP.jitter)
    probe.settled(["late", "late-other"])
    views = probe.views("late")
    downgraded = sorted(name for name in second["targets"] if not _done(views.get(name), "2"))
    older_after_newer = sorted(name for name in second["targets"] if _runs_in_order(cluster, name, "late")[-1:] == ["1"])
    outcome.facts.update(gossip=asdict(REORDER_GOSSIP), downgraded=downgraded, ran_1_after_2=older_after_newer,
                         ran_1=sum(1 for name in second["targets"] if "1" in _runs_in_order(cluster, name, "late")))
    if downgraded or older_after_newer:
        outcome.problems.append(f"nodes not at late 2: {downgraded}; nodes that ran 1 after 2: {older_after_newer}")
    probe.snapshot(cluster.schema.prefix)
    return probe.measure(outcome, [("late", "2", second["targets"], set()),
                                   ("late-other", "1", other["targets"], set())])


def _runs_in_order(cluster: ChaosCluster, name: str, app: str) -> list[str]:
    """The versions ``name`` ran ``app`` at, in the order of its run log."""
    return [line.split(" ", 1)[0] for line in _read(cluster.root(name) / run_log(app)).splitlines() if line]


def abort_missing_record(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """The first stage never gets the event, so the second stage's workers wait on records that do
    not exist (blocking reads of missing keys, which Consul wakes on writes elsewhere and times out
    with a raised index); the run is aborted while they wait. They must end without running."""
    app, version = "absent", "1"
    planned = probe.fire(app, version, check_mode=True)["targets"]
    first_stage = planned[1:1 + cluster.fanout]
    cluster.set_gossip(first_stage, replace(cluster.realism.gossip, loss=1.0))
    # Any FIREAP:TASK event wakes a handler, which catches up on every app: none may still be on
    # its way, and no handler an earlier event started may still be running (on a loaded machine
    # one may start seconds late) when the run is fired.
    time.sleep(cluster.realism.gossip.delay + cluster.realism.gossip.jitter)
    probe.wait("the first stage's handlers to end",
               lambda: not any(handler_pids(cluster.config_path(name)) for name in first_stage))
    outcome = Outcome("abort_missing_record", len(planned), len(first_stage),
                      f"the first stage ({len(first_stage)} nodes) misses the event; abort while the next waits")
    try:
        fired = probe.fire(app, version)
        targets, run_id = fired["targets"], fired["run_id"]
        plans = _plans(probe, app, run_id)
        waiting_on_absent = sorted(name for name, plan in plans.items() if plan.get("source") in first_stage)

        def waiting() -> list[str] | None:
            # A worker that has not claimed a slot yet: it has no record of the run, or one that waits.
            views = probe.views(app)
            ready = [name for name in waiting_on_absent if worker_pids(cluster.config_path(name), app)
                     and (views.get(name) is None or views[name].state is None or views[name].state.run_id != run_id
                          or views[name].state.status == NODE_WAITING)]
            return ready or None

        blocked = probe.wait("second-stage workers waiting on their sources' missing records", waiting)
        probe.snapshot(cluster.schema.app_prefix(app))
        aborted = time.monotonic()
        clear(probe.client, cluster.schema, app, abort=True, reason="chaos: abort while workers wait on a missing record")
        probe.settled([app])
        outcome.facts.update(waiting_at_abort=blocked, workers_ended_after_s=round(time.monotonic() - aborted, 1))
    finally:
        cluster.set_gossip(first_stage)
    views = probe.views(app)
    ran = sorted(name for name in targets if name != cluster.leader and (probe.runs(app, name)[version]
                 or _done(views.get(name), version)))
    outcome.facts["ran_or_done_after_abort"] = ran
    if ran:
        outcome.problems.append(f"nodes ran or are recorded done after the abort: {ran}")
    probe.snapshot(cluster.schema.app_prefix(app))
    # The survivor is the leader, done when the run was fired; every other target stops.
    return probe.measure(outcome, [(app, version, targets, set(targets) - {cluster.leader})])


def _plans(probe: Probe, app: str, run_id: str) -> dict[str, dict]:
    """The run's plan entries by node, as fire wrote them."""
    prefix = probe.schema.plan_prefix(app, run_id)
    _index, entries = probe.client.kv.get(prefix, recurse=True)
    return {entry["Key"][len(prefix):]: json.loads(entry["Value"]) for entry in entries or ()}


def service_ids(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """A release to the nodes of a service (fire's ``service``): half of them register it under an
    ID that is not its name. fire takes its targets from the catalog by service name; each agent
    matches the event's service filter against the IDs of its local services (agent/user_event.go).
    Every target must start from the fire's own event."""
    app, version = "service-id", "1"
    nodes = [name for name in cluster.names if name != cluster.leader][:SERVICE_ID_NODES]
    same, other = nodes[:len(nodes) // 2], nodes[len(nodes) // 2:]
    ids = {**{name: SERVICE_NAME for name in same}, **{name: f"{name}-frontend" for name in other}}
    for name, service_id in ids.items():
        cluster.agent_request("PUT", name, "/v1/agent/service/register", json={"Name": SERVICE_NAME, "ID": service_id})
    outcome = Outcome("service_ids", len(nodes) + 1, len(other),
                      f"fire with service={SERVICE_NAME!r}; {len(other)} of its {len(nodes)} nodes register it under "
                      "another ID")
    try:
        fired = probe.fire(app, version, service=SERVICE_NAME)
        targets, run_id = fired["targets"], fired["run_id"]
        probe.wait("the nodes whose service ID is its name to finish", probe.finished(app, same, version))
        _round_over(cluster, probe, app, run_id)
        views = probe.views(app)
        never_woken = sorted(name for name in targets if name != cluster.leader and not (
            views.get(name) and views[name].state and views[name].state.run_id == run_id))
        outcome.facts.update(targets=targets, service_ids=ids, never_woken=never_woken)
        if never_woken:
            outcome.problems.append(
                f"{len(never_woken)} targets never got the fire's event: {never_woken} (service IDs "
                f"{sorted(ids[name] for name in never_woken)}); fire chose them by the service's name, the "
                f"agents matched the event's service filter {SERVICE_NAME!r} against their service IDs")
            refired = retry_stragglers(probe.client, cluster.schema, app, version)["stragglers"]
            outcome.facts["completed_by_retry_stragglers"] = refired
            probe.wait("the re-fired targets to finish", probe.finished(app, targets, version))
        probe.settled([app])
    finally:
        for name, service_id in ids.items():
            cluster.agent_request("PUT", name, f"/v1/agent/service/deregister/{service_id}")
    probe.snapshot(cluster.schema.app_prefix(app))
    return probe.measure(outcome, [(app, version, targets, set())])


def txn_limit_1_13(cluster: ChaosCluster, probe: Probe) -> Outcome:
    """The double restarted as Consul 1.13 (64 operations per transaction, 128 from 1.14) for a
    release to every node: every transaction fire, the handlers and the workers send must fit
    (the plan takes one write per target: more than one transaction past 64 nodes); then back
    to the settings before."""
    app, version = "old-txn", "1"
    before = cluster.realism
    outcome = Outcome("txn_limit_1_13", len(cluster.names), 1, "a Consul 1.13 server: at most 64 operations per txn")
    probe.snapshot(cluster.schema.prefix)
    cluster.restart(replace(before, consul_version=OLD_CONSUL_VERSION))
    try:
        reported = probe.client.agent.self()["Config"]["Version"]
        over = [{"KV": {"Verb": "get", "Key": f"{cluster.schema.prefix}{index}"}} for index in range(65)]
        refused = cluster.http.put(f"{cluster.nodes[cluster.leader].base_url}/v1/txn", json=over, timeout=HTTP_TIMEOUT)
        outcome.facts.update(consul_version=reported, txn_max_ops=cluster.realism.txn_max_ops,
                             txn_of_65=f"{refused.status_code} {refused.text.strip()}")
        if reported != OLD_CONSUL_VERSION or refused.status_code != 413:
            outcome.problems.append(f"the double does not stand for Consul {OLD_CONSUL_VERSION}: {outcome.facts}")
        fired = probe.fire(app, version)
        targets = fired["targets"]
        outcome.facts.update(plan_writes=len(targets), plan_transactions=-(-len(targets) // cluster.realism.txn_max_ops))
        probe.wait(f"{app} everywhere", probe.finished(app, targets, version))
        probe.settled([app])
        probe.snapshot(cluster.schema.prefix)
    finally:
        cluster.restart(before)
    return probe.measure(outcome, [(app, version, targets, set())])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _line_with(text: str, *needles: str) -> str:
    """The last log line holding every one of ``needles``, without its timestamp and process prefix."""
    for line in reversed(text.splitlines()):
        if all(needle in line for needle in needles):
            return line.split(": ", 1)[-1][:300]
    return ""


SCENARIOS: dict[str, Callable[[ChaosCluster, Probe], Outcome]] = {
    "puller_crash": puller_crash,
    "source_crash": source_crash,
    "source_leave": source_leave,
    "consul_outage": consul_outage,
    "replays_duplicates": replays_and_duplicates,
    "concurrent_fires": concurrent_fires,
    "bad_input": bad_input,
    "command_failures": command_failures,
    "access": access,
    "missed_events": missed_events,
    "failure_budget": failure_budget,
    "event_loss": event_loss,
    "gossip_reorder": gossip_reorder,
    "abort_missing_record": abort_missing_record,
    "service_ids": service_ids,
    "txn_limit_1_13": txn_limit_1_13,
    "swarm_peer_crash": swarm_peer_crash,
    "swarm_late_join": swarm_late_join,
    "swarm_corrupt_peer": swarm_corrupt_peer,
    "swarm_leader_gone": swarm_leader_gone,
}


def run_scenario(cluster: ChaosCluster, name: str) -> Outcome:
    """Run one scenario; a step that did not happen in time is a problem of its outcome."""
    probe = Probe(cluster)
    began = time.monotonic()
    try:
        outcome = SCENARIOS[name](cluster, probe)
    except (ChaosError, FireapError) as err:
        outcome = Outcome(name, len(cluster.names), 0, "(did not complete)", problems=[str(err)])
    outcome.seconds = round(time.monotonic() - began, 1)
    return outcome
