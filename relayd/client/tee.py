"""``Producer.tee``: one upstream, two readers: relayd (always, to the end) and an HTTP response.

The upstream is read by a background task the Producer holds, never by the HTTP handler's
task: cancelling the handler (the client disconnected) would otherwise throw ``CancelledError``
into the upstream and kill the relay copy too. The handler reads from a bounded buffer instead.

The buffer is shared state (:class:`_Buffer`) that the background task holds; the :class:`Tee`
the handler iterates holds it too, and detaches it when closed, cancelled, or garbage-collected
(``weakref.finalize``), so a handler that simply stops iterating never stalls the relay side.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from relayd.client.errors import ProducerClosed

if TYPE_CHECKING:
    from relayd.client.producer import Producer
    from relayd.client.writer import StreamResult, Writer

__all__ = ["Tee"]

log = logging.getLogger("relayd.client")

_DONE = object()


class _Buffer:
    """Items on their way to the HTTP side, at most ``size``; empty and inert once detached."""

    def __init__(self, size: int) -> None:
        self.size = max(size, 1)
        self.items: deque[Any] = deque()
        self.attached = True
        self.finished = False
        self.error: BaseException | None = None
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    async def put(self, item: Any) -> None:
        while self.attached and len(self.items) >= self.size:
            self.writable.clear()
            await self.writable.wait()
        if self.attached:
            self.items.append(item)
            self.readable.set()

    def finish(self, error: BaseException | None) -> None:
        self.finished = True
        self.error = error
        self.readable.set()

    def detach(self) -> None:
        self.attached = False
        self.items.clear()
        self.writable.set()
        self.readable.set()


class Tee:
    """The HTTP side of :meth:`Producer.tee`: an async iterator of the upstream's items.

    Iteration ends when the upstream ends or a consumer cancelled the stream; if the upstream
    raised, its exception is raised here after the items before it. ``result`` is the relay
    side's :class:`StreamResult` once the stream has ended. ``aclose()`` (or leaving
    ``async with``) detaches the HTTP side without stopping the relay side.
    """

    def __init__(
        self, producer: Producer, writer: Writer, upstream: AsyncIterable[Any] | Iterable[Any], buffer: int
    ) -> None:
        self.stream = writer.stream
        self.result: StreamResult | None = None
        self._buffer = _Buffer(buffer)
        self._finalizer = weakref.finalize(self, self._buffer.detach)
        self.task = producer._spawn_tee(
            _relay(producer, writer, upstream, self._buffer, weakref.ref(self)), f"relayd-tee-{writer.stream}"
        )

    def __aiter__(self) -> Tee:
        return self

    async def __anext__(self) -> Any:
        buffer = self._buffer
        while not buffer.items:
            if not buffer.attached:
                raise StopAsyncIteration
            if buffer.finished:
                error, buffer.error = buffer.error, None
                buffer.attached = False
                if error is not None:
                    raise error
                raise StopAsyncIteration
            buffer.readable.clear()
            try:
                await buffer.readable.wait()
            except asyncio.CancelledError:
                buffer.detach()  # the HTTP side is gone; the relay side carries on
                raise
        item = buffer.items.popleft()
        buffer.writable.set()
        return item

    async def aclose(self) -> None:
        """Stop feeding this iterator; the relay side carries on."""
        self._buffer.detach()

    async def __aenter__(self) -> Tee:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._buffer.detach()


async def _relay(
    producer: Producer,
    writer: Writer,
    upstream: AsyncIterable[Any] | Iterable[Any],
    buffer: _Buffer,
    tee: weakref.ref[Tee],
) -> None:
    try:
        result = await producer.pipe(writer, upstream, tap=buffer.put, raise_on_error=False)
    except asyncio.CancelledError:
        # The Producer cancelled the relay side (closing): the HTTP side did not cause that
        # cancellation, so it must not see a CancelledError of its own task's making.
        buffer.finish(ProducerClosed(f"the Producer closed while stream {writer.stream} was being relayed"))
        raise
    except BaseException as exc:
        buffer.finish(exc)
        if not isinstance(exc, Exception):
            raise
        log.warning("relayd tee of stream %s failed: %s", writer.stream, exc)
        return
    holder = tee()
    if holder is not None:
        holder.result = result
    buffer.finish(result.error)
    if result.error is not None and not buffer.attached:
        log.warning("relayd tee of stream %s: upstream failed: %s", writer.stream, result.error)
