"""One stream followed by one connection: the history -> live handoff.

A subscriber reads through a :class:`~relayd.ports.History` (the store) and writes encoded frames
into a :class:`Sink` (the connection's bounded outbox); live publications reach it synchronously
from the :class:`~relayd.hub.Hub`. It never touches a socket or Redis itself, so the state
machine is unit-tested against the in-memory store (tests/test_subscription.py).

The handoff between history and live data (the classic bug, see docs/design.md) works like
this: a subscriber registers with the hub *before* it reads Redis; publications arriving while it
reads are buffered (bounded); after a short page it replays the buffer, skipping offsets it
already sent, and goes live. Every delivery is keyed by offset, so a publication is delivered at
most once, and any hole (a lost buffer, a full outbox, a missed publication) sends the subscriber
back to Redis: never silent loss, never a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from enum import Enum
from operator import itemgetter
from typing import NamedTuple, Protocol

from relayd.errors import StoreError
from relayd.hub import Fan, Hub, Publication
from relayd.model import Entry, FramedPage, StreamMeta
from relayd.protocol import FrameCodec

log = logging.getLogger("relayd.subscription")

_ENTRY_OVERHEAD = 100  # framing bytes per replayed entry, for sizing catch-up pieces
_DATA = itemgetter(1)  # Entry.data, as a C callable (sizing a page: every replayed chunk)


ReadFrames = Callable[[str, int, int, int, bytes], Awaitable[FramedPage | None]]
"""relayd.ports.FramedHistory.read_frames"""


class State(Enum):
    WAITING = "waiting"
    CATCHUP = "catchup"
    LIVE = "live"
    DONE = "done"


# A micro-optimisation for the hot path: reading ``State.LIVE`` costs ~170 ns on Python 3.11 (an
# enum member is looked up through the enum's metaclass), a module global ~15.
_LIVE = State.LIVE


class SubscriptionOwner(Protocol):
    def subscription_done(self, sub: Subscriber) -> None: ...


class Sink(Protocol):
    """Where a subscriber's frames go: a connection's bounded queue (relayd.outbox.Outbox)."""

    oldest: float  # when (monotonic) the oldest live data queued was read; set by whoever queues it

    @property
    def max_bytes(self) -> int: ...

    def offer(self, data: bytes, chunks: int = 0) -> bool:
        """Queue without waiting; False when full (the subscriber then catches up from history).
        ``chunks``: how many chunks ``data`` carries (counted when written)."""
        ...

    def control(self, data: bytes) -> None:
        """Queue a small control frame (error, gap, reset) regardless of the limit."""
        ...

    async def put(self, data: bytes, chunks: int = 0) -> None:
        """Queue, waiting for room: the catch-up path, paced by the peer."""
        ...


class LiveSink(Sink, Protocol):
    """A sink that can also take a fan-out's message directly (relayd.outbox.Outbox over a websocket)."""

    @property
    def writes_live(self) -> bool: ...

    def write_live(self, batch: Fan) -> bool:
        """Write ``batch`` now if nothing waits ahead of it and the peer keeps up; else False."""
        ...


class Subscriber:
    """One stream followed by one connection: history from Redis, then the live tail."""

    def __init__(
        self,
        hub: Hub,
        stream: str,
        outbox: Sink,
        codec: FrameCodec,
        *,
        cursor: tuple[int, int] | None,
        wait_s: float,
        owner: SubscriptionOwner,
    ) -> None:
        self.hub = hub
        self.stream = stream
        self.outbox = outbox
        self.codec = codec
        self.cursor = cursor
        self.wait_s = wait_s
        self.owner = owner
        self.state = State.WAITING
        self.gen = 0
        self.next = 1  # offset of the next entry this subscriber needs
        self.chunks = 0  # chunks handed to the connection, live and replayed (for its close log line)
        self.text = False
        self._buffer: list[Publication] = []
        self._buffered = 0  # bytes of the chunks in _buffer
        self._overflow = False
        self._new_gen: int | None = None  # the stream was lost and created again meanwhile
        # The last entry handed over, to check after a reconnect that Redis still has it: a failover
        # to a replica that lacked it, or an older AOF, makes offsets go backwards (history lost).
        self._last: Entry | None = None
        self._verify = False
        self._wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        # The connection can take a fan-out's message directly: the hub gives this subscriber the
        # tick's publications at its end, as one Fan (on_fan_out).
        self._live: LiveSink | None = outbox if getattr(outbox, "writes_live", False) else None  # type: ignore[assignment]
        # The history can frame replayed pages itself (relayd.ports.FramedHistory): no Entry per chunk.
        self._read_frames: ReadFrames | None = getattr(hub.history, "read_frames", None)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"relayd-sub-{self.stream}")

    async def stop(self) -> None:
        self.state = State.DONE
        self._wake.set()  # a task whose cancellation gets lost (redis-py can swallow one) still ends
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    # called by the hub, synchronously -----------------------------------------------------------

    def on_publication(self, pub: Publication) -> None:
        state = self.state
        if state is _LIVE and pub.first == self.next and pub.gen == self.gen:
            # The next publication of a live subscriber: every delivery of a fan-out, so it skips
            # _deliver's checks (a micro-optimisation).
            if not self._hand(pub, pub.encoded(self.codec)):
                self._fall_behind()  # a full queue: read Redis again
            return
        if pub.gen != self.gen and state is not State.WAITING:
            if pub.gen > self.gen and state is not State.DONE:
                self._new_gen = pub.gen  # a newer generation: reset, then deliver it from Redis
                self._fall_behind()
            return  # (an older generation's late publication: nothing for this subscriber)
        if state is State.LIVE:
            if not self._deliver(pub):
                self._fall_behind()  # a hole, or a full queue: read Redis again
        elif state is State.CATCHUP:
            # Bounded in bytes, not publications: one publication can be a whole producer batch.
            size = pub.nbytes + len(pub.entries) * _ENTRY_OVERHEAD  # the objects count, not only the data
            if self._buffered + size <= self.outbox.max_bytes:
                self._buffer.append(pub)
                self._buffered += size
            else:
                self._overflow = True
        elif state is State.WAITING:
            self._wake.set()

    def on_fan_out(self, fan: Fan) -> bool:
        """The tick's publications of the stream, at its end: written straight to the connection when
        this subscriber is live, next in line, and its connection has nothing queued and keeps up.
        False: nothing was done, and the hub hands over each publication (on_publication)."""
        if self.state is not _LIVE or self.next != fan.first or self.gen != fan.gen or self.codec is not fan.codec:
            return False
        live = self._live
        if live is None or not live.write_live(fan):
            return False
        self.chunks += fan.chunks
        self.next = fan.next
        self._last = fan.last_entry
        if fan.end:
            self._finish()
        return True

    def _deliver(self, pub: Publication) -> bool:
        """Hand ``pub`` (or the part this subscriber lacks) to the sink; False on a hole or a full sink."""
        if pub.last < self.next:
            return True  # already delivered (from Redis, or by the other path)
        if pub.first > self.next:
            return False  # a hole: a publication this subscriber never saw
        data = pub.encoded(self.codec) if pub.first == self.next else pub.encoded_from(self.codec, self.next)
        return self._hand(pub, data)

    def _hand(self, pub: Publication, data: bytes) -> bool:
        """Queue ``data``, the entries of ``pub`` from ``self.next`` on; False when the sink is full."""
        outbox = self.outbox
        if not outbox.offer(data, pub.chunks):
            return False
        if not outbox.oldest:  # publications come in the order they were read: the first is the oldest
            outbox.oldest = pub.received
        self.chunks += pub.chunks
        self.next = pub.last + 1
        self._last = pub.entries[-1]
        if pub.end:
            self._finish()
        return True

    def on_poke(self, gen: int, last: int) -> None:
        if self.state is State.LIVE and gen == self.gen and self.next <= last:
            self._fall_behind()
        elif self.state is State.CATCHUP:
            self._overflow = True  # the read in progress may predate them: read again

    def on_resync(self) -> None:
        """Publications may have been lost (a broker or store connection was lost and made again):
        read Redis again, and check first that it still holds what this subscriber delivered."""
        self._verify = True
        if self.state is State.LIVE:
            self._fall_behind()
        elif self.state is State.CATCHUP:
            self._overflow = True
        elif self.state is State.WAITING:
            self._wake.set()  # the stream may have been created meanwhile

    def on_created(self) -> None:
        if self.state is State.WAITING:
            self._wake.set()

    # the subscriber's task ---------------------------------------------------------------------

    def _fall_behind(self) -> None:
        self.hub.metrics.catchup()
        self.state = State.CATCHUP
        self._clear_buffer()
        self._overflow = False
        self._wake.set()

    def _finish(self) -> None:
        self.state = State.DONE
        self._wake.set()

    async def _run(self) -> None:
        self.hub.add(self, self if self._live is not None else None)
        try:
            meta = await self._resolve_start()
            if meta is None or self.state is State.DONE:  # DONE: stopped meanwhile
                return
            self.state = State.CATCHUP
            while self.state is not State.DONE:
                await self._catch_up()
                if self.state is State.LIVE:
                    self._wake.clear()
                    await self._wake.wait()
        except StoreError as exc:
            self.outbox.control(self.codec.error(self.stream, "store_unavailable", str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("subscriber for %s failed", self.stream)
            self.outbox.control(self.codec.error(self.stream, "internal", "internal error"))
        finally:
            self.state = State.DONE
            self.hub.remove(self)
            self.owner.subscription_done(self)

    async def _resolve_start(self) -> StreamMeta | None:
        store = self.hub.history
        meta = await store.read_meta(self.stream)
        if meta is None:
            # Not created yet (or expired): wait, bounded, for a producer to open it.
            self._wake.clear()
            meta = await store.read_meta(self.stream)  # re-check after registering for wake-ups
            if meta is None and self.wait_s > 0:
                # The deadline bounds the waits for a wake-up only, never a Redis read: a read
                # cancelled by a timeout can lose the cancellation inside redis-py, and the
                # subscriber would then wait for a wake-up that never comes.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self.wait_s
                while meta is None and self.state is not State.DONE:
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self._wake.wait()
                    except TimeoutError:
                        break
                    self._wake.clear()
                    meta = await store.read_meta(self.stream)
            if meta is None:
                if self.state is not State.DONE:
                    self._not_found()
                return None
        self.gen = meta.gen
        self.text = meta.content_type == "text"
        cursor = self.cursor
        if cursor is not None:
            if cursor[0] == meta.gen and cursor[1] > meta.n:
                self._history_lost()  # the consumer saw entries Redis no longer has
            elif cursor[0] == meta.gen:
                self.next = cursor[1] + 1
                if cursor[1] == meta.n and not meta.is_open:
                    self.next = meta.n  # at the end: say again how it ended
            else:
                self.hub.metrics.reset()
                self.outbox.control(self.codec.reset(self.stream, "stream_replaced"))
        return meta

    async def _catch_up(self) -> None:
        page = count = self.hub.catchup_page  # count: entries asked of the read in hand
        self.state = State.CATCHUP
        # The next page, read while this one is read, parsed and handed over: Redis works on it
        # while relayd works on this one, instead of after. Sent before this page is awaited, from
        # where this page ends if it is full (in lane 0 offsets are consecutive); used only if this
        # page did end there (see _Ahead).
        ahead: _Ahead | None = None
        per_chunk = 0  # framed bytes per chunk of the last framed page (0: none yet), to size the read ahead
        framed = True  # pages framed by the store, until one is too large for the queue
        # (No `finally` with an await below: mypyc, which compiles this module in the compiled
        # build, gets an await in a finally block wrong; tests/test_compiled_rules.py.)
        try:
            while True:
                if ahead is not None and (self._new_gen is not None or self._verify):
                    await _dropped(ahead.read)  # read from where the reset or the check says
                    ahead = None
                if self._new_gen is not None:
                    await self._reset_to_new_generation()
                if self._verify:
                    self._verify = False
                    await self._check_history()
                    if self.state is State.DONE:
                        break
                    if self._new_gen is not None:
                        continue  # the reset to the new generation, at the top
                reading: Awaitable[list[Entry] | FramedPage]
                if ahead is not None and ahead.first == self.next:
                    reading, count, ahead = ahead.read, ahead.entries, None
                else:
                    if ahead is not None:  # this page did not end where the read ahead starts
                        await _dropped(ahead.read)
                        ahead = None
                    reading = self._read(self.next, count, framed)
                if per_chunk and framed:
                    more = self._ahead_count(page, per_chunk, count)
                    if more:
                        ahead = self._read_ahead(self.next + count, more)
                read = await reading
                if self.state is State.DONE:  # stopped meanwhile
                    break
                if type(read) is FramedPage:
                    data = self.codec.framed(self.stream, self.gen, read.frames, read.end, self.text) if read.n else b""
                    if len(data) > self.outbox.max_bytes:
                        # Too large to hand over whole: read it again as entries, handed over in pieces.
                        framed = False
                        count = max(1, read.n * self.outbox.max_bytes // len(data))
                        continue
                    if read.n:
                        per_chunk = len(data) // read.n + 1
                    n, first = read.n, read.first
                else:
                    entries: list[Entry] = read  # type: ignore[assignment]
                    n, first = len(entries), entries[0].offset if entries else 0
                exhausted = n < count
                if n and first > self.next:
                    self.hub.metrics.gap()
                    self.outbox.control(self.codec.gap(self.stream, self.gen, self.next - 1, first))
                if type(read) is FramedPage and read.last is not None:  # (it fits the queue: checked above)
                    count = page
                    if ahead is None and not exhausted and read.end is None:  # (after a first page)
                        more = self._ahead_count(page, per_chunk, read.n)
                        if more:
                            ahead = self._read_ahead(read.last.offset + 1, more)
                    await self._put_framed(data, len(read.frames), read.last)
                    if read.end is not None:
                        self.state = State.DONE
                        break
                elif n:
                    # Hand the page over in pieces that fit the bounded queue; read about a queue's worth next.
                    limit = self.outbox.max_bytes  # smaller while the consumers' global budget is spent
                    end = entries[-1].is_end
                    nbytes = sum(map(len, map(_DATA, entries[:-1] if end else entries))) + _ENTRY_OVERHEAD * len(
                        entries
                    )
                    if nbytes <= limit:
                        count = page
                        if ahead is None and not exhausted and not end:
                            first = entries[-1].offset + 1
                            ahead = _Ahead(asyncio.ensure_future(self._read(first, count, framed)), first, count)
                        await self._put_replay(entries)
                    else:
                        count = max(1, len(entries) * limit // nbytes)
                        await self._put_pieces(entries, limit)
                    if end:
                        self.state = State.DONE
                        break
                if exhausted and not self._overflow and self._new_gen is None and self._replay_buffer():
                    if self.state is State.CATCHUP:
                        self.state = State.LIVE
                    break
        except BaseException:
            if ahead is not None:
                await _dropped(ahead.read)
            raise
        if ahead is not None:
            await _dropped(ahead.read)

    def _read(self, first: int, count: int, framed: bool = False) -> Awaitable[list[Entry] | FramedPage]:
        """Read history from ``first``, framed by the store if ``framed`` and it can. What was
        buffered so far is durable before this read starts, so the read (or a later one) returns
        it: the buffer starts again."""
        self._clear_buffer()
        self._overflow = False
        return self._fetch(first, count, framed)

    def _ahead_count(self, page: int, per_chunk: int, in_hand: int) -> int:
        """Entries to read ahead (0: none) with ``in_hand`` in hand: the two pages together fit the
        queue's bound, estimated at ``per_chunk`` bytes a chunk. (The bound is a trickle while the
        consumers' global budget is spent: then nothing is read ahead.)"""
        return max(0, min(page, self.outbox.max_bytes // per_chunk - in_hand))

    def _read_ahead(self, first: int, count: int) -> _Ahead:
        """Start reading the framed page at ``first`` now. The buffer is kept: this read may not
        be used (the page before it ended elsewhere), and then what was buffered since the read
        before it still counts."""
        return _Ahead(asyncio.ensure_future(self._fetch(first, count, True)), first, count)

    def _fetch(self, first: int, count: int, framed: bool) -> Awaitable[list[Entry] | FramedPage]:
        if framed and self._read_frames is not None:
            template = self.codec.chunk_template(self.stream, self.gen, self.text)
            if template is not None:
                return self._read_framed(self._read_frames, self.gen, first, count, template)
        return self.hub.history.read_entries(self.stream, self.gen, first, count)

    async def _read_framed(
        self, read_frames: ReadFrames, gen: int, first: int, count: int, template: bytes
    ) -> list[Entry] | FramedPage:
        page = await read_frames(self.stream, gen, first, count, template)
        if page is None:  # not one the store can frame (past a takeover): as entries
            return await self.hub.history.read_entries(self.stream, gen, first, count)
        return page

    async def _put_framed(self, data: bytes, chunks: int, last: Entry) -> None:
        await self.outbox.put(data, chunks)
        self.chunks += chunks
        self.next = last.offset + 1
        self._last = last

    async def _put_pieces(self, entries: list[Entry], limit: int) -> None:
        """A page larger than the queue: hand it over in pieces that fit."""
        piece: list[Entry] = []
        size = 0
        for entry in entries:
            esize = len(entry.data or b"") + _ENTRY_OVERHEAD
            if piece and size + esize > limit:
                await self._put_replay(piece)
                piece, size = [], 0
                limit = self.outbox.max_bytes
            piece.append(entry)
            size += esize
        await self._put_replay(piece)

    async def _put_replay(self, entries: list[Entry]) -> None:
        data = self.codec.entries(self.stream, self.gen, entries, self.text)
        chunks = len(entries) - (1 if entries[-1].is_end else 0)
        await self.outbox.put(data, chunks)
        self.chunks += chunks
        self.next = entries[-1].offset + 1
        self._last = entries[-1]

    async def _check_history(self) -> None:
        """Redis must still hold the last entry delivered, as delivered; else history was lost."""
        last = self._last
        if last is None or self.next <= 1:
            return
        history = self.hub.history
        found = await history.read_entries(self.stream, self.gen, last.offset, 1)
        if found and found[0].offset > last.offset:
            return  # trimmed by the length cap (the read that follows says gap), not lost
        if found and found[0].data == last.data:
            return
        meta = await history.read_meta(self.stream)
        if meta is None:  # the whole stream is gone (flushed, deleted): nothing will follow
            self.outbox.control(
                self.codec.error(self.stream, "stream_not_found", f"stream {self.stream} does not exist")
            )
            self._finish()
        elif meta.gen != self.gen:
            self._new_gen = meta.gen  # created again meanwhile: reset (stream_replaced) to it
        else:
            self._history_lost()

    def _not_found(self) -> None:
        self.outbox.control(self.codec.error(self.stream, "stream_not_found", f"stream {self.stream} does not exist"))

    def _history_lost(self) -> None:
        """Entries this consumer had are gone and later ones may sit at their offsets: say so
        (``reset``, reason ``history_lost``) and deliver the stream again from what Redis holds."""
        log.warning("history lost on %s: Redis no longer holds offset %d as delivered", self.stream, self.next - 1)
        self.hub.metrics.reset()
        self.outbox.control(self.codec.reset(self.stream, "history_lost"))
        self.next = 1
        self._last = None

    async def _reset_to_new_generation(self) -> None:
        """The stream was lost (expired, flushed) and created again: say so, restart at its start."""
        gen, self._new_gen = self._new_gen, None
        assert gen is not None
        self.gen, self.next = gen, 1  # before any await: its publications are now this subscriber's
        self.hub.metrics.reset()
        self.outbox.control(self.codec.reset(self.stream, "stream_replaced"))
        meta = await self.hub.history.read_meta(self.stream)
        if meta is not None and meta.gen == gen:
            self.text = meta.content_type == "text"

    def _replay_buffer(self) -> bool:
        """Deliver buffered publications in order; False if a hole needs another read."""
        for pub in self._buffer:
            if not self._deliver(pub):
                return False
            if self.state is State.DONE:
                return True
        self._clear_buffer()
        return True

    def _clear_buffer(self) -> None:
        self._buffer.clear()
        self._buffered = 0


class _Ahead(NamedTuple):
    """A page read ahead: the read, and the offset and the number of entries it asked for. It is the next page only
    if the page before it ends at ``first - 1``; else it is dropped. A read ahead leaves the
    subscriber's buffer of live publications alone (the buffer starts again only with a read of
    the page in hand), so a dropped one costs nothing but its read."""

    read: asyncio.Future[list[Entry] | FramedPage]
    first: int
    entries: int


async def _dropped(read: asyncio.Future[list[Entry] | FramedPage]) -> None:
    """Cancel a read ahead whose page is not wanted any more, and let it end."""
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError, StoreError):
        await read
