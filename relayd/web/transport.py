"""The connection's transport, where aiohttp offers no public handle for what relayd needs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web


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
