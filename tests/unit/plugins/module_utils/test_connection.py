"""Connection options, environment fallbacks, retries and the Consul error vocabulary of _connection.

The HTTP tests run against a small scripted server in a thread, the error mapping on Consul's
answers (status and body) as py-consul raises them: no Consul is needed.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading

import consul
import consul.base
import pytest
import requests
from consul.callback import CB

from ansible_collections.fireap.consul.plugins.module_utils import _connection
from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    CONNECTION_ARGUMENT_SPEC,
    OPTION_NAMES,
    ConsulAccessDenied,
    ConsulOptions,
    ConsulOptionsError,
    ConsulSessionInvalid,
    ConsulTxnRefused,
    ConsulTxnSessionInvalid,
    ConsulUnreachable,
    FireapConsulError,
    backoff_delay,
    build_client,
    client_options,
    consul_errors,
    parse_address,
    retry_transient,
)
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.fake_time import FakeTime

TOKEN = "b1gs3cret-0000-4000-8000-token"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Retries wait milliseconds instead of seconds."""
    monkeypatch.setattr(_connection, "BACKOFF_BASE", 0.001)
    monkeypatch.setattr(_connection, "BACKOFF_MAX", 0.01)


# ---------------------------------------------------------------- options and environment


def test_defaults_without_parameters_or_environment():
    options = ConsulOptions.from_params({}, environ={})
    assert options == ConsulOptions()
    assert (options.host, options.port, options.scheme) == ("127.0.0.1", 8500, "http")
    assert options.validate_certs is True
    assert options.ca_path is None and options.token is None
    assert options.client_cert is None and options.client_key is None and options.cert is None
    assert options.timeout == 30.0 and options.retries == 3
    assert options.address == "http://127.0.0.1:8500"


def test_parameters_win_over_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    environ = {
        "CONSUL_HTTP_ADDR": "https://10.0.0.9:8501",
        "CONSUL_HTTP_TOKEN": "env-token",
        "CONSUL_HTTP_TOKEN_FILE": str(token_file),
        "CONSUL_HTTP_SSL": "true",
        "CONSUL_HTTP_SSL_VERIFY": "false",
        "CONSUL_CACERT": "/nonexistent/ca.pem",
    }
    params = {
        "host": "consul.internal",
        "port": 8600,
        "scheme": "http",
        "validate_certs": True,
        "ca_path": str(token_file),
        "token": "param-token",
        "timeout": 5,
        "retries": 1,
        "app": "unrelated module parameter",
    }
    options = ConsulOptions.from_params(params, environ)
    assert options == ConsulOptions(
        host="consul.internal",
        port=8600,
        scheme="http",
        validate_certs=True,
        ca_path=str(token_file),
        token="param-token",
        timeout=5.0,
        retries=1,
    )


def test_none_means_unset_so_the_environment_applies():
    params = dict.fromkeys(OPTION_NAMES)  # what AnsibleModule passes for options not given
    environ = {"CONSUL_HTTP_ADDR": "10.0.0.5:8501", "CONSUL_HTTP_TOKEN": "env-token"}
    options = ConsulOptions.from_params(params, environ)
    assert (options.host, options.port, options.token) == ("10.0.0.5", 8501, "env-token")


def test_port_parameter_combines_with_environment_host():
    options = ConsulOptions.from_params({"port": 9000}, {"CONSUL_HTTP_ADDR": "10.0.0.5:8501"})
    assert (options.host, options.port) == ("10.0.0.5", 9000)


def test_environment_address_is_ignored_when_host_is_given():
    options = ConsulOptions.from_params({"host": "agent1"}, {"CONSUL_HTTP_ADDR": "unix:///run/consul.sock"})
    assert options.address == "http://agent1:8500"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.5:8501", "http://10.0.0.5:8501"),
        ("http://10.0.0.5:8501", "http://10.0.0.5:8501"),
        ("https://consul.example:8501", "https://consul.example:8501"),
        ("HTTPS://consul.example:8501/", "https://consul.example:8501"),
        ("https://consul.example", "https://consul.example:443"),
        ("consul.example", "http://consul.example:80"),
        ("[::1]:8500", "http://[::1]:8500"),
        ("https://[fe80::1]", "https://[fe80::1]:443"),
        ("  127.0.0.1:8500  ", "http://127.0.0.1:8500"),
    ],
)
def test_environment_address_forms(address, expected):
    assert ConsulOptions.from_params({}, {"CONSUL_HTTP_ADDR": address}).address == expected


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("unix:///var/run/consul.sock", "names a unix socket, which is not supported"),
        ("ftp://host:21", "unknown scheme 'ftp'"),
        ("host:http", "invalid port 'http'"),
        ("host:", "invalid port ''"),
        ("host:0", "port out of range 1..65535"),
        ("host:65536", "port out of range 1..65535"),
        ("http://host:8500/v1", "is not an address of the form host:port"),
        ("http://user@host:8500", "is not an address of the form host:port"),
        ("http://", "is not an address of the form host:port"),
        ("::1", "put an IPv6 address in brackets"),
        ("[::1", "malformed bracketed IPv6 address"),
        ("[::1]8500", "malformed bracketed IPv6 address"),
        ("[not-v6]:8500", "'not-v6' in brackets is not an IPv6 address"),
        (":8500", "must be a non-empty host name"),
    ],
)
def test_bad_environment_addresses(address, fragment):
    with pytest.raises(ConsulOptionsError) as caught:
        ConsulOptions.from_params({}, {"CONSUL_HTTP_ADDR": address})
    assert "CONSUL_HTTP_ADDR" in str(caught.value)
    assert fragment in str(caught.value)


def test_parse_address_reports_scheme_only_when_given():
    assert parse_address("h:1") == ("h", 1, None)
    assert parse_address("http://h:1") == ("h", 1, "http")


def test_https_address_selects_tls_unless_scheme_is_given():
    environ = {"CONSUL_HTTP_ADDR": "https://10.0.0.5:8501"}
    assert ConsulOptions.from_params({}, environ).scheme == "https"
    assert ConsulOptions.from_params({"scheme": "http"}, environ).scheme == "http"


def test_https_of_an_unused_environment_address_does_not_apply():
    environ = {"CONSUL_HTTP_ADDR": "https://10.0.0.5:8501"}
    assert ConsulOptions.from_params({"host": "agent1"}, environ).address == "http://agent1:8500"


@pytest.mark.parametrize(
    ("address", "ssl", "scheme"),
    [
        (None, "true", "https"),
        (None, "1", "https"),
        (None, "false", "http"),
        ("http://10.0.0.5:8501", "true", "https"),  # never back to http when TLS was asked for
        ("https://10.0.0.5:8501", "false", "https"),
    ],
)
def test_consul_http_ssl(address, ssl, scheme):
    environ = {"CONSUL_HTTP_SSL": ssl}
    if address:
        environ["CONSUL_HTTP_ADDR"] = address
    assert ConsulOptions.from_params({}, environ).scheme == scheme


def test_invalid_boolean_variable_is_named():
    with pytest.raises(ConsulOptionsError, match=r"CONSUL_HTTP_SSL must be a boolean .* got 'yes'"):
        ConsulOptions.from_params({}, {"CONSUL_HTTP_SSL": "yes"})
    with pytest.raises(ConsulOptionsError, match=r"CONSUL_HTTP_SSL_VERIFY must be a boolean"):
        ConsulOptions.from_params({}, {"CONSUL_HTTP_SSL_VERIFY": "maybe"})


def test_invalid_variable_is_not_read_when_its_option_is_given():
    environ = {"CONSUL_HTTP_SSL": "yes", "CONSUL_HTTP_SSL_VERIFY": "maybe", "CONSUL_HTTP_TOKEN_FILE": "/nonexistent"}
    options = ConsulOptions.from_params({"scheme": "http", "validate_certs": True, "token": "t"}, environ)
    assert (options.scheme, options.validate_certs, options.token) == ("http", True, "t")


def test_ssl_verify_variable():
    assert ConsulOptions.from_params({}, {"CONSUL_HTTP_SSL_VERIFY": "false"}).validate_certs is False
    assert ConsulOptions.from_params({}, {"CONSUL_HTTP_SSL_VERIFY": "TRUE"}).validate_certs is True
    assert ConsulOptions.from_params({"validate_certs": True}, {"CONSUL_HTTP_SSL_VERIFY": "0"}).validate_certs


def test_empty_variables_count_as_unset():
    environ = dict.fromkeys(
        ["CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_SSL", "CONSUL_CACERT"], ""
    )
    assert ConsulOptions.from_params({}, environ) == ConsulOptions()


def test_ca_variables(tmp_path):
    cacert = tmp_path / "ca.pem"
    cacert.write_text("pem")
    capath = tmp_path / "cas"
    capath.mkdir()
    https = {"CONSUL_HTTP_SSL": "true"}
    assert ConsulOptions.from_params({}, {**https, "CONSUL_CAPATH": str(capath)}).ca_path == str(capath)
    both = {**https, "CONSUL_CACERT": str(cacert), "CONSUL_CAPATH": str(capath)}
    assert ConsulOptions.from_params({}, both).ca_path == str(cacert)


def test_missing_ca_path_is_an_error_only_where_it_is_used():
    with pytest.raises(ConsulOptionsError, match=r"ca_path '/nonexistent/ca.pem' does not exist"):
        ConsulOptions.from_params({}, {"CONSUL_HTTP_SSL": "true", "CONSUL_CACERT": "/nonexistent/ca.pem"})
    plain = ConsulOptions.from_params({}, {"CONSUL_CACERT": "/nonexistent/ca.pem"})
    assert plain.scheme == "http"
    unverified = ConsulOptions(scheme="https", validate_certs=False, ca_path="/nonexistent/ca.pem")
    assert unverified.verify is False


def pem_files(tmp_path):
    """Two files standing in for a client certificate and its key (only their existence is checked)."""
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    cert.write_text("pem")
    key.write_text("pem")
    return str(cert), str(key)


def test_client_certificate_variables_fill_what_the_options_leave_unset(tmp_path):
    cert, key = pem_files(tmp_path)
    environ = {"CONSUL_HTTP_SSL": "true", "CONSUL_CLIENT_CERT": cert, "CONSUL_CLIENT_KEY": key}
    assert ConsulOptions.from_params({}, environ).cert == (cert, key)
    other = tmp_path / "other.pem"
    other.write_text("pem")
    options = ConsulOptions.from_params({"client_cert": str(other)}, environ)
    assert (options.client_cert, options.client_key) == (str(other), key)
    config = {"scheme": "https", "client_cert": cert, "client_key": key}
    assert ConsulOptions.from_config(config, {}).cert == (cert, key)


def test_a_client_certificate_is_used_over_https_only(tmp_path):
    cert, key = pem_files(tmp_path)
    assert ConsulOptions(scheme="https", client_cert=cert, client_key=key).cert == (cert, key)
    assert ConsulOptions(client_cert=cert, client_key=key).cert is None
    # Stale or half-set variables do not matter to plain http, as for CONSUL_CACERT.
    assert ConsulOptions.from_params({}, {"CONSUL_CLIENT_CERT": "/nonexistent/client.pem"}).scheme == "http"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"client_cert": "CERT"}, "client_cert is set but client_key is not: the client certificate and its private "
                                  "key go together (the options client_cert and client_key, else CONSUL_CLIENT_CERT "
                                  "and CONSUL_CLIENT_KEY)"),
        ({"client_key": "KEY"}, "client_key is set but client_cert is not"),
        ({"client_cert": "/nonexistent/c.pem", "client_key": "KEY"},
         "client_cert '/nonexistent/c.pem' is not a file (expected the client certificate (PEM); the value comes "
         "from the client_cert option, else CONSUL_CLIENT_CERT)"),
        ({"client_cert": "CERT", "client_key": "DIR"}, "client_key 'DIR' is not a file (expected the client "
                                                       "certificate's private key (PEM)"),
    ],
    ids=["cert-without-key", "key-without-cert", "missing-cert", "key-is-a-directory"],
)
def test_unusable_client_certificate_settings_are_named(tmp_path, given, message):
    cert, key = pem_files(tmp_path)
    paths = {"CERT": cert, "KEY": key, "DIR": str(tmp_path)}
    params = {name: paths.get(value, value) for name, value in given.items()}
    with pytest.raises(ConsulOptionsError) as caught:
        ConsulOptions.from_params({"scheme": "https", **params}, {})
    for placeholder, path in paths.items():
        message = message.replace(f"'{placeholder}'", repr(path))
    assert str(caught.value).startswith(message)


def test_verify_argument(tmp_path):
    cacert = tmp_path / "ca.pem"
    cacert.write_text("pem")
    assert ConsulOptions().verify is True
    assert ConsulOptions(validate_certs=False).verify is False
    assert ConsulOptions(scheme="https", ca_path=str(cacert)).verify == str(cacert)


def test_token_variable():
    assert ConsulOptions.from_params({}, {"CONSUL_HTTP_TOKEN": "env-token"}).token == "env-token"


def test_token_file_wins_over_token_variable(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  file-token\n")
    environ = {"CONSUL_HTTP_TOKEN": "env-token", "CONSUL_HTTP_TOKEN_FILE": str(token_file)}
    assert ConsulOptions.from_params({}, environ).token == "file-token"
    assert ConsulOptions.from_params({"token": "param-token"}, environ).token == "param-token"


def test_unreadable_token_file(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ConsulOptionsError) as caught:
        ConsulOptions.from_params({}, {"CONSUL_HTTP_TOKEN_FILE": str(missing)})
    assert str(caught.value) == f"CONSUL_HTTP_TOKEN_FILE: cannot read {str(missing)!r}: No such file or directory"


def test_empty_token_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    with pytest.raises(ConsulOptionsError, match=r"CONSUL_HTTP_TOKEN_FILE \(.*\) is empty"):
        ConsulOptions.from_params({}, {"CONSUL_HTTP_TOKEN_FILE": str(token_file)})


@pytest.mark.parametrize(
    ("source", "value"),
    [("token", "abc def"), ("token", "abc\n"), ("token", "t\u00f6ken"), ("CONSUL_HTTP_TOKEN", "abc\tdef")],
)
def test_malformed_token_is_rejected_without_showing_it(source, value):
    params, environ = ({"token": value}, {}) if source == "token" else ({}, {source: value})
    with pytest.raises(ConsulOptionsError) as caught:
        ConsulOptions.from_params(params, environ)
    assert str(caught.value).startswith(f"{source} contains whitespace, control or non-ASCII characters")
    assert value.strip() not in str(caught.value)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"host": ""}, "host must be a non-empty host name or IP address, got '' (str)"),
        ({"host": 10}, "host must be a non-empty host name or IP address, got 10 (int)"),
        ({"host": "http://agent1"}, "host must be a bare host name or IP address, got 'http://agent1'"),
        ({"host": "agent1:8500"}, "host 'agent1:8500' is neither a host name nor an IPv6 address"),
        ({"host": "agent 1"}, "host must be a host name or IP address without spaces, got 'agent 1' (str)"),
        ({"port": 0}, "port must be an integer between 1 and 65535, got 0 (int)"),
        ({"port": 65536}, "port must be an integer between 1 and 65535, got 65536 (int)"),
        ({"port": "8500"}, "port must be an integer between 1 and 65535, got '8500' (str)"),
        ({"port": True}, "port must be an integer between 1 and 65535, got True (bool)"),
        ({"scheme": "ftp"}, "scheme must be 'http' or 'https', got 'ftp' (str)"),
        ({"validate_certs": "yes"}, "validate_certs must be true or false, got 'yes' (str)"),
        ({"ca_path": 5}, "ca_path must be the path of a CA certificate file or directory, got 5 (int)"),
        ({"client_cert": ""}, "client_cert must be the path of a client certificate file, got '' (str)"),
        ({"client_key": 5}, "client_key must be the path of a client certificate's private key file, got 5 (int)"),
        ({"token": ""}, "token is empty; leave it unset to send no token"),
        ({"token": 1234}, "token must be a string, got a int (value not shown)"),
        ({"timeout": 0}, "timeout must be a number of seconds greater than 0, got 0 (int)"),
        ({"timeout": -1.5}, "timeout must be a number of seconds greater than 0, got -1.5 (float)"),
        ({"timeout": "30"}, "timeout must be a number of seconds greater than 0, got '30' (str)"),
        ({"timeout": float("nan")}, "timeout must be a number of seconds greater than 0, got nan (float)"),
        ({"retries": -1}, "retries must be an integer >= 0, got -1 (int)"),
        ({"retries": 1.5}, "retries must be an integer >= 0, got 1.5 (float)"),
    ],
)
def test_validation_errors_name_option_value_and_problem(params, message):
    with pytest.raises(ConsulOptionsError) as caught:
        ConsulOptions.from_params(params, {})
    assert str(caught.value).startswith(message)


def test_direct_construction_validates_and_normalises():
    assert ConsulOptions(host="[::1]").host == "::1"
    assert ConsulOptions(host="::1").address == "http://[::1]:8500"
    assert ConsulOptions(timeout=2).timeout == 2.0
    with pytest.raises(ConsulOptionsError, match="port must be"):
        ConsulOptions(port=-1)


def test_from_config_accepts_only_connection_options():
    assert ConsulOptions.from_config(None, {}) == ConsulOptions()
    assert ConsulOptions.from_config({"port": 8501}, {}).port == 8501
    with pytest.raises(ConsulOptionsError, match=r"unknown Consul connection option\(s\) tokn; known: host, port"):
        ConsulOptions.from_config({"tokn": "x"}, {})
    with pytest.raises(ConsulOptionsError, match="must be a mapping of options, got list"):
        ConsulOptions.from_config(["host"], {})


def test_repr_hides_token():
    options = ConsulOptions(token=TOKEN)
    assert TOKEN not in repr(options) and TOKEN not in str(options)
    assert "token=<hidden>" in repr(options)
    assert "client_cert=None, client_key=None" in repr(options)
    assert "token=None" in repr(ConsulOptions())


def test_argument_spec_leaves_fallbacks_to_consul_options():
    assert tuple(CONNECTION_ARGUMENT_SPEC) == OPTION_NAMES
    assert CONNECTION_ARGUMENT_SPEC["token"]["no_log"] is True
    # A default or an Ansible fallback would hide the environment from ConsulOptions.
    for name, spec in CONNECTION_ARGUMENT_SPEC.items():
        assert "default" not in spec and "fallback" not in spec, name


def test_backoff_grows_with_jitter_and_is_capped(monkeypatch):
    monkeypatch.setattr(_connection, "BACKOFF_BASE", 0.5)
    monkeypatch.setattr(_connection, "BACKOFF_MAX", 8.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        delays = {backoff_delay(attempt) for _draw in range(50)}
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), attempt
        assert len(delays) > 1, "no jitter"


# ---------------------------------------------------------------- scripted HTTP server


class ScriptedConsul:
    """HTTP server answering from a script; the last answer repeats. Records every request.

    An answer is (status, body[, headers]), or "drop" (close the connection without an
    answer, after the request was read) or "hang" (answer nothing until the test ends).
    """

    def __init__(self, tls_cert=None, client_ca=None):
        self.answers = [(200, "true")]
        self.requests = []
        self.release = threading.Event()
        script = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                script.requests.append((self.command, self.path, dict(self.headers), body))
                answer = script.answers.pop(0) if len(script.answers) > 1 else script.answers[0]
                if answer == "drop":
                    self.close_connection = True
                    return
                if answer == "hang":
                    script.release.wait(30)
                    self.close_connection = True
                    return
                status, text, *extra = answer
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-Consul-Index", "7")
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_DELETE = do_POST = _serve

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls_cert)
            if client_ca is not None:  # as an agent with verify_incoming
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cafile=client_ca)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def options(self, **overrides):
        values = {"host": "127.0.0.1", "port": self.port, "timeout": 5, "retries": 2, **overrides}
        return ConsulOptions(**values)

    @property
    def methods(self):
        return [method for method, *_call in self.requests]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    scripted = ScriptedConsul()
    yield scripted
    scripted.close()


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    """A self-signed certificate for "localhost" only: (certificate, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture
def tls_server(tls_cert):
    scripted = ScriptedConsul(tls_cert)
    scripted.answers = [(200, kv_entry("k", "v"))]
    yield scripted
    scripted.close()


@pytest.fixture
def verifying_server(tls_cert):
    """An HTTPS agent that requires a client certificate: tls_cert's, which signed itself."""
    scripted = ScriptedConsul(tls_cert, client_ca=tls_cert[0])
    scripted.answers = [(200, kv_entry("k", "v"))]
    yield scripted
    scripted.close()


def kv_entry(key, value):
    return json.dumps([{"Key": key, "Value": base64.b64encode(value.encode()).decode(), "ModifyIndex": 7}])


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- retries


def test_get_is_retried_after_503(server):
    server.answers = [(503, "rate limit exceeded"), (200, kv_entry("k", "v"))]
    index, entry = build_client(server.options()).kv.get("k")
    assert (index, entry["Value"]) == ("7", b"v")
    assert server.methods == ["GET", "GET"]


@pytest.mark.parametrize("status", [500, 502, 504])
def test_get_is_retried_after_server_errors(server, status):
    server.answers = [(status, "No cluster leader"), (200, kv_entry("k", "v"))]
    assert build_client(server.options()).kv.get("k")[1]["Value"] == b"v"
    assert len(server.requests) == 2


def test_get_retries_stop_and_report_the_last_answer(server):
    options = server.options(retries=2)
    server.answers = [(503, "rate limit exceeded")]
    with pytest.raises(FireapConsulError) as caught, consul_errors(options, "reading k"):
        build_client(options).kv.get("k")
    assert caught.value.status == 503
    assert str(caught.value) == (
        f"Consul request failed at http://127.0.0.1:{server.port} while reading k: HTTP 503: rate limit exceeded"
    )
    assert server.methods == ["GET"] * 3


def test_zero_retries_means_one_attempt(server):
    server.answers = [(503, "busy")]
    with pytest.raises(consul.ConsulException):
        build_client(server.options(retries=0)).kv.get("k")
    assert len(server.requests) == 1


def test_put_is_not_retried_on_500(server):
    options = server.options()
    server.answers = [(500, "invalid session \"5c4e\"")]
    with pytest.raises(ConsulSessionInvalid) as caught, consul_errors(options, "acquiring slot s/0"):
        build_client(options).kv.put("s/0", "me", acquire="5c4e")
    assert caught.value.status == 500
    assert 'HTTP 500: invalid session "5c4e"' in str(caught.value)
    assert server.methods == ["PUT"]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_put_is_not_retried_on_gateway_errors(server, status):
    server.answers = [(status, "upstream")]
    with pytest.raises(consul.ConsulException):
        build_client(server.options()).event.fire("FIREAP:TASK", "{}")
    assert server.methods == ["PUT"]


def test_put_is_retried_on_429(server):
    server.answers = [(429, "Your IP is issuing too many concurrent connections"), (200, "true")]
    assert build_client(server.options()).kv.put("k", "v") is True
    assert server.methods == ["PUT", "PUT"]


def test_get_is_retried_after_a_dropped_connection(server):
    server.answers = ["drop", (200, kv_entry("k", "v"))]
    assert build_client(server.options()).kv.get("k")[1]["Value"] == b"v"
    assert server.methods == ["GET", "GET"]


def test_put_is_not_retried_once_it_may_have_reached_consul(server):
    options = server.options()
    server.answers = ["drop"]
    with pytest.raises(ConsulUnreachable) as caught, consul_errors(options, "creating a session"):
        build_client(options).session.create()
    assert server.methods == ["PUT"]
    assert str(caught.value).startswith(
        f"cannot reach the Consul agent at http://127.0.0.1:{server.port} while creating a session: "
    )


def test_read_timeout_is_reported(server):
    options = server.options(timeout=0.3, retries=0)
    server.answers = ["hang"]
    with pytest.raises(ConsulUnreachable) as caught, consul_errors(options, "reading k"):
        build_client(options).kv.get("k")
    assert str(caught.value) == (
        f"cannot reach the Consul agent at http://127.0.0.1:{server.port} while reading k: "
        "no answer within the timeout (0.3 s, plus the wait of a blocking query)"
    )


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_refused_connection_is_retried_for_every_method_then_reported(monkeypatch, method):
    waits = []
    monkeypatch.setattr(_connection, "backoff_delay", lambda attempt: waits.append(attempt) or 0.0)
    options = ConsulOptions(port=closed_port(), retries=3)
    client = build_client(options)
    with pytest.raises(ConsulUnreachable) as caught, consul_errors(options, "reading k"):
        client.kv.get("k") if method == "GET" else client.kv.put("k", "v")
    assert waits == [1, 2, 3]
    assert str(caught.value) == (
        f"cannot reach the Consul agent at http://127.0.0.1:{options.port} while reading k: "
        "connection refused; is the agent running and listening there?"
    )


def test_blocking_queries_keep_py_consul_timeouts():
    client = build_client(ConsulOptions(timeout=30))
    assert client.http.timeout([("index", "5"), ("wait", "16s")]) == 30 + 16 + 1
    assert client.http.timeout([("recurse", "1")]) == 30


# ---------------------------------------------------------------- tokens and access errors


def test_access_denied_message_with_token(server):
    options = server.options(token=TOKEN)
    server.answers = [(403, "Permission denied")]
    with pytest.raises(ConsulAccessDenied) as caught, consul_errors(options, "reading fireap/web/release"):
        build_client(options).kv.get("fireap/web/release")
    assert caught.value.status == 403
    assert str(caught.value) == (
        f"Consul refused the request (HTTP 403 Permission denied) at http://127.0.0.1:{server.port}: "
        "the ACL token lacks permission for reading fireap/web/release; set token or CONSUL_HTTP_TOKEN "
        "(Consul said: Permission denied)"
    )
    assert len(server.requests) == 1
    assert server.requests[0][2]["X-Consul-Token"] == TOKEN


def test_access_denied_message_without_token(server):
    options = server.options()
    server.answers = [(403, "ACL not found")]
    denied = pytest.raises(ConsulAccessDenied, match="no ACL token was given and anonymous access lacks permission")
    with denied, consul_errors(options, "firing FIREAP:TASK"):
        build_client(options).event.fire("FIREAP:TASK", "{}")
    assert "X-Consul-Token" not in server.requests[0][2]


@pytest.mark.parametrize("status", [403, 500, 400])
def test_token_never_appears_in_messages(server, status):
    options = server.options(token=TOKEN)
    server.answers = [(status, f"bad token {TOKEN} here")]
    with pytest.raises(FireapConsulError) as caught, consul_errors(options, f"writing {TOKEN}"):
        build_client(options).kv.put("k", "v")
    assert TOKEN not in str(caught.value)
    assert "<token>" in str(caught.value)


def test_token_comes_only_from_the_options(server, monkeypatch):
    # py-consul alone would let CONSUL_HTTP_TOKEN override an explicit token.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "process-env-token")
    server.answers = [(200, kv_entry("k", "v"))]
    build_client(server.options(token=TOKEN)).kv.get("k")
    build_client(server.options()).kv.get("k")
    assert server.requests[0][2].get("X-Consul-Token") == TOKEN
    assert "X-Consul-Token" not in server.requests[1][2]


# ---------------------------------------------------------------- the rest of the client


def test_https_to_a_plain_http_agent_is_a_tls_error(server):
    options = server.options(scheme="https", validate_certs=False, retries=0)
    with pytest.raises(ConsulUnreachable, match=r"while reading k: TLS error: "), consul_errors(options, "reading k"):
        build_client(options).kv.get("k")


def test_https_with_the_ca_from_the_environment(tls_server, tls_cert):
    environ = {"CONSUL_HTTP_ADDR": f"https://localhost:{tls_server.port}", "CONSUL_CACERT": tls_cert[0]}
    options = ConsulOptions.from_params({"retries": 0}, environ)
    assert build_client(options).kv.get("k")[1]["Value"] == b"v"


def test_untrusted_certificate_is_explained(tls_server):
    options = ConsulOptions(host="localhost", port=tls_server.port, scheme="https", retries=0)
    with pytest.raises(ConsulUnreachable) as caught, consul_errors(options, "reading k"):
        build_client(options).kv.get("k")
    # OpenSSL spells it "self-signed" or "self signed" depending on its version.
    assert re.fullmatch(
        f"cannot reach the Consul agent at https://localhost:{tls_server.port} while reading k: "
        r"TLS certificate verification failed \(self.signed certificate\); "
        "set ca_path or CONSUL_CACERT to the CA that signed the agent's certificate",
        str(caught.value),
    )


def test_certificate_name_mismatch_is_explained(tls_server, tls_cert):
    options = ConsulOptions(port=tls_server.port, scheme="https", ca_path=tls_cert[0], retries=0)
    mismatch = pytest.raises(ConsulUnreachable, match=r"IP address mismatch.*connect by a host name or address the")
    with mismatch, consul_errors(options, "reading k"):
        build_client(options).kv.get("k")


def test_an_agent_that_verifies_clients_accepts_the_client_certificate(verifying_server, tls_cert):
    environ = {"CONSUL_HTTP_ADDR": f"https://localhost:{verifying_server.port}", "CONSUL_CACERT": tls_cert[0],
               "CONSUL_CLIENT_CERT": tls_cert[0], "CONSUL_CLIENT_KEY": tls_cert[1]}
    options = ConsulOptions.from_params({"retries": 0}, environ)
    assert build_client(options).kv.get("k")[1]["Value"] == b"v"


def test_an_agent_that_verifies_clients_refuses_none_and_says_what_to_set(verifying_server, tls_cert):
    options = ConsulOptions(host="localhost", port=verifying_server.port, scheme="https", ca_path=tls_cert[0],
                            retries=0)
    with pytest.raises(ConsulUnreachable) as caught, consul_errors(options, "reading k"):
        build_client(options).kv.get("k")
    # TLS 1.3 may see the agent's alert or only the connection it closed: the hint is the same.
    assert str(caught.value).startswith(
        f"cannot reach the Consul agent at https://localhost:{verifying_server.port} while reading k: ")
    assert str(caught.value).endswith(
        "(the agent may require a client certificate, as Consul's verify_incoming does: set client_cert and "
        "client_key, or CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY)")


def test_a_client_key_that_is_not_the_certificate_s_is_explained(verifying_server, tls_cert, tmp_path):
    _cert, other_key = pem_files(tmp_path)
    options = ConsulOptions(host="localhost", port=verifying_server.port, scheme="https", ca_path=tls_cert[0],
                            client_cert=tls_cert[0], client_key=other_key, retries=0)
    with pytest.raises(ConsulUnreachable) as caught, consul_errors(options, "reading k"):
        build_client(options).kv.get("k")
    assert str(caught.value).endswith(
        f"(cannot load the client certificate {tls_cert[0]!r} with the key {other_key!r}: both must be PEM files "
        "and the key must be the certificate's)")


def test_client_passes_tls_settings(tmp_path):
    cacert = tmp_path / "ca.pem"
    cacert.write_text("pem")
    cert, key = pem_files(tmp_path)
    assert build_client(ConsulOptions(scheme="https", client_cert=cert, client_key=key)).http.cert == (cert, key)
    assert build_client(ConsulOptions()).http.cert is None
    assert build_client(ConsulOptions(validate_certs=False)).http.verify is False
    assert build_client(ConsulOptions(scheme="https", ca_path=str(cacert))).http.verify == str(cacert)
    assert build_client(ConsulOptions(host="::1", scheme="https")).http.base_uri == "https://[::1]:8500"


def test_closing_the_client_closes_its_connections(monkeypatch):
    client = build_client(ConsulOptions())
    closed = []
    monkeypatch.setattr(client.http.session, "close", lambda: closed.append(True))
    with client:
        pass
    assert closed == [True]


def test_consul_errors_as_decorator_and_pass_through():
    options = ConsulOptions()

    @consul_errors(options, "listing nodes")
    def failing(exc):
        raise exc

    with pytest.raises(FireapConsulError, match=r"while listing nodes: HTTP 500: boom"):
        failing(consul.ConsulException("500 boom"))
    with pytest.raises(FireapConsulError, match=r"while listing nodes: HTTP 404: no such key"):
        failing(consul.NotFound("no such key"))
    with pytest.raises(ValueError, match="not a Consul error"):
        failing(ValueError("not a Consul error"))


def test_missing_py_consul_is_reported(monkeypatch):
    monkeypatch.setattr(_connection, "PY_CONSUL_IMPORT_ERROR", ImportError("No module named 'consul'"))
    with pytest.raises(FireapConsulError, match="py-consul Python library is required"):
        build_client(ConsulOptions())


# ---------------------------------------------------------------- Consul's answers as error types

SESSION = "5c4e8f2a-1b3d-4c5e-9f70-8a1b2c3d4e5f"
ADDRESS = "http://127.0.0.1:8500"

#: py-consul's callbacks: KV writes and /v1/txn answer through CB.json(); a session renewal
#: through CB.json(one=True, allow_404=False), so its 404 is raised (NotFound) instead of None.
WRITE = CB.json()
RENEW = CB.json(one=True, allow_404=False)


def raised_by_py_consul(callback, status: int, body: str) -> consul.ConsulException:
    """The exception py-consul raises for Consul's answer ``status`` + ``body``."""
    with pytest.raises(consul.ConsulException) as caught:
        callback(consul.base.Response(status, {"Content-Type": "text/plain; charset=utf-8"}, body))
    return caught.value


def mapped(err: BaseException, options: ConsulOptions = ConsulOptions(), action: str = "acting") -> FireapConsulError:
    with pytest.raises(FireapConsulError) as caught, consul_errors(options, action):
        raise err
    assert caught.value.__cause__ is err
    return caught.value


def txn_rollback(errors: dict[int, str]) -> str:
    """The body of a /v1/txn that Consul rolled back (HTTP 409)."""
    return json.dumps({"Results": None, "Errors": [{"OpIndex": i, "What": what} for i, what in errors.items()]})


# Consul's own words (agent/consul/state/kvs.go, txn.go; agent/session_endpoint.go).
SESSION_INVALID_ANSWERS = {
    "acquire with an unknown session": (WRITE, 500, f'invalid session "{SESSION}"'),
    "acquire forwarded to a server": (WRITE, 500, f'rpc error making call: invalid session "{SESSION}"'),
    "acquire, as releases before 1.0 say it": (WRITE, 500, f'Invalid session "{SESSION}"'),
    "renew of an unknown session": (RENEW, 404, f"Session id '{SESSION}' not found"),
}


@pytest.mark.parametrize("callback, status, body", SESSION_INVALID_ANSWERS.values(), ids=SESSION_INVALID_ANSWERS)
def test_a_session_consul_no_longer_knows_is_session_invalid(callback, status, body):
    error = mapped(raised_by_py_consul(callback, status, body), action=f"renewing session {SESSION}")
    assert error.__class__ is ConsulSessionInvalid
    assert error.status == status
    assert not error.transient
    assert str(error) == f"Consul request failed at {ADDRESS} while renewing session {SESSION}: HTTP {status}: {body}"


OTHER_ANSWERS = {
    "no leader": (WRITE, 500, "No cluster leader", 500, True),
    "rate limited": (WRITE, 503, "rate limit exceeded", 503, True),
    "too many connections": (WRITE, 429, "Your IP is issuing too many concurrent connections", 429, True),
    "bad gateway": (WRITE, 502, "upstream", 502, True),
    "session TTL out of range": (WRITE, 500, "Invalid Session TTL '5s', must be between [10s=24h0m0s]", 500, True),
    "missing session": (WRITE, 400, "Missing session", 400, False),
    "bad request": (WRITE, 400, "Request decode failed: unexpected EOF", 400, False),
    "ACLs disabled": (WRITE, 401, "ACL support disabled", 401, False),
    "404 of another kind": (RENEW, 404, "404 page not found", 404, False),
    "409 that is not a txn rollback": (WRITE, 409, "conflict", 409, False),
}


@pytest.mark.parametrize("callback, status, body, expected, transient", OTHER_ANSWERS.values(), ids=OTHER_ANSWERS)
def test_other_answers_keep_their_status_and_say_whether_to_try_again(callback, status, body, expected, transient):
    error = mapped(raised_by_py_consul(callback, status, body), action="writing k")
    assert error.__class__ is FireapConsulError
    assert (error.status, error.transient) == (expected, transient)
    assert str(error) == f"Consul request failed at {ADDRESS} while writing k: HTTP {status}: {body}"


def test_a_403_is_access_denied_and_final():
    error = mapped(raised_by_py_consul(WRITE, 403, "Permission denied"), action="writing k")
    assert error.__class__ is ConsulAccessDenied
    assert (error.status, error.transient) == (403, False)


def test_a_txn_rollback_carries_consul_s_reason_per_op():
    errors = {
        0: 'failed index check for key "fireap/web/release", current modify index 12 != 9',
        1: 'failed to lock key "fireap/web/slots/n0/0", lock is already held',
    }
    error = mapped(raised_by_py_consul(WRITE, 409, txn_rollback(errors)), action="acquiring fireap/web/slots/n0/0")
    assert error.__class__ is ConsulTxnRefused
    assert (error.errors, error.status, error.transient) == (errors, 409, False)
    assert not isinstance(error, ConsulSessionInvalid)
    assert str(error) == (
        f"Consul request failed at {ADDRESS} while acquiring fireap/web/slots/n0/0: the transaction was rolled back: "
        f"op 0: {errors[0]}; op 1: {errors[1]}"
    )


def test_a_txn_rolled_back_for_an_unknown_session_is_both_a_rollback_and_session_invalid():
    errors = {1: f'invalid session "{SESSION}"', 2: f'invalid session "{SESSION}"'}
    error = mapped(raised_by_py_consul(WRITE, 409, txn_rollback(errors)))
    assert isinstance(error, ConsulTxnSessionInvalid)
    assert isinstance(error, ConsulTxnRefused) and isinstance(error, ConsulSessionInvalid)
    assert (error.errors, error.status, error.transient) == (errors, 409, False)


def test_an_unlock_of_a_lost_session_is_a_plain_rollback():
    # Consul does not look the session up to unlock: the answer is the one for a lock held by another.
    errors = {0: "failed to unlock key \"fireap/web/slots/n0/0\", lock isn't held, or is held by another session"}
    assert mapped(raised_by_py_consul(WRITE, 409, txn_rollback(errors))).__class__ is ConsulTxnRefused


def test_py_consul_s_own_complaints_have_no_status():
    error = mapped(raised_by_py_consul(CB.json(), 200, "{not json"), action="reading k")
    assert error.__class__ is FireapConsulError
    assert (error.status, error.transient) == (None, False)
    assert str(error).startswith(f"Consul request failed at {ADDRESS} while reading k: Failed to decode JSON: ")


@pytest.mark.parametrize("err", [requests.exceptions.ConnectionError("refused"), requests.exceptions.ReadTimeout(),
                                 consul.Timeout()])
def test_no_answer_is_unreachable_and_worth_another_try(err):
    error = mapped(err)
    assert error.__class__ is ConsulUnreachable
    assert (error.status, error.transient) == (None, True)


def test_the_token_is_hidden_in_every_kind_of_error():
    options = ConsulOptions(token=TOKEN)
    answers = [(WRITE, 500, f"bad {TOKEN}"), (WRITE, 409, txn_rollback({1: f'invalid session "{TOKEN}"'})),
               (WRITE, 403, f"token {TOKEN}")]
    for callback, status, body in answers:
        error = mapped(raised_by_py_consul(callback, status, body), options, action=f"writing {TOKEN}")
        assert TOKEN not in str(error) and "<token>" in str(error)


def test_every_consul_error_is_a_fireap_error():
    for cls in (FireapConsulError, ConsulOptionsError, ConsulAccessDenied, ConsulUnreachable, ConsulSessionInvalid,
                ConsulTxnRefused, ConsulTxnSessionInvalid):
        assert issubclass(cls, FireapError)


def test_client_options_name_the_agent_a_client_talks_to():
    options = ConsulOptions(host="10.0.0.5", port=8501, token=TOKEN, timeout=7)
    assert client_options(build_client(options)) is options
    plain = consul.Consul(host="10.0.0.6", port=8502, scheme="https")
    assert client_options(plain).address == "https://10.0.0.6:8502"


# ---------------------------------------------------------------- retrying while Consul does not answer


class FlakyCall:
    """Raises the given errors in turn, then answers "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_a_call_is_made_again_with_backoff_while_consul_does_not_answer():
    call = FlakyCall(ConsulUnreachable("connection refused"), FireapConsulError("HTTP 503", status=503))
    time, lines = FakeTime(), []
    assert retry_transient(call, 60, log=lines.append, sleep=time.sleep, clock=time.monotonic) == "ok"
    assert call.calls == 3
    base = _connection.BACKOFF_BASE
    assert base / 2 <= time.sleeps[0] <= base and base <= time.sleeps[1] <= 2 * base
    assert lines[0] == f"connection refused; retrying in {time.sleeps[0]:.1f}s"
    assert lines[1].startswith("HTTP 503; retrying in ")


@pytest.mark.parametrize("refusal", [
    ConsulAccessDenied("HTTP 403 Permission denied", status=403),
    ConsulSessionInvalid('HTTP 500: invalid session "x"', status=500),
    ConsulTxnRefused("rolled back", {1: "lock is already held"}),
    FireapConsulError("HTTP 400: Missing session", status=400),
], ids=["denied", "session invalid", "txn refused", "bad request"])
def test_a_refusal_is_not_made_again(refusal):
    call, time = FlakyCall(refusal), FakeTime()
    with pytest.raises(type(refusal)):
        retry_transient(call, 60, sleep=time.sleep, clock=time.monotonic)
    assert (call.calls, time.sleeps) == (1, [])


def test_the_window_bounds_the_retries_and_the_last_error_is_raised():
    down, time = FlakyCall(*[ConsulUnreachable(f"refused {n}") for n in range(1000)]), FakeTime()
    window = 200 * _connection.BACKOFF_BASE
    with pytest.raises(ConsulUnreachable) as caught:
        retry_transient(down, window, sleep=time.sleep, clock=time.monotonic)
    assert time.now <= window and down.calls > 3
    assert str(caught.value) == f"refused {down.calls - 1}"


def test_errors_of_other_kinds_pass_through_at_once():
    call, time = FlakyCall(KeyError("bug")), FakeTime()
    with pytest.raises(KeyError):
        retry_transient(call, 60, sleep=time.sleep, clock=time.monotonic)
    assert call.calls == 1
