"""The composition root of the engine: the one place that orders store -> hub.

Producer ops become writes for the batcher; when Redis answers, the relay publishes what became
durable to the hub (durable first: no consumer sees a chunk Redis does not have) and answers the
producer. It also keeps the streams each producer connection holds (for cancel requests and
liveness) and runs the producer-lost sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic
from typing import Any

import hiredis
import orjson

from relayd.batcher import Batcher, Write
from relayd.config import Config
from relayd.errors import StoreError
from relayd.hub import Hub, Publication
from relayd.metrics import Metrics
from relayd.protocol import AppendOp, EndOp, Entry, OpenOp, error_frame, format_cursor, frame
from relayd.store.redis_streams import Store, StreamMeta, now_ms

log = logging.getLogger("relayd.relay")

_ENDED_MEMORY = 1000  # ended streams a producer connection remembers, to answer stream_ended


@dataclass(slots=True)
class Held:
    """A stream a producer connection has opened."""

    epoch: int
    gen: int
    text: bool
    append_head: bytes  # the stream's append command up to the epoch, encoded once
    stream_json: bytes  # the stream id as JSON, for acks
    first_chunk_due: float = 0.0  # created by this open: when (monotonic) the open was read; 0 after its first chunk


class ProducerSession:
    """Transport-agnostic state of one producer connection."""

    def __init__(self, send: Callable[[bytes], None], max_unacked_bytes: int) -> None:
        self.send = send
        self.held: dict[str, Held] = {}
        self.text_streams: set[str] = set()
        self.unacked_bytes = 0
        self.max_unacked_bytes = max_unacked_bytes
        self.room = asyncio.Event()
        self.room.set()
        self.closed = False
        # When (monotonic) the message being handled was read: the start of ack and delivery latency.
        self.received_at = 0.0
        # Streams this connection held (or found ended on open) that have ended -> their epoch.
        self.ended: dict[str, int] = {}
        # Ops that arrived while their stream's open was on its way to Redis (pipelined producers),
        # with when they were read.
        self.opening: dict[str, list[tuple[AppendOp | EndOp, float]]] = {}

    def charge(self, nbytes: int) -> None:
        self.unacked_bytes += nbytes
        if self.unacked_bytes >= self.max_unacked_bytes:
            self.room.clear()

    def credit(self, nbytes: int) -> None:
        self.unacked_bytes -= nbytes
        if self.unacked_bytes < self.max_unacked_bytes:
            self.room.set()

    def hold(self, stream: str, held: Held) -> None:
        self.ended.pop(stream, None)
        self.held[stream] = held
        if held.text:
            self.text_streams.add(stream)
        else:
            self.text_streams.discard(stream)

    def drop(self, stream: str) -> None:
        self.held.pop(stream, None)
        self.text_streams.discard(stream)

    def finish(self, stream: str, epoch: int | None = None) -> None:
        """``stream`` ended: drop it but remember it (bounded), so later ops get ``stream_ended``."""
        held = self.held.pop(stream, None)
        self.text_streams.discard(stream)
        if held is not None:
            epoch = held.epoch
        if epoch is None:
            epoch = self.ended.get(stream)
        if epoch is not None:
            self.ended.pop(stream, None)
            self.ended[stream] = epoch
            if len(self.ended) > _ENDED_MEMORY:
                del self.ended[next(iter(self.ended))]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Relay:
    def __init__(self, config: Config, store: Store, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.hub = Hub(store, metrics, config.consumer.catchup_page)
        self.batcher = Batcher(store, config.batch, config.redis.retry_ms, config.redis.timeout_ms, metrics)
        self._holders: dict[str, ProducerSession] = {}
        self._cancel_timers: dict[str, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="relayd-sweeper")

    async def close(self) -> None:
        """Flush what producers sent; stop background work. The store is closed by its owner."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for timer in self._cancel_timers.values():
            timer.cancel()
        self._cancel_timers.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.server.drain_timeout_s):
                await self.batcher.drain()
        await self.batcher.close()

    # producer ops -----------------------------------------------------------------------------

    def open(self, session: ProducerSession, op: OpenOp) -> None:
        if op.stream not in session.held and len(session.held) >= self.config.limits.max_streams_per_connection:
            session.send(error_frame("too_many_streams", "limits.max_streams_per_connection reached", op.stream))
            return
        payload = self.store.cmd_open(op.stream, op.epoch, op.content_type, now_ms(), op.producer)
        session.opening.setdefault(op.stream, [])
        received = session.received_at

        def done(reply: Any, exc: BaseException | None) -> None:
            try:
                opened(reply, exc)
            finally:
                self._replay_deferred(session, op.stream)

        def opened(reply: Any, exc: BaseException | None) -> None:
            if exc is not None or isinstance(reply, hiredis.ReplyError):
                session.send(error_frame("store_unavailable", f"open failed: {exc or reply}", op.stream))
                return
            code, gen, epoch, seq, n, status, content_type = (_s(v) for v in reply)
            gen_i, n_i = int(gen), int(n)
            if code == "fenced":
                session.send(error_frame("fenced", f"stream is held by a newer producer (epoch {epoch})", op.stream))
                return
            if code == "created":
                self.metrics.stream_started()
                self.hub.created(op.stream)
            if code != "ended":
                epoch_i = int(epoch)
                held = Held(
                    epoch_i,
                    gen_i,
                    content_type == "text",
                    self.store.append_head(op.stream, epoch_i),
                    orjson.dumps(op.stream),
                    received if code == "created" else 0.0,
                )
                self._take(op.stream, session, held)
            else:
                session.finish(op.stream, int(epoch))  # appends get stream_ended, not not_open
            fields = {"producer": op.producer} if op.producer is not None else {}
            session.send(
                frame(
                    type="opened",
                    stream=op.stream,
                    epoch=int(epoch),
                    seq=int(seq),
                    cursor=format_cursor(gen_i, n_i) if n_i else None,
                    status=status,
                    content_type=content_type,
                    **fields,
                )
            )

        self.batcher.submit(Write(payload, done))

    def _replay_deferred(self, session: ProducerSession, stream: str) -> None:
        for deferred, received in session.opening.pop(stream, ()):
            if type(deferred) is AppendOp:
                session.credit(deferred.cost)
                self.append(session, deferred, received)
            elif type(deferred) is EndOp:
                self.end(session, deferred)

    def _defer(self, session: ProducerSession, op: AppendOp | EndOp) -> bool:
        """Hold ``op`` until its stream's open is answered; False if no open is pending."""
        pending = session.opening.get(op.stream)
        if pending is None:
            return False
        if type(op) is AppendOp:
            session.charge(op.cost)
        pending.append((op, session.received_at))
        return True

    def append(self, session: ProducerSession, op: AppendOp, received: float | None = None) -> None:
        """``received``: when the append was read, if not the message being handled now."""
        if received is None:
            received = session.received_at
        held = session.held.get(op.stream)
        if held is None:
            if self._defer(session, op):
                return
            if op.stream in session.ended:
                session.send(error_frame("stream_ended", "the stream has ended", op.stream, op.seq))
            else:
                session.send(error_frame("not_open", "open the stream on this connection first", op.stream, op.seq))
            return
        session.charge(op.cost)
        payload = self.store.cmd_append(held.append_head, op.seq, op.chunks, now_ms())

        def done(reply: Any, exc: BaseException | None) -> None:
            session.credit(op.cost)
            if exc is not None or isinstance(reply, hiredis.ReplyError):
                session.send(error_frame("store_unavailable", f"append not stored: {exc or reply}", op.stream, op.seq))
                return
            code = _s(reply[0])
            if code == "ok":
                gen, first, last, last_seq = int(reply[1]), int(reply[2]), int(reply[3]), int(reply[4])
                if first <= last:
                    new = op.chunks[len(op.chunks) - (last - first + 1) :]
                    entries = [Entry(first + i, chunk) for i, chunk in enumerate(new)]
                    self.metrics.chunks_stored(len(new), sum(len(c) for c in new))
                    if held.first_chunk_due:
                        self.metrics.first_chunk(monotonic() - held.first_chunk_due)
                        held.first_chunk_due = 0.0
                    self.hub.publish(Publication(op.stream, gen, entries, held.text, received))
                else:
                    # All stored already: a resend, or a retry after a lost reply whose chunks were
                    # never published here. Live subscribers short of them read them from Redis.
                    self.hub.poke(op.stream, gen, last)
                session.send(
                    b'{"type":"ack","stream":%s,"seq":%d,"cursor":"%s"}'
                    % (held.stream_json, last_seq, format_cursor(gen, last).encode())
                )
                if received:
                    self.metrics.ack_latency(monotonic() - received)
            elif code == "seq_gap":
                session.send(error_frame("seq_gap", f"expected seq {int(reply[1]) + 1}", op.stream, int(reply[1])))
            elif code == "fenced":
                self._release(op.stream, session)
                session.send(error_frame("fenced", "a newer producer took the stream over", op.stream, op.seq))
            elif code == "ended":
                self._release(op.stream, session, ended=True)
                session.send(error_frame("stream_ended", f"stream ended ({_s(reply[1])})", op.stream, op.seq))
            else:
                self._release(op.stream, session)
                session.send(error_frame("stream_ended", "stream expired or was removed", op.stream, op.seq))

        self.batcher.submit(Write(payload, done))

    def end(self, session: ProducerSession, op: EndOp) -> None:
        held = session.held.get(op.stream)
        if held is None and self._defer(session, op):
            return
        epoch = held.epoch if held is not None else session.ended.get(op.stream)
        if epoch is None:
            session.send(error_frame("not_open", "open the stream on this connection first", op.stream))
            return

        def done(result: str, gen: int, offset: int, status: str) -> None:
            if result in ("ok", "already") and (result == "ok" or status == op.reason):
                session.send(frame(type="ended", stream=op.stream, reason=op.reason, cursor=format_cursor(gen, offset)))
            elif result == "already":
                session.send(error_frame("stream_ended", f"stream already ended ({status})", op.stream))
            elif result == "fenced":
                session.send(error_frame("fenced", "a newer producer took the stream over", op.stream))
            else:
                session.send(
                    error_frame(
                        "store_unavailable" if result == "error" else "stream_ended", f"end failed: {result}", op.stream
                    )
                )
            self._release(op.stream, session, ended=result in ("ok", "already"))

        self._end(op.stream, op.reason, op.message, epoch=epoch, then=done)

    def release_session(self, session: ProducerSession) -> None:
        """The connection is gone. Its streams stay open until the producer timeout."""
        session.closed = True
        for stream in list(session.held):
            self._release(stream, session)

    # consumer requests ------------------------------------------------------------------------

    async def cancel(self, stream: str) -> bool:
        """Deliver a cancel request; end the stream ``cancelled`` if nobody does within the grace."""
        meta = await self.store.read_meta(stream)
        if meta is None or not meta.is_open:
            return False
        holder = self._holders.get(stream)
        grace = self.config.streams.cancel_grace_ms / 1000
        if holder is not None:
            holder.send(frame(type="cancel", stream=stream))
            if stream not in self._cancel_timers:
                loop = asyncio.get_running_loop()
                self._cancel_timers[stream] = loop.call_later(grace, self._force_cancel, stream)
        else:
            self._force_cancel(stream)
        return True

    def _force_cancel(self, stream: str) -> None:
        self._cancel_timers.pop(stream, None)
        self._end(stream, "cancelled", "cancelled by a consumer", epoch=None, then=None)

    # operator requests (the admin API) ------------------------------------------------------------

    async def end_stream(self, stream: str, reason: str, message: str) -> tuple[str, int, int, str]:
        """End ``stream`` as an operator: like a producer's end, without an epoch.

        Consumers get the end through the hub as from any producer. A producer holding the stream
        here is released and sent an unsolicited ``ended`` frame (its later appends get
        ``stream_ended``); one on another instance learns it from its next append. Returns
        ``(result, gen, offset, status)`` as ``end.lua`` answers (``ok``, ``already``,
        ``not_found``, ``error``).
        """
        future: asyncio.Future[tuple[str, int, int, str]] = asyncio.get_running_loop().create_future()
        holder = self._holders.get(stream)

        def then(result: str, gen: int, offset: int, status: str) -> None:
            if result == "ok" and holder is not None and not holder.closed:
                fields = {"message": message} if message else {}
                cursor = format_cursor(gen, offset)
                holder.send(frame(type="ended", stream=stream, reason=reason, cursor=cursor, **fields))
            if not future.done():
                future.set_result((result, gen, offset, status))

        self._end(stream, reason, message, epoch=None, then=then)
        return await future

    # shared -----------------------------------------------------------------------------------

    def _take(self, stream: str, session: ProducerSession, held: Held) -> None:
        previous = self._holders.get(stream)
        # A previous holder keeps its (older) epoch: the store refuses its next append or end
        # with ``fenced``, which releases the stream there.
        if previous is None:
            self.metrics.streams_held(1)
        self._holders[stream] = session
        session.hold(stream, held)
        self.batcher.submit(Write(self.store.cmd_index([(stream, now_ms())]), _ignore))

    def _release(self, stream: str, session: ProducerSession, *, ended: bool = False) -> None:
        if ended:
            session.finish(stream)
        else:
            session.drop(stream)
        if self._holders.get(stream) is session:
            del self._holders[stream]
            self.metrics.streams_held(-1)

    def _end(
        self,
        stream: str,
        reason: str,
        message: str,
        *,
        epoch: int | None,
        then: Callable[[str, int, int, str], None] | None,
        stale_before: int | None = None,
    ) -> None:
        payload = self.store.cmd_end(stream, reason, message, now_ms(), epoch=epoch, stale_before=stale_before)

        def done(reply: Any, exc: BaseException | None) -> None:
            if exc is not None or isinstance(reply, hiredis.ReplyError):
                if then is not None:
                    then("error", 0, 0, "")
                return
            result = _s(reply[0])
            gen = int(reply[1]) if len(reply) > 1 and result in ("ok", "already") else 0
            offset = int(reply[2]) if result in ("ok", "already") else 0
            status = _s(reply[3]) if result == "already" else reason
            if result == "ok":
                self.metrics.stream_ended(reason, (now_ms() - gen) / 1000)  # gen: the creation time, ms
                self.hub.publish(Publication(stream, gen, [Entry(offset, None, reason, message)], False))
                timer = self._cancel_timers.pop(stream, None)
                if timer is not None:
                    timer.cancel()
                holder = self._holders.get(stream)
                if holder is not None:
                    self._release(stream, holder, ended=True)
            elif result == "already":
                self.hub.poke(stream, gen, offset)  # the end may be the reply a failover lost
            if result in ("ok", "already", "not_found"):
                self.batcher.submit(Write(self.store.cmd_unindex([stream]), _ignore))
            if then is not None:
                then(result, gen, offset, status)

        self.batcher.submit(Write(payload, done))

    async def _sweep_forever(self) -> None:
        timeout_ms = self.config.streams.producer_timeout_ms
        interval = max(timeout_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(interval)  # a periodic job, not a synchronisation
            try:
                await self.sweep(timeout_ms)
            except StoreError as exc:
                self.metrics.redis_health(False)
                log.warning("producer-lost sweep skipped: %s", exc)
            else:
                self.metrics.redis_health(True)

    async def sweep(self, timeout_ms: int) -> None:
        """Keep streams held here alive; end streams whose producer is gone ``producer_lost``."""
        now = now_ms()
        held = list(self._holders)
        if held:
            for stream in held:
                self.batcher.submit(Write(self.store.cmd_touch(stream, now), _ignore))
            self.batcher.submit(Write(self.store.cmd_index([(s, now) for s in held]), _ignore))
        stale_before = now - timeout_ms
        for stream in await self.store.stale_open_streams(stale_before):
            if stream not in self._holders:
                self._end(stream, "producer_lost", "", epoch=None, then=None, stale_before=stale_before)

    async def stream_meta(self, stream: str) -> StreamMeta | None:
        return await self.store.read_meta(stream)


def _ignore(reply: Any, exc: BaseException | None) -> None:
    if exc is not None:
        log.debug("background write failed: %s", exc)
