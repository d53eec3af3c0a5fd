"""``GET /v1/streams/{stream}/events``: Server-Sent Events, resumable with ``Last-Event-ID``.

In relayd's own events (``event: chunk``, ``end``, ``relayd-error``...), or with ``?format=openai``
in OpenAI's streaming format (relayd/web/openai_sse.py), docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from relayd.auth import Principal, parse_bearer
from relayd.errors import ClientError, ProtocolError, StoreError
from relayd.logs import ConnectionLog, Pairs
from relayd.outbox import Outbox
from relayd.protocol import (
    SSE_CODEC,
    SSE_LEGACY_CODEC,
    FrameCodec,
    SseCodec,
    check_stream_id,
    parse_optional_cursor,
    parse_uint,
)
from relayd.relay import Subscription
from relayd.web.cors import cors_headers
from relayd.web.errors import ERROR_CODE, client_error_response, error_response
from relayd.web.gate import limited
from relayd.web.keys import RUNTIME
from relayd.web.openai_sse import ERROR_STATUS, KEEPALIVE, OPENAI_SSE_CODEC, error_object, error_of
from relayd.web.transport import backlog_of, deliver

log = logging.getLogger("relayd.sse")


class _Done:
    """Owner of the single subscription of an SSE response: wakes the handler when it ends."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def subscription_done(self, sub: Subscription) -> None:
        self.event.set()


class _StopsAtError(Outbox):
    """The outbox of an OpenAI-format response: an OpenAI reader stops at the first error object
    (a gap or reset too, which relayd's own readers read past), so the response ends after it and
    nothing is queued behind it. ``ended()`` is called when that error is queued."""

    def __init__(self, ended: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ended = ended
        self.stopped = False

    def offer(self, data: bytes, chunks: int = 0) -> bool:
        return True if self.stopped else super().offer(data, chunks)  # dropped: the response is ending

    async def put(self, data: bytes, chunks: int = 0) -> None:
        if not self.stopped:
            await super().put(data, chunks)

    def control(self, data: bytes) -> None:
        if self.stopped:
            return
        super().control(data)
        if data is not KEEPALIVE:  # every other control frame of the OpenAI codec is an error
            self.stopped = True
            self._ended()


def refusal(openai: bool, status: int, code: str, message: str) -> web.Response:
    """An HTTP error in the response's format: relayd's ``{"error": {"code", "message"}}``, or
    OpenAI's, which has those two fields too."""
    if not openai:
        return error_response(status, code, message)
    response = web.json_response(error_object(code, message), status=status)
    response[ERROR_CODE] = code
    return response


def authorize(request: web.Request) -> tuple[Principal, str]:
    """The consumer's token (``?token=`` or ``Authorization: Bearer``) and the stream it may read.
    Checks ``?format=`` too, so that no other refusal comes in the wrong shape."""
    response_format(request.query.get("format"))
    token = request.query.get("token") or parse_bearer(request.headers.get("Authorization"))
    principal = request.app[RUNTIME].tokens.verify(token)
    stream = check_stream_id(request.match_info["stream"])
    principal.require(stream, "read")
    return principal, stream


def wait_param(request: web.Request, cap_ms: int) -> int:
    """``?wait_ms=``, at most ``cap_ms`` (also its default)."""
    wait = request.query.get("wait_ms")
    return min(parse_uint(wait, "wait_ms") if wait else cap_ms, cap_ms)


def refused(request: web.Request, exc: ClientError, openai: bool) -> web.Response:
    """A consumer request refused before anything was sent: counted, logged (credentials), answered."""
    rt = request.app[RUNTIME]
    if exc.code in ("unauthorized", "token_expired", "forbidden"):
        rt.metrics.auth_failure(exc.code)
        fields = {"remote": request.remote, "code": exc.code}
        log.info("consumer_sse refused %s", Pairs(fields), extra={"role": "consumer_sse", **fields})
    else:
        rt.metrics.bad_frame(exc.code)
    response = client_error_response(exc)
    if openai:
        response = refusal(True, response.status, exc.code, exc.message)
    response.headers.update(cors_headers(request))
    return response


def response_format(value: str | None) -> bool:
    """``?format=``: ``relayd`` (the default) or ``openai``; True for openai."""
    if value is None or value == "relayd":
        return False
    if value == "openai":
        return True
    raise ProtocolError("bad_frame", "'format' must be relayd or openai")


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
    openai = request.query.get("format") == "openai"
    if rt.draining.is_set():
        return refusal(openai, 503, "shutting_down", "relayd is draining")
    try:
        principal, stream = authorize(request)
        cursor = parse_optional_cursor(request.headers.get("Last-Event-ID") or request.query.get("cursor"))
        wait_ms = wait_param(request, cfg.streams.wait_timeout_ms)
        codec: FrameCodec = OPENAI_SSE_CODEC if openai else sse_codec(request.query.get("error_event"))
    except ClientError as exc:
        return refused(request, exc, openai)

    meta = None
    if cursor is not None or openai:
        try:
            meta = await rt.relay.read_meta(stream)
        except StoreError as exc:
            return refusal(openai, 503, "store_unavailable", str(exc))
        # A reconnect after the end: 204 tells EventSource to stop reconnecting.
        if cursor is not None and meta is not None and not meta.is_open and cursor == (meta.gen, meta.n):
            return web.Response(status=204, headers=cors_headers(request))

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            **cors_headers(request),
        }
    )
    if not openai:
        await response.prepare(request)
        await response.write(b"retry: 1000\n\n")
    elif meta is not None:
        await response.prepare(request)
    # else (OpenAI format, no such stream yet): the head waits for the first event, so that a
    # stream that does not appear within wait_ms is answered 404, not 200 and an error event.
    held: list[dict[str, Any]] = []  # that error event's error, answered as an HTTP error instead

    async def send(batch: list[bytes]) -> None:
        if not response.prepared:
            error = error_of(batch[0]) if len(batch) == 1 else None
            if error is not None and error["code"] in ERROR_STATUS:
                held.append(error)
                return
            await response.prepare(request)
        await response.write(b"".join(batch))
        await request.writer.drain()  # after every batch, so the transport's buffer stays bounded

    done = _Done()
    make_outbox = functools.partial(_StopsAtError, done.event.set) if openai else Outbox
    outbox = make_outbox(
        send,
        cfg.consumer.max_queue_bytes,
        cfg.consumer.send_timeout_ms / 1000,
        backlog_of(request),  # a stuck reader: the transport is aborted
        on_written=rt.metrics.delivery_latency,
        on_delivered=rt.metrics.written,
        budget=rt.relay.consumer_budget,
    )
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
            keepalive=KEEPALIVE if openai else b": keepalive\n\n",
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
    if held and not response.prepared:
        answer = refusal(True, ERROR_STATUS[held[0]["code"]], held[0]["code"], held[0]["message"])
        answer.headers.update(cors_headers(request))
        return answer
    return response
