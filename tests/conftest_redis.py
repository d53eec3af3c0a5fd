"""pytest plugin: one embedded Redis-compatible server for the whole test session.

Listed in tests/conftest.py through ``pytest_plugins``. Tests share the server and isolate
themselves by key prefix (the ``key_prefix`` fixture); nothing ever flushes it. A test that
takes Redis down starts one of its own instead (``private_redis``).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.embedded import EmbeddedRedis, free_port
from relayd.errors import EmbeddedServerError


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (``redis://127.0.0.1:PORT``) of a private server that lives for the session."""
    server = _start_on_free_port(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A server of this test's own, which the test may stop, restart on its data or freeze (SIGSTOP).

    ``appendfsync always``: a restart brings back every write acknowledged before the stop.
    """
    server = _start_on_free_port(tmp_path / "redis", appendfsync="always")
    try:
        yield server
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)  # a frozen server would not stop
        server.stop()


def _start_on_free_port(data_dir: Path, attempts: int = 3, appendfsync: str = "no") -> EmbeddedRedis:
    # Another process may take the free port before the server binds it: try another one.
    for attempt in range(1, attempts + 1):
        server = EmbeddedRedis(data_dir, port=free_port(), appendfsync=appendfsync)
        try:
            server.start()
        except EmbeddedServerError:
            if attempt == attempts:
                raise
        else:
            return server
    raise AssertionError("unreachable")


@pytest.fixture
def key_prefix() -> str:
    """A prefix unique to this test, like ``t-1a2b3c4d``; put every key the test makes under it."""
    return f"t-{uuid.uuid4().hex[:8]}"
