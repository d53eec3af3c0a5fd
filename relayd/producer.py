"""The producer side of the relay, sans I/O: what one producer connection holds and is owed.

:class:`ProducerSession` keeps the streams a connection holds, the ops that wait for their
stream's open (pipelined producers), the ended streams it remembers, and the flow accounting
(bytes admitted but not yet acknowledged). It never writes: the relay tells its
:class:`ProducerPeer` what happened in typed calls, and the adapter (web/ingest.py) turns those
into wire frames. No loop, no socket: tests/test_producer.py drives it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from relayd.budget import Budget
from relayd.model import Opened
from relayd.protocol import AppendOp, EndOp

_ENDED_MEMORY = 1000  # ended streams a producer connection remembers, to answer stream_ended


class ProducerPeer(Protocol):
    """What the relay tells a producer connection. web/ingest.py frames each call."""

    def opened(self, stream: str, outcome: Opened, producer: str | None) -> None: ...
    def acked(self, stream: str, seq: int, gen: int, offset: int) -> None: ...
    def ended(self, stream: str, reason: str, gen: int, offset: int, message: str = "") -> None:
        """The stream ended: at this producer's request, or an operator's (unsolicited)."""
        ...

    def refused(self, stream: str | None, code: str, message: str, seq: int | None = None) -> None: ...
    def cancel(self, stream: str) -> None:
        """A consumer asked to stop the stream."""
        ...


@dataclass(slots=True)
class Held:
    """A stream a producer connection has opened."""

    epoch: int
    gen: int
    text: bool
    handle: Any  # the store's append handle for this stream and epoch
    first_chunk_due: float = 0.0  # created by this open: when (monotonic) the open was read; 0 after its first chunk


class ProducerSession:
    """Transport-agnostic state of one producer connection."""

    def __init__(
        self,
        peer: ProducerPeer,
        max_unacked_bytes: int,
        on_room: Callable[[bool], None] | None = None,
        budget: Budget | None = None,
    ) -> None:
        """``on_room(has_room)``: called when the connection crosses ``max_unacked_bytes`` either way.
        ``budget``: the bound shared by every producer connection (the relay's); charged as well."""
        self.peer = peer
        self.budget = budget
        self.held: dict[str, Held] = {}
        self.text_streams: set[str] = set()
        self.unacked_bytes = 0
        self.max_unacked_bytes = max_unacked_bytes
        self._on_room = on_room
        self.closed = False
        # When (monotonic) the message being handled was read: the start of ack and delivery latency.
        self.received_at = 0.0
        # Streams this connection held (or found ended on open) that have ended -> their epoch.
        self.ended: dict[str, int] = {}
        # Ops that arrived while their stream's open was on its way to Redis (pipelined producers),
        # with when they were read.
        self.opening: dict[str, list[tuple[AppendOp | EndOp, float]]] = {}

    @property
    def has_room(self) -> bool:
        return self.unacked_bytes < self.max_unacked_bytes

    def charge(self, nbytes: int) -> None:
        unacked = self.unacked_bytes + nbytes
        self.unacked_bytes = unacked
        if self.budget is not None:
            self.budget.charge(nbytes)
        limit = self.max_unacked_bytes
        if unacked >= limit and unacked - nbytes < limit and self._on_room is not None:
            self._on_room(False)  # crossed: no room now

    def credit(self, nbytes: int) -> None:
        unacked = self.unacked_bytes - nbytes
        self.unacked_bytes = unacked
        if self.budget is not None:
            self.budget.release(nbytes)
        limit = self.max_unacked_bytes
        if unacked < limit and unacked + nbytes >= limit and self._on_room is not None:
            self._on_room(True)  # crossed: room again

    def hold(self, stream: str, held: Held) -> None:
        self.ended.pop(stream, None)
        self.held[stream] = held
        if held.text:
            self.text_streams.add(stream)
        else:
            self.text_streams.discard(stream)

    def drop(self, stream: str) -> None:
        self.held.pop(stream, None)
        self.text_streams.discard(stream)

    def finish(self, stream: str, epoch: int | None = None) -> None:
        """``stream`` ended: drop it but remember it (bounded), so later ops get ``stream_ended``."""
        held = self.held.pop(stream, None)
        self.text_streams.discard(stream)
        if held is not None:
            epoch = held.epoch
        if epoch is None:
            epoch = self.ended.get(stream)
        if epoch is not None:
            self.ended.pop(stream, None)
            self.ended[stream] = epoch
            if len(self.ended) > _ENDED_MEMORY:
                del self.ended[next(iter(self.ended))]

    def stream_count(self) -> int:
        """Streams held or being opened (an open on its way counts against the limit)."""
        return len(self.held) + sum(1 for stream in self.opening if stream not in self.held)

    # pipelined opens ----------------------------------------------------------------------------

    def start_opening(self, stream: str) -> None:
        self.opening.setdefault(stream, [])

    def defer(self, op: AppendOp | EndOp) -> bool:
        """Hold ``op`` until its stream's open is answered; False if no open is pending."""
        pending = self.opening.get(op.stream)
        if pending is None:
            return False
        if type(op) is AppendOp:
            self.charge(op.cost)
        pending.append((op, self.received_at))
        return True

    def take_deferred(self, stream: str) -> list[tuple[AppendOp | EndOp, float]]:
        """The ops that waited for ``stream``'s open, in arrival order (their charge released)."""
        deferred = self.opening.pop(stream, [])
        for op, _ in deferred:
            if type(op) is AppendOp:
                self.credit(op.cost)
        return deferred
