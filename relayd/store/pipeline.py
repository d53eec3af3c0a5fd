"""Group commit for the write path: writes from every connection, one pipeline per batch.

Private to the store: the engine calls :class:`~relayd.store.redis.RedisStore`'s typed write
methods, which queue a :class:`Write` here. A write is one pre-encoded Redis command plus the
callback that turns its reply into an outcome. The first write of a quiet period is
flushed at the end of the current event-loop tick (or after ``batch.linger_ms``); while
``batch.max_inflight`` batches are on the wire, new writes accumulate and leave together when a
reply comes back. Low load gets the lowest latency, high load gets large batches.

Callbacks run in submission order: this is what lets the relay publish to the hub in append
order. On one server the replies arrive in that order; on a cluster (one connection per master)
a later batch can be answered first, so answered batches wait for the ones before them. When
the wire fails, every batch on it is resent in order after reconnecting (the scripts are
idempotent: appends are deduplicated by producer sequence number), for up to
``redis.retry_ms``; after that their writes fail with :class:`StoreUnavailable`.

The wire (store/wire.py) is one connection to a single server or a
:class:`~relayd.store.cluster.ClusterWriter`; each write carries its hash slot for the latter
(0 on a single server, where it is not read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import hiredis

from relayd.config import BatchConfig
from relayd.errors import StoreError, StoreUnavailable
from relayd.metrics import Metrics

log = logging.getLogger("relayd.store.pipeline")

WriteCallback = Callable[[Any, BaseException | None], None]


class Write:
    """One command, its cluster hash slot, and what to do with its reply (or the exception that
    replaced it)."""

    __slots__ = ("callback", "payload", "slot")

    def __init__(self, payload: bytes, done: WriteCallback, slot: int) -> None:
        self.payload = payload
        self.callback = done
        self.slot = slot

    def done(self, reply: Any, exc: BaseException | None) -> None:
        """The reply (or the exception that replaced it). A method, which subclasses override
        (store/appends.py), not an attribute they replace with one: compiled by mypyc, the pipeline
        would read the attribute's slot and never see the override."""
        self.callback(reply, exc)

    def fallback(self) -> bytes | None:
        """The command to send instead if this one has to be sent again (its connection was lost,
        or it waited for one to be made again): the server may then have lost writes it had
        acknowledged, which a plain XADD cannot notice and its script can (store/appends.py).
        None: send it as it is."""
        return None


def use_fallbacks(writes: Any) -> None:
    """Writes about to be sent on a connection made again: their fallback commands instead."""
    for write in writes:
        alt = write.fallback()
        if alt is not None:
            write.payload = alt


class Wire(Protocol):
    """The connection side of the store that the pipeline drives (store/wire.py)."""

    def send(self, writes: list[Write]) -> asyncio.Future[list[Any]]:
        """Send the writes' commands; a future of their replies, in order (StoreUnavailable: not sent)."""
        ...

    async def reconnect(self) -> None:
        """Connect again if the connection was lost, and (re)load the scripts."""
        ...

    def abort(self) -> None:
        """Drop the connection that owes replies past the deadline: its batches fail."""
        ...


class Pipeline:
    """Batches writes from every connection into pipelined round trips, in submission order."""

    def __init__(
        self,
        wire: Wire,
        cfg: BatchConfig,
        retry_ms: int,
        timeout_ms: int,
        metrics: Metrics,
        recovered: Callable[[], None],
    ) -> None:
        """``recovered()``: writes flow again after a lost connection (Redis may have restarted or
        failed over, and lost entries)."""
        self._wire = wire
        self._recovered = recovered
        self._max_ops = cfg.max_ops
        self._max_bytes = cfg.max_bytes
        self._max_inflight = cfg.max_inflight
        self._linger_s = cfg.linger_ms / 1000
        self._retry_s = retry_ms / 1000
        self._timeout_s = timeout_ms / 1000
        self._metrics = metrics
        self._queue: deque[Write] = deque()
        self._inflight: deque[_Sent] = deque()  # batches on the wire, in submission order
        self._scheduled = False
        self._failed: deque[list[Write]] = deque()
        self._recovery: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._wire_empty = asyncio.Event()  # no batch on the wire
        self._wire_empty.set()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def submit(self, write: Write) -> None:
        self._queue.append(write)
        self._idle.clear()
        if not self._scheduled and len(self._inflight) < self._max_inflight and self._recovery is None:
            self._scheduled = True
            if self._linger_s:
                self._loop.call_later(self._linger_s, self._flush)
            else:
                self._loop.call_soon(self._flush)

    async def drain(self) -> None:
        """Wait until every submitted write has been answered (or failed)."""
        await self._idle.wait()

    async def close(self) -> None:
        self._closed = True
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        for batch in self._failed:
            _fail_all(batch, StoreUnavailable("relayd is shutting down"))
        _fail_all(self._queue, StoreUnavailable("relayd is shutting down"))
        self._failed.clear()
        self._queue.clear()
        self._idle.set()

    # internals --------------------------------------------------------------------------------

    def _take(self) -> tuple[list[Write], int]:
        """The next batch and its size in bytes."""
        queue = self._queue
        if len(queue) <= self._max_ops:
            batch = list(queue)
            queue.clear()
            size = sum([len(w.payload) for w in batch])
            if size <= self._max_bytes:
                return batch, size
            queue.extend(batch)
        batch, size = [], 0
        while queue and len(batch) < self._max_ops and (not batch or size + len(queue[0].payload) <= self._max_bytes):
            write = queue.popleft()
            size += len(write.payload)
            batch.append(write)
        return batch, size

    def _flush(self) -> None:
        self._scheduled = False
        inflight = self._inflight
        while self._queue and len(inflight) < self._max_inflight and self._recovery is None:
            batch, size = self._take()
            try:
                future = self._wire.send(batch)
            except StoreUnavailable as exc:
                self._on_failure(batch, exc)
                return
            self._wire_empty.clear()
            self._metrics.batch_sent(len(batch), size)
            # A Redis that accepts the connection but never answers (paused, overloaded) must not
            # hold writes forever: past redis.timeout_ms the connection is dropped and recovery runs.
            sent = _Sent(batch, future, time.perf_counter(), self._loop.call_later(self._timeout_s, self._wire.abort))
            inflight.append(sent)
            future.add_done_callback(self._on_reply)

    def _on_reply(self, _: asyncio.Future[list[Any]]) -> None:
        # Answered batches are resolved in submission order: on a cluster a later batch (other
        # masters) can be answered before an earlier one, whose callbacks must run first.
        inflight = self._inflight
        while inflight and inflight[0].future.done():
            sent = inflight.popleft()
            sent.timer.cancel()
            future = sent.future
            exc = future.exception()
            if exc is None and self._failed:
                # An earlier batch failed and waits for its resend: a later one must not be
                # resolved before it (submission order). Resending it is safe: scripts are idempotent.
                exc = StoreUnavailable("an earlier batch is being resent")
            if exc is None:
                replies = future.result()
                if any(isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT") for r in replies):
                    exc = StoreUnavailable("Redis lost relayd's scripts (restarted?)")
                else:
                    self._metrics.batch_done(time.perf_counter() - sent.started)
                    _resolve(sent.batch, replies)
            if exc is not None:
                self._on_failure(sent.batch, exc)
        if not inflight:
            self._wire_empty.set()
        self._after_batch()

    def _after_batch(self) -> None:
        if self._queue:
            if self._recovery is None and not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush)
        elif not self._inflight and self._recovery is None:
            self._idle.set()

    def _on_failure(self, batch: list[Write], exc: BaseException) -> None:
        if self._closed:  # a batch still on the wire when the store closed: no recovery any more
            _fail_all(batch, StoreUnavailable("relayd is shutting down"))
            return
        self._metrics.redis_error()
        use_fallbacks(batch)
        self._failed.append(batch)
        if self._recovery is None:
            log.warning("redis write failed, retrying: %s", exc)
            self._recovery = asyncio.create_task(self._recover(), name="relayd-write-recovery")

    async def _recover(self) -> None:
        deadline = time.monotonic() + self._retry_s
        delay = 0.05
        try:
            while True:
                # let batches still on the wire fail or finish first, so order is kept
                await self._wire_empty.wait()
                try:
                    await self._wire.reconnect()
                    while self._failed:
                        batch = self._failed[0]
                        try:
                            async with asyncio.timeout(self._timeout_s):
                                replies = await self._wire.send(batch)
                        except TimeoutError:
                            self._wire.abort()
                            raise StoreUnavailable("Redis did not answer in time") from None
                        if any(isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT") for r in replies):
                            raise StoreUnavailable("scripts missing after reload")
                        self._failed.popleft()
                        _resolve(batch, replies)
                    self._metrics.redis_health(True)
                    log.info("redis writes recovered")
                    use_fallbacks(self._queue)  # encoded before the store learns of the reconnect
                    self._recovered()
                    return
                except (StoreUnavailable, StoreError) as exc:
                    if time.monotonic() >= deadline:
                        log.error(
                            "redis unavailable for %.1fs, failing %d batches: %s", self._retry_s, len(self._failed), exc
                        )
                        while self._failed:
                            _fail_all(self._failed.popleft(), StoreUnavailable(str(exc)))
                        return
                    await asyncio.sleep(delay)  # back-off between reconnect attempts
                    delay = min(delay * 2, 1.0)
        finally:
            self._recovery = None
            self._after_batch()


class _Sent:
    """A batch on the wire."""

    __slots__ = ("batch", "future", "started", "timer")

    def __init__(
        self, batch: list[Write], future: asyncio.Future[list[Any]], started: float, timer: asyncio.TimerHandle
    ) -> None:
        self.batch = batch
        self.future = future
        self.started = started
        self.timer = timer


def _resolve(batch: list[Write], replies: list[Any]) -> None:
    for write, reply in zip(batch, replies, strict=True):
        try:
            write.done(reply, None)
        except Exception:  # one bad callback must not stall the batch
            log.exception("write callback failed")


def _fail_all(writes: Any, exc: BaseException) -> None:
    for write in writes:
        try:
            write.done(None, exc)
        except Exception:
            log.exception("write callback failed")
