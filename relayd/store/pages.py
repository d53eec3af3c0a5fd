"""History pages (XRANGE) over one pipelined connection to a single server: the replay's reads.

Why not redis-py here: a page of 500 chunks costs it ~0.4 ms of Python besides hiredis's parse
(the pool, retries, timeouts, its stream reader waking the reading task for every piece of the
reply), about as much as framing the page's chunks. This connection feeds each piece of a reply
to hiredis as it arrives (store/resp.py), and pipelines the reads of every subscriber: a
subscriber's next page is asked for while it works on this one (relayd/subscription.py).

Bounded like the read pool it stands in for: at most ``max_inflight`` pages asked for and not yet
taken, so a crowd of consumers catching up at once (after a restart) waits here, not in memory.
A read whose connection was lost is sent once more on a new one (a read is idempotent); a read
not answered in time closes the connection (the replies after it are out of step) and fails with
:class:`StoreUnavailable`. Clusters keep redis-py's cluster client (store/redis_streams.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis

from relayd.errors import StoreError, StoreUnavailable
from relayd.store.resp import RespConnection, encode_command


class PageReader:
    """``XRANGE key start end COUNT n`` on one pipelined connection, made when first needed."""

    def __init__(self, url: str, timeout_s: float, max_inflight: int) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_inflight)
        self._conn: RespConnection | None = None
        self._connecting = asyncio.Lock()
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
                    continue  # the connection was lost (a restart, a failover): once more on a new one
                except TimeoutError:
                    conn.close()  # the replies after this one would be taken for the wrong reads
                    raise StoreUnavailable(f"Redis did not answer a read within {self._timeout_s} s") from None
                if isinstance(reply, hiredis.ReplyError):
                    raise StoreError(f"Redis error: {reply}")
                return reply  # type: ignore[no-any-return]
        raise AssertionError("unreachable")

    async def _connection(self) -> RespConnection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._connecting:
            if self._closed:
                raise StoreUnavailable("store closed")
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = await RespConnection.connect(self._url, self._timeout_s)
            return conn

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None
