"""The admin API under ``/v1/admin`` (admin keys): what ``relayd streams`` and ``relayd status`` use.

Reads go to the store (a stream exists in Redis whether or not this instance serves it); what
changes a stream goes through the relay, as any producer's or consumer's request does, so live
consumers and the producer are told. Following a stream (``tail``) is a hub subscription like a
consumer's, framed as the consumer websocket's NDJSON. Routes and answers: docs/operations.md,
"Admin CLI". Not a browser API: no CORS.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from relayd import catalog
from relayd.auth import parse_bearer
from relayd.errors import AuthError, ClientError, ProtocolError, StoreError
from relayd.model import Ended, StreamMeta
from relayd.protocol import (
    MAX_END_MESSAGE,
    PRODUCER_END_REASONS,
    check_stream_id,
    format_cursor,
    is_valid_stream_id,
    parse_uint,
)
from relayd.web.admin_status import setup_status, status
from relayd.web.admin_tail import NDJSON, follow
from relayd.web.errors import client_error_response, error_response
from relayd.web.keys import RUNTIME

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_TAIL_WAIT_MS = 3_600_000


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
            if exc.code == "stream_not_found":
                return error_response(404, exc.code, exc.message)
            return client_error_response(exc)
        except StoreError as exc:
            return error_response(503, "store_unavailable", str(exc))

    return guarded


async def existing_stream(request: web.Request) -> tuple[str, StreamMeta]:
    """The stream named in the path and its meta; ``stream_not_found`` (404) if it does not exist."""
    stream = check_stream_id(request.match_info["stream"])
    meta = await request.app[RUNTIME].relay.read_meta(stream)
    if meta is None:
        raise ClientError("stream_not_found", f"stream {stream} does not exist")
    return stream, meta


async def tail(request: web.Request) -> web.StreamResponse:
    """``?from=start``: the whole stream, then live; otherwise only what comes from now on.

    ``?wait_ms=N``: a stream that does not exist yet is waited for, up to N ms (at most an hour),
    as a consumer's subscription is, and then followed from its start; without, 404.
    """
    rt = request.app[RUNTIME]
    if rt.draining.is_set():
        return error_response(503, "shutting_down", "relayd is draining")
    wait = request.query.get("wait_ms", "0")
    if not re.fullmatch(r"[0-9]{1,7}", wait) or int(wait) > MAX_TAIL_WAIT_MS:
        raise ProtocolError("bad_frame", f"wait_ms must be an integer from 0 to {MAX_TAIL_WAIT_MS}")
    wait_ms = int(wait)
    stream = check_stream_id(request.match_info["stream"])
    meta = await rt.relay.read_meta(stream)
    if meta is None and not wait_ms:
        raise ClientError("stream_not_found", f"stream {stream} does not exist")
    from_start = request.query.get("from") == "start"
    return await follow(request, stream, meta, from_start=from_start, wait_s=wait_ms / 1000)


# -- reads --------------------------------------------------------------------------------------


async def list_streams(request: web.Request) -> web.Response:
    """``?status=open|ended|all&prefix=P&limit=N``: newest first (relayd/catalog.py)."""
    rt = request.app[RUNTIME]
    query = request.query
    which = query.get("status", "all")
    if which not in catalog.STATUSES:
        raise ProtocolError("bad_frame", "status must be open, ended or all")
    prefix = query.get("prefix", "")
    if prefix and not is_valid_stream_id(prefix):
        raise ProtocolError("invalid_stream_id", "prefix must be the start of a stream id")
    limit = parse_uint(query.get("limit", "100"), "limit")
    if not 1 <= limit <= catalog.MAX_LIMIT:
        raise ProtocolError("bad_frame", f"limit must be an integer from 1 to {catalog.MAX_LIMIT}")
    listing = await rt.relay.list_streams(which, prefix, limit)
    return web.json_response(listing)


async def show_stream(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    stream = check_stream_id(request.match_info["stream"])
    body = await rt.relay.describe(stream)
    if body is None:
        raise ClientError("stream_not_found", f"stream {stream} does not exist")
    return web.json_response(body)


async def export_stream(request: web.Request) -> web.StreamResponse:
    """The stream as stored when the request came, streamed as NDJSON as it is read (catalog.export)."""
    rt = request.app[RUNTIME]
    _, meta = await existing_stream(request)
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)
    async for lines in rt.relay.export(meta):
        await response.write(lines)
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
    if not isinstance(reason, str) or reason not in PRODUCER_END_REASONS:  # a list is not hashable
        raise ProtocolError("bad_frame", "reason must be completed, error or cancelled")
    if not isinstance(message, str) or len(message) > MAX_END_MESSAGE:
        raise ProtocolError("bad_frame", f"message must be a string of at most {MAX_END_MESSAGE} characters")
    outcome = await rt.relay.end_stream(stream, reason, message)
    if not isinstance(outcome, Ended):
        if outcome.code == "store_unavailable":
            return error_response(503, "store_unavailable", "the end was not stored: Redis did not answer")
        raise ClientError("stream_not_found", f"stream {stream} does not exist")
    if outcome.result == "already" and outcome.status != reason:
        return error_response(409, "stream_ended", f"stream {stream} already ended ({outcome.status})")
    return web.json_response(
        {
            "stream": stream,
            "result": "ended" if outcome.result == "ok" else "already_ended",
            "reason": reason,
            "cursor": format_cursor(outcome.gen, outcome.offset),
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
        outcome = await rt.relay.end_stream(stream, "cancelled", "removed by an operator")
        if not isinstance(outcome, Ended) and outcome.code == "store_unavailable":
            return error_response(503, "store_unavailable", "the end was not stored: Redis did not answer")
        ended_first = isinstance(outcome, Ended) and outcome.result == "ok"
    deleted = await rt.relay.delete_stream(stream)
    return web.json_response({"stream": stream, "deleted": deleted, "ended_first": ended_first})
