"""producer_lost counts from the disconnect, a producer back within the timeout always resumes,
the sweep keeps up with many abandoned streams, and appends that waited for their open are
checked against the stream's content type (issue 9 items 6, 7 and 26)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from relayd.config import Config
from tests.helpers import Relayd, poll_until

TIMEOUT_MS = 1500


async def _status(relayd: Relayd, stream: str) -> str | None:
    meta = await relayd.relay.read_meta(stream)
    return None if meta is None else str(meta.status)


async def test_producer_lost_counts_from_the_disconnect_not_the_last_refresh(
    config_factory: Callable[..., Config],
) -> None:
    """Before: the clock started at the last periodic refresh (up to a third of the timeout
    earlier), so streams were declared lost 1.04-1.37 s after the kill with a 1.5 s timeout."""
    async with Relayd(config_factory(streams={"producer_timeout_ms": TIMEOUT_MS})) as relayd:
        producer = await relayd.producer()
        await producer.open("gone")
        await producer.append("gone", 1, "a")
        await asyncio.sleep(TIMEOUT_MS / 1000 / 2)  # the producer is quiet for half the timeout
        await producer.ws.close()
        closed = time.monotonic()

        async def lost() -> bool:
            return await _status(relayd, "gone") == "producer_lost"

        await poll_until(lost, "producer_lost", timeout=10)
        assert time.monotonic() - closed >= TIMEOUT_MS / 1000


async def test_a_producer_back_at_90_percent_of_the_timeout_always_resumes(
    config_factory: Callable[..., Config],
) -> None:
    async with Relayd(config_factory(streams={"producer_timeout_ms": TIMEOUT_MS})) as relayd:
        for attempt in range(3):
            stream = f"back-{attempt}"
            producer = await relayd.producer()
            opened = await producer.open(stream)
            await producer.append(stream, 1, "a")
            await asyncio.sleep(TIMEOUT_MS / 1000 / 2)  # quiet: the last refresh is older than the disconnect
            await producer.ws.close()
            await asyncio.sleep(TIMEOUT_MS / 1000 * 0.9)  # the producer's own restart takes this long
            again = await relayd.producer()
            resumed = await again.open(stream, epoch=opened["epoch"])
            assert resumed["type"] == "opened" and resumed["status"] == "open", resumed
            assert (await again.append(stream, 2, "b"))["type"] == "ack"
            await again.end(stream)
            await again.ws.close()


async def test_the_sweep_keeps_up_with_many_abandoned_streams(config_factory: Callable[..., Config]) -> None:
    """Before: 500 streams per sweep cycle (10,000 abandoned streams took 44 s)."""
    count, timeout_s = 2500, 3.0  # the sweep runs every timeout/3: 1 s
    config = config_factory(
        streams={"producer_timeout_ms": int(timeout_s * 1000)}, limits={"max_streams_per_connection": 3000}
    )
    async with Relayd(config) as relayd:
        producer = await relayd.producer()
        await producer.send(*({"op": "open", "stream": f"ab-{i}"} for i in range(count)))
        for _ in range(count):
            assert (await producer.next())["type"] == "opened"
        await producer.ws.close()
        closed = time.monotonic()

        async def all_lost() -> bool:
            statuses = await asyncio.gather(*(_status(relayd, f"ab-{i}") for i in range(0, count, 37)))
            return all(s == "producer_lost" for s in statuses) and await relayd.relay.open_count() == 0

        await poll_until(all_lost, "every abandoned stream ended", timeout=20)
        # the timeout, one sweep period, and the work; 500 a cycle took 5 cycles (timeout + 5 s)
        assert time.monotonic() - closed < timeout_s + 3.0


async def test_appends_sent_before_a_text_streams_opened_are_checked_like_the_others(
    config_factory: Callable[..., Config],
) -> None:
    """open (text) and a non-string append in one message: refused content_type, as after opened;
    nothing unreadable is stored (before: it was stored and SSE readers got `internal`)."""
    async with Relayd(config_factory()) as relayd:
        producer = await relayd.producer()
        await producer.send(
            {"op": "open", "stream": "t1", "content_type": "text"},
            {"op": "append", "stream": "t1", "seq": 1, "chunks": [42]},
            {"op": "append", "stream": "t1", "seq": 1, "chunks": ["ok"]},
        )
        assert (await producer.next())["type"] == "opened"
        refused = await producer.next()
        assert (refused["type"], refused["code"], refused["seq"]) == ("error", "content_type", 1), refused
        assert (await producer.next())["type"] == "ack"
        await producer.end("t1")
        assert relayd.session is not None
        url = f"{relayd.url}/v1/streams/t1/events"
        async with relayd.session.get(url, params={"token": relayd.token()}) as resp:
            body = await resp.text()
        assert "data: ok" in body and "event: end" in body and "error" not in body, body
