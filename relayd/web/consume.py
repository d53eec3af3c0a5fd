"""Consumer websocket: ``GET /v1/streams/{stream}/ws`` and ``GET /v1/ws`` (JWT)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from relayd.auth import Principal, parse_bearer
from relayd.errors import AuthError, ClientError, CloseCode
from relayd.logs import ConnectionLog, Pairs
from relayd.outbox import Outbox, SlowConsumer
from relayd.protocol import (
    WS_CODEC,
    AuthOp,
    CancelOp,
    FrameError,
    PingOp,
    SubscribeOp,
    UnsubscribeOp,
    check_stream_id,
    decode_consumer,
    error_frame,
    format_cursor,
    frame,
    parse_optional_cursor,
    parse_uint,
    split_message,
)
from relayd.relay import Subscription
from relayd.web.errors import ERROR_CODE
from relayd.web.gate import limited
from relayd.web.keys import RUNTIME, Runtime
from relayd.web.transport import (
    CLOSED_ABNORMALLY,
    abort,
    backlog_of,
    close_stuck,
    drained,
    next_message,
    ws_frame_writer,
    ws_pinger,
    ws_text_frame,
    ws_text_writer,
)

log = logging.getLogger("relayd.consume")

SUBPROTOCOL = "relayd.v1"
_BEARER_PROTOCOL = "bearer."
_MAX_CONSUMER_MESSAGE = 64 * 1024
_LINES_PER_TURN = 256  # lines of one message handled before other connections get a turn


def token_from_request(request: web.Request) -> str | None:
    """Query ``token``, then a ``bearer.<jwt>`` subprotocol, then ``Authorization``."""
    token = request.query.get("token")
    if token:
        return token
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(_BEARER_PROTOCOL):
            return proto[len(_BEARER_PROTOCOL) :]
    return parse_bearer(request.headers.get("Authorization"))


class ConsumerConnection:
    """The subscriptions of one consumer websocket and its token."""

    def __init__(
        self, rt: Runtime, ws: web.WebSocketResponse, principal: Principal, request: web.Request, **log_fields: Any
    ) -> None:
        self.rt = rt
        self.ws = ws
        self.principal = principal
        self.request = request
        cfg = rt.config
        write = ws_text_writer(request, ws)
        self.outbox = Outbox(
            drained(request, write),
            cfg.consumer.max_queue_bytes,
            cfg.consumer.send_timeout_ms / 1000,
            backlog_of(request),
            None,  # the fast path: framer and write_frame below
            rt.metrics.delivery_latency,
            on_stuck=self._stuck,
            ping=ws_pinger(request),
            heartbeat_s=cfg.server.heartbeat_s,
            on_delivered=rt.metrics.written,
            budget=rt.relay.consumer_budget,
            framer=ws_text_frame,  # one publication's message built once for all its consumers
            write_frame=ws_frame_writer(request, ws),
        )
        self.subs: dict[str, Subscription] = {}
        self.close_code: int | None = None  # the code the peer got when relayd closed (1006: aborted)
        self.refused = 0  # frames answered with an error
        # for the close log line: frames read, subscriptions made
        self.frames_in = self.streams = 0
        self.log = ConnectionLog(log, "consumer_ws", request.remote, **log_fields)
        self.debug = log.isEnabledFor(logging.DEBUG)  # decided once per connection, as ingest does
        self._expiry: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self.schedule_expiry()

    def schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        delay = max(self.principal.expires_at - time.time(), 0.0)
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self.rt.metrics.auth_failure("token_expired")
        self.close(CloseCode.TOKEN_EXPIRED, "token_expired")

    def close(self, code: int, reason: str, why: str = "") -> asyncio.Task[None]:
        """Close from relayd's side (once); ``why`` is logged, ``reason`` goes in the close frame."""
        if self._closing is None:
            self.log.closing(why or reason)
            self._closing = asyncio.create_task(self._close(code, reason))
        return self._closing

    async def _close(self, code: int, reason: str) -> None:
        self.close_code = await close_stuck(self.request, self.ws, code, reason)

    def _stuck(self, why: str) -> None:
        """The outbox gave up on the peer: it takes nothing, lets replies pile up, or went silent."""
        self.rt.metrics.forced_close("consumer_ws", why)
        if why == "heartbeat_timeout":  # the peer is gone: nothing would read a close frame
            self.log.closing(why)
            self.close_code = CLOSED_ABNORMALLY
            abort(self.request)
            return
        self.rt.metrics.slow_consumer()
        self.close(CloseCode.SLOW_CONSUMER, "slow_consumer", why)

    def subscription_done(self, sub: Subscription) -> None:
        if self.subs.get(sub.stream) is sub:
            del self.subs[sub.stream]

    def subscribe(self, stream: str, cursor: tuple[int, int] | None, wait_ms: int | None) -> None:
        self.principal.require(stream, "read")
        if stream in self.subs:
            raise ClientError("bad_frame", f"already subscribed to {stream}")
        if len(self.subs) >= self.rt.config.limits.max_streams_per_connection:
            raise ClientError("too_many_streams", "limits.max_streams_per_connection reached")
        cap = self.rt.config.streams.wait_timeout_ms
        wait_s = min(cap if wait_ms is None else wait_ms, cap) / 1000
        sub = self.rt.relay.subscribe(stream, self.outbox, WS_CODEC, cursor=cursor, wait_s=wait_s, owner=self)
        self.streams += 1
        if self.debug:  # format_cursor only when the line is written
            self.log.event(logging.DEBUG, "subscribe", stream=stream, cursor=cursor and format_cursor(*cursor))
        self.subs[stream] = sub
        self.outbox.control(frame(type="subscribed", stream=stream))
        sub.start()

    async def handle(self, line: bytes | str) -> None:
        op = decode_consumer(line)
        try:
            if isinstance(op, FrameError):
                raise op.error
            if type(op) is SubscribeOp:
                self.subscribe(op.stream, op.cursor, op.wait_ms)
            elif type(op) is UnsubscribeOp:
                sub = self.subs.pop(op.stream, None)
                if sub is not None:
                    await sub.stop()
                self.outbox.control(frame(type="unsubscribed", stream=op.stream))
            elif type(op) is CancelOp:
                self.principal.require(op.stream, "cancel")
                if not await self.rt.relay.cancel(op.stream):
                    raise ClientError("stream_ended", f"stream {op.stream} is not open")
                self.outbox.control(frame(type="cancel_requested", stream=op.stream))
            elif type(op) is AuthOp:
                self.reauth(op.token)
            elif type(op) is PingOp:
                self.outbox.control(frame(type="pong", id=op.id) if op.id is not None else b'{"type":"pong"}')
        except ClientError as exc:
            if isinstance(exc, AuthError):
                self.rt.metrics.auth_failure(exc.code)
            else:
                self.rt.metrics.bad_frame(exc.code)
            if not self.refused:  # the first one per connection; the close line counts them all
                self.log.event(logging.INFO, "refused frame", code=exc.code, error=exc.message)
            self.refused += 1
            stream = op.stream if isinstance(op, FrameError) else getattr(op, "stream", None)
            self.outbox.control(error_frame(exc.code, exc.message, stream))

    def reauth(self, token: str) -> None:
        principal = self.rt.tokens.verify(token)
        self.principal = principal
        self.schedule_expiry()
        for stream, sub in list(self.subs.items()):
            if not principal.allows(stream, "read"):
                del self.subs[stream]
                asyncio.create_task(sub.stop())  # noqa: RUF006 - stop() finishes on its own
                self.outbox.control(error_frame("forbidden", "the new token does not allow this stream", stream))
        self.outbox.control(frame(type="authed", expires_at=int(principal.expires_at)))

    async def shutdown(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for sub in list(self.subs.values()):
            await sub.stop()
        self.subs.clear()
        if self._closing is not None:
            await asyncio.wait([self._closing])  # its outcome is the close code to log


@limited("consumer_ws")
async def consume_ws(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    if rt.draining.is_set():
        return web.json_response({"error": {"code": "shutting_down", "message": "relayd is draining"}}, status=503)
    # No aiohttp heartbeat: the outbox's watchdog pings, and counts what the peer reads as a sign
    # of life too (a pong queued behind megabytes the peer is still reading is not late).
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,), autoping=False, max_msg_size=_MAX_CONSUMER_MESSAGE, compress=False
    )
    await ws.prepare(request)
    try:
        principal = rt.tokens.verify(token_from_request(request))
        first_stream = request.match_info.get("stream")
        first_cursor = parse_optional_cursor(request.query.get("cursor"))
        wait_ms = parse_uint(request.query["wait_ms"], "wait_ms") if request.query.get("wait_ms") else None
        if first_stream is not None:
            principal.require(check_stream_id(first_stream), "read")
    except AuthError as exc:
        rt.metrics.auth_failure(exc.code)
        fields = {"remote": request.remote, "code": exc.code}
        log.info("consumer_ws refused %s", Pairs(fields), extra={"role": "consumer_ws", **fields})
        ws[ERROR_CODE] = exc.code  # for the failed-credential limit (relayd/web/throttle.py)
        await ws.close(code=exc.close_code, message=exc.code.encode())
        return ws
    except ClientError as exc:
        rt.metrics.bad_frame(exc.code)
        await ws.send_frame(error_frame(exc.code, exc.message), WSMsgType.TEXT)
        await ws.close(code=CloseCode.NORMAL, message=exc.code.encode())
        return ws

    rt.metrics.connection_opened("consumer_ws")
    conn = ConsumerConnection(rt, ws, principal, request, stream=first_stream)
    writer = asyncio.create_task(_write(conn), name="relayd-consumer-writer")
    ended_by = "client_closed"

    async def drain_close() -> None:
        conn.log.closing("shutting_down")
        await conn.outbox.flush(1.0)
        await asyncio.wait([conn.close(CloseCode.SERVICE_RESTART, "shutting_down")])

    rt.consumers.add(drain_close)
    try:
        if first_stream is not None:
            conn.subscribe(first_stream, first_cursor, wait_ms)
        while True:
            msg = await next_message(ws, conn.outbox)
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                for n, line in enumerate(split_message(msg.data), 1):
                    conn.frames_in += 1
                    await conn.handle(line)
                    if conn.outbox.closed:
                        break  # closed for what it sent (its replies piled up): read no further
                    if not n % _LINES_PER_TURN:
                        await asyncio.sleep(0)  # a long message does not hold the loop from others
            elif msg.type is WSMsgType.ERROR:
                ended_by = "message_too_big" if ws.close_code == CloseCode.MESSAGE_TOO_BIG else "error"
                conn.log.event(logging.INFO, "connection error", error=str(ws.exception()))
                break
            else:  # CLOSE, CLOSING, CLOSED
                break
    finally:
        rt.consumers.discard(drain_close)
        await conn.shutdown()
        conn.outbox.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        rt.metrics.connection_closed("consumer_ws")
        code = conn.close_code or ws.close_code
        conn.log.closed(
            code,
            "connection_lost" if code in (None, 1006) else ended_by,
            frames_in=conn.frames_in,
            chunks_out=conn.outbox.chunks_written,
            streams=conn.streams,
            refused=conn.refused,
        )
    return ws


async def _write(conn: ConsumerConnection) -> None:
    with contextlib.suppress(SlowConsumer, ConnectionError, RuntimeError):
        await conn.outbox.run()  # SlowConsumer: the outbox already had the connection closed
