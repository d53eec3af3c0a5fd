"""The connection's transport, where aiohttp offers no public handle for what relayd needs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from relayd.outbox import Outbox, SlowConsumer


def ws_text_writer(request: web.Request, ws: web.WebSocketResponse) -> Callable[[list[bytes]], None]:
    """Write a batch of NDJSON frames as one websocket text message, synchronously.

    A micro-optimisation for the live path: the frame header is built here and the message goes
    to the transport in one ``write``, skipping aiohttp's awaitable writer (and a task switch per
    delivery). Server-to-client frames are unmasked and relayd never compresses, so a text frame
    is just a 2-10 byte header. Control frames (ping, pong, close) still go through aiohttp; each
    is one synchronous write, so they never interleave with these.
    """
    transport = request.transport

    def write(batch: list[bytes]) -> None:
        if ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("websocket closed")
        payload = b"\n".join(batch) if len(batch) > 1 else batch[0]
        n = len(payload)
        if n < 126:
            header = bytes((0x81, n))
        elif n < 65536:
            header = b"\x81\x7e" + n.to_bytes(2, "big")
        else:
            header = b"\x81\x7f" + n.to_bytes(8, "big")
        transport.write(header + payload)

    return write


def backlog_of(request: web.Request) -> Callable[[], int]:
    """Bytes written to the peer's transport and not yet taken by the kernel (0 when gone)."""
    transport = request.transport

    def backlog() -> int:
        return transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0

    return backlog


async def close_stuck(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    """Close a websocket whose peer may not read: abort the transport if the close hangs."""
    try:
        async with asyncio.timeout(1.0):
            await ws.close(code=code, message=reason.encode())
    except (TimeoutError, ConnectionError, RuntimeError):
        transport = ws._req.transport if ws._req is not None else None
        if transport is not None:
            transport.abort()


async def deliver(
    outbox: Outbox,
    done: asyncio.Event,
    stop: Callable[[], Awaitable[None]],
    *,
    keepalive: bytes,
    every_s: float,
    name: str,
) -> bool:
    """Write ``outbox`` to a streamed response until ``done`` is set or the writer ends.

    The one subscription's response of an SSE consumer and of an admin tail: a writer task drains
    the outbox, a keepalive task queues ``keepalive`` every ``every_s``. When ``done`` is set
    what is queued gets a second to go out. Then, however it ends (the handler cancelled too):
    ``stop()`` (the caller unsubscribes), the outbox closes, and both tasks are cancelled and
    awaited, so none outlives the response. True if the writer gave up on a slow reader.
    """
    writer = asyncio.create_task(outbox.run(), name=name)
    pinger = asyncio.create_task(_keepalive(outbox, keepalive, every_s), name=f"{name}-keepalive")
    waiter = asyncio.create_task(done.wait(), name=f"{name}-waiter")
    try:
        await asyncio.wait([waiter, writer], return_when=asyncio.FIRST_COMPLETED)
        if not writer.done():
            await outbox.flush(1.0)
    finally:
        waiter.cancel()
        pinger.cancel()
        try:
            await stop()
        finally:
            outbox.close()
            writer.cancel()
            for task in (waiter, writer, pinger):
                with contextlib.suppress(asyncio.CancelledError, SlowConsumer, ConnectionError, RuntimeError):
                    await task
    return not writer.cancelled() and isinstance(writer.exception(), SlowConsumer)


async def _keepalive(outbox: Outbox, data: bytes, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)  # a periodic job, not a synchronisation
        outbox.control(data)
