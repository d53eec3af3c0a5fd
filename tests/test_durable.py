"""relayd/web/durable.py: the Durable Streams mount over HTTP, and the same streams through
relayd's own producers and consumers. (The protocol itself: tests/test_durable_conformance.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from relayd.config import Config
from relayd.embedded import EmbeddedRedis
from relayd.protocol import MAX_WRITE_CHUNKS
from tests.helpers import API_KEY, Relayd, collect_chunks, make_config, poll_until
from tests.test_guarantees import metric


@pytest.fixture
async def open_mount(config_factory: Callable[..., Config]) -> AsyncIterator[Relayd]:
    async with Relayd(config_factory(durable={"enabled": True, "auth": "none", "long_poll_timeout_ms": 5000})) as rd:
        yield rd


def ds(server: Relayd, stream: str) -> str:
    return f"{server.url}/ds/v1/stream/{stream}"


async def test_relayds_consumers_follow_a_durable_stream_live_through_its_close(open_mount: Relayd) -> None:
    """Appends through the mount reach a relayd websocket consumer live; the close is its end."""
    http = open_mount.session
    assert http is not None
    put = await http.put(ds(open_mount, "chat-1"), headers={"Content-Type": "application/json"}, data=b'[{"t":"a"}]')
    assert put.status == 201
    async with await open_mount.consumer("chat-1") as consumer:
        await consumer.expect("subscribed")
        assert (await consumer.expect("chunk"))["data"] == {"t": "a"}
        headers = {"Content-Type": "application/json", "Stream-Closed": "true"}
        post = await http.post(ds(open_mount, "chat-1"), headers=headers, data=b'[{"t":"b"}, 2]')
        assert post.status == 204
        chunks, end = await collect_chunks(consumer, "chat-1")
    assert [c["data"] for c in chunks] == [{"t": "b"}, 2]  # a JSON array appends its items
    assert end["reason"] == "completed"


async def test_a_stream_of_relayds_producer_reads_through_the_mount_and_wakes_its_long_poll(
    open_mount: Relayd,
) -> None:
    """A websocket producer's text stream is a text/plain Durable Stream, its offsets are relayd's
    cursors, its appends wake a long-poll, its end closes it."""
    http = open_mount.session
    assert http is not None
    async with await open_mount.producer() as producer:
        await producer.open("gen-7", content_type="text")
        ack = await producer.append("gen-7", 1, "Hel", "lo")
        read = await http.get(ds(open_mount, "gen-7"))
        assert (read.status, await read.text()) == (200, "Hello")
        assert read.headers["Content-Type"] == "text/plain"
        assert read.headers["Stream-Next-Offset"] == ack["cursor"]  # offsets are relayd cursors
        poll = asyncio.ensure_future(
            http.get(
                ds(open_mount, "gen-7"), params={"offset": read.headers["Stream-Next-Offset"], "live": "long-poll"}
            )
        )
        await producer.append("gen-7", 3, "!")  # (seq counts chunks)
        woken = await poll
        assert (woken.status, await woken.text()) == (200, "!")  # the append, not the 5 s timeout
        await producer.end("gen-7")
    tail = await http.get(ds(open_mount, "gen-7"), params={"offset": woken.headers["Stream-Next-Offset"]})
    assert (tail.status, await tail.text(), tail.headers["Stream-Closed"]) == (200, "", "true")


async def test_by_default_writes_take_an_api_key_and_reads_also_a_read_token(
    config_factory: Callable[..., Config],
) -> None:
    async with Relayd(config_factory(durable={"enabled": True})) as server, aiohttp.ClientSession() as http:
        url = ds(server, "t/1")
        key = {"Authorization": f"Bearer {API_KEY}"}
        reader = {"Authorization": f"Bearer {server.token(['t/*'])}"}
        other = {"Authorization": f"Bearer {server.token(['u/*'])}"}
        assert (await http.put(url, headers={"Content-Type": "text/plain"})).status == 401
        assert (await http.put(url, headers={"Content-Type": "text/plain", **reader})).status == 401
        assert (await http.put(url, headers={"Content-Type": "text/plain", **key}, data=b"hi")).status == 201
        assert (await http.get(url)).status == 401
        read = await http.get(url, headers=reader)
        assert (read.status, await read.text(), read.headers["X-Content-Type-Options"]) == (200, "hi", "nosniff")
        assert (await http.head(url, headers=reader)).status == 200
        assert (await http.get(url, headers=other)).status == 403
        assert (await http.delete(url, headers=reader)).status == 401
        assert (await http.delete(url, headers=key)).status == 204


async def test_the_mount_is_off_unless_enabled(relayd: Relayd) -> None:
    assert relayd.session is not None
    assert (await relayd.session.put(ds(relayd, "x"), headers={"Authorization": f"Bearer {API_KEY}"})).status == 404


async def test_the_reserved_subscription_paths_are_no_streams(open_mount: Relayd) -> None:
    assert open_mount.session is not None
    url = ds(open_mount, "chat/__ds/subscriptions/s1")
    assert (await open_mount.session.put(url, headers={"Content-Type": "text/plain"})).status == 404


async def test_a_waiting_long_poll_is_answered_503_when_relayd_drains(open_mount: Relayd) -> None:
    """A drain does not wait out the long-poll timeout (5 s here): the client is told to retry."""
    http = open_mount.session
    assert http is not None
    created = await http.put(ds(open_mount, "lp"), headers={"Content-Type": "text/plain"})
    params = {"offset": created.headers["Stream-Next-Offset"], "live": "long-poll"}
    poll = asyncio.ensure_future(http.get(ds(open_mount, "lp"), params=params))
    await poll_until(lambda: open_mount.relay.subscriber_count("lp") == 1, "the long-poll waiting")
    async with asyncio.timeout(3):
        await asyncio.gather(open_mount.server.stop(), poll)
    assert poll.result().status == 503


async def test_an_sse_response_ends_when_relayd_drains(open_mount: Relayd) -> None:
    http = open_mount.session
    assert http is not None
    await http.put(ds(open_mount, "sse"), headers={"Content-Type": "text/plain"}, data=b"a")
    async with http.get(ds(open_mount, "sse"), params={"offset": "-1", "live": "sse"}) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await response.content.readuntil(b"upToDate")
        assert b"event: data\ndata:a\n\nevent: control\n" in first
        async with asyncio.timeout(3):
            await asyncio.gather(open_mount.server.stop(), response.content.read())


async def test_failed_credentials_count_against_the_address_as_on_relayds_other_routes(
    config_factory: Callable[..., Config],
) -> None:
    config = config_factory(durable={"enabled": True}, auth={"max_failures": 2})
    async with Relayd(config) as server, aiohttp.ClientSession() as http:
        bad = {"Authorization": "Bearer wrong"}
        assert [(await http.get(ds(server, "x"), headers=bad)).status for _ in range(2)] == [401, 401]
        throttled = await http.get(ds(server, "x"), headers={"Authorization": f"Bearer {API_KEY}"})
        assert throttled.status == 429 and int(throttled.headers["Retry-After"]) > 0


async def test_appends_on_one_instance_wake_long_polls_and_sse_on_another(
    config_factory: Callable[..., Config],
) -> None:
    """Two relayd on one Valkey (one deployment): the ds_append script's notification reaches the
    other instance's waiting readers through its broker (a long-poll of 5 s answers at once)."""
    config = config_factory(durable={"enabled": True, "auth": "none", "long_poll_timeout_ms": 5000})
    async with Relayd(config) as a, Relayd(config) as b:
        assert a.session is not None and b.session is not None
        created = await a.session.put(ds(a, "x"), headers={"Content-Type": "application/json"})
        params = {"offset": created.headers["Stream-Next-Offset"], "live": "long-poll"}
        poll = asyncio.ensure_future(b.session.get(ds(b, "x"), params=params))
        async with b.session.get(ds(b, "x"), params={**params, "live": "sse"}) as sse:
            await sse.content.readuntil(b"upToDate")  # caught up: live from here
            await poll_until(lambda: b.relay.subscriber_count("x") == 2, "both readers waiting on b")
            posted = await a.session.post(ds(a, "x"), headers={"Content-Type": "application/json"}, data=b"[1,2]")
            assert posted.status == 204
            async with asyncio.timeout(3):
                woken = await poll
                assert (woken.status, await woken.json()) == (200, [1, 2])
                assert b"event: data\ndata:[1,2]\n" in await sse.content.readuntil(b"event: control")


async def test_an_append_of_more_messages_than_one_write_takes_is_413_and_stores_nothing(open_mount: Relayd) -> None:
    """A 1 MB body of "[0,0,...]" would be 500,000 entries in one Redis script (seconds of a blocked
    Redis, gigabytes here): at most protocol.MAX_WRITE_CHUNKS per append, as for HTTP ingest."""
    http = open_mount.session
    assert http is not None
    json = {"Content-Type": "application/json"}
    assert (await http.put(ds(open_mount, "many"), headers=json)).status == 201
    body = ("[" + ",".join(["0"] * (MAX_WRITE_CHUNKS + 1)) + "]").encode()
    refused = await http.post(ds(open_mount, "many"), headers=json, data=body)
    assert refused.status == 413
    assert "at most" in await refused.text()
    read = await http.get(ds(open_mount, "many"))
    assert await read.json() == []


async def test_durable_writes_count_against_the_producers_backlog_and_are_refused_503_past_it(
    private_redis: EmbeddedRedis, key_prefix: str, tmp_path: Path
) -> None:
    """While Redis does not answer, appends through the mount wait in relayd's memory as HTTP
    ingest's do: past limits.max_producer_backlog_bytes (shared with them) one gets 503 at once."""
    config = make_config(
        private_redis.url,
        key_prefix,
        str(tmp_path),
        durable={"enabled": True, "auth": "none"},
        limits={"max_producer_backlog_bytes": 8 * 1024},
        redis={"timeout_ms": 30_000, "retry_ms": 30_000},
    )
    admin = aioredis.from_url(private_redis.url)
    text = {"Content-Type": "text/plain"}
    async with Relayd(config) as server, aiohttp.ClientSession() as http:
        url = ds(server, "held")
        assert (await http.put(url, headers=text)).status == 201
        budget = server.relay.producer_budget
        await admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        try:
            first = asyncio.ensure_future(http.post(url, headers=text, data=b"a" * 3000))
            await poll_until(lambda: budget.used > 0, "the first append waiting for Redis")
            second = await http.post(url, headers=text, data=b"b" * 3000)
            assert (second.status, second.headers.get("Retry-After")) == (503, "1")
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
        assert (await first).status == 204
        assert budget.used == 0
        read = await http.get(url)
        assert await read.text() == "a" * 3000  # the refused append stored nothing


async def test_long_polls_and_sse_responses_count_against_limits_max_sse_connections(
    config_factory: Callable[..., Config],
) -> None:
    """Readers held open at the tail are SSE-like connections: capped as relayd's own SSE."""
    config = config_factory(durable={"enabled": True, "auth": "none"}, limits={"max_sse_connections": 1})
    async with Relayd(config) as server, aiohttp.ClientSession() as http:
        url = ds(server, "capped")
        created = await http.put(url, headers={"Content-Type": "text/plain"}, data=b"a")
        async with http.get(url, params={"offset": "-1", "live": "sse"}) as sse:
            await sse.content.readuntil(b"upToDate")
            tail = created.headers["Stream-Next-Offset"]
            async with http.get(url, params={"offset": tail, "live": "long-poll"}) as poll:
                assert (poll.status, poll.headers.get("Retry-After")) == (503, "1")
            async with http.get(url) as read:
                assert read.status == 200  # a catch-up read is no held connection


async def stalled_get(server: Relayd, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET on a raw socket with a tiny receive buffer, then never read: the kernel buffers fill
    and relayd sees a reader that takes nothing (aiohttp's client would read ahead)."""
    host, port = server.config.server.host, server.server.port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return reader, writer


@pytest.mark.parametrize("live", ["sse", "long-poll"])
async def test_a_reader_that_stops_reading_is_cut_off_after_the_send_timeout(
    config_factory: Callable[..., Config], live: str
) -> None:
    """As relayd's own SSE: a durable SSE or long-poll reader that takes nothing for
    consumer.send_timeout_ms is dropped, and its limits.max_sse_connections slot is free again
    (before, the answer's write waited forever, past durable.sse_max_s)."""
    config = config_factory(
        durable={"enabled": True, "auth": "none", "sse_max_s": 1.0, "read_max_bytes": 16 * 1024 * 1024},
        consumer={"send_timeout_ms": 300},
        limits={"max_sse_connections": 1},
    )
    async with Relayd(config) as server, aiohttp.ClientSession() as http:
        url = ds(server, "stuck")
        assert (await http.put(url, headers={"Content-Type": "text/plain"})).status == 201
        for _ in range(8):  # far more than the kernel buffers between relayd and the reader hold
            assert (await http.post(url, headers={"Content-Type": "text/plain"}, data=b"x" * 1_000_000)).status == 204
        reader, writer = await stalled_get(server, f"/ds/v1/stream/stuck?offset=-1&live={live}")
        try:
            cut = 'relayd_forced_closes_total{reason="slow_consumer",role="consumer_sse"}'
            await poll_until(lambda: metric(server, cut), "relayd to cut the stalled reader off", timeout=5.0)
            assert await metric(server, "relayd_slow_consumer_disconnects_total") == 1
            received = 0
            with contextlib.suppress(ConnectionResetError):  # (aborted: an EOF or a reset, as the kernel tells it)
                async with asyncio.timeout(5):
                    while data := await reader.read(65536):
                        received += len(data)
            assert received < 8_000_000  # the connection ended without the rest

            async def admitted() -> bool:  # limits.max_sse_connections = 1: the stalled one is gone
                async with http.get(url, params={"offset": "now", "live": "sse"}) as again:
                    return again.status == 200

            await poll_until(admitted, "the stalled reader's slot")
        finally:
            writer.close()


async def test_an_api_key_is_taken_from_the_header_only_and_token_in_the_url_is_a_read_token(
    config_factory: Callable[..., Config],
) -> None:
    """As on relayd's other routes: a producer key in ?token= (it would land in access logs) is
    refused, with a message saying where it goes; ?token= carries a consumer JWT for reads."""
    async with Relayd(config_factory(durable={"enabled": True})) as server, aiohttp.ClientSession() as http:
        url = ds(server, "q/1")
        text = {"Content-Type": "text/plain"}
        assert (await http.put(url, headers={**text, "Authorization": f"Bearer {API_KEY}"}, data=b"hi")).status == 201
        for method in ("POST", "DELETE"):
            async with http.request(method, url, params={"token": API_KEY}, headers=text, data=b"!") as refused:
                assert refused.status == 401
                assert "Authorization header" in await refused.text()
        async with http.get(url, params={"token": API_KEY}) as refused:
            assert refused.status == 401  # not a consumer token
        async with http.get(url, params={"token": server.token(["q/*"])}) as read:
            assert (read.status, await read.text()) == (200, "hi")  # nothing was appended
        async with http.head(url, params={"token": server.token(["q/*"])}) as head:
            assert head.status == 200
        async with http.get(url, params={"token": server.token(["other/*"])}) as other:
            assert other.status == 403


async def test_default_ttl_is_given_to_streams_created_without_one(config_factory: Callable[..., Config]) -> None:
    """durable.default_ttl_s: a stream created without Stream-TTL or Stream-Expires-At gets it as its
    Stream-TTL; one created with either keeps its own."""
    config = config_factory(durable={"enabled": True, "auth": "none", "default_ttl_s": 3600})
    async with Relayd(config) as server:
        http = server.session
        assert http is not None
        plain = {"Content-Type": "text/plain"}
        assert (await http.put(ds(server, "ttl-default"), headers=plain)).status == 201
        head = await http.head(ds(server, "ttl-default"))
        assert head.status == 200 and head.headers["Stream-TTL"] == "3600"
        assert (await http.put(ds(server, "ttl-default"), headers=plain)).status == 200  # the same again: same config
        assert (await http.put(ds(server, "ttl-own"), headers={**plain, "Stream-TTL": "60"})).status == 201
        assert (await http.head(ds(server, "ttl-own"))).headers["Stream-TTL"] == "60"
        expires = {**plain, "Stream-Expires-At": "2099-01-01T00:00:00Z"}
        assert (await http.put(ds(server, "ttl-expires"), headers=expires)).status == 201
        head = await http.head(ds(server, "ttl-expires"))
        assert "Stream-TTL" not in head.headers and head.headers["Stream-Expires-At"] == "2099-01-01T00:00:00Z"


async def test_without_a_default_ttl_a_stream_has_none(open_mount: Relayd) -> None:
    http = open_mount.session
    assert http is not None
    assert (await http.put(ds(open_mount, "ttl-none"), headers={"Content-Type": "text/plain"})).status == 201
    head = await http.head(ds(open_mount, "ttl-none"))
    assert head.status == 200 and "Stream-TTL" not in head.headers and "Stream-Expires-At" not in head.headers
