"""A bound on the bytes relayd holds for a kind of peer, all connections together.

Per-connection limits (``limits.max_unacked_bytes``, ``consumer.max_queue_bytes``) keep one peer
from taking everything, but 1000 producers at 1 MiB each are still a gigabyte. A :class:`Budget`
is shared by every connection of one kind:

- producers (``limits.max_producer_backlog_bytes``): appends admitted and not yet acknowledged.
  When it is spent, every producer connection stops reading until acknowledgements bring it under
  its low-water mark (``_RESUME`` of the limit): overload turns into TCP back-pressure on the
  producers (their latency rises, relayd's memory does not).
- consumers (``limits.max_consumer_backlog_bytes``): frames queued for consumers. When it is spent,
  live frames are not queued; the subscriptions fall back to reading from Redis, paced by their
  peer, as they do when their own queue is full.

Pure accounting: the waiting side (:meth:`wait`) is an :class:`asyncio.Event`, which binds to no
loop until awaited.
"""

from __future__ import annotations

import asyncio

_RESUME = 0.75  # a spent budget opens again below this fraction of its limit


class Budget:
    """Bytes held for peers, counted against one limit."""

    __slots__ = ("_open", "_resume", "limit", "peak", "spent", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        # No more may be admitted until enough is released (hysteresis: see ``_RESUME``). A plain
        # attribute: every delivery reads it.
        self.spent = False
        self._resume = int(limit * _RESUME)
        self._open = asyncio.Event()
        self._open.set()

    def charge(self, nbytes: int) -> None:
        used = self.used + nbytes
        self.used = used
        if used > self.peak:
            self.peak = used
        if used >= self.limit and not self.spent:
            self.spent = True
            self._open.clear()

    def release(self, nbytes: int) -> None:
        used = self.used - nbytes
        self.used = used
        if self.spent and used <= self._resume:
            self.spent = False
            self._open.set()

    async def wait(self) -> None:
        """Until the budget is open again."""
        await self._open.wait()
