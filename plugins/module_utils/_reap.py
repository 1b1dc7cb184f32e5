# SPDX-License-Identifier: MIT
"""fireap-reap: the node's handler of the Consul watch on the FIREAP:TASK user event.

The fireap_node role installs it as ``<prefix>/bin/fireap-reap`` and registers it as the
agent's watch handler (type ``event``, name ``FIREAP:TASK``)::

    fireap-reap --config /etc/fireap/config.yml [--dry-run]   as the watch handler
    fireap-reap --config FILE --check                          validate a config file
    fireap-reap --config FILE --list [--json]                  list the configured apps
    fireap-reap --config FILE --worker APP                     started by the handler

``--config`` defaults to the environment variable ``FIREAP_CONFIG_PATH``, else
``/etc/fireap/config.yml``. ``--debug`` logs at level debug whatever the config's
``log_level`` says (this run only; the workers it starts follow the config).

As the watch handler it reads a JSON array of Consul events on stdin (empty, ``[]`` at
watch start, or a terminal when run by hand) and:

1. parses the events (``_task_event``): name ``FIREAP:TASK``, payload = base64 of the
   compact JSON ``{"app": ..., "version": ...}``; a malformed event is logged and skipped;
2. drops events already handled (the agent hands its whole buffer over again at start and
   at every reload): their IDs are kept, bounded, in ``<state_dir>/processed-events.json``
   (``_processed_events``);
   events for apps this node does not configure are logged and skipped; of the rest, the
   newest event per app (by LTime) is logged;
3. checks every configured app, whether or not an event named it (gossip may drop an
   event; the watch fires with ``[]`` at agent start): reads ``<app>/release`` and, only
   when needed, the node's own state and plan entry; the release record decides, an event
   is only a wake-up;
4. for each app whose running release this node is a target of and not done with, starts
   a detached worker (forked once the handler let its lock go and closed its Consul
   connection: a process session of its own, output to the log file) and exits at once so
   the agent's watch is not blocked;
5. advertises the node's apps (``<prefix>.apps/<node>``: each app's ``max_semaphores`` and
   filters, which the leader targets nodes and sizes runs by) when the advert in KV differs
   from the config: checked at every call without new events (the watch starts with old
   events or none at each agent start and reload, so a reload after a config change
   re-advertises), and at any call once the config differs from the advert last written
   (kept in ``<state_dir>/advert.json``).

A worker of a release with an artifact takes part in its swarm instead (``_swarm_worker.serve``):
a target fetches the file, verifies it and runs the app's commands with ``{{ artifact }}``; the
run's leader, which has the file, serves it while the run is not over (its handler starts a
worker for that). A worker pulls one app (``_worker.pull``) with the app's commands as the
task; an app with service/tag filters runs them only when the filters match one of the
services of the node's own agent (``AppAdvert.accepts``, the rule the leader targets by),
else the node records the run ``failed`` saying so. When the release carries a checksum the
task verifies the build between exec_commands and after_commands (``_integrity``:
verify_file, verify_commands); a mismatch, or a checksum and a verification setting that do
not go together, records the node ``failed``, so it never serves as a source.

One worker runs per app, holding the flock of ``<state_dir>/worker-<app>.lock``, which holds
its pid; its process name (``ps -o comm``, ``pgrep``) is ``fireap-worker``, its command line
the handler's. The handler leaves ``worker-<app>.pending`` before it starts one and starts
none while the lock is held; a worker that finds the lock held exits quietly. The running
worker re-checks the release after each pull, and whenever that marker appeared, and pulls
again when a newer run was fired meanwhile.

``--list`` validates the config as ``--check`` does and prints each app with its merged
settings, its commands and its verification as configured (``--json``: one JSON object);
it reads no Consul.

The log file is reopened when logrotate (or anyone) moved it away: the fireap_node role
installs a logrotate snippet that rotates it without copying or truncating.

``--dry-run`` reads events and Consul like the handler, then prints for each app what
would happen, with the rendered commands and verification steps of each worker it would
start (the source node is not known before the pull: placeholders stand in for it), or why
the pull would fail before running any; it starts nothing and writes
nothing (log lines go to stderr).

Exit codes:

* 0: every configured app was checked; ``--check``, ``--list``: the config is valid;
  worker: the pulls ended without failure;
* 1: some app could not be checked (Consul unreachable, access denied, malformed release
  or plan record); worker: a pull failed or could not be done;
* 2: bad usage, invalid config, py-consul missing (only ``--check`` runs without it), a
  node name unfit for KV keys, or an unusable state_dir.

Only stdlib, py-consul and PyYAML: nodes run this without Ansible.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import gc
import json
import logging
import logging.handlers
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator, NoReturn, TextIO

try:
    from consul.callback import CB
except ImportError:
    # main() refuses to run without py-consul and reports _connection's import error.
    CB = None

from ansible_collections.fireap.consul.plugins.module_utils._commands import (
    PHASES,
    VERIFY_PHASE,
    CommandVariables,
    render_phases,
    run_phases,
)
from ansible_collections.fireap.consul.plugins.module_utils._connection import (
    PY_CONSUL_IMPORT_ERROR,
    ConsulOptions,
    ConsulOptionsError,
    FireapConsulError,
    build_client,
    consul_errors,
    retry_transient,
)
from ansible_collections.fireap.consul.plugins.module_utils._errors import FireapError, InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._integrity import verification_problem
from ansible_collections.fireap.consul.plugins.module_utils._kv import (
    NODE_PULLING,
    KVRecordError,
    NodeState,
    PlanEntry,
    ReleaseRecord,
    Schema,
    SwarmRun,
    run_of,
)
from ansible_collections.fireap.consul.plugins.module_utils._propagation import (
    PullMachine,
    PullResult,
    PullTimings,
    RunProblem,
    read_run,
)
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import (
    CONFIG_PATH_ENV,
    DEFAULT_PATH,
    LOG_LEVELS,
    AppConfig,
    ConfigError,
    TaskConfig,
    check_app_name,
    load_config,
)
from ansible_collections.fireap.consul.plugins.module_utils._processed_events import (
    PROCESSED_FILE,
    load_processed,
    remember,
    save_processed,
    write_atomic,
)
from ansible_collections.fireap.consul.plugins.module_utils._task_event import (
    EVENT_NAME,
    RejectedEvent,
    TaskEvent,
    newest_per_app,
    parse_events,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import (
    artifact_path,
    check_name,
    clip,
    escape_controls,
    show,
)
from ansible_collections.fireap.consul.plugins.module_utils._worker import SourceInfo, pull

EXIT_OK = 0
EXIT_UNCHECKED = 1
EXIT_USAGE = 2

HANDLER_LOCK_FILE = "handler.lock"
#: A worker's process name (``/proc/<pid>/comm``): a worker the handler forks keeps the
#: handler's command line, so this is what tells the two apart.
WORKER_PROCESS_NAME = "fireap-worker"
#: The advert this node last wrote or found in KV (its JSON), in the state directory.
ADVERT_FILE = "advert.json"

#: Stand-ins for the source node in ``--dry-run`` output (valid values, like every other:
#: ``.invalid`` is the top-level domain reserved never to resolve).
DRY_RUN_SOURCE = SourceInfo(name="SOURCE_NODE", address="source-address.invalid")

#: Who may read the log and the state directory: they hold command lines, output tails and
#: the record of handled events. The group is the agent's; others get nothing.
LOG_FILE_MODE = 0o640
STATE_DIR_MODE = 0o750
#: Longest log line (the message after the fixed fields): output tails fit, a flood does not.
LOG_MESSAGE_MAX_LENGTH = 16384

#: The directory holding ``ansible_collections/``: where the worker imports this module from.
IMPORT_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 5))
#: ``python -c`` program of a worker or handler: argv[1] is IMPORT_ROOT, the rest are fireap-reap's
#: arguments. Unlike PYTHONPATH, this does not leak into the environment of the app's commands.
_ENTRY_PROGRAM = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from ansible_collections.fireap.consul.plugins.module_utils._reap import main; sys.exit(main())"
)

LOG_FORMAT = "%(asctime)s %(levelname)s fireap-reap[%(process)d] app=%(app)s version=%(version)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"

_log = logging.getLogger("fireap.reap")


# --- the catch-up check ------------------------------------------------------------------


@dataclass(frozen=True)
class AppCheck:
    """What the node should do for one app, with the release record it was decided on (or
    the problem of a run whose records are malformed)."""

    app: str
    start: bool
    reason: str
    release: ReleaseRecord | None
    problem: RunProblem | None = None
    #: The leader of a run with an artifact: the ModifyIndex of the run's open swarm record it
    #: serves for (None otherwise). A record reopened for stragglers is a new attempt.
    serving: int | None = None

    @property
    def attempt(self) -> str | None:
        """What a worker tries once: the run, or the leader's serving of one swarm record."""
        if self.serving is None:
            return self.run_id
        return f"{self.run_id}@{self.serving}"

    @property
    def run_id(self) -> str | None:
        if self.release is not None:
            return self.release.run_id
        return None if self.problem is None else self.problem.run_id

    @property
    def version(self) -> str:
        if self.release is not None:
            return self.release.version
        return "-" if self.problem is None else self.problem.version


def decide(node: str, release: ReleaseRecord | None, plan: PlanEntry | None, own: NodeState | None,
           problem: RunProblem | None = None) -> tuple[bool, str]:
    """Whether ``node`` needs a worker for this release, and why; the pull's own start rules."""
    action = PullMachine(node, release, plan, own, problem=problem).start(0.0)
    if isinstance(action, PullResult):
        return False, action.reason
    if problem is not None:
        return True, f"run {problem.run_id} cannot be pulled ({problem.reason}): recording it as failed"
    if own is None:
        state = "no state yet"
    else:
        state = f"own state {own.status} at version {own.version} (run {own.run_id})"
    return True, f"behind release {release.version} (run {release.run_id}): {state}"


class _Reader:
    """The few KV reads of a check; Consul errors become FireapConsulError."""

    def __init__(self, client, options: ConsulOptions) -> None:
        self.client = client
        self.options = options

    def entry(self, key: str):
        with consul_errors(self.options, f"reading {key}"):
            _index, entry = self.client.kv.get(key)
        return entry

    def value(self, key: str):
        entry = self.entry(key)
        return None if entry is None else entry.get("Value")

    def record(self, cls, key: str):
        value = self.value(key)
        return None if value is None else cls.from_json(value, key)


def check_app(client, options: ConsulOptions, schema: Schema, app: str, node: str,
              log: logging.LoggerAdapter | logging.Logger = _log) -> AppCheck:
    """Read what ``decide`` needs for ``app``: the release, then the node's state and plan
    only when the answer still depends on them (1 to 3 single-key reads; the leader of a run
    with an artifact reads the run's swarm record instead of a plan).

    Raises FireapConsulError when Consul does not answer and KVRecordError for a malformed
    release record of a run that cannot be named (``read_run``); a malformed own state is
    logged and treated as absent (the worker overwrites it).
    """
    reader = _Reader(client, options)
    release_key = schema.release(app)
    release_value = reader.value(release_key)
    try:
        release = None if release_value is None else ReleaseRecord.from_json(release_value, release_key)
    except KVRecordError:
        release = None
    malformed = release_value is not None and release is None
    run = None if release_value is None else run_of(release_value, release_key)
    plan_key = None if run is None else schema.plan(app, run[0], node)
    own = plan_value = None
    if malformed or (release is not None and not release.aborted):
        own_key = schema.node(app, node)
        try:
            own = reader.record(NodeState, own_key)
        except KVRecordError as err:
            log.warning("%s; treating this node as having no state", err)
        if plan_key is not None and (malformed or (not (own is not None and own.has(release.version))
                                                   and node != release.leader)):
            plan_value = reader.value(plan_key)
    release, plan, problem = read_run(release_key, release_value, plan_key, plan_value)
    start, reason = decide(node, release, plan, own, problem)
    serving = None
    if release is not None and release.artifact is not None and release.leader == node and not release.aborted:
        start, reason, serving = _serving_check(reader, schema, release)
    return AppCheck(app, start, reason, release, problem, serving)


def _serving_check(reader: _Reader, schema: Schema, release: ReleaseRecord) -> tuple[bool, str, int | None]:
    """Whether the leader serves the run's artifact: while the run's swarm record is open (one
    more read); ``(start, reason, the record's ModifyIndex)``."""
    key = schema.swarm_run(release.app, release.run_id)
    entry = reader.entry(key)
    run = f"leader of run {release.run_id}"
    try:
        record = None if entry is None else SwarmRun.from_json(entry.get("Value"), key)
    except KVRecordError as err:
        return False, f"{run}: nothing to serve, {err}", None
    if record is None:
        return False, f"{run}: nothing to serve, {key} is missing", None
    if record.over:
        return False, f"{run}: its swarm is over ({'finished' if record.refused is None else 'refused'})", None
    return True, f"{run}: serving its artifact {release.artifact.name}", entry["ModifyIndex"]


# --- logging -----------------------------------------------------------------------------


class _ContextFilter(logging.Filter):
    """Gives every record the ``app`` and ``version`` fields of the format ("-" when unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for field in ("app", "version"):
            if not hasattr(record, field):
                setattr(record, field, "-")
        return True


class _OneLineFormatter(logging.Formatter):
    """One record, one line: every control character of the message (newlines of output
    tails and of any value read from Consul included) is written as an escape, and the
    message is cut at LOG_MESSAGE_MAX_LENGTH, so no value can forge or flood a log line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clip(escape_controls(record.message), LOG_MESSAGE_MAX_LENGTH)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return escape_controls(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return escape_controls(super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def _private_file(path: str) -> None:
    """Create ``path`` with LOG_FILE_MODE if missing; take world access away if it has any."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_FILE_MODE))
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o007:
        os.chmod(path, mode & ~0o007)


def private_dir(path: str) -> None:
    """Create directory ``path`` with STATE_DIR_MODE if missing; take world access away."""
    os.makedirs(path, mode=STATE_DIR_MODE, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o007:
        os.chmod(path, mode & ~0o007)


class _LogFile(logging.handlers.WatchedFileHandler):
    """The log file, reopened when it was moved or deleted (by logrotate): the new file too
    is created with LOG_FILE_MODE, whoever rotates it and however."""

    def _open(self):
        _private_file(self.baseFilename)
        return super()._open()


def log_level(name: str) -> int:
    """The logging level of a config ``log_level`` (one of LOG_LEVELS)."""
    if name not in LOG_LEVELS:
        raise InvalidValue(f"log level must be one of {', '.join(LOG_LEVELS)}, got {show(name)}")
    return logging.getLevelName(name.upper())


def configure_logging(log_file: str | None, level: int = logging.INFO) -> str | None:
    """Send the handler's log at ``level`` and above to ``log_file`` (stderr when None);
    return a warning when the file cannot be opened and stderr is used instead."""
    warning = None
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            # The directory may be shared (/var/log): create it if missing, never change it.
            os.makedirs(os.path.dirname(log_file), mode=STATE_DIR_MODE, exist_ok=True)
            handler = _LogFile(log_file, encoding="utf-8")
        except OSError as err:
            handler = logging.StreamHandler(sys.stderr)
            warning = f"cannot write the log file {log_file} ({err.strerror or err}); logging to stderr"
    handler.setFormatter(_OneLineFormatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handler.addFilter(_ContextFilter())
    for old in list(_log.handlers):
        _log.removeHandler(old)
        old.close()
    _log.addHandler(handler)
    _log.setLevel(level)
    _log.propagate = False
    return warning


def _context(app: str = "-", version: str = "-") -> logging.LoggerAdapter:
    return logging.LoggerAdapter(_log, {"app": app, "version": version})


# --- files in the state directory --------------------------------------------------------


def _worker_lock_path(state_dir: str, app: str) -> str:
    return os.path.join(state_dir, f"worker-{app}.lock")


def _pending_path(state_dir: str, app: str) -> str:
    return os.path.join(state_dir, f"worker-{app}.pending")


@contextlib.contextmanager
def _flock(path: str, blocking: bool) -> Iterator[int | None]:
    """Hold an exclusive flock on ``path`` for the block; yields the file's descriptor, or None
    if (non-blocking) it is held elsewhere. The lock ends with the process, so a crashed holder
    never blocks anyone."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def _record_pid(fd: int) -> None:
    """Write this process's pid into the lock file ``fd`` it holds, for operators and tools
    (only for them: a full disk does not stop the worker)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)


def _name_process(name: str) -> None:
    """Set this process's name (``/proc/self/comm``, what ``ps -o comm`` and ``pgrep`` show);
    nothing where there is no such file."""
    with contextlib.suppress(OSError):
        with open("/proc/self/comm", "w", encoding="ascii") as comm:
            comm.write(name)


def _read_text(path: str) -> str | None:
    """The text of ``path``, or None when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, ValueError):
        return None


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


def _discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- starting workers --------------------------------------------------------------------


def _open_output(log_file: str):
    try:
        _private_file(log_file)
        return open(log_file, "ab")
    except OSError:
        return open(os.devnull, "wb")


def handler_command(config_path: str) -> list[str]:
    """The command line of ``fireap-reap --config config_path`` run by this interpreter
    from these very files: what the role's entry point runs, without the entry point."""
    return [sys.executable, "-c", _ENTRY_PROGRAM, IMPORT_ROOT, "--config", os.path.abspath(config_path)]


def start_worker(config_path: str, app: str, log_file: str) -> int:
    """Start ``fireap-reap --config config_path --worker app`` detached, as a fork of this
    process: new session, stdin from /dev/null, output appended to ``log_file``; return its
    pid once the child is detached, without waiting for the worker.

    A fork, not a new interpreter, as the imports are done: a worker run that fails at once
    (Consul unreachable) took 0.04 s of CPU forked and 0.25 to 0.37 s as a new interpreter on
    the test host, what a host of many nodes, or a busy node, saves at every release. The
    child keeps every open descriptor: call this with no lock held and no Consul connection
    open, from a process with one thread.
    """
    with _open_output(log_file) as output:
        sys.stdout.flush()
        sys.stderr.flush()
        detached, signal = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:
                os.close(detached)
                _worker_child(output.fileno(), signal, config_path, app)
            os.close(signal)
            signal = -1
            os.read(detached, 1)  # end of file: the child closed its end once detached, or ended
        finally:
            os.close(detached)
            if signal >= 0:
                os.close(signal)
    return pid


def _worker_child(output: int, signal: int, config_path: str, app: str) -> NoReturn:
    """The forked worker: detach (then close ``signal``, which its parent waits on), run
    ``--worker app``, and end without returning into the handler's code (``os._exit``:
    nothing of the handler's is cleaned up twice)."""
    rc = EXIT_USAGE
    try:
        os.setsid()
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        os.chdir("/")
        _name_process(WORKER_PROCESS_NAME)
        os.close(signal)
        rc = main(["--config", config_path, "--worker", app])
    except BaseException:  # the log gets it; the child ends here either way
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


def request_worker(state_dir: str, app: str) -> bool:
    """Make sure a worker for ``app`` will look at the release again; True when one must be
    started, False when a running worker will do it.

    The pending marker is left before looking at the lock: a worker that is about to end
    checks for it after letting its lock go, so no request is lost in between.
    """
    _touch(_pending_path(state_dir, app))
    with _flock(_worker_lock_path(state_dir, app), blocking=False) as held:
        return held is not None


def start_workers(starts: list[tuple[str, logging.LoggerAdapter]], spawn: Callable[[str, str, str], int],
                  config_path: str, log_file: str) -> int:
    """Start a worker for each ``(app, log)`` of ``starts`` with ``spawn(config_path, app,
    log_file)``; EXIT_UNCHECKED when one could not be started, else EXIT_OK."""
    rc = EXIT_OK
    for app, log in starts:
        try:
            pid = spawn(config_path, app, log_file)
        except OSError as err:
            log.error("cannot start a worker: %s", err)
            rc = EXIT_UNCHECKED
            continue
        log.info("worker started (pid %d)", pid)
    return rc


# --- the handler -------------------------------------------------------------------------


@dataclass
class _Handler:
    config: TaskConfig
    options: ConsulOptions
    client: object
    node: str
    dry_run: bool
    out: TextIO
    #: The apps whose worker must be started, with their log: main() starts them once the
    #: handler is done (see start_worker).
    starts: list[tuple[str, logging.LoggerAdapter]] = field(default_factory=list)

    def run(self, text: str) -> int:
        events, rejected = parse_events(text)
        if self.dry_run:
            return self.process(events, rejected, processed=[])
        state_dir = self.config.state_dir
        path = os.path.join(state_dir, PROCESSED_FILE)
        with contextlib.ExitStack() as stack:
            try:
                private_dir(state_dir)
                # Serialises handlers (a manual run beside the watch's) around the record.
                stack.enter_context(_flock(os.path.join(state_dir, HANDLER_LOCK_FILE), blocking=True))
            except OSError as err:
                _log.error("cannot use state_dir %s: %s", state_dir, err.strerror or err)
                return EXIT_USAGE
            processed, warning = load_processed(path)
            if warning:
                _log.warning("%s", warning)
            rc = self.process(events, rejected, processed)
            updated = remember(processed, [item.id for item in [*events, *rejected] if item.id is not None])
            if updated != processed:
                try:
                    save_processed(path, updated)
                except OSError as err:
                    _log.error("cannot record the handled events in %s: %s", path, err.strerror or err)
                    return EXIT_USAGE
            return rc

    def process(self, events: list[TaskEvent], rejected: list[RejectedEvent], processed: list[str]) -> int:
        known = set(processed)
        new = [event for event in events if event.id not in known]
        new_rejected = [item for item in rejected if item.id is None or item.id not in known]
        _log.info("invoked with %d event(s), %d new; node %s, apps: %s", len(events) + len(rejected),
                  len(new) + len(new_rejected), self.node, ", ".join(self.config.apps) or "none")
        for item in new_rejected:
            _log.warning("%s", item.reason)
        configured = []
        for event in new:
            if event.app in self.config.apps:
                configured.append(event)
            else:
                _context(event.app, event.version).warning(
                    "event %s names app %s, which is not configured on this node; skipped", event.id, event.app)
        newest = newest_per_app(configured)
        if self.dry_run:
            self.out.write(f"fireap-reap dry run on node {self.node}: {len(new)} new event(s)\n")
        rc = EXIT_OK
        for app in self.config.apps:
            if not self.check(app, newest.get(app)):
                rc = EXIT_UNCHECKED
        if not self.advertise(woken=bool(new or new_rejected)):
            rc = EXIT_UNCHECKED
        return rc

    def advertise(self, woken: bool) -> bool:
        """Write this node's advert of its apps when the one in KV differs; False when Consul
        could not be asked. ``woken``: the call brings new events, so the watch did not just
        start: KV is read only when the config differs from the advert last written."""
        text = self.config.advert().to_json()
        cache = os.path.join(self.config.state_dir, ADVERT_FILE)
        if woken and not self.dry_run and _read_text(cache) == text:
            return True
        key = Schema(self.config.kv_prefix).advert(self.node)
        apps = ", ".join(self.config.apps) or "none"
        try:
            current = _Reader(self.client, self.options).value(key)
            if current is not None and current.decode("utf-8", "replace") == text:
                if self.dry_run:
                    self.out.write(f"advert {key} is current (apps: {apps})\n")
            elif self.dry_run:
                self.out.write(f"advert {key} would be written (apps: {apps})\n")
            else:
                with consul_errors(self.options, f"writing {key}"):
                    self.client.kv.put(key, text)
                _log.info("advertised this node's apps in %s: %s", key, apps)
        except FireapError as err:
            _log.error("cannot advertise this node's apps in %s: %s; the leader goes by the advert there until "
                       "the next agent start or reload", key, err)
            return False
        if not self.dry_run:
            try:
                write_atomic(cache, text.encode("utf-8"), 0o600)
            except OSError as err:
                _log.warning("cannot keep the advert in %s: %s", cache, err.strerror or err)
        return True

    def check(self, app: str, event: TaskEvent | None) -> bool:
        log = _context(app, event.version if event else "-")
        if event is not None:
            log.info("event %s (LTime %d) asks for version %s", event.id, event.ltime, event.version)
        try:
            result = check_app(self.client, self.options, Schema(self.config.kv_prefix), app, self.node, log)
        except FireapError as err:
            log.error("cannot check the release: %s; it is checked again at the next event or agent reload", err)
            if self.dry_run:
                self.out.write(f"{app}: could not be checked: {err}\n")
            return False
        if result.run_id is not None:
            log = _context(app, result.version)
        if event is not None and result.release is not None and event.version != result.release.version:
            log.info("the release record names version %s (run %s), not the event's %s: following the record",
                     result.release.version, result.release.run_id, event.version)
        if not result.start:
            (log.info if event is not None else log.debug)("nothing to do: %s", result.reason)
            if self.dry_run:
                self.out.write(f"{app}: nothing to do: {result.reason}\n")
            return True
        if self.dry_run:
            self.print_commands(result)
            return True
        log.info("%s: starting a worker", result.reason)
        try:
            needed = request_worker(self.config.state_dir, app)
        except OSError as err:
            log.error("cannot start a worker: %s", err)
            return False
        if needed:
            self.starts.append((app, log))
        else:
            log.info("a worker for this app is running already; it will pull again")
        return True

    def print_commands(self, result: AppCheck) -> None:
        self.out.write(f"{result.app}: would start a worker: {result.reason}\n")
        if result.release is None:
            return
        if result.serving is not None:
            self.out.write("  it would serve the artifact to the run's targets; the leader runs no commands\n")
            return
        app_config = self.config.app(result.app)
        problem = verification_problem(app_config, result.release.checksum)
        if problem is not None:
            self.out.write(f"  the pull would fail: {problem}\n")
            return
        artifact = app_config.artifact
        try:
            variables = CommandVariables(
                app=result.app, version=result.release.version, node=self.node,
                remote_name=None if artifact else DRY_RUN_SOURCE.name,
                remote_address=None if artifact else DRY_RUN_SOURCE.address,
                checksum=result.release.checksum,
                artifact=artifact_path(artifact.path, result.app, result.release.version) if artifact else None,
            )
            commands = render_phases(app_config, variables)
        except (FireapError, ValueError) as err:
            self.out.write(f"  cannot render the commands: {err}\n")
            return
        for label, command in commands:
            self.out.write(f"  {label}: {command}\n")


# --- the worker --------------------------------------------------------------------------


def _pulling_state(reader: _Reader, key: str, source: str) -> NodeState:
    """This node's record of the pull under way: its version and run. The pull records it as
    ``pulling`` from ``source`` just before the task runs, taken from the release it read
    last, which may be newer than the one the worker checked."""
    state = reader.record(NodeState, key)
    if state is None or state.status != NODE_PULLING or state.source != source:
        shown = "nothing" if state is None else f"status {state.status} from {state.source}"
        raise InvalidValue(f"{key} records {shown}, not a pull from {source}")
    return state


def _run_release(reader: _Reader, key: str, checked: ReleaseRecord | None, run_id: str) -> ReleaseRecord:
    """The release record of run ``run_id``: ``checked`` (the one the worker decided on) when
    it is that run's, else the record in KV; InvalidValue when the run is no longer the release's."""
    if checked is not None and checked.run_id == run_id:
        return checked
    release = reader.record(ReleaseRecord, key)
    if release is None or release.run_id != run_id:
        shown = "no release" if release is None else f"run {release.run_id}"
        raise InvalidValue(f"{key} records {shown}, not the run {run_id} being pulled")
    return release


class _Outcome:
    """What one step of a worker came to."""

    UNCHECKED = "unchecked"  # Consul or the records did not let the release be checked
    IDLE = "idle"  # nothing (new) to pull
    PULLED = "pulled"
    FAILED = "failed"  # the pull ended failed or could not go on


class _AppWorker:
    """The worker process of one app (``fireap-reap --worker APP``): pulls while there is
    something to pull, holding the app's worker lock."""

    def __init__(self, config: TaskConfig, app_config: AppConfig, options: ConsulOptions, client, node: str) -> None:
        self.config = config
        self.app_config = app_config
        self.app = app_config.name
        self.options = options
        self.client = client
        self.node = node
        self.schema = Schema(config.kv_prefix)
        self.timings = PullTimings(watch_timeout=app_config.watch_timeout)

    def run(self) -> int:
        """Pull while there is something to pull, as the only worker of this app."""
        state_dir = self.config.state_dir
        lock_path = _worker_lock_path(state_dir, self.app)
        pending = _pending_path(state_dir, self.app)
        attempted: set[str] = set()
        rc = EXIT_OK
        try:
            private_dir(state_dir)
        except OSError as err:
            _context(self.app).error("cannot use state_dir %s: %s", state_dir, err.strerror or err)
            return EXIT_USAGE
        while True:
            with _flock(lock_path, blocking=False) as locked:
                if locked is None:
                    _context(self.app).info("another worker for this app is running; it will pull again")
                    return rc
                _record_pid(locked)
                while True:
                    _discard(pending)
                    outcome = self.step(attempted)
                    if outcome != _Outcome.IDLE:
                        rc = max(rc, EXIT_OK if outcome == _Outcome.PULLED else EXIT_UNCHECKED)
                    if outcome in (_Outcome.PULLED, _Outcome.FAILED):
                        continue  # a newer run may have been fired meanwhile: check again
                    if not os.path.exists(pending):
                        break
            # A request left while the lock was being let go: take the lock again if free.
            if not os.path.exists(pending):
                return rc

    def step(self, attempted: set[str]) -> str:
        """Check the release; pull it once if this node is behind and this worker has not
        tried that run yet (a failed run is not retried until it is fired again)."""
        log = _context(self.app)
        try:
            result = retry_transient(
                lambda: check_app(self.client, self.options, self.schema, self.app, self.node, log), log=log.warning
            )
        except FireapError as err:
            log.error("cannot check the release: %s", err)
            return _Outcome.UNCHECKED
        if result.run_id is not None:
            log = _context(self.app, result.version)
        if not result.start:
            log.info("nothing to do: %s", result.reason)
            return _Outcome.IDLE
        if result.attempt in attempted:
            log.info("run %s was tried by this worker already; not again", result.run_id)
            return _Outcome.IDLE
        attempted.add(result.attempt)
        return self.run_pull(result)

    def refusal(self) -> str | None:
        """Why this node does not take the app: its service/tag filters match none of the
        services of the node's own agent (None: it takes it)."""
        advert = self.app_config.advert()
        if advert.service_filter is None:
            return None

        def read() -> dict:
            with consul_errors(self.options, "reading /v1/agent/services"):
                return self.client.agent.services() or {}

        try:
            services = retry_transient(read, log=_context(self.app).warning)
        except FireapError as err:
            return f"cannot read this node's services to apply the app's filters: {err}"
        local = [(entry["Service"], [tag for tag in entry.get("Tags") or () if isinstance(tag, str)])
                 for entry in services.values() if isinstance(entry, dict) and isinstance(entry.get("Service"), str)]
        if advert.accepts(local):
            return None
        filters = f"service filter {show(advert.service_filter)}"
        if advert.tag_filter is not None:
            filters += f" with tag filter {show(advert.tag_filter)}"
        names = ", ".join(sorted({name for name, _tags in local})) or "none"
        return (f"not pulled: the app's {filters} matches none of this node's services ({names}); fix the node's "
                "services or the app's filters, then fire again")

    def run_task(self, checked: ReleaseRecord | None, source: SourceInfo) -> tuple[bool, str | None]:
        """The pull's task: the app's commands and its verification against the release's
        checksum, run against ``source``, if this node takes the app. ``checked``: the
        release the worker decided on (its checksum, when the pull is at that run)."""
        refusal = self.refusal()
        if refusal is not None:
            return False, refusal
        reader = _Reader(self.client, self.options)
        warn = _context(self.app).warning
        try:
            state = retry_transient(lambda: _pulling_state(reader, self.schema.node(self.app, self.node), source.name),
                                    log=warn)
        except (FireapError, ValueError) as err:
            return False, f"cannot tell which version is being pulled: {err}"
        try:
            release = retry_transient(
                lambda: _run_release(reader, self.schema.release(self.app), checked, state.run_id), log=warn)
        except (FireapError, ValueError) as err:
            return False, f"cannot read the checksum of the run being pulled: {err}"
        variables = CommandVariables(app=self.app, version=state.version, node=self.node, remote_name=source.name,
                                     remote_address=source.address, checksum=release.checksum)
        outcome = run_phases(self.app_config, variables, log=_context(self.app, state.version))
        return outcome.ok, outcome.error

    def run_artifact(self, release: ReleaseRecord, path: str) -> tuple[bool, str | None]:
        """The task of an app with an artifact: its commands with ``{{ artifact }}`` = ``path``
        (fetched and verified already), if this node takes the app."""
        refusal = self.refusal()
        if refusal is not None:
            return False, refusal
        variables = CommandVariables(app=self.app, version=release.version, node=self.node,
                                     checksum=release.checksum, artifact=path)
        outcome = run_phases(self.app_config, variables, log=_context(self.app, release.version))
        return outcome.ok, outcome.error

    def run_swarm(self, release: ReleaseRecord) -> str:
        """Take part in the swarm of the checked release once (``_swarm_worker.serve``)."""
        # Imported here: the handler, a process per event on every node, never needs the swarm
        # (nor the firing code it wakes a leader with); only a worker of a swarm release does.
        from ansible_collections.fireap.consul.plugins.module_utils._swarm_worker import serve

        log = _context(self.app, release.version)
        artifact = self.app_config.artifact
        log.info("joining the swarm of run %s", release.run_id)
        try:
            ok, reason = serve(self.client, release, self.node, artifact, functools.partial(self.run_artifact, release),
                               schema=self.schema, timeout=self.app_config.watch_timeout,
                               upload_slots=self.app_config.max_semaphores, log=log.info)
        except FireapError as err:
            log.error("the swarm stopped: %s", err)
            return _Outcome.FAILED
        if not ok:
            log.error("failed: %s", reason)
            return _Outcome.FAILED
        log.info("%s", reason)
        return _Outcome.PULLED

    def run_pull(self, check: AppCheck) -> str:
        """Pull the checked release once; what it came to (an _Outcome)."""
        release = check.release
        if release is not None and (release.artifact is not None or self.app_config.artifact is not None):
            return self.run_swarm(release)
        log = _context(self.app, check.version)
        if check.release is not None:
            log.info("pulling run %s (fan-out %d)", check.release.run_id, check.release.fanout)
        try:
            result = pull(self.client, self.app, self.node, functools.partial(self.run_task, check.release),
                          schema=self.schema, timings=self.timings, log=log.info)
        except FireapError as err:
            log.error("the pull stopped: %s", err)
            return _Outcome.FAILED
        if result.failed:
            log.error("failed: %s", result.reason)
            return _Outcome.FAILED
        return _Outcome.PULLED


# --- entry point -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fireap-reap",
        description=f"Handler of the Consul watch on the {EVENT_NAME} user event: reads the events on stdin, "
                    "checks every configured app's release and starts a pull worker where this node is behind.",
        epilog="Exit codes: 0 ok, 1 some app could not be checked (or a worker's pull failed), "
               "2 bad usage, invalid config or unusable state_dir.",
    )
    default = os.environ.get(CONFIG_PATH_ENV) or DEFAULT_PATH
    parser.add_argument("--config", default=default,
                        help=f"the task config file (default: ${CONFIG_PATH_ENV}, else {DEFAULT_PATH}; now {default})")
    parser.add_argument("--debug", action="store_true", help="log at level debug, whatever the config's log_level")
    parser.add_argument("--json", action="store_true", help="with --list: print the list as one JSON object")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print what would be started, with the rendered commands; start and write nothing")
    mode.add_argument("--check", action="store_true", help="validate the config file and exit (0 valid, 2 invalid)")
    mode.add_argument("--list", action="store_true",
                      help="validate the config file and list its apps with their settings and commands")
    mode.add_argument("--worker", metavar="APP", help="pull APP (the handler starts this itself)")
    return parser


def _valid_config(path: str) -> TaskConfig | None:
    """The config file at ``path`` if it is valid, its Consul connection options included;
    else None, after saying why on stderr."""
    try:
        config = load_config(path)
        ConsulOptions.from_config(config.consul)
    except (ConfigError, ConsulOptionsError) as err:
        prefix = "" if isinstance(err, ConfigError) else f"{path}: consul: "
        sys.stderr.write(f"fireap-reap: invalid config:\n{prefix}{err}\n")
        return None
    return config


def check_config(path: str, out=None) -> int:
    """``--check``: validate the config file, including its Consul connection options."""
    out = out or sys.stdout
    config = _valid_config(path)
    if config is None:
        return EXIT_USAGE
    out.write(f"{path}: valid; apps: {', '.join(config.apps) or 'none'}\n")
    return EXIT_OK


#: The settings ``--list`` shows as table columns; the commands follow the table, app by app.
LIST_COLUMNS = ("max_semaphores", "watch_timeout", "command_timeout", "on_command_failure", "service_filter",
                "tag_filter")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return escape_controls(str(value))


def list_text(config: TaskConfig) -> str:
    """The ``--list`` table: a row of settings per app, then each app's commands in the
    order they run, as configured (one line each: control characters are escaped)."""
    listings = {name: app.listing() for name, app in config.apps.items()}
    lines = [f"{config.source}: {len(listings)} app(s); log_level {config.log_level}"]
    if listings:
        rows = [("APP", *(column.upper() for column in LIST_COLUMNS))]
        rows += [(name, *(_cell(listing[column]) for column in LIST_COLUMNS)) for name, listing in listings.items()]
        widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for name, listing in listings.items():
        lines += ["", f"{name}:"]
        for phase in PHASES:
            if phase == VERIFY_PHASE and listing["verify_file"] is not None:
                lines.append(f"  verify_file: {escape_controls(listing['verify_file'])}")
            lines += [f"  {phase}: {escape_controls(command)}" for command in listing[phase]]
    return "\n".join(lines) + "\n"


def list_json(config: TaskConfig) -> str:
    """The ``--list --json`` object: the config file, its log_level and each app's settings, in config order."""
    apps = {name: app.listing() for name, app in config.apps.items()}
    return json.dumps({"config": config.source, "log_level": config.log_level, "apps": apps}, indent=2) + "\n"


def list_config(path: str, as_json: bool, out=None) -> int:
    """``--list``: validate the config file as ``--check`` does, then list its apps."""
    out = out or sys.stdout
    config = _valid_config(path)
    if config is None:
        return EXIT_USAGE
    out.write(list_json(config) if as_json else list_text(config))
    return EXIT_OK


def _read_stdin() -> str:
    stream = sys.stdin
    if stream is None or stream.closed or stream.isatty():
        return ""
    raw = getattr(stream, "buffer", None)
    return raw.read().decode("utf-8", errors="replace") if raw is not None else stream.read()


def _node_name(config: TaskConfig, client, options: ConsulOptions) -> str:
    """This node's name: the config's node_name, else the agent's NodeName (ValueError if unfit for KV keys)."""
    if config.node_name:
        return config.node_name
    with consul_errors(options, "reading /v1/agent/self"):
        # py-consul's agent.self() sends no X-Consul-Token: pass the client's token here.
        name = client.http.get(CB.json(), "/v1/agent/self", headers=client.prepare_headers())["Config"]["NodeName"]
    try:
        return check_name(name, "node")
    except ValueError as err:
        raise InvalidValue(f"{err}: set node_name in {config.source} to a name usable in KV keys") from None


def main(argv=None, spawn: Callable[[str, str, str], int] = start_worker, out=None) -> int:
    """Run fireap-reap with ``argv`` (default: the command line); return the exit code.

    ``spawn(config_path, app, log_file)`` starts a worker and returns its pid;
    ``out`` receives --check, --list and --dry-run output (default stdout).
    """
    if argv is None:
        # A process of its own (handler or worker): keep the garbage collector off the objects
        # of the imports. Without this a worker's full collections, which walk all of them,
        # took about a tenth of the machine's CPU while 30 nodes of one test host downloaded.
        gc.freeze()
    out = out or sys.stdout
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.json and not args.list:
            parser.error("--json goes with --list")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.check:
        return check_config(args.config, out)
    if args.list:
        return list_config(args.config, args.json, out)
    if PY_CONSUL_IMPORT_ERROR is not None:
        sys.stderr.write(f"fireap-reap needs py-consul: {PY_CONSUL_IMPORT_ERROR}\n")
        return EXIT_USAGE
    try:
        config = load_config(args.config)
        options = ConsulOptions.from_config(config.consul)
        if args.worker:
            check_app_name(args.worker)
            app_config = config.app(args.worker)
    except (ConfigError, ConsulOptionsError, ValueError) as err:
        # Connection options are checked apart from the file: name where they come from.
        where = f"{args.config}: consul: " if isinstance(err, ConsulOptionsError) else ""
        sys.stderr.write(f"fireap-reap: {where}{err}\n")
        return EXIT_USAGE
    level = logging.DEBUG if args.debug else log_level(config.log_level)
    warning = configure_logging(None if args.dry_run else config.log_file, level)
    if warning:
        _log.warning("%s", warning)
    text = "" if args.worker else _read_stdin()
    try:
        client = build_client(options)
    except FireapConsulError as err:
        _log.error("%s", err)
        return EXIT_USAGE
    try:
        try:
            node = _node_name(config, client, options)
        except FireapConsulError as err:
            _log.error("cannot learn this node's name: %s", err)
            return EXIT_UNCHECKED
        except ValueError as err:
            _log.error("%s", err)
            return EXIT_USAGE
        if args.worker:
            return _AppWorker(config, app_config, options, client, node).run()
        handler = _Handler(config, options, client, node, args.dry_run, out)
        rc = handler.run(text)
    finally:
        client.http.close()
    # Now that the handler let its lock go and closed its connection (see start_worker).
    return max(rc, start_workers(handler.starts, spawn, os.path.abspath(args.config), config.log_file))
