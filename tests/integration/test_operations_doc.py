"""docs/operations.md as written, on the dev cluster: its role variables applied with playbooks/setup.yml,
its commands run on a node and from the controller, their output compared with the documented one.

A dev-cluster node keeps under its own root what a real host keeps under /: each documented path is
read as that node's (the role's defaults /opt/fireap, /etc/fireap, /var/log/fireap and
/etc/logrotate.d, and the page's /srv/fireap, a config directory moved elsewhere), its config is
the default of --config (FIREAP_CONFIG_PATH), and the agent's user and group are the test's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = REPO_ROOT / ".venv" / "bin"
DOC = REPO_ROOT / "docs" / "operations.md"
SETUP = REPO_ROOT / "playbooks" / "setup.yml"
NODES = 3
TOKEN = f"operations-test-{uuid.uuid4()}"
COMMAND_TIMEOUT = 600
#: `ansible` prints one result per host: "node-000 | CHANGED | rc=0 >>" then the output, or "node-000 | SUCCESS => {...}".
RESULT = re.compile(r"^(?P<host>\S+) \| (?P<state>[A-Z]+)!? => (?P<json>\{.*?^\})$", re.MULTILINE | re.DOTALL)


def section(heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of any level."""
    text = "\n" + DOC.read_text(encoding="utf-8")
    assert f"\n{heading}\n" in text, f"no {heading!r} in {DOC}"
    return re.split(r"^#+ ", text.split(f"\n{heading}\n", 1)[1], maxsplit=1, flags=re.MULTILINE)[0]


def blocks(heading: str, language: str) -> list[str]:
    """The ```language blocks under ``heading``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", section(heading), re.MULTILINE | re.DOTALL)


def ansible_env(work: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("ANSIBLE_", "CONSUL_", "FIREAP_"))}
    env.update(ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"), ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(work / ".ansible-tmp"))
    return env


def run(command: list[str], work: Path, config: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``command`` in ``work``; ``config``: the node's task config as FIREAP_CONFIG_PATH."""
    env = ansible_env(work)
    if config is not None:
        env["FIREAP_CONFIG_PATH"] = config
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, check=False, **kwargs)
    done.output = done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def cluster(make_double, tmp_path_factory):
    """The page's role variables applied to every node with setup.yml (every node's advert is current
    when it returns); the logrotate directory of each node under its root."""
    with make_double(nodes=NODES, acl_token=TOKEN, name="operations-devcluster") as target:
        work = tmp_path_factory.mktemp("operations-run")
        inventory = yaml.safe_load(target.double.inventory.read_text())
        hosts = inventory["all"]["children"]["fireap_nodes"]["hosts"]
        for host in hosts.values():
            host["fireap_node_logrotate_dir"] = f"{host['fireap_node_root']}/etc/logrotate.d"
            Path(host["fireap_node_logrotate_dir"]).mkdir(parents=True, exist_ok=True)
        (work / "inventory.yml").write_text(yaml.safe_dump(inventory))
        (work / "inventory.yml").chmod(0o600)
        (role_vars,) = blocks("# Operations", "yaml")
        (work / "role-vars.yml").write_text(role_vars)
        setup = run([str(BIN / "ansible-playbook"), "-i", "inventory.yml", "-e", "@role-vars.yml", str(SETUP)], work)
        assert setup.returncode == 0, setup.output
        (leader,) = inventory["all"]["children"]["fireap_leader"]["hosts"]
        yield {"target": target, "work": work, "hosts": hosts, "leader": leader,
               "user": inventory["all"]["vars"]["fireap_node_user"], "group": inventory["all"]["vars"]["fireap_node_group"]}


def on_node(cluster, text: str) -> str:
    """``text`` of the page with the leader's own paths, user and group for the documented ones."""
    host = cluster["hosts"][cluster["leader"]]
    for documented, own in (("/opt/fireap", host["fireap_node_prefix"]), ("/etc/fireap", host["fireap_node_config_dir"]),
                            ("/srv/fireap", host["fireap_node_config_dir"]), ("/var/log/fireap", host["fireap_node_log_dir"]),
                            ("/etc/logrotate.d", host["fireap_node_logrotate_dir"]),
                            ("consul consul", f"{cluster['user']} {cluster['group']}")):
        text = text.replace(documented, own)
    return text


def shell(cluster, script: str) -> subprocess.CompletedProcess:
    """A documented sh block run as a script on the leader, with its paths; the default of --config,
    /etc/fireap/config.yml on a real node, is the leader's config."""
    config = on_node(cluster, "/etc/fireap/config.yml")
    return run(["bash", "-e", "-c", on_node(cluster, script)], cluster["work"], config=config)


def adhoc(cluster, command: str) -> subprocess.CompletedProcess:
    """A documented `ansible ... -i inventory ...` command line, against the test's inventory."""
    assert command.startswith("ansible ") and " -i inventory " in command, command
    script = command.replace("ansible ", f"{BIN / 'ansible'} ", 1).replace(" -i inventory ", " -i inventory.yml ", 1)
    return run(["bash", "-e", "-c", script], cluster["work"])


# --- Running the handler on a node -----------------------------------------------------------------


def test_the_task_list_is_the_documented_one_on_a_node_and_from_the_controller(cluster):
    listing, as_json, from_controller = blocks("### The task list", "sh")
    (documented,) = blocks("### The task list", "text")
    shown = shell(cluster, listing)
    assert shown.returncode == 0, shown.output
    assert shown.stdout == on_node(cluster, documented)

    listed = shell(cluster, as_json)
    assert listed.returncode == 0, listed.output
    apps = json.loads(listed.stdout)["apps"]
    assert list(apps) == ["web", "batch"]
    assert apps["web"]["exec_commands"] == ["rsync -a --delete {{ remote.address }}::apps/{{ app }}/ /srv/{{ app }}/"]
    assert (apps["batch"]["command_timeout"], apps["batch"]["on_command_failure"]) == (1800, "ignore")

    everywhere = adhoc(cluster, from_controller.strip())
    assert everywhere.returncode == 0, everywhere.output
    for name in cluster["hosts"]:
        assert re.search(rf"^{name} \| CHANGED \| rc=0 >>\n.*: 2 app\(s\); log_level info\nAPP  ", everywhere.stdout,
                         re.MULTILINE), everywhere.output


def test_an_invalid_config_is_listed_as_the_page_says(cluster):
    host = cluster["hosts"][cluster["leader"]]
    config = Path(host["fireap_node_config_dir"]) / "config.yml"
    bad = cluster["work"] / "bad.yml"
    bad.write_text(config.read_text().replace("exec_commands:", "exec_comands:", 1))
    listed = run([f"{host['fireap_node_prefix']}/bin/fireap-reap", "--list", "--config", str(bad)], cluster["work"])
    assert listed.returncode == 2 and listed.stdout == ""
    assert listed.stderr.startswith("fireap-reap: invalid config:\n")
    assert f"{bad}: apps.web.exec_comands: unknown key; did you mean 'exec_commands'?" in listed.stderr


def test_fireap_config_path_names_the_config(cluster):
    (script,) = blocks("### Another config file: `FIREAP_CONFIG_PATH`", "sh")
    assert "--config" not in script
    done = shell(cluster, script)
    assert done.returncode == 0, done.output
    config = Path(cluster["hosts"][cluster["leader"]]["fireap_node_config_dir"]) / "config.yml"
    assert done.stdout.startswith(f"{config}: valid; apps: web, batch\n{config}: 2 app(s); log_level info\n")


def test_the_role_s_logrotate_snippet_is_the_documented_one_and_rotates_the_log(cluster):
    host = cluster["hosts"][cluster["leader"]]
    (documented,) = blocks("### Log rotation", "text")
    snippet = Path(host["fireap_node_logrotate_dir"]) / "fireap"
    assert on_node(cluster, documented) in snippet.read_text()
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed: the snippet is not checked by logrotate itself")
    (check,) = blocks("### Log rotation", "sh")
    checked = shell(cluster, check)
    assert checked.returncode == 0, checked.output
    assert "error" not in checked.output.lower(), checked.output

    log = Path(host["fireap_node_log_dir"]) / "reap.log"
    before = log.read_text()
    assert before, "the handler logged when the role reloaded the agent"
    state = cluster["work"] / "logrotate.state"
    rotated = run(["logrotate", "--force", "--state", str(state), str(snippet)], cluster["work"])
    assert rotated.returncode == 0, rotated.output
    assert log.with_name("reap.log.1").read_text() == before
    assert log.read_text() == "" and stat.S_IMODE(log.stat().st_mode) == 0o640
    handler = run([f"{host['fireap_node_prefix']}/bin/fireap-reap", "--config",
                   f"{host['fireap_node_config_dir']}/config.yml"], cluster["work"], stdin=subprocess.DEVNULL)
    assert handler.returncode == 0, handler.output
    assert " INFO fireap-reap[" in log.read_text()


def test_debug_shows_why_a_dry_run_would_do_nothing(cluster):
    (script,) = blocks("### Log level", "sh")
    done = shell(cluster, script)
    assert done.returncode == 0, done.output
    assert "web: nothing to do: no release recorded" in done.stdout
    assert re.search(r" DEBUG fireap-reap\[\d+\] app=web version=-: nothing to do: no release recorded", done.stderr)


def test_the_apps_view_from_the_controller(cluster):
    (command,) = blocks("## What the nodes have", "sh")
    done = adhoc(cluster, command.strip())
    assert done.returncode == 0, done.output
    match = RESULT.search(done.stdout)
    assert match and match["host"] == cluster["leader"], done.output
    result = json.loads(match["json"])
    nodes = sorted(cluster["hosts"])
    assert list(result["apps"]) == ["batch", "web"] and result["nodes_without_apps"] == []
    assert result["apps"]["web"] == {
        "nodes": nodes, "fanout": 3, "absent_nodes": [],
        "settings": [{"max_semaphores": 3, "service_filter": "^web$", "tag_filter": None, "nodes": nodes}],
    }
    assert result["apps"]["batch"]["settings"] == [
        {"max_semaphores": 3, "service_filter": None, "tag_filter": None, "nodes": nodes}]

    (play,) = blocks("## What the nodes have", "yaml")
    (cluster["work"] / "apps.yml").write_text(play)
    played = run([str(BIN / "ansible-playbook"), "-i", "inventory.yml", "apps.yml"], cluster["work"])
    assert played.returncode == 0, played.output
    assert '"msg": "web: 3 node(s), fan-out 3"' in played.stdout and '"msg": "batch: 3 node(s), fan-out 3"' in played.stdout


def test_a_log_level_set_with_the_role_leaves_info_lines_out(cluster):
    """Last: it rewrites the task config."""
    (level,) = blocks("### Log level", "yaml")
    (cluster["work"] / "log-level.yml").write_text(level)
    configured = run([str(BIN / "ansible-playbook"), "-i", "inventory.yml", "-e", "@role-vars.yml",
                      "-e", "@log-level.yml", "--tags", "fireap_node_config", str(SETUP)], cluster["work"])
    assert configured.returncode == 0, configured.output
    host = cluster["hosts"][cluster["leader"]]
    reap = f"{host['fireap_node_prefix']}/bin/fireap-reap"
    config = f"{host['fireap_node_config_dir']}/config.yml"
    listed = run([reap, "--list", "--config", config], cluster["work"])
    assert listed.stdout.startswith(f"{config}: 2 app(s); log_level warning\n"), listed.output
    log = Path(host["fireap_node_log_dir"]) / "reap.log"
    before = log.read_text()
    handler = run([reap, "--config", config], cluster["work"], stdin=subprocess.DEVNULL)
    assert handler.returncode == 0, handler.output
    assert log.read_text() == before, "at warning, a call that finds nothing wrong logs nothing"
    debugged = run([reap, "--config", config, "--debug"], cluster["work"], stdin=subprocess.DEVNULL)
    assert debugged.returncode == 0, debugged.output
    assert " DEBUG fireap-reap[" in log.read_text()[len(before):]
