"""fireap_fire run in-process against the Consul double (with ACLs): validation, check mode, results."""

from __future__ import annotations

import json
import time

import pytest
from consul_harness import in_background

from devcluster.consul import find_free_port_range
from devcluster.polling import wait_until

from ansible_collections.fireap.consul.plugins.module_utils._kv import NodeState, ReleaseRecord, Schema
from ansible_collections.fireap.consul.plugins.modules import fireap_fire
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import advertise, artifact_config

FINISH_TIMEOUT = 60.0


def kv_keys(cluster, prefix):
    """The keys under ``prefix`` besides the nodes' adverts."""
    with cluster.client(0) as client:
        keys = client.kv.get(prefix, keys=True)[1] or []
    return [key for key in keys if not key.startswith(Schema(prefix).adverts_prefix())]


def finish_when_fired(cluster, prefix, app, failing=()):
    """In the background: once the run is recorded, write every target's final state."""

    def work():
        schema = Schema(prefix)
        with cluster.client(0) as client:
            entry = wait_until(lambda: client.kv.get(schema.release(app))[1], FINISH_TIMEOUT, "release record")
            record = ReleaseRecord.from_json(entry["Value"])
            plan_prefix = schema.plan_prefix(app, record.run_id)
            for key in client.kv.get(plan_prefix, keys=True)[1]:
                node = schema.node_name(app, key)
                common = {"version": record.version, "run_id": record.run_id, "started": 1.0, "finished": 2.0}
                if node in failing:
                    state = NodeState(status="failed", error="boom", **common)
                else:
                    state = NodeState(status="done", source=record.leader, depth=1, **common)
                client.kv.put(schema.node(app, node), state.to_json())

    return in_background(work)


def test_fire_records_the_run_and_hides_the_token(acl_cluster, connection, prefix, run_module):
    run = run_module(fireap_fire, dict(connection, app="web", version="1.0", fanout=2, kv_prefix=prefix))
    assert run.code == 0 and not run.failed, run.stdout
    result = run.result
    assert result["changed"] is True
    assert (result["version"], result["previous_version"], result["fanout"]) == ("1.0", None, 2)
    assert result["targets"] == acl_cluster.node_names[:1] + sorted(acl_cluster.node_names[1:])
    assert result["target_count"] == len(acl_cluster.agents) and result["event_id"]
    assert result["release"]["run_id"] == result["run_id"]
    assert acl_cluster.token not in run.stdout
    assert result["invocation"]["module_args"]["token"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    with acl_cluster.client(0) as client:
        stored = json.loads(client.kv.get(f"{prefix}web/release")[1]["Value"])
    assert stored == result["release"]


def test_fanout_defaults_to_the_smallest_max_semaphores_the_targets_advertise(
        acl_cluster, connection, prefix, run_module):
    with acl_cluster.client(0) as client:
        advertise(client, Schema(prefix), ["web"], acl_cluster.node_names[2:], max_semaphores=3)
    run = run_module(fireap_fire, dict(connection, app="web", version="1.0", kv_prefix=prefix))
    assert run.code == 0 and run.result["fanout"] == 3, run.stdout
    assert run.result["release"]["fanout"] == 3


def test_an_explicit_fanout_wins_over_the_adverts(connection, prefix, run_module):
    run = run_module(fireap_fire, dict(connection, app="web", version="1.0", kv_prefix=prefix, fanout=7))
    assert run.code == 0 and run.result["fanout"] == 7, run.stdout


def test_an_app_on_no_node_fails_at_once_naming_the_apps_the_nodes_have(acl_cluster, connection, prefix, run_module):
    started = time.monotonic()
    run = run_module(fireap_fire, dict(connection, app="nosuchapp", version="1.0", kv_prefix=prefix))
    assert time.monotonic() - started < 5
    assert run.failed
    assert run.result["msg"].startswith("app 'nosuchapp' is configured on no node")
    assert "(the apps the nodes have: web)" in run.result["msg"]
    assert kv_keys(acl_cluster, prefix) == [], "no lock, no release record"


def test_token_from_the_environment_is_used_and_hidden(acl_cluster, connection, prefix, run_module, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", acl_cluster.token)
    args = {name: value for name, value in connection.items() if name != "token"}
    run = run_module(fireap_fire, dict(args, app="web", version="1.0", kv_prefix=prefix))
    assert run.code == 0 and run.result["changed"], run.stdout
    assert acl_cluster.token not in run.stdout


def test_a_wrong_token_is_refused_without_being_shown(connection, prefix, run_module):
    wrong = "wrong-token-4f1d2e"
    run = run_module(fireap_fire, dict(connection, token=wrong, app="web", version="1.0", kv_prefix=prefix))
    assert run.failed and run.code == 1
    assert "HTTP 403" in run.result["msg"] and "releasing app 'web'" in run.result["msg"]
    assert wrong not in run.stdout


def test_an_unreachable_agent_is_reported(connection, prefix, run_module):
    port = find_free_port_range(1)
    run = run_module(fireap_fire, dict(connection, port=port, app="web", version="1.0", kv_prefix=prefix))
    assert run.failed
    assert f"cannot reach the Consul agent at http://127.0.0.1:{port}" in run.result["msg"]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"fanout": 0}, "fanout must be an integer from 1 to 64, got 0"),
        ({"fanout": 65}, "fanout must be an integer from 1 to 64, got 65"),
        ({"fanout": "many"}, "fanout"),
        ({"tag": "blue"}, "missing parameter(s) required by 'tag': service"),
        ({"app": "web/x"}, "app name 'web/x' may only contain letters, digits, '_', '.' and '-'"),
        ({"app": ".."}, "app name '..' may only contain letters, digits, '_', '.' and '-', and must start with"),
        ({"app": "a..b"}, "app name 'a..b' must not contain '..'"),
        ({"app": "-web"}, "app name '-web' may only contain letters, digits, '_', '.' and '-', and must start with"),
        ({"app": ""}, "app name must be a non-empty string"),
        ({"version": "1 0"}, "version '1 0' may only contain letters, digits and '._+~-'"),
        ({"version": "-1"}, "version '-1' may only contain letters, digits and '._+~-', and must start with a letter"),
        ({"version": "$(touch${IFS}/tmp/x)"}, "version '$(touch${IFS}/tmp/x)' may only contain letters"),
        ({"node_filter": "web(?=1)"}, "uses a lookahead"),
        ({"node_filter": "web["}, "is not a valid regular expression"),
        ({"kv_prefix": "fireap"}, "KV prefix 'fireap' must end with '/'"),
        ({"retry_stragglers": True, "node_filter": "^a$", "force": True}, "cannot be combined with node_filter, force"),
        ({"resume": True, "pause_after_stage": 2}, "resume=true opens the current run's gate; it cannot be combined with "
                                                   "pause_after_stage"),
        ({"resume": True}, "app 'web' has no release to resume"),
        ({"retry_failed": True, "rollback": True}, "retry_failed and rollback start different runs: give one of them"),
        ({"checksum": "sha256:" + "a" * 64, "checksum_file": "/x"}, "parameters are mutually exclusive: checksum|checksum_file"),
        ({"checksum_file": "/nonexistent/build.tgz"}, "cannot read /nonexistent/build.tgz to compute its checksum"),
        ({"checksum": "-a"}, "checksum '-a' must be 'sha256:' followed by 64 lowercase hex digits"),
        ({"version": "v" * 60, "app": "a" * 30}, "over the 100-byte budget Consul advises"),
        ({"wait": True, "wait_timeout": -1}, "wait_timeout must be a number of seconds >= 0, got -1"),
    ],
)
def test_bad_arguments_fail_clearly_and_change_nothing(acl_cluster, connection, prefix, run_module, args, message):
    run = run_module(fireap_fire, dict(connection, **dict({"app": "web", "kv_prefix": prefix}, **args)))
    assert run.failed and run.code == 1
    assert message in run.result["msg"]
    assert acl_cluster.token not in run.stdout
    assert kv_keys(acl_cluster, prefix) == []


def test_check_mode_reports_the_run_without_writing(acl_cluster, connection, prefix, run_module):
    run = run_module(fireap_fire, dict(connection, app="web", kv_prefix=prefix), check_mode=True, diff=True)
    assert run.code == 0 and run.result["changed"] is True
    assert run.result["version"] == "1" and run.result["event_id"] is None
    assert run.result["diff"] == {"before": {}, "after": run.result["release"]}
    assert kv_keys(acl_cluster, prefix) == []


def test_a_running_release_refuses_a_second_fire(connection, prefix, run_module):
    first = run_module(fireap_fire, dict(connection, app="web", version="1", kv_prefix=prefix))
    second = run_module(fireap_fire, dict(connection, app="web", version="2", kv_prefix=prefix))
    assert second.failed
    assert first.result["run_id"] in second.result["msg"] and "force=true" in second.result["msg"]
    forced = run_module(fireap_fire, dict(connection, app="web", version="2", force=True, kv_prefix=prefix), diff=True)
    assert forced.result["took_over"]["run_id"] == first.result["run_id"]
    assert forced.result["diff"]["before"]["version"] == "1" and forced.result["diff"]["after"]["version"] == "2"


def test_wait_returns_the_finished_run(acl_cluster, connection, prefix, run_module):
    finisher = finish_when_fired(acl_cluster, prefix, "web")
    run = run_module(fireap_fire, dict(connection, app="web", version="3", wait=True, wait_timeout=FINISH_TIMEOUT, kv_prefix=prefix))
    assert run.code == 0, run.stdout
    finisher.result(FINISH_TIMEOUT)
    assert run.result["info"]["succeeded"] is True and run.result["info"]["counts"]["done"] == len(acl_cluster.agents)


def test_wait_fails_when_a_target_failed(acl_cluster, connection, prefix, run_module):
    failing = acl_cluster.node_names[1]
    finisher = finish_when_fired(acl_cluster, prefix, "web", failing=(failing,))
    run = run_module(fireap_fire, dict(connection, app="web", version="3", wait=True, wait_timeout=FINISH_TIMEOUT, kv_prefix=prefix))
    assert run.failed
    finisher.result(FINISH_TIMEOUT)
    total = len(acl_cluster.agents)
    assert f"finished with failures: {total - 1} done, 1 failed, 0 pulling, 0 waiting, 0 pending of {total} targets" \
           f"\nfailed (1):\n  {failing}: boom" in run.result["msg"]
    assert run.result["info"]["failed_nodes"] == [{"node": failing, "source": None, "error": "boom"}]


def test_wait_timeout_fails_with_the_progress(acl_cluster, connection, prefix, run_module):
    run = run_module(fireap_fire, dict(connection, app="web", version="3", wait=True, wait_timeout=0, kv_prefix=prefix))
    assert run.failed and "did not finish within 0s" in run.result["msg"]
    assert run.result["info"]["counts"]["pending"] == len(acl_cluster.agents) - 1
    assert run.result["run_id"] == run.result["info"]["run_id"]


def test_retry_stragglers_refires_the_current_run(acl_cluster, connection, prefix, run_module):
    fired = run_module(fireap_fire, dict(connection, app="web", version="5", kv_prefix=prefix))
    retried = run_module(fireap_fire, dict(connection, app="web", retry_stragglers=True, kv_prefix=prefix))
    assert retried.code == 0 and retried.result["changed"] is True, retried.stdout
    assert retried.result["run_id"] == fired.result["run_id"]
    assert retried.result["stragglers"] == fired.result["targets"][1:]
    assert [e["event_id"] is not None for e in retried.result["events"]] == [True]


def test_the_artifact_published_is_the_one_the_leaders_task_config_names(
        acl_cluster, connection, prefix, run_module, tmp_path, monkeypatch):
    """config_path defaults to $FIREAP_CONFIG_PATH, as the handler's --config does; a leader advert in
    KV that names another file than that config fails the task with both, and nothing is recorded."""
    template = str(tmp_path / "{{ app }}-{{ version }}.tar.gz")
    (tmp_path / "web-1.tar.gz").write_bytes(b"build 1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "web-1.tar.gz").write_bytes(b"what a KV writer wants published")
    monkeypatch.setenv("FIREAP_CONFIG_PATH", artifact_config(tmp_path / "config.yml", template))
    names = acl_cluster.node_names
    with acl_cluster.client(0) as client:
        for index, name in enumerate(names):
            advertise(client, Schema(prefix), ["web"], [name], artifact=template, artifact_port=7200 + index)
        advertise(client, Schema(prefix), ["web"], names[:1], artifact=str(elsewhere / "{{ app }}-{{ version }}.tar.gz"),
                  artifact_port=7200)
    args = dict(connection, app="web", version="1", kv_prefix=prefix)
    refused = run_module(fireap_fire, args)
    assert refused.failed
    assert f"names the artifact path '{elsewhere}/" in refused.result["msg"]
    assert f"its task config {tmp_path / 'config.yml'} '{template}'" in refused.result["msg"]
    assert kv_keys(acl_cluster, prefix) == []
    with acl_cluster.client(0) as client:
        advertise(client, Schema(prefix), ["web"], names[:1], artifact=template, artifact_port=7200)
    run = run_module(fireap_fire, args)
    assert run.code == 0 and not run.failed, run.stdout
    assert run.result["release"]["artifact"]["length"] == len(b"build 1")
