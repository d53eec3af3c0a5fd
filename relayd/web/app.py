"""``build_app``: routes, middlewares and the drain order on shutdown."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from relayd.auth import FailureLimiter
from relayd.logs import install_redaction
from relayd.web import admin, durable, http_ingest, ops
from relayd.web.consume import consume_ws
from relayd.web.cors import cors_middleware
from relayd.web.http_log import RequestErrorLog
from relayd.web.ingest import ingest
from relayd.web.keys import RUNTIME, Runtime
from relayd.web.sse import events
from relayd.web.static import client_js
from relayd.web.throttle import FAILURES, failure_limit
from relayd.web.tokens import mint_token
from relayd.web.whole import whole

log = logging.getLogger("relayd.web")


def build_app(runtime: Runtime) -> web.Application:
    cfg = runtime.config
    install_redaction()  # aiohttp's and asyncio's own lines may quote a request: scrub them too
    app = web.Application(
        middlewares=[cors_middleware, failure_limit],
        client_max_size=cfg.limits.max_frame_bytes,
        # malformed requests: one rate-limited WARNING each, not an ERROR with a traceback
        handler_args={"logger": RequestErrorLog(runtime.metrics)},
    )
    app[RUNTIME] = runtime
    app[FAILURES] = FailureLimiter(cfg.auth.max_failures, cfg.auth.failure_window_s)
    # configured keys only: the zero-config development start (its development key) is not production
    if (cfg.auth.api_keys or cfg.api_key_secrets) and "*" in cfg.server.allowed_origins:
        log.warning(
            "API keys are configured and server.allowed_origins is '*': any web page may use the consumer "
            "routes from a browser; list your sites' origins (docs/operations.md, Security)"
        )
    app.router.add_get("/v1/ingest", ingest)
    app.router.add_get("/v1/ws", consume_ws)
    # Stream ids may hold "/" ("user-7/chat-3"): the id is everything between /v1/streams/ and
    # the last path segment, sent as is or percent-encoded (%2F).
    app.router.add_get("/v1/streams/{stream:.+}/ws", consume_ws)
    app.router.add_get("/v1/streams/{stream:.+}/events", events)
    app.router.add_get("/v1/streams/{stream:.+}/whole", whole)
    app.router.add_post("/v1/streams/{stream:.+}/append", http_ingest.append)  # HTTP producers
    app.router.add_post("/v1/streams/{stream:.+}/open", http_ingest.open_stream)
    app.router.add_post("/v1/streams/{stream:.+}/end", http_ingest.end)
    app.router.add_get("/v1/client.js", client_js())
    app.router.add_post("/v1/tokens", mint_token)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)
    admin.setup(app)  # /v1/admin/...: relayd streams, relayd status (admin keys)
    durable.setup(app, cfg.durable)  # <durable.base_path>/v1/stream/...: the Durable Streams protocol
    app.on_shutdown.append(drain_connections)
    return app


async def drain_connections(app: web.Application) -> None:
    """Producers first (everything they sent is acknowledged), then consumers; all told 1012.

    Runs once: ``Server.stop`` calls it while the listener is still open, aiohttp's
    ``on_shutdown`` again after the listener closed (a no-op then).
    """
    rt = app[RUNTIME]
    if rt.draining.is_set():
        return
    rt.draining.set()
    producers, consumers = list(rt.producers), list(rt.consumers)
    log.info("draining: %d producer and %d consumer connections", len(producers), len(consumers))
    rt.metrics.draining()
    try:
        async with asyncio.timeout(rt.config.server.drain_timeout_s):
            await asyncio.gather(*(close() for close in producers), return_exceptions=True)
            await asyncio.gather(*(close() for close in consumers), return_exceptions=True)
    except TimeoutError:
        log.warning("drain did not finish within server.drain_timeout_s; closing the rest")
