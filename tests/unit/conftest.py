"""Shared fixtures under ``ansible-test units``, which runs every test in a fork.

ansible-test loads its ``ansible_forked`` pytest plugin: each test runs in a child of the
pytest process, and the child ends with ``os._exit``. A session- or module-scoped fixture
set up in such a child (a Consul double, say) would be set up again for every test and
never torn down, leaving one double running per test. Here the pytest process itself sets
up the collectors and the wider-scoped fixtures of a test just before the fork and tears
them down after it, as pytest does without the plugin: the children inherit them and leave
their teardown to the parent. Under plain pytest the plugin is absent and nothing changes.

ansible-test also runs pytest with an ini file of its own, so the markers the project's
pytest.ini declares are declared here again, from that file.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path

import pytest

PROJECT_INI = Path(__file__).resolve().parents[2] / "pytest.ini"
FORK_PLUGIN = "ansible_forked"

# What a failing setup raises. pytest keeps the failure (in the fixture's cache, or on the
# collector's entry of the setup stack) and every test that needs it reports it in its fork.
SETUP_FAILURES = (Exception, pytest.skip.Exception, pytest.fail.Exception)

# The pid of the process that set up the shared fixtures; a fork sees its parent's value.
_owner_pid: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    known = {line.split(":")[0].strip() for line in config.getini("markers")}
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(PROJECT_INI, encoding="utf-8")
    for line in ini.get("pytest", "markers", fallback="").strip().splitlines():
        if line.split(":")[0].strip() not in known:
            config.addinivalue_line("markers", line.strip())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    forked = item.config.pluginmanager.has_plugin(FORK_PLUGIN) and isinstance(item, pytest.Function)
    if forked:
        set_up_shared(item)
    try:
        return (yield)
    finally:
        if forked:
            # What the next test does not share is torn down here, in the owning process.
            item.session._setupstate.teardown_exact(nextitem)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """In a fork: leave the teardown of everything set up by the parent to the parent."""
    if _owner_pid is not None and os.getpid() != _owner_pid:
        stack = item.session._setupstate.stack
        for node, (_finalizers, failure) in list(stack.items()):
            stack[node] = ([], failure)


def set_up_shared(item: pytest.Function) -> None:
    """Set up *item*'s collectors and its fixtures wider than a function, in this process."""
    global _owner_pid
    _owner_pid = os.getpid()
    try:
        # The stack holds what the previous test shares with this one; push the rest of the
        # collector chain (the item itself is set up in the fork).
        item.session._setupstate.setup(item.parent)
    except SETUP_FAILURES:
        return
    # getfixturevalue() serves a test that is set up: the item is on the stack while its wider
    # fixtures are set up, and off it again before the fork, which sets it up as usual.
    stack = item.session._setupstate.stack
    stack[item] = ([], None)
    try:
        for name in item.fixturenames:
            definitions = item._fixtureinfo.name2fixturedefs.get(name)
            if definitions and definitions[-1].scope != "function":
                try:
                    item._request.getfixturevalue(name)
                except SETUP_FAILURES:
                    pass
    finally:
        del stack[item]
