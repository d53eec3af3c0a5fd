"""``POST /v1/streams/{id}/append``, ``/open`` and ``/end``: producers over plain HTTP (API key).

For producers that cannot hold the ingest websocket (serverless functions, edge runtimes, curl).
Each request is one call of the relay's connectionless producer API (relayd/leases.py), answered
once the store has it: the same group commit, dedupe by epoch and seq, fencing and publishing as
``/v1/ingest``. Specified in docs/protocol.md, "HTTP ingest".

Bounds: a body larger than ``limits.max_frame_bytes`` gets 413 before it is read; while the
producers' appends waiting for the store (websocket and HTTP together) have spent
``limits.max_producer_backlog_bytes``, a request gets 503 ``overloaded`` with ``Retry-After``,
also before its body is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from typing import Any, TypeVar

from aiohttp import web

from relayd.auth import parse_bearer
from relayd.errors import AuthError, ClientError, ProtocolError
from relayd.logs import Pairs
from relayd.model import Opened, Refused, WriteOutcome, Written
from relayd.protocol import (
    check_stream_id,
    decode_end_body,
    decode_open_body,
    decode_write,
    format_cursor,
)
from relayd.web.errors import ERROR_CODE, client_error_response, error_response
from relayd.web.keys import RUNTIME, Runtime

log = logging.getLogger("relayd.ingest")

T = TypeVar("T")
_RETRY_AFTER_S = "1"
# HTTP status of each refusal of a write (the codes are the websocket ingest's)
_STATUS = {
    "fenced": 409,
    "seq_gap": 409,
    "stream_ended": 409,
    "content_type": 400,
    "store_unavailable": 503,
    "overloaded": 503,
}


async def append(request: web.Request) -> web.Response:
    """Append chunks (and optionally end the stream) as the producer of ``epoch``."""
    received = monotonic()
    got = await _request(request, lambda rt, stream, body: decode_write(body, stream, rt.config.limits.max_chunk_bytes))
    if isinstance(got, web.Response):
        return got
    rt, op = got
    outcome = await rt.relay.write(
        op.stream,
        epoch=op.epoch,
        seq=op.seq,
        chunks=op.chunks,
        producer=op.producer,
        content_type=op.content_type,
        end=op.end,
        received=received,
    )
    return _written(op.stream, outcome)


async def open_stream(request: web.Request) -> web.Response:
    """Open the stream as the websocket ``open`` does; optional (an append opens by itself)."""
    received = monotonic()
    got = await _request(request, lambda rt, stream, body: decode_open_body(body, stream))
    if isinstance(got, web.Response):
        return got
    rt, op = got
    outcome = await rt.relay.open_stream(
        op.stream, epoch=op.epoch, producer=op.producer, content_type=op.content_type, received=received
    )
    if not isinstance(outcome, Opened):
        return _refused(outcome)
    answer: dict[str, Any] = {
        "stream": op.stream,
        "epoch": outcome.epoch,
        "seq": outcome.seq,
        "cursor": format_cursor(outcome.gen, outcome.n) if outcome.n else None,
        "status": outcome.status,
        "content_type": outcome.content_type,
        "cancel_requested": rt.relay.cancel_requested(op.stream),
    }
    if op.producer is not None:
        answer["producer"] = op.producer
    return web.json_response(answer)


async def end(request: web.Request) -> web.Response:
    """End the stream as the producer of ``epoch``."""
    got = await _request(request, lambda rt, stream, body: (stream, *decode_end_body(body)))
    if isinstance(got, web.Response):
        return got
    rt, (stream, epoch, reason, message) = got
    return _written(stream, await rt.relay.finish(stream, epoch=epoch, reason=reason, message=message))


async def _request(
    request: web.Request, decode: Callable[[Runtime, str, bytes], T]
) -> tuple[Runtime, T] | web.Response:
    """The runtime and the decoded body of a request that may write, or the response refusing it."""
    rt = request.app[RUNTIME]
    if rt.draining.is_set():
        return _unavailable("shutting_down", "relayd is draining; retry (on another instance)")
    try:
        scope = rt.api_keys.verify(parse_bearer(request.headers.get("Authorization")))
        stream = check_stream_id(request.match_info["stream"])
        if scope is not None:  # auth.api_key_streams
            scope.require(stream)
    except ClientError as exc:
        if isinstance(exc, AuthError):
            rt.metrics.auth_failure(exc.code)
            fields = {"remote": request.remote, "code": exc.code}
            log.info("http producer refused %s", Pairs(fields), extra={"role": "producer", **fields})
        return client_error_response(exc)
    limit = rt.config.limits.max_frame_bytes
    length = request.content_length
    if length is not None and length > limit:
        return _too_large(limit)
    # A body becomes at least twice its size in chunks and their command: refused before it is read.
    if not rt.relay.write_admits(2 * (length or 0)):
        return _unavailable("overloaded", "relayd has too many appends waiting for the store; retry later")
    try:
        body = await request.read()  # at most client_max_size, which is limits.max_frame_bytes
    except web.HTTPRequestEntityTooLarge:
        return _too_large(limit)
    try:
        return rt, decode(rt, stream, body)
    except ProtocolError as exc:
        rt.metrics.bad_frame(exc.code)
        fields = {"remote": request.remote, "stream": stream, "code": exc.code, "error": exc.message}
        log.info("http producer request refused %s", Pairs(fields), extra={"role": "producer", **fields})
        return client_error_response(exc)


def _written(stream: str, outcome: WriteOutcome) -> web.Response:
    if not isinstance(outcome, Written):
        return _refused(outcome)
    answer: dict[str, Any] = {
        "stream": stream,
        "epoch": outcome.epoch,
        "seq": outcome.seq,
        "cursor": format_cursor(outcome.gen, outcome.offset) if outcome.offset else None,
        "stored": outcome.stored,
        "cancel_requested": outcome.cancel_requested,
    }
    if outcome.ended:
        answer["ended"] = {"reason": outcome.reason, "cursor": format_cursor(outcome.gen, outcome.ended)}
    return web.json_response(answer)


def _refused(outcome: Refused) -> web.Response:
    code = outcome.code
    body: dict[str, Any] = {"code": code, "message": outcome.message}
    if code == "fenced":
        body["epoch"] = outcome.value  # the stream's current epoch
    elif code == "seq_gap":
        body["seq"] = outcome.value  # the last seq stored: resend from the next one
    elif code == "stream_ended" and outcome.status:
        body["status"] = outcome.status  # how it ended
    status = _STATUS.get(code, 503)
    response = web.json_response({"error": body}, status=status)
    response[ERROR_CODE] = code
    if status == 503:
        response.headers["Retry-After"] = _RETRY_AFTER_S
    return response


def _unavailable(code: str, message: str) -> web.Response:
    response = error_response(503, code, message)
    response.headers["Retry-After"] = _RETRY_AFTER_S
    return response


def _too_large(limit: int) -> web.Response:
    return error_response(413, "body_too_large", f"the body is larger than limits.max_frame_bytes ({limit} bytes)")
