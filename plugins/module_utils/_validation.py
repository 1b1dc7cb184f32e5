"""The rules of every value fireap writes to Consul and reads back from it.

Whoever can write KV under the prefix, or fire a user event, can put any value there, so a
value read from Consul is untrusted input. The leader checks what it writes by these rules
and every node checks what it reads by the very same ones. They are strict enough that an
accepted value is inert wherever it goes:

* names (apps, nodes), run IDs and versions start with a letter, a digit (or ``_`` for
  names) and contain no whitespace, quote, shell metacharacter, ``/`` or control character:
  no command can take one for an option, and no shell or path can give one a meaning;
* an address is an IP literal (no zone) or a host name of DNS labels;
* numbers have the leader's bounds (fan-out 1..64), so nothing a node allocates grows with
  a number read from Consul;
* free text (a failure's error, an abort reason) has a length bound and is never put into
  a command; :func:`show` makes any value safe to put into a message or a log line.

Stdlib only: nodes import this without Ansible.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from ansible_collections.fireap.consul.plugins.module_utils._errors import InvalidValue

NAME_MAX_LENGTH = 128
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
VERSION_MAX_LENGTH = 64
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
RUN_ID_MAX_LENGTH = 64
ADDRESS_MAX_LENGTH = 253
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")

FANOUT_MIN = 1
FANOUT_MAX = 64
#: Most nodes one release may target; Consul's sizing guides stop near 5,000 per datacenter.
TARGETS_MAX = 100_000
#: Most stages a plan can have: ceil(log2(TARGETS_MAX)) + 1 at fan-out 1, with room.
STAGE_MAX = 64

#: A node's failure text (the failed command and its output tail) as recorded in KV.
ERROR_MAX_LENGTH = 8192
#: An abort reason, a lock holder, an event filter.
LINE_MAX_LENGTH = 1024

#: How much of a rejected value an error message shows.
SHOWN_MAX_LENGTH = 80
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def show(value: Any, limit: int = SHOWN_MAX_LENGTH) -> str:
    """``repr(value)`` cut to ``limit`` characters: safe in a message and a log line,
    whatever the value holds (repr escapes newlines and control characters)."""
    text = repr(value)
    if len(text) > limit:
        return f"{text[:limit]}... ({len(text)} characters)"
    return text


def escape_controls(text: str) -> str:
    """``text`` with every control character (newline included) written as an escape."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def clip(text: str, limit: int = ERROR_MAX_LENGTH) -> str:
    """``text`` cut to at most ``limit`` characters, saying so at the end when it was cut."""
    if len(text) <= limit:
        return text
    marker = f"... [cut: {len(text)} characters in all]"
    return text[: limit - len(marker)] + marker


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidValue(f"{what} must be a non-empty string, got {show(value)}")
    return value


def check_name(value: Any, what: str) -> str:
    """Return ``value`` if it can name an app or a node (one KV key segment, one shell word,
    never an option); ``what`` names it in the error."""
    _text(value, f"{what} name")
    if len(value) > NAME_MAX_LENGTH:
        raise InvalidValue(f"{what} name {show(value)} has {len(value)} characters; at most {NAME_MAX_LENGTH}")
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidValue(
            f"{what} name {show(value)} may only contain letters, digits, '_', '.' and '-', "
            "and must start with a letter, a digit or '_'"
        )
    if ".." in value:
        raise InvalidValue(f"{what} name {show(value)} must not contain '..'")
    return value


def check_version(value: Any) -> str:
    """Return ``value`` if it can be released: 1..64 of letters, digits and ``._+~-``,
    starting with a letter or digit (``1.4.2``, ``v7``, ``2.0-rc1``, ``1.0+build.5``)."""
    _text(value, "version")
    if len(value) > VERSION_MAX_LENGTH:
        raise InvalidValue(f"version {show(value)} has {len(value)} characters; at most {VERSION_MAX_LENGTH}")
    if not VERSION_PATTERN.fullmatch(value):
        raise InvalidValue(
            f"version {show(value)} may only contain letters, digits and '._+~-', and must start with a letter "
            "or a digit"
        )
    return value


#: A build's checksum as the leader records it: the algorithm, then the lowercase hex digest.
CHECKSUM_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


def _matching(value: Any, what: str, pattern: re.Pattern[str], rule: str) -> str:
    """Return ``value`` if it is a string that ``pattern`` matches whole; else ``what`` must be ``rule``."""
    _text(value, what)
    if not pattern.fullmatch(value):
        raise InvalidValue(f"{what} {show(value)} must be {rule}")
    return value


def check_checksum(value: Any) -> str:
    """Return ``value`` if it is ``sha256:`` and 64 lowercase hex digits (safe in any command)."""
    return _matching(value, "checksum", CHECKSUM_PATTERN, "'sha256:' followed by 64 lowercase hex digits")


def check_run_id(value: Any) -> str:
    """Return ``value`` if it can identify a run (fireap_fire makes them as UUID hex)."""
    _text(value, "run id")
    if len(value) > RUN_ID_MAX_LENGTH or not NAME_PATTERN.fullmatch(value):
        raise InvalidValue(
            f"run id {show(value)} must be 1..{RUN_ID_MAX_LENGTH} letters, digits, '_', '.' or '-', "
            "starting with a letter, a digit or '_'"
        )
    return value


def check_address(value: Any, what: str = "address") -> str:
    """Return ``value`` if it is a node address: an IPv4 or IPv6 literal without a zone, or a
    host name of DNS labels (letters, digits, '-', '_'; no label starts or ends with '-')."""
    _text(value, what)
    if len(value) > ADDRESS_MAX_LENGTH:
        raise InvalidValue(f"{what} {show(value)} has {len(value)} characters; at most {ADDRESS_MAX_LENGTH}")
    if "%" not in value:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            return value
    if not all(_HOST_LABEL.fullmatch(label) for label in value.split(".")):
        raise InvalidValue(f"{what} {show(value)} is neither an IP address nor a host name")
    return value


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """Return ``value`` if it is an integer (not a bool) within ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidValue(f"{what} must be an integer from {low} to {high}, got {show(value)}")
    return value


def check_fanout(value: Any) -> int:
    """Return ``value`` if it is a fan-out k: pullers one source serves at once."""
    return check_int(value, "fanout", FANOUT_MIN, FANOUT_MAX)


#: The last second of year 9999 (UTC): a later time cannot be shown as a date, and no record
#: of a release holds one; a larger value from KV is refused rather than carried to a formatter.
TIME_MAX = 253402300799.0


def check_time(value: Any, what: str) -> float:
    """Return ``value`` as float epoch seconds if it is a number within 0..TIME_MAX."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValue(f"{what} must be a number of epoch seconds, got {show(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise InvalidValue(f"{what} must be a number of epoch seconds within 0..{TIME_MAX:.0f} (year 9999), "
                           f"got {show(value)}") from None
    if not math.isfinite(value) or not 0 <= value <= TIME_MAX:
        raise InvalidValue(f"{what} must be a number of epoch seconds within 0..{TIME_MAX:.0f} (year 9999), "
                           f"got {show(value)}")
    return value


def check_text(value: Any, what: str, limit: int, *, lines: bool = False) -> str:
    """Return ``value`` if it is a string of at most ``limit`` characters without control
    characters (``lines``: newlines and tabs allowed)."""
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a string, got {show(value)}")
    if len(value) > limit:
        raise InvalidValue(f"{what} has {len(value)} characters; at most {limit}")
    allowed = value.replace("\n", "").replace("\t", "") if lines else value
    if _CONTROL.search(allowed):
        raise InvalidValue(f"{what} {show(value)} must not contain control characters")
    return value


# --- an app's artifact: one file that the swarm delivers (see _swarm) ---

#: Smallest and largest piece of an artifact's torrent: a power of two in this range.
PIECE_MIN = 64 * 1024
PIECE_MAX = 16 * 1024 * 1024
#: Most pieces of one artifact: its metadata holds 20 bytes per piece (about 80 KB at most).
PIECES_MAX = 4096
#: Largest artifact: PIECES_MAX pieces of PIECE_MAX bytes (64 GiB).
ARTIFACT_MAX = PIECES_MAX * PIECE_MAX
#: Longest artifact path template.
ARTIFACT_PATH_MAX_LENGTH = 1024
INFO_HASH_PATTERN = re.compile(r"[0-9a-f]{40}")
_ARTIFACT_PLACEHOLDER = re.compile(r"\{\{\s*(app|version)\s*\}\}")


def check_artifact_length(value: Any) -> int:
    """Return ``value`` if it is an artifact's size in bytes: 1..ARTIFACT_MAX."""
    return check_int(value, "artifact size", 1, ARTIFACT_MAX)


def check_info_hash(value: Any) -> str:
    """Return ``value`` if it is a v1 torrent info-hash: 40 lowercase hex digits."""
    return _matching(value, "info-hash", INFO_HASH_PATTERN, "40 lowercase hex digits")


def check_artifact_name(value: Any) -> str:
    """Return ``value`` if it can name an artifact's file in its directory: one path component
    (no ``/``, not ``.`` or ``..``), printable, at most 255 bytes; no path built from it leaves
    the directory."""
    if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value
            or not value.isprintable() or len(value.encode("utf-8")) > 255):
        raise InvalidValue(f"artifact name {show(value)} must be one path component (no '/', not '.' or '..', "
                           "printable, at most 255 bytes)")
    return value


def check_artifact_path(value: Any) -> str:
    """Return ``value`` if it is an artifact's path template: absolute, printable, without ``.``
    or ``..`` components, ``{{ app }}`` and ``{{ version }}`` in the file name only (every node
    renders the same directory, whatever the release says) and no other placeholder."""
    _text(value, "artifact path")
    if len(value) > ARTIFACT_PATH_MAX_LENGTH or not value.startswith("/") or not value.isprintable():
        raise InvalidValue(f"artifact path {show(value)} must be an absolute path of at most "
                           f"{ARTIFACT_PATH_MAX_LENGTH} printable characters")
    directory, _slash, name = value.rpartition("/")
    if any(part in (".", "..") for part in value.split("/")) or "//" in value:
        raise InvalidValue(f"artifact path {show(value)} must not have empty, '.' or '..' components")
    if "{" in directory or "}" in directory:
        raise InvalidValue(f"artifact path {show(value)}: placeholders may stand in the file name only")
    literal = _ARTIFACT_PLACEHOLDER.sub("", name)
    if "{" in literal or "}" in literal:
        raise InvalidValue(f"artifact path {show(value)}: the file name may use only {{{{ app }}}} and "
                           "{{ version }}")
    check_artifact_name(_ARTIFACT_PLACEHOLDER.sub("x", name))
    return value


def artifact_path(template: str, app: str, version: str) -> str:
    """The artifact's path for ``app`` at ``version``: names and versions hold no ``/`` and do not
    start with ``.``, so the file stays in the template's directory."""
    values = {"app": check_name(app, "app"), "version": check_version(version)}
    path = _ARTIFACT_PLACEHOLDER.sub(lambda match: values[match.group(1)], check_artifact_path(template))
    check_artifact_name(path.rpartition("/")[2])
    return path


# --- the swarm's peers: catalog IP literals and the ports the nodes advertise ---

#: Most neighbours of one node in a run's swarm (see ``_propagation.swarm_neighbours``).
SWARM_PEERS_MAX = 8
#: The port a node's swarm listens on when the app's artifact names none, and the range of ports
#: an app's ``artifact.port`` may name (no privileged port: the handler does not run as root).
DEFAULT_SWARM_PORT = 6881
SWARM_PORT_MIN = 1024


def check_ip(value: Any) -> str:
    """Return ``value`` normalised if it is the unicast IPv4 or IPv6 literal of one host, without a
    zone: a catalog address a node's swarm may listen on or connect to (never a host name, which
    a resolver could send anywhere, nor ``0.0.0.0``/``::``, which would listen on every interface,
    nor a multicast, broadcast, reserved or IPv4-mapped address, which is no one node)."""
    rule = "must be the unicast IP address of one node"
    if not isinstance(value, str) or "%" in value:
        raise InvalidValue(f"peer address {show(value)} {rule}")
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidValue(f"peer address {show(value)} {rule}") from None
    if (parsed.is_unspecified or parsed.is_multicast or parsed.is_reserved
            or (isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None)):
        raise InvalidValue(f"peer address {show(value)} {rule}")
    return str(parsed)


def check_swarm_port(value: Any) -> int:
    """Return ``value`` if it is a port a node's swarm may listen on: SWARM_PORT_MIN..65535."""
    return check_int(value, "swarm port", SWARM_PORT_MIN, 65535)


def endpoint(address: str, port: int) -> str:
    """``ADDR:PORT`` (IPv6 in brackets), as a plan entry lists a neighbour and libtorrent listens."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def check_endpoint(value: Any) -> tuple[str, int]:
    """``(ip, port)`` of ``value`` if it is exactly ``endpoint(ip, port)`` of a normalised IP
    literal and a swarm port (so one peer has one spelling)."""
    _text(value, "swarm peer")
    address, _colon, port = value.rpartition(":")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not port.isdigit() or len(port) > 5:
        raise InvalidValue(f"swarm peer {show(value)} must be ADDRESS:PORT")
    parsed = check_ip(address), check_swarm_port(int(port))
    if endpoint(*parsed) != value:
        raise InvalidValue(f"swarm peer {show(value)} must be written {endpoint(*parsed)}")
    return parsed


def check_peers(value: Any) -> tuple[str, ...]:
    """Return ``value`` as a tuple if it lists at most SWARM_PEERS_MAX distinct endpoints."""
    if not isinstance(value, (list, tuple)) or len(value) > SWARM_PEERS_MAX:
        raise InvalidValue(f"swarm peers must be a list of at most {SWARM_PEERS_MAX} ADDRESS:PORT, got {show(value)}")
    for item in value:
        check_endpoint(item)
    if len(set(value)) != len(value):
        raise InvalidValue(f"swarm peers {show(value)} must not repeat")
    return tuple(value)
