"""Durable cluster state: a snapshot plus an append-only journal of applied changes.

Every Raft apply appends one JSON line and hands it to the OS before the HTTP
response goes out, so the state survives SIGKILL of the process (not a power
loss: there is no fsync per write, as benchmarks would measure the disk).  At
start the snapshot is loaded, the journal replayed, and both are compacted into
a fresh snapshot; a torn last line (a write cut short) is dropped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .state import ConsulState

SNAPSHOT_FILE = "snapshot.json"
JOURNAL_FILE = "journal.jsonl"
SNAPSHOT_VERSION = 1

log = logging.getLogger(__name__)


class PersistenceError(Exception):
    """The data dir holds something this version cannot read."""


class Journal:
    """Writes applied changes of one ConsulState to a data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._fd: int | None = None

    @property
    def snapshot_path(self) -> Path:
        return self.data_dir / SNAPSHOT_FILE

    @property
    def journal_path(self) -> Path:
        return self.data_dir / JOURNAL_FILE

    def restore(self, state: ConsulState) -> int:
        """Load snapshot and journal into a fresh state; returns the number of replayed records."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.snapshot_path.exists():
            try:
                snapshot = json.loads(self.snapshot_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise PersistenceError(f"{self.snapshot_path}: not a valid snapshot: {err}") from None
            if snapshot.get("version") != SNAPSHOT_VERSION:
                raise PersistenceError(
                    f"{self.snapshot_path}: snapshot version {snapshot.get('version')!r}, expected {SNAPSHOT_VERSION}"
                )
            state.load_snapshot(snapshot["state"])
        replayed = 0
        if self.journal_path.exists():
            lines = self.journal_path.read_bytes().split(b"\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if number >= len(lines) - 1:
                        log.warning("%s: dropping a torn last record (line %d)", self.journal_path, number)
                        break
                    raise PersistenceError(f"{self.journal_path}:{number}: corrupt record") from None
                state.apply_record(record)
                replayed += 1
        return replayed

    def compact(self, state: ConsulState) -> None:
        """Write the whole state as the new snapshot and start an empty journal."""
        self.close()
        data = json.dumps({"version": SNAPSHOT_VERSION, "state": state.to_snapshot()}, separators=(",", ":"))
        tmp = self.snapshot_path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.snapshot_path)
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        os.fsync(self._fd)

    def append(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise PersistenceError("journal is not open: call compact() first")
        os.write(self._fd, json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n")

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
