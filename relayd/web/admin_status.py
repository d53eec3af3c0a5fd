"""``GET /v1/admin/status``: a one-screen summary of this relayd, for ``relayd status``.

Counts come from the process's own metrics (what ``/metrics`` exports), so the summary and the
dashboards never disagree. Rates are taken over the last minute: a sampler records the two chunk
counters every few seconds (read directly, not by collecting the registry and /proc); before a
minute has passed they cover the time since start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from relayd import __version__
from relayd.errors import StoreError
from relayd.metrics import ROLES, Metrics
from relayd.web.keys import RUNTIME

_SAMPLE_EVERY_S = 5.0
_WINDOW_SAMPLES = 13  # 60 s of samples, 5 s apart


@dataclass
class StatusState:
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    # (monotonic time, chunks stored, chunks delivered); counters start at 0 with the process.
    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=_WINDOW_SAMPLES))

    def __post_init__(self) -> None:
        self.samples.append((self.started_mono, 0, 0))


STATUS = web.AppKey("admin_status", StatusState)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def setup_status(app: web.Application) -> None:
    app[STATUS] = StatusState()
    app.cleanup_ctx.append(_sampler)


def _samples(metrics: Metrics) -> Samples:
    """Every sample of the registry, by name and labels: one collection for the whole summary."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    state, metrics = app[STATUS], app[RUNTIME].metrics

    async def sample_forever() -> None:
        while True:
            await asyncio.sleep(_SAMPLE_EVERY_S)  # a periodic job, not a synchronisation
            state.samples.append((time.monotonic(), *metrics.chunk_totals()))  # not the whole registry

    task = asyncio.create_task(sample_forever(), name="relayd-admin-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def status(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    state = request.app[STATUS]
    samples = _samples(rt.metrics)
    stored, delivered = rt.metrics.chunk_totals()
    now = time.monotonic()
    since, stored_then, delivered_then = state.samples[0]
    window = max(now - since, 1e-3)

    redis: dict[str, object] = {"mode": "external" if rt.config.redis.url else "embedded"}
    open_streams: int | None = None
    started = time.perf_counter()
    try:
        await rt.relay.ping()
        redis["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        open_streams = await rt.relay.open_count()
        redis["ok"] = True
    except StoreError as exc:
        redis.update(ok=False, latency_ms=None, error=str(exc))

    return web.json_response(
        {
            "version": __version__,
            "started_at": round(state.started_at, 3),
            "uptime_s": round(now - state.started_mono, 1),
            "draining": rt.draining.is_set(),
            "connections": {role: int(samples.get(("relayd_connections", (("role", role),)), 0)) for role in ROLES},
            "subscriptions": int(samples.get(("relayd_subscriptions", ()), 0)),
            "streams": {"open": open_streams, "held_here": int(samples.get(("relayd_streams_open", ()), 0))},
            "chunks": {
                "stored": int(stored),
                "delivered": int(delivered),
                "stored_per_s": round((stored - stored_then) / window, 1),
                "delivered_per_s": round((delivered - delivered_then) / window, 1),
                "window_s": round(window, 3),
            },
            "redis": redis,
        }
    )
