# SPDX-License-Identifier: MIT
"""Clearing an app's release state: lift its fire lock, abort its run, or wipe its keys (fireap_clear).

Plain logic over a py-consul client; py-consul and requests exceptions are left to the
caller, which wraps the call in ``_connection.consul_errors``.
"""

from __future__ import annotations

from dataclasses import replace

from ansible_collections.fireap.consul.plugins.module_utils._errors import InvalidValue
from ansible_collections.fireap.consul.plugins.module_utils._kv import RELEASE_ABORTED, RELEASE_RUNNING, Schema
from ansible_collections.fireap.consul.plugins.module_utils._progress import (
    ReleaseError,
    lock_info,
    read_lock,
    read_release,
)
from ansible_collections.fireap.consul.plugins.module_utils._validation import LINE_MAX_LENGTH, check_name, check_text

DEFAULT_ABORT_REASON = "aborted with fireap_clear"


def clear(
    client,
    schema: Schema,
    app: str,
    lift_lock: bool = True,
    abort: bool = False,
    wipe: bool = False,
    reason: str | None = None,
    check_mode: bool = False,
) -> dict:
    """Lift ``app``'s fire lock, abort its running release, and/or wipe all its state.

    * ``abort``: a running release record becomes ``aborted`` with ``reason`` (CAS on the
      record); nodes that have not started do not start, waiting ones give up;
    * ``lift_lock``: the session holding the lock is destroyed (the key stays, unheld);
    * ``wipe``: every key under the app's prefix is deleted (the lock is lifted first).

    Returns ``changed``, ``lock_lifted`` (the lifted lock's record and session, else None),
    ``aborted`` (``{run_id, version, reason}`` else None), ``wiped`` (bool), ``deleted_keys``
    (count), ``before`` and ``after`` (``{release, lock}`` snapshots for a diff). In check
    mode nothing changes and the result says what would.
    """
    check_name(app, "app")
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise InvalidValue(f"reason must be a non-empty string, got {reason!r}")
    if reason is not None:
        check_text(reason, "reason", LINE_MAX_LENGTH)
    release_key = schema.release(app)
    try:
        release_entry, release = read_release(client, schema, app)
    except ReleaseError:
        if abort:
            raise
        release_entry, release = None, None  # lifting the lock or wiping must work on a corrupt record
    lock_entry, lock = read_lock(client, schema, app)
    before = {"release": release.to_dict() if release else None, "lock": lock_info(lock_entry, lock)}
    after = {"release": before["release"], "lock": before["lock"]}
    result = {"changed": False, "lock_lifted": None, "aborted": None, "wiped": False, "deleted_keys": 0}

    if abort and release is not None and release.status == RELEASE_RUNNING:
        aborted = replace(release, status=RELEASE_ABORTED, aborted_reason=reason or DEFAULT_ABORT_REASON)
        if not check_mode and not client.kv.put(release_key, aborted.to_json(), cas=release_entry["ModifyIndex"]):
            raise ReleaseError(
                f"the release record of app {app!r} changed while aborting it; check fireap_info and retry"
            )
        result["aborted"] = {"run_id": aborted.run_id, "version": aborted.version, "reason": aborted.aborted_reason}
        after["release"] = aborted.to_dict()
        result["changed"] = True

    if (lift_lock or wipe) and lock_entry is not None and lock_entry.get("Session"):
        if not check_mode:
            client.session.destroy(lock_entry["Session"])
        result["lock_lifted"] = dict(before["lock"])
        after["lock"] = dict(before["lock"], held=False, session=None)
        result["changed"] = True

    if wipe:
        keys = client.kv.get(schema.app_prefix(app), keys=True)[1] or []
        if keys:
            if not check_mode:
                client.kv.delete(schema.app_prefix(app), recurse=True)
            result["wiped"] = True
            result["deleted_keys"] = len(keys)
            result["changed"] = True
        after = {"release": None, "lock": None}

    result["before"] = before
    result["after"] = after
    return result
