"""Fixtures shared by the whole test tree: the collection's import path and a Consul target."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# build/ansible_collections/fireap/consul links to the repository, so the collection imports as
# ansible_collections.fireap.consul...; TESTS_DIR holds helper modules such as consul_harness;
# the repository root holds devcluster, the Consul double.
for _path in (TESTS_DIR.parent, TESTS_DIR.parent / "build", TESTS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import consul_harness  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-answers", action="store_true",
                     help="write the Consul answers tests/consul/test_record_consul_answers.py records to "
                          "tests/unit/fixtures/consul_answers/ (the pure module tests replay them)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("double_only") and os.environ.get(consul_harness.ADDR_ENV):
        pytest.skip(f"needs the project's Consul double; {consul_harness.ADDR_ENV} points at a real agent")


@pytest.fixture(scope="session")
def make_double(tmp_path_factory):
    """The tests' one way to start the project's Consul double (``python -m devcluster serve``).

    ``make_double(nodes=3, *, acl_token=None, data_dir=None, workdir=None, name="double",
    realism=None)`` starts one and returns its ConsulTarget; ``target.double`` is the ServeProcess
    (``workdir`` with the inventory and node dirs, ``kill()``, ``stop()``); ``realism`` (a
    devcluster.consul.Realism, e.g. ``Realism.consul(nodes)``) makes it as unkind as Consul.
    ``with make_double(...) as target:`` stops it when the block ends; any still running are
    stopped when the session ends.
    """
    started: list[consul_harness.ConsulTarget] = []

    def make(nodes: int = 3, *, acl_token: str | None = None, data_dir: Path | None = None,
             workdir: Path | None = None, name: str = "double", realism=None) -> consul_harness.ConsulTarget:
        target = consul_harness.start_double(workdir or tmp_path_factory.mktemp(name), nodes, acl_token=acl_token,
                                             data_dir=data_dir, realism=realism)
        started.append(target)
        return target

    yield make
    for target in started:
        target.close()


@pytest.fixture(scope="session")
def consul_target(make_double):
    """The Consul under test: the real agent named by the environment, else a 3-node double."""
    real = consul_harness.real_target_from_env()
    if real is not None:
        yield real
        real.close()
        return
    with make_double(nodes=3, name="devcluster") as target:
        yield target


@pytest.fixture
def multi_agent_target(consul_target):
    """The Consul target, for tests that need several agents."""
    if not consul_target.multi_agent:
        pytest.skip("needs several Consul agents; the target has one")
    return consul_target


@pytest.fixture
def kv_prefix(consul_target):
    """A KV prefix of this test's own (``fireap-test/<uuid>/``), deleted afterwards."""
    prefix = f"fireap-test/{uuid.uuid4()}/"
    yield prefix
    consul_target.client().kv.delete(prefix, recurse=True)


@pytest.fixture(autouse=True)
def _handler_logger_restored():
    """fireap-reap's main() points its logger at a file and stops it propagating: put it back
    after each test, so that a later test in the same process still sees its lines in caplog."""
    logger = logging.getLogger("fireap.reap")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]
