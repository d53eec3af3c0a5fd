"""Operator endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from relayd.errors import StoreError
from relayd.web.keys import RUNTIME


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
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
