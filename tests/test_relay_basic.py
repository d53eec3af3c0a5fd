"""End-to-end basics: a producer's chunks reach a consumer in order, then the end."""

from __future__ import annotations

from tests.helpers import Relayd, collect_chunks


async def test_chunks_reach_a_live_consumer_in_order_then_the_end(relayd: Relayd) -> None:
    """A consumer subscribed before the producer opens gets every chunk once, in order."""
    consumer = await relayd.consumer("s1")
    await consumer.expect("subscribed", stream="s1")
    producer = await relayd.producer()
    opened = await producer.open("s1")
    assert opened["type"] == "opened" and opened["epoch"] == 1 and opened["seq"] == 0
    for i in range(1, 21):
        ack = await producer.append("s1", i, {"delta": f"t{i}"})
        assert ack["type"] == "ack" and ack["seq"] == i
    await producer.end("s1")
    chunks, end = await collect_chunks(consumer, "s1")
    assert [c["data"]["delta"] for c in chunks] == [f"t{i}" for i in range(1, 21)]
    assert end["reason"] == "completed"
    cursors = [c["cursor"] for c in chunks] + [end["cursor"]]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
