"""Agent watches of type "event", run the way Consul's api/watch package runs them.

A watch plan loops over `GET /v1/event/list?name=X&index=<last>`: it keeps the
index of the newest event it saw, prunes the returned ring to the events after
that one, and calls the handler when the index or the result changed.  The
event index is a hash of the newest event's UUID, not a counter, so when it
"goes backwards" the plan resets to 0 and may hand the whole buffer to the
handler again: real agents do that too, and handlers must be idempotent.

Handlers are child processes fed through pipes and reaped through a pidfd, so a
thousand agents need no thread per running handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# Consul keeps the last 4 KB of a handler's output (agent/watch_handler.go).
OUTPUT_CAPTURE_BYTES = 4 * 1024
# Watch parameters Consul's watch.Parse accepts for every type, plus "name" for events.
_COMMON_PARAMS = {"type", "datacenter", "token", "args", "handler", "handler_type", "http_handler_config", "stale"}
_KNOWN_TYPES = {
    "key",
    "keyprefix",
    "services",
    "nodes",
    "service",
    "checks",
    "event",
    "connect_roots",
    "connect_leaf",
    "agent_service",
}


class WatchConfigError(ValueError):
    """A watch definition Consul would refuse to load."""


class UnsupportedWatch(ValueError):
    """A valid watch definition the double does not run (logged, then skipped)."""


@dataclass(frozen=True)
class WatchSpec:
    """One `type: event` watch definition from an agent config file."""

    name: str
    args: tuple[str, ...] | None
    shell: str | None
    source: str

    def command(self) -> list[str]:
        return list(self.args) if self.args is not None else ["/bin/sh", "-c", self.shell or ""]

    def describe(self) -> str:
        return shlex.join(self.args) if self.args is not None else repr(self.shell)


def parse_watch(params: Any, source: str) -> WatchSpec:
    """Validate one entry of a config file's "watches" list."""
    if not isinstance(params, dict):
        raise WatchConfigError(f"{source}: a watch must be an object, got {type(params).__name__}")
    watch_type = params.get("type")
    if not isinstance(watch_type, str) or not watch_type:
        raise WatchConfigError(f"{source}: Watch type must be specified")
    if watch_type not in _KNOWN_TYPES:
        raise WatchConfigError(f"{source}: Unsupported watch type: {watch_type}")
    handler_type = params.get("handler_type", "script")
    if handler_type not in ("script", "http"):
        raise WatchConfigError(f"{source}: Handler type '{handler_type}' not recognized")
    if watch_type != "event":
        raise UnsupportedWatch(f"{source}: watch type {watch_type!r} is not supported by devcluster (only 'event')")
    unknown = sorted(set(params) - _COMMON_PARAMS - {"name"})
    if unknown:
        raise WatchConfigError(f"{source}: Invalid parameters: {unknown}")
    if handler_type == "http":
        raise UnsupportedWatch(f"{source}: http watch handlers are not supported by devcluster (only script)")
    args, shell = params.get("args"), params.get("handler")
    if args is not None and shell is not None:
        raise WatchConfigError(f"{source}: Only one watch handler allowed")
    if args is None and shell is None:
        raise WatchConfigError(f"{source}: Must define a watch handler")
    if args is not None and (not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args)):
        raise WatchConfigError(f"{source}: Watch args must be a non-empty list of strings")
    if shell is not None and (not isinstance(shell, str) or not shell):
        raise WatchConfigError(f"{source}: Watch handler must be a non-empty string")
    name = params.get("name", "")
    if not isinstance(name, str):
        raise WatchConfigError(f"{source}: Watch event name must be a string")
    return WatchSpec(name=name, args=tuple(args) if args is not None else None, shell=shell, source=source)


def event_index(event_id: str) -> int:
    """Consul's uuidToUint64: XOR of the two 64-bit halves of an event UUID."""
    low = int(event_id[0:8] + event_id[9:13] + event_id[14:18], 16)
    high = int(event_id[19:23] + event_id[24:36], 16)
    return low ^ high


ListEvents = Callable[[str, int], Awaitable[tuple[int, list[dict[str, Any]]]]]
Logger = Callable[[str, str], None]


class EventWatchPlan:
    """A running watch: Consul's Plan.RunWithClientAndHclog with eventWatch."""

    def __init__(self, spec: WatchSpec, list_events: ListEvents, runner: HandlerRunner) -> None:
        self.spec = spec
        self._list_events = list_events
        self._runner = runner
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        last_param: int | None = None
        last_result: list[dict[str, Any]] | None = None
        while True:
            index, events = await self._list_events(self.spec.name, last_param or 0)
            # eventWatch: prune the ring to the events after the last one seen.
            if last_param is not None:
                for i, event in enumerate(events):
                    if event_index(event["ID"]) == last_param:
                        events = events[i + 1 :]
                        break
            if last_param is not None and last_param == index:
                continue
            previous = last_param
            # WaitIndexVal.Next: an index smaller than the previous one resets to 0.
            last_param = 0 if previous is not None and previous > index else index
            if previous is not None and events == last_result:
                continue
            last_result = events
            # Stopping the watch (agent stop, reload) does not kill a handler already running.
            await asyncio.shield(self._runner.start(self.spec, index, events))


class HandlerRunner:
    """Runs script handlers like agent/watch_handler.go: stdin JSON, CONSUL_INDEX, output logged."""

    def __init__(self, log: Logger) -> None:
        self._log = log
        self._running: set[subprocess.Popen[bytes]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, spec: WatchSpec, index: int, events: list[dict[str, Any]]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._run(spec, index, events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, spec: WatchSpec, index: int, events: list[dict[str, Any]]) -> None:
        payload = (json.dumps(events, separators=(",", ":")) + "\n").encode("utf-8")
        env = dict(os.environ, CONSUL_INDEX=str(index))
        try:
            proc = subprocess.Popen(
                spec.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
            )
        except OSError as err:
            self._log("ERROR", f"agent.watch: Failed to run watch handler: handler={spec.describe()} error={err}")
            return
        self._running.add(proc)
        try:
            output, total, status = await _communicate(proc, payload)
        finally:
            self._running.discard(proc)
        text = output.decode("utf-8", errors="replace")
        if total > len(output):
            text = f"Captured {len(output)} of {total} bytes\n...\n{text}"
        if status != 0:
            self._log(
                "ERROR",
                f'agent.watch: Failed to run watch handler: handler={spec.describe()} error="exit status {status}"',
            )
        self._log("DEBUG", f"agent.watch: watch handler output: handler={spec.describe()} output={text!r}")

    async def shutdown(self, grace_seconds: float) -> None:
        """Cluster shutdown: SIGTERM handlers still running, SIGKILL them after the grace period."""
        for proc in list(self._running):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        if pending:
            for proc in list(self._running):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.wait(pending)


async def _communicate(proc: subprocess.Popen[bytes], payload: bytes) -> tuple[bytes, int, int]:
    """Feed stdin, collect the tail of stdout and wait for exit without blocking the loop."""
    loop = asyncio.get_running_loop()
    assert proc.stdin is not None and proc.stdout is not None
    stdin_fd, stdout_fd = proc.stdin.fileno(), proc.stdout.fileno()
    os.set_blocking(stdin_fd, False)
    os.set_blocking(stdout_fd, False)
    stdin_done: asyncio.Future[None] = loop.create_future()
    stdout_done: asyncio.Future[None] = loop.create_future()
    exited: asyncio.Future[None] = loop.create_future()
    tail = bytearray()
    total = 0
    remaining = memoryview(payload)

    def finish_stdin() -> None:
        loop.remove_writer(stdin_fd)
        proc.stdin.close()  # type: ignore[union-attr]
        if not stdin_done.done():
            stdin_done.set_result(None)

    def on_writable() -> None:
        nonlocal remaining
        try:
            written = os.write(stdin_fd, remaining)
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            finish_stdin()
            return
        remaining = remaining[written:]
        if not remaining:
            finish_stdin()

    def on_readable() -> None:
        nonlocal total
        try:
            chunk = os.read(stdout_fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            loop.remove_reader(stdout_fd)
            proc.stdout.close()  # type: ignore[union-attr]
            if not stdout_done.done():
                stdout_done.set_result(None)
            return
        total += len(chunk)
        tail.extend(chunk)
        if len(tail) > OUTPUT_CAPTURE_BYTES:
            del tail[: len(tail) - OUTPUT_CAPTURE_BYTES]

    def on_exit() -> None:
        if proc.poll() is not None and not exited.done():
            exited.set_result(None)

    if payload:
        loop.add_writer(stdin_fd, on_writable)
    else:
        finish_stdin()
    loop.add_reader(stdout_fd, on_readable)
    pidfd: int | None = None
    poller: asyncio.TimerHandle | None = None
    try:
        pidfd = os.pidfd_open(proc.pid)
        loop.add_reader(pidfd, on_exit)
    except (AttributeError, OSError):
        # No pidfd (old kernel): poll for the exit instead.
        def poll() -> None:
            nonlocal poller
            on_exit()
            if not exited.done():
                poller = loop.call_later(0.05, poll)

        poll()
    try:
        await asyncio.gather(stdin_done, stdout_done, exited)
    finally:
        if pidfd is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        if poller is not None:
            poller.cancel()
        if not stdin_done.done():
            finish_stdin()
        if not stdout_done.done():
            loop.remove_reader(stdout_fd)
            proc.stdout.close()
    return bytes(tail), total, proc.returncode
