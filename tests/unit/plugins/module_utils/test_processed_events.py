"""_processed_events: the record of handled event IDs in the state directory."""

from __future__ import annotations

import stat

import pytest

from ansible_collections.fireap.consul.plugins.module_utils._processed_events import (
    PROCESSED_FILE,
    load_processed,
    remember,
    save_processed,
    write_atomic,
)


def test_write_atomic_replaces_the_file_with_the_mode_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    write_atomic(str(target), b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_processed_ids_round_trip(tmp_path):
    path = str(tmp_path / PROCESSED_FILE)
    assert load_processed(path) == ([], None)
    save_processed(path, ["a", "b"])
    assert load_processed(path) == (["a", "b"], None)


@pytest.mark.parametrize("content", [b"{not json", b'{"ids": [1, 2]}', b'["a"]', b"\xff\xfe"])
def test_an_unusable_record_is_ignored_with_a_warning(tmp_path, content):
    path = tmp_path / PROCESSED_FILE
    path.write_bytes(content)
    ids, warning = load_processed(str(path))
    assert ids == []
    assert warning.startswith(f"ignoring the record of handled events {path}")


def test_remember_appends_each_new_id_once_and_keeps_the_newest():
    assert remember(["a", "b"], ["b", "c", "c", "d"]) == ["a", "b", "c", "d"]
    assert remember(["a", "b", "c"], ["d", "e"], limit=3) == ["c", "d", "e"]
    assert remember([], []) == []
