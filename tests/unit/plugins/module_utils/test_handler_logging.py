"""fireap-reap's log: the config's log_level, --debug, a log file rotated away, and FIREAP_CONFIG_PATH."""

from __future__ import annotations

import io
import logging
import os
import stat
import sys

import pytest

from ansible_collections.fireap.consul.plugins.module_utils import _reap
from ansible_collections.fireap.consul.plugins.module_utils._taskconfig import ConfigError, parse_config
from ansible_collections.fireap.consul.tests.unit.plugins.module_utils.reap_setup import (
    APP,
    ME,
    Spawns,
    closed_port,
    write_config,
)

APPS = {APP: {"exec_commands": ["true"]}}


def unreachable_config(tmp_path, **extra):
    """A config whose agent does not answer: a handler run logs that it could not check the app."""
    return write_config(tmp_path / "c.yml", {"host": "127.0.0.1", "port": closed_port(), "retries": 0, "timeout": 2},
                        "fireap/", APPS, node_name=ME, **extra)


# --- log_level ---------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_log_level_takes_the_names_of_the_levels(level):
    assert parse_config({"log_level": level, "apps": APPS}).log_level == level


def test_log_level_defaults_to_info():
    assert parse_config({"apps": APPS}).log_level == "info"


@pytest.mark.parametrize("value", ["INFO", "verbose", 10, True])
def test_another_log_level_is_refused_naming_the_choices(value):
    with pytest.raises(ConfigError, match="c.yml: log_level: must be debug, info, warning, error, got "):
        parse_config({"log_level": value, "apps": APPS}, source="c.yml")


@pytest.mark.parametrize("argv, level, logged, left_out", [
    ([], "info", ["INFO fireap-reap", "ERROR fireap-reap"], []),
    ([], "error", ["ERROR fireap-reap"], ["INFO fireap-reap"]),
    (["--debug"], "error", ["INFO fireap-reap", "ERROR fireap-reap"], []),
])
def test_the_handler_logs_at_the_config_s_level_or_at_debug_when_told(tmp_path, monkeypatch, reap_logger, argv, level,
                                                                      logged, left_out):
    monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
    config = unreachable_config(tmp_path, log_level=level)
    assert _reap.main(["--config", str(config), *argv], spawn=Spawns(), out=io.StringIO()) == 1
    assert reap_logger.level == (logging.DEBUG if argv else logging.getLevelName(level.upper()))
    text = (tmp_path / "log" / "reap.log").read_text()
    assert all(word in text for word in logged) and not any(word in text for word in left_out), text


def test_debug_lines_of_a_dry_run_go_to_stderr(tmp_path, monkeypatch, capsys, reap_logger):
    monkeypatch.setattr(sys, "stdin", io.StringIO("[]"))
    config = unreachable_config(tmp_path, log_level="warning")
    assert _reap.main(["--config", str(config), "--dry-run", "--debug"], out=io.StringIO()) == 1
    assert reap_logger.level == logging.DEBUG
    assert "INFO fireap-reap" in capsys.readouterr().err
    assert not (tmp_path / "log").exists()


def test_log_level_refuses_a_name_that_is_no_level():
    with pytest.raises(ValueError, match="log level must be one of debug, info, warning, error"):
        _reap.log_level("critical")


# --- rotation ----------------------------------------------------------------------------------


def test_a_log_file_moved_away_is_reopened_and_created_private(tmp_path, reap_logger):
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "log" / "reap.log"
        assert _reap.configure_logging(str(path)) is None
        reap_logger.info("before the rotation")
        path.rename(path.with_name("reap.log.1"))  # what logrotate does without copytruncate
        reap_logger.info("after the rotation")
        assert stat.S_IMODE(path.stat().st_mode) == _reap.LOG_FILE_MODE
    finally:
        os.umask(old_umask)
    assert "before the rotation" in path.with_name("reap.log.1").read_text()
    (line,) = path.read_text().splitlines()
    assert line.endswith("after the rotation")


def test_a_log_file_deleted_is_created_again(tmp_path, reap_logger):
    path = tmp_path / "reap.log"
    _reap.configure_logging(str(path))
    reap_logger.info("one")
    path.unlink()
    reap_logger.warning("two")
    (line,) = path.read_text().splitlines()
    assert "WARNING" in line and line.endswith("two")


# --- FIREAP_CONFIG_PATH --------------------------------------------------------------------------


def test_fireap_config_path_is_the_default_of_config(tmp_path, monkeypatch):
    config = write_config(tmp_path / "elsewhere.yml", {}, "fireap/", APPS)
    monkeypatch.setenv("FIREAP_CONFIG_PATH", str(config))
    out = io.StringIO()
    assert _reap.main(["--check"], out=out) == 0
    assert out.getvalue() == f"{config}: valid; apps: {APP}\n"


def test_config_wins_over_fireap_config_path(tmp_path, monkeypatch):
    config = write_config(tmp_path / "given.yml", {}, "fireap/", APPS)
    monkeypatch.setenv("FIREAP_CONFIG_PATH", str(tmp_path / "missing.yml"))
    out = io.StringIO()
    assert _reap.main(["--config", str(config), "--check"], out=out) == 0
    assert out.getvalue().startswith(f"{config}: valid")


@pytest.mark.parametrize("value", [None, ""])
def test_without_fireap_config_path_the_default_is_etc_fireap(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("FIREAP_CONFIG_PATH", raising=False)
    else:
        monkeypatch.setenv("FIREAP_CONFIG_PATH", value)
    assert _reap._parser().parse_args([]).config == "/etc/fireap/config.yml"
