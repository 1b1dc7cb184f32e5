"""Fixtures of the module_utils tests that more than one file uses."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def reap_logger():
    """The fireap-reap logger, restored after the test configured it."""
    logger = logging.getLogger("fireap.reap")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
