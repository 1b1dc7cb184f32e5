# SPDX-License-Identifier: MIT
"""The record of handled events: the IDs of the FIREAP:TASK events a node's handler has seen.

The agent hands its whole event buffer over again at watch start and at every reload; the
handler drops the events whose ID it recorded. The IDs are kept, oldest first and bounded,
as ``{"ids": [...]}`` in ``<state_dir>/processed-events.json``, replaced atomically. An
unusable file is ignored with a warning: at worst an old event wakes the handler again,
and the release record still decides.

Only the standard library: nodes run this without Ansible.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterable

#: Event IDs remembered as handled. Consul buffers the last 256 events of all names, so a
#: replay never reaches further back than this.
PROCESSED_LIMIT = 1024
PROCESSED_FILE = "processed-events.json"


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    directory = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_processed(path: str) -> tuple[list[str], str | None]:
    """The handled event IDs, oldest first, and a warning when the file was unusable."""
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        return [], None
    except (OSError, ValueError) as err:
        return [], f"ignoring the record of handled events {path}: {err}"
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids):
        return [], f"ignoring the record of handled events {path}: expected {{\"ids\": [strings]}}"
    return ids, None


def remember(processed: list[str], new_ids: Iterable[str], limit: int = PROCESSED_LIMIT) -> list[str]:
    """``processed`` with ``new_ids`` appended (each once), cut to the newest ``limit``."""
    known = set(processed)
    result = list(processed)
    for event_id in new_ids:
        if event_id not in known:
            known.add(event_id)
            result.append(event_id)
    return result[-limit:]


def save_processed(path: str, ids: list[str]) -> None:
    write_atomic(path, json.dumps({"ids": ids}, separators=(",", ":")).encode("utf-8") + b"\n")
