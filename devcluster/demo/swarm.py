"""The end of a run of an app with an artifact, as the demo and the benchmark wait for it.

The leader's worker records the run over in the run's swarm key once every target is done or
failed (it reads their records every few seconds); the nodes then serve ``seed_seconds`` more
and exit. Waiting for it keeps a node from serving into what comes next: the benchmark's next
figure, or the demo stopping the cluster under workers still reading from it.
"""

from __future__ import annotations

import time

from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema, SwarmRun

POLL_SECONDS = 0.5


def swarm_over(client, app: str, run_id: str, timeout: float, schema: Schema = Schema()) -> bool:
    """Whether the leader recorded run ``run_id`` of ``app`` over within ``timeout`` seconds."""
    key = schema.swarm_run(app, run_id)
    deadline = time.monotonic() + timeout
    while True:
        _index, entry = client.kv.get(key)
        if entry is not None and SwarmRun.from_json(entry["Value"], key).over:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
