"""In-memory fan-out: publications and the local subscriptions of each stream.

The publish path is synchronous: the relay calls :meth:`Hub.publish` once Redis accepted a batch
(or the broker brings another instance's write); each subscriber hands the publication's
pre-encoded bytes (encoded once per codec, for all subscribers) to its connection's queue without
awaiting. The hub also tells its listener (the broker) when a stream gains its first local
subscriber and loses its last, so that an instance follows only the streams it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from relayd.metrics import Metrics
from relayd.model import Entry
from relayd.ports import History
from relayd.protocol import FrameCodec


class Publication:
    """Entries of one stream made durable by one write, encoded lazily once per codec."""

    __slots__ = (
        "_encoded",
        "chunks",
        "end",
        "entries",
        "first",
        "gen",
        "last",
        "nbytes",
        "received",
        "stream",
        "text",
    )

    def __init__(
        self, stream: str, gen: int, entries: list[Entry], text: bool, received: float = 0.0, nbytes: int = 0
    ) -> None:
        """``received``: when (monotonic) the append was read; 0 when unknown (ends, other instances').
        ``nbytes``: the chunks' bytes (what a buffered publication holds)."""
        self.stream = stream
        self.received = received
        self.gen = gen
        self.entries = entries
        self.first = entries[0].offset
        self.last = entries[-1].offset
        self.end = entries[-1].is_end
        self.text = text
        self.chunks = len(entries) - 1 if self.end else len(entries)
        self.nbytes = nbytes
        self._encoded: dict[str, bytes] = {}

    def encoded(self, codec: FrameCodec) -> bytes:
        data = self._encoded.get(codec.kind)
        if data is None:
            data = self._encoded[codec.kind] = codec.entries(self.stream, self.gen, self.entries, self.text)
        return data

    def encoded_from(self, codec: FrameCodec, offset: int) -> bytes:
        """Only the entries from ``offset`` on (a subscriber that already had the rest)."""
        rest = [e for e in self.entries if e.offset >= offset]
        return codec.entries(self.stream, self.gen, rest, self.text)


class Follower(Protocol):
    """What the hub holds per stream: a subscription (relayd.subscription.Subscriber), or a
    Durable Streams reader waiting at the tail (relayd.durable.engine.Waiter)."""

    @property
    def stream(self) -> str: ...

    def on_publication(self, pub: Publication) -> None: ...
    def on_poke(self, gen: int, last: int) -> None: ...
    def on_resync(self) -> None: ...
    def on_created(self) -> None: ...


Interest = Callable[[str, bool], None]
"""``(stream, followed)``: the first local subscriber of ``stream`` arrived (True) or the last left."""


def _no_interest(stream: str, followed: bool) -> None:
    return None


class Hub:
    """Local subscriptions by stream id; reads go through ``history``."""

    def __init__(self, history: History, metrics: Metrics, catchup_page: int) -> None:
        self.history = history
        self.metrics = metrics
        self.catchup_page = catchup_page
        self.on_interest: Interest = _no_interest
        self._subs: dict[str, list[Follower]] = {}

    def add(self, sub: Follower) -> None:
        subs = self._subs.get(sub.stream)
        if subs is None:
            subs = self._subs[sub.stream] = []
            self.on_interest(sub.stream, True)  # before the subscriber's first read: nothing slips by
        subs.append(sub)
        self.metrics.subscriptions(1)

    def remove(self, sub: Follower) -> None:
        subs = self._subs.get(sub.stream)
        if subs is not None and sub in subs:
            subs.remove(sub)
            self.metrics.subscriptions(-1)
            if not subs:
                del self._subs[sub.stream]
                self.on_interest(sub.stream, False)

    def publish(self, pub: Publication) -> None:
        subs = self._subs.get(pub.stream)
        if subs:
            for sub in tuple(subs):  # a subscriber may finish (and leave) during the loop
                sub.on_publication(pub)

    def poke(self, stream: str, gen: int, last: int) -> None:
        """Entries up to ``last`` are in Redis though never published here: catch up who lacks them."""
        for sub in tuple(self._subs.get(stream, ())):
            sub.on_poke(gen, last)

    def resync(self, stream: str) -> None:
        """Anything may have been missed (the broker reconnected): every subscriber reads Redis again."""
        for sub in tuple(self._subs.get(stream, ())):
            sub.on_resync()

    def resync_all(self) -> None:
        """The store's connection was lost and made again: every subscriber reads Redis again."""
        for stream in list(self._subs):
            self.resync(stream)

    def created(self, stream: str) -> None:
        for sub in tuple(self._subs.get(stream, ())):
            sub.on_created()

    def followed(self) -> list[str]:
        """Streams with at least one local subscriber."""
        return list(self._subs)

    def subscriber_count(self, stream: str) -> int:
        return len(self._subs.get(stream, ()))
