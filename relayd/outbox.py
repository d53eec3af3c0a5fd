"""A connection's bounded queue of encoded frames, how it reaches the socket, and its watchdog.

Two paths:

- **fast**: frames queued during one event-loop tick are written at the end of that tick by one
  callback, synchronously, when the transport is not congested (the adapter supplies
  ``write_now``, which frames the batch itself and calls ``transport.write``). No task switch,
  no timer: this is the path of almost every live delivery.
- **slow**: when the transport holds more than ``_CONGESTED`` bytes (the peer is behind), or the
  adapter has no synchronous writer (SSE), one writer task sends with ``send`` and awaits the
  drain.

A third, **direct** path (:meth:`Outbox.write_live`): the hub's end-of-tick fan-out of a stream
(relayd/hub.py, ``Fan``) writes the tick's message for that stream straight to every connection
whose queue is empty and whose transport is not congested, one frame built once for all of them,
with no queue entry, budget charge or flush per connection; a connection with anything queued,
or congested, gets the publications queued instead (``offer``), behind what waits.

Every byte relayd holds for the peer is bounded: ``offer`` refuses data beyond ``max_bytes``
(live frames then fall back to catch-up from Redis), ``put`` waits for room (the catch-up path,
paced by the peer), and ``control`` (acks, pongs, errors, keepalives) may use
``_CONTROL_RESERVE`` more; a peer whose replies pile up beyond that is closed (``queue_full``).

The watchdog ticks a few times per send timeout and looks at what the peer *took* (bytes the
kernel saw acknowledged, see :class:`Probe`), not at how long one write waited:

- ``slow_consumer``: data waits for the peer and it took none for the send timeout. A slow but
  steady reader is just slow.
- ``heartbeat_timeout`` (websockets, ``ping`` given): every ``heartbeat_s`` of silence relayd
  sends a ping; the pong is due ``heartbeat_s / 2`` after the peer *took* the ping and its last
  byte, so a ping queued behind data the peer is still reading never times out.

Either way ``on_stuck(reason)`` closes the connection (it must not rely on the peer reading;
without it the transport is aborted) and :meth:`run` ends by raising :class:`SlowConsumer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any, Protocol

from mypy_extensions import mypyc_attr

from relayd.budget import Budget

log = logging.getLogger("relayd.outbox")

_CONGESTED = 64 * 1024  # transport bytes beyond which writes go through the awaiting path
_CONTROL_RESERVE = 64 * 1024  # queue room beyond max_bytes that only control frames may use
_SLACK = 64  # unsent bytes that can only be control frames (a ping, a close): no data waits
_TICKS = 4  # watchdog ticks per send timeout
_TRICKLE = 16 * 1024  # replayed bytes queued at a time while the consumers' global budget is spent


class SlowConsumer(Exception):
    """The peer took no data for the send timeout, left too many replies unread, or went silent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Probe(Protocol):
    """What the watchdog may ask of a connection's transport (``relayd.web.transport.probe``)."""

    def __call__(self) -> int:
        """Bytes the transport still holds in user space (0 when closed)."""

    @property
    def size(self) -> Callable[[], int]:
        """The same, as the transport's own method (the fast path asks before every write; a
        closed transport may answer anything: the write that follows fails)."""

    def progress(self, written: int) -> tuple[int, int]:
        """``(taken, unsent)``: a counter of bytes the peer took (only its increase matters) and
        the bytes written that it has not taken yet; ``written`` is what the outbox wrote."""

    def abort(self) -> None:
        """Drop the connection at once (the peer takes nothing, so a graceful close would hang)."""


class LiveBatch(Protocol):
    """What :meth:`Outbox.write_live` writes: one stream's live chunks of one tick (relayd.hub.Fan)."""

    items: list[bytes]  # the frames (lines) of the websocket message
    nbytes: int  # their bytes
    chunks: int
    received: float  # when (monotonic) the oldest chunk was read; 0: unknown


# (mypyc: web/sse.py's and the tests' outboxes are subclasses defined in interpreted modules)
@mypyc_attr(allow_interpreted_subclasses=True)
class Outbox:
    def __init__(
        self,
        send: Callable[[list[bytes]], Awaitable[None]],
        max_bytes: int,
        send_timeout_s: float,
        backlog: Probe | None = None,
        write_now: Callable[[list[bytes]], None] | None = None,
        on_written: Callable[[float, int], None] | None = None,
        *,
        on_stuck: Callable[[str], None] | None = None,
        ping: Callable[[], int] | None = None,
        heartbeat_s: float = 0.0,
        on_delivered: Callable[[str, int, int], None] | None = None,
        budget: Budget | None = None,
        framer: Callable[[list[bytes]], bytes] | None = None,
        write_frame: Callable[[bytes], None] | None = None,
    ) -> None:
        """``on_written(seconds, writes)``: after writes holding live data, the age of their oldest
        chunk (``writes`` writes of that age: a fan-out reports its writes together).

        ``on_delivered(path, chunks, nbytes)``: chunks (as :meth:`offer` and :meth:`put` were told)
        are counted when written to the socket, not when queued (``chunks_written``; ``path`` is
        ``live`` for :meth:`offer`, ``replay`` for :meth:`put`).

        ``budget``: the bound shared by every consumer connection (relayd/budget.py); while it is
        spent, :meth:`offer` refuses and :meth:`put` waits until this queue has drained.

        ``framer`` and ``write_frame`` (both or neither): the fast path in two steps, instead of
        ``write_now``. ``framer`` turns a batch into the bytes for the wire and must be a pure
        function shared by many connections: consecutive flushes in one tick of the same batch by
        the same ``framer`` reuse its bytes (one publication to 1000 consumers is framed once);
        ``write_frame`` writes them to this connection.
        """
        self._budget = budget
        self._send = send
        self._on_written = on_written
        # When (monotonic) the oldest live data queued was read from its producer; 0: none queued.
        # Set by whoever queues live data (the hub), reported and cleared by each write.
        self.oldest = 0.0
        self._write_now = write_now
        self._framer = framer
        self._write_frame = write_frame if framer is not None else None
        self._max_bytes = max_bytes
        self._limit = max_bytes + _CONTROL_RESERVE
        self._timeout = send_timeout_s
        self._probe = backlog
        self._buffered = backlog.size if backlog is not None else None
        self._on_stuck = on_stuck
        self._ping = ping
        self._heartbeat = heartbeat_s
        self._on_delivered = on_delivered
        self._items: list[bytes] = []
        self._size = 0
        self.peak = 0  # the most bytes ever queued at once (the bound's check in tests)
        # chunks and bytes queued since the last write: live, then replayed
        self._queued = [0, 0, 0, 0]
        self.written = 0  # bytes handed to the transport
        self.chunks_written = 0
        self._scheduled = False
        self._sending = False  # the writer task owns the socket (slow path)
        self._loop = asyncio.get_running_loop()
        self._tick_end = _tick_end_of(self._loop)
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._waiting_room = False  # _room was cleared: the next _take sets it
        self._drained: asyncio.Event | None = None  # made by flush() when it has to wait
        self._closed = False
        self.stalled = ""  # why the watchdog gave up on the peer ("" while it has not)
        self._writer: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        # watchdog state
        self._taken = -1
        self._moved_at = self._heard_at = monotonic()
        self._ping_at = 0.0  # when the outstanding ping was sent (0: none outstanding)
        self._ping_mark = 0  # the ``taken`` count at which the peer has taken that ping
        self._ping_taken_at = 0.0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_bytes(self) -> int:
        """The largest piece of replayed data to hand :meth:`put`: the queue's size, or a trickle
        when that much would not fit the consumers' global budget (near it, each connection adds
        at most a trickle beyond it)."""
        budget = self._budget
        if budget is not None and (budget.spent or budget.used + self._max_bytes > budget.limit):
            return min(self._max_bytes, _TRICKLE)
        return self._max_bytes

    # queueing ---------------------------------------------------------------------------------

    def offer(self, data: bytes, chunks: int = 0) -> bool:
        """Queue live data (``chunks`` chunks) without waiting; False when the queue is full (it
        then falls back)."""
        # The live path of every delivery: _queue inlined (a micro-optimisation).
        size = self._size
        if self._closed or size >= self._max_bytes:
            return False
        n = len(data)
        budget = self._budget
        if budget is not None:
            if budget.spent:
                return False
            budget.charge(n)
        self._items.append(data)
        self._size = size = size + n
        if size > self.peak:
            self.peak = size
        queued = self._queued
        queued[0] += chunks
        queued[1] += n
        if not self._scheduled:
            self._scheduled = True
            self._tick_end.add(self)
        if size >= self._max_bytes:
            self._room.clear()
            self._waiting_room = True
        return True

    @property
    def writes_live(self) -> bool:
        """Whether :meth:`write_live` can write here (the websocket fast path; not SSE)."""
        return self._write_frame is not None

    def write_live(self, batch: LiveBatch) -> bool:
        """Write ``batch`` straight to the transport if nothing is queued ahead of it, it would fit the
        queue, the socket keeps up and the consumers' budget is not spent; False: nothing was done
        (the caller offers it).

        The direct path of a fan-out: the same as :meth:`offer` then the end-of-tick flush, without
        the queue (a micro-optimisation: one publication to 1000 consumers runs this 1000 times, so
        the tally and the frame cache of :class:`_TickEnd` are inlined). Called from the tick end's
        hooks only (``at_tick_end``): the counters tallied here are reported at the end of the run.
        """
        if self._items or self._sending or self._closed or batch.nbytes > self._max_bytes:
            return False  # (more than the queue takes: offer accepts what fits, then refuses)
        write_frame = self._write_frame
        buffered = self._buffered
        if write_frame is None or (buffered is not None and buffered() >= _CONGESTED):
            return False
        budget = self._budget
        if budget is not None and budget.spent:
            return False  # as offer refuses: the subscriber falls back to reading Redis
        tick = self._tick_end
        framer, items = self._framer, batch.items
        frame = tick._frame if framer is tick._framer and items is tick._framed else tick.framed(framer, items)  # type: ignore[arg-type]
        try:
            write_frame(frame)
        except (ConnectionError, RuntimeError):
            self.close()  # the peer is gone; the reading side notices too
            return True
        nbytes, chunks = batch.nbytes, batch.chunks
        self.written += nbytes
        if chunks:
            self.chunks_written += chunks
            on_delivered = self._on_delivered
            if on_delivered is not None:
                if on_delivered == tick.count_to:
                    tick.live += chunks
                    tick.live_bytes += nbytes
                else:
                    tick.count(on_delivered, chunks, nbytes)
        received, on_written = batch.received, self._on_written
        if received and on_written is not None:
            age = tick.now - received
            if age == tick.age and on_written == tick.observe_to:
                tick.ages += 1
            else:
                tick.observe(on_written, age)
        return True

    def control(self, data: bytes) -> None:
        """Queue a control frame (ack, pong, error); a peer that lets them pile up is closed."""
        if self._closed:
            return
        if self._size + len(data) > self._limit:
            self._give_up("queue_full")
            return
        self._queue(data, -1, 0)

    async def put(self, data: bytes, chunks: int = 0) -> None:
        """Queue replayed data, waiting for room for ``data``: the catch-up path, paced by the peer."""
        budget = self._budget
        while (
            self._size
            and (self._size + len(data) > self._max_bytes or (budget is not None and budget.spent))
            and not self._closed
        ):
            self._room.clear()
            self._waiting_room = True
            await self._room.wait()
        if not self._closed:
            self._queue(data, 2, chunks)

    def _queue(self, data: bytes, path: int, chunks: int) -> None:
        self._items.append(data)
        size = len(data)
        self._size = total = self._size + size
        if total > self.peak:
            self.peak = total
        if self._budget is not None:
            self._budget.charge(size)
        if path >= 0:
            queued = self._queued
            queued[path] += chunks
            queued[path + 1] += size
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        self._tick_end.add(self)

    def _take(self) -> tuple[list[bytes], list[int]]:
        batch, queued = self._items, self._queued
        self._items = []
        if self._budget is not None:
            self._budget.release(self._size)
        self._size = 0
        self._queued = [0, 0, 0, 0]
        if self._waiting_room:
            self._waiting_room = False
            self._room.set()
        return batch, queued

    def _wrote(self, batch: list[bytes], queued: list[int], oldest: float) -> None:
        """``batch`` reached the transport: count it."""
        self.written += sum(map(len, batch))
        live, live_bytes, replay, replay_bytes = queued
        if live or replay:
            self.chunks_written += live + replay
            if self._on_delivered is not None:
                if live:
                    self._on_delivered("live", live, live_bytes)
                if replay:
                    self._on_delivered("replay", replay, replay_bytes)
        if oldest and self._on_written is not None:
            self._on_written(monotonic() - oldest, 1)

    def _flush(self, tick: _TickEnd, now: float) -> None:
        """End of the tick (``now``): write what was queued, synchronously if the socket keeps up.

        The path of almost every live delivery, so :meth:`_take` and :meth:`_wrote` are inlined
        here (a micro-optimisation: one publication to 1000 consumers runs this 1000 times).
        """
        self._scheduled = False
        if self._closed or self._sending or not self._items:
            return
        write_frame = self._write_frame
        write_now = self._write_now
        buffered = self._buffered
        if (write_frame is not None or write_now is not None) and (buffered is None or buffered() < _CONGESTED):
            batch, queued, size = self._items, self._queued, self._size
            self._items = []
            self._queued = [0, 0, 0, 0]
            self._size = 0
            if self._budget is not None:
                self._budget.release(size)
            if self._waiting_room:
                self._waiting_room = False
                self._room.set()
            oldest, self.oldest = self.oldest, 0.0
            try:
                if write_frame is not None:
                    write_frame(tick.framed(self._framer, batch))  # type: ignore[arg-type]
                else:
                    write_now(batch)  # type: ignore[misc]
            except (ConnectionError, RuntimeError):
                self.close()  # the peer is gone; the reading side notices too
                return
            if self._drained is not None:
                self._drained.set()
            self.written += size
            live, live_bytes, replay, replay_bytes = queued
            if live or replay:
                self.chunks_written += live + replay
                on_delivered = self._on_delivered
                if on_delivered is not None:
                    if live:
                        # tallied by the tick: one metrics call per run of equal callbacks
                        if on_delivered == tick.count_to:
                            tick.live += live
                            tick.live_bytes += live_bytes
                        else:
                            tick.count(on_delivered, live, live_bytes)
                    if replay:
                        on_delivered("replay", replay, replay_bytes)
            if oldest and self._on_written is not None:
                age = now - oldest
                if age == tick.age and self._on_written == tick.observe_to:
                    tick.ages += 1
                else:
                    tick.observe(self._on_written, age)
            return
        self._sending = True
        self._ready.set()

    # the writer task (slow path) --------------------------------------------------------------

    async def run(self) -> None:
        """Write whatever the fast path cannot, until closed. Raises :class:`SlowConsumer`."""
        self._writer = asyncio.current_task()
        self._tick = self._loop.call_later(self._tick_s(), self._check)
        try:
            while not self._closed:
                if not self._items:
                    self._sending = False
                    if not self._scheduled and self._drained is not None:
                        self._drained.set()
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                self._sending = True
                oldest, self.oldest = self.oldest, 0.0
                batch, queued = self._take()
                # Shielded: cancelling a wait for the drain would cancel the future aiohttp shares
                # with every other writer of this connection (the close frame's among them).
                sending = asyncio.ensure_future(self._send(batch))
                sending.add_done_callback(retrieve)
                await asyncio.shield(sending)
                self._wrote(batch, queued, oldest)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            if not self.stalled:
                raise
        finally:
            self.close()
        if self.stalled:
            raise SlowConsumer(self.stalled)

    # the watchdog -----------------------------------------------------------------------------

    def heard(self) -> None:
        """The peer sent something (a pong, a frame): it is alive."""
        self._heard_at = monotonic()
        self._ping_at = 0.0

    def _tick_s(self) -> float:
        period = self._timeout if not self._heartbeat else min(self._timeout, self._heartbeat / 2)
        return period / _TICKS

    def _check(self) -> None:
        self._tick = None
        if self._closed or self._probe is None:
            return
        now = monotonic()
        taken, in_transport = self._probe.progress(self.written)
        if taken != self._taken:
            self._taken, self._moved_at = taken, now
        unsent = in_transport + self._size
        if unsent > _SLACK and now - self._moved_at >= self._timeout:
            self._give_up("slow_consumer")  # data waits and the peer took none of it
            return
        if self._ping is not None:
            if self._ping_at:
                if taken - self._ping_mark >= 0:  # the peer has the ping: the pong is due
                    if not self._ping_taken_at:
                        self._ping_taken_at = now
                    # (counted from the last byte it took: it may still be reading up to the ping)
                    due = max(self._ping_taken_at, self._moved_at)
                elif unsent <= _SLACK:
                    due = self._ping_at  # nothing but control frames ahead, and still not taken
                else:
                    due = 0.0  # behind data the peer is still reading: "slow_consumer" decides
                if due and now - due >= self._heartbeat / 2:
                    self._give_up("heartbeat_timeout")
                    return
            elif now - self._heard_at >= self._heartbeat:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    size = self._ping()  # written at once, ahead of what the queue holds
                    self.written += size
                    self._ping_at, self._ping_taken_at = now, 0.0
                    self._ping_mark = taken + in_transport + size
        self._tick = self._loop.call_later(self._tick_s(), self._check)

    def _give_up(self, reason: str) -> None:
        self.stalled = reason
        self.close()
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()
        if self._on_stuck is not None:
            self._on_stuck(reason)
        elif self._probe is not None:
            self._probe.abort()

    @property
    def _empty(self) -> bool:
        """Nothing queued, nothing waiting for the end of the tick or the writer task."""
        return self._closed or not (self._items or self._scheduled or self._sending)

    async def flush(self, timeout_s: float) -> None:
        """Best effort: let what is queued go out (before a close)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not self._empty:
                    self._drained = drained = asyncio.Event()
                    await drained.wait()

    def close(self) -> None:
        self._closed = True
        self._items = []
        if self._budget is not None:
            self._budget.release(self._size)
        self._size = 0
        self._ready.set()
        self._room.set()
        if self._drained is not None:
            self._drained.set()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None


def retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback of a write or close that outlived its waiter: its error is expected."""
    if not task.cancelled():
        task.exception()


class _TickEnd:
    """The outboxes that queued something during this event-loop tick, flushed by one callback at
    its end: a publication to 1000 consumers schedules one callback, not 1000.

    The flushes of one run share work that is the same for every connection of a fan-out
    (micro-optimisations: a publication to 1000 consumers is 1000 flushes in a row):

    - :meth:`framed` remembers the last batch it framed: the outboxes of one stream's consumers
      flush one after the other with the same publication, so its message is built once and the
      same bytes are written to every connection;
    - the live chunks written (``on_delivered``) and the delivery latency (``on_written``; the
      age is the same for every consumer of a publication) are tallied while consecutive flushes
      report to the same callback, and reported once per run of them.
    """

    __slots__ = (
        "_dirty",
        "_frame",
        "_framed",
        "_framer",
        "_hooks",
        "_loop",
        "_scheduled",
        "age",
        "ages",
        "count_to",
        "live",
        "live_bytes",
        "now",
        "observe_to",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._scheduled = False
        self._hooks: list[Callable[[], None]] = []
        self._dirty: list[Outbox] = []
        self.now = 0.0  # the run's clock (monotonic), for the hooks' direct writes
        self._framer: Callable[[list[bytes]], bytes] | None = None
        self._framed: list[bytes] = []
        self._frame = b""
        self.count_to: Callable[[str, int, int], None] | None = None
        self.live = self.live_bytes = 0
        self.observe_to: Callable[[float, int], None] | None = None
        self.age = -1.0
        self.ages = 0

    def add(self, outbox: Outbox) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)
        self._dirty.append(outbox)

    def hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at the start of the next run, before the flushes: what it queues is flushed in it."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)
        self._hooks.append(hook)

    def framed(self, framer: Callable[[list[bytes]], bytes], batch: list[bytes]) -> bytes:
        """``framer(batch)``, reusing the last result for an equal batch (its items are usually the
        very same objects: the list comparison is then by identity)."""
        if framer is self._framer and batch == self._framed:
            return self._frame
        frame = framer(batch)
        self._framer, self._framed, self._frame = framer, batch, frame
        return frame

    def count(self, to: Callable[[str, int, int], None] | None, live: int, live_bytes: int) -> None:
        """Report the live chunks tallied so far, and start a tally for ``to``."""
        if self.count_to is not None and self.live:
            self.count_to("live", self.live, self.live_bytes)
        self.count_to, self.live, self.live_bytes = to, live, live_bytes

    def observe(self, to: Callable[[float, int], None] | None, age: float) -> None:
        """Report the delivery latencies tallied so far, and start a tally of ``age`` for ``to``."""
        if self.observe_to is not None:
            self.observe_to(self.age, self.ages)
        self.observe_to, self.age, self.ages = to, age, 1

    def _run(self) -> None:
        try:
            if self._hooks:
                self.now = monotonic()
                while self._hooks:  # (a hook may add one)
                    hooks, self._hooks = self._hooks, []
                    for hook in hooks:
                        try:
                            hook()
                        except Exception:
                            log.exception("tick-end hook failed")
            dirty, self._dirty = self._dirty, []
            self._scheduled = False  # a flush that queues elsewhere schedules the next run
            self._flush_all(dirty)
        finally:
            self._framer, self._framed, self._frame = None, [], b""  # hold no frame past the tick
            self.count(None, 0, 0)
            self.observe(None, -1.0)

    def _flush_all(self, dirty: list[Outbox]) -> None:
        now = 0.0
        for n, outbox in enumerate(dirty):
            if not n & 63:  # the clock read per 64 writes, not per write: off by well under 1 ms
                now = monotonic()
            try:
                outbox._flush(self, now)
            except Exception:  # one connection's failure must not keep the others' frames
                log.exception("outbox flush failed")


_TICK_ENDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _TickEnd] = weakref.WeakKeyDictionary()


def at_tick_end(hook: Callable[[], None]) -> None:
    """Run ``hook`` at the end of this event-loop tick, before the outboxes that queued in it flush
    (the hub's fan-out: what it writes directly goes before, what it queues goes out in that run)."""
    _tick_end_of(asyncio.get_running_loop()).hook(hook)


def _tick_end_of(loop: asyncio.AbstractEventLoop) -> _TickEnd:
    tick_end = _TICK_ENDS.get(loop)
    if tick_end is None:
        tick_end = _TICK_ENDS[loop] = _TickEnd(loop)
    return tick_end
