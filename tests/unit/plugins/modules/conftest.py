"""Fixtures of the module tests: a caller's Consul settings kept out, and an agent that does not listen."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The modules read CONSUL_* for options a test leaves unset: the caller's must not count."""
    for name in [name for name in os.environ if name.startswith("CONSUL_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, so no one else takes it, but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
