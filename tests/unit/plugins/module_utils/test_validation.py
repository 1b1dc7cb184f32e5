"""The one set of rules for every value written to Consul and read back from it (_validation).

The leader checks what it writes by these rules and every node checks what it reads by the
very same functions: the last tests here pin that sharing down.
"""

from __future__ import annotations

import math
import re
import time

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import (
    _commands,
    _firing,
    _kv,
    _propagation,
    _task_event,
    _taskconfig,
    _validation,
    _worker,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    ADDRESS_MAX_LENGTH,
    ERROR_MAX_LENGTH,
    FANOUT_MAX,
    FANOUT_MIN,
    NAME_MAX_LENGTH,
    RUN_ID_MAX_LENGTH,
    SHOWN_MAX_LENGTH,
    VERSION_MAX_LENGTH,
    check_address,
    check_fanout,
    check_int,
    check_name,
    check_run_id,
    check_text,
    check_time,
    check_version,
    clip,
    escape_controls,
    show,
)

#: Every character the rules count as a control character.
CONTROLS = [chr(code) for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)]

#: Characters some shell acts on (or a path gives a meaning): none may be in a name or version.
SHELL_CHARACTERS = list(" \t\n;&|<>()$`\\\"'*?[]{}!#=%^,@/:") + ["\x00"]

NOT_STRINGS = [None, 5, 1.5, True, b"bytes", ["a"], {"a": 1}]


def no_raw_controls(text: str) -> bool:
    return not any(char in text for char in CONTROLS)


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "web", "_x", "9", "node-1.example.com", "Az09_.-x", "x-", "x.", "x" * NAME_MAX_LENGTH])
def test_check_name_accepts(name):
    assert check_name(name, "node") == name


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "node name must be a non-empty string, got ''"),
        ("-x", "must start with a letter, a digit or '_'"),
        ("-oProxyCommand=touch", "must start with a letter, a digit or '_'"),
        (".x", "must start with a letter, a digit or '_'"),
        (".", "must start with a letter, a digit or '_'"),
        ("..", "must start with a letter, a digit or '_'"),
        ("a..b", "must not contain '..'"),
        ("a/b", "may only contain letters, digits, '_', '.' and '-'"),
        ("~root", "must start with a letter, a digit or '_'"),
        ("a~b", "may only contain letters, digits, '_', '.' and '-'"),
        ("é", "may only contain letters"),
        ("١٢", "may only contain letters"),
        ("x" * (NAME_MAX_LENGTH + 1), f"has {NAME_MAX_LENGTH + 1} characters; at most {NAME_MAX_LENGTH}"),
    ],
)
def test_check_name_refuses(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_name(name, "node")


@pytest.mark.parametrize("char", SHELL_CHARACTERS + CONTROLS)
def test_no_shell_or_control_character_is_in_a_name(char):
    for name in (f"a{char}b", f"ab{char}", f"{char}ab"):
        with pytest.raises(ValueError, match="node name"):
            check_name(name, "node")


@pytest.mark.parametrize("value", NOT_STRINGS)
def test_a_name_must_be_a_string(value):
    with pytest.raises(ValueError, match="app name must be a non-empty string"):
        check_name(value, "app")


# --- versions and run IDs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", ["1", "1.4.2", "v7", "2.0-rc1", "1.0+build.5", "1.0~rc1", "2024.11.26-build.1234+g1a2b3c", "v" * 64]
)
def test_check_version_accepts(version):
    assert check_version(version) == version


@pytest.mark.parametrize(
    "version, message",
    [
        ("", "version must be a non-empty string, got ''"),
        ("-1", "must start with a letter or a digit"),
        ("--help", "must start with a letter or a digit"),
        ("+1", "must start with a letter or a digit"),
        ("~1", "must start with a letter or a digit"),
        (".1", "must start with a letter or a digit"),
        ("_1", "must start with a letter or a digit"),
        ("$(touch${IFS}/tmp/x)", "may only contain letters, digits and '._+~-'"),
        ("1`id`", "may only contain letters, digits and '._+~-'"),
        ("1.0\nFORGED", "may only contain letters, digits and '._+~-'"),
        ("1.0/../x", "may only contain letters, digits and '._+~-'"),
        ("v" * (VERSION_MAX_LENGTH + 1), f"has {VERSION_MAX_LENGTH + 1} characters; at most {VERSION_MAX_LENGTH}"),
        ("1" * 10240, "has 10240 characters; at most 64"),
    ],
)
def test_check_version_refuses(version, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_version(version)


@pytest.mark.parametrize("char", SHELL_CHARACTERS + CONTROLS)
def test_no_shell_or_control_character_is_in_a_version(char):
    for version in (f"1{char}0", f"10{char}", f"{char}10"):
        with pytest.raises(ValueError, match="version"):
            check_version(version)


@pytest.mark.parametrize("value", NOT_STRINGS)
def test_a_version_must_be_a_string(value):
    with pytest.raises(ValueError, match="version must be a non-empty string"):
        check_version(value)


@pytest.mark.parametrize("run_id", ["run-1", "0123456789abcdef0123456789abcdef", "_r", "r" * RUN_ID_MAX_LENGTH])
def test_check_run_id_accepts(run_id):
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", ["-r", ".r", "r r", "r\n", "r;id", "$(id)", "r" * (RUN_ID_MAX_LENGTH + 1), "é"])
def test_check_run_id_refuses(run_id):
    with pytest.raises(ValueError, match="run id"):
        check_run_id(run_id)


@pytest.mark.parametrize("value", NOT_STRINGS + [""])
def test_a_run_id_must_be_a_non_empty_string(value):
    with pytest.raises(ValueError, match="run id must be a non-empty string"):
        check_run_id(value)


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "192.0.2.7",
        "::1",
        "2001:db8::1",
        "::ffff:192.0.2.1",
        "host",
        "host-1.example.com",
        "a_b.example",
        "1e100",
        "x" * 63,
        ".".join(["x" * 63] * 3) + "." + "x" * 61,
    ],
)
def test_check_address_accepts(address):
    assert check_address(address) == address


@pytest.mark.parametrize(
    "address",
    [
        "-oProxyCommand=touch /tmp/x",
        "-oProxyCommand=touch${IFS}/tmp/x",
        "-host",
        "host-",
        "a.-b",
        "a..b",
        ".host",
        "host.example.",
        "fe80::1%eth0",
        "[::1]",
        "host:22",
        "user@host",
        "a b",
        "a;b",
        "$(id)",
        "`id`",
        "host\n",
        "host\x00",
        "x" * 64,
        "x." * 127,
        ".".join(["x" * 63] * 4),
    ],
)
def test_check_address_refuses(address):
    with pytest.raises(ValueError, match="address"):
        check_address(address)


def test_check_address_bounds_the_length_and_names_the_value():
    with pytest.raises(ValueError, match=f"has {ADDRESS_MAX_LENGTH + 1} characters; at most {ADDRESS_MAX_LENGTH}"):
        check_address("a" * (ADDRESS_MAX_LENGTH + 1), "source address")
    with pytest.raises(ValueError, match=re.escape("source address '-x' is neither an IP address nor a host name")):
        check_address("-x", "source address")


@pytest.mark.parametrize("value", NOT_STRINGS + [""])
def test_an_address_must_be_a_non_empty_string(value):
    with pytest.raises(ValueError, match="address must be a non-empty string"):
        check_address(value)


# --- numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fanout", [FANOUT_MIN, 2, 5, FANOUT_MAX])
def test_check_fanout_accepts(fanout):
    assert check_fanout(fanout) == fanout


@pytest.mark.parametrize("fanout", [0, -1, FANOUT_MAX + 1, 10**12, 10**400, True, False, 1.0, "5", None, math.inf])
def test_check_fanout_refuses(fanout):
    with pytest.raises(ValueError, match=f"fanout must be an integer from {FANOUT_MIN} to {FANOUT_MAX}, got "):
        check_fanout(fanout)


def test_check_int_refuses_bools_and_bounds():
    assert check_int(0, "slot", 0, 63) == 0 and check_int(63, "slot", 0, 63) == 63
    for value in (True, False, -1, 64, 2.0, "1", None, 10**100):
        with pytest.raises(ValueError, match="slot must be an integer from 0 to 63"):
            check_int(value, "slot", 0, 63)


@pytest.mark.parametrize("value, expected", [(0, 0.0), (1, 1.0), (1700000000.5, 1700000000.5),
                                             (253402300799, 253402300799.0)])
def test_check_time_accepts(value, expected):
    result = check_time(value, "started")
    assert result == expected and isinstance(result, float)


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, math.inf, -math.inf, True, "1", None, [1], 253402300800, 1e300])
def test_check_time_refuses(value):
    with pytest.raises(ValueError, match="started must be"):
        check_time(value, "started")


def test_check_time_refuses_an_integer_too_large_for_a_float():
    with pytest.raises(ValueError, match="started must be"):
        check_time(10**400, "started")


# --- text and messages ------------------------------------------------------------------------------


def test_check_text_bounds_the_length_and_refuses_control_characters():
    assert check_text("-rf; $(id) `x` 'q'", "reason", 100) == "-rf; $(id) `x` 'q'"  # text: never in a command
    assert check_text("", "reason", 10) == ""
    with pytest.raises(ValueError, match="reason has 11 characters; at most 10"):
        check_text("x" * 11, "reason", 10)
    for char in CONTROLS:
        with pytest.raises(ValueError, match="must not contain control characters"):
            check_text(f"a{char}b", "reason", 10)
    for value in NOT_STRINGS:
        with pytest.raises(ValueError, match="reason must be a string"):
            check_text(value, "reason", 10)


def test_check_text_with_lines_allows_only_newlines_and_tabs():
    assert check_text("line 1\n\tline 2", "error", 100, lines=True) == "line 1\n\tline 2"
    for char in CONTROLS:
        if char in "\n\t":
            continue
        with pytest.raises(ValueError, match="must not contain control characters"):
            check_text(f"a{char}b", "error", 100, lines=True)


@pytest.mark.parametrize("value", ["1.0\nFORGED LINE", "\x1b[31mred", "x" * 10000, "\u2028", 10**1000, {"a": "\n" * 50}])
def test_show_is_one_bounded_line(value):
    shown = show(value)
    assert no_raw_controls(shown)
    assert len(shown) <= SHOWN_MAX_LENGTH + len(f"... ({len(repr(value))} characters)")
    if len(repr(value)) > SHOWN_MAX_LENGTH:
        assert shown.endswith(f"... ({len(repr(value))} characters)")
    else:
        assert shown == repr(value)


def test_escape_controls_escapes_every_control_character_and_nothing_else():
    text = "".join(CONTROLS)
    escaped = escape_controls(text)
    assert no_raw_controls(escaped)
    assert escaped.startswith("\\x00\\x01") and "\\n" in escaped and "\\x1b" in escaped and "\\u2028" in escaped
    plain = "plain text: -rf $(id) `x` é ü 漢字"
    assert escape_controls(plain) == plain


def test_clip_cuts_to_the_limit_and_says_so():
    assert clip("short", 10) == "short"
    assert clip("x" * 10, 10) == "x" * 10
    clipped = clip("x" * 100000, 200)
    assert len(clipped) == 200
    assert clipped.endswith("... [cut: 100000 characters in all]")
    assert len(clip("y" * (ERROR_MAX_LENGTH * 3))) == ERROR_MAX_LENGTH


# --- one set of rules: leader, node records, commands, config, event -------------------------------


def test_every_writer_and_reader_uses_these_very_rules():
    assert _firing.check_version is check_version
    assert _firing.check_fanout is check_fanout
    assert _firing.check_name is check_name
    assert _propagation.check_fanout is check_fanout
    assert _kv.check_name is check_name and _kv.check_version is check_version and _kv.check_address is check_address
    assert _task_event.check_version is check_version
    assert _worker.check_address is check_address
    assert _commands.check_name is check_name and _commands.check_version is check_version
    assert _commands.check_address is check_address
    assert _taskconfig.check_name is check_name


def test_the_leader_and_the_node_bound_the_fanout_alike():
    """fire() caps fan-out at FANOUT_MAX; a node's max_semaphores has the same bound."""
    assert _validation.FANOUT_MAX == 64
    config = _taskconfig.parse_config({"apps": {"web": {"exec_commands": ["true"], "max_semaphores": FANOUT_MAX}}})
    assert config.app("web").max_semaphores == FANOUT_MAX
    with pytest.raises(_taskconfig.ConfigError, match=f"max_semaphores.*{FANOUT_MAX}"):
        _taskconfig.parse_config({"apps": {"web": {"exec_commands": ["true"], "max_semaphores": FANOUT_MAX + 1}}})
    with pytest.raises(ValueError, match="fanout must be an integer from 1 to 64, got 65"):
        _firing.fire(object(), _kv.Schema(), "web", "1.0", fanout=65)


def test_every_time_check_time_accepts_can_be_shown_as_a_date():
    """The report and the monitor format record times without guarding: the bound is the
    last second a date can show."""
    assert time.strftime("%Y", time.gmtime(check_time(253402300799, "started"))) == "9999"


@pytest.mark.parametrize("template, app, version, expected", [
    ("/srv/builds/{{ app }}-{{ version }}.tar.gz", "web", "1.4.2", "/srv/builds/web-1.4.2.tar.gz"),
    ("/srv/builds/{{app}}_{{version}}", "web", "v7", "/srv/builds/web_v7"),
    ("/srv/builds/fixed.tar.gz", "web", "1", "/srv/builds/fixed.tar.gz"),
])
def test_an_artifact_path_template_is_rendered_in_its_file_name(template, app, version, expected):
    assert _validation.artifact_path(template, app, version) == expected


@pytest.mark.parametrize("template, message", [
    ("builds/{{ app }}.tar.gz", "must be an absolute path"),
    ("/srv/{{ app }}/build.tar.gz", "in the file name only"),
    ("/srv/../etc/{{ app }}", r"'\.\.' components"),
    ("/srv/./{{ app }}", r"'\.\.' components"),
    ("/srv//{{ app }}", r"'\.\.' components"),
    ("/srv/{{ node }}.tar.gz", r"only \{\{ app \}\} and \{\{ version \}\}"),
    ("/srv/{{ app | upper }}", r"only \{\{ app \}\} and \{\{ version \}\}"),
    ("/srv/builds/", "one path component"),
    ("/srv/\nx", "printable"),
    ("/" + "a" * 1024, "at most 1024"),
])
def test_an_artifact_path_template_that_could_leave_its_directory_is_refused(template, message):
    with pytest.raises(ValueError, match=message):
        _validation.check_artifact_path(template)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "a\nb", "a" * 256, 7])
def test_an_artifact_name_is_one_path_component(name):
    with pytest.raises(ValueError, match="one path component"):
        _validation.check_artifact_name(name)


def test_an_info_hash_is_40_lowercase_hex_digits():
    assert _validation.check_info_hash("0123456789abcdef0123456789abcdef01234567")
    for value in ("0123456789ABCDEF0123456789abcdef01234567", "0" * 39, "0" * 41, "", None, "g" * 40):
        with pytest.raises(ValueError):
            _validation.check_info_hash(value)
