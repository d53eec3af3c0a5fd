"""Connectionless producers (relayd/leases.py) through the Relay facade: write, open_stream, finish.

No socket: each test runs on MemoryStore and on RedisStore against real Valkey. Consumers are
real subscriptions on the relay's hub writing into a recording Sink; websocket producers are
ProducerSessions with a recording peer, as in tests/test_producer.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from relayd.config import Config, LimitsConfig, RedisConfig, StreamsConfig
from relayd.metrics import Metrics
from relayd.model import Entry, Opened, Refused, Written, now_ms
from relayd.ports import Store
from relayd.producer import ProducerSession
from relayd.protocol import WS_CODEC, OpenOp
from relayd.relay import Relay
from relayd.store.memory import MemoryStore
from relayd.store.redis_streams import RedisStore
from relayd.subscription import State, Subscriber
from tests.doubles import Owner, RecordingPeer, RecordingSink, until
from tests.helpers import poll_until
from tests.test_producer import Clock, append_op

S = "http-1"
GRACE_MS = 500  # streams.cancel_grace_ms: room for a request between the cancel and the end, on a busy machine


def js(*values: Any) -> list[bytes]:
    return [orjson.dumps(v) for v in values]


class Engine:
    """A relay (or two, sharing the store) over one store, with subscriptions to clean up."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.relays: list[Relay] = []
        self.subs: list[Subscriber] = []

    def relay(self) -> Relay:
        self.relays.append(Relay(self.config, self.store, Metrics()))
        return self.relays[-1]

    async def subscribe(self, relay: Relay, stream: str = S) -> tuple[RecordingSink, Owner]:
        sink, owner = RecordingSink(), Owner()
        sub = relay.subscribe(stream, sink, WS_CODEC, cursor=None, wait_s=10, owner=owner)
        sub.start()
        self.subs.append(sub)
        await poll_until(lambda: sub.state is State.LIVE, "the subscription live")  # Redis reads: time, not ticks
        return sink, owner

    async def entries(self, stream: str = S) -> list[Entry]:
        meta = await self.store.read_meta(stream)
        assert meta is not None
        return await self.store.read_entries(stream, meta.gen, 1, 1000)

    async def close(self) -> None:
        for sub in self.subs:
            await sub.stop()
        for relay in self.relays:
            await relay.close()
        await self.store.close()


async def make_engine(kind: str, request: pytest.FixtureRequest, key_prefix: str, **limits: Any) -> Engine:
    config = Config(
        redis=RedisConfig(key_prefix=key_prefix),
        streams=StreamsConfig(producer_timeout_ms=30_000, cancel_grace_ms=GRACE_MS),
        limits=LimitsConfig(**limits),
    )
    store: Store
    if kind == "memory":
        store = MemoryStore(config)
    else:
        store = RedisStore(config, request.getfixturevalue("redis_server"), Metrics())
    await store.start()
    return Engine(config, store)


@pytest.fixture(params=["memory", "redis"])
async def engine(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Engine]:
    made = await make_engine(request.param, request, key_prefix)
    yield made
    await made.close()


def written(outcome: object) -> Written:
    assert isinstance(outcome, Written), outcome
    return outcome


def refused(outcome: object, code: str) -> Refused:
    assert isinstance(outcome, Refused) and outcome.code == code, outcome
    return outcome


async def test_a_first_write_creates_the_stream_and_its_resend_gets_the_same_answer_stored_once(
    engine: Engine,
) -> None:
    relay = engine.relay()
    first = written(await relay.write(S, epoch=1, seq=1, chunks=js("a", "b"), producer="p1"))
    assert (first.epoch, first.seq, first.offset, first.stored, first.created) == (1, 2, 2, 2, True)
    sink, _ = await engine.subscribe(relay)
    again = written(await relay.write(S, epoch=1, seq=1, chunks=js("a", "b"), producer="p1"))  # answer lost
    assert (again.seq, again.offset, again.gen, again.stored, again.created) == (2, 2, first.gen, 0, False)
    overlap = written(await relay.write(S, epoch=1, seq=2, chunks=js("b", "c")))
    assert (overlap.seq, overlap.offset, overlap.stored) == (3, 3, 1)
    await until(lambda: sink.chunks() == ["a", "b", "c"])
    assert [e.data for e in await engine.entries()] == [b'"a"', b'"b"', b'"c"']


async def test_a_write_past_the_next_seq_is_refused_seq_gap_with_the_last_stored(engine: Engine) -> None:
    relay = engine.relay()
    written(await relay.write(S, epoch=1, seq=1, chunks=js("a")))
    assert refused(await relay.write(S, epoch=1, seq=3, chunks=js("c")), "seq_gap").value == 1
    assert written(await relay.write(S, epoch=1, seq=2, chunks=js("b"))).offset == 2


async def test_a_higher_epoch_takes_the_stream_over_and_the_older_one_is_fenced(engine: Engine) -> None:
    """Two HTTP producers, and the same through another relay on the store (no lease there)."""
    one, two = engine.relay(), engine.relay()
    written(await one.write(S, epoch=1, seq=1, chunks=js("old")))
    taken = written(await two.write(S, epoch=2, seq=1, chunks=js("new")))
    assert (taken.epoch, taken.seq, taken.offset) == (2, 1, 2)
    assert refused(await one.write(S, epoch=1, seq=2, chunks=js("stale")), "fenced").value == 2  # its lease: epoch 1
    assert refused(await two.write(S, epoch=1, seq=2, chunks=js("stale")), "fenced").value == 2  # no lease: open
    assert written(await one.write(S, epoch=2, seq=2, chunks=js("more"))).offset == 3


async def test_fencing_works_both_ways_between_a_websocket_and_an_http_producer(engine: Engine) -> None:
    relay = engine.relay()
    peer = RecordingPeer()
    session = ProducerSession(peer, 1 << 20)
    relay.open(session, OpenOp(S, None, "json"))  # epoch 1, held by the connection
    await engine.store.drain()
    written(await relay.write(S, epoch=2, seq=1, chunks=js("http")))  # takes it over
    relay.append(session, append_op(S, 1, "ws"))
    await engine.store.drain()
    assert peer.take()[-1] == ("refused", S, "fenced", 1) and S not in session.held
    assert await relay.cancel(S)  # the holder is the HTTP producer now: told, not the websocket
    assert peer.calls == []
    assert written(await relay.write(S, epoch=2, seq=2, chunks=js("x"))).cancel_requested
    relay.open(session, OpenOp(S, None, "json"))  # the websocket takes it back: epoch 3
    await engine.store.drain()
    assert peer.take()[0][:4] == ("opened", S, "opened", 3)
    assert refused(await relay.write(S, epoch=2, seq=3, chunks=js("late")), "fenced").value == 3
    assert [e.data for e in await engine.entries()] == [b'"http"', b'"x"']


async def test_a_write_can_end_the_stream_and_its_resend_gets_the_same_answer(engine: Engine) -> None:
    relay = engine.relay()
    written(await relay.write(S, epoch=1, seq=1, chunks=js("a")))
    sink, owner = await engine.subscribe(relay)
    done = written(await relay.write(S, epoch=1, seq=2, chunks=js("b", "c"), end=("completed", "")))
    assert (done.seq, done.offset, done.ended, done.reason) == (3, 3, 4, "completed")
    await owner.finished.wait()
    assert sink.chunks() == ["a", "b", "c", ("end", "completed")]
    other = engine.relay()  # the resend goes to another instance (no lease there), or here again
    for relay_ in (relay, other):
        again = written(await relay_.write(S, epoch=1, seq=2, chunks=js("b", "c"), end=("completed", "")))
        assert (again.seq, again.offset, again.ended, again.reason, again.gen) == (3, 3, 4, "completed", done.gen)
        first = written(await relay_.write(S, epoch=1, seq=1, chunks=js("a"), end=("completed", "")))
        assert (first.seq, first.offset, first.ended) == (1, 1, 4)
    late = refused(await relay.write(S, epoch=1, seq=4, chunks=js("d")), "stream_ended")
    assert late.status == "completed"
    refused(await relay.write(S, epoch=1, seq=2, chunks=js("b", "c"), end=("error", "")), "stream_ended")
    assert written(await relay.finish(S, epoch=1, reason="completed")).ended == 4  # an end alone, repeated
    assert len(await engine.entries()) == 4


async def test_open_stream_takes_over_resumes_by_producer_id_and_reports_an_ended_stream(engine: Engine) -> None:
    relay = engine.relay()
    opened = await relay.open_stream(S, producer="p1", content_type="text")
    assert isinstance(opened, Opened) and (opened.code, opened.epoch, opened.content_type) == ("created", 1, "text")
    written(await relay.write(S, epoch=1, seq=1, chunks=js("a")))
    resumed = await relay.open_stream(S, producer="p1")  # its answer was lost: repeated, no takeover
    assert isinstance(resumed, Opened) and (resumed.code, resumed.epoch, resumed.seq) == ("resumed", 1, 1)
    refused(await relay.write(S, epoch=1, seq=2, chunks=js({"not": "text"})), "content_type")
    taken = await relay.open_stream(S)
    assert isinstance(taken, Opened) and (taken.code, taken.epoch, taken.seq) == ("opened", 2, 0)
    written(await relay.finish(S, epoch=2, reason="error", message="boom"))
    ended = await relay.open_stream(S, epoch=2)
    assert isinstance(ended, Opened) and (ended.code, ended.status) == ("ended", "error")


async def test_concurrent_first_writes_share_one_open_and_are_applied_in_order(engine: Engine) -> None:
    relay = engine.relay()
    outcomes = await asyncio.gather(*(relay.write(S, epoch=1, seq=i, chunks=js(i)) for i in range(1, 6)))
    assert [written(o).offset for o in outcomes] == [1, 2, 3, 4, 5]
    assert [written(o).created for o in outcomes] == [True, False, False, False, False]
    assert relay.metrics.registry.get_sample_value("relayd_streams_started_total") == 1


async def test_a_cancel_reaches_the_http_producer_in_its_next_answer_and_the_grace_ends_the_stream(
    engine: Engine,
) -> None:
    relay = engine.relay()
    assert not written(await relay.write(S, epoch=1, seq=1, chunks=js("a"))).cancel_requested
    sink, owner = await engine.subscribe(relay)
    assert await relay.cancel(S)
    assert relay.cancel_requested(S)
    heartbeat = written(await relay.write(S, epoch=1))  # no chunks: a heartbeat, answered the same
    assert heartbeat.cancel_requested and (heartbeat.seq, heartbeat.offset) == (1, 1)
    await owner.finished.wait()  # it did not end the stream: streams.cancel_grace_ms later, relayd did
    assert sink.chunks() == ["a", ("end", "cancelled")]
    assert refused(await relay.write(S, epoch=1, seq=2, chunks=js("b")), "stream_ended").status == "cancelled"


async def test_a_cancelled_http_producer_that_ends_within_the_grace_stops_the_timer(engine: Engine) -> None:
    relay = engine.relay()
    written(await relay.write(S, epoch=1, seq=1, chunks=js("a")))
    assert await relay.cancel(S)
    assert written(await relay.finish(S, epoch=1, reason="cancelled")).ended == 2
    assert relay._cancel_timers == {}


async def test_writes_past_the_pending_bound_are_refused_overloaded_not_queued(
    request: pytest.FixtureRequest, key_prefix: str
) -> None:
    engine = await make_engine("memory", request, key_prefix, max_producer_backlog_bytes=2000)
    try:
        relay = engine.relay()
        big = js("x" * 600)  # costs 2 * 602 + 300 bytes
        assert relay.write_admits(10**9)  # nothing waits: any one write is admitted
        first = asyncio.ensure_future(relay.write(S, epoch=1, seq=1, chunks=big))
        await until(lambda: not relay.write_admits(1500))
        refused(await relay.write("other", epoch=1, seq=1, chunks=big), "overloaded")
        written(await first)
        assert relay.write_admits(1500)
    finally:
        await engine.close()


async def test_an_http_producer_that_stops_posting_is_ended_producer_lost_and_heartbeats_keep_it(
    request: pytest.FixtureRequest, key_prefix: str
) -> None:
    """Its lease does not keep the stream alive (a websocket connection would): its activity does."""
    engine = await make_engine("memory", request, key_prefix)
    clock = Clock()
    engine.store = store = MemoryStore(engine.config, clock=clock)
    try:
        relay = engine.relay()

        async def swept() -> str:
            await relay.sweep(30_000)
            await store.drain()
            meta = await store.read_meta(S)
            assert meta is not None
            return meta.status

        clock.lagging = True  # the first write lies in the past
        written(await relay.write(S, epoch=1, seq=1, chunks=js("a")))
        clock.lagging = False
        written(await relay.write(S, epoch=1, seq=2, chunks=js("b")))  # activity now (the index lags)
        assert await swept() == "open"
        clock.lagging = True
        written(await relay.write(S, epoch=1, seq=3, chunks=js("c")))
        clock.lagging = False
        written(await relay.write(S, epoch=1))  # a heartbeat (a long tool call): activity now
        assert await swept() == "open"
        clock.lagging = True
        written(await relay.write(S, epoch=1))  # its last post, long ago
        clock.lagging = False
        assert await swept() == "producer_lost"
        assert refused(await relay.write(S, epoch=1, seq=4, chunks=js("d")), "stream_ended").status == "producer_lost"
    finally:
        await engine.close()


async def test_a_write_whose_caller_went_away_is_still_published_live(engine: Engine) -> None:
    """The request is gone (cancelled) while its append waits for the store: the chunks become
    durable anyway, so live consumers must get them then, not at the next write."""
    relay = engine.relay()
    written(await relay.write(S, epoch=1, seq=1, chunks=js("a")))
    sink, _ = await engine.subscribe(relay)
    request = asyncio.ensure_future(relay.write(S, epoch=1, seq=2, chunks=js("b")))
    await until(lambda: not relay.write_admits(1 << 40))  # submitted: its bytes are pending
    request.cancel()
    await poll_until(lambda: sink.chunks() == ["a", "b"], "both chunks delivered")
    assert relay.write_admits(1 << 40)  # and its bytes were released


async def test_a_posting_producer_touches_its_stream_as_the_sweep_does_a_connections(
    request: pytest.FixtureRequest, key_prefix: str
) -> None:
    """At most every third of the producer timeout, an append also touches the stream: the open
    index (which the sweep reads by age) and the open stream's retention follow the activity."""
    engine = await make_engine("memory", request, key_prefix)
    clock = Clock()
    config = Config(streams=StreamsConfig(producer_timeout_ms=60))
    engine.store = store = MemoryStore(config, clock=clock)
    try:
        relay = Relay(config, store, Metrics())
        engine.relays.append(relay)
        clock.lagging = True  # opened (and indexed) long ago
        written(await relay.write(S, epoch=1, seq=1, chunks=js("a")))
        clock.lagging = False
        written(await relay.write(S, epoch=1, seq=2, chunks=js("b")))  # within a third: no touch
        await store.drain()
        assert await store.stale_open_streams(now_ms() - 30_000) == [S]
        await asyncio.sleep(0.025)  # a third of the timeout passes: what the test is about
        written(await relay.write(S, epoch=1, seq=3, chunks=js("c")))
        await store.drain()
        assert await store.stale_open_streams(now_ms() - 30_000) == []
    finally:
        await engine.close()
