"""Connection limits: a deadline for the request head, caps in total and per role (relayd/web/gate.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import orjson
import pytest

from relayd.web.gate import RESERVE
from tests.helpers import Relayd
from tests.test_guarantees import ConfigFactory, metric, poll_until


async def partial_head(server: Relayd) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that starts a request head and never finishes it (a slow-header client)."""
    reader, writer = await asyncio.open_connection(server.config.server.host, server.server.port)
    writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: relayd\r\nX-Slow: ")
    await writer.drain()
    return reader, writer


async def http_get(server: Relayd, path: str) -> tuple[int, bytes]:
    """One request on a fresh connection (no pool), read to the end."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(f"{server.url}{path}") as resp:
        return resp.status, await resp.read()


async def test_a_connection_that_never_finishes_its_request_head_is_closed(config_factory: ConfigFactory) -> None:
    """A slow-header connection is closed after server.header_timeout_s and counted."""
    async with Relayd(config_factory(server={"header_timeout_s": 0.3})) as server:
        reader, writer = await partial_head(server)
        try:
            async with asyncio.timeout(5.0):
                assert await reader.read() == b""  # closed by relayd, nothing answered
        finally:
            writer.close()
        assert await metric(server, "relayd_header_timeouts_total") == 1
        # a client that completes its head in time is served as usual
        assert (await http_get(server, "/healthz"))[0] == 200


async def test_at_the_connection_cap_clients_get_503_and_probes_are_still_answered(
    config_factory: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Past limits.max_connections: 503 too_many_connections with a log line; /healthz, /readyz, /metrics answer."""
    caplog.set_level(logging.WARNING, logger="relayd")
    cap = 4
    async with Relayd(config_factory(limits={"max_connections": cap})) as server, contextlib.AsyncExitStack() as stack:
        for _ in range(cap):
            _, writer = await partial_head(server)
            stack.callback(writer.close)

        async def full() -> bool:
            return await metric(server, "relayd_tcp_connections") >= cap

        await poll_until(full, "the slow connections to be counted")
        status, body = await http_get(server, "/v1/ws")
        assert status == 503
        assert orjson.loads(body)["error"]["code"] == "too_many_connections"
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await http_get(server, path))[0] == 200, path
        assert await metric(server, 'relayd_connections_refused_total{limit="max_connections"}') >= 1
        assert any("connection limit reached" in r.getMessage() for r in caplog.records)

        # beyond the reserve kept for probes, a connection is refused before its request is read
        for _ in range(RESERVE):
            _, writer = await partial_head(server)
            stack.callback(writer.close)

        async def refused_at_once() -> bool:  # (a scrape cannot tell: it would be refused too)
            status, body = await http_get(server, "/healthz")
            return status == 503 and orjson.loads(body)["error"]["code"] == "too_many_connections"

        await poll_until(refused_at_once, "a connection past the reserve to be refused")


async def test_a_role_over_its_cap_gets_503_while_others_connect(config_factory: ConfigFactory) -> None:
    """limits.max_consumer_ws_connections refuses one more consumer websocket; producers still connect."""
    async with Relayd(config_factory(limits={"max_consumer_ws_connections": 1})) as server:
        first = await server.consumer("capped")
        await first.expect("subscribed")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await server.consumer("capped")
        assert refused.value.status == 503
        producer = await server.producer()
        assert (await producer.open("capped"))["type"] == "opened"
        assert await metric(server, 'relayd_connections_refused_total{limit="consumer_ws"}') == 1
        await first.ws.close()

        async def released() -> bool:
            return await metric(server, 'relayd_connections{role="consumer_ws"}') == 0

        await poll_until(released, "the first consumer to leave")
        again = await server.consumer("capped")  # its place is free again
        await again.expect("subscribed")
        await again.ws.close()
        await producer.ws.close()
