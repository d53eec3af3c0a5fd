"""The engine's seams: what the relay needs of a store, as typed Protocols. No I/O here.

Implementations: :class:`relayd.store.redis_streams.RedisStore` (Redis or Valkey) and
:class:`relayd.store.memory.MemoryStore` (the same contract in memory, for unit tests). The
contract is one test suite run against both (tests/test_store_contract.py).

Writes are callback style, not awaitable: the websocket hot path must not pay a future per
operation. Callbacks run in submission order (the relay relies on it to publish in append order),
on the event loop, never synchronously inside the call that queued the write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from relayd.model import (
    AppendOutcome,
    DsRead,
    DsSpec,
    DsWrite,
    EndOutcome,
    Entry,
    FramedPage,
    OpenOutcome,
    StreamMeta,
    StreamStats,
)


class History(Protocol):
    """What a subscription reads: a stream's meta and its entries."""

    async def read_meta(self, stream: str) -> StreamMeta | None: ...

    async def read_entries(self, stream: str, gen: int, first: int, count: int) -> list[Entry]:
        """Up to ``count`` entries of generation ``gen`` from offset ``first`` on, in order."""
        ...


class FramedHistory(History, Protocol):
    """A history that can also frame a page of chunks itself (the Redis store)."""

    async def read_frames(self, stream: str, gen: int, first: int, count: int, template: bytes) -> FramedPage | None:
        """As :meth:`History.read_entries`, each chunk framed as ``template % (offset, data)``, the
        offset as 10 ASCII digits; None when this page cannot be framed so (read it as entries)."""
        ...


class Catalog(Protocol):
    """The admin reads (relayd/catalog.py): listing, describing and removing streams."""

    async def scan_streams(self, cursor: int, id_prefix: str, count: int) -> tuple[int, list[str]]: ...
    async def scan_open(self, cursor: int, id_prefix: str, count: int) -> tuple[int, list[str]]: ...
    async def open_count(self) -> int: ...
    async def stream_heads(self, streams: list[str]) -> list[tuple[int, bool] | None]: ...
    async def stream_stats(self, streams: list[str]) -> list[StreamStats | None]: ...
    async def log_edges(self, stream: str) -> tuple[int, int] | None: ...
    async def delete_stream(self, stream: str) -> bool: ...


class DurableStore(Protocol):
    """The Durable Streams mount's writes and reads (relayd/durable/): each one atomic in the store.

    Entries are relayd's own (``<gen>-<offset>``, one chunk each, the end entry when closed), so
    the streams stay readable by relayd's consumers. A stream past its Durable Streams deadline
    (``Stream-TTL`` without access, ``Stream-Expires-At``) is gone: these calls remove it.
    """

    async def ds_create(self, stream: str, spec: DsSpec, chunks: list[bytes], now: int) -> DsWrite:
        """Create ``stream`` with ``chunks`` (closed if ``spec.closed``), or compare with it."""
        ...

    async def ds_append(
        self,
        stream: str,
        media: str,
        chunks: list[bytes],
        now: int,
        *,
        close: bool = False,
        stream_seq: str = "",
        producer: tuple[str, int, int] | None = None,
    ) -> DsWrite:
        """Append ``chunks`` (``media``: the body's media type, "" for a close only); checks in
        the protocol's order: closed, content type, producer (id, epoch, seq), Stream-Seq."""
        ...

    async def ds_read(
        self, stream: str, gen: int | None, after: int, count: int, now: int, *, touch: bool = True
    ) -> DsRead | None:
        """Up to ``count`` entries after offset ``after`` of generation ``gen`` (None, or an older
        generation: from the start). An offset the stream never issued (a newer generation, past
        the tail) answers ``after`` -1 and no entries. ``touch``: a read that restarts a sliding
        TTL (not HEAD). None: no such stream."""
        ...

    async def ds_delete(self, stream: str, now: int) -> bool: ...


class Store(History, Catalog, DurableStore, Protocol):
    """Durable streams: typed writes with outcome callbacks, reads, lifecycle."""

    on_reconnect: Callable[[], None]
    """Set by the relay: called when writes flow again after a lost connection. Redis may have
    restarted or failed over and lost entries, so every subscriber checks what it delivered."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def drain(self) -> None:
        """Wait until every write queued so far has been answered (or failed)."""
        ...

    async def ping(self) -> None: ...

    def open(
        self,
        stream: str,
        epoch: int | None,
        content_type: str,
        producer: str | None,
        done: Callable[[OpenOutcome], None],
    ) -> None: ...

    def append_handle(self, stream: str, epoch: int, gen: int = 0) -> Any:
        """An opaque value :meth:`append` takes for ``stream`` in ``epoch`` of generation ``gen``
        (0: any), computed once per open. An append to another generation is refused fenced."""
        ...

    def append(self, handle: Any, seq: int, chunks: list[bytes], done: Callable[[AppendOutcome], None]) -> None: ...

    def end(
        self,
        stream: str,
        reason: str,
        message: str,
        done: Callable[[EndOutcome], None],
        *,
        epoch: int | None = None,
        stale_before: int | None = None,
    ) -> None: ...

    def touch(self, streams: list[str]) -> None:
        """Producer activity on open streams held here: keeps them alive and in the open index."""
        ...

    def index(self, streams: list[str], now: int | None = None) -> None: ...
    def unindex(self, streams: list[str]) -> None: ...
    async def stale_open_streams(self, before_ms: int, limit: int = 500, skip: int = 0) -> list[str]:
        """Open streams whose last activity is at or before ``before_ms``, oldest first, from ``skip``."""
        ...

    async def ttl_s(self, stream: str) -> int: ...
