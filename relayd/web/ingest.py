"""``GET /v1/ingest``: the producer websocket (API key), many streams per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import WSMsgType, web

from relayd.auth import parse_bearer
from relayd.errors import AuthError, CloseCode
from relayd.outbox import Outbox, SlowConsumer
from relayd.protocol import (
    AppendOp,
    EndOp,
    FrameError,
    OpenOp,
    PingOp,
    ProducerDecoder,
    error_frame,
    frame,
    split_message,
)
from relayd.relay import ProducerSession
from relayd.web.errors import client_error_response
from relayd.web.keys import RUNTIME
from relayd.web.transport import backlog_of, close_stuck, ws_text_writer

log = logging.getLogger("relayd.ingest")


async def ingest(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    cfg = rt.config
    if rt.draining.is_set():
        return web.json_response({"error": {"code": "shutting_down", "message": "relayd is draining"}}, status=503)
    try:
        rt.api_keys.verify(parse_bearer(request.headers.get("Authorization")))
    except AuthError as exc:
        rt.metrics.auth_failure(exc.code)
        log.info("producer refused from %s: %s", request.remote, exc.code)
        return client_error_response(exc)

    ws = web.WebSocketResponse(
        heartbeat=cfg.server.heartbeat_s, max_msg_size=cfg.limits.max_frame_bytes, compress=False
    )
    await ws.prepare(request)
    rt.metrics.connection_opened("producer")
    started = time.monotonic()

    async def send(batch: list[bytes]) -> None:
        await ws.send_frame(b"\n".join(batch), WSMsgType.TEXT)

    outbox = Outbox(
        send,
        cfg.limits.max_unacked_bytes,
        cfg.consumer.send_timeout_ms / 1000,
        backlog_of(request),
        ws_text_writer(request, ws),
    )
    session = ProducerSession(outbox.control, cfg.limits.max_unacked_bytes)
    writer = asyncio.create_task(_write(outbox, ws), name="relayd-producer-writer")
    decoder = ProducerDecoder(cfg.limits.max_chunk_bytes)
    relay = rt.relay
    ops = chunks = refused = 0

    async def drain_close() -> None:
        # Drain: everything this producer sent is acknowledged before it is told to go.
        await relay.batcher.drain()
        await outbox.flush(cfg.server.drain_timeout_s)
        await close_stuck(ws, CloseCode.SERVICE_RESTART, "shutting_down")

    rt.producers.add(drain_close)
    try:
        while True:
            if not session.room.is_set():
                await session.room.wait()  # flow control: stop reading until Redis acknowledged
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                for line in split_message(msg.data):
                    op = decoder.decode(line, session.text_streams)
                    ops += 1
                    if type(op) is AppendOp:
                        chunks += len(op.chunks)
                        relay.append(session, op)
                    elif type(op) is OpenOp:
                        relay.open(session, op)
                    elif type(op) is EndOp:
                        relay.end(session, op)
                    elif type(op) is PingOp:
                        session.send(frame(type="pong", id=op.id) if op.id is not None else b'{"type":"pong"}')
                    elif isinstance(op, FrameError):
                        rt.metrics.bad_frame(op.error.code)
                        if not refused:  # the first one per connection; the close line counts them all
                            log.info("producer %s sent a refused frame: %s", request.remote, op.error)
                        refused += 1
                        session.send(error_frame(op.error.code, op.error.message, op.stream, op.seq))
            elif msg.type is WSMsgType.ERROR:
                log.info("producer connection error: %s", ws.exception())
                break
            else:  # CLOSE, CLOSING, CLOSED
                break
    finally:
        rt.producers.discard(drain_close)
        relay.release_session(session)
        await outbox.flush(1.0)
        outbox.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        rt.metrics.connection_closed("producer")
        log.info(
            "producer closed remote=%s duration_s=%.1f ops=%d chunks=%d refused=%d code=%s",
            request.remote,
            time.monotonic() - started,
            ops,
            chunks,
            refused,
            ws.close_code,
        )
    return ws


async def _write(outbox: Outbox, ws: web.WebSocketResponse) -> None:
    try:
        await outbox.run()
    except SlowConsumer:
        await close_stuck(ws, CloseCode.SLOW_CONSUMER, "slow_consumer")
    except (ConnectionError, RuntimeError):
        pass  # the peer went away; the reading side notices too
