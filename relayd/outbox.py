"""A connection's bounded queue of encoded frames, and how it reaches the socket.

Two paths:

- **fast**: frames queued during one event-loop tick are written at the end of that tick by one
  callback, synchronously, when the transport is not congested (the adapter supplies
  ``write_now``, which frames the batch itself and calls ``transport.write``). No task switch,
  no timer: this is the path of almost every live delivery.
- **slow**: when the transport holds more than ``_CONGESTED`` bytes (the peer is behind), or the
  adapter has no synchronous writer (SSE), one writer task sends with ``send`` and awaits the
  drain. A watchdog closes the connection (:class:`SlowConsumer`) only when the peer took no data
  at all for the send timeout; a slow but steady reader is just slow.

``offer`` refuses frames beyond ``max_bytes`` (live frames then fall back to catch-up from
Redis), ``put`` waits for room (the catch-up path, paced by the peer), ``control`` always
accepts (small answers: acks, pongs, errors).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from time import monotonic

_CONGESTED = 64 * 1024  # transport bytes beyond which writes go through the awaiting path


class SlowConsumer(Exception):
    """The peer accepted no data for the send timeout."""


class Outbox:
    def __init__(
        self,
        send: Callable[[list[bytes]], Awaitable[None]],
        max_bytes: int,
        send_timeout_s: float,
        backlog: Callable[[], int] | None = None,
        write_now: Callable[[list[bytes]], None] | None = None,
        on_written: Callable[[float], None] | None = None,
    ) -> None:
        """``on_written(seconds)``: after each write holding live data, the age of its oldest chunk."""
        self._send = send
        self._on_written = on_written
        # When (monotonic) the oldest live data queued was read from its producer; 0: none queued.
        # Set by whoever queues live data (the hub), reported and cleared by each write.
        self.oldest = 0.0
        self._write_now = write_now
        self._max_bytes = max_bytes
        self._timeout = send_timeout_s
        # Bytes the transport still holds for the peer: a waiting write is only "stuck" when
        # this stops shrinking.
        self._backlog = backlog
        self._items: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._sending = False  # the writer task owns the socket (slow path)
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._closed = False
        self._stalled = False
        self._last_backlog = 0
        self._writer: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    # queueing ---------------------------------------------------------------------------------

    def offer(self, data: bytes) -> bool:
        """Queue without waiting; False when the queue is full (live frames then fall back)."""
        if self._closed or self._size >= self._max_bytes:
            return False
        self._items.append(data)
        self._size += len(data)
        if self._size >= self._max_bytes:
            self._room.clear()
        if not self._scheduled:
            self._schedule()
        return True

    def control(self, data: bytes) -> None:
        """Queue a small control frame regardless of the limit."""
        if not self._closed:
            self._items.append(data)
            self._size += len(data)
            if not self._scheduled:
                self._schedule()

    async def put(self, data: bytes) -> None:
        """Queue, waiting for room for ``data``: the catch-up path, paced by the peer."""
        while self._size and self._size + len(data) > self._max_bytes and not self._closed:
            self._room.clear()
            await self._room.wait()
        if not self.offer(data):
            self.control(data)  # closed (dropped) or exactly at the limit after a wake-up

    def _schedule(self) -> None:
        self._scheduled = True
        self._empty.clear()
        self._loop.call_soon(self._flush)

    def _take(self) -> list[bytes]:
        batch = self._items
        self._items = []
        self._size = 0
        self._room.set()
        return batch

    def _flush(self) -> None:
        """End of the tick: write what was queued, synchronously if the socket keeps up."""
        self._scheduled = False
        if self._closed or self._sending or not self._items:
            return
        write_now = self._write_now
        if write_now is not None and (self._backlog is None or self._backlog() < _CONGESTED):
            oldest, self.oldest = self.oldest, 0.0
            try:
                write_now(self._take())
            except (ConnectionError, RuntimeError):
                self.close()  # the peer is gone; the reading side notices too
                return
            self._empty.set()
            if oldest and self._on_written is not None:
                self._on_written(monotonic() - oldest)
            return
        self._sending = True
        self._ready.set()

    # the writer task (slow path) --------------------------------------------------------------

    async def run(self) -> None:
        """Write whatever the fast path cannot, until closed. Raises :class:`SlowConsumer`."""
        self._writer = asyncio.current_task()
        while not self._closed:
            if not self._items:
                self._sending = False
                if not self._scheduled:
                    self._empty.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            self._sending = True
            oldest, self.oldest = self.oldest, 0.0
            batch = self._take()
            if self._backlog is not None:
                # what the transport will hold once this batch is written, if the peer reads nothing
                self._last_backlog = self._backlog() + sum(map(len, batch))
            self._watchdog = self._loop.call_later(self._timeout, self._check_progress)
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                if self._stalled:
                    self.close()
                    raise SlowConsumer from None
                raise
            finally:
                self._watchdog.cancel()
            if oldest and self._on_written is not None:
                self._on_written(monotonic() - oldest)

    def _check_progress(self) -> None:
        """A write has waited for the send timeout: give up unless the peer read meanwhile."""
        if self._backlog is not None:
            backlog = self._backlog()
            if backlog < self._last_backlog:
                self._last_backlog = backlog  # the peer read something: watch one more period
                self._watchdog = self._loop.call_later(self._timeout, self._check_progress)
                return
        self._stalled = True
        if self._writer is not None:
            self._writer.cancel()

    async def flush(self, timeout_s: float) -> None:
        """Best effort: let what is queued go out (before a close)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._empty.wait()

    def close(self) -> None:
        self._closed = True
        self._ready.set()
        self._room.set()
        self._empty.set()
