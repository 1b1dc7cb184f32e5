"""The node handler and the modules against the dev cluster served over HTTPS, with ACLs on.

The test makes its own CA and a server certificate for 127.0.0.1 and localhost (with the
``cryptography`` package ansible-core depends on), starts ``python -m devcluster serve
--tls-cert --tls-key --acl-token``, and checks that ``validate_certs`` with ``ca_path``
works, that verification without the CA fails saying what to set, that
``validate_certs=false`` works, and that the token never shows in what the tools print.
"""

from __future__ import annotations

import datetime
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


def make_certificates(directory: Path) -> dict[str, str]:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost: paths of ca, cert, key."""
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
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name("server.dc1.consul")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(directory / "ca.pem", ca.public_bytes(pem)),
        "cert": _write(directory / "server.pem", cert.public_bytes(pem)),
        "key": _write(directory / "server-key.pem", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
    }


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """The double over HTTPS: certificate paths, the cluster's nodes and the serve log."""
    directory = tmp_path_factory.mktemp("tls")
    certs = make_certificates(directory)
    double = ServeProcess(NODES, directory / "cluster", acl_token=TOKEN, tls_cert=certs["cert"], tls_key=certs["key"])
    try:
        nodes = double.start(START_TIMEOUT).nodes
        yield {**certs, "nodes": nodes, "port": double.http_port, "dir": directory, "log": double.log_path}
    finally:
        double.stop()


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


def test_a_module_over_https_with_the_ca_and_the_token_from_the_environment(tls, tmp_path):
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"leader": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "CONSUL_"))}
    env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / ".ansible-tmp"),
               ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build"), ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
               CONSUL_HTTP_TOKEN=TOKEN, CONSUL_CACERT=tls["ca"])
    args = f"app=tls-app host=127.0.0.1 port={tls['port']} scheme=https validate_certs=true"
    done = subprocess.run([str(ANSIBLE), "leader", "-i", str(inventory), "-m", "fireap.consul.fireap_info",
                           "-a", args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    result = json.loads(RESULT.search(done.stdout)["json"])
    assert (result["exists"], result["status"]) == (False, "none")
    assert TOKEN not in output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together: give both or neither"),
        (["--tls-cert", "CERT", "--tls-key", "CA"], "cannot load the TLS certificate"),
    ],
    ids=["cert-without-key", "key-not-matching"],
)
def test_serve_refuses_an_unusable_certificate_clearly(tls, tmp_path, extra, message):
    extra = [tls["cert"] if arg == "CERT" else tls["ca"] if arg == "CA" else arg for arg in extra]
    done = subprocess.run([sys.executable, "-m", "devcluster", "serve", "--nodes", "1", "--http-port",
                           str(find_free_port_range(1)), "--workdir", str(tmp_path / "cluster"), *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and message in done.stderr, done.stderr
