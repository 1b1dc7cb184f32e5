"""The app the demo releases: a build in the leader's app directory, the command that copies
it from node to node, and the comparison of every node's tree with the leader's."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tarfile
from pathlib import Path

APP_DIR = "app"

BUILD_FILES = 1000
BUILD_DIRS = 20
BUILD_FILE_SIZES = (1024, 6 * 1024)


def rsync_command(nodes_dir: Path) -> str:
    """The command template that copies the source node's app tree over this node's."""
    base = shlex.quote(f"{nodes_dir}/")
    return f"rsync -a --delete {base}{{{{ remote.name }}}}/{APP_DIR}/ {base}{{{{ node }}}}/{APP_DIR}/"


def write_tar(app_dir: Path, path: Path) -> int:
    """The whole build in ``app_dir`` as one tar at ``path`` (an artifact, a download); its bytes."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(app_dir, arcname=".")
    return path.stat().st_size


def tree_manifest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` (symlinks by their target)."""
    manifest = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            manifest[relative] = "symlink:" + os.readlink(path)
        elif path.is_file():
            manifest[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            manifest[relative + "/"] = "dir"
    return manifest


def tree_difference(expected: dict[str, str], actual: dict[str, str]) -> str | None:
    """A short description of how ``actual`` differs from ``expected``, or None if equal."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(key for key in set(expected) & set(actual) if expected[key] != actual[key])
    parts = []
    for label, keys in (("missing", missing), ("unexpected", extra), ("different", changed)):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    return ", ".join(parts) or None


def write_build(app_dir: Path, version: str) -> tuple[int, int]:
    """Replace ``app_dir``'s content with a new build of ``version``; (files, bytes)."""
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    low, high = BUILD_FILE_SIZES
    total = 0
    for i in range(BUILD_FILES - 1):
        directory = app_dir / f"lib{i % BUILD_DIRS:02d}"
        directory.mkdir(exist_ok=True)
        data = os.urandom(low + (i * 7919) % (high - low))
        (directory / f"part{i:04d}.bin").write_bytes(data)
        total += len(data)
    version_file = app_dir / "VERSION"
    version_file.write_text(version + "\n")
    return BUILD_FILES, total + version_file.stat().st_size
