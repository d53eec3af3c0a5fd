"""Typed application keys: shared state reaches handlers through these, never globals."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from relayd.auth import ApiKeys, TokenAuthority
from relayd.config import Config
from relayd.metrics import Metrics
from relayd.relay import Relay

Closer = Callable[[], Awaitable[None]]


@dataclass
class Runtime:
    """What every handler needs, bundled once at startup."""

    config: Config
    relay: Relay
    metrics: Metrics
    api_keys: ApiKeys
    tokens: TokenAuthority
    admin_keys: ApiKeys = field(default_factory=ApiKeys)  # /v1/admin; empty: the admin API is off
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    # Open connections, as the coroutine that closes each for a drain (code 1012).
    producers: set[Closer] = field(default_factory=set)
    consumers: set[Closer] = field(default_factory=set)
    # In a worker of `serve --workers N`: (index, count, run dir), for /metrics of all workers.
    worker: tuple[int, int, Path] | None = None


RUNTIME = web.AppKey("runtime", Runtime)
