"""``GET /v1/ingest``: the producer websocket (API key), many streams per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from time import monotonic

from aiohttp import WSMsgType, web

from relayd.auth import parse_bearer
from relayd.errors import AuthError, CloseCode
from relayd.logs import ConnectionLog, Pairs
from relayd.model import Opened
from relayd.outbox import Outbox, SlowConsumer
from relayd.producer import ProducerSession
from relayd.protocol import (
    AppendOp,
    EndOp,
    FrameError,
    OpenOp,
    PingOp,
    ProducerDecoder,
    ack_frame_with,
    ack_prefix,
    cancel_frame,
    ended_frame,
    error_frame,
    format_cursor,
    opened_frame,
    pong_frame,
    split_message,
)
from relayd.web.errors import client_error_response
from relayd.web.gate import limited
from relayd.web.inline import InlineWebSocketResponse
from relayd.web.keys import RUNTIME, Runtime
from relayd.web.transport import (
    CLOSED_ABNORMALLY,
    abort,
    backlog_of,
    close_stuck,
    drained,
    next_message,
    ws_pinger,
    ws_text_writer,
)

log = logging.getLogger("relayd.ingest")

_ACK_PREFIXES = 1000  # streams whose ack prefix a connection keeps (then it starts again)
_LINES_PER_TURN = 256  # lines of one message handled before other connections get a turn


class FramePeer:
    """The relay's producer outcomes as wire frames on this connection's outbox."""

    __slots__ = ("_ack_prefixes", "_control")

    def __init__(self, outbox: Outbox) -> None:
        self._control = outbox.control
        self._ack_prefixes: dict[str, bytes] = {}  # stream -> its acks' constant start

    def opened(self, stream: str, outcome: Opened, producer: str | None) -> None:
        cursor = format_cursor(outcome.gen, outcome.n) if outcome.n else None
        self._control(
            opened_frame(
                stream,
                epoch=outcome.epoch,
                seq=outcome.seq,
                cursor=cursor,
                status=outcome.status,
                content_type=outcome.content_type,
                producer=producer,
            )
        )

    def acked(self, stream: str, seq: int, gen: int, offset: int) -> None:
        prefix = self._ack_prefixes.get(stream)
        if prefix is None:
            if len(self._ack_prefixes) >= _ACK_PREFIXES:
                self._ack_prefixes.clear()
            prefix = self._ack_prefixes[stream] = ack_prefix(stream)
        self._control(ack_frame_with(prefix, seq, gen, offset))

    def ended(self, stream: str, reason: str, gen: int, offset: int, message: str = "") -> None:
        self._control(ended_frame(stream, reason, format_cursor(gen, offset), message))

    def refused(self, stream: str | None, code: str, message: str, seq: int | None = None) -> None:
        self._control(error_frame(code, message, stream, seq))

    def cancel(self, stream: str) -> None:
        self._control(cancel_frame(stream))


@limited("producer")
async def ingest(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    cfg = rt.config
    if rt.draining.is_set():
        return web.json_response({"error": {"code": "shutting_down", "message": "relayd is draining"}}, status=503)
    try:
        scope = rt.api_keys.verify(parse_bearer(request.headers.get("Authorization")))
    except AuthError as exc:
        rt.metrics.auth_failure(exc.code)
        fields = {"remote": request.remote, "code": exc.code}
        log.info("producer refused %s", Pairs(fields), extra={"role": "producer", **fields})
        return client_error_response(exc)

    # No aiohttp heartbeat: the outbox's watchdog pings (see consume.py).
    ws = InlineWebSocketResponse(autoping=False, max_msg_size=cfg.limits.max_frame_bytes, compress=False)
    await ws.prepare(request)
    rt.metrics.connection_opened("producer")
    conn_log = ConnectionLog(log, "producer", request.remote)

    closing: list[asyncio.Task[int]] = []  # relayd's close, once; its result is the code the peer got

    def close(code: int, reason: str) -> asyncio.Task[int]:
        if not closing:
            closing.append(asyncio.create_task(close_stuck(request, ws, code, reason)))
        return closing[0]

    def stuck(why: str) -> None:
        """The outbox gave up on the producer: it reads no acks, lets replies pile up, or went silent."""
        rt.metrics.forced_close("producer", why)
        conn_log.closing(why)
        if why == "heartbeat_timeout":
            abort(request)  # the peer is gone: nothing would read a close frame
        else:
            close(CloseCode.SLOW_CONSUMER, "slow_consumer")

    write = ws_text_writer(request, ws)
    outbox = Outbox(
        drained(request, write),
        cfg.limits.max_unacked_bytes,
        cfg.consumer.send_timeout_ms / 1000,
        backlog_of(request),
        write,
        on_stuck=stuck,
        ping=ws_pinger(request),
        heartbeat_s=cfg.server.heartbeat_s,
    )
    room = asyncio.Event()
    room.set()
    relay = rt.relay
    session = relay.session(FramePeer(outbox), lambda has_room: room.set() if has_room else room.clear())
    writer = asyncio.create_task(_write(outbox), name="relayd-producer-writer")
    decoder = ProducerDecoder(cfg.limits.max_chunk_bytes, scope.allows if scope else None)  # auth.api_key_streams
    reader = _Reader(rt, session, decoder, outbox, conn_log, room, ws)
    ended_by = "connection_lost"

    async def drain_close() -> None:
        # Drain: everything this producer sent is acknowledged before it is told to go.
        conn_log.closing("shutting_down")
        await relay.drain()
        await outbox.flush(cfg.server.drain_timeout_s)
        await asyncio.wait([close(CloseCode.SERVICE_RESTART, "shutting_down")])

    async def wind_up() -> None:
        """However the connection ends. (Not a ``finally`` block: mypyc, which compiles this module
        in the compiled build, gets an await in one wrong; tests/test_compiled_rules.py.)"""
        ws.take_inline(None)
        rt.producers.discard(drain_close)
        relay.release_session(session)
        await outbox.flush(1.0)
        outbox.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        rt.metrics.connection_closed("producer")
        code = ws.close_code  # the producer's own close code, unless relayd closed first:
        if closing:
            await asyncio.wait(closing)
            code = closing[0].result()
        elif outbox.stalled:
            code = CLOSED_ABNORMALLY
        conn_log.closed(
            code,
            ended_by,
            frames_in=reader.ops,
            chunks_in=reader.chunks,
            streams=reader.streams,
            refused=reader.refused,
            messages_inline=reader.inline,
        )

    rt.producers.add(drain_close)
    ws.take_inline(reader.take)
    try:
        while True:
            # Data messages are mostly handled inline, as they are parsed (reader.take); here come
            # the ones it left queued (no room, a long message, ...) and every control message.
            msg = await next_message(ws, outbox)
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                try:
                    await reader.queued(msg.data)
                finally:
                    ws.handled()
            elif msg.type is WSMsgType.ERROR:
                ended_by = "message_too_big" if ws.close_code == CloseCode.MESSAGE_TOO_BIG else "error"
                conn_log.event(logging.INFO, "connection error", error=str(ws.exception()))
                break
            else:  # CLOSE, CLOSING, CLOSED
                if msg.type is WSMsgType.CLOSE:
                    ended_by = "client_closed"
                break
    except BaseException:
        await wind_up()
        raise
    await wind_up()
    return ws


class _Reader:
    """The reading side of one producer connection: messages -> ops -> the relay."""

    __slots__ = (
        "_budget",
        "_conn_log",
        "_debug",
        "_decoder",
        "_metrics",
        "_outbox",
        "_relay",
        "_room",
        "_session",
        "_ws",
        "chunks",
        "inline",
        "ops",
        "refused",
        "streams",
    )

    def __init__(
        self,
        rt: Runtime,
        session: ProducerSession,
        decoder: ProducerDecoder,
        outbox: Outbox,
        conn_log: ConnectionLog,
        room: asyncio.Event,
        ws: InlineWebSocketResponse,
    ) -> None:
        self._relay = rt.relay
        self._metrics = rt.metrics
        self._budget = rt.relay.producer_budget
        self._session = session
        self._decoder = decoder
        self._outbox = outbox
        self._conn_log = conn_log
        self._room = room
        self._ws = ws
        self._debug = log.isEnabledFor(logging.DEBUG)  # decided once per connection
        self.ops = self.chunks = self.streams = self.refused = 0
        self.inline = 0  # data messages taken as parsed (the others went through the queue)

    def take(self, data: bytes | str) -> bool:
        """A data message as the parser completes it, in the transport's ``data_received``: handled
        now if the connection may read on (False: queued for :meth:`queued`, in order).

        The same checks as before each message the handler task reads: the connection's unacked
        bytes and the producers' global budget; a message long enough to yield the loop goes the
        task's way, as does everything while relayd closes the connection.
        """
        if not self._room.is_set() or self._budget.spent or self._outbox.closed or self._ws.closed:
            return False
        lines = split_message(data)
        if len(lines) > _LINES_PER_TURN:
            return False
        self.inline += 1
        self._outbox.heard()
        self._session.received_at = monotonic()  # the start of ack and delivery latency
        try:
            self._lines(lines, 0)
        except Exception:
            # Raised into aiohttp's parser, which fails the connection (the handler task reads an
            # error): as an exception in the handler's own loop would.
            log.exception("producer message failed")
            raise
        return True

    async def queued(self, data: bytes | str) -> None:
        """A data message the handler task read (later ones queue behind it until it is handled):
        wait for room, then handle it in turns."""
        if not self._room.is_set():
            await self._room.wait()  # flow control: stop reading until Redis acknowledged
        if self._budget.spent:
            await self._budget.wait()  # all producers together hold too much: everyone waits
        self._session.received_at = monotonic()  # once per message
        lines = split_message(data)
        start = self._lines(lines, 0)
        while start < len(lines):
            await asyncio.sleep(0)  # a long message does not hold the loop from others
            start = self._lines(lines, start)

    def _lines(self, lines: Sequence[bytes | str], start: int) -> int:
        """Handle up to ``_LINES_PER_TURN`` lines from ``start``; where to go on (len(lines): done)."""
        session, decoder, relay, outbox = self._session, self._decoder, self._relay, self._outbox
        stop = min(len(lines), start + _LINES_PER_TURN)
        for i in range(start, stop):
            op = decoder.decode(lines[i], session.text_streams, session.held)
            self.ops += 1
            if type(op) is AppendOp:
                self.chunks += len(op.chunks)
                relay.append(session, op)
            elif type(op) is OpenOp:
                self.streams += 1
                if self._debug:
                    self._conn_log.event(logging.DEBUG, "open", stream=op.stream, epoch=op.epoch)
                relay.open(session, op)
            elif type(op) is EndOp:
                relay.end(session, op)
            elif type(op) is PingOp:
                outbox.control(pong_frame(op.id))
            elif isinstance(op, FrameError):
                self._metrics.bad_frame(op.error.code)
                if not self.refused:  # the first one per connection; the close line counts them all
                    self._conn_log.event(logging.INFO, "refused frame", code=op.error.code, error=op.error.message)
                self.refused += 1
                session.peer.refused(op.stream, op.error.code, op.error.message, op.seq)
            if outbox.closed:
                return len(lines)  # closed for what it sent (its replies piled up): read no further
        return stop


async def _write(outbox: Outbox) -> None:
    # SlowConsumer: the outbox already had the connection closed; ConnectionError: the peer went
    # away, and the reading side notices too
    with contextlib.suppress(SlowConsumer, ConnectionError, RuntimeError):
        await outbox.run()
