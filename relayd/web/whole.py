"""``GET /v1/streams/{stream}/whole``: the whole stream as one JSON response.

A non-streaming read: it waits, up to ``wait_ms`` (``consumer.whole_wait_ms`` is its default and
cap), for the stream to end, and answers with its chunks (a text stream's text), how it ended and
its last cursor: 200 once ended, 202 if still open then. The read is an ordinary subscription
(history, then live) whose frames a :class:`_Collector` keeps instead of a socket, bounded by
``consumer.whole_max_bytes``: a larger stream is refused (413), never buffered without bound.
``?format=openai`` answers with the ``chat.completion`` the stream adds up to. docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
from aiohttp import web

from relayd.errors import ClientError, StoreError
from relayd.model import StreamMeta
from relayd.protocol import WS_CODEC, format_cursor, parse_cursor, parse_optional_cursor
from relayd.relay import Subscription
from relayd.web.cors import cors_headers
from relayd.web.gate import limited
from relayd.web.keys import RUNTIME
from relayd.web.openai_sse import ERROR_STATUS, completion, end_error, error_object
from relayd.web.sse import authorize, refusal, refused, wait_param

# HTTP status of a stream that ended otherwise than completed, in OpenAI's format (an error then).
_END_STATUS = {"error": 502, "producer_lost": 502, "cancelled": 409}


class _Collector:
    """The :class:`~relayd.subscription.Sink` of a whole read: keeps what the subscription delivers
    (websocket frames, decoded), up to ``limit`` bytes of them, and says when it is done."""

    def __init__(self, queue_bytes: int, limit: int) -> None:
        self.oldest = 0.0
        self._queue_bytes = queue_bytes
        self._limit = limit
        self._size = 0
        self._known = (0, 0)
        self.chunks: list[Any] = []
        self.gaps: list[dict[str, str]] = []
        self.cursor: str | None = None
        self.reset = ""
        self.end: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.too_large = False
        self.done = asyncio.Event()  # ended, failed, too large, or the subscription finished
        self.caught_up = asyncio.Event()  # holds everything stored when :meth:`expect` was called

    def expect(self, meta: StreamMeta | None) -> None:
        """Answer with no less than the stream held as ``meta`` (None: no stream, so nothing)."""
        if meta is not None:
            self._known = (meta.gen, meta.n)
        if meta is None or not meta.n:
            self.caught_up.set()

    @property
    def max_bytes(self) -> int:
        return self._queue_bytes  # the subscriber's catch-up pieces and live buffer are sized by it

    def offer(self, data: bytes, chunks: int = 0) -> bool:
        self._add(data)
        return True  # never full: past the limit the read is over (413)

    def control(self, data: bytes) -> None:
        self._add(data)

    async def put(self, data: bytes, chunks: int = 0) -> None:
        self._add(data)

    def subscription_done(self, sub: Subscription) -> None:
        self._finish()

    def _finish(self) -> None:
        self.done.set()
        self.caught_up.set()

    def _add(self, data: bytes) -> None:
        if self.done.is_set():
            return
        self._size += len(data)
        if self._size > self._limit:
            self.too_large = True
            self._finish()
            return
        for line in data.split(b"\n"):  # a frame never holds a raw newline (docs/protocol.md)
            self._frame(orjson.loads(line))

    def _frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "chunk":
            self.chunks.append(frame["data"])
            self.cursor = frame["cursor"]
            gen, offset = parse_cursor(self.cursor)
            if gen != self._known[0] or offset >= self._known[1]:  # (another generation: replaced meanwhile)
                self.caught_up.set()
        elif kind == "end":
            self.cursor = frame["cursor"]
            self.end = frame
            self._finish()
        elif kind == "gap":
            self.gaps.append({"cursor": frame["cursor"], "next": frame["next"]})
        elif kind == "reset":  # what was read belongs to history that is gone: start over
            self.chunks.clear()
            self.gaps.clear()
            self.cursor = None
            self.reset = frame["reason"]
        elif kind == "error":
            self.error = frame
            self._finish()


@limited("consumer_sse")
async def whole(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    cfg = rt.config.consumer
    openai = request.query.get("format") == "openai"
    if rt.draining.is_set():
        return refusal(openai, 503, "shutting_down", "relayd is draining")
    try:
        principal, stream = authorize(request)
        cursor = parse_optional_cursor(request.query.get("cursor"))
        wait_ms = wait_param(request, cfg.whole_wait_ms)
    except ClientError as exc:
        return refused(request, exc, openai)
    try:
        meta = await rt.relay.read_meta(stream)
    except StoreError as exc:
        return refusal(openai, 503, "store_unavailable", str(exc))

    collector = _Collector(cfg.max_queue_bytes, cfg.whole_max_bytes)
    if meta is not None:
        collector.expect(meta)
    # never past the token's expiry: the read answers with what it has by then
    wait_s = max(min(wait_ms / 1000, principal.expires_at - time.time()), 0.0)
    sub = rt.relay.subscribe(stream, collector, WS_CODEC, cursor=cursor, wait_s=wait_s, owner=collector)
    draining = asyncio.Event()

    async def drain_close() -> None:
        draining.set()
        collector.done.set()

    rt.consumers.add(drain_close)
    sub.start()
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await collector.done.wait()
        # Not ended in time: answer with at least what was stored when the read began (wait_ms=0:
        # a snapshot). A stream that did not exist then is looked at again; the subscription says
        # stream_not_found at the same moment if it still does not.
        # (The read is bounded by the store's own timeout, not by a cancellation: a Redis read
        # cancelled by a timeout can lose the cancellation inside redis-py.)
        if meta is None and not collector.done.is_set():
            with contextlib.suppress(StoreError):
                collector.expect(await rt.relay.read_meta(stream))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(cfg.send_timeout_ms / 1000):
                await collector.caught_up.wait()
    finally:
        rt.consumers.discard(drain_close)
        await sub.stop()

    if draining.is_set():
        answer = refusal(openai, 503, "shutting_down", "relayd is restarting; retry")
    elif collector.too_large:
        message = f"the stream is larger than consumer.whole_max_bytes ({cfg.whole_max_bytes} bytes); read it streaming"
        answer = refusal(openai, 413, "stream_too_large", message)
    elif collector.error is not None:
        code = collector.error["code"]
        answer = refusal(openai, ERROR_STATUS.get(code, 500), code, collector.error["message"])
    elif openai:
        gen = parse_cursor(collector.cursor)[0] if collector.cursor else meta.gen if meta is not None else 0
        answer = _openai_answer(stream, gen, collector, sub.text)
    else:
        answer = _answer(stream, collector, sub.text, cursor)
    answer.headers.update(cors_headers(request))
    return answer


def _answer(stream: str, got: _Collector, text: bool, cursor: tuple[int, int] | None) -> web.Response:
    end = got.end
    body: dict[str, Any] = {"stream": stream, "status": end["reason"] if end is not None else "open"}
    if end is not None and end.get("message"):
        body["message"] = end["message"]
    body["cursor"] = got.cursor or (format_cursor(*cursor) if cursor is not None and not got.reset else None)
    body["content_type"] = "text" if text else "json"
    if text:
        body["text"] = _text(got.chunks)
    else:
        body["chunks"] = got.chunks
    if got.gaps:
        body["gaps"] = got.gaps
    if got.reset:
        body["reset"] = got.reset
    return web.json_response(body, status=200 if end is not None else 202, dumps=_dumps)


def _openai_answer(stream: str, gen: int, got: _Collector, text: bool) -> web.Response:
    end = got.end
    if end is not None and end["reason"] != "completed":
        body = end_error(end["reason"], end.get("message", ""))
        return web.json_response(body, status=_END_STATUS.get(end["reason"], 502), dumps=_dumps)
    if got.gaps:  # OpenAI's format cannot say which part is missing: refused rather than hidden
        gap = got.gaps[0]
        message = f"entries after {gap['cursor']} are gone (trimmed or expired); read the stream in relayd's format"
        return web.json_response(error_object("gap", message, "stream_gap", **gap), status=410, dumps=_dumps)
    chunks = [_text(got.chunks)] if text else got.chunks
    body = completion(stream, gen, chunks, text, completed=end is not None)
    body["relayd"] = {"stream": stream, "status": "completed" if end is not None else "open", "cursor": got.cursor}
    return web.json_response(body, status=200 if end is not None else 202, dumps=_dumps)


def _text(chunks: list[Any]) -> str:
    # a text stream's entry that is not a string (see protocol.encode_sse_entries): its JSON text
    return "".join(c if isinstance(c, str) else orjson.dumps(c).decode() for c in chunks)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
