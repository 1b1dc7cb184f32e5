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

Whitespace inside the braces is allowed (``{{app}}``, ``{{ app }}``). Nothing else of
Jinja is: filters (``|``), expressions, statements (``{% ... %}``) and comments
(``{# ... #}``) are refused, as is a name outside the list above.

Every value is inserted as one shell word quoted with :func:`shlex.quote`, so a value such
as ``1.0;rm -rf /``, ``$(id)`` or one with a newline stays inert data. Values are
already quoted: write ``/opt/{{ app }}/`` and never ``"/opt/{{ app }}/"``. Placing a
variable inside quotes, after a backslash or inside a here-document body would let the
shell re-interpret the quoted value, so such templates are refused. The quoting protects
one level of shell only: a command that hands a value to another shell (``ssh host
...``, ``sh -c ...``) has that shell parse it again.

Runner
------
Each command runs as ``/bin/sh -c <command>`` in a session (and process group) of its own,
stdin from ``/dev/null``, stdout and stderr captured together; only the last
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
from typing import Iterable, Optional, Sequence, Tuple, Union

VARIABLES = ("app", "version", "node", "remote.name", "remote.address")
PHASES = ("before_commands", "exec_commands", "after_commands")
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

_log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """A command template that cannot be rendered safely."""


@dataclass(frozen=True)
class CommandVariables:
    """The values a command template may use (see the module docstring)."""

    app: str
    version: str
    node: str
    remote_name: str
    remote_address: str

    def __post_init__(self) -> None:
        for field in ("app", "version", "node", "remote_name", "remote_address"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(
                    "command variable %s must be a string, got %r" % (field, value))
            if "\0" in value:
                raise ValueError(
                    "command variable %s contains a NUL byte: %r" % (field, value))

    def value(self, name: str) -> str:
        """The value of a template variable (``remote.name`` and so on)."""
        if name not in VARIABLES:
            raise KeyError(name)
        return getattr(self, name.replace(".", "_"))


@dataclass(frozen=True)
class _Variable:
    name: str


_Part = Union[str, _Variable]


def _describe_placeholder(text: str) -> str:
    return "'" + " ".join(text.split()) + "'"


def _variable_name(inner: str, placeholder: str) -> str:
    """The variable a placeholder's inside names; TemplateError if it names none."""
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
            "(variables: %s)" % (shown, ", ".join(VARIABLES)))
    if name not in VARIABLES:
        close = difflib.get_close_matches(name, VARIABLES, n=1)
        hint = "; did you mean '%s'?" % close[0] if close else ""
        raise TemplateError(
            "unknown variable '%s' in %s%s (variables: %s)"
            % (name, shown, hint, ", ".join(VARIABLES)))
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


def _split(template: str) -> Tuple[_Part, ...]:
    parts = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        literal = template[position:match.start()]
        _check_literal(literal)
        if literal:
            parts.append(literal)
        parts.append(_Variable(_variable_name(match.group(1), match.group(0))))
        position = match.end()
    tail = template[position:]
    _check_literal(tail)
    if tail:
        parts.append(tail)
    return tuple(parts)


class _ShellContext:
    """Tracks, well enough to place variables safely, how /bin/sh reads a template.

    A frame stack: "top" and "subst" (inside ``$(...)`` or backticks) are unquoted
    contexts, "single" and "double" are quotes. Once a here-document body starts, the
    rest of the text is not tracked: variables are refused there.
    """

    def __init__(self) -> None:
        self.frames = [["top", 0]]  # kind, open parentheses (for "subst")
        self.escaped = False
        self.in_comment = False
        self.heredoc_pending = False
        self.in_heredoc = False
        self.previous = "\n"

    def feed(self, text: str) -> None:
        index = 0
        while index < len(text) and not self.in_heredoc:
            index += self._step(text, index)

    def _step(self, text: str, index: int) -> int:
        char = text[index]
        kind = self.frames[-1][0]
        advance = 1
        if self.escaped:
            self.escaped = False
        elif self.in_comment:
            if char == "\n":
                self.in_comment = False
                self._newline()
        elif kind == "single":
            if char == "'":
                self.frames.pop()
        elif char == "\\":
            self.escaped = True
        elif text.startswith("$(", index):
            self.frames.append(["subst", 0])
            advance = 2
        elif kind == "double":
            if char == '"':
                self.frames.pop()
            elif char == "`":
                self.frames.append(["backtick", 0])
        else:
            advance = self._step_unquoted(text, index, kind)
        self.previous = text[index + advance - 1]
        return advance

    def _step_unquoted(self, text: str, index: int, kind: str) -> int:
        char = text[index]
        if char == "'":
            self.frames.append(["single", 0])
        elif char == '"':
            self.frames.append(["double", 0])
        elif char == "`":
            if kind == "backtick":
                self.frames.pop()
            else:
                self.frames.append(["backtick", 0])
        elif char == "#" and self.previous in _WORD_BREAK:
            self.in_comment = True
        elif char == "(" and kind == "subst":
            self.frames[-1][1] += 1
        elif char == ")" and kind == "subst":
            if self.frames[-1][1]:
                self.frames[-1][1] -= 1
            else:
                self.frames.pop()
        elif text.startswith("<<", index):
            self.heredoc_pending = True
            return 2
        elif char == "\n":
            self._newline()
        return 1

    def _newline(self) -> None:
        if self.heredoc_pending:
            self.in_heredoc = True

    def check_variable(self, name: str) -> None:
        if self.in_heredoc:
            problem = ("is in a here-document body, where its quoting does not apply: "
                       "use it in a command argument instead")
        elif self.escaped:
            problem = ("follows a backslash, which would break the quoting of its value: "
                       "remove the backslash")
        elif self.in_comment:
            return
        elif self.frames[-1][0] in ("single", "double"):
            problem = ("is inside %s quotes: values are inserted already shell-quoted, "
                       "so write the variable outside any quotes" % self.frames[-1][0])
        else:
            self.previous = "x"
            return
        raise TemplateError("{{ %s }} %s" % (name, problem))


def _parse(template: str) -> Tuple[_Part, ...]:
    if not isinstance(template, str):
        raise TemplateError("a command must be a string, got %r" % (template,))
    parts = _split(template)
    context = _ShellContext()
    for part in parts:
        if isinstance(part, _Variable):
            context.check_variable(part.name)
        else:
            context.feed(part)
    return parts


def template_variables(template: str) -> Tuple[str, ...]:
    """Check a command template; return the variable names it uses, in order.

    Raises TemplateError with the reason when the template is not acceptable.
    """
    return tuple(part.name for part in _parse(template) if isinstance(part, _Variable))


def render_command(template: str, variables: CommandVariables) -> str:
    """The command line for ``template`` with every variable shell-quoted."""
    return "".join(
        shlex.quote(variables.value(part.name)) if isinstance(part, _Variable) else part
        for part in _parse(template))


def render_phases(app_config, variables: CommandVariables) -> Tuple[Tuple[str, str], ...]:
    """The commands an app's run would execute, as ``(label, command)``, without running.

    ``app_config`` is a ``_taskconfig.AppConfig``; labels name the config entry, e.g.
    ``exec_commands[0]``.
    """
    return tuple(
        (label, render_command(template, variables))
        for label, template in _labelled_phases(app_config))


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


def _format_seconds(seconds: float) -> str:
    return "%gs" % seconds


def _run_one(label: str, command: str, timeout: float, kill_grace: float) -> CommandResult:
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [SHELL, "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
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


def _describe_failure(result: CommandResult) -> str:
    text = "%s failed (%s): %s" % (result.label, result.error, result.command)
    if result.output:
        text += "\noutput:\n" + result.output.rstrip("\n")
    return text


def _run(labelled: Sequence[Tuple[str, str]], variables: CommandVariables,
         timeout: float, on_failure: str, log: Optional[logging.Logger],
         kill_grace: float) -> CommandsResult:
    if on_failure not in ON_FAILURE_CHOICES:
        raise ValueError("on_failure must be one of %s, got %r"
                         % (", ".join(ON_FAILURE_CHOICES), on_failure))
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError("timeout must be a number of seconds > 0, got %r" % (timeout,))
    log = log or _log
    # Render everything first: a bad template must not leave the task half done.
    rendered = [(label, render_command(template, variables)) for label, template in labelled]
    results = []
    for label, command in rendered:
        log.info("%s: running: %s", label, command)
        result = _run_one(label, command, timeout, kill_grace)
        results.append(result)
        if result.ok:
            log.info("%s: ok in %.1fs", label, result.duration)
            continue
        log.error("%s: %s (ran %.1fs)%s", label, result.error, result.duration,
                  "; output tail:\n" + result.output if result.output else "")
        if on_failure == "abort":
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
    labelled = [("%s[%d]" % (phase, index), template)
                for index, template in enumerate(commands)]
    return _run(labelled, variables, timeout, on_failure, log, kill_grace)


def _labelled_phases(app_config) -> Tuple[Tuple[str, str], ...]:
    return tuple(
        ("%s[%d]" % (phase, index), template)
        for phase in PHASES
        for index, template in enumerate(getattr(app_config, phase)))


def run_phases(app_config, variables: CommandVariables,
               log: Optional[logging.Logger] = None,
               kill_grace: float = KILL_GRACE) -> CommandsResult:
    """Run an app's before_commands, exec_commands and after_commands, in that order.

    ``app_config`` is a ``_taskconfig.AppConfig``; its ``command_timeout`` and
    ``on_command_failure`` apply across the three phases (an abort in before_commands
    skips exec_commands and after_commands).
    """
    return _run(_labelled_phases(app_config), variables, app_config.command_timeout,
                app_config.on_command_failure, log, kill_grace)
