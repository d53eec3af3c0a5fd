"""The relay: the engine's facade and the one place that orders store -> hub.

Producer ops become typed store writes; when the store answers, the relay publishes what became
durable to the hub (durable first: no consumer sees a chunk Redis does not have) and tells the
producer's :class:`~relayd.producer.ProducerPeer` the outcome. It keeps the streams each producer
connection holds (for cancel requests and liveness), runs the producer-lost sweep, and is what
web/ calls for everything else: subscriptions, metadata, cancel, the admin reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from time import monotonic
from typing import Any

from relayd import catalog
from relayd.broker import Broker, LocalBroker
from relayd.budget import Budget
from relayd.config import Config
from relayd.durable.engine import DurableStreams
from relayd.errors import StoreError
from relayd.hub import Hub, Publication
from relayd.leases import Leases
from relayd.metrics import Metrics
from relayd.model import (
    Appended,
    AppendOutcome,
    Ended,
    EndOutcome,
    Entry,
    Opened,
    OpenOutcome,
    StreamMeta,
    WriteOutcome,
    now_ms,
)
from relayd.ports import Store
from relayd.producer import Held, ProducerPeer, ProducerSession
from relayd.protocol import AppendOp, EndOp, FrameCodec, OpenOp
from relayd.subscription import Sink, Subscriber, SubscriptionOwner

log = logging.getLogger("relayd.relay")

Subscription = Subscriber  # what web/ holds of a subscription: start(), stop(), stream, chunks

_SWEEP_PAGE = 500  # stale streams read per round trip; the sweep reads pages until none are left
_new_tuple = tuple.__new__


class Relay:
    """Composition root of the engine: store, hub, broker, and the producers' streams."""

    def __init__(self, config: Config, store: Store, metrics: Metrics, broker: Broker | None = None) -> None:
        self.config = config
        self._store = store
        self.metrics = metrics
        self._broker: Broker = broker or LocalBroker()
        self._hub = Hub(store, metrics, config.consumer.catchup_page)
        store.on_reconnect = self._hub.resync_all
        self._holders: dict[str, ProducerSession] = {}
        self._cancel_timers: dict[str, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # Global bounds on the memory held for peers (relayd/budget.py)
        self.producer_budget = Budget(config.limits.max_producer_backlog_bytes)
        self.consumer_budget = Budget(config.limits.max_consumer_backlog_bytes)
        metrics.track_budgets(self.producer_budget, self.consumer_budget)
        self._leases = Leases(
            config,
            store,
            metrics,
            self.producer_budget,
            opened=self._lease_opened,
            publish=self._publish_appended,
            end=self._end,
        )
        # the Durable Streams protocol (relayd/web/durable.py) on the same store and hub
        self.durable = DurableStreams(store, self._hub, metrics, config.consumer.catchup_page)

    async def start(self) -> None:
        await self._broker.start(self._hub, self._on_remote_cancel)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="relayd-sweeper")

    async def drain(self) -> None:
        """Wait until every write submitted so far is answered: what producers sent is acknowledged."""
        await self._store.drain()

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
                await self._store.drain()
        await self._broker.close()

    # producer ops -----------------------------------------------------------------------------

    def session(self, peer: ProducerPeer, on_room: Callable[[bool], None] | None = None) -> ProducerSession:
        """The state of a new producer connection, bounded by its own and the global budget."""
        return ProducerSession(peer, self.config.limits.max_unacked_bytes, on_room, self.producer_budget)

    def open(self, session: ProducerSession, op: OpenOp) -> None:
        # Opens on their way to Redis count too: a pipelined producer must not get round the limit.
        known = op.stream in session.held or op.stream in session.opening
        if not known and session.stream_count() >= self.config.limits.max_streams_per_connection:
            session.peer.refused(op.stream, "too_many_streams", "limits.max_streams_per_connection reached")
            return
        session.start_opening(op.stream)
        received = session.received_at

        def done(outcome: OpenOutcome) -> None:
            try:
                self._opened(session, op, outcome, received)
            finally:
                held = session.held.get(op.stream)
                for deferred, at in session.take_deferred(op.stream):
                    if type(deferred) is AppendOp:
                        if held is not None and held.text and not _all_strings(deferred.chunks):
                            # decoded before the open said the stream is text: checked now, as the
                            # decoder checks appends to a text stream it knows
                            session.peer.refused(
                                op.stream, "content_type", "a text stream takes string chunks only", deferred.seq
                            )
                            continue
                        self.append(session, deferred, at)
                    elif type(deferred) is EndOp:
                        self.end(session, deferred)

        self._store.open(op.stream, op.epoch, op.content_type, op.producer, done)

    def _opened(self, session: ProducerSession, op: OpenOp, outcome: OpenOutcome, received: float) -> None:
        if not isinstance(outcome, Opened):
            session.peer.refused(op.stream, outcome.code, outcome.message)
            return
        if outcome.code == "created":
            self.metrics.stream_started()
            self._hub.created(op.stream)
        if outcome.code == "ended":
            session.finish(op.stream, outcome.epoch)  # appends get stream_ended, not not_open
        elif session.closed:
            # The connection left while the open was on its way: hold nothing for it (the sweep
            # would take the stream for alive forever); its producer timeout runs from now.
            self._store.touch([op.stream])
        else:
            held = Held(
                outcome.epoch,
                outcome.gen,
                outcome.content_type == "text",
                self._store.append_handle(op.stream, outcome.epoch, outcome.gen),
                received if outcome.code == "created" else 0.0,
            )
            self._take(op.stream, session, held)
        session.peer.opened(op.stream, outcome, op.producer)

    def append(self, session: ProducerSession, op: AppendOp, received: float | None = None) -> None:
        """``received``: when the append was read, if not the message being handled now."""
        if received is None:
            received = session.received_at
        stream = op.stream
        if session.opening and stream in session.opening and session.defer(op):
            return  # an open (or re-open) of this stream is on its way: after it, with its epoch
        held = session.held.get(stream)
        if held is None:
            if stream in session.ended:
                session.peer.refused(stream, "stream_ended", "the stream has ended", op.seq)
            else:
                session.peer.refused(stream, "not_open", "open the stream on this connection first", op.seq)
            return
        cost = op.cost
        session.charge(cost)

        # One closure per append, its reply handled in it: the hot path of every chunk (a
        # micro-optimisation: no further call to get from the store's answer to the ack).
        def done(outcome: AppendOutcome) -> None:
            session.credit(cost)
            if type(outcome) is not Appended:
                self._append_refused(session, op, held, outcome)
                return
            if self._publish_appended(stream, op.chunks, outcome, held.text, received) and held.first_chunk_due:
                self.metrics.first_chunk(monotonic() - held.first_chunk_due)
                held.first_chunk_due = 0.0
            session.peer.acked(stream, outcome.last_seq, outcome.gen, outcome.last)
            if received:
                self.metrics.ack_latency(monotonic() - received)

        self._store.append(held.handle, op.seq, op.chunks, done)

    def _publish_appended(
        self, stream: str, chunks: list[bytes], outcome: Appended, text: bool, received: float
    ) -> bool:
        """Publish what ``outcome`` stored of ``chunks`` (durable now); False if nothing was new."""
        gen, first, last = outcome.gen, outcome.first, outcome.last
        if first > last:
            # All stored already: a resend, or a retry after a lost reply whose chunks were
            # never published here. Live subscribers short of them read them from Redis.
            self._hub.poke(stream, gen, last)
            return False
        if first == last:  # one new chunk: most appends
            chunk = chunks[-1]
            self.metrics.chunks_stored(1, len(chunk))
            if self._hub.subscriber_count(stream):  # nobody follows it here: nothing to build
                # tuple.__new__: a named tuple's own __new__ is a Python function (one per append)
                entry = _new_tuple(Entry, (first, chunk, None, ""))
                self._hub.publish(Publication(stream, gen, [entry], text, received, len(chunk)))
            return True
        new = chunks[len(chunks) - (last - first + 1) :]
        nbytes = sum(map(len, new))
        self.metrics.chunks_stored(len(new), nbytes)
        if self._hub.subscriber_count(stream):
            entries = [Entry(first + i, chunk) for i, chunk in enumerate(new)]
            self._hub.publish(Publication(stream, gen, entries, text, received, nbytes))
        return True

    def _append_refused(self, session: ProducerSession, op: AppendOp, held: Held, outcome: Any) -> None:
        code = outcome.code
        if code == "seq_gap":
            session.peer.refused(op.stream, "seq_gap", outcome.message, outcome.value)
            return
        if code == "store_unavailable":
            session.peer.refused(op.stream, code, outcome.message, op.seq)
            return
        if session.held.get(op.stream) is held:  # not a hold a newer open of this connection made
            self._release(op.stream, session, ended=code == "ended")
        session.peer.refused(op.stream, "fenced" if code == "fenced" else "stream_ended", outcome.message, op.seq)

    def end(self, session: ProducerSession, op: EndOp) -> None:
        if op.stream in session.opening and session.defer(op):
            return
        held = session.held.get(op.stream)
        epoch = held.epoch if held is not None else session.ended.get(op.stream)
        if epoch is None:
            session.peer.refused(op.stream, "not_open", "open the stream on this connection first")
            return

        def done(outcome: EndOutcome) -> None:
            peer = session.peer
            if isinstance(outcome, Ended):
                if outcome.result == "ok" or outcome.status == op.reason:
                    peer.ended(op.stream, op.reason, outcome.gen, outcome.offset)
                else:
                    peer.refused(op.stream, "stream_ended", f"stream already ended ({outcome.status})")
            elif outcome.code == "fenced":
                peer.refused(op.stream, "fenced", "a newer producer took the stream over")
            else:
                code = "store_unavailable" if outcome.code == "store_unavailable" else "stream_ended"
                peer.refused(op.stream, code, outcome.message)
            self._release(op.stream, session, ended=isinstance(outcome, Ended))

        self._end(op.stream, op.reason, op.message, epoch=epoch, then=done)

    def release_session(self, session: ProducerSession) -> None:
        """The connection is gone. Its streams stay open until the producer timeout, which counts
        from now: the store records the disconnect as their last activity."""
        session.closed = True
        streams = list(session.held)
        for stream in streams:
            self._release(stream, session)
        self._store.touch(streams)

    # connectionless producers (HTTP ingest; relayd/leases.py) --------------------------------

    async def open_stream(
        self,
        stream: str,
        *,
        epoch: int | None = None,
        producer: str | None = None,
        content_type: str = "json",
        received: float | None = None,
    ) -> OpenOutcome:
        """Open ``stream`` for a connectionless producer, as the websocket ``open`` does (take over
        without ``epoch``, resume or start it with one). Optional: :meth:`write` opens by itself."""
        return await self._leases.open(
            stream, epoch=epoch, producer=producer, content_type=content_type, received=received or monotonic()
        )

    async def write(
        self,
        stream: str,
        *,
        epoch: int,
        seq: int = 0,
        chunks: list[bytes] | None = None,
        producer: str | None = None,
        content_type: str = "json",
        end: tuple[str, str] | None = None,
        received: float | None = None,
    ) -> WriteOutcome:
        """Append ``chunks`` (JSON each; seq ``seq`` on) to ``stream`` in ``epoch``, then end it if
        ``end`` is ``(reason, message)``; answered once durable. Opens the stream first (creating it
        with ``content_type``) when this relay has no lease for the epoch. Without chunks nor end:
        a heartbeat that keeps the stream from ``producer_lost``. ``received``: when (monotonic)
        the request arrived, for the latency metrics."""
        return await self._leases.write(
            stream,
            epoch=epoch,
            seq=seq,
            chunks=chunks or [],
            producer=producer,
            content_type=content_type,
            end=end,
            received=received or monotonic(),
        )

    async def finish(self, stream: str, *, epoch: int, reason: str, message: str = "") -> WriteOutcome:
        """End ``stream`` as its connectionless producer in ``epoch``: ``write`` with an end only."""
        return await self.write(stream, epoch=epoch, end=(reason, message))

    def write_admits(self, nbytes: int) -> bool:
        """Whether a write holding ``nbytes`` (:func:`relayd.leases.write_cost`) is admitted now:
        what web/ checks before it reads a request's body."""
        return self._leases.admits(nbytes)

    def cancel_requested(self, stream: str) -> bool:
        """A consumer asked to stop ``stream``, and its connectionless producer posted here."""
        return self._leases.cancel_requested(stream)

    def _lease_opened(self, stream: str, outcome: OpenOutcome) -> None:
        if not isinstance(outcome, Opened):
            return
        if outcome.code == "created":
            self.metrics.stream_started()
            self._hub.created(stream)
        if outcome.code == "ended":
            return
        holder = self._holders.get(stream)
        held = holder.held.get(stream) if holder is not None else None
        if holder is not None and (held is None or held.epoch < outcome.epoch):
            # Taken over from a websocket producer here: no longer kept alive or told of cancels
            # as its holder; its session keeps the older epoch, refused fenced at its next write.
            del self._holders[stream]
            self.metrics.streams_held(-1)
        self._store.index([stream])

    # consumer requests ------------------------------------------------------------------------

    def subscribe(
        self,
        stream: str,
        sink: Sink,
        codec: FrameCodec,
        *,
        cursor: tuple[int, int] | None,
        wait_s: float,
        owner: SubscriptionOwner,
    ) -> Subscriber:
        """A subscription (not started): history from ``cursor`` (None: the start), then live."""
        return Subscriber(self._hub, stream, sink, codec, cursor=cursor, wait_s=wait_s, owner=owner)

    async def cancel(self, stream: str) -> bool:
        """Deliver a cancel request; end the stream ``cancelled`` if nobody does within the grace."""
        meta = await self._store.read_meta(stream)
        if meta is None or not meta.is_open:
            return False
        holder = self._holders.get(stream)
        if holder is not None:
            holder.peer.cancel(stream)
        elif self._broker.remote:
            # The holder may be on another instance; a connectionless producer's next request
            # may come here or go to another one: both are told.
            self._leases.cancel(stream)
            self._broker.request_cancel(stream)
        elif not self._leases.cancel(stream):
            self._force_cancel(stream)
            return True
        if stream not in self._cancel_timers:
            grace = self.config.streams.cancel_grace_ms / 1000
            self._cancel_timers[stream] = asyncio.get_running_loop().call_later(grace, self._force_cancel, stream)
        return True

    def _on_remote_cancel(self, stream: str) -> None:
        """Another instance's consumer asked to cancel: tell the producer if it is connected here.
        (The grace timer runs on the asking instance.)"""
        holder = self._holders.get(stream)
        if holder is not None and not holder.closed:
            holder.peer.cancel(stream)
        else:
            self._leases.cancel(stream)

    def _force_cancel(self, stream: str) -> None:
        """The grace after a cancel request is over: end the stream, and tell a producer holding it
        here (one that ignored its ``cancel``) with an unsolicited ``ended``, as for an operator's end."""
        self._cancel_timers.pop(stream, None)
        self._end(stream, "cancelled", "cancelled by a consumer", epoch=None, then=None, tell_holder=True)

    async def read_meta(self, stream: str) -> StreamMeta | None:
        return await self._store.read_meta(stream)

    async def ping(self) -> None:
        """Raises :class:`StoreError` when the store does not answer."""
        await self._store.ping()

    @property
    def broker_up(self) -> bool:
        return self._broker.up

    # operator requests (the admin API) ------------------------------------------------------------

    async def end_stream(self, stream: str, reason: str, message: str) -> EndOutcome:
        """End ``stream`` as an operator: like a producer's end, without an epoch.

        Consumers get the end through the hub as from any producer. A producer holding the stream
        here is released and told ``ended`` (unsolicited; its later appends get ``stream_ended``);
        one on another instance learns it from its next append.
        """
        future: asyncio.Future[EndOutcome] = asyncio.get_running_loop().create_future()

        def then(outcome: EndOutcome) -> None:
            if not future.done():
                future.set_result(outcome)

        self._end(stream, reason, message, epoch=None, then=then, tell_holder=True)
        return await future

    async def list_streams(self, which: str, prefix: str, limit: int) -> dict[str, Any]:
        return await catalog.list_streams(self._store, which, prefix, limit, self._hub.subscriber_count)

    async def describe(self, stream: str) -> dict[str, Any] | None:
        return await catalog.describe(self._store, stream, self._hub.subscriber_count)

    def export(self, meta: StreamMeta) -> AsyncIterator[bytes]:
        return catalog.export(self._store, meta, self.config.consumer.catchup_page)

    async def delete_stream(self, stream: str) -> bool:
        return await self._store.delete_stream(stream)

    async def open_count(self) -> int:
        return await self._store.open_count()

    def subscriber_count(self, stream: str) -> int:
        return self._hub.subscriber_count(stream)

    # shared -----------------------------------------------------------------------------------

    def _take(self, stream: str, session: ProducerSession, held: Held) -> None:
        previous = self._holders.get(stream)
        # A previous holder keeps its (older) epoch: the store refuses its next append or end
        # with ``fenced``, which releases the stream there.
        if previous is None:
            self.metrics.streams_held(1)
        self._holders[stream] = session
        session.hold(stream, held)
        self._store.index([stream])

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
        then: Any,
        stale_before: int | None = None,
        tell_holder: bool = False,
    ) -> None:
        """``tell_holder``: send the holder, if here, an unsolicited ``ended`` (the end is not its own)."""

        def done(outcome: EndOutcome) -> None:
            if isinstance(outcome, Ended):
                if outcome.result == "ok":
                    self.metrics.stream_ended(reason, (now_ms() - outcome.gen) / 1000)  # gen: creation time, ms
                    end = Entry(outcome.offset, None, reason, message)
                    self._hub.publish(Publication(stream, outcome.gen, [end], False))
                    timer = self._cancel_timers.pop(stream, None)
                    if timer is not None:
                        timer.cancel()
                    # The holder as of now, not as of the request: an open answered after the end
                    # was written (its appends queued behind the end) made one that must be told,
                    # before the store refuses those appends ``stream_ended``.
                    holder = self._holders.get(stream)
                    if holder is not None:
                        self._release(stream, holder, ended=True)
                        if tell_holder and not holder.closed:
                            holder.peer.ended(stream, reason, outcome.gen, outcome.offset, message)
                else:
                    self._hub.poke(stream, outcome.gen, outcome.offset)  # the end may be the reply a failover lost
            if isinstance(outcome, Ended) or outcome.code == "not_found":
                self._store.unindex([stream])
            if then is not None:
                then(outcome)

        self._store.end(stream, reason, message, done, epoch=epoch, stale_before=stale_before)

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
        """Keep streams held here alive; end streams whose producer is gone ``producer_lost``.

        Every instance sweeps; ``end.lua`` ends a stream only if its last producer activity (on any
        instance) is older than the timeout, atomically, so exactly one end is written.
        """
        self._store.touch(list(self._holders))
        stale_before = now_ms() - timeout_ms
        skip = 0  # stale entries that stay in the index (held here, alive elsewhere, failed): read past them
        while True:
            stale = await self._store.stale_open_streams(stale_before, _SWEEP_PAGE, skip)
            ends = [s for s in stale if s not in self._holders]
            skip += len(stale) - len(ends)
            left = await self._end_lost(ends, stale_before)
            skip += left
            if len(stale) < _SWEEP_PAGE:
                return

    async def _end_lost(self, streams: list[str], stale_before: int) -> int:
        """End ``streams`` producer_lost (if still stale); how many remain in the open index."""
        if not streams:
            return 0
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pending = len(streams)
        remain = 0

        def then(outcome: EndOutcome) -> None:
            nonlocal pending, remain
            if not isinstance(outcome, Ended) and outcome.code != "not_found":
                remain += 1  # alive (touched meanwhile) or not written: still indexed
            pending -= 1
            if not pending and not done.done():
                done.set_result(None)

        for stream in streams:
            self._end(stream, "producer_lost", "", epoch=None, then=then, stale_before=stale_before)
        # Only this page's ends: the pipeline as a whole may never be idle under load.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.redis.timeout_ms / 1000 + self.config.redis.retry_ms / 1000):
                await done
        return remain + pending


def _all_strings(chunks: list[bytes]) -> bool:
    """Every chunk (JSON text) is a JSON string."""
    return all(chunk[:1] == b'"' for chunk in chunks)
