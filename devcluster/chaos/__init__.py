"""The fault suite (`python -m devcluster chaos`, cli.py): fault injection against a dev cluster
running the real node side.

The double runs as `python -m devcluster serve` in a process of its own, with ACLs on and a
data dir (so that it can be killed and restarted with its state), as unkind as Consul unless the
command line's realism options say otherwise (late, reordered, lossy gossip; crashes detected
after memberlist's suspicion timeout; missing keys that block); the figures file records those
settings under ``consul``. A release is waited for as fireap_wait does: every
STRAGGLER_RETRY_AFTER seconds the event is fired again to the targets that have not taken the
run up. Every node gets what the
``fireap_node`` role installs, written directly from the inventory's role variables (the
role's own run takes minutes at this size): the task config with the Consul token (0600),
and the agent's watch on the FIREAP:TASK event running this tree's ``fireap-reap``. Releases
are fired with the modules' own ``_firing``/``_progress``/``_clearing`` functions; every node's agent runs its handler,
which starts real detached workers that run the app's commands.

Every app command ends by appending ``<version> <source>`` to ``runs-<app>.log`` in the
node's directory, so that a command run twice for one version on one node is counted, not
assumed. Per scenario the result holds:

``nodes``            targets of the scenario's releases (the leader included)
``faults``           faults injected (killed workers, stopped agents, bad inputs, ...)
``survivors``        targets the scenario meant to finish: those not faulted
``survivors_done``   of those, the ones done at the release's version at the end
``leaked_slots``     slot keys still held by a session once every worker has ended
``duplicate_runs``   extra command runs for one version on one node (run logs)
``lost_records``     KV records that went missing or back (lower ModifyIndex, done undone)
``seconds``          wall time of the scenario
``facts``            what the scenario checked beyond these, and ``problems`` if any failed

Scenarios run in sequence on one cluster, each with apps of its own.

apps.py        the apps every node runs: commands that log each run, inject failures and hangs
processes.py   the node side's processes: finding fireap-reap workers, kill -9 of a process tree
harness.py     ChaosCluster: the double (ACLs, data dir) with fireap installed on every node
probe.py       Outcome (one scenario's figures) and Probe (what a scenario reads from KV and logs)
scenarios.py   the scenarios, and run_scenario
swarm_scenarios.py  the scenarios of apps with an artifact, and how their files are judged
cli.py         the report table and the command line
"""

from .. import collection_path  # noqa: F401
