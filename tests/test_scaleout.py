"""Several relayd instances on one Redis: any instance serves any stream, live, with the end.

Each test runs two or three in-process relayd servers on the session Valkey with one key prefix
(one deployment); producers and consumers sit on different instances. Everything is real: the
Lua scripts publish, each instance's broker subscribes through its own pub/sub connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis

from relayd.config import Config
from tests.helpers import Peer, Relayd, collect_chunks, poll_until


@asynccontextmanager
async def instances(config: Config, count: int) -> AsyncIterator[list[Relayd]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Relayd(config)) for _ in range(count)]


async def registered(server: Relayd, stream: str, **params: str) -> Peer:
    """A websocket consumer of ``stream`` on ``server``, subscribed and known to its hub (so its
    instance follows the stream from now on)."""
    consumer = await server.consumer(stream, **params)
    await consumer.expect("subscribed")
    await poll_until(lambda: server.relay.subscriber_count(stream) == 1, f"{stream} registered")
    return consumer


async def sse_events(server: Relayd, stream: str, **params: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of an SSE response until the stream's end event."""
    assert server.session is not None
    query = {"token": server.token(), **params}
    async with server.session.get(f"{server.url}/v1/streams/{stream}/events", params=query) as resp:
        assert resp.status == 200
        event, data = "", b""
        async for line in resp.content:
            line = line.rstrip(b"\r\n")
            if line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
            elif not line and event:
                yield event, orjson.loads(data)
                if event == "end":
                    return
                event, data = "", b""


async def test_a_consumer_on_another_instance_gets_the_live_tail_and_the_end(
    config_factory: Callable[..., Config],
) -> None:
    """Producer on A; a websocket consumer on B and an SSE consumer on C, both subscribed before
    the first chunk: every chunk once, in order, then the end (before: B got nothing live)."""
    async with instances(config_factory(), 3) as (a, b, c):
        producer = await a.producer()
        assert (await producer.open("x1"))["type"] == "opened"
        ws = await b.consumer("x1")
        await ws.expect("subscribed")

        async def read_sse() -> list[tuple[str, dict[str, Any]]]:
            return [item async for item in sse_events(c, "x1")]

        sse = asyncio.create_task(read_sse())
        await poll_until(
            lambda: c.relay.subscriber_count("x1") == 1 and b.relay.subscriber_count("x1") == 1, "the state"
        )
        for seq in range(1, 51):
            assert (await producer.append("x1", seq, {"n": seq}))["type"] == "ack"
        await producer.end("x1")
        chunks, end = await collect_chunks(ws, "x1")
        assert [f["data"]["n"] for f in chunks] == list(range(1, 51))
        assert end["reason"] == "completed"
        events = await asyncio.wait_for(sse, 10)
        assert [data["n"] for event, data in events if event == "chunk"] == list(range(1, 51))
        assert events[-1][0] == "end"


async def test_a_consumer_waiting_on_b_is_woken_when_a_creates_the_stream(
    config_factory: Callable[..., Config],
) -> None:
    """Waiting for a stream that does not exist yet works across instances (before: stream_not_found)."""
    async with instances(config_factory(), 2) as (a, b):
        consumer = await registered(b, "later", wait_ms="10000")
        producer = await a.producer()
        await producer.open("later")
        await producer.append("later", 1, "first")
        await producer.end("later")
        chunks, end = await collect_chunks(consumer, "later")
        assert [f["data"] for f in chunks] == ["first"] and end["reason"] == "completed"


async def test_a_late_joiner_on_another_instance_gets_history_then_live(
    config_factory: Callable[..., Config],
) -> None:
    async with instances(config_factory(), 2) as (a, b):
        producer = await a.producer()
        await producer.open("late")
        for seq in range(1, 11):
            await producer.append("late", seq, seq)
        consumer = await b.consumer("late")
        await consumer.expect("subscribed")
        history = [(await consumer.expect("chunk"))["data"] for _ in range(10)]
        for seq in range(11, 21):
            await producer.append("late", seq, seq)
        await producer.end("late")
        chunks, _ = await collect_chunks(consumer, "late")
        assert history + [f["data"] for f in chunks] == list(range(1, 21))


async def test_cancel_from_another_instance_reaches_the_producer(config_factory: Callable[..., Config]) -> None:
    """A consumer on B cancels; the producer on A gets a ``cancel`` frame, ends the stream, and
    every consumer sees ``cancelled`` (before: B ended it at once, the producer never knew)."""
    config = config_factory(streams={"cancel_grace_ms": 30_000})
    async with instances(config, 2) as (a, b):
        producer = await a.producer()
        await producer.open("stop-me")
        await producer.append("stop-me", 1, "a")
        assert b.session is not None
        token = b.token(["stop-me"], rights=("read", "cancel"))
        consumer = await b.consumer("stop-me", token=token)
        await consumer.expect("subscribed")
        await consumer.send({"op": "cancel", "stream": "stop-me"})
        request = await producer.next()
        assert request == {"type": "cancel", "stream": "stop-me"}
        assert (await producer.end("stop-me", "cancelled"))["type"] == "ended"
        chunks, end = await collect_chunks(consumer, "stop-me")
        assert [f["data"] for f in chunks] == ["a"] and end["reason"] == "cancelled"


async def test_a_dropped_pubsub_connection_loses_nothing(
    config_factory: Callable[..., Config], redis_server: str
) -> None:
    """CLIENT KILL TYPE pubsub mid-stream: B resubscribes and re-reads; its consumer gets every
    chunk once, in order, and the end."""
    async with instances(config_factory(), 2) as (a, b):
        producer = await a.producer()
        await producer.open("cut")
        consumer = await registered(b, "cut")
        for seq in range(1, 21):
            await producer.append("cut", seq, seq)
        resubscribes = b.relay.metrics._broker_resubscribes._value.get()
        admin = aioredis.Redis.from_url(redis_server)
        try:
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            # writes while B's pub/sub is down are only in Redis: the re-read after resubscribing finds them
            for seq in range(21, 41):
                await producer.append("cut", seq, seq)
            await poll_until(lambda: b.relay.metrics._broker_resubscribes._value.get() > resubscribes, "resubscribed")
        finally:
            await admin.aclose()
        for seq in range(41, 61):
            await producer.append("cut", seq, seq)
        await producer.end("cut")
        chunks, end = await collect_chunks(consumer, "cut")
        assert [f["data"] for f in chunks] == list(range(1, 61)) and end["reason"] == "completed"


async def test_metrics_and_readyz_show_the_broker(config_factory: Callable[..., Config]) -> None:
    async with instances(config_factory(), 2) as (a, b):
        producer = await a.producer()
        await producer.open("m")
        consumer = await registered(b, "m")
        await producer.append("m", 1, "x")
        await consumer.expect("chunk")
        assert b.session is not None
        async with b.session.get(f"{b.url}/readyz") as resp:
            assert resp.status == 200
        async with b.session.get(f"{b.url}/metrics") as resp:
            text = await resp.text()
        assert "relayd_broker_up 1.0" in text
        received = [line for line in text.splitlines() if line.startswith("relayd_broker_notifications_received_total")]
        assert received and float(received[0].split()[-1]) >= 1
        assert "relayd_broker_lag_seconds_count" in text


async def test_each_chunk_reaches_another_instance_live_before_the_next_is_sent(
    config_factory: Callable[..., Config],
) -> None:
    """Lockstep: the producer on A sends chunk k+1 only once the consumer on B has chunk k. Only
    the channel brings it (no end, no later append to reveal a hole): B must be among the
    stream's followers for A's append script to publish."""
    async with instances(config_factory(), 2) as (a, b):
        producer = await a.producer()
        await producer.open("lock")
        consumer = await b.consumer("lock")
        await consumer.expect("subscribed")
        for seq in range(1, 21):
            assert (await producer.append("lock", seq, {"n": seq}))["type"] == "ack"
            chunk = await consumer.expect("chunk", timeout=5)
            assert chunk["data"] == {"n": seq}


async def test_a_lone_instance_publishes_no_chunks_and_starts_when_another_follows(
    config_factory: Callable[..., Config], redis_server: str, key_prefix: str
) -> None:
    """With the producer and the consumers on one instance nobody else needs the chunks: the
    holder publishes none (Redis saves the publish, the instance its own echo). Once a second
    instance follows the stream, the holder learns it (it asks at most every PROBE_INTERVAL_S)
    and publishes again; the second instance's consumer gets every chunk once either way."""
    channel = f"{key_prefix}:{{solo}}:live"
    listener = aioredis.Redis.from_url(redis_server).pubsub()
    await listener.subscribe(channel)
    assert (await listener.get_message(timeout=5))["type"] == "subscribe"
    seen: list[bytes] = []
    published = asyncio.Event()

    async def listen() -> None:
        while not seen or seen[-1][:1] != b"e":
            message = await listener.get_message(timeout=5)
            if message is not None:
                seen.append(message["data"])
                if message["data"][:1] == b"a":
                    published.set()

    listening = asyncio.create_task(listen())
    async with instances(config_factory(), 2) as (a, b):
        producer = await a.producer()
        await producer.open("solo")
        local = await registered(a, "solo")
        for seq in range(1, 6):
            await producer.append("solo", seq, seq)
            await local.expect("chunk")
        remote = await registered(b, "solo")
        admin = aioredis.Redis.from_url(redis_server)
        await poll_until(
            lambda: admin.sismember(f"{key_prefix}:{{solo}}:fol", b.server.store.instance), "B among the followers"
        )
        await admin.aclose()
        seq = 5
        while not published.is_set():  # until the holder has asked again who follows
            seq += 1
            await producer.append("solo", seq, seq)
        await producer.end("solo")
        chunks, end = await collect_chunks(remote, "solo")
        assert [f["data"] for f in chunks] == list(range(1, seq + 1)) and end["reason"] == "completed"
    await asyncio.wait_for(listening, 10)
    # the creation, no chunk before B followed, then chunks, the end
    kinds = [m[:1] for m in seen]
    assert kinds[0] == b"c" and kinds[-1] == b"e" and set(kinds[1:-1]) == {b"a"}
    assert int(seen[1].split(b"|")[4]) > 5  # the first chunk published came after B followed
    await listener.aclose()


async def test_a_chunk_written_as_another_instance_starts_following_reaches_it_with_nothing_after(
    config_factory: Callable[..., Config],
) -> None:
    """The holder learns of a new follower only when it next asks (at most PROBE_INTERVAL_S), so
    a chunk written just after B followed may not be published; the stream then goes quiet. B's
    consumer still gets it: B reads the stream again FOLLOWER_REREAD_S after following."""
    async with instances(config_factory(), 2) as (a, b):
        producer = await a.producer()
        await producer.open("quiet")
        await producer.append("quiet", 1, 1)  # the hold's first append: it asked who follows now
        remote = await registered(b, "quiet")
        assert (await remote.expect("chunk"))["data"] == 1
        await producer.append("quiet", 2, 2)  # within the interval: B is not known to A yet
        frame = await remote.expect("chunk", timeout=5)
        assert frame["data"] == 2
