# SPDX-License-Identifier: MIT
"""Connection to a Consul agent, shared by the modules and the node handler.

Both sides build a :class:`ConsulOptions` from their own settings (module parameters, or
the handler's YAML config) and get a py-consul client from :func:`build_client`. The
Consul CLI's environment variables fill in options the caller left unset; that fallback
lives here rather than in Ansible's ``fallback`` mechanism so that a module and the node
handler resolve the same settings in the same way.

It also holds the Consul error vocabulary: :func:`consul_errors` turns what py-consul and
requests raise into :class:`FireapConsulError` and its subclasses, by HTTP status and body,
and :func:`retry_transient` makes a call again while Consul does not answer.

Only the standard library, py-consul and its HTTP stack (requests, urllib3) are used:
nodes run this file without Ansible installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import random
import re
import socket
import ssl
import time
from typing import Callable, TypeVar

try:
    import consul
    import consul.std
    import requests
    import urllib3.exceptions
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry
except ImportError as exc:
    # Modules report this through missing_required_lib; build_client() refuses to run.
    PY_CONSUL_IMPORT_ERROR = exc
    Retry = object
    _PyConsul = _PyConsulHTTPClient = object
else:
    PY_CONSUL_IMPORT_ERROR = None
    _PyConsul = consul.Consul
    _PyConsulHTTPClient = consul.std.HTTPClient

from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError

HAS_PY_CONSUL = PY_CONSUL_IMPORT_ERROR is None

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8500
DEFAULT_SCHEME = "http"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3

#: Backoff before retry n (1-based) is drawn from [c/2, c], c = min(BACKOFF_MAX, BACKOFF_BASE * 2**(n-1)).
BACKOFF_BASE = 0.5
BACKOFF_MAX = 8.0

#: Methods Consul treats as reads: safe to send again whatever happened to the first attempt.
IDEMPOTENT_METHODS = frozenset(("GET", "HEAD"))
#: The agent's per-client connection limit and rate limiter answer 429 before handling the
#: request, so any method may be sent again.
TOO_MANY_REQUESTS = 429
#: Statuses of a Consul that is restarting, electing a leader or busy, worth another try:
#: 429 (see above), 500 (e.g. "No cluster leader" during an election), 502/504 (a proxy in
#: front of the agent) and 503 (Consul's rate limiter). Consul also answers 500 to a write it
#: refused (acquiring with an unknown session): such an answer is not transient
#: (ConsulSessionInvalid), and the HTTP layer never sends a write again once Consul may have
#: acted on it (_ConsulRetry).
TRANSIENT_STATUSES = frozenset((TOO_MANY_REQUESTS, 500, 502, 503, 504))
#: How long a node's handler and worker try again while Consul does not answer (an agent
#: restart, a server outage) before they give up.
DEFAULT_RETRY_WINDOW = 60.0

#: Argument spec of the connection options, merged into every module's own spec
#: (``dict(CONNECTION_ARGUMENT_SPEC, **own)``; do not mutate it). There are no defaults and
#: no Ansible fallbacks on purpose: an unset option stays None so that ConsulOptions can apply
#: the environment fallback and the default, exactly as it does on the nodes.
CONNECTION_ARGUMENT_SPEC = {
    "host": {"type": "str"},
    "port": {"type": "int"},
    "scheme": {"type": "str", "choices": ["http", "https"]},
    "validate_certs": {"type": "bool"},
    "ca_path": {"type": "path"},
    "client_cert": {"type": "path"},
    "client_key": {"type": "path"},
    "token": {"type": "str", "no_log": True},
    "timeout": {"type": "float"},
    "retries": {"type": "int"},
}

OPTION_NAMES = tuple(CONNECTION_ARGUMENT_SPEC)

ENV_ADDR = "CONSUL_HTTP_ADDR"
ENV_TOKEN = "CONSUL_HTTP_TOKEN"
ENV_TOKEN_FILE = "CONSUL_HTTP_TOKEN_FILE"
ENV_CACERT = "CONSUL_CACERT"
ENV_CAPATH = "CONSUL_CAPATH"
ENV_CLIENT_CERT = "CONSUL_CLIENT_CERT"
ENV_CLIENT_KEY = "CONSUL_CLIENT_KEY"
ENV_SSL = "CONSUL_HTTP_SSL"
ENV_SSL_VERIFY = "CONSUL_HTTP_SSL_VERIFY"

# The spellings Go's strconv.ParseBool accepts, which the Consul CLI uses for its variables.
_ENV_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))
_ENV_FALSE = frozenset(("0", "f", "F", "FALSE", "false", "False"))
_URL_DEFAULT_PORTS = {"http": 80, "https": 443}
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH_CODES = frozenset((62, 64))


class FireapConsulError(FireapError):
    """A Consul operation failed; the message is fit to show a user and never holds the token.

    ``status`` is the HTTP status Consul answered with, or None when there was no answer.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Whether a second try may well get an answer: Consul was restarting or busy."""
        return self.status in TRANSIENT_STATUSES


class ConsulOptionsError(FireapConsulError):
    """A connection option (or the environment variable standing in for it) is invalid."""


class ConsulAccessDenied(FireapConsulError):
    """Consul answered 403: the ACL token is missing, unknown, or lacks a permission."""


class ConsulUnreachable(FireapConsulError):
    """No HTTP answer: connection refused, timeout, name resolution or TLS failure."""

    @property
    def transient(self) -> bool:
        return True


class ConsulSessionInvalid(FireapConsulError):
    """Consul no longer knows the session the request named (it expired or was invalidated):
    locks it held are free; a new session is needed."""

    @property
    def transient(self) -> bool:
        return False


class ConsulTxnRefused(FireapConsulError):
    """A /v1/txn was rolled back (409): ``errors`` maps each failed op's index to Consul's reason."""

    def __init__(self, message: str, errors: dict[int, str]) -> None:
        super().__init__(message, status=409)
        self.errors = errors


class ConsulTxnSessionInvalid(ConsulTxnRefused, ConsulSessionInvalid):
    """A /v1/txn rolled back because an op named a session Consul no longer knows."""


@dataclasses.dataclass(frozen=True, repr=False)
class ConsulOptions:
    """Where and how to reach one Consul agent's HTTP API.

    Construct directly (values are validated and normalised, the environment is not read)
    or through :meth:`from_params` / :meth:`from_config`, which apply the environment
    fallbacks and the defaults.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    scheme: str = DEFAULT_SCHEME
    validate_certs: bool = True
    ca_path: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))
        # Checked only where they are used, so a stale CONSUL_CACERT or CONSUL_CLIENT_CERT does
        # not break plain http.
        if self.scheme != "https":
            return
        if self.ca_path and self.validate_certs and not os.path.exists(self.ca_path):
            raise ConsulOptionsError(
                f"ca_path {self.ca_path!r} does not exist (expected a CA certificate file or directory; "
                f"the value comes from the ca_path option, else {ENV_CACERT}, else {ENV_CAPATH})"
            )
        if (self.client_cert is None) != (self.client_key is None):
            given, missing = ("client_cert", "client_key") if self.client_key is None else ("client_key", "client_cert")
            raise ConsulOptionsError(
                f"{given} is set but {missing} is not: the client certificate and its private key go together "
                f"(the options client_cert and client_key, else {ENV_CLIENT_CERT} and {ENV_CLIENT_KEY})"
            )
        for name, variable, what in (("client_cert", ENV_CLIENT_CERT, "the client certificate (PEM)"),
                                     ("client_key", ENV_CLIENT_KEY, "the client certificate's private key (PEM)")):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConsulOptionsError(
                    f"{name} {path!r} is not a file (expected {what}; "
                    f"the value comes from the {name} option, else {variable})"
                )

    @classmethod
    def from_params(cls, params, environ=None) -> ConsulOptions:
        """Options from a mapping that may hold other keys (module params); unset = absent or None.

        ``environ`` defaults to ``os.environ``. An environment variable is read only for an
        option left unset, so a broken variable does not matter when the option is given.
        """
        environ = os.environ if environ is None else environ
        values = {name: params[name] for name in OPTION_NAMES if params.get(name) is not None}
        env_scheme = None
        if "host" not in values:
            env_address = _env_address(environ)
            if env_address is not None:
                values["host"], env_port, env_scheme = env_address
                values.setdefault("port", env_port)
        # As in the CLI, https in the address or CONSUL_HTTP_SSL=true selects TLS; neither
        # can turn it off again.
        if "scheme" not in values and (env_scheme == "https" or _env_bool(environ, ENV_SSL)):
            values["scheme"] = "https"
        if "validate_certs" not in values:
            verify = _env_bool(environ, ENV_SSL_VERIFY)
            if verify is not None:
                values["validate_certs"] = verify
        if "ca_path" not in values and (environ.get(ENV_CACERT) or environ.get(ENV_CAPATH)):
            values["ca_path"] = environ.get(ENV_CACERT) or environ.get(ENV_CAPATH)
        for name, variable in (("client_cert", ENV_CLIENT_CERT), ("client_key", ENV_CLIENT_KEY)):
            if name not in values and environ.get(variable):
                values[name] = environ[variable]
        if "token" not in values:
            token = _env_token(environ)
            if token is not None:
                values["token"] = token
        return cls(**values)

    @classmethod
    def from_config(cls, section, environ=None) -> ConsulOptions:
        """Options from a config section holding only connection options (the handler's YAML)."""
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConsulOptionsError(
                f"the Consul connection settings must be a mapping of options, got {type(section).__name__}"
            )
        unknown = sorted(str(key) for key in section if key not in OPTION_NAMES)
        if unknown:
            raise ConsulOptionsError(
                f"unknown Consul connection option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}"
            )
        return cls.from_params(section, environ)

    @property
    def address(self) -> str:
        """The agent's base URL, e.g. ``http://127.0.0.1:8500`` (IPv6 hosts in brackets)."""
        return f"{self.scheme}://{_url_host(self.host)}:{self.port}"

    @property
    def verify(self) -> bool | str:
        """requests' ``verify``: False, True (system CAs) or the CA file/directory."""
        if not self.validate_certs:
            return False
        return self.ca_path or True

    @property
    def cert(self) -> tuple[str, str] | None:
        """requests' ``cert``: the client certificate and key an https agent that verifies
        incoming connections (Consul's verify_incoming) asks for, or None."""
        if self.scheme != "https" or self.client_cert is None or self.client_key is None:
            return None
        return self.client_cert, self.client_key

    def __repr__(self) -> str:
        token = "<hidden>" if self.token else None
        return (
            f"ConsulOptions(host={self.host!r}, port={self.port!r}, scheme={self.scheme!r}, "
            f"validate_certs={self.validate_certs!r}, ca_path={self.ca_path!r}, client_cert={self.client_cert!r}, "
            f"client_key={self.client_key!r}, token={token}, "
            f"timeout={self.timeout!r}, retries={self.retries!r})"
        )


def _invalid(label: str, value, expected: str) -> ConsulOptionsError:
    return ConsulOptionsError(f"{label} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_host(label: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid(label, value, "a non-empty host name or IP address")
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if "://" in host or "/" in host:
        raise ConsulOptionsError(
            f"{label} must be a bare host name or IP address, got {value!r}; "
            "give the scheme in scheme and the port in port"
        )
    if any(char.isspace() for char in host) or not host:
        raise _invalid(label, value, "a host name or IP address without spaces")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConsulOptionsError(
                f"{label} {value!r} is neither a host name nor an IPv6 address; give the port in port"
            ) from None
    return host


def _check_port(label: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _invalid(label, value, "an integer between 1 and 65535")
    return value


def _check_scheme(label: str, value) -> str:
    if value not in ("http", "https"):
        raise _invalid(label, value, "'http' or 'https'")
    return value


def _check_bool(label: str, value) -> bool:
    if not isinstance(value, bool):
        raise _invalid(label, value, "true or false")
    return value


def _path_check(expected: str) -> Callable[[str, object], str | None]:
    """A check of an optional path option: None, or a non-empty string (``~`` expanded)."""

    def check(label: str, value) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise _invalid(label, value, expected)
        return os.path.expanduser(value)

    return check


def _check_token(label: str, value) -> str | None:
    # Never echo the value: it is a secret. requests would also reject control characters
    # in a header with a message that quotes the header value.
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConsulOptionsError(f"{label} must be a string, got a {type(value).__name__} (value not shown)")
    if not value:
        raise ConsulOptionsError(f"{label} is empty; leave it unset to send no token")
    if not value.isprintable() or any(char.isspace() for char in value) or not value.isascii():
        raise ConsulOptionsError(
            f"{label} contains whitespace, control or non-ASCII characters (value not shown)"
        )
    return value


def _check_timeout(label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise _invalid(label, value, "a number of seconds greater than 0")
    return float(value)


def _check_retries(label: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(label, value, "an integer >= 0")
    return value


_CHECKS = {
    "host": _check_host,
    "port": _check_port,
    "scheme": _check_scheme,
    "validate_certs": _check_bool,
    "ca_path": _path_check("the path of a CA certificate file or directory"),
    "client_cert": _path_check("the path of a client certificate file"),
    "client_key": _path_check("the path of a client certificate's private key file"),
    "token": _check_token,
    "timeout": _check_timeout,
    "retries": _check_retries,
}


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _env_bool(environ, var: str) -> bool | None:
    raw = environ.get(var)
    if not raw:
        return None
    if raw in _ENV_TRUE:
        return True
    if raw in _ENV_FALSE:
        return False
    raise ConsulOptionsError(f"{var} must be a boolean (true/false, 1/0, t/f), got {raw!r}")


def parse_address(value: str, label: str = ENV_ADDR) -> tuple[str, int, str | None]:
    """Split a Consul address (``host:port``, ``http://host:port``, ``https://host[:port]``).

    Returns ``(host, port, scheme)``; scheme is None when the address names none. As with the
    Consul CLI, an address with a scheme but no port uses the URL's default port (80/443) and
    one with neither uses 80. ``unix://`` sockets are refused: py-consul speaks TCP only.
    """
    text = value.strip()
    scheme = None
    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme == "unix":
            raise ConsulOptionsError(
                f"{label} {value!r} names a unix socket, which is not supported: "
                "give host:port, http://host:port or https://host:port of the agent's HTTP listener"
            )
        if scheme not in _URL_DEFAULT_PORTS:
            raise ConsulOptionsError(f"{label} {value!r} has an unknown scheme {scheme!r}; use http:// or https://")
    rest = rest[:-1] if rest.endswith("/") else rest
    if not rest or "/" in rest or "?" in rest or "#" in rest or "@" in rest:
        raise ConsulOptionsError(
            f"{label} {value!r} is not an address of the form host:port, http://host:port or https://host:port"
        )
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ConsulOptionsError(f"{label} {value!r} has a malformed bracketed IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConsulOptionsError(f"{label} {value!r}: {host!r} in brackets is not an IPv6 address") from None
        has_port, port_text = bool(after), after[1:]
    elif rest.count(":") > 1:
        raise ConsulOptionsError(f"{label} {value!r}: put an IPv6 address in brackets, e.g. [::1]:8500")
    else:
        host, port_sep, port_text = rest.partition(":")
        has_port = bool(port_sep)
    if has_port:
        if not port_text.isdigit():
            raise ConsulOptionsError(f"{label} {value!r} has an invalid port {port_text!r} (expected digits)")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ConsulOptionsError(f"{label} {value!r} has a port out of range 1..65535")
    else:
        port = _URL_DEFAULT_PORTS[scheme or "http"]
    return _check_host(f"the host of {label} {value!r}", host), port, scheme


def _env_address(environ) -> tuple[str, int, str | None] | None:
    raw = environ.get(ENV_ADDR)
    if not raw or not raw.strip():
        return None
    return parse_address(raw, ENV_ADDR)


def _env_token(environ) -> str | None:
    """The token from CONSUL_HTTP_TOKEN_FILE (which wins, as in the CLI) or CONSUL_HTTP_TOKEN."""
    path = environ.get(ENV_TOKEN_FILE)
    if path:
        label = f"{ENV_TOKEN_FILE} ({path})"
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise ConsulOptionsError(f"{ENV_TOKEN_FILE}: cannot read {path!r}: {reason}") from None
        return _check_token(label, text.strip())
    if environ.get(ENV_TOKEN):
        return _check_token(ENV_TOKEN, environ[ENV_TOKEN])
    return None


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): exponential with jitter.

    Half the exponential step is fixed so a restarting agent gets time to come back; the
    other half is random so that many clients failing together do not retry in lockstep.
    """
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


T = TypeVar("T")


def retry_transient(
    call: Callable[[], T],
    window: float = DEFAULT_RETRY_WINDOW,
    *,
    log: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()``, made again with backoff while it raises a transient FireapConsulError
    (Consul does not answer, restarts or is busy), for up to ``window`` s; any other error,
    and the last transient one, is raised.

    Only for calls that are safe to repeat: reads, and writes whose second landing changes
    nothing (a lock with the same session, a check-and-set). ``log`` gets one line per retry.
    """
    started = clock()
    attempt = 0
    while True:
        try:
            return call()
        except FireapConsulError as err:
            if not err.transient:
                raise
            attempt += 1
            delay = backoff_delay(attempt)
            if clock() - started + delay > window:
                raise
            if log is not None:
                log(f"{err}; retrying in {delay:.1f}s")
            sleep(delay)


class _ConsulRetry(Retry):
    """urllib3 retry policy that never sends a write again once Consul may have acted on it.

    Connection failures (urllib3's "connect" errors: the request was not sent) and 429 are
    retried for every method. A read (GET/HEAD) is also retried after a read error (timeout,
    reset) and on the other TRANSIENT_STATUSES. A PUT/DELETE/POST that got an answer or lost
    its connection after sending is not: Consul answers 500 to some writes on purpose
    (acquire with an unknown session), and creating a session or firing an event twice is
    not harmless.
    """

    def is_retry(self, method, status_code, has_retry_after=False):
        if status_code == TOO_MANY_REQUESTS:
            return True
        return method.upper() in IDEMPOTENT_METHODS and status_code in TRANSIENT_STATUSES

    def get_backoff_time(self):
        return backoff_delay(len(self.history))


def _retry_policy(retries: int):
    return _ConsulRetry(
        total=retries,
        other=0,
        allowed_methods=IDEMPOTENT_METHODS,
        raise_on_status=False,
        respect_retry_after_header=True,
        retry_after_max=math.ceil(BACKOFF_MAX),
    )


class _RetryingHTTPClient(_PyConsulHTTPClient):
    """py-consul's requests client with the retry policy mounted; close() releases the sockets."""

    def __init__(self, *args, retries: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        adapter = HTTPAdapter(max_retries=_retry_policy(retries))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()


class _Consul(_PyConsul):
    """consul.Consul whose HTTP client retries, with the token taken only from the options."""

    def __init__(self, options: ConsulOptions) -> None:
        self.options = options
        self._retries = options.retries
        super().__init__(
            host=_url_host(options.host),
            port=options.port,
            scheme=options.scheme,
            verify=options.verify,
            token=options.token,
            connections_timeout=options.timeout,
            cert=options.cert,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; the options already
        # applied the environment with the right precedence.
        self.token = options.token
        # py-consul adds the token only in the endpoints that call prepare_headers()
        # (agent/self and txn do not): send it on every request, as the Consul CLI does.
        if options.token:
            self.http.session.headers["X-Consul-Token"] = options.token

    def http_connect(self, host, port, scheme, verify=True, cert=None):
        return _RetryingHTTPClient(
            host, port, scheme, verify, cert, connections_timeout=self.connections_timeout, retries=self._retries
        )


def build_client(options: ConsulOptions):
    """A ``consul.Consul`` for ``options`` whose requests retry as :class:`_ConsulRetry` says.

    Blocking queries keep py-consul's timeout: ``timeout`` + wait + wait/16. Use the client as
    a context manager (or call ``client.http.close()``) to release its connections.
    """
    if PY_CONSUL_IMPORT_ERROR is not None:
        raise FireapConsulError(
            f"the py-consul Python library is required but cannot be imported: {PY_CONSUL_IMPORT_ERROR}"
        )
    return _Consul(options)


def client_options(client) -> ConsulOptions:
    """The options ``client`` talks to its agent by, for consul_errors' messages: those
    build_client got, else the address and timeout of any other py-consul client."""
    if isinstance(client, _Consul):
        return client.options
    http = client.http
    return ConsulOptions(
        host=http.host,
        port=http.port,
        scheme=http.scheme,
        timeout=getattr(http, "connections_timeout", None) or DEFAULT_TIMEOUT,
    )


@contextlib.contextmanager
def consul_errors(options: ConsulOptions, action: str):
    """Turn py-consul and requests exceptions raised in the block into FireapConsulError
    (the subclass that says what happened: see :func:`answer_error`).

    ``action`` says what the block does, for the message ("reading fireap/web/release").
    Works as ``with consul_errors(opts, "..."):`` and as a decorator. The token is removed
    from every message.
    """
    try:
        yield
    except Exception as err:
        translated = _translate(err, options, action)
        if translated is None:
            raise
        raise translated from err


def _translate(err: Exception, options: ConsulOptions, action: str) -> FireapConsulError | None:
    if not HAS_PY_CONSUL:
        return None
    address = options.address
    # py-consul's Timeout comes from its asyncio client only; requests raises its own.
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, consul.Timeout)):
        reason = _transport_reason(err, options)
        message = f"cannot reach the Consul agent at {address} while {action}: {reason}"
        return ConsulUnreachable(_hide_token(message, options))
    if isinstance(err, consul.ConsulException):
        status, body = _answer_of(err)
        return answer_error(status, body, options, action)
    if isinstance(err, requests.exceptions.RequestException):
        return FireapConsulError(_hide_token(f"Consul request failed at {address} while {action}: {err}", options))
    return None


def _answer_of(err) -> tuple[int | None, str]:
    """The status and body of the answer a py-consul exception stands for.

    py-consul raises ACLPermissionDenied (403), NotFound (404) and ACLDisabled (401) with the
    body alone, and every other failed answer as "<status> <body>"; its own complaints about
    an answer ("Failed to decode JSON: ...", "Missing index header: ...") have no status.
    """
    text = str(err)
    for cls, status, unsaid in ((consul.ACLPermissionDenied, 403, ""), (consul.NotFound, 404, "not found"),
                                (consul.ACLDisabled, 401, "ACL support is disabled")):
        if isinstance(err, cls):
            return status, text.strip() or unsaid
    head, _sep, body = text.partition(" ")
    if len(head) == 3 and head.isdigit():
        return int(head), body
    return None, text


#: Consul's words for a session it no longer knows (it expired or was invalidated). Acquiring
#: a lock with it, by ``PUT /v1/kv/<key>?acquire=`` (HTTP 500) or as a /v1/txn "lock" op (the
#: op's "What" in the 409 answer), says ``invalid session "<id>"`` (capitalised by old
#: releases, and behind "rpc error making call: " when a server forwarded it). Releasing with
#: it says nothing about the session: ``?release=`` answers false and a txn "unlock" op
#: "lock isn't held", as for a lock someone else holds.
_LOCK_WITH_UNKNOWN_SESSION = re.compile(r'\binvalid session "', re.IGNORECASE)
#: ``PUT /v1/session/renew/<id>`` of an unknown session: HTTP 404 with this body.
_RENEW_OF_UNKNOWN_SESSION = re.compile(r"Session id '[^']*' not found")


def answer_error(status: int | None, body: str, options: ConsulOptions, action: str) -> FireapConsulError:
    """The error for an answer Consul gave instead of a success, by ``status`` and ``body``.

    The one place that tells Consul's refusals apart: 403 is ConsulAccessDenied, a /v1/txn
    rollback (409 with the "Errors" list) ConsulTxnRefused, a session Consul no longer knows
    ConsulSessionInvalid (both for a rollback caused by one), anything else FireapConsulError
    with the status (None: not an HTTP answer of Consul's).
    """
    address = options.address
    body = body.strip()
    if status == 403:
        if options.token:
            who = "the ACL token lacks permission"
        else:
            who = "no ACL token was given and anonymous access lacks permission"
        detail = f" (Consul said: {body})" if body else ""
        message = (
            f"Consul refused the request (HTTP 403 Permission denied) at {address}: {who} for {action}; "
            f"set token or {ENV_TOKEN}{detail}"
        )
        return ConsulAccessDenied(_hide_token(message, options), status=403)
    failed = f"Consul request failed at {address} while {action}"
    errors = _txn_errors(body) if status == 409 else None
    if errors is not None:
        reasons = "; ".join(f"op {index}: {what}" for index, what in sorted(errors.items()))
        message = _hide_token(f"{failed}: the transaction was rolled back: {reasons}", options)
        if any(_LOCK_WITH_UNKNOWN_SESSION.search(what) for what in errors.values()):
            return ConsulTxnSessionInvalid(message, errors)
        return ConsulTxnRefused(message, errors)
    shown = f"HTTP {status}: {body or '(empty answer)'}" if status else body
    message = _hide_token(f"{failed}: {shown}", options)
    if (status == 500 and _LOCK_WITH_UNKNOWN_SESSION.search(body)) or (
        status == 404 and _RENEW_OF_UNKNOWN_SESSION.fullmatch(body)
    ):
        return ConsulSessionInvalid(message, status=status)
    return FireapConsulError(message, status=status)


def _txn_errors(body: str) -> dict[int, str] | None:
    """The "Errors" of a rolled back /v1/txn (``{"Errors": [{"OpIndex": i, "What": ...}]}``):
    op index -> Consul's reason; None when the body is not such an answer."""
    try:
        data = json.loads(body)
        errors = {int(item["OpIndex"]): str(item["What"]) for item in data["Errors"]}
    except (ValueError, TypeError, KeyError):
        return None
    return errors or None


def _hide_token(message: str, options: ConsulOptions) -> str:
    return message.replace(options.token, "<token>") if options.token else message


#: OpenSSL's words (upper case) when an agent that verifies clients got no certificate or refused
#: the one it got: an alert (TLS 1.3 names a missing one, TLS 1.2 says "handshake failure"), or,
#: in TLS 1.3, the connection closed before the alert was read (_DROPPED). And when the files
#: would not load.
_DROPPED = "EOF OCCURRED"
_CLIENT_CERT_REFUSED = ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE", "UNKNOWN_CA", "BAD_CERTIFICATE",
                        "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED", "ACCESS_DENIED", _DROPPED)
_CLIENT_CERT_UNLOADABLE = ("KEY_VALUES_MISMATCH", "PEM LIB", "PEM_LIB", "NO_START_LINE")


def _client_cert_hint(error: str, options: ConsulOptions) -> str:
    """What to do about a TLS error (OpenSSL's text, upper case) that may concern the client certificate."""
    if options.cert is not None and any(word in error for word in _CLIENT_CERT_UNLOADABLE):
        return (
            f" (cannot load the client certificate {options.client_cert!r} with the key {options.client_key!r}: "
            "both must be PEM files and the key must be the certificate's)"
        )
    if not any(word in error for word in _CLIENT_CERT_REFUSED):
        return ""
    if options.cert is None:
        return (
            " (the agent may require a client certificate, as Consul's verify_incoming does: set client_cert "
            f"and client_key, or {ENV_CLIENT_CERT} and {ENV_CLIENT_KEY})"
        )
    return (
        f" (the agent may have refused the client certificate {options.client_cert!r}: it must be valid and signed "
        "by a CA the agent trusts)"
    )


def _exception_chain(err: BaseException):
    """err and everything it wraps: urllib3's .reason, exception args, causes and contexts."""
    seen = set()
    pending = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [getattr(current, "reason", None), current.__cause__, current.__context__]
        linked.extend(arg for arg in current.args if isinstance(arg, BaseException))
        pending.extend(item for item in linked if isinstance(item, BaseException))


def _transport_reason(err: BaseException, options: ConsulOptions) -> str:
    chain = list(_exception_chain(err))
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError):
            if item.verify_code in _NAME_MISMATCH_CODES:
                hint = "connect by a host name or address the certificate lists"
            else:
                hint = f"set ca_path or {ENV_CACERT} to the CA that signed the agent's certificate"
            return f"TLS certificate verification failed ({item.verify_message.rstrip('.')}); {hint}"
    for item in chain:
        if isinstance(item, ssl.SSLError):
            text = item.reason or item.strerror or str(item)
            hint = ""
            if "WRONG_VERSION_NUMBER" in str(item).upper() or "RECORD_LAYER_FAILURE" in str(item).upper():
                hint = f" (the agent does not seem to speak HTTPS on this port: check scheme and {ENV_SSL})"
            return f"TLS error: {text}{hint or _client_cert_hint(str(item).upper(), options)}"
    for item in chain:
        if isinstance(item, socket.gaierror):
            return f"cannot resolve host {options.host!r} ({item.strerror})"
        if isinstance(item, ConnectionRefusedError):
            return "connection refused; is the agent running and listening there?"
    for item in chain:
        if isinstance(item, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
            return f"no answer within the timeout ({options.timeout:g} s, plus the wait of a blocking query)"
        # urllib3 files every failed connection (refused, unreachable) under ConnectTimeoutError.
        connect_timeout = isinstance(item, urllib3.exceptions.ConnectTimeoutError) and not isinstance(
            item, urllib3.exceptions.NewConnectionError
        )
        if connect_timeout or isinstance(item, requests.exceptions.ConnectTimeout):
            return f"no connection within {options.timeout:g} s"
    if options.scheme == "https":
        for item in chain:
            # http.client's RemoteDisconnected is one: TLS 1.3 ends the handshake before the agent
            # has checked the client certificate, and an agent that refuses it may just hang up.
            if isinstance(item, ConnectionResetError):
                return f"the agent closed the connection: {item}{_client_cert_hint(_DROPPED, options)}"
    for item in chain:
        if isinstance(item, OSError) and item.strerror:
            return item.strerror[0].lower() + item.strerror[1:]
    innermost = chain[-1]
    return f"{type(innermost).__name__}: {innermost}"
