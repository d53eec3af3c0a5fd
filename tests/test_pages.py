"""store/pages.py: history pages on relayd's own connections, against real Valkey."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis.asyncio as aioredis

from relayd.embedded import EmbeddedRedis
from relayd.errors import StoreError, StoreUnavailable
from relayd.store.pages import PageReader
from relayd.store.resp import encode_command


async def test_pages_are_the_rows_redis_py_reads_and_pipelined_reads_each_get_their_own(
    redis_server: str, key_prefix: str
) -> None:
    """XRANGE rows as hiredis parses them (as the store reads them through redis-py); reads sent
    together each get their own page, whatever order they are awaited in, on at most as many
    connections as allowed, kept for the next reads."""
    key = f"{key_prefix}:log"
    client = aioredis.Redis.from_url(redis_server)
    reader = PageReader(redis_server, 5.0, 4)
    try:
        for i in range(1, 101):
            await client.xadd(key, {"d": b'{"i":%d}' % i}, id=f"7-{i}")
        expected = await client.execute_command("XRANGE", key, "7-1", "7-50", "COUNT", 20)
        assert await reader.xrange(key, "7-1", "7-50", 20) == [[e[0], [b"d", e[1][b"d"]]] for e in expected]
        reads = [asyncio.ensure_future(reader.xrange(key, f"7-{first}", "7-999", 10)) for first in range(1, 101, 10)]
        pages = [await read for read in reversed(reads)][::-1]
        assert [[int(row[0][2:]) for row in page] for page in pages] == [
            list(range(first, first + 10)) for first in range(1, 101, 10)
        ]
        assert len(reader._idle) == 4  # (the bound)
        assert await reader.xrange(f"{key_prefix}:none", "7-1", "7-9", 10) == []
    finally:
        reader.close()
        await client.aclose()


async def test_a_read_after_the_server_dropped_the_connection_is_answered_on_a_new_one(
    redis_server: str, key_prefix: str
) -> None:
    """The server closes the reader's connection (CLIENT KILL: a restart, a failover, a proxy):
    the next read is answered all the same, on a connection made anew; an error reply is a
    StoreError; a closed reader refuses."""
    key = f"{key_prefix}:log"
    client = aioredis.Redis.from_url(redis_server)
    reader = PageReader(redis_server, 5.0, 4)
    try:
        await client.xadd(key, {"d": b"1"}, id="1-1")
        assert len(await reader.xrange(key, "1-1", "1-9", 10)) == 1
        (conn,) = reader._idle  # kept for the next read
        (client_id,) = await conn.execute(encode_command(["CLIENT", "ID"]), 1)
        assert await client.client_kill_filter(_id=client_id) == 1
        assert len(await reader.xrange(key, "1-1", "1-9", 10)) == 1
        assert reader._idle and reader._idle[0] is not conn
        await client.set(f"{key_prefix}:str", "x")
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await reader.xrange(f"{key_prefix}:str", "1-1", "1-9", 10)
        reader.close()
        with pytest.raises(StoreUnavailable):
            await reader.xrange(key, "1-1", "1-9", 10)
    finally:
        reader.close()
        await client.aclose()


async def test_a_read_not_answered_in_time_fails_and_its_connection_is_not_kept(private_redis: EmbeddedRedis) -> None:
    """The server is frozen (SIGSTOP): the read fails with StoreUnavailable after the reader's
    timeout, and its connection (which still owes that reply) is closed, not kept for the next
    read; once the server answers again, so does the reader."""
    client = aioredis.Redis.from_url(private_redis.url)
    reader = PageReader(private_redis.url, 0.2, 4)
    try:
        await client.xadd("log", {"d": b"1"}, id="1-1")
        await reader.warm()
        (conn,) = reader._idle
        assert private_redis.pid is not None
        os.kill(private_redis.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match=r"did not answer a read within 0\.2 s"):
                await reader.xrange("log", "1-1", "1-9", 10)
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
        assert conn.closed and reader._idle == []
        assert len(await reader.xrange("log", "1-1", "1-9", 10)) == 1
    finally:
        reader.close()
        await client.aclose()
