"""The history -> live handoff (relayd/subscription.py) without sockets or Redis.

A Hub over the in-memory store, a Sink that records frames, the real websocket codec. Writes go
through the store first and are published after it answered (durable first, as the relay does);
interleavings are driven by a History wrapper that holds a read until the test releases it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from relayd.config import Config, StreamsConfig
from relayd.hub import Hub, Publication
from relayd.metrics import Metrics
from relayd.model import Appended, Ended, Entry, Opened, StreamMeta
from relayd.protocol import WS_CODEC
from relayd.store.memory import MemoryStore
from relayd.subscription import State, Subscriber
from tests.doubles import Owner, RecordingSink, until

S = "chat-1"
T0 = 1_700_000_000_000


class Clock:
    """The store's clock (ms): generations are creation times, so tests choose them."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Held:
    """One read of the history, held until :meth:`release`."""

    def __init__(self, snapshot_first: bool) -> None:
        self.snapshot_first = snapshot_first  # read the store when called (else when released)
        self.reading = asyncio.Event()
        self.released = asyncio.Event()

    def release(self) -> None:
        self.released.set()


class GatedHistory:
    """The store's reads, of which the next ``read_entries`` can be held by the test."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.reads: list[int] = []  # the first offset of each read_entries
        self.meta_reads = 0
        self._held: Held | None = None

    def hold(self, *, snapshot_first: bool = False) -> Held:
        self._held = Held(snapshot_first)
        return self._held

    async def read_meta(self, stream: str) -> StreamMeta | None:
        self.meta_reads += 1
        return await self.store.read_meta(stream)

    async def read_entries(self, stream: str, gen: int, first: int, count: int) -> list[Entry]:
        self.reads.append(first)
        held, self._held = self._held, None
        if held is None:
            return await self.store.read_entries(stream, gen, first, count)
        result = await self.store.read_entries(stream, gen, first, count) if held.snapshot_first else None
        held.reading.set()
        await held.released.wait()
        return result if result is not None else await self.store.read_entries(stream, gen, first, count)


@dataclass
class World:
    clock: Clock
    store: MemoryStore
    history: GatedHistory
    hub: Hub
    owner: Owner
    subs: list[Subscriber]
    epoch: int = 1
    seq: int = 0
    gen: int = 0

    def subscribe(self, sink: RecordingSink, cursor: tuple[int, int] | None = None, wait_s: float = 10.0) -> Subscriber:
        sub = Subscriber(self.hub, S, sink, WS_CODEC, cursor=cursor, wait_s=wait_s, owner=self.owner)
        sub.start()
        self.subs.append(sub)
        return sub

    async def open(self) -> Opened:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.store.open(S, None, "json", None, future.set_result)
        opened = await future
        assert isinstance(opened, Opened)
        self.gen, self.epoch, self.seq = opened.gen, opened.epoch, opened.seq
        if opened.code == "created":
            self.hub.created(S)
        return opened

    async def append(self, *values: Any, publish: bool = True) -> Publication:
        """Store ``values`` as one append; publish what became durable (unless told not to)."""
        chunks = [orjson.dumps(v) for v in values]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.store.append(self.store.append_handle(S, self.epoch), self.seq + 1, chunks, future.set_result)
        out = await future
        assert isinstance(out, Appended) and out.first <= out.last
        self.seq = out.last_seq
        entries = [Entry(out.first + i, chunk) for i, chunk in enumerate(chunks)]
        pub = Publication(S, out.gen, entries, False, 0.0, sum(len(c) for c in chunks))
        if publish:
            self.hub.publish(pub)
        return pub

    async def end(self, reason: str = "completed", publish: bool = True) -> Publication:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.store.end(S, reason, "", future.set_result)
        out = await future
        assert isinstance(out, Ended) and out.result == "ok"
        pub = Publication(S, out.gen, [Entry(out.offset, None, reason)], False)
        if publish:
            self.hub.publish(pub)
        return pub

    def catchups(self) -> float:
        return self.hub.metrics.registry.get_sample_value("relayd_consumer_catchups_total") or 0.0


def make_world(max_chunks: int = 100_000) -> World:
    clock = Clock()
    store = MemoryStore(Config(streams=StreamsConfig(max_chunks=max_chunks)), clock=clock)
    history = GatedHistory(store)
    return World(clock, store, history, Hub(history, Metrics(), catchup_page=100), Owner(), [])


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = make_world()
    yield w
    for sub in w.subs:
        await sub.stop()


async def live(sub: Subscriber) -> None:
    await until(lambda: sub.state is State.LIVE)


# history, then live ---------------------------------------------------------------------------------


@pytest.mark.parametrize("snapshot_first", [True, False], ids=["read-before-publications", "read-after"])
async def test_publications_during_the_catch_up_read_are_delivered_once_with_no_gap(
    world: World, snapshot_first: bool
) -> None:
    """Chunks published while the history read is in flight are neither lost nor doubled,
    whether the read saw them (they are skipped from the buffer) or not (the buffer has them)."""
    await world.open()
    await world.append(1, 2)
    await world.append(3)
    held = world.history.hold(snapshot_first=snapshot_first)
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await held.reading.wait()
    assert sub.state is State.CATCHUP
    await world.append(4)
    await world.append(5, 6)
    held.release()
    await live(sub)
    await world.append(7)
    await world.end()
    await world.owner.finished.wait()
    assert sink.chunks() == [1, 2, 3, 4, 5, 6, 7, ("end", "completed")]
    assert sink.offsets() == list(range(1, 9))
    assert world.history.reads == [1] and world.catchups() == 0
    assert world.hub.subscriber_count(S) == 0 and world.owner.done == [sub]


async def test_a_subscriber_from_a_cursor_gets_only_what_follows_it(world: World) -> None:
    await world.open()
    await world.append("a", "b", "c")
    sink = RecordingSink()
    sub = world.subscribe(sink, cursor=(world.gen, 2))
    await live(sub)
    await world.append("d")
    assert sink.chunks() == ["c", "d"]


async def test_a_publication_that_overlaps_what_was_delivered_is_delivered_from_next_on(world: World) -> None:
    """A live publication starting below the subscriber's next offset (a broker's copy of a batch
    it partly read from the store) hands over only the entries it lacks."""
    await world.open()
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await live(sub)
    await world.append("a")
    overlapping = await world.append("b", "c", publish=False)
    world.hub.publish(Publication(S, world.gen, [Entry(1, b'"a"'), *overlapping.entries], False, 0.0, 9))
    assert sink.chunks() == ["a", "b", "c"] and sink.offsets() == [1, 2, 3] and sub.state is State.LIVE


async def test_a_full_sink_falls_behind_and_catches_up_from_history(world: World) -> None:
    """Live frames a full queue refuses are read again from the store once the peer reads."""
    await world.open()
    sink = RecordingSink(max_bytes=150)
    sub = world.subscribe(sink)
    await live(sub)
    for i in range(1, 5):
        await world.append("x" * 60 + str(i))  # the third offer is refused: the queue is full
    assert sub.state is State.CATCHUP and world.catchups() == 1
    assert len(sink.chunks()) == 2

    def peer_reads_until_caught_up() -> bool:  # the catch-up goes on, paced by room in the queue
        sink.take()
        return len(sink.chunks()) == 4 and sub.state is State.LIVE

    await until(peer_reads_until_caught_up)
    sink.take()
    await world.append("y")
    assert sink.offsets() == [1, 2, 3, 4, 5] and sink.chunks()[-1] == "y"


async def test_the_catch_up_buffer_is_bounded_in_bytes_and_a_publication_too_big_is_read_again(
    world: World,
) -> None:
    """A publication larger than the sink's limit is never buffered: overflow, then a re-read."""
    await world.open()
    await world.append("a")
    held = world.history.hold(snapshot_first=True)
    sink = RecordingSink(max_bytes=100)
    sub = world.subscribe(sink)
    await held.reading.wait()
    await world.append("small")
    await world.append(*["b" * 30] * 5)  # one publication of 160 bytes: a producer's batch
    assert sub._overflow and sum(p.nbytes for p in sub._buffer) <= sink.max_bytes
    assert all(p.nbytes < 100 for p in sub._buffer)
    held.release()

    def peer_reads() -> bool:  # the re-read is paced by the small queue: the peer keeps reading
        sink.take()
        return sub.state is State.LIVE

    await until(peer_reads)
    assert world.history.reads[:2] == [1, 2]  # read again from where the first read stopped
    assert sink.chunks() == ["a", "small", *["b" * 30] * 5]
    assert sink.offsets() == list(range(1, 8))


async def test_a_hole_in_the_publications_sends_the_subscriber_back_to_history(world: World) -> None:
    await world.open()
    await world.append(1)
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await live(sub)
    await world.append(2, publish=False)  # lost on the way (another instance's, say)
    await world.append(3)
    await live(sub)
    assert sink.chunks() == [1, 2, 3] and world.catchups() == 1


async def test_a_poke_reads_entries_that_were_never_published(world: World) -> None:
    """A resend acknowledged from the store (all duplicates) pokes: whoever lacks them reads them."""
    await world.open()
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await live(sub)
    pub = await world.append("lost", publish=False)
    world.hub.poke(S, world.gen, pub.last - 1)  # nothing this subscriber lacks: it stays live
    assert sub.state is State.LIVE
    world.hub.poke(S, world.gen + 1, pub.last)  # another generation's: not this one's
    assert sub.state is State.LIVE
    world.hub.poke(S, world.gen, pub.last)
    await until(lambda: sink.chunks() == ["lost"] and sub.state is State.LIVE)
    assert world.history.reads == [1, 1]


async def test_a_poke_during_the_catch_up_read_reads_again(world: World) -> None:
    await world.open()
    held = world.history.hold(snapshot_first=True)
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await held.reading.wait()
    pub = await world.append("late", publish=False)
    world.hub.poke(S, world.gen, pub.last)
    held.release()
    await until(lambda: sink.chunks() == ["late"] and sub.state is State.LIVE)
    assert world.history.reads == [1, 1]


async def test_a_resync_reads_history_again_in_any_state(world: World) -> None:
    """After a broker reconnect anything may be missing: live and catching-up subscribers re-read."""
    await world.open()
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await live(sub)
    await world.append(1, publish=False)
    world.hub.resync(S)
    await until(lambda: sink.chunks() == [1] and sub.state is State.LIVE)
    held = world.history.hold(snapshot_first=True)
    await world.append(2, publish=False)
    world.hub.resync(S)
    await held.reading.wait()
    await world.append(3, publish=False)
    world.hub.resync(S)
    held.release()
    await until(lambda: sink.chunks() == [1, 2, 3] and sub.state is State.LIVE)


async def test_a_new_generation_resets_the_subscriber_to_its_start(world: World) -> None:
    """The stream was lost and created again: a reset frame, then the new generation from 1."""
    await world.open()
    await world.append("old")
    old_gen = world.gen
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await live(sub)
    assert await world.store.delete_stream(S)
    world.clock.now += 1000
    await world.open()
    await world.append("new")
    await until(lambda: len(sink.frames) == 3 and sub.state is State.LIVE)
    assert sink.frames[1] == {"type": "reset", "stream": S, "reason": "stream_replaced"}
    assert sink.chunks() == ["old", "new"] and sink.frames[2]["cursor"] == f"{world.gen}-0000000001"
    assert world.gen > old_gen and sub.gen == world.gen
    stale = Publication(S, old_gen, [Entry(2, b'"stale"')], False, 0.0, 7)
    world.hub.publish(stale)  # a late publication of the old generation is not this subscriber's
    assert sink.chunks() == ["old", "new"] and sub.state is State.LIVE


async def test_a_cursor_of_another_generation_starts_over_with_a_reset(world: World) -> None:
    await world.open()
    await world.append("a")
    sink = RecordingSink()
    sub = world.subscribe(sink, cursor=(world.gen - 5, 7))
    await live(sub)
    assert sink.frames[0] == {"type": "reset", "stream": S, "reason": "stream_replaced"}
    assert sink.chunks() == ["a"]


async def test_trimmed_history_is_reported_as_a_gap() -> None:
    world = make_world(max_chunks=2)
    await world.open()
    await world.append(1, 2, 3)  # the oldest is trimmed away
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await live(sub)
    await sub.stop()
    assert sink.frames[0] == {
        "type": "gap",
        "stream": S,
        "cursor": f"{world.gen}-0000000000",
        "next": f"{world.gen}-0000000002",
    }
    assert sink.chunks() == [2, 3]


# waiting for a stream ---------------------------------------------------------------------------------


async def test_a_subscriber_waits_for_a_stream_that_does_not_exist_yet(world: World) -> None:
    sink = RecordingSink()
    sub = world.subscribe(sink, wait_s=30)
    await until(lambda: world.history.meta_reads == 2)  # not found, twice: now it waits
    assert sub.state is State.WAITING and world.hub.subscriber_count(S) == 1
    await world.open()  # created(): the waiting subscriber wakes and reads
    await live(sub)
    assert world.history.meta_reads == 3
    await world.append("first")
    assert sink.chunks() == ["first"] and sink.frames == [sink.frames[0]]


async def test_a_resync_wakes_a_waiting_subscriber_for_a_stream_created_unseen(world: World) -> None:
    """Created on another instance while the broker was away: no created(), but the resync re-reads."""
    sink = RecordingSink()
    sub = world.subscribe(sink, wait_s=30)
    await until(lambda: world.history.meta_reads == 2)
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    world.store.open(S, None, "json", None, future.set_result)
    world.gen = (await future).gen
    await world.append("x", publish=False)
    assert sub.state is State.WAITING and world.history.meta_reads == 2
    world.hub.resync(S)
    await until(lambda: sink.chunks() == ["x"] and sub.state is State.LIVE)


async def test_the_wait_for_a_stream_is_bounded_and_ends_with_stream_not_found(world: World) -> None:
    sink = RecordingSink()
    sub = world.subscribe(sink, wait_s=0.05)  # the timer is the behaviour under test
    await world.owner.finished.wait()
    assert sink.frames == [
        {"type": "error", "code": "stream_not_found", "message": f"stream {S} does not exist", "stream": S}
    ]
    assert sub.state is State.DONE and world.hub.subscriber_count(S) == 0
    no_wait = world.subscribe(RecordingSink(), wait_s=0)
    await until(lambda: no_wait.state is State.DONE)


# the end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [2, 3], ids=["at-the-last-chunk", "at-the-end"])
async def test_a_cursor_at_the_end_of_an_ended_stream_gets_the_end_again(world: World, at: int) -> None:
    await world.open()
    await world.append("a", "b")
    await world.end("error")
    sink = RecordingSink()
    world.subscribe(sink, cursor=(world.gen, at))
    await world.owner.finished.wait()
    assert sink.chunks() == [("end", "error")] and sink.offsets() == [3]


async def test_a_cursor_past_the_stored_end_is_history_lost_then_the_whole_stream(world: World) -> None:
    """relayd never hands out a cursor past the end: one means Redis lost entries the consumer had."""
    await world.open()
    await world.append("a", "b")
    await world.end("error")
    sink = RecordingSink()
    world.subscribe(sink, cursor=(world.gen, 9))
    await world.owner.finished.wait()
    resets = [f["reason"] for f in sink.frames if f["type"] == "reset"]
    assert resets == ["history_lost"] and sink.chunks() == ["a", "b", ("end", "error")]


async def test_the_end_is_delivered_once_when_both_history_and_live_carry_it(world: World) -> None:
    """The end written during the catch-up read comes from the read and from the buffer: once."""
    await world.open()
    await world.append("a")
    held = world.history.hold(snapshot_first=False)
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await held.reading.wait()
    await world.append("b")
    end = await world.end()
    held.release()
    await world.owner.finished.wait()
    world.hub.publish(end)  # a late copy (a broker's) reaches nobody
    assert sink.chunks() == ["a", "b", ("end", "completed")]
    assert sub.state is State.DONE and world.hub.subscriber_count(S) == 0


async def test_the_live_end_finishes_the_subscription_once(world: World) -> None:
    await world.open()
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await live(sub)
    end = await world.end("cancelled")
    world.hub.publish(end)
    await world.owner.finished.wait()
    assert sink.chunks() == [("end", "cancelled")] and world.owner.done == [sub]


async def test_stop_ends_a_waiting_subscriber_without_a_frame(world: World) -> None:
    sink = RecordingSink()
    sub = world.subscribe(sink, wait_s=30)
    await until(lambda: world.hub.subscriber_count(S) == 1)
    await sub.stop()
    assert sink.frames == [] and world.owner.done == [sub] and world.hub.subscriber_count(S) == 0


async def test_a_live_subscriber_whose_stream_vanished_is_told_and_finishes(world: World) -> None:
    """After a reconnect the stream is gone entirely (flushed, deleted): stream_not_found, not a
    subscriber waiting forever on a generation that no longer exists."""
    await world.open()
    await world.append("a")
    sink = RecordingSink()
    sub = world.subscribe(sink)
    await live(sub)
    assert await world.store.delete_stream(S)
    world.hub.resync(S)
    await world.owner.finished.wait()
    assert sink.chunks() == ["a"]
    assert [f["code"] for f in sink.frames if f["type"] == "error"] == ["stream_not_found"]


# history in pages, each next page read while the last one is handed over ----------------------------


class HeldFrom(GatedHistory):
    """Holds the first read that starts at ``first`` until released, and notes if it was cancelled."""

    def __init__(self, store: MemoryStore, first: int) -> None:
        super().__init__(store)
        self.first = first
        self.reading = asyncio.Event()
        self.released = asyncio.Event()
        self.cancelled = False

    async def read_entries(self, stream: str, gen: int, first: int, count: int) -> list[Entry]:
        if first != self.first or self.reading.is_set():
            return await super().read_entries(stream, gen, first, count)
        self.reads.append(first)
        self.reading.set()
        try:
            await self.released.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return await self.store.read_entries(stream, gen, first, count)


async def read_all(sink: RecordingSink, finished: asyncio.Event) -> None:
    """Play a peer that reads everything queued, until the subscription finished."""
    while not finished.is_set():
        sink.take()
        await asyncio.sleep(0)


async def paged_world(hold_from: int, *values: Any) -> World:
    """Pages of 3 entries; ``values`` stored as one append each; the read from ``hold_from`` held."""
    world = make_world()
    world.history = HeldFrom(world.store, hold_from)
    world.hub = Hub(world.history, Metrics(), catchup_page=3)
    await world.open()
    for value in values:
        await world.append(value)
    return world


async def test_a_history_of_many_pages_is_read_ahead_and_delivered_once_with_what_was_published_meanwhile() -> None:
    """The next page is read while the last one waits for room in the queue; chunks published
    meanwhile come once, in order, whether a page read them or the live buffer did."""
    values = [f"{i:02d}" + "x" * 48 for i in range(1, 14)]
    world = await paged_world(7, *values[:10])
    history = world.history
    assert isinstance(history, HeldFrom)
    sink = RecordingSink(max_bytes=460)  # a page (~300 bytes) fits whole; two do not
    sub = world.subscribe(sink)
    await history.reading.wait()  # page 3 is read while page 2 waits for the peer
    assert len(sink.frames) == 3 and history.reads == [1, 4, 7]
    await world.append(values[10])
    await world.append(values[11])
    history.released.set()
    reader = asyncio.create_task(read_all(sink, world.owner.finished))
    await live(sub)
    await world.append(values[12])
    await world.end()
    await reader
    assert sink.offsets() == list(range(1, 15))
    assert sink.chunks() == [*values, ("end", "completed")]
    assert history.reads == [1, 4, 7, 10, 13] and world.catchups() == 0
    await sub.stop()


async def test_a_resync_while_the_next_page_is_read_drops_that_read_and_checks_history_first() -> None:
    """A read ahead is not used once the subscriber must check Redis again: it is cancelled, the
    last delivered entry is checked, and the history follows from there, once."""
    world = await paged_world(7, *("x" * 50 for _ in range(9)))
    history = world.history
    assert isinstance(history, HeldFrom)
    sink = RecordingSink(max_bytes=460)  # a page (~300 bytes) fits whole; two do not
    sub = world.subscribe(sink)
    await history.reading.wait()  # page 2 is being handed over (it waits for room), page 3 read
    await until(lambda: len(sink.frames) == 3)
    world.hub.resync(S)
    sink.take()
    await until(lambda: history.cancelled)
    reader = asyncio.create_task(read_all(sink, world.owner.finished))
    await live(sub)
    assert history.reads == [1, 4, 7, 6, 7, 10]  # 6: the last entry delivered, checked
    await world.end()
    await reader
    assert sink.offsets() == list(range(1, 11))
    await sub.stop()
