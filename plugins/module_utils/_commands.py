"""Command templates and the command runner of an app's task.

Templates
---------
A command is a ``/bin/sh`` command line in which ``{{ name }}`` is replaced by a value.
The variables are exactly:

``app``             the app name
``version``         the version being released
``node``            this node's name
``remote.name``     the source node's name (the node this one pulls from)
``remote.address``  the source node's address
``artifact``        the local path of the app's artifact, once the swarm delivered and verified
                    it (apps with an ``artifact`` only; they have no single source, so no
                    ``remote.*``)
``checksum``        the release's build checksum (``sha256:`` and 64 lowercase hex digits),
                    in ``verify_commands`` only

Whitespace inside the braces is allowed (``{{app}}``, ``{{ app }}``). Nothing else of
Jinja is: filters (``|``), expressions, statements (``{% ... %}``) and comments
(``{# ... #}``) are refused, as is a name outside the list above.

Values are checked before anything is rendered (``CommandVariables``): names, versions and
addresses follow the rules they obey in Consul (``_validation``), so none can start with
``-`` (no command takes one for an option) or hold whitespace, a quote or a character any
shell acts on. On top of that, every value is inserted as one shell word quoted with
:func:`shlex.quote`. Values are already quoted: write ``/opt/{{ app }}/`` and never
``"/opt/{{ app }}/"``.

A variable may stand only where its quoted word stays a plain argument. Templates that put
one where the shell or the command parses a word again are refused when the config is
loaded: inside quotes, after a backslash, in a here-document body, inside backquotes,
``$(( ))``, ``(( ))``, ``[[ ]]`` or ``${...}``; as an argument of ``eval``, ``let``,
``trap``, ``alias``, ``.``/``source``, ``parallel``, ``watch`` or ``awk``; in the command
line of a shell or interpreter given program text (``sh -c``, ``bash -lc``, ``su -c``,
``sudo -s``, ``python -c``, ``perl -e``, ...); and after the destination of ``ssh`` (the
remote shell parses its command again). ``$(...)`` is a plain context of its own.

Verify paths
------------
An app's ``verify_file`` is a path template: an absolute path in which ``{{ app }}``,
``{{ version }}`` and ``{{ node }}`` (:data:`PATH_VARIABLES`) are replaced by their values as
they are, with no quoting: no shell reads it. Those values hold no ``/`` and start with a
letter, digit or ``_``, so each stays inside the path component it stands in and none can
make a ``..`` component.

Runner
------
Each command runs as ``/bin/sh -c <command>`` in a session (and process group) of its own,
stdin from ``/dev/null``, with the handler's environment less every Consul credential
(``command_environment``), stdout and stderr captured together; only the last
:data:`OUTPUT_TAIL_BYTES` are kept. A command that outlives its timeout has its whole
process group sent SIGTERM, then SIGKILL after a short grace. Processes that a command
leaves running in the background after it exits successfully are not touched; they must
not keep the command's stdout/stderr open, since that pipe is closed once the command
exits.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError, InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._integrity import file_mismatch, verification_problem
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    check_address,
    check_artifact_path,
    check_checksum,
    check_name,
    check_version,
)

#: The variable of an app with an artifact: its local path. Such an app has no single source.
ARTIFACT_VARIABLE = "artifact"
SOURCE_VARIABLES = ("remote.name", "remote.address")
VARIABLES = ("app", "version", "node") + SOURCE_VARIABLES + (ARTIFACT_VARIABLE,)
#: The variable only verify_commands may use: the release's checksum.
CHECKSUM_VARIABLE = "checksum"
VERIFY_VARIABLES = VARIABLES + (CHECKSUM_VARIABLE,)
#: The variables of a verify_file path, all known before the pull.
PATH_VARIABLES = ("app", "version", "node")
#: The command lists of an app, in the order they run; verify_file is checked before verify_commands.
PHASES = ("before_commands", "exec_commands", "verify_commands", "after_commands")
VERIFY_PHASE = "verify_commands"
#: The label of the verify_file step in results, logs and --dry-run output.
VERIFY_FILE_LABEL = "verify_file"
ON_FAILURE_CHOICES = ("abort", "ignore")

OUTPUT_TAIL_BYTES = 4096
KILL_GRACE = 5.0
SHELL = "/bin/sh"

# How often a running command is checked for exit while something still holds its
# output pipe open (a normal exit is noticed at once through end-of-file).
_POLL_INTERVAL = 0.1
_READ_SIZE = 65536
# Most output read after the command exited while a background process keeps writing.
_DRAIN_LIMIT = 1 << 20

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
# Characters after which '#' starts a shell comment.
_WORD_BREAK = " \t\n;&|()<>"

# Consul's credential variables (CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_AUTH,
# CONSUL_CLIENT_KEY, CONSUL_CLIENT_CERT, ...) and any other CONSUL_* naming a secret.
_CREDENTIAL = re.compile(r"CONSUL_\w*(TOKEN|AUTH|KEY|CERT|SECRET|PASSWORD|LICENSE)", re.IGNORECASE)

_log = logging.getLogger(__name__)


class TemplateError(FireapError):
    """A command template that cannot be rendered safely."""


@dataclass(frozen=True)
class CommandVariables:
    """The values a command template may use (see the module docstring), each checked by
    the rule it obeys in Consul (``_validation``): none can start with ``-`` or hold a
    character any shell would act on, whatever KV or the event said."""

    app: str
    version: str
    node: str
    remote_name: Optional[str] = None  # the source's; None for an app with an artifact (no one source)
    remote_address: Optional[str] = None
    checksum: Optional[str] = None  # the release's, None when it carries none
    artifact: Optional[str] = None  # the artifact's local path, None for an app without one

    def __post_init__(self) -> None:
        check_name(self.app, "app")
        check_version(self.version)
        check_name(self.node, "node")
        if self.remote_name is not None or self.remote_address is not None:
            check_name(self.remote_name, "source node")
            check_address(self.remote_address, "source address")
        if self.checksum is not None:
            check_checksum(self.checksum)
        if self.artifact is not None:
            check_artifact_path(self.artifact)

    def value(self, name: str) -> str:
        """The value of a template variable (``remote.name`` and so on)."""
        if name not in VERIFY_VARIABLES:
            raise KeyError(name)
        value = getattr(self, name.replace(".", "_"))
        if value is None:
            what = {ARTIFACT_VARIABLE: "the app has no artifact", CHECKSUM_VARIABLE: "the release carries no checksum"}
            raise InvalidValue("%s for {{ %s }}" % (what.get(name, "the app has no single source"), name))
        return value


@dataclass(frozen=True)
class _Variable:
    name: str


_Part = Union[str, _Variable]


def _describe_placeholder(text: str) -> str:
    return "'" + " ".join(text.split()) + "'"


def _variable_name(inner: str, placeholder: str, names: Tuple[str, ...]) -> str:
    """The variable of ``names`` a placeholder's inside names; TemplateError if it names none."""
    name = inner.strip()
    shown = _describe_placeholder(placeholder)
    if not name:
        raise TemplateError("empty placeholder %s" % shown)
    if "|" in name:
        raise TemplateError(
            "filters are not supported in %s: values are inserted as shell-quoted "
            "words as they are" % shown)
    if not _NAME.match(name):
        raise TemplateError(
            "only a variable name may stand in %s, not an expression "
            "(variables: %s)" % (shown, ", ".join(names)))
    if name == CHECKSUM_VARIABLE and name not in names:
        raise TemplateError("%s is set only in verify_commands" % shown)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = "; did you mean '%s'?" % close[0] if close else ""
        raise TemplateError(
            "unknown variable '%s' in %s%s (variables: %s)"
            % (name, shown, hint, ", ".join(names)))
    return name


def _check_literal(text: str) -> None:
    """Refuse Jinja syntax other than ``{{ }}`` left in the text between placeholders."""
    for opener, what in (("{%", "a Jinja statement"), ("{#", "a Jinja comment")):
        if opener in text:
            raise TemplateError(
                "'%s' starts %s, which command templates do not support: "
                "only {{ variable }} is substituted" % (opener, what))
    if "{{" in text:
        raise TemplateError("'{{' without a closing '}}'")


def _split(template: str, names: Tuple[str, ...]) -> Tuple[_Part, ...]:
    parts = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        literal = template[position:match.start()]
        _check_literal(literal)
        if literal:
            parts.append(literal)
        parts.append(_Variable(_variable_name(match.group(1), match.group(0), names)))
        position = match.end()
    tail = template[position:]
    _check_literal(tail)
    if tail:
        parts.append(tail)
    return tuple(parts)


# Commands that take an argument as code to parse again, wherever it stands in their line.
_CODE_COMMANDS = frozenset(("eval", "let", "trap", "alias", "source", ".", "parallel", "watch",
                            "awk", "gawk", "mawk", "nawk", "read", "mapfile", "readarray"))
# Shells and interpreters: with one of these options, an argument is a program text.
_INLINE_CODE_OPTIONS = {
    "sh": "c", "bash": "c", "dash": "c", "zsh": "c", "ksh": "c", "mksh": "c", "ash": "c", "busybox": "c",
    "su": "c", "runuser": "c", "script": "c", "sudo": "si", "doas": "s",
    "python": "c", "perl": "eE", "ruby": "e", "node": "ep", "php": "rR", "lua": "e", "tclsh": "c",
    # bash: an integer attribute evaluates assigned words as arithmetic; -v names a variable.
    "declare": "i", "typeset": "i", "local": "i", "printf": "v", "test": "v", "[": "v",
}
# Commands that run the rest of their command line as a command of its own.
_WRAPPERS = frozenset(("sudo", "doas", "env", "nohup", "nice", "ionice", "timeout", "stdbuf", "setsid",
                       "chroot", "exec", "command", "builtin", "flock", "chrt", "taskset", "unbuffer",
                       "xargs", "runuser", "su", "coproc"))
# ssh options that take the next word as their value.
_SSH_VALUE_OPTIONS = "BbcDEeFIiJLlmOopQRSWw"
# Words that start a compound command rather than name one.
_RESERVED = frozenset(("if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "case",
                       "esac", "!", "{", "}", "time"))
_VARIABLE_MARK = "\0"
# A word that opens an array element assignment: name[ ... (the subscript is arithmetic).
_SUBSCRIPT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\[[^\]]*\Z")


def _command_name(word: str) -> str:
    name = word.rsplit("/", 1)[-1]
    return name.rstrip("0123456789.") if name.startswith("python") else name


def _takes_inline_code(command: str, option: str, letters: str) -> bool:
    if option.startswith("--"):
        return command in ("su", "runuser", "script") and option.startswith("--command") or (
            command in ("sudo", "doas") and option in ("--shell", "--login"))
    return option.startswith("-") and any(letter in option[1:] for letter in letters)


def _reparsed_by(words: List[str]) -> Optional[str]:
    """Why a value placed after ``words`` (the simple command so far) would be parsed again
    as code, or None."""
    for index, word in enumerate(words):
        name = _command_name(word)
        if name in _CODE_COMMANDS and _in_command_position(words, index):
            return "is an argument of '%s', which runs its arguments as code" % name
        letters = _INLINE_CODE_OPTIONS.get(name)
        if letters and any(_takes_inline_code(name, option, letters) for option in words[index + 1:]):
            return "is in a '%s' command line with an option that runs program text" % name
        if name == "ssh" and (index == 0 or words[index - 1] not in ("-e", "--rsh")):
            if _ssh_destination_passed(words[index + 1:]):
                return "is in the command ssh runs through the remote shell"
    return None


def _in_command_position(words: List[str], index: int) -> bool:
    """Whether ``words[index]`` names the command run: first, or after a command that runs
    the rest of its line (``sudo``, ``env``, ``find -exec``, ...), an option or an assignment."""
    if index == 0:
        return True
    before = words[index - 1]
    if _command_name(before) in _WRAPPERS or before in ("-exec", "-execdir", "-ok"):
        return True
    return (before.startswith("-") or "=" in before) and any(
        _command_name(word) in _WRAPPERS for word in words[:index - 1])


def _ssh_destination_passed(arguments: List[str]) -> bool:
    expect_value = False
    for word in arguments:
        if expect_value:
            expect_value = False
        elif word.startswith("-") and len(word) > 1:
            expect_value = word[-1] in _SSH_VALUE_OPTIONS and len(word) == 2
        else:
            return True
    return False


class _ShellContext:
    """Tracks, well enough to place variables safely, how /bin/sh reads a template.

    A frame stack: "top" and "subst" (inside ``$(...)``) are plain command contexts that also
    collect the words of the current simple command; "single" and "double" are quotes;
    "backtick", "arith" (``$(( ))``, ``(( ))``) and "param" (``${...}``) are contexts whose
    text the shell parses or evaluates again. Once a here-document body starts, the rest
    of the text is not tracked: variables are refused there.
    """

    def __init__(self) -> None:
        self.frames = [self._command_frame("top")]
        self.escaped = False
        self.in_comment = False
        self.heredoc_pending = False
        self.in_heredoc = False
        self.previous = "\n"

    @staticmethod
    def _command_frame(kind: str) -> dict:
        return {"kind": kind, "depth": 0, "words": [], "word": "", "test": False}

    def _command(self) -> dict:
        """The innermost command frame (top or subst)."""
        return next(frame for frame in reversed(self.frames) if frame["kind"] in ("top", "subst"))

    def feed(self, text: str) -> None:
        index = 0
        while index < len(text) and not self.in_heredoc:
            index += self._step(text, index)

    def _step(self, text: str, index: int) -> int:
        char = text[index]
        frame = self.frames[-1]
        kind = frame["kind"]
        advance = 1
        if self.escaped:
            self.escaped = False
            self._command()["word"] += char
        elif self.in_comment:
            if char == "\n":
                self.in_comment = False
                self._end_command()
                self._newline()
        elif kind == "single":
            if char == "'":
                self.frames.pop()
            else:
                self._command()["word"] += char
        elif char == "\\":
            self.escaped = True
        elif text.startswith("$((", index) and kind != "arith":
            self.frames.append({"kind": "arith", "depth": 0})
            self._command()["word"] += "$"
            advance = 3
        elif text.startswith("$[", index):
            self.frames.append({"kind": "arith", "depth": 0, "close": "]"})
            self._command()["word"] += "$"
            advance = 2
        elif text.startswith("$(", index):
            self._command()["word"] += "$"
            self.frames.append(self._command_frame("subst"))
            advance = 2
        elif text.startswith("${", index):
            self._command()["word"] += "$"
            self.frames.append({"kind": "param", "depth": 0})
            advance = 2
        elif kind == "double":
            if char == '"':
                self.frames.pop()
            elif char == "`":
                self.frames.append({"kind": "backtick", "depth": 0})
            else:
                self._command()["word"] += char
        elif kind == "arith":
            advance = self._step_arith(text, index, frame)
        elif kind == "param" and char == "}":
            self.frames.pop()
        else:
            advance = self._step_unquoted(text, index, kind)
        self.previous = text[index + advance - 1]
        return advance

    def _step_arith(self, text: str, index: int, frame: dict) -> int:
        char = text[index]
        if frame.get("close") == "]":
            if char == "]":
                self.frames.pop()
        elif char == "(":
            frame["depth"] += 1
        elif char == ")":
            if frame["depth"]:
                frame["depth"] -= 1
            elif text.startswith("))", index):
                self.frames.pop()
                return 2
        return 1

    def _step_unquoted(self, text: str, index: int, kind: str) -> int:
        char = text[index]
        command = self._command()
        if char == "'":
            self.frames.append({"kind": "single", "depth": 0})
        elif char == '"':
            self.frames.append({"kind": "double", "depth": 0})
        elif char == "`":
            if kind == "backtick":
                self.frames.pop()
            else:
                self.frames.append({"kind": "backtick", "depth": 0})
        elif kind in ("backtick", "param"):
            pass
        elif char == "#" and self.previous in _WORD_BREAK:
            self.in_comment = True
        elif text.startswith("((", index) and not command["word"] and not command["words"]:
            self.frames.append({"kind": "arith", "depth": 0})
            return 2
        elif char == "(" and kind == "subst":
            self.frames[-1]["depth"] += 1
            self._end_command()
        elif char == ")" and kind == "subst":
            if self.frames[-1]["depth"]:
                self.frames[-1]["depth"] -= 1
                self._end_command()
            else:
                self._end_word()
                self.frames.pop()
                self._command()["word"] += "$"
        elif text.startswith("<<<", index):
            self._end_word()
            command["herestring"] = True
            return 3
        elif text.startswith("<<", index):
            self._end_word()
            self.heredoc_pending = True
            return 2
        elif char in " \t":
            self._end_word()
        elif char == "\n":
            self._end_command()
            self._newline()
        elif char in ";&|()":
            if command["test"] and char in "&|()":
                self._end_word()
            else:
                self._end_command()
        else:
            command["word"] += char
        return 1

    def _end_word(self) -> None:
        command = self._command()
        word, command["word"] = command["word"], ""
        if not word:
            return
        if word == "[[":
            command["test"] = True
        elif word == "]]":
            command["test"] = False
        elif word in _RESERVED and not command["words"]:
            return
        command["words"].append(word)

    def _end_command(self) -> None:
        self._end_word()
        command = self._command()
        command["herestring"] = False
        if not command["test"]:
            command["words"] = []

    def _newline(self) -> None:
        if self.heredoc_pending:
            self.in_heredoc = True

    def check_variable(self, name: str) -> None:
        kinds = [frame["kind"] for frame in self.frames]
        command = self._command()
        if self.in_heredoc:
            problem = ("is in a here-document body, where its quoting does not apply: "
                       "use it in a command argument instead")
        elif self.escaped:
            problem = ("follows a backslash, which would break the quoting of its value: "
                       "remove the backslash")
        elif self.in_comment:
            return
        elif kinds[-1] in ("single", "double"):
            problem = ("is inside %s quotes: values are inserted already shell-quoted, "
                       "so write the variable outside any quotes" % kinds[-1])
        elif "backtick" in kinds:
            problem = ("is inside backquotes, whose text the shell parses again: "
                       "use $(...) instead")
        elif "arith" in kinds:
            problem = ("is inside an arithmetic expression ($(( )) or (( ))), where the shell "
                       "evaluates the contents of a quoted word")
        elif "param" in kinds:
            problem = "is inside a parameter expansion ${...}"
        elif command["test"]:
            problem = "is inside [[ ]], where a quoted word can still be evaluated as arithmetic"
        elif command.get("herestring"):
            problem = "is in a here-string (<<<), which feeds it to the command as its input"
        elif _SUBSCRIPT.match(command["word"]):
            problem = "is an array subscript, which bash evaluates as arithmetic"
        else:
            problem = _reparsed_by(command["words"])
            if problem is None:
                self.previous = "x"
                command["word"] += _VARIABLE_MARK
                return
        raise TemplateError("{{ %s }} %s" % (name, problem))


def _parse(template: str, names: Tuple[str, ...] = VERIFY_VARIABLES) -> Tuple[_Part, ...]:
    if not isinstance(template, str):
        raise TemplateError("a command must be a string, got %r" % (template,))
    parts = _split(template, names)
    context = _ShellContext()
    for part in parts:
        if isinstance(part, _Variable):
            context.check_variable(part.name)
        else:
            context.feed(part)
    return parts


def template_variables(template: str, names: Tuple[str, ...] = VARIABLES) -> Tuple[str, ...]:
    """Check a command template that may use the variables ``names`` (VERIFY_VARIABLES for
    verify_commands); return the variable names it uses, in order.

    Raises TemplateError with the reason when the template is not acceptable.
    """
    return tuple(part.name for part in _parse(template, names) if isinstance(part, _Variable))


def render_command(template: str, variables: CommandVariables) -> str:
    """The command line for ``template`` with every variable shell-quoted."""
    return fill_template(template, {name: variables.value(name) for name in set(template_variables(
        template, VERIFY_VARIABLES))})


def path_variables(template: str) -> Tuple[str, ...]:
    """Check a verify_file path template; return the variable names it uses, in order.

    TemplateError unless it is an absolute path of printable characters whose placeholders
    name PATH_VARIABLES.
    """
    if not isinstance(template, str) or not template.startswith("/"):
        raise TemplateError("must be an absolute path, got %r" % (template,))
    if not template.isprintable():
        raise TemplateError("must not contain control characters")
    return tuple(part.name for part in _split(template, PATH_VARIABLES) if isinstance(part, _Variable))


def render_path(template: str, variables: CommandVariables) -> str:
    """The file a verify_file template names, its variables inserted as they are (no shell reads it)."""
    path_variables(template)
    return "".join(variables.value(part.name) if isinstance(part, _Variable) else part
                   for part in _split(template, PATH_VARIABLES))


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each placeholder replaced by its value from ``values`` as one
    shell-quoted word. The quoting holds for any string; ``render_command`` only ever gives
    it values that passed ``CommandVariables``' checks."""
    return "".join(
        shlex.quote(values[part.name]) if isinstance(part, _Variable) else part
        for part in _parse(template))


@dataclass(frozen=True)
class _Step:
    """One step of an app's run: a rendered command, or (``expected`` set) the verify_file
    check of the file ``command`` names."""

    label: str
    command: str
    verifies: bool  # its failure stops the run whatever on_command_failure says
    expected: Optional[str] = None


def _steps(app_config, variables: CommandVariables) -> Tuple[_Step, ...]:
    """Every step of an app's run, rendered, in order (InvalidValue when the release
    carries no checksum and the app verifies: see ``verification_problem``)."""
    steps = []
    for phase in PHASES:
        verifies = phase == VERIFY_PHASE
        if verifies and app_config.verify_file is not None:
            steps.append(_Step(VERIFY_FILE_LABEL, render_path(app_config.verify_file, variables), True,
                               variables.value(CHECKSUM_VARIABLE)))
        steps += [_Step("%s[%d]" % (phase, index), render_command(template, variables), verifies)
                  for index, template in enumerate(getattr(app_config, phase))]
    return tuple(steps)


def render_phases(app_config, variables: CommandVariables) -> Tuple[Tuple[str, str], ...]:
    """The steps an app's run would take, as ``(label, text)``, without running: the
    rendered command, or for verify_file the file and the checksum it must have.

    ``app_config`` is a ``_taskconfig.AppConfig``; labels name the config entry, e.g.
    ``exec_commands[0]``.
    """
    return tuple(
        (step.label, step.command if step.expected is None else "sha256 of %s must be %s" % (step.command, step.expected))
        for step in _steps(app_config, variables))


@dataclass(frozen=True)
class CommandResult:
    """The outcome of one command."""

    label: str                 # config entry, e.g. "exec_commands[0]"
    command: str               # the rendered command line
    returncode: Optional[int]  # None when it timed out or could not start
    duration: float            # seconds
    # output: the last OUTPUT_TAIL_BYTES of stdout+stderr, after a line saying how many
    # earlier bytes were dropped, if any.
    output: str
    error: Optional[str]       # why it failed; None when it succeeded

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class CommandsResult:
    """The outcome of a run of several commands.

    ``ok`` is False when a failure stopped the run (``on_failure="abort"``). ``error``
    describes the failures, including those ``on_failure="ignore"`` let the run go past.
    """

    ok: bool
    results: Tuple[CommandResult, ...]
    error: Optional[str]

    @property
    def failures(self) -> Tuple[CommandResult, ...]:
        return tuple(result for result in self.results if not result.ok)


class _Tail:
    """Keeps the last ``limit`` bytes of a stream and counts the bytes dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.buffer += chunk
        excess = len(self.buffer) - self.limit
        if excess > 0:
            del self.buffer[:excess]
            self.dropped += excess

    def text(self) -> str:
        text = self.buffer.decode("utf-8", errors="replace")
        if self.dropped:
            return "[%d earlier bytes not kept]\n%s" % (self.dropped, text)
        return text


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader once it exits so it no longer counts
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the command's process group, SIGKILL what is left after ``grace``."""
    _signal_group(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    alive = _group_alive(proc)
    while alive and time.monotonic() < end:
        time.sleep(min(_POLL_INTERVAL, grace))
        alive = _group_alive(proc)
    if alive:
        _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _collect(proc: subprocess.Popen, tail: _Tail, deadline: float) -> bool:
    """Read the command's output until it exits; return False if the deadline passed."""
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if proc.poll() is not None:
                # Exited, but a background process holds the pipe: take what is there.
                drained = 0
                while drained < _DRAIN_LIMIT and selector.select(0):
                    chunk = os.read(fd, _READ_SIZE)
                    if not chunk:
                        break
                    tail.add(chunk)
                    drained += len(chunk)
                return True
            if selector.select(min(remaining, _POLL_INTERVAL)):
                chunk = os.read(fd, _READ_SIZE)
                if not chunk:
                    break
                tail.add(chunk)
    try:
        proc.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        return False
    return True


def command_environment(environ: Optional[Mapping[str, str]] = None) -> dict:
    """The environment the app's commands run with: the handler's (``environ``, default
    ``os.environ``: the agent's, as the watch passed it on) without any Consul credential,
    whether or not the handler itself took its token from there."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items() if not _CREDENTIAL.match(name)}


def _format_seconds(seconds: float) -> str:
    return "%gs" % seconds


def _run_one(label: str, command: str, timeout: float, kill_grace: float) -> CommandResult:
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [SHELL, "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, env=command_environment())
    except OSError as exc:
        return CommandResult(label, command, None, time.monotonic() - start, "",
                             "could not start %s: %s" % (SHELL, exc))
    tail = _Tail(OUTPUT_TAIL_BYTES)
    try:
        finished = _collect(proc, tail, start + timeout)
        if not finished:
            _kill_group(proc, kill_grace)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            _kill_group(proc, kill_grace)
    duration = time.monotonic() - start
    if not finished:
        return CommandResult(label, command, None, duration, tail.text(),
                             "timed out after %s" % _format_seconds(timeout))
    code = proc.returncode
    if code == 0:
        error = None
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "signal %d" % -code
        error = "killed by %s" % name
    else:
        error = "exit status %d" % code
    return CommandResult(label, command, code, duration, tail.text(), error)


def _check_file(step: _Step) -> CommandResult:
    start = time.monotonic()
    error = file_mismatch(step.command, step.expected)
    return CommandResult(step.label, step.command, None, time.monotonic() - start, "", error)


def _describe_failure(result: CommandResult) -> str:
    if result.label == VERIFY_FILE_LABEL:
        return "%s failed: %s" % (result.label, result.error)
    text = "%s failed (%s): %s" % (result.label, result.error, result.command)
    if result.output:
        text += "\noutput:\n" + result.output.rstrip("\n")
    return text


def _run(render: Callable[[], Sequence[_Step]], timeout: float, on_failure: str,
         log: Optional[logging.Logger], kill_grace: float) -> CommandsResult:
    if on_failure not in ON_FAILURE_CHOICES:
        raise InvalidValue(f"on_failure must be one of {', '.join(ON_FAILURE_CHOICES)}, got {on_failure!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidValue("timeout must be a number of seconds > 0, got %r" % (timeout,))
    log = log or _log
    # Render everything first: a bad template must not leave the task half done.
    rendered = render()
    results = []
    for step in rendered:
        label = step.label
        if step.expected is None:
            log.info("%s: running: %s", label, step.command)
            result = _run_one(label, step.command, timeout, kill_grace)
        else:
            log.info("%s: checking that the sha256 of %s is %s", label, step.command, step.expected)
            result = _check_file(step)
        results.append(result)
        if result.ok:
            log.info("%s: ok in %.1fs", label, result.duration)
            continue
        log.error("%s: %s (ran %.1fs)%s", label, result.error, result.duration,
                  "; output tail:\n" + result.output if result.output else "")
        if on_failure == "abort" or step.verifies:
            skipped = len(rendered) - len(results)
            error = _describe_failure(result)
            if skipped:
                error += "\n(%d later command%s not run)" % (skipped, "" if skipped == 1 else "s")
            return CommandsResult(False, tuple(results), error)
    failures = [result for result in results if not result.ok]
    if not failures:
        return CommandsResult(True, tuple(results), None)
    error = "%d of %d commands failed, ignored (on_command_failure: ignore): %s\n%s" % (
        len(failures), len(results),
        ", ".join("%s (%s)" % (result.label, result.error) for result in failures),
        _describe_failure(failures[-1]))
    return CommandsResult(True, tuple(results), error)


def run_commands(commands: Iterable[str], variables: CommandVariables, timeout: float,
                 on_failure: str, log: Optional[logging.Logger] = None,
                 phase: str = "exec_commands",
                 kill_grace: float = KILL_GRACE) -> CommandsResult:
    """Render and run ``commands`` one after the other.

    ``timeout`` applies to each command. ``on_failure`` is ``"abort"`` (stop at the
    first failure) or ``"ignore"`` (run them all, report the failures in ``error``).
    ``phase`` names the list in result labels (``exec_commands[0]``, ...).
    """
    def render() -> Tuple[_Step, ...]:
        return tuple(_Step("%s[%d]" % (phase, index), render_command(template, variables), phase == VERIFY_PHASE)
                     for index, template in enumerate(commands))

    return _run(render, timeout, on_failure, log, kill_grace)


def run_phases(app_config, variables: CommandVariables,
               log: Optional[logging.Logger] = None,
               kill_grace: float = KILL_GRACE) -> CommandsResult:
    """Run an app's before_commands, exec_commands, its verification (verify_file, then
    verify_commands) and after_commands, in that order.

    ``app_config`` is a ``_taskconfig.AppConfig``; its ``command_timeout`` and
    ``on_command_failure`` apply across the phases (an abort in before_commands skips the
    rest). A failed verification always stops the run: ``on_command_failure: ignore`` never
    lets an unverified build reach after_commands. When the release's checksum and the
    app's verification do not go together (``verification_problem``) nothing runs.
    """
    problem = verification_problem(app_config, variables.checksum)
    if problem is not None:
        return CommandsResult(False, (), problem)
    return _run(lambda: _steps(app_config, variables), app_config.command_timeout,
                app_config.on_command_failure, log, kill_grace)
