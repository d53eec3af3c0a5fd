"""The store contract in memory: :class:`MemoryStore`, for unit tests of the engine without Redis.

It answers exactly what :class:`~relayd.store.redis_streams.RedisStore` answers (the Lua scripts
in relayd/store/lua/ are the specification; tests/test_store_contract.py runs one suite against
both), and schedules like it: writes queued during one event-loop tick are applied and answered
together in a later callback, in submission order, never inside the call that queued them.

Deliberate differences, none visible to the engine's logic:

- ``streams.max_chunks`` trims the log exactly; Redis's ``MAXLEN ~`` trims whole radix-tree
  nodes, so it keeps at least ``max_chunks`` entries and often more.
- A stream's two keys share one expiry (Redis's scripts always set both TTLs together, except
  on creation, when the log does not exist yet). Time is ``clock()`` (ms), injectable.
- The scans answer in one step (cursor 0); ``memory_bytes`` is the size of the stored data.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from relayd.config import Config
from relayd.model import (
    Appended,
    AppendOutcome,
    DsRead,
    DsSpec,
    DsState,
    DsWrite,
    Ended,
    EndOutcome,
    Entry,
    Opened,
    OpenOutcome,
    Refused,
    StreamMeta,
    StreamStats,
    now_ms,
)

log = logging.getLogger("relayd.store.memory")

Clock = Callable[[], int]


@dataclass(slots=True)
class _Stream:
    """One stream's meta hash and log, as the scripts keep them."""

    gen: int
    epoch: int
    ct: str
    created: int
    status: str = "open"
    base: int = 0  # offset of the last entry before the current epoch: seq s is offset base + s
    seq: int = 0
    n: int = 0
    updated: int = 0
    ended: int | None = None
    message: str = ""
    pid: str | None = None  # the producer id that started epoch ``pidep``
    pidep: int | None = None
    log: list[Entry] = field(default_factory=list)
    expires: int = 0  # when the keys expire (ms); every write that creates them sets it
    # the Durable Streams mount's fields (ds_*.lua): content type, media type, TTL, Expires-At,
    # deadline (ms), last Stream-Seq, the producer tuple that closed it; producers' (epoch, seq)
    dct: str | None = None
    dmt: str | None = None
    dttl: int | None = None
    dexp: str = ""
    ddl: int | None = None
    dsq: str | None = None
    dcl: tuple[str, int, int] | None = None
    producers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def meta(self, stream: str) -> StreamMeta:
        return StreamMeta(
            stream, self.status, self.gen, self.epoch, self.seq, self.n, self.ct,
            self.created, self.updated, self.ended, self.message,
        )  # fmt: skip

    def ds_media(self) -> str:
        """The media type Durable Streams appends must have (a relayd stream's by its ct)."""
        return self.dmt or ("text/plain" if self.ct == "text" else "application/json")

    def head(self, code: str) -> Opened:
        return Opened(code, self.gen, self.epoch, self.seq, self.n, self.status, self.ct)  # type: ignore[arg-type]


_NEVER = 2**62  # the expiry of keys without one (ms)
_MAX_EPOCH = 2**53 - 1  # the largest integer Lua's doubles (and so open.lua) count exactly


class MemoryStore:
    """:class:`relayd.ports.Store` in memory. ``Relay(config, MemoryStore(config), metrics)``."""

    def __init__(self, config: Config | None = None, *, clock: Clock = now_ms) -> None:
        streams = (config or Config()).streams
        self.clock = clock
        self._max_chunks = streams.max_chunks
        self._open_ttl_ms = streams.open_ttl_s * 1000
        self._end_ttl_ms = streams.ttl_after_end_s * 1000
        self._streams: dict[str, _Stream] = {}
        self._index: dict[str, int] = {}  # the open index: stream -> last activity (ms)
        self._queue: list[tuple[Callable[[], Any], Callable[[Any], None] | None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_reconnect: Callable[[], None] = lambda: None  # never loses a connection

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Writes still queued fail, as the pipeline's do when it closes."""
        queue, self._queue = self._queue, []
        for _, done in queue:
            if done is not None:
                done(Refused("store_unavailable", "relayd is shutting down"))
        self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()

    async def ping(self) -> None:
        """Always answers."""

    def _submit(self, apply: Callable[[], Any], done: Callable[[Any], None] | None) -> None:
        if not self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queue.append((apply, done))
        self._idle.clear()

    def _flush(self) -> None:
        batch, self._queue = self._queue, []  # writes queued by a callback form the next batch
        for apply, done in batch:
            outcome = apply()
            if done is not None:
                try:
                    done(outcome)
                except Exception:  # one bad callback must not stall the batch (as in the pipeline)
                    log.exception("write callback failed")
        if not self._queue:
            self._idle.set()

    def _get(self, stream: str) -> _Stream | None:
        """The stream's keys, unless they expired (Redis expires lazily on access too)."""
        s = self._streams.get(stream)
        if s is not None and s.expires <= self.clock():
            del self._streams[stream]
            return None
        return s

    # typed writes: open.lua, append.lua, end.lua, touch.lua -----------------------------------

    def open(
        self,
        stream: str,
        epoch: int | None,
        content_type: str,
        producer: str | None,
        done: Callable[[OpenOutcome], None],
    ) -> None:
        self._submit(lambda: self._open(stream, epoch, content_type, producer), done)

    def _open(self, stream: str, epoch: int | None, content_type: str, pid: str | None) -> OpenOutcome:
        now = self.clock()
        s = self._get(stream)
        if s is None:
            s = _Stream(now, epoch or 1, content_type, now, updated=now, expires=now + self._open_ttl_ms)
            if pid:
                s.pid, s.pidep = pid, s.epoch
            self._streams[stream] = s
            return s.head("created")
        if s.status != "open":
            return s.head("ended")
        if epoch is None:
            if pid and s.pid == pid and s.pidep == s.epoch:
                s.updated = now
                return s.head("resumed")
            if s.epoch >= _MAX_EPOCH:  # as open.lua: a takeover never shares the last exact epoch
                return Refused("fenced", f"stream is held by a newer producer (epoch {s.epoch})", s.epoch)
            epoch = s.epoch + 1
        elif epoch < s.epoch:
            return Refused("fenced", f"stream is held by a newer producer (epoch {s.epoch})", s.epoch)
        elif epoch == s.epoch:
            s.updated = now
            return s.head("resumed")
        # a new epoch: its sequence numbers start again at 1, after the entries already stored
        s.epoch, s.base, s.seq, s.updated = epoch, s.n, 0, now
        s.pid, s.pidep = (pid, epoch) if pid else (None, None)
        return s.head("opened")

    def append_handle(self, stream: str, epoch: int, gen: int = 0) -> tuple[str, int, int]:
        return stream, epoch, gen

    def append(
        self, handle: tuple[str, int, int], seq: int, chunks: list[bytes], done: Callable[[AppendOutcome], None]
    ) -> None:
        chunks = list(chunks)  # the caller may reuse its list before the write is applied
        self._submit(lambda: self._append(*handle, seq, chunks), done)

    def _append(self, stream: str, epoch: int, gen: int, seq: int, chunks: list[bytes]) -> AppendOutcome:
        s = self._get(stream)
        if s is None:
            return Refused("not_found", "stream expired or was removed")
        if s.status != "open":
            return Refused("ended", f"stream ended ({s.status})", status=s.status)
        if epoch != s.epoch or (gen and gen != s.gen):  # as append.lua: another generation fences too
            return Refused("fenced", "a newer producer took the stream over", s.epoch)
        if seq > s.seq + 1:
            return Refused("seq_gap", f"expected seq {s.seq + 1}", s.seq)
        last_seq = seq + len(chunks) - 1
        if last_seq <= s.seq:  # all stored already: a resend
            return Appended(s.gen, s.n + 1, s.base + last_seq, last_seq)
        first = s.n + 1
        for chunk in chunks[s.seq - seq + 1 :]:  # a partial overlap stores only the new ones
            s.n += 1
            s.log.append(Entry(s.n, chunk))
        del s.log[: max(len(s.log) - self._max_chunks, 0)]  # MAXLEN (exact here; '~' in Redis)
        now = self.clock()
        s.seq, s.updated, s.expires = last_seq, now, now + self._open_ttl_ms
        return Appended(s.gen, first, s.n, last_seq)

    def end(
        self,
        stream: str,
        reason: str,
        message: str,
        done: Callable[[EndOutcome], None],
        *,
        epoch: int | None = None,
        stale_before: int | None = None,
    ) -> None:
        self._submit(lambda: self._end(stream, reason, message, epoch, stale_before), done)

    def _end(self, stream: str, reason: str, message: str, epoch: int | None, stale_before: int | None) -> EndOutcome:
        s = self._get(stream)
        if s is None:
            return Refused("not_found", "end failed: not_found")
        if s.status != "open":
            return Ended("already", s.gen, s.n, s.status)
        if epoch is not None and epoch != s.epoch:
            return Refused("fenced", "a newer producer took the stream over", s.epoch)
        if stale_before is not None and s.updated >= stale_before:
            return Refused("alive", "end failed: alive")
        now = self.clock()
        s.n += 1
        s.log.append(Entry(s.n, None, reason, message))
        s.status, s.ended, s.updated, s.message, s.expires = reason, now, now, message, now + self._end_ttl_ms
        return Ended("ok", s.gen, s.n, reason)

    def touch(self, streams: list[str]) -> None:
        if not streams:
            return
        now = self.clock()
        for stream in streams:
            self._submit(partial(self._touch, stream, now), None)
        self.index(streams, now)

    def _touch(self, stream: str, now: int) -> None:
        s = self._get(stream)
        if s is not None and s.status == "open":
            s.updated, s.expires = now, now + self._open_ttl_ms

    def index(self, streams: list[str], now: int | None = None) -> None:
        score = self.clock() if now is None else now
        self._submit(lambda: self._index.update(dict.fromkeys(streams, score)), None)

    def unindex(self, streams: list[str]) -> None:
        self._submit(lambda: [self._index.pop(stream, None) for stream in streams], None)

    # reads -----------------------------------------------------------------------------------

    async def read_meta(self, stream: str) -> StreamMeta | None:
        s = self._get(stream)
        return None if s is None else s.meta(stream)

    async def read_entries(self, stream: str, gen: int, first: int, count: int) -> list[Entry]:
        s = self._get(stream)
        if s is None or s.gen != gen:  # one generation per key: an older reader finds nothing
            return []
        start = bisect.bisect_left(s.log, first, key=lambda e: e.offset)
        return s.log[start : start + count]

    async def stale_open_streams(self, before_ms: int, limit: int = 500, skip: int = 0) -> list[str]:
        stale = sorted((score, stream) for stream, score in self._index.items() if score <= before_ms)
        return [stream for _, stream in stale[skip : skip + limit]]

    async def ttl_s(self, stream: str) -> int:
        s = self._get(stream)
        return -2 if s is None else (s.expires - self.clock() + 500) // 1000  # rounded, as TTL does

    # the Catalog reads and removal ---------------------------------------------------------------

    async def scan_streams(self, cursor: int, id_prefix: str, count: int) -> tuple[int, list[str]]:
        return 0, [stream for stream in list(self._streams) if stream.startswith(id_prefix) and self._get(stream)]

    async def scan_open(self, cursor: int, id_prefix: str, count: int) -> tuple[int, list[str]]:
        return 0, [stream for stream in self._index if stream.startswith(id_prefix)]

    async def open_count(self) -> int:
        return len(self._index)

    async def stream_heads(self, streams: list[str]) -> list[tuple[int, bool] | None]:
        return [None if (s := self._get(stream)) is None else (s.created, s.status == "open") for stream in streams]

    async def stream_stats(self, streams: list[str]) -> list[StreamStats | None]:
        return [None if self._get(stream) is None else await self._stats(stream) for stream in streams]

    async def _stats(self, stream: str) -> StreamStats:
        s = self._streams[stream]
        memory = sum(len(e.data or b"") + len(e.message) + 16 for e in s.log) + 100
        return StreamStats(s.meta(stream), len(s.log), memory, await self.ttl_s(stream))

    async def log_edges(self, stream: str) -> tuple[int, int] | None:
        s = self._get(stream)
        if s is None or not s.log:
            return None
        return s.log[0].offset, s.log[-1].offset

    async def delete_stream(self, stream: str) -> bool:
        self._index.pop(stream, None)
        existed = self._get(stream) is not None
        self._streams.pop(stream, None)
        return existed

    # the Durable Streams mount: ds_create.lua, ds_append.lua, ds_read.lua, ds_delete.lua -------

    def _ds_get(self, stream: str, now: int) -> _Stream | None:
        s = self._get(stream)
        if s is not None and s.ddl is not None and s.ddl <= now:
            del self._streams[stream]
            return None
        return s

    async def _ds_call(self, apply: Callable[[], Any]) -> Any:
        """Through the write queue, as the scripts go through the pipeline."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(outcome: Any) -> None:
            if isinstance(outcome, Refused):  # the store closed with the write queued
                outcome = DsWrite("store_unavailable", message=outcome.message)
            if not future.done():
                future.set_result(outcome)

        self._submit(apply, done)
        return await future

    async def ds_create(self, stream: str, spec: DsSpec, chunks: list[bytes], now: int) -> DsWrite:
        return await self._ds_call(partial(self._ds_create, stream, spec, chunks, now))  # type: ignore[no-any-return]

    def _ds_create(self, stream: str, spec: DsSpec, chunks: list[bytes], now: int) -> DsWrite:
        s = self._ds_get(stream, now)
        if s is not None:
            closed = s.status != "open"
            same = (
                s.ds_media() == spec.media
                and s.dttl == spec.ttl_s
                and s.dexp == spec.expires_at
                and closed == spec.closed
            )
            return DsWrite("exists" if same else "conflict", s.gen, tail=s.n - closed, closed=closed)
        s = _Stream(now, 0, spec.kind, now, updated=now, dct=spec.content_type, dmt=spec.media)
        s.dttl, s.dexp = spec.ttl_s, spec.expires_at
        s.log = [Entry(i + 1, chunk) for i, chunk in enumerate(chunks)]
        s.n = len(chunks)
        if spec.closed:
            s.n += 1
            s.log.append(Entry(s.n, None, "completed", ""))
            s.status, s.ended = "completed", now
        s.ddl = now + spec.ttl_s * 1000 if spec.ttl_s is not None else spec.expires_ms
        s.expires = _NEVER if s.ddl is None else s.ddl
        self._streams[stream] = s
        return DsWrite("created", now, tail=len(chunks), closed=spec.closed)

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
        apply = partial(self._ds_append, stream, media, chunks, now, close, stream_seq, producer)
        return await self._ds_call(apply)  # type: ignore[no-any-return]

    def _ds_append(
        self,
        stream: str,
        media: str,
        chunks: list[bytes],
        now: int,
        close: bool,
        stream_seq: str,
        producer: tuple[str, int, int] | None,
    ) -> DsWrite:
        s = self._ds_get(stream, now)
        if s is None:
            return DsWrite("not_found")
        if s.dttl is not None:
            s.ddl = s.expires = now + s.dttl * 1000
        gen, n = s.gen, s.n
        if s.status != "open":
            if producer is not None and s.dcl == producer:
                return DsWrite("duplicate", gen, tail=n - 1, closed=True, value=producer[2])
            return DsWrite("closed", gen, tail=n - 1, closed=True)
        if media and media != s.ds_media():
            return DsWrite("content_type", gen, tail=n)
        if producer is not None:
            pid, epoch, seq = producer
            state = s.producers.get(pid)
            if state is None:
                if seq != 0:
                    return DsWrite("seq_gap", gen, tail=n, value=0, received=seq)
            elif epoch < state[0]:
                return DsWrite("stale_epoch", gen, tail=n, value=state[0])
            elif epoch > state[0]:
                if seq != 0:
                    return DsWrite("epoch_seq", gen, tail=n)
            elif seq <= state[1]:
                return DsWrite("duplicate", gen, tail=n, value=state[1])
            elif seq != state[1] + 1:
                return DsWrite("seq_gap", gen, tail=n, value=state[1] + 1, received=seq)
        if stream_seq and s.dsq is not None and stream_seq.encode() <= s.dsq.encode():
            return DsWrite("stream_seq", gen, tail=n)
        first = n + 1
        for chunk in chunks:
            n += 1
            s.log.append(Entry(n, chunk))
        last = n
        s.n, s.updated = n, now
        if stream_seq:
            s.dsq = stream_seq
        if producer is not None:
            s.producers[producer[0]] = (producer[1], producer[2])
        if close:
            s.n += 1
            s.log.append(Entry(s.n, None, "completed", ""))
            s.status, s.ended = "completed", now
            s.dcl = producer
        return DsWrite("ok", gen, first, last, last, close)

    async def ds_read(
        self, stream: str, gen: int | None, after: int, count: int, now: int, *, touch: bool = True
    ) -> DsRead | None:
        s = self._ds_get(stream, now)
        if s is None:
            return None
        if touch and s.dttl is not None:
            s.ddl = s.expires = now + s.dttl * 1000
        start = 0 if gen is None or gen < s.gen else (-1 if gen > s.gen else after)
        if start > s.n:
            start = -1
        closed = s.status != "open"
        media = s.ds_media()
        state = DsState(s.gen, s.n - closed, closed, s.dct or media, media, s.dttl, s.dexp)
        entries: list[Entry] = []
        if start >= 0 and count > 0:
            first = bisect.bisect_left(s.log, start + 1, key=lambda e: e.offset)
            entries = s.log[first : first + count]
        return DsRead(state, start, entries)

    async def ds_delete(self, stream: str, now: int) -> bool:
        return await self._ds_call(partial(self._ds_delete, stream, now))  # type: ignore[no-any-return]

    def _ds_delete(self, stream: str, now: int) -> bool:
        existed = self._ds_get(stream, now) is not None
        self._streams.pop(stream, None)
        return existed
