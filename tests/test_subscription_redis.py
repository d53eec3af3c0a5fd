"""The catch-up loop's pages read ahead (relayd/subscription.py) over real Valkey and real sockets.

A subscriber replays a stream from a :class:`~relayd.store.redis_streams.RedisStore` into a real
:class:`~relayd.outbox.Outbox` over a TCP connection (tests/test_hub.py's ``Peer``) whose client
parses the websocket messages. The next page is asked of Valkey before the page in hand is
awaited: the tests check that two reads are in flight at once, that what is read ahead and the
page in hand together fit the queue's bound, that publications during the pipelined reads reach
the consumer once and in order at the handoff to live, and that a consumer that stops reading
mid-replay holds the reads back and later gets everything once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from relayd.config import Config, RedisConfig, StreamsConfig
from relayd.hub import Hub, Publication
from relayd.metrics import Metrics
from relayd.model import Appended, Ended, Entry, FramedPage
from relayd.protocol import WS_CODEC
from relayd.store.redis_streams import RedisStore
from relayd.subscription import State, Subscriber
from tests.doubles import Owner
from tests.helpers import poll_until
from tests.test_hub import Peer, connect, peers  # noqa: F401  (peers: the fixture)
from tests.test_store_contract import append, created, end

S = "replayed"
PAGE = 50


class RecordingStore(RedisStore):
    """A RedisStore that records each framed page read: where it starts, how many entries it asks
    for, and how many reads were in flight when it was sent. ``on_read`` runs as each read is sent."""

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url, Metrics())
        self.reads: list[tuple[int, int, int]] = []  # (first, count, reads in flight before it)
        self.inflight = 0
        self.on_read: list[asyncio.Event] = []

    async def read_frames(self, stream: str, gen: int, first: int, count: int, template: bytes) -> FramedPage | None:
        self.reads.append((first, count, self.inflight))
        self.inflight += 1
        for event in self.on_read:
            event.set()
        try:
            return await super().read_frames(stream, gen, first, count, template)
        finally:
            self.inflight -= 1


@pytest.fixture
async def store(redis_server: str, key_prefix: str) -> AsyncIterator[RecordingStore]:
    config = Config(redis=RedisConfig(key_prefix=key_prefix), streams=StreamsConfig(max_chunks=100_000))
    impl = RecordingStore(config, redis_server)
    await impl.start()
    try:
        yield impl
    finally:
        await impl.close()


def chunk(i: int) -> bytes:
    """A chunk of a fixed size (its frame is ~250 bytes), so bytes per page are known."""
    return orjson.dumps({"i": i, "pad": "x" * 150 + f"{i:08d}"})


async def write(store: RedisStore, first: int, n: int, hub: Hub | None = None) -> None:
    """Append chunks ``first`` .. ``first + n - 1`` (epoch 1, seq = i), publishing them if ``hub``."""
    chunks = [chunk(i) for i in range(first, first + n)]
    out = await append(store, S, 1, first, *chunks)
    assert isinstance(out, Appended)
    if hub is not None:
        entries = [Entry(out.first + k, c) for k, c in enumerate(chunks)]
        hub.publish(Publication(S, out.gen, entries, False, 0.0, sum(map(len, chunks))))


async def finish(store: RedisStore, hub: Hub) -> None:
    out = await end(store, S)
    assert isinstance(out, Ended)
    hub.publish(Publication(S, out.gen, [Entry(out.offset, None, "completed")], False))


def subscribe(hub: Hub, peer: Peer, subs: list[Subscriber]) -> Subscriber:
    sub = Subscriber(hub, S, peer.outbox, WS_CODEC, cursor=None, wait_s=10.0, owner=Owner())
    sub.start()
    subs.append(sub)
    return sub


@pytest.fixture
async def subs() -> AsyncIterator[list[Subscriber]]:
    made: list[Subscriber] = []
    yield made
    for sub in made:
        await sub.stop()


async def test_the_next_page_is_read_while_this_one_is_and_the_replay_is_whole_and_in_order(
    store: RecordingStore,
    peers: list[Peer],  # noqa: F811
    subs: list[Subscriber],
) -> None:
    """A replay of 1000 chunks in pages of 50 has two reads in flight at once (the next page is
    asked for before this one is awaited), every read ahead starts where the page before it
    ends, and the consumer gets every chunk once, in order, then the end."""
    await created(store, S)
    for first in range(1, 1001, 250):
        await write(store, first, 250)
    hub = Hub(store, Metrics(), catchup_page=PAGE)
    await finish(store, hub)
    await connect(peers, _World(hub), 1)
    (peer,) = peers
    subscribe(hub, peer, subs)
    got = await peer.until_end()
    assert got == [orjson.loads(chunk(i)) for i in range(1, 1001)] + [("end", "completed")]
    assert max(inflight for _, _, inflight in store.reads) == 1  # a read ahead: two in flight
    starts = [first for first, _, _ in store.reads]
    assert starts == sorted(set(starts)) and starts[0] == 1  # each page asked for once, in order
    assert [first for first in starts if first > 1001] in ([], [1001 + PAGE])  # past the end: one read ahead at most


async def test_publications_during_pipelined_reads_reach_the_consumer_once_at_the_handoff(
    store: RecordingStore,
    peers: list[Peer],  # noqa: F811
    subs: list[Subscriber],
) -> None:
    """While a stream is replayed with pages read ahead, a producer appends a chunk as each page
    is asked for (published to the hub like a live append): the reads see some of them, the
    subscriber's buffer has the others, and the consumer gets every chunk once, in order, then
    the live tail."""
    await created(store, S)
    await write(store, 1, 400)
    hub = Hub(store, Metrics(), catchup_page=PAGE)
    await connect(peers, _World(hub), 1)
    (peer,) = peers
    sent = asyncio.Event()
    store.on_read.append(sent)
    n, stop = 400, False

    async def produce() -> None:
        nonlocal n
        while True:
            await sent.wait()
            sent.clear()
            if stop:
                return
            n += 1
            await write(store, n, 1, hub)  # durable, then published: during a read or between two

    producer = asyncio.create_task(produce())
    sub = subscribe(hub, peer, subs)
    await poll_until(lambda: sub.state is State.LIVE, "the handoff to live")
    stop = True
    sent.set()
    await producer
    assert n > 400  # appended while it caught up
    assert max(inflight for _, _, inflight in store.reads) == 1
    await write(store, n + 1, 2, hub)  # live
    await finish(store, hub)
    got = await peer.until_end()
    assert got == [orjson.loads(chunk(i)) for i in range(1, n + 3)] + [("end", "completed")]


async def test_what_is_read_ahead_and_the_page_in_hand_fit_the_queue_and_a_stalled_reader_holds_reads_back(
    store: RecordingStore,
    peers: list[Peer],  # noqa: F811
    subs: list[Subscriber],
) -> None:
    """With a 16 KiB queue (~60 frames of ~260 bytes) the page read ahead is sized so that it and
    the page in hand fit the queue (not a whole page of 50 more); a consumer that stops reading
    holds the replay: it asks for no more than its queue, the socket's buffers and the pages in
    hand and ahead, and once it reads again it gets every chunk once, in order."""
    max_bytes = 16 * 1024
    await created(store, S)
    for first in range(1, 2001, 500):
        await write(store, first, 500)
    hub = Hub(store, Metrics(), catchup_page=PAGE)
    await finish(store, hub)
    frame = len(WS_CODEC.entries(S, 1, [Entry(1, chunk(1))], False)) + 1
    await connect(peers, _World(hub), 1, rcvbuf=4096, sndbuf=4096, max_bytes=max_bytes)
    (peer,) = peers
    sub = subscribe(hub, peer, subs)
    # The peer reads nothing: the subscriber waits for room in its full queue, with what it read
    # ahead held and no read in flight.
    await poll_until(lambda: peer.outbox._waiting_room and store.inflight == 0, "a stalled replay")
    assert sub.state is State.CATCHUP and sub.next < 2001
    asked = max(first + count for first, count, _ in store.reads)
    assert (asked - sub.next) * frame <= max_bytes + frame  # the page in hand and the one ahead: a queue's worth
    for k, (_, count, inflight) in enumerate(store.reads):
        if inflight:  # a read ahead: it and the page in hand (the read before it) fit the queue
            assert (store.reads[k - 1][1] + count) * frame <= max_bytes + frame
    assert any(inflight for _, _, inflight in store.reads)
    got = await peer.until_end()
    assert got == [orjson.loads(chunk(i)) for i in range(1, 2001)] + [("end", "completed")]


class _World:
    """What tests/test_hub.py's ``connect`` takes of a world: its hub (for the metrics)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
