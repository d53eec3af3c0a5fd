"""A minimal pipelined RESP connection for the write path.

Why not redis-py here: its asyncio pipeline costs about 10 µs of Python per command, which caps
the write path near 90 k commands/s (benchmarks/redis_ceilings.py measures it). This connection
encodes a whole batch of commands into one buffer, writes it with one ``transport.write`` and
parses the replies with hiredis as they arrive: the server becomes the limit again. It does only
that; reads, admin commands and script loading use redis-py (store/redis_streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis

from relayd.errors import StoreUnavailable

RespArg = bytes | str | int

# What hiredis returns when a reply is incomplete: a nil reply is None, so None cannot be it.
NOT_ENOUGH_DATA: Any = object()


def encode_command(args: Sequence[RespArg]) -> bytes:
    """RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _Pending:
    __slots__ = ("future", "remaining", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future = future
        self.remaining = count
        self.replies: list[Any] = []


class RespConnection(asyncio.Protocol):
    """One connection; batches of commands in, lists of replies out, in order.

    Error replies come back as ``hiredis.ReplyError`` instances inside the list, so one bad
    command does not fail its neighbours. A lost connection fails every pending batch with
    :class:`StoreUnavailable`.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
        self._pending: deque[_Pending] = deque()
        self._closed = False
        self._lost: Exception | None = None

    @classmethod
    async def connect(cls, url: str, timeout_s: float) -> RespConnection:
        loop = asyncio.get_running_loop()
        parsed = urlparse(url)
        try:
            async with asyncio.timeout(timeout_s):
                if parsed.scheme == "unix":
                    _, conn = await loop.create_unix_connection(cls, parsed.path)
                else:
                    ssl = parsed.scheme == "rediss"
                    _, conn = await loop.create_connection(
                        cls, parsed.hostname or "127.0.0.1", parsed.port or 6379, ssl=ssl or None
                    )
                setup: list[bytes] = []
                if parsed.password:
                    user = unquote(parsed.username) if parsed.username else None
                    auth: list[RespArg] = ["AUTH", *([user] if user else []), unquote(parsed.password)]
                    setup.append(encode_command(auth))
                db = _db_number(parsed.path if parsed.scheme != "unix" else "", parsed.query)
                if db:
                    setup.append(encode_command(["SELECT", db]))
                if setup:
                    for reply in await conn.execute(b"".join(setup), len(setup)):
                        if isinstance(reply, hiredis.ReplyError):
                            conn.close()
                            raise StoreUnavailable(f"Redis refused the connection setup: {reply}")
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect to Redis: {exc or 'timed out'}") from exc
        return conn

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                return
            if not pending:  # an unsolicited reply: the stream is out of sync; stop trusting it
                self._fail(StoreUnavailable("unexpected reply from Redis"))
                return
            head = pending[0]
            head.replies.append(reply)
            head.remaining -= 1
            if head.remaining == 0:
                pending.popleft()
                if not head.future.done():
                    head.future.set_result(head.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._fail(StoreUnavailable(f"Redis connection lost: {exc or 'closed'}"))

    # API -------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def execute(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Send ``count`` encoded commands; the future gets their ``count`` replies."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self._closed or self._transport is None:
            future.set_exception(self._lost or StoreUnavailable("Redis connection closed"))
            return future
        self._pending.append(_Pending(future, count))
        self._transport.write(payload)
        return future

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._transport is not None:
                self._transport.close()
        self._fail(StoreUnavailable("Redis connection closed"))

    def _fail(self, exc: Exception) -> None:
        self._lost = exc
        self._closed = True
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(exc)
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()


async def load_scripts(conn: RespConnection, scripts: Sequence[str | bytes], timeout_s: float, where: str) -> None:
    """``SCRIPT LOAD`` each script on ``conn``; if refused or not answered in time, close ``conn``
    and raise StoreUnavailable naming ``where`` (the server)."""
    load = [encode_command(["SCRIPT", "LOAD", body]) for body in scripts]
    try:
        async with asyncio.timeout(timeout_s):
            replies = await conn.execute(b"".join(load), len(load))
    except TimeoutError:
        conn.close()
        raise StoreUnavailable(f"{where} did not answer SCRIPT LOAD in time") from None
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            conn.close()
            raise StoreUnavailable(f"{where} refused SCRIPT LOAD: {reply}")


def _db_number(path: str, query: str) -> int:
    for part in query.split("&"):
        if part.startswith("db="):
            return int(part[3:] or 0)
    path = path.strip("/")
    return int(path) if path.isdigit() else 0
