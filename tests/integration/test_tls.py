"""The node handler and the modules against the dev cluster served over HTTPS, with ACLs on.

The test makes its own CA, a server certificate for 127.0.0.1 and localhost and a client
certificate (with the ``cryptography`` package ansible-core depends on), starts ``python -m
devcluster serve --tls-cert --tls-key --acl-token``, and checks that ``validate_certs`` with
``ca_path`` works, that verification without the CA fails saying what to set, that
``validate_certs=false`` works, and that the token never shows in what the tools print. A second
double also requires client certificates (``--tls-client-ca``, as Consul's verify_incoming): the
client library, the node handler with the config the role writes and the modules present the
client certificate from their options, the handler's config, the role's variables or the
``CONSUL_CLIENT_*`` variables.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devcluster.consul import ServeProcess, find_free_port_range

from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    ConsulOptions,
    ConsulUnreachable,
    build_client,
    consul_errors,
)
from ansible_collections.fireap.consul.plugins.module_utils import _monitor
from ansible_collections.fireap.consul.plugins.module_utils._kv import Schema
from ansible_collections.fireap.consul.plugins.module_utils._progress import info
from ansible_collections.fireap.consul.plugins.module_utils._reap import handler_command

pytestmark = pytest.mark.double_only

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = REPO_ROOT / ".venv" / "bin" / "ansible"
TOKEN = f"tls-test-{uuid.uuid4()}"
NODES = 2
START_TIMEOUT = 60
RESULT = re.compile(r"^(?P<host>\S+) \| (?P<state>[A-Z]+)!? => (?P<json>\{.*?^\})$", re.MULTILINE | re.DOTALL)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def _signed(ca: x509.Certificate, ca_key, common_name: str, now: datetime.datetime, usage, *extensions):
    """A certificate for ``common_name`` that ``ca`` signed, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_certificates(directory: Path) -> dict[str, str]:
    """A CA, a server certificate it signed for 127.0.0.1 and localhost and a client certificate
    it signed: paths of ca, cert, key, client_cert, client_key."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("fireap test CA")).issuer_name(_name("fireap test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert, key = _signed(ca, ca_key, "server.dc1.consul", now, x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, names)
    client_cert, client_key = _signed(ca, ca_key, "fireap client", now, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM

    def private(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    return {
        "ca": _write(directory / "ca.pem", ca.public_bytes(pem)),
        "cert": _write(directory / "server.pem", cert.public_bytes(pem)),
        "key": _write(directory / "server-key.pem", private(key)),
        "client_cert": _write(directory / "client.pem", client_cert.public_bytes(pem)),
        "client_key": _write(directory / "client-key.pem", private(client_key)),
    }


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, str]:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def serve_https(certs: dict[str, str], workdir: Path, **options):
    """The double over HTTPS: certificate paths, the cluster's nodes, its workdir and the serve log."""
    double = ServeProcess(NODES, workdir, acl_token=TOKEN, tls_cert=certs["cert"], tls_key=certs["key"], **options)
    try:
        nodes = double.start(START_TIMEOUT).nodes
        yield {**certs, "nodes": nodes, "port": double.http_port, "dir": workdir, "log": double.log_path,
               "inventory": double.inventory}
    finally:
        double.stop()


@pytest.fixture(scope="module")
def tls(certificates, tmp_path_factory):
    yield from serve_https(certificates, tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="module")
def client_auth(certificates, tmp_path_factory):
    """The double over HTTPS requiring client certificates the test CA signed."""
    yield from serve_https(certificates, tmp_path_factory.mktemp("cluster-client-auth"),
                           tls_client_ca=certificates["ca"])


def options(tls, **overrides) -> ConsulOptions:
    values = {"host": "127.0.0.1", "port": tls["port"], "scheme": "https", "token": TOKEN, "timeout": 10,
              "retries": 0, **overrides}
    return ConsulOptions(**values)


def read_release(opts: ConsulOptions) -> dict:
    with build_client(opts) as client, consul_errors(opts, "reading the release of tls-app"):
        return info(client, Schema(), "tls-app")


def test_the_serve_command_says_it_serves_https(tls):
    assert f"agents on https://127.0.0.1:{tls['port']}" in tls["log"].read_text()


def test_validate_certs_with_the_ca_works(tls):
    assert read_release(options(tls, validate_certs=True, ca_path=tls["ca"]))["exists"] is False


def test_validate_certs_without_the_ca_fails_saying_what_to_set(tls):
    with pytest.raises(ConsulUnreachable) as failure:
        read_release(options(tls, validate_certs=True))
    message = str(failure.value)
    assert f"cannot reach the Consul agent at https://127.0.0.1:{tls['port']}" in message
    assert "TLS certificate verification failed" in message and "set ca_path or CONSUL_CACERT" in message
    assert TOKEN not in message


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_validate_certs_false_works_without_the_ca(tls):
    assert read_release(options(tls, validate_certs=False))["status"] == "none"


def test_plain_http_against_the_https_port_is_refused(tls):
    with pytest.raises(ConsulUnreachable):
        read_release(options(tls, scheme="http"))


def handler_config(tls, path: Path, **consul) -> Path:
    node = tls["nodes"][0]
    config = {
        "consul": {"host": "127.0.0.1", "port": node.port, "scheme": "https", "token": TOKEN, **consul},
        "state_dir": str(path.parent / "state"),
        "log_file": str(path.parent / "reap.log"),
        "apps": {"tls-app": {"exec_commands": ["true"]}},
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("consul", "exit_code", "expected"),
    [
        ({"ca_path": "CA"}, 0, "nothing to do: no release recorded for this app"),
        ({}, 1, "TLS certificate verification failed"),
        ({"validate_certs": False}, 0, "nothing to do: no release recorded for this app"),
    ],
    ids=["with-ca", "without-ca", "no-verify"],
)
def test_the_node_handler_over_https(tls, tmp_path, consul, exit_code, expected):
    consul = {key: tls["ca"] if value == "CA" else value for key, value in consul.items()}
    config = handler_config(tls, tmp_path / "config.yml", **consul)
    done = subprocess.run([*handler_command(str(config)), "--dry-run"], input="[]", capture_output=True, text=True,
                          timeout=60, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == exit_code, output
    assert expected in output
    assert TOKEN not in output


def run_ansible(tmp_path: Path, *arguments: str, **environ: str) -> tuple[int, str, dict]:
    """`ansible ARGUMENTS` with the collection and ``environ`` only: (exit status, output, the result)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "CONSUL_"))}
    env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / ".ansible-tmp"),
               ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build"), ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
               **environ)
    done = subprocess.run([str(ANSIBLE), *arguments], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    match = RESULT.search(done.stdout)
    return done.returncode, done.stdout + done.stderr, json.loads(match["json"]) if match else {}


def leader_inventory(tmp_path: Path) -> Path:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"leader": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    return inventory


def test_a_module_over_https_with_the_ca_and_the_token_from_the_environment(tls, tmp_path):
    args = f"app=tls-app host=127.0.0.1 port={tls['port']} scheme=https validate_certs=true"
    status, output, result = run_ansible(tmp_path, "leader", "-i", str(leader_inventory(tmp_path)), "-m",
                                         "fireap.consul.fireap_info", "-a", args,
                                         CONSUL_HTTP_TOKEN=TOKEN, CONSUL_CACERT=tls["ca"])
    assert status == 0, output
    assert (result["exists"], result["status"]) == (False, "none")
    assert TOKEN not in output


# --- client certificates: an agent that verifies its HTTPS clients (verify_incoming) ----------------


def test_an_agent_that_verifies_clients_accepts_the_client_certificate(client_auth):
    opts = options(client_auth, ca_path=client_auth["ca"], client_cert=client_auth["client_cert"],
                   client_key=client_auth["client_key"])
    assert read_release(opts)["exists"] is False


def test_without_a_client_certificate_the_agent_refuses_and_the_message_says_what_to_set(client_auth):
    with pytest.raises(ConsulUnreachable) as failure:
        read_release(options(client_auth, ca_path=client_auth["ca"]))
    message = str(failure.value)
    assert f"cannot reach the Consul agent at https://127.0.0.1:{client_auth['port']}" in message
    assert "set client_cert and client_key, or CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY" in message
    assert TOKEN not in message


def role_rendered_config(certs, tmp_path: Path, **role_vars) -> Path:
    """The handler's config as the fireap_node role's template writes it, with the role's defaults and
    vars and ``role_vars`` for the node-000 agent of ``certs``' double."""
    role = REPO_ROOT / "roles" / "fireap_node"
    settings = tmp_path / "role-vars.yml"
    settings.write_text(yaml.safe_dump({
        "fireap_node_consul_port": certs["nodes"][0].port,
        "fireap_node_consul_scheme": "https",
        "fireap_node_consul_ca_path": certs["ca"],
        "fireap_node_consul_token": TOKEN,
        "fireap_node_state_dir": str(tmp_path / "state"),
        "fireap_node_log_dir": str(tmp_path / "log"),
        "fireap_node_apps": {"tls-app": {"exec_commands": ["true"]}},
        **role_vars,
    }))
    config = tmp_path / "config.yml"
    status, output, _result = run_ansible(
        tmp_path, "localhost", "-m", "ansible.builtin.template", "-a",
        f"src={role / 'templates' / 'config.yml.j2'} dest={config} mode=0600",
        "-e", f"@{role / 'defaults' / 'main.yml'}", "-e", f"@{role / 'vars' / 'main.yml'}", "-e", f"@{settings}")
    assert status == 0, output
    return config


def run_handler(config: Path) -> tuple[int, str]:
    done = subprocess.run([*handler_command(str(config)), "--dry-run"], input="[]", capture_output=True, text=True,
                          timeout=60, check=False)
    return done.returncode, done.stdout + done.stderr


def test_the_handler_presents_the_client_certificate_of_the_role_s_variables(client_auth, tmp_path):
    config = role_rendered_config(client_auth, tmp_path, fireap_node_consul_client_cert=client_auth["client_cert"],
                                  fireap_node_consul_client_key=client_auth["client_key"])
    consul = yaml.safe_load(config.read_text())["consul"]
    assert (consul["client_cert"], consul["client_key"]) == (client_auth["client_cert"], client_auth["client_key"])
    status, output = run_handler(config)
    assert status == 0, output
    assert "nothing to do: no release recorded for this app" in output
    assert TOKEN not in output


def test_the_handler_without_a_client_certificate_says_what_to_set(client_auth, tmp_path):
    config = role_rendered_config(client_auth, tmp_path)
    assert "client_cert" not in yaml.safe_load(config.read_text())["consul"]
    status, output = run_handler(config)
    assert status == 1, output
    assert "set client_cert and client_key, or CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY" in output


def test_a_module_takes_the_client_certificate_from_the_role_s_variables(client_auth, tmp_path):
    """The double's inventory, as setup.yml uses it, with the role's TLS variables for the agents."""
    status, output, result = run_ansible(
        tmp_path, "fireap_leader", "-i", str(client_auth["inventory"]), "-m", "fireap.consul.fireap_info",
        "-a", "app=tls-app", "-e", json.dumps({
            "fireap_node_consul_scheme": "https", "fireap_node_consul_ca_path": client_auth["ca"],
            "fireap_node_consul_client_cert": client_auth["client_cert"],
            "fireap_node_consul_client_key": client_auth["client_key"]}))
    assert status == 0, output
    assert (result["exists"], result["status"]) == (False, "none")
    assert TOKEN not in output


def test_a_module_takes_the_client_certificate_from_the_environment(client_auth, tmp_path):
    args = f"app=tls-app port={client_auth['port']} scheme=https"
    inventory = str(leader_inventory(tmp_path))
    environ = {"CONSUL_HTTP_TOKEN": TOKEN, "CONSUL_CACERT": client_auth["ca"]}
    status, output, result = run_ansible(tmp_path, "leader", "-i", inventory, "-m", "fireap.consul.fireap_info",
                                         "-a", args, **environ)
    assert status != 0 and "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY" in result["msg"], output
    status, output, result = run_ansible(tmp_path, "leader", "-i", inventory, "-m", "fireap.consul.fireap_info",
                                         "-a", args, CONSUL_CLIENT_CERT=client_auth["client_cert"],
                                         CONSUL_CLIENT_KEY=client_auth["client_key"], **environ)
    assert status == 0, output
    assert (result["exists"], result["status"]) == (False, "none")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together: give both or neither"),
        (["--tls-cert", "CERT", "--tls-key", "CA"], "cannot load the TLS certificate"),
        (["--tls-client-ca", "CA"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "CERT", "--tls-key", "KEY", "--tls-client-ca", "KEY"], "cannot load the client CA certificate"),
    ],
    ids=["cert-without-key", "key-not-matching", "client-ca-without-https", "client-ca-not-a-certificate"],
)
def test_serve_refuses_an_unusable_certificate_clearly(tls, tmp_path, extra, message):
    paths = {"CERT": tls["cert"], "KEY": tls["key"], "CA": tls["ca"]}
    extra = [paths.get(arg, arg) for arg in extra]
    done = subprocess.run([sys.executable, "-m", "devcluster", "serve", "--nodes", "1", "--http-port",
                           str(find_free_port_range(1)), "--workdir", str(tmp_path / "cluster"), *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and message in done.stderr, done.stderr


@pytest.mark.parametrize("with_certificate", [True, False])
def test_the_monitor_presents_the_client_certificate_of_its_flags(client_auth, monkeypatch, capsys, with_certificate):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
    flags = ["--client-cert", client_auth["client_cert"], "--client-key", client_auth["client_key"]]
    argv = ["--app", "tls-app", "--one-shot", "--scheme", "https", "--port", str(client_auth["port"]),
            "--ca-path", client_auth["ca"], "--retries", "0", *(flags if with_certificate else [])]
    shown = io.StringIO()
    assert _monitor.main(argv, out=shown) == (0 if with_certificate else 1)
    if with_certificate:
        assert shown.getvalue().startswith("tls-app: no release recorded"), shown.getvalue()
    else:
        assert "set client_cert and client_key, or CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY" in capsys.readouterr().err
