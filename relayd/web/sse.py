"""``GET /v1/streams/{stream}/events``: Server-Sent Events, resumable with ``Last-Event-ID``."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from relayd.auth import parse_bearer
from relayd.errors import ClientError, ProtocolError, StoreError
from relayd.logs import ConnectionLog, Pairs
from relayd.outbox import Outbox
from relayd.protocol import SSE_CODEC, SSE_LEGACY_CODEC, SseCodec, check_stream_id, parse_optional_cursor, parse_uint
from relayd.relay import Subscription
from relayd.web.cors import cors_headers
from relayd.web.errors import client_error_response, error_response
from relayd.web.gate import limited
from relayd.web.keys import RUNTIME
from relayd.web.transport import backlog_of, deliver, sse_chunk_count

log = logging.getLogger("relayd.sse")


class _Done:
    """Owner of the single subscription of an SSE response: wakes the handler when it ends."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def subscription_done(self, sub: Subscription) -> None:
        self.event.set()


def sse_codec(error_event: str | None) -> SseCodec:
    """``?error_event=error`` keeps the error event's relayd 0.1 name (docs/protocol.md)."""
    if error_event is None or error_event == SSE_CODEC.error_event:
        return SSE_CODEC
    if error_event == SSE_LEGACY_CODEC.error_event:
        return SSE_LEGACY_CODEC
    raise ProtocolError("bad_frame", f"'error_event' must be {SSE_CODEC.error_event} or {SSE_LEGACY_CODEC.error_event}")


@limited("consumer_sse")
async def events(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    cfg = rt.config
    if rt.draining.is_set():
        return error_response(503, "shutting_down", "relayd is draining")
    try:
        token = request.query.get("token") or parse_bearer(request.headers.get("Authorization"))
        principal = rt.tokens.verify(token)
        stream = check_stream_id(request.match_info["stream"])
        principal.require(stream, "read")
        cursor = parse_optional_cursor(request.headers.get("Last-Event-ID") or request.query.get("cursor"))
        wait = request.query.get("wait_ms")
        wait_ms = min(parse_uint(wait, "wait_ms") if wait else cfg.streams.wait_timeout_ms, cfg.streams.wait_timeout_ms)
        codec = sse_codec(request.query.get("error_event"))
    except ClientError as exc:
        if exc.code in ("unauthorized", "token_expired", "forbidden"):
            rt.metrics.auth_failure(exc.code)
            fields = {"remote": request.remote, "code": exc.code}
            log.info("consumer_sse refused %s", Pairs(fields), extra={"role": "consumer_sse", **fields})
        else:
            rt.metrics.bad_frame(exc.code)
        refusal = client_error_response(exc)
        refusal.headers.update(cors_headers(request))
        return refusal

    if cursor is not None:
        # A reconnect after the end: 204 tells EventSource to stop reconnecting.
        try:
            meta = await rt.relay.read_meta(stream)
        except StoreError as exc:
            return error_response(503, "store_unavailable", str(exc))
        if meta is not None and not meta.is_open and cursor == (meta.gen, meta.n):
            return web.Response(status=204, headers=cors_headers(request))

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            **cors_headers(request),
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")

    async def send(batch: list[bytes]) -> None:
        await response.write(b"".join(batch))
        await request.writer.drain()  # after every batch, so the transport's buffer stays bounded

    outbox = Outbox(
        send,
        cfg.consumer.max_queue_bytes,
        cfg.consumer.send_timeout_ms / 1000,
        backlog_of(request),  # a stuck reader: the transport is aborted
        on_written=rt.metrics.delivery_latency,
        count_chunks=sse_chunk_count,
        on_delivered=rt.metrics.written,
        budget=rt.relay.consumer_budget,
    )
    done = _Done()
    sub = rt.relay.subscribe(stream, outbox, codec, cursor=cursor, wait_s=wait_ms / 1000, owner=done)
    rt.metrics.connection_opened("consumer_sse")
    conn_log = ConnectionLog(log, "consumer_sse", request.remote, stream=stream)
    loop = asyncio.get_running_loop()

    def expired() -> None:
        conn_log.closing("token_expired")
        rt.metrics.auth_failure("token_expired")
        outbox.control(codec.error(stream, "token_expired", "the token expired; reconnect with a fresh one"))
        done.event.set()

    expiry = loop.call_later(max(principal.expires_at - time.time(), 0.0), expired)

    async def drain_close() -> None:
        conn_log.closing("shutting_down")
        outbox.control(codec.error(stream, "shutting_down", "relayd is restarting; reconnect"))
        done.event.set()

    async def stop() -> None:
        rt.consumers.discard(drain_close)
        expiry.cancel()
        if done.event.is_set():
            conn_log.closing("stream_done")  # the stream ended (or could not be followed): the response ends
        await sub.stop()

    rt.consumers.add(drain_close)
    sub.start()
    stuck = ""
    try:
        stuck = await deliver(
            outbox,
            done.event,
            stop,
            keepalive=b": keepalive\n\n",
            every_s=cfg.consumer.sse_keepalive_s,
            name="relayd-sse-writer",
        )
    finally:
        if stuck:
            rt.metrics.forced_close("consumer_sse", stuck)
            rt.metrics.slow_consumer()
            conn_log.closing(stuck)
        rt.metrics.connection_closed("consumer_sse")
        conn_log.closed(None, "client_closed", chunks_out=outbox.chunks_written, streams=1)
    return response
