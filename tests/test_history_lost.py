"""History lost is never silent: when Redis comes back with fewer entries than relayd delivered
(an older AOF or backup, a failover to a replica that lacked them), consumers get a ``reset``
with reason ``history_lost`` and then the stream as Redis holds it, never a silent skip."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from relayd.embedded import EmbeddedRedis
from tests.helpers import Peer, Relayd, make_config, poll_until


async def test_a_live_consumer_is_told_when_redis_comes_back_with_an_older_history(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """Chunks 1-5 stored; the AOF is copied; 6-10 stored and delivered; Redis restarts on the old
    copy. The live consumer (on offset 10) gets reset(history_lost), then 1-5 from Redis, then
    what the producer writes next — which lands at offsets it had already seen (6, 7...)."""
    config = make_config(private_redis.url, key_prefix, str(tmp_path), redis={"retry_ms": 20_000})
    aof = Path(private_redis.data_dir) / "appendonlydir"
    async with Relayd(config) as relayd:
        producer = await relayd.producer()
        await producer.open("h")
        for seq in range(1, 6):
            assert (await producer.append("h", seq, f"c{seq}"))["type"] == "ack"
        backup = tmp_path / "aof-backup"
        shutil.copytree(aof, backup)
        for seq in range(6, 11):
            assert (await producer.append("h", seq, f"c{seq}"))["type"] == "ack"
        consumer = await relayd.consumer("h")
        await consumer.expect("subscribed")
        seen = [(await consumer.expect("chunk"))["data"] for _ in range(10)]
        assert seen == [f"c{i}" for i in range(1, 11)]

        await asyncio.to_thread(private_redis.stop)
        shutil.rmtree(aof)
        shutil.copytree(backup, aof)
        await asyncio.to_thread(private_redis.start)
        # The producer's connection to relayd survived: it re-opens (a new epoch) and writes on.
        await poll_until(_writes_flow(producer), "relayd writes again after the restart", timeout=20)
        reset = await consumer.expect("reset")
        assert reset["reason"] == "history_lost"
        replay = [(await consumer.expect("chunk"))["data"] for _ in range(5)]
        assert replay == [f"c{i}" for i in range(1, 6)]
        await producer.append("h", 1, "after")
        await producer.end("h")
        after = await consumer.expect("chunk")
        assert after["data"] == "after" and after["cursor"].endswith("-0000000006")
        assert (await consumer.expect("end"))["reason"] == "completed"


def _writes_flow(producer: Peer) -> Callable[[], Awaitable[bool]]:
    async def reopened() -> bool:
        await producer.send({"op": "open", "stream": "h"})
        return bool((await producer.next()).get("type") == "opened")

    return reopened


async def test_a_resuming_consumer_with_a_cursor_past_the_stored_end_is_told(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """A cursor beyond the last stored offset (its entries were lost) gets reset(history_lost),
    then the stream from its start, including the end (before: the end, silently before its cursor)."""
    config = make_config(private_redis.url, key_prefix, str(tmp_path))
    async with Relayd(config) as relayd:
        producer = await relayd.producer()
        await producer.open("r")
        for seq in range(1, 4):
            await producer.append("r", seq, seq)
        await producer.end("r")
        meta = await relayd.relay.read_meta("r")
        stale = f"{meta.gen}-{meta.n + 5:010d}"  # a cursor from a history Redis no longer has
        consumer = await relayd.consumer("r", cursor=stale)
        await consumer.expect("subscribed")
        assert (await consumer.expect("reset"))["reason"] == "history_lost"
        assert [(await consumer.expect("chunk"))["data"] for _ in range(3)] == [1, 2, 3]
        assert (await consumer.expect("end"))["reason"] == "completed"
