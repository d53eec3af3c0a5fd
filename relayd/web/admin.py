"""The admin API under ``/v1/admin`` (admin keys): what ``relayd streams`` and ``relayd status`` use.

Reads go to the store (a stream exists in Redis whether or not this instance serves it); what
changes a stream goes through the relay, as any producer's or consumer's request does, so live
consumers and the producer are told. Following a stream (``tail``) is a hub subscription like a
consumer's, framed as the consumer websocket's NDJSON. Routes and answers: docs/operations.md,
"Admin CLI". Not a browser API: no CORS.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from relayd.auth import parse_bearer
from relayd.errors import AuthError, ClientError, ProtocolError, StoreError
from relayd.protocol import (
    MAX_END_MESSAGE,
    PRODUCER_END_REASONS,
    WS_CODEC,
    check_stream_id,
    error_frame,
    format_cursor,
    frame,
    is_valid_stream_id,
)
from relayd.store.redis_streams import StreamMeta, StreamStats, now_ms
from relayd.web.admin_status import setup_status, status
from relayd.web.admin_tail import NDJSON, follow
from relayd.web.errors import client_error_response, error_response
from relayd.web.keys import RUNTIME

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SCAN_COUNT = 500  # keys SCAN examines per step
_SCAN_STEPS = 200  # steps per listing: bounds the work of one request (~100k keys)
_MAX_LIMIT = 1000


def setup(app: web.Application) -> None:
    """Register the admin routes (and the status sampler) on ``app``."""
    setup_status(app)
    routes = (
        ("GET", "/v1/admin/status", status),
        ("GET", "/v1/admin/streams", list_streams),
        ("GET", "/v1/admin/streams/{stream}", show_stream),
        ("GET", "/v1/admin/streams/{stream}/tail", tail),
        ("GET", "/v1/admin/streams/{stream}/export", export_stream),
        ("POST", "/v1/admin/streams/{stream}/end", end_stream),
        ("DELETE", "/v1/admin/streams/{stream}", remove_stream),
    )
    for method, path, handler in routes:
        app.router.add_route(method, path, admin_only(handler))


def admin_only(handler: Handler) -> Handler:
    """Refuse without a valid admin key (401); map refusals and Redis failures to JSON errors."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        rt = request.app[RUNTIME]
        if not rt.admin_keys:
            return error_response(
                401, "unauthorized", "the admin API is off: configure auth.admin_keys or RELAYD_ADMIN_KEYS"
            )
        try:
            rt.admin_keys.verify(parse_bearer(request.headers.get("Authorization")))
        except AuthError as exc:
            rt.metrics.auth_failure(exc.code)
            return error_response(401, "unauthorized", exc.message.replace("API key", "admin key"))
        try:
            return await handler(request)
        except ClientError as exc:
            return client_error_response(exc)
        except StoreError as exc:
            return error_response(503, "store_unavailable", str(exc))

    return guarded


async def existing_stream(request: web.Request) -> tuple[str, StreamMeta]:
    """The stream named in the path and its meta; a 404 if it does not exist."""
    stream = check_stream_id(request.match_info["stream"])
    meta = await request.app[RUNTIME].relay.store.read_meta(stream)
    if meta is None:
        raise web.HTTPNotFound(
            text=orjson.dumps(
                {"error": {"code": "stream_not_found", "message": f"stream {stream} does not exist"}}
            ).decode(),
            content_type="application/json",
        )
    return stream, meta


async def tail(request: web.Request) -> web.StreamResponse:
    """``?from=start``: the whole stream, then live; otherwise only what comes from now on."""
    stream, meta = await existing_stream(request)
    return await follow(request, stream, meta, from_start=request.query.get("from") == "start")


# -- reads --------------------------------------------------------------------------------------


def stream_summary(stats: StreamStats, consumers: int, now: int) -> dict[str, Any]:
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


async def list_streams(request: web.Request) -> web.Response:
    """``?status=open|ended|all&prefix=P&limit=N``: newest first; ``truncated`` if there are more.

    Open streams come from the open index (ZSCAN), others from a SCAN over meta keys; one request
    examines a bounded number of keys (``_SCAN_STEPS`` steps), and says ``truncated`` if it stopped
    before the end of the keyspace.
    """
    rt = request.app[RUNTIME]
    store, hub = rt.relay.store, rt.relay.hub
    query = request.query
    which = query.get("status", "all")
    if which not in ("open", "ended", "all"):
        raise ProtocolError("bad_frame", "status must be open, ended or all")
    prefix = query.get("prefix", "")
    if prefix and not is_valid_stream_id(prefix):
        raise ProtocolError("invalid_stream_id", "prefix must be the start of a stream id")
    limit_text = query.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= _MAX_LIMIT:
        raise ProtocolError("bad_frame", f"limit must be an integer from 1 to {_MAX_LIMIT}")
    limit = int(limit_text)

    scan = store.scan_open if which == "open" else store.scan_streams
    found: list[StreamStats] = []
    cursor, steps, seen = 0, 0, set()
    while True:
        cursor, ids = await scan(cursor, prefix, _SCAN_COUNT)
        steps += 1
        ids = [i for i in ids if i not in seen]  # SCAN may return a key twice
        seen.update(ids)
        if ids:
            for stats in await store.stream_stats(ids):
                if stats is None or (which == "ended" and stats.meta.is_open):
                    continue
                if which == "open" and not stats.meta.is_open:
                    continue
                found.append(stats)
        if cursor == 0 or steps >= _SCAN_STEPS:
            break
    found.sort(key=lambda s: (-s.meta.created_ms, s.meta.stream))
    now = now_ms()
    streams = [stream_summary(s, hub.subscriber_count(s.meta.stream), now) for s in found[:limit]]
    return web.json_response({"streams": streams, "truncated": len(found) > limit or cursor != 0})


async def show_stream(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    store = rt.relay.store
    stream, _ = await existing_stream(request)
    (stats,) = await store.stream_stats([stream])
    edges = await store.log_edges(stream)
    if stats is None:
        raise web.HTTPNotFound(text='{"error":{"code":"stream_not_found","message":"stream expired"}}')
    meta = stats.meta
    body = stream_summary(stats, rt.relay.hub.subscriber_count(stream), now_ms())
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
    return web.json_response(body)


async def export_stream(request: web.Request) -> web.StreamResponse:
    """The stream as stored when the request came, as consumer websocket frames (NDJSON).

    Paged reads (``consumer.catchup_page`` entries each), each page written as it is read, so a
    stream of any length costs one page of memory. A ``gap`` frame marks trimmed history. The last
    line is ``{"type": "exported", "chunks": N, "cursor": …}``: without it the export is incomplete.
    """
    rt = request.app[RUNTIME]
    store = rt.relay.store
    stream, meta = await existing_stream(request)
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)
    text = meta.content_type == "text"
    page = rt.config.consumer.catchup_page
    next_offset, chunks, last_cursor = 1, 0, None
    try:
        while next_offset <= meta.n:
            entries = [e for e in await store.read_entries(stream, meta.gen, next_offset, page) if e.offset <= meta.n]
            if not entries:
                break
            out = b""
            if entries[0].offset > next_offset:
                out = WS_CODEC.gap(stream, meta.gen, next_offset - 1, entries[0].offset) + b"\n"
            await response.write(out + WS_CODEC.entries(stream, meta.gen, entries, text) + b"\n")
            chunks += sum(1 for e in entries if not e.is_end)
            next_offset = entries[-1].offset + 1
            last_cursor = format_cursor(meta.gen, entries[-1].offset)
    except StoreError as exc:
        await response.write(error_frame("store_unavailable", str(exc), stream) + b"\n")
    else:
        await response.write(frame(type="exported", stream=stream, chunks=chunks, cursor=last_cursor) + b"\n")
    await response.write_eof()
    return response


# -- changes ------------------------------------------------------------------------------------


async def end_stream(request: web.Request) -> web.Response:
    """``POST {"reason": "completed|error|cancelled", "message": "..."}``: end it through the relay."""
    rt = request.app[RUNTIME]
    stream = check_stream_id(request.match_info["stream"])
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_frame", "body is not valid JSON") from None
    reason = body.get("reason") if isinstance(body, dict) else None
    message = body.get("message", "") if isinstance(body, dict) else ""
    if reason not in PRODUCER_END_REASONS:
        raise ProtocolError("bad_frame", "reason must be completed, error or cancelled")
    if not isinstance(message, str) or len(message) > MAX_END_MESSAGE:
        raise ProtocolError("bad_frame", f"message must be a string of at most {MAX_END_MESSAGE} characters")
    result, gen, offset, status = await rt.relay.end_stream(stream, reason, message)
    if result == "not_found":
        return error_response(404, "stream_not_found", f"stream {stream} does not exist")
    if result == "error":
        return error_response(503, "store_unavailable", "the end was not stored: Redis did not answer")
    if result == "already" and status != reason:
        return error_response(409, "stream_ended", f"stream {stream} already ended ({status})")
    return web.json_response(
        {
            "stream": stream,
            "result": "ended" if result == "ok" else "already_ended",
            "reason": reason,
            "cursor": format_cursor(gen, offset),
        }
    )


async def remove_stream(request: web.Request) -> web.Response:
    """Delete a stream's keys. An open one only with ``?force=1``: it is ended first (``cancelled``)
    through the relay, so its live consumers and its producer are told before its history goes."""
    rt = request.app[RUNTIME]
    stream, meta = await existing_stream(request)
    ended_first = False
    if meta.is_open:
        if request.query.get("force") not in ("1", "true"):
            return error_response(409, "stream_open", f"stream {stream} is open: end it first, or force its removal")
        result, *_ = await rt.relay.end_stream(stream, "cancelled", "removed by an operator")
        if result == "error":
            return error_response(503, "store_unavailable", "the end was not stored: Redis did not answer")
        ended_first = result == "ok"
    deleted = await rt.relay.store.delete_stream(stream)
    return web.json_response({"stream": stream, "deleted": deleted, "ended_first": ended_first})
