"""The plain-XADD write path (relayd/store/appends.py) on a real Valkey: what Redis runs per
append, how a fence reaches appends already encoded, and what a lost chunk is answered.

The outcomes themselves are the store contract's (tests/test_store_contract.py, "a held handle"),
run against both stores; these tests look at Redis.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from relayd.config import Config, RedisConfig, StreamsConfig
from relayd.embedded import EmbeddedRedis
from relayd.metrics import Metrics
from relayd.model import Appended, Opened, Refused
from relayd.store.appends import PROBE_INTERVAL_S
from relayd.store.redis_streams import RedisStore
from tests.helpers import poll_until


@pytest.fixture
async def stores(private_redis: EmbeddedRedis) -> AsyncIterator[tuple[RedisStore, RedisStore, aioredis.Redis]]:
    """Two instances' stores on one server (each its own write connection) and a raw client."""
    config = Config(redis=RedisConfig(key_prefix="p"), streams=StreamsConfig(max_chunks=1000))
    a = RedisStore(config, private_redis.url, Metrics(), instance="a")
    b = RedisStore(config, private_redis.url, Metrics(), instance="b")
    await a.start()
    await b.start()
    raw = aioredis.Redis.from_url(private_redis.url)
    try:
        yield a, b, raw
    finally:
        await raw.aclose()
        await a.close()
        await b.close()


async def answer(submit: Any) -> Any:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    submit(future.set_result)
    return await future


async def calls(raw: aioredis.Redis) -> dict[str, int]:
    stats = await raw.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_after_its_first_append_a_holder_writes_plain_xadds(
    stores: tuple[RedisStore, RedisStore, aioredis.Redis],
) -> None:
    """One script for the first append of a hold (it learns the log's lane and base), then one
    XADD per chunk and, at most every PROBE_INTERVAL_S, an SRANDMEMBER: no script, no meta write."""
    a, _, raw = stores
    opened = await answer(lambda done: a.open("s", None, "json", None, done))
    assert isinstance(opened, Opened)
    handle = a.append_handle("s", opened.epoch, opened.gen)
    await raw.config_resetstat()
    started = time.monotonic()
    for seq in range(1, 51):
        outcome = await answer(lambda done, seq=seq: a.append(handle, seq, [b"%d" % seq], done))
        assert outcome == Appended(opened.gen, seq, seq, seq)
    multi = await answer(lambda done: a.append(handle, 51, [b"51", b"52", b"53"], done))
    assert multi == Appended(opened.gen, 51, 53, 53)
    probes = 1 + int((time.monotonic() - started) / PROBE_INTERVAL_S)
    counted = await calls(raw)
    # the script's own XADD and HMGET (Redis counts commands run by scripts), then plain XADDs
    assert counted.get("evalsha") == 1 and counted.get("xadd") == 1 + 52
    assert counted.get("srandmember", 0) <= probes  # the script said who follows at the first one
    assert counted.get("hmget") == 1 and "hset" not in counted
    rows = await raw.xrange("p:{s}:log")
    assert [int(r[0].split(b"-")[1]) for r in rows] == list(range(1, 54)) and rows[-1][1] == {b"d": b"53"}


async def test_an_append_encoded_before_a_takeover_is_refused_by_redis_itself(
    stores: tuple[RedisStore, RedisStore, aioredis.Redis],
) -> None:
    """A's appends are queued (encoded as plain XADDs for its sure handle) while B's takeover
    runs on B's connection first: every one of them is below the log's new lane and refused, so
    the log holds nothing of A after the takeover, and A is told fenced."""
    a, b, raw = stores
    opened = await answer(lambda done: a.open("t", None, "json", None, done))
    handle = a.append_handle("t", opened.epoch, opened.gen)
    assert isinstance(await answer(lambda done: a.append(handle, 1, [b"1"], done)), Appended)
    # B takes over; then A, not knowing, appends 2..6 in one batch
    taken = await answer(lambda done: b.open("t", None, "json", None, done))
    assert isinstance(taken, Opened) and taken.epoch == 2
    await raw.config_resetstat()
    futures = []
    for seq in range(2, 7):
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        a.append(handle, seq, [b"late"], future.set_result)
        futures.append(future)
    outcomes = await asyncio.gather(*futures)
    assert all(isinstance(o, Refused) and o.code == "fenced" for o in outcomes), outcomes
    counted = await calls(raw)
    assert counted.get("xadd") == 5 and counted.get("evalsha") == 5  # each refused by Redis, then the script says why
    rows = await raw.xrange("p:{t}:log")
    assert [r[1] for r in rows] == [{b"d": b"1"}]
    b_handle = b.append_handle("t", taken.epoch, taken.gen)
    assert await answer(lambda done: b.append(b_handle, 1, [b"b1"], done)) == Appended(taken.gen, 2, 2, 1)


async def test_a_resent_chunk_that_redis_lost_is_not_acknowledged(
    stores: tuple[RedisStore, RedisStore, aioredis.Redis],
) -> None:
    """Chunk 3 vanished from the log while 4 and 5 are there (what an OOM between two writes of a
    batch could leave): its resend is not a duplicate to acknowledge but an error."""
    a, _, raw = stores
    opened = await answer(lambda done: a.open("l", None, "json", None, done))
    handle = a.append_handle("l", opened.epoch, opened.gen)
    for seq in range(1, 6):
        assert isinstance(await answer(lambda done, seq=seq: a.append(handle, seq, [b"x"], done)), Appended)
    assert await raw.xdel("p:{l}:log", f"{opened.gen}-3") == 1
    lost = await answer(lambda done: a.append(handle, 3, [b"x"], done))
    assert isinstance(lost, Refused) and lost.code == "store_unavailable" and "lost" in lost.message
    again = await answer(lambda done: a.append(handle, 4, [b"x"], done))
    assert again == Appended(opened.gen, 6, 4, 4)  # 4 and 5 are there: a duplicate
    assert await answer(lambda done: a.append(handle, 6, [b"x"], done)) == Appended(opened.gen, 6, 6, 6)


async def test_appends_caught_by_a_lost_connection_are_sent_again_as_their_script(private_redis: EmbeddedRedis) -> None:
    """XADDs on the wire when the connection is lost (writes paused past redis.timeout_ms: the
    writer drops the connection, and the server the unexecuted commands with it) go as the
    script for their chunk once it is made again: a server without an acknowledged write (here
    chunk 2, as after a failover to a replica that lacked it) answers seq_gap, and nothing is
    written past the hole; the producer resends and the log has no hole."""
    config = Config(redis=RedisConfig(key_prefix="p", timeout_ms=300, retry_ms=20_000))
    a = RedisStore(config, private_redis.url, Metrics(), instance="a")
    await a.start()
    raw = aioredis.Redis.from_url(private_redis.url)
    try:
        opened = await answer(lambda done: a.open("c", None, "json", None, done))
        handle = a.append_handle("c", opened.epoch, opened.gen)
        for seq in (1, 2):
            assert isinstance(await answer(lambda done, seq=seq: a.append(handle, seq, [b"%d" % seq], done)), Appended)
        await raw.delete("p:{c}:log")  # the server loses acknowledged chunk 2
        await raw.xadd("p:{c}:log", {"d": b"1"}, id=f"{opened.gen}-1")
        await raw.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")  # writes wait, unanswered
        try:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            a.append(handle, 3, [b"3"], future.set_result)  # a plain XADD, caught on the wire
            await poll_until(lambda: a._pipeline is not None and a._pipeline._recovery is not None, "the recovery")
        finally:
            await raw.execute_command("CLIENT", "UNPAUSE")
        gap = await future
        assert isinstance(gap, Refused) and (gap.code, gap.value) == ("seq_gap", 1)
        for seq in (2, 3):
            outcome = await answer(lambda done, seq=seq: a.append(handle, seq, [b"%d" % seq], done))
            assert outcome == Appended(opened.gen, seq, seq, seq)
        rows = await raw.xrange("p:{c}:log")
        assert [(r[0], r[1][b"d"]) for r in rows] == [(f"{opened.gen}-{i}".encode(), b"%d" % i) for i in (1, 2, 3)]
    finally:
        await raw.aclose()
        await a.close()


async def test_a_holder_kept_busy_turns_to_plain_xadds_after_its_first_answer(
    stores: tuple[RedisStore, RedisStore, aioredis.Redis],
) -> None:
    """A producer that always has appends on the wire (a loaded relayd): the first script's ok is
    enough for the appends submitted after it to be plain XADDs, though scripts are still on the
    wire then (they carry the next seqs: nothing broke the chain)."""
    a, _, raw = stores
    opened = await answer(lambda done: a.open("busy", None, "json", None, done))
    handle = a.append_handle("busy", opened.epoch, opened.gen)
    await raw.config_resetstat()
    waves: list[list[asyncio.Future[Any]]] = []
    seq = 0
    for _ in range(20):
        wave = []
        for _ in range(5):
            seq += 1
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            a.append(handle, seq, [b"%d" % seq], future.set_result)
            wave.append(future)
        await asyncio.sleep(0)  # (a yield: the pipeline sends this wave as a batch of its own)
        if waves:
            await waves[-1][-1]  # the previous wave answered; this one is still on the wire
        waves.append(wave)
    outcomes = [await f for wave in waves for f in wave]
    assert outcomes == [Appended(opened.gen, i, i, i) for i in range(1, 101)]
    assert (await calls(raw)).get("evalsha", 0) <= 10  # the first two waves at most


async def test_an_answered_append_leaves_nothing_for_the_cyclic_gc(
    stores: tuple[RedisStore, RedisStore, aioredis.Redis],
) -> None:
    """Every object of an append is freed when it is answered, by reference counting: one kept
    alive by a reference cycle waits for the cyclic GC's rare full collections, and at tens of
    thousands of appends a second that held hundreds of MiB (peak RSS at S=1000)."""
    a, _, _ = stores
    opened = await answer(lambda done: a.open("gc", None, "json", None, done))
    handle = a.append_handle("gc", opened.epoch, opened.gen)
    assert isinstance(await answer(lambda done: a.append(handle, 1, [b"1"], done)), Appended)
    gc.collect()
    gc.disable()
    try:
        seq = 2
        for i in range(200):  # one chunk, two chunks (a _Chunk write reporting to the _Plain), ...
            chunks = [b"%d" % seq] if i % 2 else [b"%d" % seq, b"%d" % (seq + 1)]
            outcome = await answer(lambda done, seq=seq, chunks=chunks: a.append(handle, seq, chunks, done))
            assert outcome == Appended(opened.gen, seq, seq + len(chunks) - 1, seq + len(chunks) - 1)
            seq += len(chunks)
        left = {type(o).__name__ for o in gc.get_objects() if type(o).__module__ == "relayd.store.appends"}
        assert left == {"AppendHandle", "Appender"}, left  # the stores' own, no append's objects
    finally:
        gc.enable()
