"""Shared fixtures: a real Redis-compatible server for the session, a relayd per test.

Every relayd a test starts listens on 127.0.0.1 port 0 and keeps its keys under the test's own
prefix, so tests never see each other's data and nothing is ever flushed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import pytest

from relayd.config import Config
from tests.helpers import API_KEY, JWT_SECRET, Relayd, make_config


def pytest_configure(config: pytest.Config) -> None:
    """``TEST_COMPILED_BUILD=1`` (scripts/test.sh's run against the compiled build): refuse to
    run on pure Python, so a build that quietly came out pure cannot pass for the compiled one."""
    if os.environ.get("TEST_COMPILED_BUILD") == "1":
        import relayd.protocol
        import relayd.relay

        for module in (relayd.protocol, relayd.relay):
            if not (module.__file__ or "").endswith(".so"):
                raise pytest.UsageError(f"TEST_COMPILED_BUILD=1 but {module.__name__} is {module.__file__}")


pytest_plugins = ["tests.conftest_redis", "tests.conftest_cluster"]


@pytest.fixture
def config_factory(redis_server: str, key_prefix: str, tmp_path: object) -> Callable[..., Config]:
    """Build a test Config: ``config_factory(streams={"max_chunks": 10})`` overrides tables."""

    def factory(**tables: dict[str, object]) -> Config:
        return make_config(redis_server, key_prefix, str(tmp_path), **tables)

    return factory


@pytest.fixture
async def relayd(config_factory: Callable[..., Config]) -> AsyncIterator[Relayd]:
    """A relayd running in this test's event loop, on a free port, with default test config."""
    async with Relayd(config_factory()) as server:
        yield server


__all__ = ["API_KEY", "JWT_SECRET"]
