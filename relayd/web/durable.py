"""The Durable Streams HTTP protocol at ``<durable.base_path>/v1/stream/<stream id>``.

PUT creates, POST appends and/or closes, GET reads (catch-up, ``live=long-poll``, ``live=sse``),
HEAD answers the metadata, DELETE deletes, OPTIONS is the CORS preflight. The protocol's rules
are in relayd/durable/ (codec: pure; engine: store and hub); this module maps them to HTTP.
docs/protocol.md, "Durable Streams", says what is supported and how a stream is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from time import monotonic
from typing import Any

from aiohttp import web

from relayd.auth import parse_bearer
from relayd.config import DurableConfig
from relayd.durable import codec
from relayd.durable.codec import Offset
from relayd.errors import AuthError, ClientError, StoreError
from relayd.leases import write_cost
from relayd.model import DsRead, DsSpec, DsWrite, now_ms
from relayd.outbox import Outbox
from relayd.protocol import is_valid_stream_id
from relayd.web.cors import origin_allowed
from relayd.web.gate import limited
from relayd.web.keys import RUNTIME, Runtime
from relayd.web.throttle import FAILURES
from relayd.web.transport import backlog_of, writing

log = logging.getLogger("relayd.durable")

_SECURITY = {"X-Content-Type-Options": "nosniff", "Cross-Origin-Resource-Policy": "cross-origin"}
_EXPOSE = (
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, Stream-Expires-At, "
    "Stream-SSE-Data-Encoding, Producer-Epoch, Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq, "
    "ETag, Location, Content-Type"
)
_ALLOW_HEADERS = (
    "Authorization, Content-Type, If-None-Match, Stream-TTL, Stream-Expires-At, Stream-Closed, Stream-Seq, "
    "Producer-Id, Producer-Epoch, Producer-Seq"
)
_IMMUTABLE = "public, max-age=60, stale-while-revalidate=300"  # a range before the tail never changes
# An answer the transport takes whole without pausing (its high-water mark is 64 KiB), so its write
# cannot wait on the reader: a plain response (headers and body in one write). Larger ones go
# through an outbox, whose watchdog drops a reader that takes nothing.
_SMALL_ANSWER = 32 * 1024


def setup(app: web.Application, cfg: DurableConfig) -> None:
    """Mount the protocol if ``durable.enabled``."""
    if not cfg.enabled:
        return
    app.router.add_route("*", cfg.base_path + "/v1/stream/{stream:.+}", handle)
    if cfg.auth == "none":
        log.warning(
            "durable.auth is none: anyone who reaches %s/v1/stream/ can create, write, read and delete "
            "streams; keep it for loopback and development (docs/protocol.md, Durable Streams)",
            cfg.base_path,
        )


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


async def handle(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    stream = request.match_info["stream"]
    try:
        if request.method == "OPTIONS":
            response: web.StreamResponse = _preflight()
        else:
            if stream.startswith("__ds/") or "/__ds/" in stream or stream.endswith("/__ds"):
                raise _Refused(404, "the reserved subscription APIs (__ds) are not supported")
            if not is_valid_stream_id(stream):
                raise _Refused(400, "a stream id is 1-200 characters of A-Z a-z 0-9 _ - . : / @ =")
            method = _METHODS.get(request.method)
            if method is None:
                raise _Refused(405, "method not allowed")
            _authorize(request, rt, stream)
            if request.method == "GET" and request.query.get("live") in ("long-poll", "sse"):
                # held open at the tail: counted as relayd's own SSE (limits.max_sse_connections)
                response = await limited("consumer_sse")(lambda r: method(r, rt, stream))(request)
            else:
                response = await method(request, rt, stream)
    except _Refused as exc:
        response = _text(exc.status, exc.message, exc.headers)
    except AuthError as exc:
        rt.metrics.auth_failure(exc.code)
        if exc.code == "unauthorized":  # counts against the address's budget (auth.max_failures)
            request.app[FAILURES].failed(request.remote, monotonic())
        response = _text(exc.http_status, exc.message)
    except ClientError as exc:
        response = _text(413 if exc.code == "too_many_messages" else 400, exc.message)
    except StoreError as exc:
        response = _text(503, f"store unavailable: {exc}")
    if not response.prepared:
        response.headers.update(_SECURITY)
        response.headers.update(_cors(request, rt))
    return response


def _authorize(request: web.Request, rt: Runtime, stream: str) -> None:
    """``durable.auth = "keys"``: writes take an API key; reads an API key or a token with ``read``.

    As on relayd's other routes, an API key is taken from the ``Authorization`` header only (a
    URL ends up in access logs and browser history); ``?token=`` may carry a consumer token, for
    reads (``GET``, ``HEAD``) only.
    """
    if rt.config.durable.auth == "none":
        return
    wait_s = request.app[FAILURES].retry_after(request.remote, monotonic())
    if wait_s:
        rt.metrics.auth_throttled()
        raise _Refused(429, "too many failed credentials from this address", {"Retry-After": str(math.ceil(wait_s))})
    reading = request.method in ("GET", "HEAD")
    in_url = request.query.get("token")
    if in_url is not None and not reading:
        raise AuthError(
            "unauthorized",
            "?token= carries a consumer token, for reads only; send the API key in the Authorization header",
        )
    credential = parse_bearer(request.headers.get("Authorization"))
    if credential is None and in_url is not None:
        rt.tokens.verify(in_url).require(stream, "read")
        return
    try:
        scope = rt.api_keys.verify(credential)
    except AuthError:
        if not reading:
            raise
        rt.tokens.verify(credential).require(stream, "read")
        return
    if scope is not None:
        scope.require(stream)


# PUT ------------------------------------------------------------------------------------------------


async def _create(request: web.Request, rt: Runtime, stream: str) -> web.StreamResponse:
    headers = request.headers
    if "Stream-Forked-From" in headers:
        raise _Refused(501, "forks are not supported")
    content_type = (headers.get("Content-Type") or "").strip() or "application/octet-stream"
    media = codec.media_type(content_type) or "application/octet-stream"
    ttl, expires = headers.get("Stream-TTL"), headers.get("Stream-Expires-At")
    if ttl is not None and expires is not None:
        raise _Refused(400, "Stream-TTL and Stream-Expires-At exclude each other")
    ttl_s = None if ttl is None else codec.parse_ttl(ttl)
    if ttl is None and expires is None and rt.config.durable.default_ttl_s:
        ttl_s = rt.config.durable.default_ttl_s  # the operator's bound on streams nobody deletes
    spec = DsSpec(
        content_type,
        media,
        codec.kind_of(media),
        ttl_s,
        expires or "",
        None if expires is None else codec.parse_expires_at(expires),
        _closing(request),
    )
    chunks = codec.chunks_of(media, await _body(request, rt), create=True)
    with _charged(rt, chunks):
        outcome = await rt.relay.durable.create(stream, spec, chunks)
    if outcome.code == "conflict":
        raise _Refused(409, "the stream exists with another configuration")
    _unavailable(outcome)
    out = {"Content-Type": content_type, "Stream-Next-Offset": codec.format_offset(outcome.gen, outcome.tail)}
    if outcome.closed:
        out["Stream-Closed"] = "true"
    if outcome.code == "created":
        out["Location"] = str(request.url)
        return web.Response(status=201, headers=out)
    return web.Response(status=200, headers=out)


# POST -----------------------------------------------------------------------------------------------


async def _append(request: web.Request, rt: Runtime, stream: str) -> web.StreamResponse:
    headers = request.headers
    close = _closing(request)
    producer = codec.parse_producer(
        headers.get("Producer-Id"), headers.get("Producer-Epoch"), headers.get("Producer-Seq")
    )
    body = await _body(request, rt)
    media = ""
    chunks: list[bytes] = []
    if body:
        if "Content-Type" not in headers:  # (aiohttp's request.content_type defaults it)
            raise _Refused(400, "an append needs a Content-Type")
        media = codec.media_type(headers["Content-Type"])
        try:
            chunks = codec.chunks_of(media, body)
        except ClientError:
            await _refuse_before_body(rt, stream, media)  # closed, unknown or another type: says so first
            raise
    elif not close:
        raise _Refused(400, "an empty append (close a stream with Stream-Closed: true)")
    with _charged(rt, chunks):
        outcome = await rt.relay.durable.append(
            stream, media, chunks, close=close, stream_seq=headers.get("Stream-Seq", ""), producer=producer
        )
    return _append_response(outcome, close, bool(body), producer)


def _append_response(
    outcome: DsWrite, close: bool, has_body: bool, producer: tuple[str, int, int] | None
) -> web.StreamResponse:
    code = outcome.code
    offset = {"Stream-Next-Offset": codec.format_offset(outcome.gen, outcome.tail)} if outcome.gen else {}
    closed = {"Stream-Closed": "true"} if outcome.closed else {}
    if code == "ok":
        out = {**offset, **closed}
        if producer is not None:
            out.update({"Producer-Epoch": str(producer[1]), "Producer-Seq": str(producer[2])})
        # 200 for a producer's new data; 204 otherwise (a close only, no producer)
        return web.Response(status=200 if producer is not None and has_body else 204, headers=out)
    if code == "duplicate":
        assert producer is not None
        out = {**offset, **closed, "Producer-Epoch": str(producer[1]), "Producer-Seq": str(outcome.value)}
        return web.Response(status=204, headers=out)
    if code == "closed":
        if close and not has_body and producer is None:
            return web.Response(status=204, headers={**offset, **closed})  # closing again: done already
        raise _Refused(409, "the stream is closed", {**offset, **closed})
    if code == "not_found":
        raise _Refused(404, "no such stream")
    if code == "content_type":
        raise _Refused(409, "the stream has another content type")
    if code == "stale_epoch":
        raise _Refused(403, "a newer producer epoch took over", {"Producer-Epoch": str(outcome.value)})
    if code == "epoch_seq":
        raise _Refused(400, "a new producer epoch starts at Producer-Seq 0")
    if code == "seq_gap":
        gap = {"Producer-Expected-Seq": str(outcome.value), "Producer-Received-Seq": str(outcome.received)}
        raise _Refused(409, "producer sequence gap", gap)
    if code == "stream_seq":
        raise _Refused(409, "Stream-Seq must be above the last one")
    _unavailable(outcome)
    raise _Refused(500, f"unexpected outcome {code}")


async def _refuse_before_body(rt: Runtime, stream: str, media: str) -> None:
    """An invalid body: a missing stream, a closed one or another content type is the answer
    first (the protocol's order), as if the body had been valid."""
    read = await rt.relay.durable.head(stream)
    if read is None:
        raise _Refused(404, "no such stream")
    state = read.state
    if state.closed:
        offset = codec.format_offset(state.gen, state.tail)
        raise _Refused(409, "the stream is closed", {"Stream-Closed": "true", "Stream-Next-Offset": offset})
    if state.media != media:
        raise _Refused(409, "the stream has another content type")


# GET and HEAD ---------------------------------------------------------------------------------------


async def _read(request: web.Request, rt: Runtime, stream: str) -> web.StreamResponse:
    cfg = rt.config.durable
    durable = rt.relay.durable
    if request.method == "HEAD":
        return _head(await durable.head(stream))
    query = request.query
    offset = codec.parse_offset(query.getall("offset", []))
    live = query.get("live")
    if live in ("long-poll", "sse") and "offset" not in query:
        raise _Refused(400, f"live={live} needs an offset")
    if live == "sse":
        return await _sse(request, rt, stream, offset)
    if live == "long-poll":
        timeout_s = cfg.long_poll_timeout_ms / 1000
        read = await _unless_draining(rt, durable.read_live(stream, offset, cfg.read_max_bytes, timeout_s))
    else:
        read = await durable.read(stream, offset, cfg.read_max_bytes)
    read = _found(read)
    state = read.state
    data = [e for e in read.entries if e.data is not None]
    end = data[-1].offset if data else read.after
    at_tail = end >= state.tail
    eof = state.closed and at_tail
    out = {"Content-Type": state.content_type, "Stream-Next-Offset": codec.format_offset(state.gen, end)}
    if at_tail:
        out["Stream-Up-To-Date"] = "true"
    if eof:
        out["Stream-Closed"] = "true"
    if live == "long-poll":
        if not eof:
            out["Stream-Cursor"] = codec.cursor(now_ms(), query.get("cursor"))
        if not data:  # timed out at the tail, or the stream is closed there
            return web.Response(status=204, headers=out)
    if offset.now:
        out["Cache-Control"] = "no-store"
    else:
        tag = codec.etag(state.gen, read.after, end, eof)
        out["ETag"] = tag
        out["Cache-Control"] = "no-cache" if at_tail else _IMMUTABLE
        if request.headers.get("If-None-Match") == tag:
            return web.Response(status=304, headers=out)
    body = codec.body_of(codec.encoding_of(state.media), data)
    if len(body) <= _SMALL_ANSWER:
        return web.Response(status=200, body=body, headers=out)
    response = web.StreamResponse(headers={**out, **_SECURITY, **_cors(request, rt)})
    response.content_length = len(body)
    await response.prepare(request)
    async with _watched(request, rt, response) as reader:
        await reader.write(body)
        await reader.sent()
    return response


async def _unless_draining(rt: Runtime, reading: Coroutine[Any, Any, DsRead | None]) -> DsRead | None:
    """A long-poll, answered 503 at once when relayd starts draining (the client retries elsewhere)."""
    read = asyncio.ensure_future(reading)
    draining = asyncio.ensure_future(rt.draining.wait())
    try:
        await asyncio.wait((read, draining), return_when=asyncio.FIRST_COMPLETED)
    finally:
        draining.cancel()
        if not read.done():
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read
    if read.cancelled():
        raise _Refused(503, "relayd is draining; retry")
    return read.result()


def _head(read: DsRead | None) -> web.StreamResponse:
    state = _found(read).state
    out = {
        "Content-Type": state.content_type,
        "Stream-Next-Offset": codec.format_offset(state.gen, state.tail),
        "Cache-Control": "no-store",
    }
    if state.ttl_s is not None:
        out["Stream-TTL"] = str(state.ttl_s)
    if state.expires_at:
        out["Stream-Expires-At"] = state.expires_at
    if state.closed:
        out["Stream-Closed"] = "true"
    return web.Response(status=200, headers=out)


def _found(read: DsRead | None) -> DsRead:
    if read is None:
        raise _Refused(404, "no such stream")
    if read.after < 0:
        raise _Refused(400, "this stream never issued that offset")
    return read


async def _sse(request: web.Request, rt: Runtime, stream: str, offset: Offset) -> web.StreamResponse:
    """Data events, each followed by its control event; ends at the close, after
    ``durable.sse_max_s`` (clients resume from their offset), or when relayd drains."""
    cfg = rt.config.durable
    durable = rt.relay.durable
    keepalive_s = cfg.long_poll_timeout_ms / 1000
    with durable.follow(stream) as waiter:  # before the first read: nothing slips in between
        read = _found(await durable.read(stream, offset, cfg.read_max_bytes))
        state = read.state
        encoding = codec.encoding_of(state.media)
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_SECURITY, **_cors(request, rt)}
        if encoding == "base64":
            headers["Stream-SSE-Data-Encoding"] = "base64"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        stopping = asyncio.Event()

        def stop() -> None:
            stopping.set()
            waiter.event.set()

        async def drain_close() -> None:
            stop()

        rt.consumers.add(drain_close)
        cursor = codec.cursor(now_ms(), request.query.get("cursor"))
        deadline = monotonic() + cfg.sse_max_s
        gen = state.gen
        first = True
        try:
            async with _watched(request, rt, response, gone=stop) as reader:
                while True:
                    data = [e for e in read.entries if e.data is not None]
                    end = data[-1].offset if data else read.after
                    at_tail = end >= state.tail
                    eof = state.closed and at_tail
                    next_offset = codec.format_offset(gen, end)
                    if data or eof or first:  # (a wake-up without news says nothing)
                        out = [codec.sse_event("data", codec.sse_data(encoding, data))] if data else []
                        out.append(codec.sse_control(next_offset, cursor, up_to_date=at_tail, closed=eof))
                        await reader.write(b"".join(out))
                    first = False
                    if eof or stopping.is_set():
                        break
                    position = Offset(gen, end)
                    while at_tail and not stopping.is_set():
                        remaining = deadline - monotonic()
                        if remaining <= 0:
                            stop()  # durable.sse_max_s: the client resumes from its offset
                        elif await waiter.wait(min(keepalive_s, remaining)):
                            break
                        else:
                            await reader.write(codec.sse_control(next_offset, cursor, up_to_date=True, closed=False))
                    if stopping.is_set():
                        break
                    later = await durable.read(stream, position, cfg.read_max_bytes)
                    if later is None or later.after < 0 or later.state.gen != gen:
                        break  # deleted (and maybe created again): the client's next request says so
                    read, state = later, later.state
                await reader.sent()  # what is queued goes out (or the reader is cut off)
        except StoreError as exc:
            log.debug("durable SSE of %s ended: %s", stream, exc)
        finally:
            rt.consumers.discard(drain_close)
    return response


class _Reader:
    """A prepared response's writes, through an :class:`~relayd.outbox.Outbox`: its watchdog drops a
    reader that takes nothing for ``consumer.send_timeout_ms`` (as relayd's own SSE)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._queued = 0

    async def write(self, data: bytes) -> None:
        """Queue ``data``, waiting while the queue is full (paced by the reader); dropped once the
        reader is gone."""
        await self.outbox.put(data)
        self._queued += len(data)

    async def sent(self) -> None:
        """Wait until what was written reached the transport, or the reader is gone."""
        outbox = self.outbox
        while outbox.written < self._queued and not outbox.closed:
            await outbox.flush(_FLUSH_CHECK_S)  # returns as soon as the queue is empty or closed


_FLUSH_CHECK_S = 60.0  # (a bound for mypy's sake: the watchdog ends a stalled flush long before)


@contextlib.asynccontextmanager
async def _watched(
    request: web.Request, rt: Runtime, response: web.StreamResponse, gone: Callable[[], None] | None = None
) -> AsyncIterator[_Reader]:
    """Write ``response`` through an outbox for the block; ``gone()`` when the reader is (it
    disconnected, or was cut off: its transport aborted, counted as relayd's SSE's are)."""
    consumer = rt.config.consumer

    async def send(batch: list[bytes]) -> None:
        await response.write(b"".join(batch))
        await request.writer.drain()  # after every batch, so the transport's buffer stays bounded

    outbox = Outbox(
        send,
        consumer.max_queue_bytes,
        consumer.send_timeout_ms / 1000,
        backlog_of(request),  # a stuck reader: the transport is aborted
        budget=rt.relay.consumer_budget,
    )
    async with writing(outbox, "relayd-durable-writer") as writer:
        if gone is not None:
            writer.add_done_callback(lambda _: gone())
        yield _Reader(outbox)
    if outbox.stalled:
        rt.metrics.forced_close("consumer_sse", outbox.stalled)
        rt.metrics.slow_consumer()
        stream = request.match_info["stream"]
        log.info("durable reader of %s from %s cut off: %s", stream, request.remote, outbox.stalled)


# DELETE, OPTIONS ------------------------------------------------------------------------------------


async def _delete(request: web.Request, rt: Runtime, stream: str) -> web.StreamResponse:
    if not await rt.relay.durable.delete(stream):
        raise _Refused(404, "no such stream")
    return web.Response(status=204)


def _preflight() -> web.StreamResponse:
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, HEAD, PUT, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": _ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        },
    )


_METHODS = {"PUT": _create, "POST": _append, "GET": _read, "HEAD": _read, "DELETE": _delete}


# helpers --------------------------------------------------------------------------------------------


async def _body(request: web.Request, rt: Runtime) -> bytes:
    """The body of a write, unless the producers' appends waiting for the store (HTTP ingest's and
    the websocket's too) already hold ``limits.max_producer_backlog_bytes``: 503, before it is read."""
    if not rt.relay.write_admits(2 * (request.content_length or 0)):
        raise _Refused(503, "relayd has too many appends waiting for the store; retry later", {"Retry-After": "1"})
    return await request.read()  # at most client_max_size (limits.max_frame_bytes): 413 above


@contextlib.contextmanager
def _charged(rt: Runtime, chunks: list[bytes]) -> Iterator[None]:
    """``chunks`` count against the producers' backlog while the store has not answered."""
    cost = write_cost(chunks)
    budget = rt.relay.producer_budget
    budget.charge(cost)
    try:
        yield
    finally:
        budget.release(cost)


def _closing(request: web.Request) -> bool:
    return request.headers.get("Stream-Closed", "").strip().lower() == "true"


def _unavailable(outcome: DsWrite) -> None:
    if outcome.code == "store_unavailable":
        raise _Refused(503, f"store unavailable: {outcome.message}")


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message, headers=headers)


def _cors(request: web.Request, rt: Runtime) -> dict[str, str]:
    origin = request.headers.get("Origin")
    allowed = rt.config.server.allowed_origins
    if origin is None or not origin_allowed(allowed, origin):
        return {}
    return {
        "Access-Control-Allow-Origin": "*" if "*" in allowed else origin,
        "Access-Control-Expose-Headers": _EXPOSE,
        "Vary": "Origin",
    }
