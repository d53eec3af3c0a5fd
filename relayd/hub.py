"""In-memory fan-out: publications and the local subscriptions of each stream.

The publish path is synchronous: the relay calls :meth:`Hub.publish` once Redis accepted a batch
(or the broker brings another instance's write); each subscriber hands the publication's
pre-encoded bytes (encoded once per codec, for all subscribers) to its connection's queue without
awaiting.

Subscribers whose connection can take a websocket message directly (:class:`FanFollower`: the
consumer websocket's outbox) are not handed each publication: the stream's publications of one
event-loop tick are collected and, at the end of the tick, go to every one of them in one loop
(:class:`Fan`): a subscriber that is live, next in line and whose connection has nothing queued
and keeps up gets the tick's message written straight to its socket, the same bytes for all of
them (no queue entry, budget charge or flush per connection); any other is handed each
publication as the others are, in order, and queues it (relayd/outbox.py, the direct path).

The hub also tells its listener (the broker) when a stream gains its first local subscriber and
loses its last, so that an instance follows only the streams it serves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from relayd.metrics import Metrics
from relayd.model import Entry
from relayd.outbox import at_tick_end
from relayd.ports import History
from relayd.protocol import FrameCodec

log = logging.getLogger("relayd.hub")


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


class FanFollower(Follower, Protocol):
    """A follower that can take a tick's publications as one :class:`Fan` (relayd.subscription.Subscriber
    over a consumer websocket's outbox)."""

    @property
    def codec(self) -> FrameCodec: ...

    def on_fan_out(self, fan: Fan) -> bool:
        """Take all of ``fan`` at once; False: hand me its publications one by one instead."""
        ...


class Fan:
    """One stream's publications of one tick, one run of offsets of one generation, encoded once
    for ``codec``: what :meth:`FanFollower.on_fan_out` writes (relayd.outbox.LiveBatch)."""

    __slots__ = ("chunks", "codec", "end", "first", "gen", "items", "last_entry", "nbytes", "next", "received")

    def __init__(self, pubs: list[Publication], codec: FrameCodec) -> None:
        """``pubs``: in order, contiguous, of one generation, only the last one may hold the end."""
        first, last = pubs[0], pubs[-1]
        self.codec = codec
        self.gen = first.gen
        self.first = first.first
        self.next = last.last + 1  # the subscriber's next offset once it has the fan
        self.last_entry = last.entries[-1]
        self.end = last.end
        self.items = [pub.encoded(codec) for pub in pubs]  # the websocket message's lines
        self.nbytes = sum(map(len, self.items))
        self.chunks = sum(pub.chunks for pub in pubs)
        # the oldest known read time (as an outbox's ``oldest``: the first publication that has one)
        self.received = next((pub.received for pub in pubs if pub.received), 0.0)

    @staticmethod
    def of(pubs: list[Publication], codec: FrameCodec) -> Fan | None:
        """The fan of ``pubs``, or None when they are not one run (a hole, another generation, an
        end before the last: rare, and then each subscriber takes them one by one)."""
        prev = pubs[0]
        for pub in pubs[1:]:
            if pub.first != prev.last + 1 or pub.gen != prev.gen or prev.end:
                return None
            prev = pub
        return Fan(pubs, codec)


class _Stream:
    """How the local followers of one stream take its publications."""

    __slots__ = ("fanned", "now", "pending")

    def __init__(self) -> None:
        self.now: list[Follower] = []  # handed each publication as it is published
        self.fanned: list[FanFollower] = []  # given the tick's publications at its end, as a Fan
        self.pending: list[Publication] = []  # this tick's publications, for ``fanned``


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
        self._subs: dict[str, list[Follower]] = {}  # every follower (pokes, resyncs, counts)
        self._streams: dict[str, _Stream] = {}  # the same, by how they take publications
        self._dirty: list[_Stream] = []  # streams with publications pending for the end of the tick

    def add(self, sub: Follower, fan: FanFollower | None = None) -> None:
        """Follow ``sub.stream``; ``fan`` (``sub`` itself): it takes the tick's publications as a :class:`Fan`."""
        subs = self._subs.get(sub.stream)
        if subs is None:
            subs = self._subs[sub.stream] = []
            self._streams[sub.stream] = _Stream()
            self.on_interest(sub.stream, True)  # before the subscriber's first read: nothing slips by
        subs.append(sub)
        if fan is not None:
            self._streams[sub.stream].fanned.append(fan)
        else:
            self._streams[sub.stream].now.append(sub)
        self.metrics.subscriptions(1)

    def remove(self, sub: Follower) -> None:
        subs = self._subs.get(sub.stream)
        if subs is not None and sub in subs:
            subs.remove(sub)
            followers = self._streams[sub.stream]
            if sub in followers.now:
                followers.now.remove(sub)
            else:
                followers.fanned.remove(sub)  # type: ignore[arg-type]  # (the same object)
            self.metrics.subscriptions(-1)
            if not subs:
                del self._subs[sub.stream], self._streams[sub.stream]
                followers.pending.clear()  # nobody left to give them to
                self.on_interest(sub.stream, False)

    def publish(self, pub: Publication) -> None:
        followers = self._streams.get(pub.stream)
        if followers is None:
            return
        if followers.fanned:
            if not followers.pending:
                if not self._dirty:
                    at_tick_end(self._fan_out)
                self._dirty.append(followers)
            followers.pending.append(pub)
        if followers.now:
            for sub in tuple(followers.now):  # a subscriber may finish (and leave) during the loop
                sub.on_publication(pub)

    def _fan_out(self) -> None:
        """The end of the tick: each stream's pending publications to its fanned followers, in one loop."""
        dirty, self._dirty = self._dirty, []
        for followers in dirty:
            pubs, followers.pending = followers.pending, []
            subs = tuple(followers.fanned)  # (a follower may leave during the loop)
            if not pubs or not subs:
                continue
            fan = Fan.of(pubs, subs[0].codec)
            for sub in subs:
                try:
                    if fan is None or not sub.on_fan_out(fan):
                        for pub in pubs:  # handed over as any publication: in order, behind what waits
                            sub.on_publication(pub)
                except Exception:  # one subscriber's failure must not cost the others their data
                    log.exception("fan-out to a subscriber of %s failed", sub.stream)

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
