"""Global bounds on the memory held for peers (relayd/budget.py): all connections together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from relayd.budget import Budget
from relayd.embedded import EmbeddedRedis
from relayd.protocol import CHUNK_OVERHEAD_BYTES
from tests.helpers import Peer, Relayd, collect_chunks, make_config, poll_until

# -- the accounting, without sockets --------------------------------------------------------------


async def test_a_spent_budget_opens_again_below_three_quarters() -> None:
    budget = Budget(1000)
    budget.charge(999)
    assert not budget.spent
    budget.charge(1)
    assert budget.spent and budget.peak == 1000
    waiter = asyncio.create_task(budget.wait())
    budget.release(200)  # 800: still above the low-water mark
    await asyncio.sleep(0)
    assert budget.spent and not waiter.done()
    budget.release(50)  # 750
    await asyncio.wait_for(waiter, 1)
    assert not budget.spent and budget.used == 750


# -- producers: every connection stops reading when all of them hold too much ---------------------


async def test_many_producers_are_held_to_the_global_backlog_and_lose_nothing(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """Redis stops answering; 4 producer connections keep sending. Each stays far below its own
    limits.max_unacked_bytes, but relayd admits no more than limits.max_producer_backlog_bytes of
    them all together (plus the one message each connection was reading), then everything is
    acknowledged and delivered once when Redis answers again."""
    limit = 8 * 1024
    config = make_config(
        private_redis.url,
        key_prefix,
        str(tmp_path),
        limits={"max_unacked_bytes": 1 << 20, "max_producer_backlog_bytes": limit},
        redis={"timeout_ms": 30_000, "retry_ms": 30_000},
    )
    pad = "x" * 200
    appends, connections = 60, 4
    admin = aioredis.from_url(private_redis.url)
    async with Relayd(config) as relayd:
        budget = relayd.relay.producer_budget
        producers: list[Peer] = []
        for i in range(connections):
            producer = await relayd.producer()
            await producer.open(f"s{i}")
            producers.append(producer)
        consumer = await relayd.consumer("s0")
        await consumer.expect("subscribed", stream="s0")
        await admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        try:
            for seq in range(1, appends + 1):
                for i, producer in enumerate(producers):
                    await producer.send({"op": "append", "stream": f"s{i}", "seq": seq, "chunk": {"pad": pad}})
            await poll_until(lambda: budget.spent, "the producers' global backlog is spent")
            # what every connection offered: 4 x 60 x ~700 bytes = 160 KiB, 20x the bound
            assert budget.used < limit + connections * (2 * 300 + CHUNK_OVERHEAD_BYTES)
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        for i, producer in enumerate(producers):
            acks = [(await producer.expect("ack", timeout=20))["seq"] for _ in range(appends)]
            assert acks == list(range(1, appends + 1)), i
            assert (await producer.end(f"s{i}"))["type"] == "ended"
        chunks, end = await collect_chunks(consumer, "s0")
        assert len(chunks) == appends and end["reason"] == "completed"
        assert len({c["cursor"] for c in chunks}) == appends
        assert budget.peak < limit + connections * (2 * 300 + CHUNK_OVERHEAD_BYTES)
        assert budget.used == 0
    await admin.aclose()


# -- consumers: past the global bound live chunks are read back from Redis ------------------------


async def test_consumers_past_the_global_backlog_read_from_redis_and_get_everything_once(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """A burst published in one tick to 3 consumers needs ~3 x 500 KiB of queues; with a 32 KiB
    global bound the surplus is not queued, the subscriptions read it back from Redis, and every
    consumer still gets every chunk once, in order."""
    limit = 32 * 1024
    config = make_config(
        private_redis.url,
        key_prefix,
        str(tmp_path),
        limits={"max_consumer_backlog_bytes": limit},
        consumer={"max_queue_bytes": 1 << 20},
    )
    total = 500
    async with Relayd(config) as relayd:
        budget = relayd.relay.consumer_budget
        producer = await relayd.producer()
        await producer.open("burst")
        consumers = [await relayd.consumer("burst") for _ in range(3)]
        for consumer in consumers:
            await consumer.expect("subscribed", stream="burst")
        ops = [
            {"op": "append", "stream": "burst", "seq": s, "chunk": {"i": s, "pad": "p" * 900}}
            for s in range(1, total + 1)
        ]
        await producer.send(*ops)
        for _ in range(total):
            await producer.expect("ack")
        await producer.end("burst")
        for consumer in consumers:
            chunks, end = await collect_chunks(consumer, "burst", timeout=30)
            assert [c["data"]["i"] for c in chunks] == list(range(1, total + 1))
            assert end["reason"] == "completed"
        assert budget.peak >= limit  # the bound was reached: the fallback ran
        assert budget.peak < limit + 3 * 16 * 1024 + 4096  # past it, one 16 KiB piece per connection
        await poll_until(lambda: budget.used == 0, "consumer queues drained")
