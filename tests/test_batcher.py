"""The write path through a Redis outage: retried in order, then refused clearly, never lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relayd.embedded import EmbeddedRedis
from tests.helpers import Relayd, collect_chunks, make_config


async def test_appends_during_a_short_outage_are_acked_once_redis_is_back(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """Writes caught by a Redis restart are resent in order after reconnecting (scripts reloaded)."""
    config = make_config(private_redis.url, key_prefix, str(tmp_path), redis={"retry_ms": 20_000})
    async with Relayd(config) as relayd:
        producer = await relayd.producer()
        await producer.open("s")
        for seq in range(1, 6):
            assert (await producer.append("s", seq, seq))["type"] == "ack"
        await asyncio.to_thread(private_redis.stop)
        await producer.send({"op": "append", "stream": "s", "seq": 6, "chunks": [6, 7]})
        await asyncio.to_thread(private_redis.start)  # same data dir: the AOF brings the stream back
        ack = await producer.next(timeout=20)
        assert ack == {"type": "ack", "stream": "s", "seq": 7, "cursor": ack["cursor"]}
        await producer.end("s")
        consumer = await relayd.consumer("s")
        chunks, end = await collect_chunks(consumer, "s")
        assert [c["data"] for c in chunks] == [1, 2, 3, 4, 5, 6, 7]
        assert end["reason"] == "completed"


async def test_a_long_outage_refuses_appends_with_store_unavailable_and_keeps_serving(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """Past redis.retry_ms an append is refused with store_unavailable; a resend later succeeds."""
    config = make_config(private_redis.url, key_prefix, str(tmp_path), redis={"retry_ms": 300, "timeout_ms": 500})
    async with Relayd(config) as relayd:
        producer = await relayd.producer()
        opened = await producer.open("s")
        assert (await producer.append("s", 1, "a"))["type"] == "ack"
        await asyncio.to_thread(private_redis.stop)
        error = await producer.append("s", 2, "b")
        assert error["type"] == "error" and error["code"] == "store_unavailable" and error["seq"] == 2
        health = await relayd.session.get(f"{relayd.url}/readyz")  # type: ignore[union-attr]
        assert health.status == 503
        await asyncio.to_thread(private_redis.start)
        again = await producer.append("s", 2, "b")  # the producer resends what was refused
        assert again["type"] == "ack" and again["seq"] == 2
        assert opened["epoch"] == 1
        await producer.end("s")
        consumer = await relayd.consumer("s")
        chunks, _ = await collect_chunks(consumer, "s")
        assert [c["data"] for c in chunks] == ["a", "b"]
