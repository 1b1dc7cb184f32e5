# SPDX-License-Identifier: MIT
"""A build's integrity: the checksum the leader records with a release and nodes verify.

The leader computes it (``file_checksum``) or is given it, and ``fireap_fire`` records it in
the release record. Each node verifies its copy after exec_commands and before
after_commands: ``verify_file`` (a file whose SHA-256 the node computes itself) and/or
``verify_commands`` (commands given ``{{ checksum }}``). A node that fails verification is
recorded ``failed``, so no puller ever takes it as a source.

A release and an app's settings must agree (``verification_problem``): a checksum that no
verification checks, or a verification with no checksum to check, fails the node before
any of the app's commands run, so a build never goes unverified silently. An app with an
artifact checks the checksum on the whole file it fetched (``_swarm``), before any command.
"""

from __future__ import annotations

import hashlib

from ansible_collections.fireap.consul.plugins.module_utils._errors import InvalidValue

#: Bytes read at a time: a build of any size is hashed in bounded memory.
CHUNK = 1 << 20


def file_checksum(path: str) -> str:
    """``sha256:<hex>`` of the file at ``path``; InvalidValue when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                digest.update(chunk)
    except OSError as err:
        raise InvalidValue(f"cannot read {path} to compute its checksum: {err.strerror or err}") from None
    return "sha256:" + digest.hexdigest()


def file_mismatch(path: str, expected: str) -> str | None:
    """Why the file at ``path`` is not the build whose checksum is ``expected`` (None: it is)."""
    try:
        actual = file_checksum(path)
    except InvalidValue as err:
        return str(err)
    if actual == expected:
        return None
    return f"checksum mismatch: {path} has {actual}, the release expects {expected}"


def verification_problem(app_config, checksum: str | None) -> str | None:
    """Why a node must not run ``app_config`` (a ``_taskconfig.AppConfig``) for a release
    carrying ``checksum`` (None: none), or None when they agree."""
    verifies = app_config.verify_file is not None or bool(app_config.verify_commands)
    app = app_config.name
    if checksum is not None and not verifies and app_config.artifact is None:
        return (f"the release carries the checksum {checksum}, but app {app} configures no verification on "
                f"this node: set verify_file or verify_commands under apps.{app} (or defaults) in the task "
                "config; nothing was run")
    if checksum is None and verifies:
        return (f"app {app} verifies its build on this node (verify_file or verify_commands), but the release "
                "carries no checksum: fire it with checksum or checksum_file (release.yml: fireap_checksum or "
                "fireap_checksum_file); nothing was run")
    return None
