"""Reading an upstream (what a model SDK yields) into a stream, and closing it when stopped.

Closing matters for cancel: a consumer's cancel must stop the generation itself, not just
the relaying, so the upstream's HTTP response (OpenAI ``AsyncStream``) or generator is closed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relayd.client.writer import Writer

__all__ = ["aiter_of", "close_after", "close_upstream", "pump_into"]

log = logging.getLogger("relayd.client")


async def _from_sync(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def aiter_of(source: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    """An async iterator over ``source``; a sync iterable is iterated on the loop (must not block)."""
    if isinstance(source, AsyncIterable):
        return aiter(source)
    if isinstance(source, Iterable):
        return _from_sync(source)
    raise TypeError(f"source must be an iterable or async iterable, got {type(source).__name__}")


async def pump_into(writer: Writer, iterator: AsyncIterator[Any], tap: Callable[[Any], Awaitable[None]] | None) -> None:
    """Send every item to ``writer``; ``tap(item)`` first sees it (the HTTP side of a tee)."""
    async for item in iterator:
        if tap is not None:
            await tap(item)
        await writer.send(item)


async def close_upstream(source: object, iterator: object) -> None:
    """Close what was being iterated: our iterator, then the source if it is another object.

    ``aclose()`` is preferred; ``close()`` is awaited if it returns an awaitable (OpenAI's
    ``AsyncStream.close`` is a coroutine, ``Stream.close`` and generators' are not). Errors are
    logged: a failing close must not hide how the stream ended.
    """
    done: list[object] = []
    for obj in (iterator, source):
        if any(obj is seen for seen in done):
            continue
        done.append(obj)
        closer = getattr(obj, "aclose", None) or getattr(obj, "close", None)
        if not callable(closer):
            continue
        try:
            result = closer()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.warning("closing the upstream %r failed", obj, exc_info=True)


async def close_after(pump: asyncio.Task[None], source: object, iterator: object) -> None:
    """Close the upstream once the (cancelled) pump has let go of it."""
    await asyncio.wait((pump,))
    await close_upstream(source, iterator)
