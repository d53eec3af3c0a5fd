"""The Durable Streams protocol on relayd's engine: writes through the store, live reads through the hub.

Every write is one store script (atomic with its checks) sent through the group-commit pipeline;
once it is durable, what it wrote is published to the hub like a producer's append, so relayd's
own consumers of the stream follow it live, and so do Durable Streams readers waiting at the
tail (long-poll, SSE), here or, through the broker, on another instance.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from relayd.durable.codec import Offset, kind_of
from relayd.hub import Hub, Publication
from relayd.metrics import Metrics
from relayd.model import DsRead, DsSpec, DsWrite, Entry, now_ms
from relayd.ports import DurableStore


class Waiter:
    """A reader at a stream's tail: woken by anything the hub hears of the stream."""

    def __init__(self, hub: Hub, stream: str) -> None:
        self._hub = hub
        self._stream = stream
        self.event = asyncio.Event()

    @property
    def stream(self) -> str:
        return self._stream

    def on_publication(self, pub: Publication) -> None:
        self.event.set()

    def on_poke(self, gen: int, last: int) -> None:
        self.event.set()

    def on_resync(self) -> None:
        self.event.set()

    def on_created(self) -> None:
        self.event.set()

    def __enter__(self) -> Waiter:
        self._hub.add(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hub.remove(self)

    async def wait(self, timeout_s: float) -> bool:
        """Wait for news until ``timeout_s``; False on timeout. Clears the news."""
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await self.event.wait()
        except TimeoutError:
            return False
        self.event.clear()
        return True


class DurableStreams:
    """The protocol's operations on one store and hub (``relay.durable``)."""

    def __init__(self, store: DurableStore, hub: Hub, metrics: Metrics, read_max_entries: int) -> None:
        self._store = store
        self._hub = hub
        self._metrics = metrics
        self._read_max_entries = read_max_entries

    async def create(self, stream: str, spec: DsSpec, chunks: list[bytes]) -> DsWrite:
        outcome = await self._store.ds_create(stream, spec, chunks, now_ms())
        if outcome.code == "created":
            self._metrics.stream_started()
            self._hub.created(stream)  # relayd consumers waiting for the stream to exist
        return outcome

    async def append(
        self,
        stream: str,
        media: str,
        chunks: list[bytes],
        *,
        close: bool = False,
        stream_seq: str = "",
        producer: tuple[str, int, int] | None = None,
    ) -> DsWrite:
        outcome = await self._store.ds_append(
            stream, media, chunks, now_ms(), close=close, stream_seq=stream_seq, producer=producer
        )
        if outcome.code == "ok":
            # durable first: published only now that the store has it
            entries = [Entry(outcome.first + i, chunk) for i, chunk in enumerate(chunks)]
            nbytes = sum(len(c) for c in chunks)
            if entries:
                self._metrics.chunks_stored(len(entries), nbytes)
            if close:
                entries.append(Entry(outcome.last + 1, None, "completed", ""))
            if entries:
                text = kind_of(media) == "text"
                self._hub.publish(Publication(stream, outcome.gen, entries, text, nbytes=nbytes))
        return outcome

    async def read(
        self, stream: str, offset: Offset, max_bytes: int, *, touch: bool = True, count: int | None = None
    ) -> DsRead | None:
        """Entries after ``offset`` (``now``: none, after the tail), at most ``max_bytes`` of data
        (one entry at least). ``after`` -1: an offset the stream never issued."""
        if count is None:
            count = 0 if offset.now else self._read_max_entries
        read = await self._store.ds_read(stream, offset.gen, offset.after, count, now_ms(), touch=touch)
        if read is None:
            return None
        if offset.now:
            return DsRead(read.state, read.state.tail, [])
        return _bounded(read, max_bytes)

    async def head(self, stream: str) -> DsRead | None:
        """The stream's state; a HEAD does not restart a sliding TTL."""
        return await self.read(stream, Offset(now=True), 0, touch=False)

    async def read_live(self, stream: str, offset: Offset, max_bytes: int, timeout_s: float) -> DsRead | None:
        """As :meth:`read`, waiting up to ``timeout_s`` at the tail of an open stream for data."""
        with Waiter(self._hub, stream) as waiter:  # before the read: nothing slips in between
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            read = await self.read(stream, offset, max_bytes)
            if read is None or read.after < 0:
                return read
            offset = Offset(read.state.gen, read.after)  # ``now`` resolved: from here on
            while not read.entries and not read.state.closed:
                if not await waiter.wait(deadline - loop.time()):
                    return read
                later = await self.read(stream, offset, max_bytes)
                if later is None or later.after < 0 or later.state.gen != read.state.gen:
                    return later  # deleted (and maybe created again) meanwhile
                read = later
            return read

    def follow(self, stream: str) -> Waiter:
        """A waiter for an SSE response: ``with engine.follow(stream) as waiter: ...``."""
        return Waiter(self._hub, stream)

    async def delete(self, stream: str) -> bool:
        deleted = await self._store.ds_delete(stream, now_ms())
        if deleted:
            self._hub.resync(stream)  # readers of the stream find out it is gone
        return deleted


def _bounded(read: DsRead, max_bytes: int) -> DsRead:
    """The first entries of ``read`` holding at most ``max_bytes`` of data (one at least)."""
    size = 0
    for i, entry in enumerate(read.entries):
        size += len(entry.data or b"")
        if size > max_bytes and i > 0:
            return DsRead(read.state, read.after, read.entries[:i])
    return read
