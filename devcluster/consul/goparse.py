"""Go-compatible parsing of the inputs Consul reads with Go's standard library.

Consul parses `?wait=`, session TTLs and lock delays with `time.ParseDuration`,
and event filters with `regexp.Compile` (RE2 syntax).  Clients that work here
must work there, so the double accepts and rejects the same spellings.
"""

from __future__ import annotations

import json
import re

NANOSECOND = 1
MICROSECOND = 1_000
MILLISECOND = 1_000_000
SECOND = 1_000_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

_UNITS = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "\u00b5s": MICROSECOND,  # micro sign
    "\u03bcs": MICROSECOND,  # Greek mu
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}
_COMPONENT = re.compile(r"(\d*\.?\d*)([^\d.]*)")


class DurationError(ValueError):
    """A string Go's time.ParseDuration rejects; the message is Go's."""


def parse_duration(text: str) -> int:
    """Parse a Go duration string ("300ms", "1h30m", "-2s", "0") into nanoseconds."""
    quoted = go_quote(text)
    rest = text
    sign = 1
    if rest[:1] in ("-", "+"):
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise DurationError(f"time: invalid duration {quoted}")
    total = 0.0
    pos = 0
    while pos < len(rest):
        match = _COMPONENT.match(rest, pos)
        number, unit = match.group(1), match.group(2)
        if not number or number == ".":
            raise DurationError(f"time: invalid duration {quoted}")
        if not unit:
            raise DurationError(f"time: missing unit in duration {quoted}")
        if unit not in _UNITS:
            raise DurationError(f"time: unknown unit {go_quote(unit)} in duration {quoted}")
        total += float(number) * _UNITS[unit]
        pos = match.end()
    if total > 2**63 - 1:
        raise DurationError(f"time: invalid duration {quoted}")
    return sign * round(total)


def format_duration(nanos: int) -> str:
    """Format nanoseconds the way Go's Duration.String does ("1m30s", "1.5s", "0s")."""
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < SECOND:
        for unit, size in (("ms", MILLISECOND), ("\u00b5s", MICROSECOND), ("ns", NANOSECOND)):
            if nanos >= size:
                return sign + _trim(nanos / size) + unit
    hours, rest = divmod(nanos, HOUR)
    minutes, rest = divmod(rest, MINUTE)
    seconds = _trim(rest / SECOND) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def go_quote(text: str) -> str:
    """Quote a string as Go's %q verb does for printable text."""
    return json.dumps(text, ensure_ascii=False)


class RegexError(ValueError):
    """A pattern Go's regexp.Compile rejects; the message follows Go's wording."""


_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_UNSUPPORTED_GROUPS = ("(?=", "(?!", "(?<=", "(?<!", "(?>")
# Python's wording of common syntax errors -> Go's (regexp/syntax ErrorCode strings).
_GO_REGEX_ERRORS = {
    "unterminated character set": "missing closing ]",
    "missing ), unterminated subpattern": "missing closing )",
    "unbalanced parenthesis": "unexpected )",
    "nothing to repeat": "missing argument to repetition operator",
    "multiple repeat": "invalid nested repetition operator",
    "bad character range": "invalid character class range",
}


def compile_go_regex(pattern: str) -> re.Pattern[str]:
    """Compile an RE2 (Go regexp) pattern into an equivalent Python pattern.

    Only what a Consul event filter can reasonably use is translated: `\\z`,
    `(?<name>...)`, `\\Q...\\E` and POSIX bracket classes; Perl features RE2
    refuses (look-around, back-references, atomic groups) are refused too.
    """
    for group in _UNSUPPORTED_GROUPS:
        if group in pattern:
            raise RegexError(f"error parsing regexp: invalid or unsupported Perl syntax: `{group}`")
    out: list[str] = []
    i = 0
    in_class = False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt == "Q" and not in_class:
                end = pattern.find("\\E", i + 2)
                literal = pattern[i + 2 :] if end < 0 else pattern[i + 2 : end]
                out.append(re.escape(literal))
                i = len(pattern) if end < 0 else end + 2
                continue
            if nxt.isdigit() and nxt != "0" and not in_class:
                raise RegexError(f"error parsing regexp: invalid escape sequence: `\\{nxt}`")
            out.append("\\Z" if nxt == "z" and not in_class else ch + nxt)
            i += 2
            continue
        if in_class:
            if pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                name = pattern[i + 2 : end] if end > 0 else ""
                negated = name.startswith("^")
                if negated:
                    name = name[1:]
                if end > 0 and negated:
                    raise RegexError(
                        f"error parsing regexp: negated class `{pattern[i : end + 2]}` is not supported by devcluster"
                    )
                if name in _POSIX_CLASSES:
                    out.append(_POSIX_CLASSES[name])
                    i = end + 2
                    continue
                if end > 0:
                    raise RegexError(f"error parsing regexp: invalid character class range: `{pattern[i : end + 2]}`")
            if ch == "]" and not (out and out[-1] in ("[", "[^")):
                in_class = False
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = True
            if pattern.startswith("[^", i):
                out.append("[^")
                i += 2
            else:
                out.append("[")
                i += 1
            if i < len(pattern) and pattern[i] == "]":
                out.append("\\]")
                i += 1
            continue
        if pattern.startswith("(?<", i):
            out.append("(?P<")
            i += 3
            continue
        out.append(ch)
        i += 1
    try:
        return re.compile("".join(out))
    except re.error as err:
        message = _GO_REGEX_ERRORS.get(err.msg, err.msg)
        raise RegexError(f"error parsing regexp: {message}: `{pattern}`") from None
