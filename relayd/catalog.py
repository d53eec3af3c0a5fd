"""What is stored: list, describe and export streams straight from the store.

Shared by the admin API (relayd/web/admin.py), where ``consumers`` counts the hub's local
subscriptions, and by the CLI's direct mode (relayd/admin_direct.py), which reads Redis while
relayd is down and has no consumers to count (None). Answers are the admin API's JSON objects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from relayd.errors import StoreError
from relayd.model import Entry, StreamMeta, StreamStats, now_ms
from relayd.ports import Catalog, History
from relayd.protocol import WS_CODEC, error_frame, format_cursor, frame

Consumers = Callable[[str], int | None]

STATUSES = ("open", "ended", "all")
MAX_LIMIT = 1000
_SCAN_COUNT = 500  # keys SCAN examines per step
_SCAN_STEPS = 200  # steps per listing: bounds the work of one listing (~100k keys)


def summary(stats: StreamStats, consumers: int | None, now: int) -> dict[str, Any]:
    meta = stats.meta
    return {
        "id": meta.stream,
        "status": meta.status,
        "chunks": stats.chunks,
        "bytes": stats.memory_bytes,
        "created_ms": meta.created_ms,
        "age_s": round(max(now - meta.created_ms, 0) / 1000, 1),
        "consumers": consumers,
    }


async def list_streams(store: Catalog, which: str, prefix: str, limit: int, consumers: Consumers) -> dict[str, Any]:
    """Streams newest first, at most ``limit``; ``truncated`` if there are more (or may be).

    Open streams come from the open index (ZSCAN), others from a SCAN over the meta keys. One
    listing examines a bounded number of keys and says ``truncated`` if it stopped before the end.
    Every key found costs one pipelined HMGET (its creation time and status, to sort and filter);
    only the ``limit`` newest get the full stats (HGETALL, XLEN, MEMORY USAGE, TTL).
    """
    scan = store.scan_open if which == "open" else store.scan_streams
    found: list[tuple[int, str]] = []  # (created_ms, id)
    cursor, steps = 0, 0
    seen: set[str] = set()
    while True:
        cursor, ids = await scan(cursor, prefix, _SCAN_COUNT)
        steps += 1
        ids = [i for i in ids if i not in seen]  # SCAN may return a key twice
        seen.update(ids)
        if ids:
            found.extend(
                (head[0], stream)
                for stream, head in zip(ids, await store.stream_heads(ids), strict=True)
                if head is not None and (which == "all" or head[1] == (which == "open"))
            )
        if cursor == 0 or steps >= _SCAN_STEPS:
            break
    found.sort(key=lambda head: (-head[0], head[1]))
    top = [stats for stats in await store.stream_stats([stream for _, stream in found[:limit]]) if stats is not None]
    now = now_ms()
    streams = [summary(s, consumers(s.meta.stream), now) for s in top]
    return {"streams": streams, "truncated": len(found) > limit or cursor != 0}


async def describe(store: Catalog, stream: str, consumers: Consumers) -> dict[str, Any] | None:
    """Everything ``relayd streams show`` prints; None if the stream does not exist."""
    (stats,) = await store.stream_stats([stream])
    if stats is None:
        return None
    edges = await store.log_edges(stream)
    meta = stats.meta
    body = summary(stats, consumers(stream), now_ms())
    body.update(
        {
            "reason": None if meta.is_open else meta.status,
            "message": meta.message,
            "content_type": meta.content_type,
            "epoch": meta.epoch,
            "seq": meta.seq,
            "updated_ms": meta.updated_ms,
            "ended_ms": meta.ended_ms,
            "entries": stats.entries,
            "first_cursor": format_cursor(meta.gen, edges[0]) if edges else None,
            "last_cursor": format_cursor(meta.gen, edges[1]) if edges else None,
            "ttl_s": stats.ttl_s,
        }
    )
    return body


async def export(store: History, meta: StreamMeta, page: int) -> AsyncIterator[bytes]:
    """The stream as stored at ``meta``'s read, as NDJSON consumer websocket frames, page by page.

    A ``gap`` frame marks trimmed history; one whose ``next`` lies past the last entry the meta
    counts marks a history that ends early (the log expired or was deleted while the meta
    remained), so an export never passes for complete when it is not. The last line is
    ``{"type": "exported", "chunks": N, "cursor": …}``, or an ``error`` line if Redis failed
    midway: without the trailer the export is incomplete. Memory: one page, whatever the
    stream's length.
    """
    stream, gen = meta.stream, meta.gen
    text = meta.content_type == "text"
    next_offset, chunks, last_cursor = 1, 0, None
    try:
        while next_offset <= meta.n:
            entries = [e for e in await store.read_entries(stream, gen, next_offset, page) if e.offset <= meta.n]
            if not entries:
                break
            yield _page(stream, gen, next_offset, entries, text)
            chunks += sum(1 for e in entries if not e.is_end)
            next_offset = entries[-1].offset + 1
            last_cursor = format_cursor(gen, entries[-1].offset)
        if next_offset <= meta.n:  # the rest of the log is gone
            yield WS_CODEC.gap(stream, gen, next_offset - 1, meta.n + 1) + b"\n"
    except StoreError as exc:
        yield error_frame("store_unavailable", str(exc), stream) + b"\n"
        return
    yield frame(type="exported", stream=stream, chunks=chunks, cursor=last_cursor) + b"\n"


def _page(stream: str, gen: int, expected: int, entries: list[Entry], text: bool) -> bytes:
    """A page's frames, with a ``gap`` wherever an offset is missing (before or between entries)."""
    out: list[bytes] = []
    run = 0  # where the current run of consecutive offsets starts
    for i, entry in enumerate(entries):
        if entry.offset > expected:
            if i > run:
                out.append(WS_CODEC.entries(stream, gen, entries[run:i], text))
            out.append(WS_CODEC.gap(stream, gen, expected - 1, entry.offset))
            run = i
        expected = entry.offset + 1
    out.append(WS_CODEC.entries(stream, gen, entries[run:], text))
    return b"\n".join(out) + b"\n"
