"""The store contract (relayd/ports.py), one suite run against MemoryStore and RedisStore (real Valkey).

Every outcome of open/append/end (relayd/model.py's table), dedupe and fencing, the open index,
the reads with their generation bounds and the Catalog reads answer the same on both; where
they legitimately differ (MAXLEN ~ trims approximately in Redis) the test says what both promise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from relayd.config import Config, RedisConfig, StreamsConfig
from relayd.metrics import Metrics
from relayd.model import Appended, Ended, Entry, Opened, Refused, now_ms
from relayd.ports import Store
from relayd.store.memory import MemoryStore
from relayd.store.redis_streams import RedisStore

OPEN_TTL_S = 1000
END_TTL_S = 100
MAX_CHUNKS = 10


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Store]:
    config = Config(
        redis=RedisConfig(key_prefix=key_prefix),
        streams=StreamsConfig(max_chunks=MAX_CHUNKS, open_ttl_s=OPEN_TTL_S, ttl_after_end_s=END_TTL_S),
    )
    impl: Store
    if request.param == "memory":
        impl = MemoryStore(config)
    else:
        impl = RedisStore(config, request.getfixturevalue("redis_server"), Metrics())
    await impl.start()
    try:
        yield impl
    finally:
        await impl.close()


async def answer(submit: Callable[[Callable[[Any], None]], None]) -> Any:
    """Submit one write and await its outcome, checking it is not answered inside the call."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    submit(future.set_result)
    assert not future.done(), "a write answered synchronously inside the call"
    return await future


async def open_(store: Store, stream: str, epoch: int | None = None, ct: str = "json", pid: str | None = None) -> Any:
    return await answer(lambda done: store.open(stream, epoch, ct, pid, done))


async def append(store: Store, stream: str, epoch: int, seq: int, *chunks: bytes) -> Any:
    handle = store.append_handle(stream, epoch)
    return await answer(lambda done: store.append(handle, seq, list(chunks), done))


async def end(store: Store, stream: str, reason: str = "completed", message: str = "", **kw: Any) -> Any:
    return await answer(lambda done: store.end(stream, reason, message, done, **kw))


async def created(store: Store, stream: str, *chunks: bytes) -> Opened:
    """A new stream in epoch 1 with ``chunks`` (seq 1 on)."""
    opened = await open_(store, stream)
    assert isinstance(opened, Opened) and opened.code == "created"
    if chunks:
        assert isinstance(await append(store, stream, 1, 1, *chunks), Appended)
    return opened


async def next_ms() -> None:
    """Let the wall clock move on by a millisecond: times (and generations) are in ms. The passing
    of time is what the caller tests, not a synchronisation."""
    await asyncio.sleep(0.002)


# open ---------------------------------------------------------------------------------------------


async def test_open_creates_a_stream_in_epoch_1_or_the_epoch_asked(store: Store) -> None:
    """A first open creates the stream: epoch 1 (or the producer's), seq 0, no entries, its content type."""
    before = now_ms()
    opened = await open_(store, "s", ct="text")
    assert opened == Opened("created", opened.gen, 1, 0, 0, "open", "text")
    assert before <= opened.gen <= now_ms()
    meta = await store.read_meta("s")
    assert meta is not None and meta.is_open
    assert (meta.gen, meta.epoch, meta.seq, meta.n, meta.content_type) == (opened.gen, 1, 0, 0, "text")
    assert meta.created_ms == meta.updated_ms == opened.gen and meta.ended_ms is None and meta.message == ""
    assert OPEN_TTL_S - 2 <= await store.ttl_s("s") <= OPEN_TTL_S
    other = await open_(store, "t", epoch=5)
    assert (other.code, other.epoch) == ("created", 5)


async def test_open_without_epoch_takes_over_with_the_next_epoch_after_the_stored_entries(store: Store) -> None:
    """A takeover starts epoch+1 at seq 0; its seq 1 is the entry after those already stored."""
    first = await created(store, "s", b"1", b"2", b"3")
    opened = await open_(store, "s", ct="text")
    assert opened == Opened("opened", first.gen, 2, 0, 3, "open", "json")  # the stored content type
    assert await append(store, "s", 2, 1, b"4") == Appended(first.gen, 4, 4, 1)
    meta = await store.read_meta("s")
    assert meta is not None and (meta.epoch, meta.seq, meta.n) == (2, 1, 4)


async def test_open_with_a_newer_epoch_takes_over_at_that_epoch(store: Store) -> None:
    first = await created(store, "s", b"1")
    assert await open_(store, "s", epoch=7) == Opened("opened", first.gen, 7, 0, 1, "open", "json")


async def test_open_with_the_current_epoch_resumes_it(store: Store) -> None:
    """The same epoch resumes: the stored seq and offset come back, nothing restarts."""
    first = await created(store, "s", b"1", b"2")
    assert await open_(store, "s", epoch=1) == Opened("resumed", first.gen, 1, 2, 2, "open", "json")


async def test_open_with_an_older_epoch_is_fenced(store: Store) -> None:
    await created(store, "s")
    await open_(store, "s")  # epoch 2
    refused = await open_(store, "s", epoch=1)
    assert isinstance(refused, Refused) and (refused.code, refused.value) == ("fenced", 2)


async def test_open_of_an_ended_stream_says_ended_and_changes_nothing(store: Store) -> None:
    first = await created(store, "s", b"1")
    await end(store, "s", "error", "boom")
    for epoch in (None, 1, 9):
        assert await open_(store, "s", epoch) == Opened("ended", first.gen, 1, 1, 2, "error", "json")
    meta = await store.read_meta("s")
    assert meta is not None and (meta.status, meta.epoch, meta.message) == ("error", 1, "boom")


async def test_open_without_epoch_by_the_producer_that_started_the_epoch_resumes_it(store: Store) -> None:
    """An open repeated by the same producer id (its answer was lost) resumes; any other takes over."""
    first = await created_by(store, "s", "p1")
    assert await append(store, "s", 1, 1, b"a") == Appended(first.gen, 1, 1, 1)
    assert await open_(store, "s", pid="p1") == Opened("resumed", first.gen, 1, 1, 1, "open", "json")
    assert (await open_(store, "s", pid="p2")).epoch == 2  # another producer takes over
    assert (await open_(store, "s", pid="p1")).code == "opened"  # p1 no longer started the epoch: epoch 3
    assert (await open_(store, "s", pid="p1")) == Opened("resumed", first.gen, 3, 0, 1, "open", "json")
    assert (await open_(store, "s")).epoch == 4  # no producer id: the next open by p1 cannot resume
    assert (await open_(store, "s", pid="p1")).code == "opened"
    assert (await open_(store, "s", epoch=9, pid="p3")).epoch == 9  # an explicit takeover records p3
    assert await open_(store, "s", pid="p3") == Opened("resumed", first.gen, 9, 0, 1, "open", "json")


async def created_by(store: Store, stream: str, pid: str) -> Opened:
    opened = await open_(store, stream, pid=pid)
    assert isinstance(opened, Opened) and opened.code == "created"
    return opened


# append -------------------------------------------------------------------------------------------


async def test_append_stores_chunks_at_the_next_offsets(store: Store) -> None:
    first = await created(store, "s")
    assert await append(store, "s", 1, 1, b'"a"', b'"b"') == Appended(first.gen, 1, 2, 2)
    assert await append(store, "s", 1, 3, b'"c"') == Appended(first.gen, 3, 3, 3)
    assert await store.read_entries("s", first.gen, 1, 10) == [Entry(1, b'"a"'), Entry(2, b'"b"'), Entry(3, b'"c"')]
    meta = await store.read_meta("s")
    assert meta is not None and (meta.seq, meta.n) == (3, 3) and meta.updated_ms >= first.gen


async def test_a_resend_is_acknowledged_without_storing_anything(store: Store) -> None:
    """All duplicates: first > last, last is the offset the resent seq got the first time."""
    first = await created(store, "s", b"1", b"2", b"3")
    assert await append(store, "s", 1, 1, b"1", b"2") == Appended(first.gen, 4, 2, 2)
    assert await append(store, "s", 1, 3, b"3") == Appended(first.gen, 4, 3, 3)
    assert [e.offset for e in await store.read_entries("s", first.gen, 1, 10)] == [1, 2, 3]


async def test_a_partial_overlap_stores_only_the_new_chunks(store: Store) -> None:
    first = await created(store, "s", b"1", b"2")
    assert await append(store, "s", 1, 2, b"2", b"3", b"4") == Appended(first.gen, 3, 4, 4)
    entries = await store.read_entries("s", first.gen, 1, 10)
    assert [e.data for e in entries] == [b"1", b"2", b"3", b"4"]


async def test_dedupe_in_a_later_epoch_counts_from_that_epochs_base(store: Store) -> None:
    """In epoch 2 (after 3 entries) seq s is offset 3 + s: a resend gets those offsets back."""
    first = await created(store, "s", b"1", b"2", b"3")
    await open_(store, "s")
    assert await append(store, "s", 2, 1, b"x", b"y") == Appended(first.gen, 4, 5, 2)
    assert await append(store, "s", 2, 1, b"x") == Appended(first.gen, 6, 4, 1)
    assert await append(store, "s", 2, 2, b"y", b"z") == Appended(first.gen, 6, 6, 3)


async def test_append_past_the_next_seq_is_a_seq_gap(store: Store) -> None:
    await created(store, "s", b"1", b"2")
    refused = await append(store, "s", 1, 4, b"4")
    assert isinstance(refused, Refused) and (refused.code, refused.value) == ("seq_gap", 2)
    assert refused.message == "expected seq 3"


async def test_append_in_another_epoch_is_fenced(store: Store) -> None:
    first = await created(store, "s", b"1")
    await open_(store, "s")  # epoch 2 took over
    for epoch in (1, 3):
        refused = await append(store, "s", epoch, 2, b"2")
        assert isinstance(refused, Refused) and (refused.code, refused.value) == ("fenced", 2)
    assert [e.offset for e in await store.read_entries("s", first.gen, 1, 10)] == [1]


async def test_append_to_an_ended_stream_says_how_it_ended(store: Store) -> None:
    await created(store, "s", b"1")
    await end(store, "s", "cancelled")
    refused = await append(store, "s", 1, 2, b"2")
    assert isinstance(refused, Refused) and (refused.code, refused.status) == ("ended", "cancelled")


async def test_append_to_a_missing_stream_is_not_found(store: Store) -> None:
    refused = await append(store, "nope", 1, 1, b"1")
    assert isinstance(refused, Refused) and refused.code == "not_found"
    assert await store.read_meta("nope") is None


async def test_the_log_is_trimmed_to_about_max_chunks_keeping_the_newest(store: Store) -> None:
    """MAXLEN: at least max_chunks newest entries stay (exactly that many in memory, whole
    nodes in Redis); reading from 1 then starts past 1, which a subscriber reports as a gap."""
    first = await created(store, "s")
    for seq in range(1, 251, 50):
        await append(store, "s", 1, seq, *[b"%d" % i for i in range(seq, seq + 50)])
    edges = await store.log_edges("s")
    assert edges is not None and edges[1] == 250 and 1 < edges[0] <= 250 - MAX_CHUNKS + 1
    entries = await store.read_entries("s", first.gen, 1, 500)
    assert entries[0].offset == edges[0] and entries[-1] == Entry(250, b"250")
    meta = await store.read_meta("s")
    assert meta is not None and meta.n == 250


# end ----------------------------------------------------------------------------------------------


async def test_end_appends_the_end_entry_and_starts_the_retention(store: Store) -> None:
    first = await created(store, "s", b"1", b"2")
    before = now_ms()
    assert await end(store, "s", "error", "boom", epoch=1) == Ended("ok", first.gen, 3, "error")
    assert (await store.read_entries("s", first.gen, 3, 10)) == [Entry(3, None, "error", "boom")]
    meta = await store.read_meta("s")
    assert meta is not None and not meta.is_open
    assert (meta.status, meta.n, meta.message, meta.seq) == ("error", 3, "boom", 2)
    assert meta.ended_ms is not None and before <= meta.ended_ms == meta.updated_ms
    assert END_TTL_S - 2 <= await store.ttl_s("s") <= END_TTL_S


async def test_end_of_a_stream_without_chunks_is_entry_1(store: Store) -> None:
    first = await created(store, "s")
    assert await end(store, "s") == Ended("ok", first.gen, 1, "completed")
    assert await store.log_edges("s") == (1, 1)


async def test_a_second_end_is_already_with_the_first_reason(store: Store) -> None:
    """Whatever it asks (another reason, a stale epoch), the answer names how it did end."""
    first = await created(store, "s", b"1")
    await end(store, "s", "completed")
    assert await end(store, "s", "cancelled") == Ended("already", first.gen, 2, "completed")
    assert await end(store, "s", "error", epoch=7) == Ended("already", first.gen, 2, "completed")
    assert [e.offset for e in await store.read_entries("s", first.gen, 1, 10)] == [1, 2]


async def test_end_of_a_missing_stream_is_not_found(store: Store) -> None:
    refused = await end(store, "nope")
    assert isinstance(refused, Refused) and refused.code == "not_found"
    assert await store.read_meta("nope") is None


async def test_end_by_a_fenced_producer_is_refused_and_an_operator_end_is_not(store: Store) -> None:
    first = await created(store, "s")
    await open_(store, "s")  # epoch 2
    refused = await end(store, "s", epoch=1)
    assert isinstance(refused, Refused) and (refused.code, refused.value) == ("fenced", 2)
    assert await end(store, "s", "cancelled") == Ended("ok", first.gen, 1, "cancelled")  # no epoch


async def test_end_with_stale_before_ends_only_a_stream_idle_since_before_then(store: Store) -> None:
    """The sweep's test: ``alive`` while the last activity is at or after ``stale_before``."""
    first = await created(store, "s", b"1")
    meta = await store.read_meta("s")
    assert meta is not None
    refused = await end(store, "s", "producer_lost", stale_before=meta.updated_ms)
    assert isinstance(refused, Refused) and refused.code == "alive"
    assert (await store.read_meta("s")).is_open  # type: ignore[union-attr]
    ok = await end(store, "s", "producer_lost", stale_before=meta.updated_ms + 1)
    assert ok == Ended("ok", first.gen, 2, "producer_lost")


# touch and the open index -------------------------------------------------------------------------


async def test_touch_records_activity_on_open_streams_and_indexes_them(store: Store) -> None:
    await created(store, "s")
    await created(store, "done")
    await end(store, "done")
    ended_meta = await store.read_meta("done")
    before = now_ms()
    await next_ms()
    store.touch(["s", "done"])
    await store.drain()
    meta = await store.read_meta("s")
    assert meta is not None and meta.updated_ms > before
    assert await store.read_meta("done") == ended_meta  # an ended stream is not revived
    assert "s" in await store.stale_open_streams(now_ms())
    assert "s" not in await store.stale_open_streams(before)
    store.touch([])  # nothing to do
    await store.drain()


async def test_the_open_index_orders_stale_streams_by_last_activity(store: Store) -> None:
    store.index(["b", "a"], 100)
    store.index(["c"], 200)
    store.index(["d"])  # now
    await store.drain()
    assert await store.stale_open_streams(150) == ["a", "b"]
    assert await store.stale_open_streams(200, limit=2) == ["a", "b"]
    assert await store.stale_open_streams(200) == ["a", "b", "c"]
    assert await store.stale_open_streams(99) == []
    store.index(["a"], 300)  # a score is replaced, not added
    store.unindex(["b", "missing"])
    await store.drain()
    assert await store.stale_open_streams(250) == ["c"]
    assert await store.open_count() == 3
    assert sorted(await scan_all(store.scan_open, "")) == ["a", "c", "d"]
    assert await scan_all(store.scan_open, "c") == ["c"]


# reads ----------------------------------------------------------------------------------------------


async def test_read_entries_is_bounded_by_offset_count_and_generation(store: Store) -> None:
    first = await created(store, "s", b"1", b"2", b"3", b"4")
    read = store.read_entries
    assert [e.offset for e in await read("s", first.gen, 2, 2)] == [2, 3]
    assert [e.offset for e in await read("s", first.gen, 0, 100)] == [1, 2, 3, 4]
    assert await read("s", first.gen, 5, 10) == []
    assert await read("s", first.gen - 1, 1, 10) == [] and await read("s", first.gen + 1, 1, 10) == []
    assert await read("nope", first.gen, 1, 10) == []


async def test_a_stream_created_again_is_a_new_generation_the_old_one_reads_nothing_of(store: Store) -> None:
    first = await created(store, "s", b"old")
    assert await store.delete_stream("s")
    await next_ms()
    second = await created(store, "s", b"new")
    assert second.gen > first.gen
    assert await store.read_entries("s", first.gen, 1, 10) == []
    assert await store.read_entries("s", second.gen, 1, 10) == [Entry(1, b"new")]


async def test_writes_are_answered_in_submission_order_after_the_call(store: Store) -> None:
    """One tick's writes: open, appends (pipelined before the open's answer), end, in order."""
    outcomes: list[Any] = []
    store.open("s", None, "json", None, outcomes.append)
    handle = store.append_handle("s", 1)
    for seq in (1, 2, 3):
        store.append(handle, seq, [b"%d" % seq], outcomes.append)
    store.end("s", "completed", "", outcomes.append, epoch=1)
    assert outcomes == []
    await store.drain()
    gen = outcomes[0].gen
    assert outcomes == [
        Opened("created", gen, 1, 0, 0, "open", "json"),
        Appended(gen, 1, 1, 1),
        Appended(gen, 2, 2, 2),
        Appended(gen, 3, 3, 3),
        Ended("ok", gen, 4, "completed"),
    ]


async def test_a_failing_callback_does_not_stop_the_others(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[Any] = []

    def boom(outcome: Any) -> None:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR):
        store.open("s", None, "json", None, boom)
        store.end("s", "completed", "", outcomes.append)
        await store.drain()
    assert [type(o) for o in outcomes] == [Ended]
    assert "write callback failed" in caplog.text


# the Catalog reads ----------------------------------------------------------------------------------


async def scan_all(scan: Callable[[int, str, int], Any], prefix: str) -> list[str]:
    found: list[str] = []
    cursor = 0
    while True:
        cursor, ids = await scan(cursor, prefix, 100)
        found += [i for i in ids if i not in found]
        if cursor == 0:
            return found


async def test_stream_heads_give_creation_time_and_openness(store: Store) -> None:
    a = await created(store, "a")
    b = await created(store, "b")
    await end(store, "b")
    assert await store.stream_heads(["a", "b", "nope"]) == [(a.gen, True), (b.gen, False), None]
    assert await store.stream_heads([]) == []


async def test_stream_stats_count_entries_memory_and_ttl(store: Store) -> None:
    await created(store, "a", b"1", b"2")
    await created(store, "b", b"1")
    await end(store, "b")
    a, b, missing = await store.stream_stats(["a", "b", "nope"])
    assert missing is None and a is not None and b is not None
    assert (a.meta.stream, a.entries, a.chunks) == ("a", 2, 2)
    assert (b.meta.status, b.entries, b.chunks) == ("completed", 2, 1)
    assert OPEN_TTL_S - 2 <= a.ttl_s <= OPEN_TTL_S and END_TTL_S - 2 <= b.ttl_s <= END_TTL_S
    assert a.memory_bytes is None or a.memory_bytes > 0
    assert a.meta == await store.read_meta("a")


async def test_log_edges_are_the_first_and_last_stored_offsets(store: Store) -> None:
    await created(store, "empty")
    await created(store, "s", b"1", b"2")
    assert await store.log_edges("empty") is None and await store.log_edges("nope") is None
    assert await store.log_edges("s") == (1, 2)
    await end(store, "s")
    assert await store.log_edges("s") == (1, 3)


async def test_scan_streams_finds_every_stream_by_id_prefix(store: Store) -> None:
    for stream in ("a/1", "a/2", "b/1"):
        await created(store, stream)
    await end(store, "a/2")
    assert sorted(await scan_all(store.scan_streams, "")) == ["a/1", "a/2", "b/1"]
    assert sorted(await scan_all(store.scan_streams, "a/")) == ["a/1", "a/2"]
    assert await scan_all(store.scan_streams, "c") == []


async def test_delete_removes_the_stream_its_log_and_its_index_entry(store: Store) -> None:
    first = await created(store, "s", b"1")
    store.index(["s"])
    await store.drain()
    assert await store.delete_stream("s")
    assert await store.read_meta("s") is None
    assert await store.read_entries("s", first.gen, 1, 10) == []
    assert await store.open_count() == 0 and await store.ttl_s("s") == -2
    assert not await store.delete_stream("s")


# MemoryStore only: expiry by its clock ---------------------------------------------------------------


async def test_memory_store_expires_streams_by_its_clock_as_redis_ttls_do() -> None:
    """Open streams live open_ttl_s from their last write or touch, ended ones ttl_after_end_s."""
    now = [1_000_000]
    store = MemoryStore(Config(streams=StreamsConfig(open_ttl_s=10, ttl_after_end_s=5)), clock=lambda: now[0])
    opened = await open_(store, "s")
    now[0] += 9_000
    store.touch(["s"])
    await store.drain()
    now[0] += 9_000
    assert await store.ttl_s("s") == 1 and await append(store, "s", 1, 1, b"1") == Appended(opened.gen, 1, 1, 1)
    await end(store, "s")
    now[0] += 4_999
    assert await store.log_edges("s") == (1, 2)
    now[0] += 1
    assert await store.read_meta("s") is None and await store.ttl_s("s") == -2
    assert await store.stream_stats(["s"]) == [None] and await scan_all(store.scan_streams, "") == []
    again = await open_(store, "s")
    assert again.code == "created" and again.gen == now[0] > opened.gen


async def test_append_for_a_deleted_and_recreated_stream_is_fenced(store: Store) -> None:
    """The stream deleted and created again starts at epoch 1 too: a producer of the old
    generation (same epoch number) must not write into the new one."""
    old = await created(store, "g", b'"a"')
    handle = store.append_handle("g", old.epoch, old.gen)
    assert await store.delete_stream("g")
    new = await open_(store, "g")
    while isinstance(new, Opened) and new.gen == old.gen:  # generations are creation times (ms)
        assert await store.delete_stream("g")
        new = await open_(store, "g")
    assert isinstance(new, Opened) and new.code == "created" and new.epoch == old.epoch
    stale = await answer(lambda done: store.append(handle, 2, [b'"from the old run"'], done))
    assert isinstance(stale, Refused) and stale.code == "fenced"
    fresh = await answer(lambda done: store.append(store.append_handle("g", new.epoch, new.gen), 1, [b'"b"'], done))
    assert isinstance(fresh, Appended) and fresh.first == 1


# A held handle: what the relay does (one handle per open, reused by every append) ----------------


class Holder:
    """A producer's hold on a stream as the relay keeps it: one handle for every append."""

    def __init__(self, store: Store, stream: str, opened: Opened) -> None:
        self.store, self.stream, self.handle = store, stream, store.append_handle(stream, opened.epoch, opened.gen)

    async def append(self, seq: int, *chunks: bytes) -> Any:
        return await answer(lambda done: self.store.append(self.handle, seq, list(chunks), done))


async def holding(store: Store, stream: str, epoch: int | None = None) -> Holder:
    opened = await open_(store, stream, epoch)
    assert isinstance(opened, Opened) and opened.code in ("created", "opened", "resumed")
    return Holder(store, stream, opened)


async def test_a_held_handle_appends_at_the_next_offsets_and_dedupes_resends(store: Store) -> None:
    """Appends through one handle land at consecutive offsets; a resend, a partial overlap and a
    gap are answered as for a fresh handle, and the handle goes on appending afterwards."""
    a = await holding(store, "h")
    gen = (await store.read_meta("h")).gen  # type: ignore[union-attr]
    for seq in range(1, 6):
        assert await a.append(seq, b"%d" % seq) == Appended(gen, seq, seq, seq)
    assert await a.append(3, b"3", b"4") == Appended(gen, 6, 4, 4)  # a resend: nothing stored
    assert await a.append(5, b"5", b"6", b"7") == Appended(gen, 6, 7, 7)  # overlap: 6 and 7 are new
    gap = await a.append(9, b"9")
    assert isinstance(gap, Refused) and (gap.code, gap.value) == ("seq_gap", 7)
    assert await a.append(8, b"8") == Appended(gen, 8, 8, 8)
    assert [e.data for e in await store.read_entries("h", gen, 1, 100)] == [b"%d" % i for i in range(1, 9)]
    meta = await store.read_meta("h")
    assert meta is not None and (meta.n, meta.seq) == (8, 8)


async def test_a_takeover_fences_the_held_handle_and_offsets_stay_consecutive(store: Store) -> None:
    """Once a new epoch took the stream over, the old holder's appends are fenced (with any seq);
    the new epoch's chunks follow at the next offsets, and reads across the takeover have no hole."""
    a = await holding(store, "t")
    for seq in (1, 2, 3):
        assert isinstance(await a.append(seq, b"a%d" % seq), Appended)
    b = await holding(store, "t")  # takes over: epoch 2
    for seq in (4, 1):
        late = await a.append(seq, b"late")
        assert isinstance(late, Refused) and (late.code, late.value) == ("fenced", 2)
    gen = (await store.read_meta("t")).gen  # type: ignore[union-attr]
    assert await b.append(1, b"b1") == Appended(gen, 4, 4, 1)
    assert await b.append(2, b"b2", b"b3") == Appended(gen, 5, 6, 3)
    c = await holding(store, "t")  # epoch 3, and again
    assert isinstance(await b.append(4, b"late"), Refused)
    assert await c.append(1, b"c1") == Appended(gen, 7, 7, 1)
    expected = [b"a1", b"a2", b"a3", b"b1", b"b2", b"b3", b"c1"]
    for first in range(1, 8):
        entries = await store.read_entries("t", gen, first, 100)
        assert [(e.offset, e.data) for e in entries] == list(enumerate(expected, 1))[first - 1 :]
    assert [e.offset for e in await store.read_entries("t", gen, 5, 1)] == [5]
    meta = await store.read_meta("t")
    assert meta is not None and (meta.epoch, meta.n, meta.seq) == (3, 7, 1)
    assert await end(store, "t", epoch=3) == Ended("ok", gen, 8, "completed")
    assert [e.offset for e in await store.read_entries("t", gen, 7, 100)] == [7, 8]


async def test_an_end_fences_the_held_handle(store: Store) -> None:
    """An operator's end (or the producer-lost sweep's) while the holder still appends: the
    holder's next append says how the stream ended and nothing lands after the end entry."""
    a = await holding(store, "e")
    assert isinstance(await a.append(1, b"1"), Appended)
    ended = await end(store, "e", "cancelled")
    assert isinstance(ended, Ended) and ended.offset == 2
    late = await a.append(2, b"2")
    assert isinstance(late, Refused) and (late.code, late.status) == ("ended", "cancelled")
    entries = await store.read_entries("e", ended.gen, 1, 100)
    assert [e.offset for e in entries] == [1, 2] and entries[-1].is_end


async def test_a_removed_stream_is_not_recreated_by_its_held_handle(store: Store) -> None:
    a = await holding(store, "r")
    assert isinstance(await a.append(1, b"1"), Appended)
    assert await store.delete_stream("r")
    gone = await a.append(2, b"2")
    assert isinstance(gone, Refused) and gone.code == "not_found"
    assert await store.read_meta("r") is None and await store.log_edges("r") is None
