"""The connection's transport, where aiohttp offers no public handle for what relayd needs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

from relayd.outbox import Outbox, SlowConsumer, retrieve

if sys.platform == "linux":
    import fcntl
    import termios

    _TCP_INFO = getattr(socket, "TCP_INFO", 0)
else:  # pragma: no cover - only the transport's own buffer is visible there
    _TCP_INFO = 0
_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info (since 4.1)
_TCP_INFO_SIZE = _BYTES_ACKED + 8


def ws_text_frame(batch: list[bytes]) -> bytes:
    """A batch of NDJSON frames as one websocket text message, header included.

    Server-to-client frames are unmasked and relayd never compresses, so a text frame is just a
    2-10 byte header before the payload, and the same bytes serve every connection: a pure
    function, so that the outbox can build one publication's message once for all its consumers
    (relayd/outbox.py, ``framer``).
    """
    payload = b"\n".join(batch) if len(batch) > 1 else batch[0]
    n = len(payload)
    if n < 126:
        return b"\x81" + _SHORT_LENGTHS[n] + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


_SHORT_LENGTHS = [bytes((n,)) for n in range(126)]


def ws_frame_writer(request: web.Request, ws: web.WebSocketResponse) -> Callable[[bytes], None]:
    """Write a websocket message made by :func:`ws_text_frame`, synchronously.

    A micro-optimisation for the live path: the message goes to the transport in one ``write``,
    skipping aiohttp's awaitable writer (and a task switch per delivery). Control frames (ping,
    pong, close) still go through aiohttp; each is one synchronous write, so they never
    interleave with these.
    """
    transport = request.transport

    def write(frame: bytes) -> None:
        if ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("websocket closed")
        transport.write(frame)

    return write


def ws_text_writer(request: web.Request, ws: web.WebSocketResponse) -> Callable[[list[bytes]], None]:
    """Write a batch of NDJSON frames as one websocket text message, synchronously
    (:func:`ws_text_frame`, then :func:`ws_frame_writer`)."""
    write_frame = ws_frame_writer(request, ws)

    def write(batch: list[bytes]) -> None:
        write_frame(ws_text_frame(batch))

    return write


def drained(request: web.Request, write: Callable[[list[bytes]], None]) -> Callable[[list[bytes]], Awaitable[None]]:
    """``write``, then wait until the transport is below its low-water mark: the outbox's slow path.

    aiohttp's own writers wait only after every 64 KiB they wrote themselves, so a writer that
    loops on them lets the transport's buffer grow; this one waits after every batch.
    """
    writer = request.writer

    async def send(batch: list[bytes]) -> None:
        write(batch)
        await writer.drain()

    return send


class _Probe:
    """A :class:`~relayd.outbox.Probe` over one connection's transport.

    On Linux TCP sockets the kernel's own counts are used: ``tcpi_bytes_acked`` from ``TCP_INFO``
    (what the peer took) and ``SIOCOUTQ`` (what the kernel still holds for it), so a ping queued
    behind megabytes of socket buffer is known to be there. Elsewhere only the transport's user
    space buffer is visible, and what the kernel accepted counts as taken.
    """

    __slots__ = ("_fd", "_sock", "_transport", "size")

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self._transport = transport
        self.size: Callable[[], int] = transport.get_write_buffer_size if transport is not None else _nothing
        self._fd = -1
        self._sock = sock = transport.get_extra_info("socket") if transport is not None else None
        if _TCP_INFO and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError, ValueError):
                if len(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)) >= _TCP_INFO_SIZE:
                    self._fd = sock.fileno()

    def __call__(self) -> int:
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def progress(self, written: int) -> tuple[int, int]:
        backlog = self()
        if self._fd >= 0 and self._sock is not None:
            try:
                info = self._sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
                outq = struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                self._fd = -1  # closed meanwhile: from now on, what the transport shows
            else:
                return struct.unpack_from("Q", info, _BYTES_ACKED)[0], backlog + outq
        return written - backlog, backlog


def _nothing() -> int:
    return 0


def backlog_of(request: web.Request) -> _Probe:
    """The :class:`~relayd.outbox.Probe` of a request's connection (its user space backlog when called)."""
    return _Probe(request.transport)


async def next_message(ws: web.WebSocketResponse, outbox: Outbox) -> WSMessage:
    """The peer's next message, answering its pings (``autoping=False``); any message, a pong
    included, tells the outbox's heartbeat that the peer is alive."""
    while True:
        msg = await ws.receive()
        outbox.heard()
        if msg.type is WSMsgType.PING:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.pong(msg.data)  # awaits the drain: a peer that does not read stops being read
        elif msg.type is not WSMsgType.PONG:
            return msg


def abort(request: web.Request) -> None:
    """Drop the connection at once."""
    if request.transport is not None:
        request.transport.abort()


def ws_pinger(request: web.Request) -> Callable[[], int]:
    """Write a websocket ping (no payload) at once; returns its size. For the outbox's heartbeat."""
    transport = request.transport

    def ping() -> int:
        if transport is None or transport.is_closing():
            raise ConnectionResetError("websocket closed")
        transport.write(_PING)
        return len(_PING)

    return ping


_PING = b"\x89\x00"


CLOSED_ABNORMALLY = 1006  # what a peer sees when the connection ends without a close frame
_CLOSE_GRACE_S = 1.0


async def close_stuck(request: web.Request, ws: web.WebSocketResponse, code: int, reason: str) -> int:
    """Close a websocket whose peer may not read; returns the close code the peer gets.

    The close frame goes out if the peer takes it within a second; otherwise the transport is
    aborted and the peer sees 1006 (returned). The close is never cancelled: that would cancel
    the drain future aiohttp shares with the connection's writer.
    """
    transport = request.transport
    if transport is None or ws.closed:
        return ws.close_code or CLOSED_ABNORMALLY
    # Whatever the close does, the connection does not outlive the grace with data stuck in it.
    asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, _abort_if_stuck, transport)
    closing = asyncio.ensure_future(ws.close(code=code, message=reason.encode()))
    closing.add_done_callback(retrieve)
    await asyncio.wait([closing], timeout=_CLOSE_GRACE_S)
    if not closing.done():
        transport.abort()  # the close frame did not get through
        return CLOSED_ABNORMALLY
    return code


def _abort_if_stuck(transport: asyncio.Transport) -> None:
    if transport.get_write_buffer_size():
        transport.abort()


class writing:  # a function by use: ``async with writing(outbox, name) as task``
    """Run ``outbox``'s writer task (its watchdog with it) for the block; on the way out the
    outbox closes and the task is cancelled and awaited, so it never outlives the response.

    (A class rather than an ``asynccontextmanager`` generator: the compiled build compiles this
    module, and mypyc does not compile async generators.)
    """

    __slots__ = ("_name", "_outbox", "_writer")

    def __init__(self, outbox: Outbox, name: str) -> None:
        self._outbox = outbox
        self._name = name
        self._writer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> asyncio.Task[None]:
        self._writer = asyncio.create_task(self._outbox.run(), name=self._name)
        return self._writer

    async def __aexit__(self, *exc_info: object) -> None:
        writer = self._writer
        self._outbox.close()
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, SlowConsumer, ConnectionError, RuntimeError):
                await writer


async def deliver(
    outbox: Outbox,
    done: asyncio.Event,
    stop: Callable[[], Awaitable[None]],
    *,
    keepalive: bytes,
    every_s: float,
    name: str,
) -> str:
    """Write ``outbox`` to a streamed response until ``done`` is set or the writer ends.

    The one subscription's response of an SSE consumer and of an admin tail: a writer task drains
    the outbox, a keepalive task queues ``keepalive`` every ``every_s``. When ``done`` is set
    what is queued gets a second to go out. Then, however it ends (the handler cancelled too):
    ``stop()`` (the caller unsubscribes), the outbox closes, and both tasks are cancelled and
    awaited, so none outlives the response. Returns why the outbox gave up on the reader
    (``slow_consumer``, ``queue_full``), "" if it did not.
    """
    # (No ``finally`` blocks with an await here: mypyc, which compiles this module in the compiled
    # build, gets an await in one wrong; tests/test_compiled_rules.py.)
    async with writing(outbox, name) as writer:
        pinger = asyncio.create_task(_keepalive(outbox, keepalive, every_s), name=f"{name}-keepalive")
        waiter = asyncio.create_task(done.wait(), name=f"{name}-waiter")
        try:
            await asyncio.wait([waiter, writer], return_when=asyncio.FIRST_COMPLETED)
            if not writer.done():
                await outbox.flush(1.0)
        except BaseException:
            await _stop(stop, waiter, pinger)
            raise
        await _stop(stop, waiter, pinger)
    return outbox.stalled


async def _stop(stop: Callable[[], Awaitable[None]], *helpers: asyncio.Task[Any]) -> None:
    """``stop()``, with ``helpers`` cancelled before it and awaited after it, however it ends."""
    for task in helpers:
        task.cancel()
    try:
        await stop()
    except BaseException:
        await _reaped(helpers)
        raise
    await _reaped(helpers)


async def _reaped(tasks: tuple[asyncio.Task[Any], ...]) -> None:
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _keepalive(outbox: Outbox, data: bytes, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)  # a periodic job, not a synchronisation
        outbox.control(data)
