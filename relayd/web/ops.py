"""Operator endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from relayd.errors import StoreError
from relayd.metrics import merge_workers
from relayd.supervisor import metrics_socket
from relayd.web.keys import RUNTIME

_SIBLING_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: not draining, Redis answers, and the broker's pub/sub is connected."""
    rt = request.app[RUNTIME]
    if rt.draining.is_set():
        return web.json_response({"status": "draining"}, status=503)
    try:
        await rt.relay.ping()
    except StoreError as exc:
        rt.metrics.redis_health(False)
        return web.json_response({"status": "redis_unavailable", "message": str(exc)}, status=503)
    rt.metrics.redis_health(True)
    if not rt.relay.broker_up:
        # Live tails from other instances would stall: send consumers elsewhere until it is back.
        return web.json_response({"status": "broker_unavailable"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body = rt.metrics.render()
    if rt.worker is not None and rt.worker[1] > 1:
        body = merge_workers(await _all_workers(rt.worker, body))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _all_workers(worker: tuple[int, int, Path], own: bytes) -> list[tuple[int, bytes]]:
    """Every worker's own samples; a sibling that does not answer (restarting) is left out."""
    index, count, run_dir = worker

    async def fetch(i: int) -> tuple[int, bytes] | None:
        if i == index:
            return i, own
        try:
            connector = aiohttp.UnixConnector(path=str(metrics_socket(run_dir, i)))
            async with (
                aiohttp.ClientSession(connector=connector, timeout=_SIBLING_TIMEOUT) as session,
                session.get("http://worker/metrics") as resp,
            ):
                return i, await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            return None

    return [result for result in await asyncio.gather(*(fetch(i) for i in range(count))) if result is not None]
