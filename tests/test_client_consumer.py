"""The Python consumer SDK (``relayd.client.consume``) against a real relayd and Valkey.

The producer side is a raw protocol peer (tests/helpers.py), so these tests depend on nothing
but the wire protocol and the consumer under test.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from relayd.auth import TokenAuthority
from relayd.client import Consumer, End, consume
from relayd.client.errors import (
    ConnectionFailed,
    Forbidden,
    ProducerLost,
    StreamCancelled,
    StreamErrored,
    StreamFailed,
    StreamGap,
    StreamNotFound,
    StreamReset,
    Unauthorized,
)
from relayd.client.retry import Retry
from relayd.client.token_keeper import token_allows, token_expiry
from relayd.config import Config
from relayd.embedded import EmbeddedRedis, free_port
from relayd.store.keys import Keys
from tests.helpers import JWT_SECRET, Peer, Relayd, make_config

ConfigFactory = Callable[..., Config]
FAST: dict[str, Any] = {"backoff_initial_s": 0.02, "backoff_max_s": 0.2}


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
async def rds(redis_server: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_server)
    try:
        yield client
    finally:
        await client.aclose()


async def append(producer: Peer, stream: str, first: int, last: int, per_op: int = 1) -> list[str]:
    """Append chunks ``{"i": first}`` .. ``{"i": last}``; the acknowledged cursors, one per chunk op."""
    cursors: list[str] = []
    for seq in range(first, last + 1, per_op):
        chunks = [{"i": i} for i in range(seq, min(seq + per_op, last + 1))]
        ack = await producer.append(stream, seq, *chunks)
        assert ack["type"] == "ack", ack
        cursors.append(ack["cursor"])
    return cursors


async def take(consumer: Consumer, n: int) -> list[Any]:
    return [await anext(consumer) for _ in range(n)]


async def rest(consumer: Consumer) -> list[Any]:
    return [item async for item in consumer]


async def read_into(consumer: Consumer, into: list[Any]) -> None:
    """Iterate to the end; what was read stays in ``into`` when the iteration raises."""
    async for item in consumer:
        into.append(item)  # noqa: PERF401 - a comprehension would lose the chunks read before a raise


def ids(items: list[Any]) -> list[int]:
    return [item["i"] for item in items]


async def metric(server: Relayd, name: str, **labels: str) -> float:
    """One sample of ``GET /metrics`` (0 when absent)."""
    assert server.session is not None
    async with server.session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(head + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- reading ------------------------------------------------------------------------------------


async def test_reads_live_then_from_history_and_resumes_after_a_cursor(relayd: Relayd) -> None:
    """A consumer gets every chunk live, a late one the same from history, a resumed one exactly the rest."""
    stream = "read-1"
    token = relayd.token([stream])
    async with await relayd.producer() as producer, consume(relayd.url, stream, token=token) as live:
        await producer.open(stream)
        await append(producer, stream, 1, 5)
        assert ids(await take(live, 5)) == [1, 2, 3, 4, 5]
        cursors = {5: live.cursor}
        await append(producer, stream, 6, 10, per_op=2)
        ended = await producer.end(stream)
        assert ids(await rest(live)) == [6, 7, 8, 9, 10]
        assert live.end == End("completed", None, ended["cursor"])

    history = consume(relayd.url, stream, token=token)
    seen = [(item["i"], history.cursor or "") async for item in history]
    assert [i for i, _ in seen] == list(range(1, 11))
    assert seen[4][1] == cursors[5]
    assert [c for _, c in seen] == sorted({c for _, c in seen}), "cursors increase, none repeats"
    assert history.end is not None and history.end.cursor == ended["cursor"]

    resumed = consume(relayd.url, stream, token=token, cursor=seen[6][1], decoder=lambda data: data["i"] * 10)
    assert await rest(resumed) == [80, 90, 100]
    assert resumed.cursor == seen[9][1]

    at_end = consume(relayd.url, stream, token=token, cursor=ended["cursor"])
    assert await rest(at_end) == []
    assert at_end.end == live.end


async def test_resumes_mid_stream_across_a_relayd_restart(config_factory: ConfigFactory) -> None:
    """relayd restarts on the same port mid-stream: the consumer resumes, every chunk once and in order."""
    stream = "restart-1"
    first = Relayd(config_factory())
    await first.__aenter__()
    try:
        port = first.server.port
        token = first.token([stream])
        producer = await first.producer()
        epoch = (await producer.open(stream))["epoch"]
        await append(producer, stream, 1, 30, per_op=3)
        consumer = consume(first.url, stream, token=token, max_retries=50, **FAST)
        got = await take(consumer, 10)  # the other 20 are in flight or buffered when relayd goes
    finally:
        await first.__aexit__(None, None, None)

    async with Relayd(config_factory(server={"port": port})) as second:
        producer = await second.producer()
        opened = await producer.open(stream, epoch=epoch)
        assert opened["seq"] == 30
        await append(producer, stream, 31, 60, per_op=4)
        await producer.end(stream)
        got += await rest(consumer)
        await producer.ws.close()
    assert ids(got) == list(range(1, 61))
    assert consumer.end is not None and consumer.end.reason == "completed"


class LogWatch(logging.Handler):
    """Sets ``event`` when the consumer logs a message containing ``needle``."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.INFO)
        self.needle = needle
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


async def test_drain_1012_then_resume_on_the_restarted_relayd(
    config_factory: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer waiting on the live tail is drained with 1012, retries while relayd is down, then resumes."""
    caplog.set_level(logging.INFO, logger="relayd.client.consumer")
    refused = LogWatch("connection attempt")
    logging.getLogger("relayd.client.consumer").addHandler(refused)
    stream = "drain-1"
    first = Relayd(config_factory())
    await first.__aenter__()
    port = first.server.port
    token = first.token([stream])
    consumer = consume(first.url, stream, token=token, max_retries=50, **FAST)
    try:
        producer = await first.producer()
        epoch = (await producer.open(stream))["epoch"]
        await append(producer, stream, 1, 5)
        got = await take(consumer, 5)
        reader = asyncio.create_task(rest(consumer))  # blocked on the live tail when the drain comes
    finally:
        await first.__aexit__(None, None, None)
    # relayd is down: the reader's reconnects are refused until the new instance is up
    await asyncio.wait_for(refused.event.wait(), 10)
    logging.getLogger("relayd.client.consumer").removeHandler(refused)
    async with Relayd(config_factory(server={"port": port})) as second:
        producer = await second.producer()
        assert (await producer.open(stream, epoch=epoch))["seq"] == 5
        await append(producer, stream, 6, 8)
        await producer.end(stream)
        got += await asyncio.wait_for(reader, 30)
        await producer.ws.close()
    assert ids(got) == list(range(1, 9))
    assert "relayd closed the connection (code 1012" in caplog.text


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket whose kernel receive buffer stays tiny, so a caller that stops iterating
    really stops the connection (loopback buffers can otherwise grow to tens of MiB)."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def kernel_send_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


async def test_caller_that_stops_iterating_is_closed_4008_then_resumes_exactly(
    config_factory: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer reads nothing ahead of its caller: relayd sees it stall and closes 4008; iterating
    again drains what was received, reconnects and reads the rest, every chunk once."""
    caplog.set_level(logging.INFO, logger="relayd.client.consumer")
    stream = "slow-1"
    pad = "x" * 10_000
    total = (2 * kernel_send_buffer_max() + 4 * 1024 * 1024) // len(pad)  # more than the kernel buffers hold
    config = config_factory(consumer={"send_timeout_ms": 300, "max_queue_bytes": 64 * 1024})
    async with (
        Relayd(config) as server,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)) as session,
        consume(server.url, stream, token=server.token([stream]), session=session, **FAST) as consumer,
        await server.producer() as producer,
    ):
        assert server.server.runtime is not None
        metrics = server.server.runtime.metrics
        closed_slow = asyncio.Event()
        count_slow = metrics.slow_consumer

        def slow_consumer() -> None:  # relayd's own hook: the moment it gives up on a connection
            count_slow()
            closed_slow.set()

        metrics.slow_consumer = slow_consumer  # type: ignore[method-assign]
        await producer.open(stream)
        for seq in range(1, total + 1, 8):
            last = min(seq + 7, total)
            chunks = [{"i": i, "pad": pad} for i in range(seq, last + 1)]
            await producer.send({"op": "append", "stream": stream, "seq": seq, "chunks": chunks})
            assert (await producer.next())["seq"] == last
        await producer.end(stream)
        await asyncio.wait_for(closed_slow.wait(), 30)
        got = await rest(consumer)
    assert ids(got) == list(range(1, total + 1))
    # the close frame usually gets through once the caller drains; an aborted transport is a drop too
    assert "relayd closed the connection (code" in caplog.text


async def test_without_reconnect_a_drop_raises_connection_failed(relayd: Relayd) -> None:
    """reconnect=False: relayd's drain (1012) raises ConnectionFailed instead of resuming."""
    stream = "once-1"
    consumer = consume(relayd.url, stream, token=relayd.token([stream]), reconnect=False)
    async with await relayd.producer() as producer:
        await producer.open(stream)
        await append(producer, stream, 1, 1)
        assert ids(await take(consumer, 1)) == [1]
        reader = asyncio.create_task(anext(consumer))
        await relayd.server.stop()
        with pytest.raises(ConnectionFailed, match="1012"):
            await reader


async def test_gives_up_after_max_retries_with_connection_failed() -> None:
    """With nothing listening, the consumer retries max_retries times, then raises ConnectionFailed."""
    consumer = consume(f"http://127.0.0.1:{free_port()}", "nobody", token="x.y.z", max_retries=2, **FAST)
    with pytest.raises(ConnectionFailed) as caught:
        await anext(consumer)
    assert caught.value.attempts == 3
    assert isinstance(caught.value.__cause__, OSError)
    await consumer.aclose()


async def test_a_redis_outage_backs_off_and_gives_up_after_max_retries(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """relayd answers ``subscribed``, then store_unavailable, while Redis is down: that is no
    success, so the retries back off and stop at max_retries (they used to go on for ever)."""
    config = make_config(private_redis.url, key_prefix, str(tmp_path), redis={"retry_ms": 100, "timeout_ms": 300})
    async with Relayd(config) as relayd:
        async with await relayd.producer() as producer:
            await producer.open("outage-c")
            await append(producer, "outage-c", 1, 2)
        await asyncio.to_thread(private_redis.stop)
        consumer = consume(relayd.url, "outage-c", token=relayd.token(["outage-c"]), max_retries=3, **FAST)
        with pytest.raises(ConnectionFailed) as caught:
            async with asyncio.timeout(30):
                await rest(consumer)
        assert caught.value.attempts == 4
        await consumer.aclose()


async def test_stream_ids_with_slashes_and_a_prefix_token(relayd: Relayd) -> None:
    """An id like ``user-7/chat-1`` travels as one path segment; a ``user-7/*`` token covers it."""
    stream = "user-7/chat-1@v=2"
    async with await relayd.producer() as producer:
        await producer.open(stream)
        await append(producer, stream, 1, 3)
        await producer.end(stream)
    assert ids(await rest(consume(relayd.url, stream, token=relayd.token(["user-7/*"])))) == [1, 2, 3]


# --- tokens -------------------------------------------------------------------------------------


async def test_token_is_refreshed_on_the_open_connection_before_it_expires(relayd: Relayd) -> None:
    """fetch_token supplies short tokens; each is replaced before its exp with no 4002 and no reconnect.

    ttl 6 s (exp is whole seconds: 5-6 s left) puts the refresh ~2 s before the exp, ample on a
    loaded machine; the test waits for a fetch made after the first token's exp, about 7 s in.
    """
    stream = "refresh-1"
    calls: list[float] = []
    first_exp: list[float] = []
    past_first_expiry = asyncio.Event()

    def fetch_token() -> str:
        calls.append(time.time())
        if first_exp and time.time() > first_exp[0] + 0.2:
            past_first_expiry.set()
        token, expires_at = relayd.tokens.mint([stream], ["read"], ttl_s=6)
        first_exp.append(expires_at)
        return token

    async with await relayd.producer() as producer, consume(relayd.url, stream, fetch_token=fetch_token) as c:
        assert len(calls) == 1  # at connect
        await producer.open(stream)
        await append(producer, stream, 1, 3)
        got = await take(c, 3)
        await asyncio.wait_for(past_first_expiry.wait(), 30)  # the first token has expired by now
        await append(producer, stream, 4, 6)
        await producer.end(stream)
        got += await rest(c)
    assert ids(got) == [1, 2, 3, 4, 5, 6]
    assert len(calls) >= 3
    assert await metric(relayd, "relayd_auth_failures_total", reason="token_expired") == 0
    assert await metric(relayd, "relayd_connections_opened_total", role="consumer_ws") == 1


async def test_a_cached_token_is_not_refetched_in_a_loop_before_its_exp(relayd: Relayd) -> None:
    """fetch_token returns its cached token until it has expired: the refresh gets nothing newer
    and stops (no fetch loop); relayd closes 4002 at the exp and the reconnect fetches a new one."""
    stream = "refresh-cached"
    fetches = 0
    cached: list[tuple[str, float]] = []
    renewed = asyncio.Event()

    def fetch_token() -> str:
        nonlocal fetches
        fetches += 1
        if not cached or time.time() >= cached[-1][1]:
            if cached:
                renewed.set()
            cached.append(relayd.tokens.mint([stream], ["read"], ttl_s=3))
        return cached[-1][0]

    async with await relayd.producer() as producer, consume(relayd.url, stream, fetch_token=fetch_token, **FAST) as c:
        await producer.open(stream)
        await append(producer, stream, 1, 2)
        got = await take(c, 2)
        reader = asyncio.create_task(rest(c))  # reading, so the 4002 at the exp is seen
        await asyncio.wait_for(renewed.wait(), 15)
        await append(producer, stream, 3, 4)
        await producer.end(stream)
        got += await reader
    assert ids(got) == [1, 2, 3, 4]
    assert len(cached) == 2 and fetches <= 4, fetches  # connect, one refresh, the reconnect (+1 slack)
    assert await metric(relayd, "relayd_auth_failures_total", reason="token_expired") >= 1


async def test_token_refused_with_4002_is_replaced_through_fetch_token(relayd: Relayd) -> None:
    """relayd closes 4002 on an expired token: an async fetch_token is asked again and the stream read."""
    stream = "refresh-2"
    expired, _ = relayd.tokens.mint([stream], ["read"], ttl_s=5, now=time.time() - 60)
    handed: list[str] = []

    async def fetch_token() -> str:
        handed.append(expired if not handed else relayd.token([stream]))
        return handed[-1]

    async with await relayd.producer() as producer:
        await producer.open(stream)
        await append(producer, stream, 1, 4)
        await producer.end(stream)
    got = await rest(consume(relayd.url, stream, fetch_token=fetch_token, **FAST))
    assert ids(got) == [1, 2, 3, 4]
    assert len(handed) == 2
    assert await metric(relayd, "relayd_auth_failures_total", reason="token_expired") == 1


async def test_refused_tokens_raise_unauthorized(relayd: Relayd) -> None:
    """Without fetch_token a refused token raises at once; a fetch_token whose tokens are refused too raises."""
    stream = "refresh-3"
    expired, _ = relayd.tokens.mint([stream], ["read"], ttl_s=5, now=time.time() - 60)
    with pytest.raises(Unauthorized) as caught:
        await anext(consume(relayd.url, stream, token=expired))
    assert caught.value.code == "token_expired"

    calls = 0

    def bad_tokens() -> str:
        nonlocal calls
        calls += 1
        return "not.a.jwt"

    with pytest.raises(Unauthorized) as caught:
        await anext(consume(relayd.url, stream, token=expired, fetch_token=bad_tokens, **FAST))
    assert caught.value.code == "unauthorized"
    assert calls == 1


# --- ends ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "message", "raised"),
    [
        ("completed", None, None),
        ("error", "model timed out", StreamErrored),
        ("cancelled", None, StreamCancelled),
    ],
)
async def test_end_reasons(relayd: Relayd, reason: str, message: str | None, raised: type[StreamFailed] | None) -> None:
    """completed ends the iteration; error/cancelled raise after the last chunk, or just end with raise_on_end=False."""
    stream = f"end-{reason}"
    token = relayd.token([stream])
    async with await relayd.producer() as producer:
        await producer.open(stream)
        await append(producer, stream, 1, 3)
        ended = await producer.end(stream, reason, **({"message": message} if message else {}))
    expected = End(reason, message, ended["cursor"])

    consumer = consume(relayd.url, stream, token=token)
    got: list[Any] = []
    if raised is None:
        got = await rest(consumer)
    else:
        with pytest.raises(raised) as caught:
            await read_into(consumer, got)
        assert (caught.value.reason, caught.value.cursor) == (reason, ended["cursor"])
        assert caught.value.message == (message or "")
    assert ids(got) == [1, 2, 3]
    assert consumer.end == expected

    quiet = consume(relayd.url, stream, token=token, raise_on_end=False)
    assert ids(await rest(quiet)) == [1, 2, 3]
    assert quiet.end == expected


async def test_producer_lost_raises_after_the_last_chunk(config_factory: ConfigFactory) -> None:
    """A producer that vanishes ends the stream producer_lost: ProducerLost after its chunks."""
    stream = "lost-1"
    async with Relayd(config_factory(streams={"producer_timeout_ms": 200})) as server:
        consumer = consume(server.url, stream, token=server.token([stream]))
        async with await server.producer() as producer:
            await producer.open(stream)
            await append(producer, stream, 1, 2)
        got: list[Any] = []
        with pytest.raises(ProducerLost):
            await read_into(consumer, got)
        assert ids(got) == [1, 2]
        assert consumer.end is not None and consumer.end.reason == "producer_lost"


# --- explicit loss and refusals -----------------------------------------------------------------


async def test_trimmed_history_raises_stream_gap_then_goes_on(config_factory: ConfigFactory) -> None:
    """History trimmed by max_chunks: StreamGap(cursor, next), and iterating again continues from next."""
    stream = "gap-1"
    async with Relayd(config_factory(streams={"max_chunks": 10})) as server:
        token = server.token([stream])
        async with await server.producer() as producer:
            await producer.open(stream)
            cursors = await append(producer, stream, 1, 1000, per_op=10)
            await producer.end(stream)

        consumer = consume(server.url, stream, token=token, cursor=cursors[0])  # after chunk 10
        with pytest.raises(StreamGap) as caught:
            await anext(consumer)
        assert caught.value.cursor == cursors[0] and caught.value.next > cursors[0]
        assert consumer.cursor == cursors[0]
        tail = await rest(consumer)
        assert ids(tail) == list(range(ids(tail)[0], 1001)) and ids(tail)[0] > 11
        assert consumer.end is not None and consumer.end.reason == "completed"


async def test_replaced_stream_raises_stream_reset_then_reads_the_new_generation(
    relayd: Relayd, key_prefix: str, rds: Any
) -> None:
    """An old generation's cursor raises StreamReset; iterating again reads the new generation."""
    stream = "reset-1"
    keys = Keys(key_prefix)
    async with await relayd.producer() as producer:
        await producer.open(stream)
        old = await append(producer, stream, 1, 5)
        assert await rds.delete(keys.log(stream), keys.meta(stream)) == 2  # lost (expired, flushed)
        await producer.open(stream)
        await append(producer, stream, 1, 2)
        await producer.end(stream)

    consumer = consume(relayd.url, stream, token=relayd.token([stream]), cursor=old[2])
    with pytest.raises(StreamReset) as caught:
        await anext(consumer)
    assert caught.value.reason == "stream_replaced"
    assert consumer.cursor is None
    assert ids(await rest(consumer)) == [1, 2]
    assert consumer.end is not None and consumer.end.reason == "completed"


async def test_missing_stream_raises_stream_not_found(relayd: Relayd) -> None:
    """No producer opens the stream within wait_ms: StreamNotFound."""
    consumer = consume(relayd.url, "never-1", token=relayd.token(["never-1"]), wait_ms=100)
    with pytest.raises(StreamNotFound):
        await anext(consumer)
    with pytest.raises(StopAsyncIteration):
        await anext(consumer)


async def test_token_for_another_stream_raises_forbidden(relayd: Relayd) -> None:
    """A token that does not cover the stream: Forbidden (close 4003), not a retry loop."""
    consumer = consume(relayd.url, "mine-1", token=relayd.token(["yours-1"]), **FAST)
    with pytest.raises(Forbidden):
        await anext(consumer)


# --- cancel -------------------------------------------------------------------------------------


async def test_cancel_reaches_the_producer_and_ends_cancelled(relayd: Relayd) -> None:
    """cancel() from another task reaches the producer as a cancel frame; the reader then gets StreamCancelled."""
    stream = "cancel-1"
    token = relayd.token([stream], rights=("read", "cancel"))
    async with await relayd.producer() as producer, consume(relayd.url, stream, token=token) as consumer:
        await producer.open(stream)
        await append(producer, stream, 1, 2)
        got: list[Any] = []
        reader = asyncio.create_task(read_into(consumer, got))  # a UI loop; the test is the Stop button
        await consumer.cancel()
        await producer.expect("cancel", stream=stream)
        await append(producer, stream, 3, 3)  # the last chunk the producer had in flight
        ended = await producer.end(stream, "cancelled")
        with pytest.raises(StreamCancelled):
            await reader
        assert ids(got) == [1, 2, 3]
        assert consumer.cursor is not None and consumer.cursor < ended["cursor"]
        assert consumer.end == End("cancelled", None, ended["cursor"])
        await consumer.cancel()  # after the end: nothing to do


async def test_cancel_before_connecting_is_sent_on_connect(relayd: Relayd) -> None:
    """cancel() before the first iteration is sent as soon as the consumer connects."""
    stream = "cancel-3"
    async with await relayd.producer() as producer:
        await producer.open(stream)
        await append(producer, stream, 1, 1)
        consumer = consume(relayd.url, stream, token=relayd.token([stream], rights=("read", "cancel")))
        await consumer.cancel()
        reader = asyncio.create_task(rest(consumer))
        await producer.expect("cancel", stream=stream)
        await producer.end(stream, "cancelled")
        with pytest.raises(StreamCancelled):
            await reader
        assert consumer.end is not None and consumer.end.reason == "cancelled"


async def test_cancel_without_the_right_is_forbidden(relayd: Relayd) -> None:
    """A read-only token cannot cancel: Forbidden at once, the stream goes on."""
    stream = "cancel-2"
    async with await relayd.producer() as producer, consume(relayd.url, stream, token=relayd.token([stream])) as c:
        await producer.open(stream)
        await append(producer, stream, 1, 1)
        with pytest.raises(Forbidden):
            await c.cancel()
        await append(producer, stream, 2, 2)
        await producer.end(stream)
        assert ids(await rest(c)) == [1, 2]


# --- policy pieces, without a server --------------------------------------------------------------


async def test_retry_backs_off_exponentially_with_jitter_and_gives_up() -> None:
    """Delays double from initial_s up to max_s, each drawn in [half, all]; past max_retries, ConnectionFailed."""
    retry = Retry(0.1, 0.5, max_retries=4)
    assert retry.delay() == 0.0
    for expected in (0.1, 0.2, 0.4, 0.5, 0.5):
        retry.failed(OSError("refused"))
        assert expected / 2 <= retry.delay() <= expected
    with pytest.raises(ConnectionFailed) as caught:
        await retry.wait("stream s")
    assert caught.value.attempts == 5 and isinstance(caught.value.__cause__, OSError)
    retry.succeeded()
    await retry.wait("stream s")  # no failure: returns at once
    with pytest.raises(ValueError):
        Retry(0.0, 1.0, None)


async def test_retry_with_a_deadline_gives_up_once_the_run_of_failures_is_that_old() -> None:
    """The producer's bound: time since the run's first failure, never a zero-length sleep."""
    retry = Retry(0.01, 0.02, None, deadline_s=60.0)
    retry.failed(OSError("dropped"))
    assert 59 < retry.remaining() <= 60
    await retry.wait("ingest")  # within the deadline: a backoff sleep
    retry.first_failure_at -= 61  # the outage began over a minute ago
    with pytest.raises(ConnectionFailed) as caught:
        await retry.wait("ingest")
    assert caught.value.attempts == 1 and isinstance(caught.value.__cause__, OSError)
    retry.succeeded()  # progress ends the outage
    assert retry.remaining() == float("inf")
    await retry.wait("ingest")


def test_token_claims_are_read_without_verifying() -> None:
    """exp and the cancel right come from the payload; an unreadable token gives None, not an error."""
    token, _ = TokenAuthority(secret=JWT_SECRET).mint(["user-7/*"], ["read"], ttl_s=60)
    expiry = token_expiry(token)
    assert expiry is not None and abs(expiry - (time.time() + 60)) < 2
    assert token_allows(token, "user-7/a", "read") is True
    assert token_allows(token, "user-7/a", "cancel") is False
    assert token_allows(token, "user-8/a", "read") is False
    assert token_expiry("not-a-jwt") is None and token_allows("a.b.c", "s", "cancel") is None
