"""The producer side: ProducerSession without a loop, then the Relay over MemoryStore.

The relay's answers go to a recording ProducerPeer; consumers, where a test needs them, are real
subscriptions on the relay's hub writing into a recording Sink. No socket, no Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from relayd.config import Config, LimitsConfig, StreamsConfig
from relayd.metrics import Metrics
from relayd.model import Ended, Entry, Refused, now_ms
from relayd.producer import _ENDED_MEMORY, Held, ProducerSession
from relayd.protocol import WS_CODEC, AppendOp, EndOp, OpenOp
from relayd.relay import Relay
from relayd.store.memory import MemoryStore
from relayd.subscription import State, Subscriber
from tests.doubles import Owner, RecordingPeer, RecordingSink, until

S = "job-1"
LAG_MS = 60_000  # how far in the past the store's clock puts a producer's last activity
TIMEOUT_MS = 30_000  # streams.producer_timeout_ms


def append_op(stream: str, seq: int, *values: Any) -> AppendOp:
    chunks = [orjson.dumps(v) for v in values]
    return AppendOp(stream, seq, chunks, sum(len(c) for c in chunks))


def held(epoch: int = 1, text: bool = False) -> Held:
    return Held(epoch, 1, text, handle=None)


# ProducerSession, without a loop -----------------------------------------------------------------------


def test_flow_control_calls_on_room_only_when_the_limit_is_crossed() -> None:
    rooms: list[bool] = []
    session = ProducerSession(RecordingPeer(), 100, rooms.append)
    session.charge(60)
    session.charge(39)
    assert session.has_room and rooms == []
    session.charge(1)  # 100: full
    session.charge(50)
    assert not session.has_room and rooms == [False]
    session.credit(50)
    assert rooms == [False]
    session.credit(1)  # 99: room again
    session.credit(99)
    assert session.has_room and session.unacked_bytes == 0 and rooms == [False, True]
    ProducerSession(RecordingPeer(), 10).charge(20)  # without a callback: nothing to call


def test_hold_drop_and_finish_keep_what_a_connection_holds_and_what_ended() -> None:
    session = ProducerSession(RecordingPeer(), 100)
    session.hold("t", held(text=True))
    session.hold("j", held(epoch=3))
    assert set(session.held) == {"t", "j"} and session.text_streams == {"t"}
    session.drop("t")  # released without ending (fenced, disconnected): nothing remembered
    assert "t" not in session.held and session.text_streams == set() and session.ended == {}
    session.finish("j")
    assert session.held == {} and session.ended == {"j": 3}
    session.finish("never-held")  # no epoch known: nothing to remember
    session.finish("found-ended", 7)  # an open that found it ended
    assert session.ended == {"j": 3, "found-ended": 7}
    session.hold("j", held(epoch=4))  # opened again (another epoch): no longer ended
    assert "j" not in session.ended


def test_the_ended_memory_is_bounded_forgetting_the_oldest() -> None:
    session = ProducerSession(RecordingPeer(), 100)
    for i in range(_ENDED_MEMORY):
        session.finish(f"s{i}", 1)
    session.finish("s0")  # finished again: now the newest (its remembered epoch kept)
    session.finish("new", 2)
    assert len(session.ended) == _ENDED_MEMORY
    assert "s1" not in session.ended and session.ended["s0"] == 1 and session.ended["new"] == 2


def test_ops_wait_for_a_pending_open_charged_and_come_back_in_arrival_order() -> None:
    rooms: list[bool] = []
    session = ProducerSession(RecordingPeer(), 1000, rooms.append)
    first, second, end = append_op(S, 1, "a"), append_op(S, 2, "b" * 400), EndOp(S, "completed", "")
    assert not session.defer(first)  # no open pending: the caller refuses it
    session.start_opening(S)
    session.received_at = 1.0
    assert session.defer(first)
    session.received_at = 2.0
    assert session.defer(second) and session.defer(end)
    assert session.unacked_bytes == first.cost + second.cost and rooms == [False]  # ends cost nothing
    session.start_opening(S)  # a second open of the same stream joins the wait
    assert session.take_deferred(S) == [(first, 1.0), (second, 2.0), (end, 2.0)]
    assert session.unacked_bytes == 0 and rooms == [False, True]
    assert session.take_deferred(S) == [] and S not in session.opening


# the Relay over MemoryStore ----------------------------------------------------------------------------


class Clock:
    """The store's clock: the wall clock, or ``LAG_MS`` behind it while ``lagging``."""

    def __init__(self) -> None:
        self.lagging = False

    def __call__(self) -> int:
        return now_ms() - (LAG_MS if self.lagging else 0)


class Harness:
    def __init__(self, **tables: Any) -> None:
        streams = {"producer_timeout_ms": TIMEOUT_MS, "cancel_grace_ms": 50, **tables.pop("streams", {})}
        self.config = Config(streams=StreamsConfig(**streams), **tables)
        self.clock = Clock()
        self.store = MemoryStore(self.config, clock=self.clock)
        self.relays: list[Relay] = []
        self.subs: list[Subscriber] = []

    def relay(self) -> Relay:
        relay = Relay(self.config, self.store, Metrics())
        self.relays.append(relay)
        return relay

    def session(self) -> tuple[ProducerSession, RecordingPeer]:
        peer = RecordingPeer()
        return ProducerSession(peer, self.config.limits.max_unacked_bytes), peer

    async def opened(self, relay: Relay, stream: str = S) -> tuple[ProducerSession, RecordingPeer]:
        session, peer = self.session()
        relay.open(session, OpenOp(stream, None, "json"))
        await self.store.drain()
        assert peer.take()[0][:3] == ("opened", stream, "created")
        return session, peer

    def subscribe(self, relay: Relay, stream: str = S) -> tuple[Subscriber, RecordingSink, Owner]:
        sink, owner = RecordingSink(), Owner()
        sub = relay.subscribe(stream, sink, WS_CODEC, cursor=None, wait_s=10, owner=owner)
        sub.start()
        self.subs.append(sub)
        return sub, sink, owner

    async def entries(self, stream: str = S) -> list[Entry]:
        meta = await self.store.read_meta(stream)
        assert meta is not None
        return await self.store.read_entries(stream, meta.gen, 1, 1000)

    def ended_count(self, reason: str) -> float:
        labels = {"reason": reason}
        return sum(r.metrics.registry.get_sample_value("relayd_streams_ended_total", labels) or 0 for r in self.relays)

    async def close(self) -> None:
        for sub in self.subs:
            await sub.stop()
        for relay in self.relays:
            await relay.close()
        await self.store.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.close()


@pytest.fixture
async def make_harness() -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**tables: Any) -> Harness:
        made.append(Harness(**tables))
        return made[-1]

    yield make
    for h in made:
        await h.close()


async def test_open_answers_opened_and_the_connection_holds_the_stream(harness: Harness) -> None:
    relay = harness.relay()
    session, peer = harness.session()
    relay.open(session, OpenOp(S, None, "text", "p1"))
    assert peer.calls == [] and S in session.opening  # answered by the store, later
    await harness.store.drain()
    assert peer.calls == [("opened", S, "created", 1)]
    assert session.held[S].epoch == 1 and session.text_streams == {S} and S not in session.opening
    assert await harness.store.open_count() == 1  # indexed for the producer-lost sweep


async def test_appends_pipelined_before_opened_wait_and_are_acked_in_order(harness: Harness) -> None:
    """A producer may write its first appends and end right after the open, in one message."""
    relay = harness.relay()
    session, peer = harness.session()
    relay.open(session, OpenOp(S, None, "json"))
    first, second = append_op(S, 1, "a"), append_op(S, 2, "b", "c")
    relay.append(session, first)
    relay.append(session, second)
    relay.end(session, EndOp(S, "completed", ""))
    assert [op for op, _ in session.opening[S]] == [first, second, EndOp(S, "completed", "")]
    assert session.unacked_bytes == first.cost + second.cost
    await harness.store.drain()
    assert peer.calls == [
        ("opened", S, "created", 1),
        ("acked", S, 1, 1),
        ("acked", S, 3, 3),
        ("ended", S, "completed", 4, ""),
    ]
    assert session.unacked_bytes == 0 and session.held == {} and session.ended == {S: 1}
    assert [e.data or e.reason for e in await harness.entries()] == [b'"a"', b'"b"', b'"c"', "completed"]


async def test_an_append_past_the_next_seq_is_refused_seq_gap_and_the_stream_stays_held(harness: Harness) -> None:
    relay = harness.relay()
    session, peer = await harness.opened(relay)
    relay.append(session, append_op(S, 1, "a"))
    relay.append(session, append_op(S, 3, "c"))
    await harness.store.drain()
    assert peer.take() == [("acked", S, 1, 1), ("refused", S, "seq_gap", 1)]  # seq: the last stored
    relay.append(session, append_op(S, 2, "b"))
    await harness.store.drain()
    assert peer.take() == [("acked", S, 2, 2)] and S in session.held


async def test_a_resend_is_acked_and_consumers_get_each_chunk_once(harness: Harness) -> None:
    """A partial overlap publishes only the new chunks; an all-duplicate resend publishes nothing."""
    relay = harness.relay()
    session, peer = await harness.opened(relay)
    sub, sink, _ = harness.subscribe(relay)
    await until(lambda: sub.state is State.LIVE)
    relay.append(session, append_op(S, 1, "a", "b"))
    relay.append(session, append_op(S, 2, "b", "c"))
    relay.append(session, append_op(S, 1, "a"))
    await harness.store.drain()
    assert peer.take() == [("acked", S, 2, 2), ("acked", S, 3, 3), ("acked", S, 1, 1)]
    assert sink.chunks() == ["a", "b", "c"] and sub.state is State.LIVE


async def test_a_resend_on_another_instance_pokes_its_consumers_short_of_the_chunks(harness: Harness) -> None:
    """The producer moved (its acks were lost) and resends what the store already has: the consumers
    of the new instance, who never got those chunks published, read them from the store."""
    one, two = harness.relay(), harness.relay()
    moved, moved_peer = harness.session()
    first, first_peer = harness.session()
    one.open(first, OpenOp(S, None, "json", "p"))
    await harness.store.drain()
    sub, sink, _ = harness.subscribe(two)
    await until(lambda: sub.state is State.LIVE)
    one.append(first, append_op(S, 1, "a"))
    await harness.store.drain()
    assert first_peer.calls[-1] == ("acked", S, 1, 1) and sink.chunks() == []  # no broker between them
    one.release_session(first)
    two.open(moved, OpenOp(S, None, "json", "p"))  # the same producer id: resumed, not taken over
    two.append(moved, append_op(S, 1, "a"))
    await harness.store.drain()
    assert moved_peer.calls == [("opened", S, "resumed", 1), ("acked", S, 1, 1)]
    await until(lambda: sink.chunks() == ["a"] and sub.state is State.LIVE)


async def test_a_takeover_fences_the_old_connection_which_lets_the_stream_go(harness: Harness) -> None:
    relay = harness.relay()
    old, old_peer = await harness.opened(relay)
    new, new_peer = harness.session()
    relay.open(new, OpenOp(S, None, "json"))
    await harness.store.drain()
    assert new_peer.take() == [("opened", S, "opened", 2)]
    relay.append(old, append_op(S, 1, "stale"))
    await harness.store.drain()
    assert old_peer.take() == [("refused", S, "fenced", 1)]
    assert old.held == {} and S not in old.ended and S in new.held
    relay.end(old, EndOp(S, "completed", ""))  # it holds nothing now
    assert old_peer.take() == [("refused", S, "not_open", None)]
    assert await relay.cancel(S)  # the holder is the new connection
    assert new_peer.take() == [("cancel", S)] and old_peer.calls == []


async def test_after_the_end_appends_are_refused_stream_ended_and_the_end_is_idempotent(harness: Harness) -> None:
    relay = harness.relay()
    session, peer = await harness.opened(relay)
    relay.end(session, EndOp(S, "error", "boom"))
    await harness.store.drain()
    assert peer.take() == [("ended", S, "error", 1, "")]
    relay.append(session, append_op(S, 1, "late"))
    assert peer.take() == [("refused", S, "stream_ended", 1)]  # known here: no store round trip
    relay.end(session, EndOp(S, "error", "boom"))  # a repeated end (its answer was lost)
    relay.end(session, EndOp(S, "completed", ""))
    await harness.store.drain()
    assert peer.take() == [("ended", S, "error", 1, ""), ("refused", S, "stream_ended", None)]
    other, other_peer = harness.session()
    relay.open(other, OpenOp(S, None, "json"))  # another connection opens it: ended
    relay.append(other, append_op(S, 1, "x"))
    await harness.store.drain()
    assert other_peer.take() == [("opened", S, "ended", 1), ("refused", S, "stream_ended", 1)]


async def test_an_operator_end_tells_the_holder_and_every_consumer(harness: Harness) -> None:
    relay = harness.relay()
    session, peer = await harness.opened(relay)
    sub, sink, owner = harness.subscribe(relay)
    await until(lambda: sub.state is State.LIVE)
    outcome = await relay.end_stream(S, "cancelled", "by ops")
    assert outcome == Ended("ok", outcome.gen, 1, "cancelled")  # type: ignore[union-attr]
    assert peer.take() == [("ended", S, "cancelled", 1, "by ops")]
    await owner.finished.wait()
    assert sink.chunks() == [("end", "cancelled")]
    relay.append(session, append_op(S, 1, "late"))
    assert peer.take() == [("refused", S, "stream_ended", 1)]
    again = await relay.end_stream(S, "completed", "")
    assert isinstance(again, Ended) and again.result == "already" and peer.calls == []
    missing = await relay.end_stream("nope", "cancelled", "")
    assert isinstance(missing, Refused) and missing.code == "not_found"


async def test_an_operator_end_during_the_open_tells_the_holder_the_open_made(harness: Harness) -> None:
    """The operator's end reaches the store right after a producer's open (its appends pipelined
    behind it), before the open is answered: the connection the open made the holder is told
    ``ended``, with the message, before the refusal of its appends."""
    relay = harness.relay()
    session, peer = harness.session()

    async def open_and_append() -> None:
        relay.open(session, OpenOp(S, None, "json"))
        relay.append(session, append_op(S, 1, "a"))

    opening = asyncio.create_task(open_and_append())
    ending = asyncio.create_task(relay.end_stream(S, "cancelled", "by ops"))  # runs right after the open
    await opening
    outcome = await ending
    await harness.store.drain()
    assert isinstance(outcome, Ended) and outcome.result == "ok"
    assert peer.take() == [
        ("opened", S, "created", 1),
        ("ended", S, "cancelled", 1, "by ops"),
        ("refused", S, "stream_ended", 1),
    ]
    assert session.held == {} and S in session.ended


async def test_a_lost_producer_is_ended_once_when_two_relays_sweep_at_the_same_time(harness: Harness) -> None:
    """Two instances on one store sweep concurrently: exactly one producer_lost end is written,
    and the consumers of both instances get it once."""
    one, two = harness.relay(), harness.relay()
    harness.clock.lagging = True  # the open (and its index entry) lie in the past
    session, _ = await harness.opened(one)
    harness.clock.lagging = False
    one.append(session, append_op(S, 1, "a"))  # activity now; the index is not told
    await harness.store.drain()
    await two.sweep(TIMEOUT_MS)  # stale in the index, alive in the meta: not ended
    harness.clock.lagging = True
    await one.sweep(TIMEOUT_MS)  # held here: kept, however old its activity
    await harness.store.drain()
    assert (await harness.store.read_meta(S)).is_open  # type: ignore[union-attr]
    subs = [harness.subscribe(relay) for relay in (one, two)]
    await until(lambda: all(sub.state is State.LIVE for sub, _, _ in subs))
    one.release_session(session)  # the connection is gone; its last activity: now (lagging)
    await harness.store.drain()
    harness.clock.lagging = False
    await asyncio.gather(one.sweep(TIMEOUT_MS), two.sweep(TIMEOUT_MS))
    await harness.store.drain()
    assert [e.reason for e in await harness.entries() if e.is_end] == ["producer_lost"]
    assert harness.ended_count("producer_lost") == 1
    assert await harness.store.open_count() == 0
    for _, sink, owner in subs:
        await owner.finished.wait()
        assert sink.chunks() == ["a", ("end", "producer_lost")]
    await one.sweep(TIMEOUT_MS)
    await harness.store.drain()
    assert harness.ended_count("producer_lost") == 1


async def test_a_stream_whose_open_is_answered_after_the_connection_left_is_not_held_forever(
    harness: Harness,
) -> None:
    """The connection drops while its open is on its way to the store: the stream must still end
    producer_lost after the timeout, not stay held (and touched by every sweep) by a dead session."""
    relay = harness.relay()
    session, _ = harness.session()
    harness.clock.lagging = True
    relay.open(session, OpenOp(S, None, "json"))
    relay.release_session(session)  # before the store answered the open
    await harness.store.drain()
    harness.clock.lagging = False
    await relay.sweep(TIMEOUT_MS)
    await harness.store.drain()
    meta = await harness.store.read_meta(S)
    assert meta is not None and meta.status == "producer_lost"


async def test_cancel_asks_the_local_holder_then_ends_the_stream_cancelled_after_the_grace(
    harness: Harness,
) -> None:
    relay = harness.relay()
    session, peer = await harness.opened(relay)
    sub, sink, owner = harness.subscribe(relay)
    await until(lambda: sub.state is State.LIVE)
    assert await relay.cancel(S)
    assert await relay.cancel(S)  # asked twice: one grace timer
    assert peer.take() == [("cancel", S), ("cancel", S)]
    await owner.finished.wait()  # the producer ignored it: streams.cancel_grace_ms later, relayd ends it
    assert sink.frames[-1] == {
        "type": "end",
        "stream": S,
        "cursor": sink.frames[-1]["cursor"],
        "reason": "cancelled",
        "message": "cancelled by a consumer",
    }
    assert harness.ended_count("cancelled") == 1 and S not in session.held and S in session.ended
    # the holder is told at once (an unsolicited ended, as for an operator's end), then refused
    relay.append(session, append_op(S, 1, "late"))
    assert peer.take() == [("ended", S, "cancelled", 1, "cancelled by a consumer"), ("refused", S, "stream_ended", 1)]
    assert not await relay.cancel(S)  # ended: nothing to cancel


async def test_a_producer_that_ends_within_the_grace_stops_the_timer(harness: Harness) -> None:
    relay = harness.relay()
    session, peer = await harness.opened(relay)
    assert await relay.cancel(S)
    timer = relay._cancel_timers[S]
    relay.end(session, EndOp(S, "cancelled", ""))
    await harness.store.drain()
    assert peer.take() == [("cancel", S), ("ended", S, "cancelled", 1, "")]
    assert timer.cancelled() and relay._cancel_timers == {}


async def test_cancel_of_a_stream_nobody_holds_ends_it_at_once(harness: Harness) -> None:
    """One instance, no holder here: nobody else can hold it, so no grace."""
    relay = harness.relay()
    session, _ = await harness.opened(relay)
    relay.release_session(session)
    assert await relay.cancel(S)
    await harness.store.drain()
    assert (await harness.store.read_meta(S)).status == "cancelled"  # type: ignore[union-attr]
    assert relay._cancel_timers == {}
    assert not await relay.cancel("nope")


async def test_opens_beyond_the_per_connection_limit_are_refused_even_when_pipelined(
    make_harness: Callable[..., Harness],
) -> None:
    """limits.max_streams_per_connection bounds what one connection holds, however fast it opens."""
    harness = make_harness(limits=LimitsConfig(max_streams_per_connection=2))
    relay = harness.relay()
    session, peer = harness.session()
    relay.open(session, OpenOp("a", None, "json"))
    await harness.store.drain()
    relay.open(session, OpenOp("a", None, "json"))  # a re-open of a held stream is not a new one
    relay.open(session, OpenOp("b", None, "json"))
    relay.open(session, OpenOp("c", None, "json"))  # pipelined: "b" is not answered yet
    await harness.store.drain()
    assert ("refused", "c", "too_many_streams", None) in peer.calls
    assert len(session.held) == 2


async def test_an_append_behind_a_re_open_of_a_held_stream_waits_for_it_and_keeps_the_hold(
    make_harness: Callable[..., Harness],
) -> None:
    """A re-open (a takeover with a new epoch) on the same connection, with an append right behind
    it: the append waits for the open and goes out in its epoch. Before, it went out in the old
    epoch, was fenced, and its refusal dropped the hold the re-open had just made."""
    harness = make_harness()
    relay = harness.relay()
    session, peer = await harness.opened(relay)
    relay.open(session, OpenOp(S, None, "json"))  # no epoch: a new one
    relay.append(session, AppendOp(S, 1, [b'"a"'], 3))
    await harness.store.drain()
    calls = peer.take()
    assert [c[0] for c in calls] == ["opened", "acked"], calls
    assert S in session.held and session.held[S].epoch == 2
    relay.append(session, AppendOp(S, 2, [b'"b"'], 3))
    await harness.store.drain()
    assert [c[0] for c in peer.take()] == ["acked"]
