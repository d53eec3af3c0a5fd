"""History pages (XRANGE) on connections of relayd's own to a single server: the replay's reads.

Why not redis-py here: a page of 500 chunks costs it ~0.4 ms of Python besides hiredis's parse
(the pool, retries, timeouts, its stream reader waking the reading task for every piece of the
reply), about as much as framing the page's chunks. These connections feed each piece of a reply
to hiredis as it arrives (store/resp.py).

Bounded like the read pool it stands in for: at most ``max_connections`` reads at a time, each on
a connection of its own (a large page delays no other subscriber's read), so a crowd of
consumers catching up at once (after a restart) waits here, not in memory. A read whose
connection was lost is sent once more on a new one (a read is idempotent); a read not answered
in time closes its connection and fails with :class:`StoreUnavailable`. Clusters keep redis-py's
cluster client (store/redis_streams.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis

from relayd.errors import StoreError, StoreUnavailable
from relayd.store.resp import RespConnection, encode_command


class PageReader:
    """``XRANGE key start end COUNT n``, one read per connection at a time, on connections made when
    first needed and kept for the next read (a read never waits behind another one's reply)."""

    def __init__(self, url: str, timeout_s: float, max_connections: int) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[RespConnection] = []
        self._closed = False

    async def xrange(self, key: str, start: str, end: str, count: int) -> list[list[Any]]:
        """The rows, as hiredis parses them: ``[[id, [field, value, ...]], ...]``."""
        payload = encode_command((b"XRANGE", key, start, end, b"COUNT", count))
        async with self._slots:
            for attempt in (1, 2):
                conn = await self._connection()
                try:
                    async with asyncio.timeout(self._timeout_s):
                        (reply,) = await conn.execute(payload, 1)
                except StoreUnavailable:
                    if attempt == 2 or self._closed:
                        raise
                    # the connection was lost (a restart, a failover): once more on a new one (the loop
                    # goes on; no `continue`, which mypyc does not compile inside try/finally)
                except TimeoutError:
                    conn.close()
                    raise StoreUnavailable(f"Redis did not answer a read within {self._timeout_s} s") from None
                else:
                    if isinstance(reply, hiredis.ReplyError):
                        raise StoreError(f"Redis error: {reply}")
                    return reply  # type: ignore[no-any-return]
                finally:
                    # (one whose read was cancelled still owes its reply: the connection drops it, in order)
                    if not conn.closed and not self._closed:
                        self._idle.append(conn)
        raise AssertionError("unreachable")

    async def warm(self) -> None:
        """Make one connection now (at start): the first catch-up does not wait for it."""
        self._idle.append(await self._connection())

    async def _connection(self) -> RespConnection:
        if self._closed:
            raise StoreUnavailable("store closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return await RespConnection.connect(self._url, self._timeout_s)

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
