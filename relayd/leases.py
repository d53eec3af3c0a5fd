"""Connectionless producers: every request one awaitable write; the stream held by a lease.

A producer that cannot hold a websocket (a serverless function, an edge runtime, curl; the
Durable Streams protocol) names its epoch and sequence numbers in every request. The writes go
through the same store pipeline as the websocket's (group commit across every connection and
request), are published by the relay in the same order (durable first, then live consumers), and
are deduplicated and fenced by the same scripts: a resend of an acknowledged seq is answered the
same and stored no second time; an older epoch is refused ``fenced``, either way between HTTP and
websocket producers.

What "holding" a stream means without a connection: a :class:`Lease`, kept here for the streams
whose producer posted recently. It caches what the websocket path learns from ``opened`` (epoch,
generation, text or JSON, the store's append handle), so a request is one round trip; without
one (the first request, another instance, a restart) the request opens the stream first with its
epoch: ``open.lua`` creates it, resumes that epoch, starts a higher one, or refuses ``fenced``.

- **Liveness**: leases are not connections, so the relay's sweep does not keep them alive:
  every append records the producer's activity in the store (and touches the stream, as the
  sweep does a connection's, at most every third of the timeout), a request without chunks is a
  heartbeat (``touch``), and a producer that stops posting for ``streams.producer_timeout_ms``
  has its stream ended ``producer_lost`` by the sweep, as a disconnected websocket producer.
- **Cancel**: a consumer's cancel marks the lease; the producer learns it from the answer to its
  next request (``cancel_requested``), and the grace timer ends the stream as for a websocket.
- **Bounds**: at most ``_MAX_LEASES`` leases (least recently used dropped: its next request opens
  again); appends waiting for the store count against the producers' global budget
  (``limits.max_producer_backlog_bytes``, shared with the websocket producers): while it is spent,
  a write is refused ``overloaded`` at once instead of queueing.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from time import monotonic
from typing import Any

from relayd.budget import Budget
from relayd.config import Config
from relayd.errors import StoreError
from relayd.metrics import Metrics
from relayd.model import (
    Appended,
    AppendOutcome,
    Ended,
    EndOutcome,
    Opened,
    OpenOutcome,
    Refused,
    WriteOutcome,
    Written,
)
from relayd.ports import Store
from relayd.protocol import CHUNK_OVERHEAD_BYTES

_MAX_LEASES = 10_000  # streams with a recent connectionless producer remembered per instance

OpenedHook = Callable[[str, OpenOutcome], None]
PublishHook = Callable[[str, list[bytes], Appended, bool, float], bool]
EndHook = Callable[..., None]  # Relay._end(stream, reason, message, *, epoch, then)


@dataclass(slots=True)
class Lease:
    """A stream a connectionless producer opened in ``epoch``, as the store answered."""

    epoch: int
    gen: int
    text: bool
    handle: Any  # the store's append handle for this stream, epoch and generation
    seq: int  # the last seq acknowledged in this epoch
    offset: int  # the offset of the stream's last chunk acknowledged
    seen: float  # when (monotonic) its producer last posted
    touched: float  # when (monotonic) this relay last touched the stream (activity, retention, open index)
    first_chunk_due: float = 0.0  # created by this lease's open: when the open was received
    cancel_requested: bool = False


def write_cost(chunks: Sequence[bytes]) -> int:
    """Memory a write holds until the store answers: as :attr:`relayd.protocol.AppendOp.cost`."""
    return 2 * sum(len(c) for c in chunks) + CHUNK_OVERHEAD_BYTES * len(chunks)


class Leases:
    """The connectionless producers' streams of one relay; the relay's facade calls these."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        budget: Budget,
        *,
        opened: OpenedHook,
        publish: PublishHook,
        end: EndHook,
    ) -> None:
        """``opened``, ``publish``, ``end``: the relay's own steps (the one place ordering store -> hub)."""
        self._store = store
        self._metrics = metrics
        self._opened = opened
        self._publish = publish
        self._end_hook = end
        self._timeout_s = config.streams.producer_timeout_ms / 1000
        self._budget = budget
        self._leases: OrderedDict[str, Lease] = OrderedDict()  # least recently used first
        self._opening: dict[tuple[str, int | None], asyncio.Future[OpenOutcome]] = {}

    # the relay's facade -------------------------------------------------------------------------

    def admits(self, nbytes: int) -> bool:
        """Whether a write holding ``nbytes`` would be admitted now (one always is when no producer's
        append waits)."""
        budget = self._budget
        return not budget.used or (not budget.spent and budget.used + nbytes <= budget.limit)

    async def open(
        self, stream: str, *, epoch: int | None, producer: str | None, content_type: str, received: float
    ) -> OpenOutcome:
        """Open ``stream`` as the websocket ``open`` does; the answer's epoch is the lease's."""
        outcome, _ = await self._open(stream, epoch, producer, content_type, received, share=epoch is not None)
        return outcome

    async def write(
        self,
        stream: str,
        *,
        epoch: int,
        seq: int,
        chunks: list[bytes],
        producer: str | None,
        content_type: str,
        end: tuple[str, str] | None,
        received: float,
    ) -> WriteOutcome:
        cost = write_cost(chunks)
        if cost and not self.admits(cost):
            return Refused("overloaded", "relayd has too many appends waiting for the store; retry later")
        self._budget.charge(cost)
        try:
            return await self._write(stream, epoch, seq, chunks, producer, content_type, end, received)
        finally:
            self._budget.release(cost)

    def cancel(self, stream: str) -> bool:
        """A consumer asked to stop ``stream``: True if a producer posted it here recently (told on
        its next request)."""
        lease = self._leases.get(stream)
        if lease is None or monotonic() - lease.seen > self._timeout_s:
            return False
        lease.cancel_requested = True
        return True

    def cancel_requested(self, stream: str) -> bool:
        lease = self._leases.get(stream)
        return lease is not None and lease.cancel_requested

    # steps --------------------------------------------------------------------------------------

    async def _write(
        self,
        stream: str,
        epoch: int,
        seq: int,
        chunks: list[bytes],
        producer: str | None,
        content_type: str,
        end: tuple[str, str] | None,
        received: float,
    ) -> WriteOutcome:
        last_seq = seq + len(chunks) - 1 if chunks else 0
        created = False
        lease = self._leases.get(stream)
        heartbeat = not chunks and end is None
        if lease is None or lease.epoch != epoch or heartbeat:
            # No lease for this epoch (or a heartbeat, which the store answers): open with the epoch.
            opened, issued = await self._open(stream, epoch, producer, content_type, received, share=not heartbeat)
            if isinstance(opened, Refused):
                return opened
            if opened.code == "ended":
                return _ended_or_resent(opened, epoch, last_seq, end)
            created = issued and opened.code == "created"
            lease = self._leases.get(stream)
            if lease is None or lease.epoch != epoch:
                # dropped or taken over while this request waited: what the store says now decides
                return Refused("fenced", "another request took the stream over", opened.epoch)
            if heartbeat:
                self._store.touch([stream])
                lease.touched = monotonic()
                return Written(opened.gen, epoch, opened.seq, lease.offset, 0, created, 0, "", lease.cancel_requested)
        now = monotonic()
        lease.seen = now
        self._leases.move_to_end(stream)
        if lease.text and not all(chunk[:1] == b'"' for chunk in chunks):
            return Refused("content_type", "a text stream takes string chunks only")
        if chunks:
            appended = await self._append(stream, lease, seq, chunks, received)
            if type(appended) is not Appended:
                assert isinstance(appended, Refused)
                return await self._append_refused(stream, lease, appended, epoch, last_seq, end)
            self._metrics.ack_latency(monotonic() - received)
            stored = max(appended.last - appended.first + 1, 0)
            written = Written(appended.gen, epoch, appended.last_seq, appended.last, stored, created)
            if now - lease.touched > self._timeout_s / 3:
                # What the sweep does for a connection's streams, while this producer posts: the
                # open index (which the sweep reads by age) and the open stream's retention.
                self._store.touch([stream])
                lease.touched = now
        else:
            written = Written(lease.gen, epoch, lease.seq, lease.offset, 0, created)
        if end is not None:
            ended = await self._end(stream, epoch, *end)
            self._drop(stream, lease)
            if isinstance(ended, Refused):
                return ended
            return replace(written, ended=ended.offset, reason=ended.status, cancel_requested=lease.cancel_requested)
        return replace(written, cancel_requested=lease.cancel_requested)

    async def _open(
        self, stream: str, epoch: int | None, producer: str | None, content_type: str, received: float, *, share: bool
    ) -> tuple[OpenOutcome, bool]:
        """The store's open; requests for the same stream and epoch share one (``share``). Returns
        the outcome and whether this call issued the open."""
        key = (stream, epoch)
        pending = self._opening.get(key) if share else None
        if pending is not None:
            # shielded: a request that goes away must not cancel the open the others wait for
            return await asyncio.shield(pending), False
        future: asyncio.Future[OpenOutcome] = asyncio.get_running_loop().create_future()
        if share:
            self._opening[key] = future

        def done(outcome: OpenOutcome) -> None:
            if self._opening.get(key) is future:
                del self._opening[key]
            if isinstance(outcome, Opened) and outcome.code != "ended":
                now = monotonic()
                self._keep(
                    stream,
                    Lease(
                        outcome.epoch,
                        outcome.gen,
                        outcome.content_type == "text",
                        self._store.append_handle(stream, outcome.epoch, outcome.gen),
                        outcome.seq,
                        outcome.n,
                        now,
                        now,
                        received if outcome.code == "created" else 0.0,
                        self.cancel_requested(stream),
                    ),
                )
            self._opened(stream, outcome)
            if not future.done():
                future.set_result(outcome)

        self._store.open(stream, epoch, content_type, producer, done)
        return await asyncio.shield(future), True

    async def _append(self, stream: str, lease: Lease, seq: int, chunks: list[bytes], received: float) -> AppendOutcome:
        future: asyncio.Future[AppendOutcome] = asyncio.get_running_loop().create_future()

        def done(outcome: AppendOutcome) -> None:
            # Published here, in the store's callback: in append order (callbacks run in submission
            # order), and even if the request that waits for the answer went away meanwhile.
            if type(outcome) is Appended:
                if self._publish(stream, chunks, outcome, lease.text, received) and lease.first_chunk_due:
                    self._metrics.first_chunk(monotonic() - lease.first_chunk_due)
                    lease.first_chunk_due = 0.0
                if outcome.last_seq >= lease.seq:
                    lease.seq, lease.offset = outcome.last_seq, outcome.last
            _resolve(future, outcome)

        self._store.append(lease.handle, seq, chunks, done)
        return await asyncio.shield(future)

    async def _append_refused(
        self, stream: str, lease: Lease, refused: Refused, epoch: int, last_seq: int, end: tuple[str, str] | None
    ) -> WriteOutcome:
        code = refused.code
        if code in ("seq_gap", "store_unavailable"):
            return refused
        self._drop(stream, lease)
        if code == "fenced":
            return refused
        if code == "ended" and end is not None and refused.status == end[0]:
            # Ended as this write asks: a resend of an append-and-end whose answer was lost?
            try:
                meta = await self._store.read_meta(stream)
            except StoreError as exc:
                return Refused("store_unavailable", str(exc))
            if meta is not None:
                outcome = Opened("ended", meta.gen, meta.epoch, meta.seq, meta.n, meta.status, meta.content_type)
                return _ended_or_resent(outcome, epoch, last_seq, end)
        if code == "ended":
            return Refused("stream_ended", refused.message, status=refused.status)
        return Refused("stream_ended", refused.message)  # not_found: expired or removed

    async def _end(self, stream: str, epoch: int, reason: str, message: str) -> Ended | Refused:
        future: asyncio.Future[EndOutcome] = asyncio.get_running_loop().create_future()
        self._end_hook(stream, reason, message, epoch=epoch, then=lambda outcome: _resolve(future, outcome))
        outcome = await asyncio.shield(future)
        if isinstance(outcome, Ended):
            if outcome.result == "ok" or outcome.status == reason:
                return outcome
            return Refused("stream_ended", f"stream already ended ({outcome.status})", status=outcome.status)
        if outcome.code in ("fenced", "store_unavailable"):
            return outcome
        return Refused("stream_ended", "stream expired or was removed")

    def _keep(self, stream: str, lease: Lease) -> None:
        leases = self._leases
        leases[stream] = lease
        leases.move_to_end(stream)
        while len(leases) > _MAX_LEASES:
            leases.popitem(last=False)
        # forget the producers that stopped posting (least recently used first)
        stale = monotonic() - self._timeout_s
        while leases:
            oldest = next(iter(leases.values()))
            if oldest.seen >= stale:
                break
            leases.popitem(last=False)

    def _drop(self, stream: str, lease: Lease) -> None:
        if self._leases.get(stream) is lease:
            del self._leases[stream]


def _ended_or_resent(head: Opened, epoch: int, last_seq: int, end: tuple[str, str] | None) -> WriteOutcome:
    """A write found its stream ended: the answer it got the first time if it is a resend (same
    epoch, its chunks stored) of the write that ended it (the same reason) or of an append before
    it (pipelined: the end overtook its answer), else ``stream_ended``."""
    resent_end = end is not None and head.status == end[0]
    if head.epoch == epoch and head.seq >= last_seq and (resent_end or (end is None and last_seq)):
        # Within an epoch seq s sits at offset base + s, and the end right after the last chunk.
        seq = last_seq or head.seq
        written = Written(head.gen, epoch, seq, head.n - 1 - (head.seq - seq), 0, False)
        return replace(written, ended=head.n, reason=head.status) if resent_end else written
    return Refused("stream_ended", f"stream ended ({head.status})", status=head.status)


def _resolve(future: asyncio.Future[Any], outcome: Any) -> None:
    if not future.done():
        future.set_result(outcome)
