"""The wire protocol, sans I/O: bytes in, typed ops out; events in, bytes out.

Specified in docs/protocol.md. Nothing here touches a socket, a loop or Redis, so every rule is
tested without one. Messages are NDJSON: one or more JSON objects separated by ``\\n``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from relayd.errors import ProtocolError

STREAM_ID_RE = re.compile(r"[A-Za-z0-9_\-.:/@=]{1,200}")
PRODUCER_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
END_REASONS = frozenset({"completed", "error", "cancelled", "producer_lost"})
PRODUCER_END_REASONS = frozenset({"completed", "error", "cancelled"})
CONTENT_TYPES = frozenset({"json", "text"})
MAX_END_MESSAGE = 1000
MAX_PING_ID_BYTES = 256
_OFFSET_DIGITS = 10


def is_valid_stream_id(stream_id: object) -> bool:
    return isinstance(stream_id, str) and STREAM_ID_RE.fullmatch(stream_id) is not None


def check_stream_id(stream_id: object) -> str:
    if not is_valid_stream_id(stream_id):
        raise ProtocolError("invalid_stream_id", "stream id must be 1-200 characters of A-Z a-z 0-9 _ - . : / @ =")
    return stream_id  # type: ignore[return-value]


# -- cursors ------------------------------------------------------------------------------------
# A cursor is "<generation>-<offset, zero-padded>": the generation is the stream's creation time
# in ms (it changes when a lost stream is created again), the offset counts entries from 1. The
# padding makes cursors of one stream sort lexicographically in append order.


def cursor_prefix(gen: int) -> str:
    return f"{gen}-"


def format_cursor(gen: int, offset: int) -> str:
    return f"{gen}-{offset:0{_OFFSET_DIGITS}d}"


def parse_cursor(text: str) -> tuple[int, int]:
    """``"1763745600123-0000000042"`` -> ``(1763745600123, 42)``."""
    gen, sep, offset = text.partition("-")
    if not sep or not gen.isdigit() or not offset.isdigit() or len(gen) > 20 or len(offset) > 20:
        raise ProtocolError("bad_frame", f"invalid cursor {text[:40]!r}")
    return int(gen), int(offset)


# -- producer ops -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenOp:
    stream: str
    epoch: int | None
    content_type: str
    # The producer's own id for this stream: an open without an epoch from the producer that
    # started the current epoch resumes it, so an open whose ``opened`` was lost can be repeated.
    producer: str | None = None


# Memory an admitted chunk holds besides its JSON, while it waits for Redis (its bytes object,
# its copy in the command buffer, the op and callback objects): counted by producer flow control.
CHUNK_OVERHEAD_BYTES = 300


@dataclass(frozen=True, slots=True)
class AppendOp:
    stream: str
    seq: int
    chunks: list[bytes]  # each chunk already JSON-encoded, ready to store
    nbytes: int

    @property
    def cost(self) -> int:
        """What this append holds in memory until acknowledged: the unit of producer flow control."""
        return 2 * self.nbytes + CHUNK_OVERHEAD_BYTES * len(self.chunks)


@dataclass(frozen=True, slots=True)
class EndOp:
    stream: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class PingOp:
    id: Any


ProducerOp = OpenOp | AppendOp | EndOp | PingOp


@dataclass(frozen=True, slots=True)
class FrameError:
    """A line that could not be decoded into an op; answered with an error frame."""

    error: ProtocolError
    stream: str | None = None
    seq: int | None = None


def split_message(data: bytes | str) -> Iterator[bytes | str]:
    """Yield the non-empty NDJSON lines of one websocket message."""
    if isinstance(data, str):
        if "\n" not in data:
            yield data
            return
        yield from (line for line in data.split("\n") if line.strip())
        return
    if b"\n" not in data:
        yield data
        return
    yield from (line for line in data.split(b"\n") if line.strip())


def _load_object(line: bytes | str) -> dict[str, Any]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_frame", "not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "a frame must be a JSON object")
    return obj


def _positive_int(obj: dict[str, Any], name: str, *, required: bool) -> int | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise ProtocolError("bad_frame", f"'{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value >= 2**53:
        raise ProtocolError("bad_frame", f"'{name}' must be a positive integer")
    return value


def _ping(obj: dict[str, Any]) -> PingOp:
    """The pong echoes the ``id``, so its size is bounded: a reply never outgrows its request much."""
    ping_id = obj.get("id")
    if ping_id is not None:
        try:
            size = len(orjson.dumps(ping_id))
        except orjson.JSONEncodeError:  # nested too deeply to encode
            size = MAX_PING_ID_BYTES + 1
        if size > MAX_PING_ID_BYTES:
            raise ProtocolError("bad_frame", f"'id' must be at most {MAX_PING_ID_BYTES} bytes of JSON")
    return PingOp(ping_id)


class ProducerDecoder:
    """Decodes producer messages into ops, enforcing the per-chunk size limit.

    Per-stream content types are remembered by the caller and passed to :meth:`decode`, because
    whether a chunk is valid depends on the stream (text streams take strings only).
    """

    __slots__ = ("max_chunk_bytes",)

    def __init__(self, max_chunk_bytes: int) -> None:
        self.max_chunk_bytes = max_chunk_bytes

    def decode(
        self, line: bytes | str, text_streams: set[str] | frozenset[str] = frozenset()
    ) -> ProducerOp | FrameError:
        stream: str | None = None
        seq: int | None = None
        try:
            obj = _load_object(line)
            op = obj.get("op")
            if op == "append":
                stream = check_stream_id(obj.get("stream"))
                seq = _positive_int(obj, "seq", required=True)
                assert seq is not None
                return self._append(obj, stream, seq, stream in text_streams)
            if op == "ping":
                return _ping(obj)
            if op == "open":
                stream = check_stream_id(obj.get("stream"))
                epoch = _positive_int(obj, "epoch", required=False)
                content_type = obj.get("content_type", "json")
                if content_type not in CONTENT_TYPES:
                    raise ProtocolError("bad_frame", "'content_type' must be 'json' or 'text'")
                producer = obj.get("producer")
                if producer is not None and (
                    not isinstance(producer, str) or PRODUCER_ID_RE.fullmatch(producer) is None
                ):
                    raise ProtocolError("bad_frame", "'producer' must be 1-64 characters of A-Z a-z 0-9 _ . : -")
                return OpenOp(stream, epoch, content_type, producer)
            if op == "end":
                stream = check_stream_id(obj.get("stream"))
                reason = obj.get("reason")
                if reason not in PRODUCER_END_REASONS:
                    raise ProtocolError("bad_frame", "'reason' must be completed, error or cancelled")
                message = obj.get("message") or ""
                if not isinstance(message, str):
                    raise ProtocolError("bad_frame", "'message' must be a string")
                return EndOp(stream, reason, message[:MAX_END_MESSAGE])
            raise ProtocolError("unknown_op", f"unknown op {str(op)[:40]!r}" if op is not None else "'op' is required")
        except ProtocolError as exc:
            return FrameError(exc, stream, seq)

    def _append(self, obj: dict[str, Any], stream: str, seq: int, text: bool) -> AppendOp:
        if "chunks" in obj:
            values = obj["chunks"]
            if not isinstance(values, list) or not values:
                raise ProtocolError("bad_frame", "'chunks' must be a non-empty list")
        elif "chunk" in obj:
            values = [obj["chunk"]]
        else:
            raise ProtocolError("bad_frame", "append needs 'chunk' or 'chunks'")
        limit = self.max_chunk_bytes
        chunks: list[bytes] = []
        nbytes = 0
        for value in values:
            if text and not isinstance(value, str):
                raise ProtocolError("content_type", "a text stream takes string chunks only")
            raw = orjson.dumps(value)
            if len(raw) > limit:
                raise ProtocolError("chunk_too_large", f"a chunk is {len(raw)} bytes; the limit is {limit}")
            chunks.append(raw)
            nbytes += len(raw)
        return AppendOp(stream, seq, chunks, nbytes)


# -- consumer ops -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscribeOp:
    stream: str
    cursor: tuple[int, int] | None
    wait_ms: int | None


@dataclass(frozen=True, slots=True)
class UnsubscribeOp:
    stream: str


@dataclass(frozen=True, slots=True)
class CancelOp:
    stream: str


@dataclass(frozen=True, slots=True)
class AuthOp:
    token: str


ConsumerOp = SubscribeOp | UnsubscribeOp | CancelOp | AuthOp | PingOp


def parse_optional_cursor(value: object) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_frame", "'cursor' must be a string")
    return parse_cursor(value)


def decode_consumer(line: bytes | str) -> ConsumerOp | FrameError:
    stream: str | None = None
    try:
        obj = _load_object(line)
        op = obj.get("op")
        if op == "ping":
            return _ping(obj)
        if op == "auth":
            token = obj.get("token")
            if not isinstance(token, str) or not token:
                raise ProtocolError("bad_frame", "'token' must be a non-empty string")
            return AuthOp(token)
        if op in ("subscribe", "unsubscribe", "cancel"):
            stream = check_stream_id(obj.get("stream"))
            if op == "unsubscribe":
                return UnsubscribeOp(stream)
            if op == "cancel":
                return CancelOp(stream)
            wait_ms = obj.get("wait_ms")
            if wait_ms is not None and (isinstance(wait_ms, bool) or not isinstance(wait_ms, int) or wait_ms < 0):
                raise ProtocolError("bad_frame", "'wait_ms' must be a non-negative integer")
            return SubscribeOp(stream, parse_optional_cursor(obj.get("cursor")), wait_ms)
        raise ProtocolError("unknown_op", f"unknown op {str(op)[:40]!r}" if op is not None else "'op' is required")
    except ProtocolError as exc:
        return FrameError(exc, stream)


# -- frames relayd sends ------------------------------------------------------------------------


def frame(**fields: Any) -> bytes:
    """Encode one control frame (``type`` first by convention of the callers)."""
    return orjson.dumps(fields)


def error_frame(code: str, message: str, stream: str | None = None, seq: int | None = None) -> bytes:
    fields: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if stream is not None:
        fields["stream"] = stream
    if seq is not None:
        fields["seq"] = seq
    return orjson.dumps(fields)


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored entry of a stream: a chunk (``data`` is its JSON) or the end."""

    offset: int
    data: bytes | None = None
    reason: str | None = None
    message: str = ""

    @property
    def is_end(self) -> bool:
        return self.reason is not None


def ws_chunk_prefix(stream: str) -> bytes:
    """The bytes every chunk frame of ``stream`` starts with; computed once per stream."""
    return b'{"type":"chunk","stream":' + orjson.dumps(stream) + b',"cursor":"'


def encode_ws_entries(prefix: bytes, stream: str, gen: int, entries: list[Entry]) -> list[bytes]:
    """Websocket frames for ``entries``, one per entry. Chunks are spliced, not re-encoded."""
    out: list[bytes] = []
    gen_b = str(gen).encode()
    for entry in entries:
        if entry.data is not None:
            out.append(b"".join((prefix, gen_b, b"-%010d" % entry.offset, b'","data":', entry.data, b"}")))
        else:
            out.append(end_frame(stream, format_cursor(gen, entry.offset), entry.reason or "", entry.message))
    return out


def end_frame(stream: str, cursor: str, reason: str, message: str) -> bytes:
    fields: dict[str, Any] = {"type": "end", "stream": stream, "cursor": cursor, "reason": reason}
    if message:
        fields["message"] = message
    return orjson.dumps(fields)


def sse_event(event: str, data: bytes | str, event_id: str | None = None) -> bytes:
    """One SSE event. Text with newlines becomes several ``data:`` lines."""
    if isinstance(data, bytes):
        data = data.decode()
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    head = f"id: {event_id}\nevent: {event}\n" if event_id is not None else f"event: {event}\n"
    return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


def encode_sse_entries(gen: int, entries: list[Entry], text: bool) -> bytes:
    """SSE events for ``entries``, joined for one write."""
    parts: list[bytes] = []
    prefix = f"id: {gen}-".encode()
    for entry in entries:
        if entry.data is not None:
            if text:
                parts.append(sse_event("chunk", orjson.loads(entry.data), format_cursor(gen, entry.offset)))
            else:
                parts.append(
                    b"".join((prefix, b"%010d" % entry.offset, b"\nevent: chunk\ndata: ", entry.data, b"\n\n"))
                )
        else:
            body: dict[str, Any] = {"reason": entry.reason}
            if entry.message:
                body["message"] = entry.message
            parts.append(sse_event("end", orjson.dumps(body), format_cursor(gen, entry.offset)))
    return b"".join(parts)


# -- codecs: how a subscriber's frames look on one transport ------------------------------------


class FrameCodec:
    """Encodes what a subscriber sends, for one transport. Stateless; one instance per kind."""

    kind = ""

    def entries(self, stream: str, gen: int, entries: list[Entry], text: bool) -> bytes:
        raise NotImplementedError

    def error(self, stream: str, code: str, message: str) -> bytes:
        raise NotImplementedError

    def gap(self, stream: str, gen: int, had: int, next_offset: int) -> bytes:
        raise NotImplementedError

    def reset(self, stream: str, reason: str) -> bytes:
        raise NotImplementedError


class WsCodec(FrameCodec):
    """Websocket: NDJSON frames; one item of the outbox may hold several lines."""

    kind = "ws"

    def entries(self, stream: str, gen: int, entries: list[Entry], text: bool) -> bytes:
        return b"\n".join(encode_ws_entries(ws_chunk_prefix(stream), stream, gen, entries))

    def error(self, stream: str, code: str, message: str) -> bytes:
        return error_frame(code, message, stream)

    def gap(self, stream: str, gen: int, had: int, next_offset: int) -> bytes:
        return frame(type="gap", stream=stream, cursor=format_cursor(gen, had), next=format_cursor(gen, next_offset))

    def reset(self, stream: str, reason: str) -> bytes:
        return frame(type="reset", stream=stream, reason=reason)


class SseCodec(FrameCodec):
    """Server-Sent Events: one response per stream, so no stream field in the events."""

    kind = "sse"

    def entries(self, stream: str, gen: int, entries: list[Entry], text: bool) -> bytes:
        return encode_sse_entries(gen, entries, text)

    def error(self, stream: str, code: str, message: str) -> bytes:
        return sse_event("error", orjson.dumps({"code": code, "message": message}))

    def gap(self, stream: str, gen: int, had: int, next_offset: int) -> bytes:
        body = {"cursor": format_cursor(gen, had), "next": format_cursor(gen, next_offset)}
        return sse_event("gap", orjson.dumps(body))

    def reset(self, stream: str, reason: str) -> bytes:
        return sse_event("reset", orjson.dumps({"reason": reason}))


WS_CODEC = WsCodec()
SSE_CODEC = SseCodec()
