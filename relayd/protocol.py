"""The wire protocol, sans I/O: bytes in, typed ops out; events in, bytes out.

Specified in docs/protocol.md. Nothing here touches a socket, a loop or Redis, so every rule is
tested without one. Messages are NDJSON: one or more JSON objects separated by ``\\n``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from relayd.errors import ProtocolError
from relayd.model import Entry

STREAM_ID_RE = re.compile(r"[A-Za-z0-9_\-.:/@=]{1,200}")
PRODUCER_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
END_REASONS = frozenset({"completed", "error", "cancelled", "producer_lost"})
PRODUCER_END_REASONS = frozenset({"completed", "error", "cancelled"})
CONTENT_TYPES = frozenset({"json", "text"})
MAX_END_MESSAGE = 1000
# The largest integer relayd takes in an epoch, seq, cursor or wait_ms: the store's Lua scripts
# count in doubles, which are exact only up to 2^53 - 1 (above it, n + 1 == n).
MAX_EXACT_INT = 2**53 - 1
# The deepest nesting of arrays and objects in a frame, the frame itself being level 1. orjson
# reads 1024 levels but writes only 254, so a deeper chunk or ping id could be read and then not
# be written back (stored, echoed): refused when read instead, with room to spare.
MAX_JSON_DEPTH = 128
_SHORTEST_TOO_DEEP = 2 * (MAX_JSON_DEPTH + 1)  # "[[...]]", MAX_JSON_DEPTH + 1 levels
MAX_PING_ID_BYTES = 256
_OFFSET_DIGITS = 10
# ASCII digits only: str.isdigit() also takes '²' and '①', which int() refuses. 16 digits hold
# every integer up to MAX_EXACT_INT and keep int() far from its 4300-digit limit.
_UINT_RE = re.compile(r"[0-9]{1,16}")


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


def _uint(text: str) -> int | None:
    """``text`` as an integer from 0 to MAX_EXACT_INT if it is 1-16 ASCII digits, else None."""
    if _UINT_RE.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= MAX_EXACT_INT else None


def parse_uint(text: str, name: str) -> int:
    """An integer query parameter or header (``wait_ms``, ``limit``): ASCII digits, at most MAX_EXACT_INT."""
    value = _uint(text)
    if value is None:
        raise ProtocolError("bad_frame", f"'{name}' must be an integer from 0 to {MAX_EXACT_INT}")
    return value


def parse_cursor(text: str) -> tuple[int, int]:
    """``"1763745600123-0000000042"`` -> ``(1763745600123, 42)``.

    Both parts are bounded by MAX_EXACT_INT: relayd never makes a larger one, and a part above
    2^64 - 1 would reach Redis as a stream id it refuses.
    """
    gen_text, sep, offset_text = text.partition("-")
    gen, offset = _uint(gen_text), _uint(offset_text)
    if not sep or gen is None or offset is None:
        raise ProtocolError("bad_frame", f"invalid cursor {text[:40]!r}")
    return gen, offset


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


class AppendOp(NamedTuple):
    """An append (the hot path: a named tuple, see relayd.model.Entry)."""

    stream: str
    seq: int
    chunks: list[bytes]  # each chunk already JSON-encoded, ready to store
    nbytes: int

    @property
    def cost(self) -> int:
        """What this append holds in memory until acknowledged: the unit of producer flow control."""
        return 2 * self.nbytes + CHUNK_OVERHEAD_BYTES * len(self.chunks)


# ``AppendOp(...)`` runs a generated Python ``__new__``; the decoder's fast path builds the tuple
# directly (a micro-optimisation, as aiohttp does for its messages).
_new_append = tuple.__new__


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


def split_message(data: bytes | str) -> Sequence[bytes | str]:
    """The non-empty NDJSON lines of one websocket message (most messages are one line)."""
    if isinstance(data, str):
        if "\n" not in data:
            return (data,)
        return [line for line in data.split("\n") if line.strip()]
    if b"\n" not in data:
        return (data,)
    return [line for line in data.split(b"\n") if line.strip()]


def _load_object(line: bytes | str) -> dict[str, Any]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_frame", "not valid JSON") from None
    _check_object(obj, line)
    return obj  # type: ignore[no-any-return]


def _check_object(obj: Any, line: bytes | str) -> None:
    """``obj``, parsed from ``line``, must be an object of at most MAX_JSON_DEPTH levels."""
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "a frame must be a JSON object")
    if not _shallow(line) and too_deep(obj, MAX_JSON_DEPTH):
        raise ProtocolError("bad_frame", f"a frame may nest at most {MAX_JSON_DEPTH} levels of arrays and objects")


def _shallow(line: bytes | str) -> bool:
    """``line`` (valid JSON: it parsed) cannot nest more than MAX_JSON_DEPTH levels: each level
    needs its own bracket, so a line with few of them (nearly every frame) is shallow and only the
    others are walked. A micro-optimisation: two C counts instead of a walk, and none for a line
    shorter than the shortest too-deep one (each level opens and closes: 2 characters a level)."""
    if len(line) < _SHORTEST_TOO_DEEP:
        return True
    if isinstance(line, bytes):
        return line.count(b"[") + line.count(b"{") <= MAX_JSON_DEPTH
    return line.count("[") + line.count("{") <= MAX_JSON_DEPTH


def too_deep(value: object, limit: int) -> bool:
    """True if ``value`` nests arrays and objects more than ``limit`` levels (``value`` is level 1)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth == limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _positive_int(obj: dict[str, Any], name: str, *, required: bool) -> int | None:
    value = obj.get(name)
    if type(value) is int and 0 < value <= MAX_EXACT_INT:  # the common case, first
        return value
    if value is None:
        if required:
            raise ProtocolError("bad_frame", f"'{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > MAX_EXACT_INT:
        raise ProtocolError("bad_frame", f"'{name}' must be an integer from 1 to {MAX_EXACT_INT}")
    return value


def _unknown_op(op: object) -> ProtocolError:
    if op is None:
        return ProtocolError("unknown_op", "'op' is required")
    if not isinstance(op, str):
        return ProtocolError("unknown_op", "'op' must be a string")
    return ProtocolError("unknown_op", f"unknown op {op[:40]!r}")


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


def _content_type(obj: dict[str, Any]) -> str:
    content_type = obj.get("content_type", "json")
    if not isinstance(content_type, str) or content_type not in CONTENT_TYPES:  # a list is not hashable
        raise ProtocolError("bad_frame", "'content_type' must be 'json' or 'text'")
    return content_type


def _producer_id(obj: dict[str, Any]) -> str | None:
    producer = obj.get("producer")
    if producer is not None and (not isinstance(producer, str) or PRODUCER_ID_RE.fullmatch(producer) is None):
        raise ProtocolError("bad_frame", "'producer' must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return producer


def _end_fields(obj: dict[str, Any]) -> tuple[str, str]:
    """``(reason, message)`` of a producer's end."""
    reason = obj.get("reason")
    if not isinstance(reason, str) or reason not in PRODUCER_END_REASONS:
        raise ProtocolError("bad_frame", "'reason' must be completed, error or cancelled")
    message = obj.get("message") or ""
    if not isinstance(message, str):
        raise ProtocolError("bad_frame", "'message' must be a string")
    return reason, message[:MAX_END_MESSAGE]


class ProducerDecoder:
    """Decodes producer messages into ops, enforcing the per-chunk size limit.

    Per-stream content types are remembered by the caller and passed to :meth:`decode`, because
    whether a chunk is valid depends on the stream (text streams take strings only).
    """

    __slots__ = ("allows", "max_chunk_bytes")

    def __init__(self, max_chunk_bytes: int, allows: Callable[[str], bool] | None = None) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        # The streams this producer's API key may use (auth.api_key_streams); None: all of them.
        self.allows = allows

    def decode(
        self,
        line: bytes | str,
        text_streams: set[str] | frozenset[str] = frozenset(),
        opened: Container[str] = frozenset(),
    ) -> ProducerOp | FrameError:
        """``opened``: streams this connection holds, whose id and scope its open checked."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return FrameError(ProtocolError("bad_frame", "not valid JSON"))
        # A micro-optimisation for nearly every frame: an append (``chunk``, or the SDKs' ``chunks``)
        # to a JSON stream this connection holds, shallow enough not to be walked, decoded here in
        # one go. Anything else (and any doubt) takes the general path below, which gives the same
        # op for these.
        if type(obj) is dict and obj.get("op") == "append":
            stream, seq = obj.get("stream"), obj.get("seq")
            if (
                type(stream) is str
                and type(seq) is int
                and 0 < seq <= MAX_EXACT_INT
                and stream in opened
                and stream not in text_streams
                and _shallow(line)
            ):
                values = obj.get("chunks")
                if values is None and "chunk" in obj and "chunks" not in obj:
                    raw = right_sized(orjson.dumps(obj["chunk"]))
                    if len(raw) <= self.max_chunk_bytes:
                        return _new_append(AppendOp, (stream, seq, [raw], len(raw)))
                elif type(values) is list and values and seq + len(values) - 1 <= MAX_EXACT_INT:
                    op = self._chunks(stream, seq, values)
                    if op is not None:
                        return op
        return self._decode(obj, line, text_streams, opened)

    def _chunks(self, stream: str, seq: int, values: list[Any]) -> AppendOp | None:
        """The fast path's ``chunks``; None if one is too large (the general path names it)."""
        limit = self.max_chunk_bytes
        chunks: list[bytes] = []
        nbytes = 0
        for value in values:
            raw = right_sized(orjson.dumps(value))
            if len(raw) > limit:
                return None
            chunks.append(raw)
            nbytes += len(raw)
        return _new_append(AppendOp, (stream, seq, chunks, nbytes))

    def _decode(
        self, obj: Any, line: bytes | str, text_streams: set[str] | frozenset[str], opened: Container[str]
    ) -> ProducerOp | FrameError:
        stream: str | None = None
        seq: int | None = None
        try:
            _check_object(obj, line)
            op = obj.get("op")
            if op == "append":
                # ``stream`` names the op in an error only once it is a valid id (not the JSON value
                # as sent: a number, a list, a string of any length)
                named = obj.get("stream")
                if type(named) is not str or named not in opened:
                    named = check_stream_id(named)
                    self._check_scope(named)
                stream = named
                seq = _positive_int(obj, "seq", required=True)
                assert seq is not None
                return self._append(obj, stream, seq, stream in text_streams)
            if op == "ping":
                return _ping(obj)
            if op == "open":
                stream = check_stream_id(obj.get("stream"))
                self._check_scope(stream)
                epoch = _positive_int(obj, "epoch", required=False)
                return OpenOp(stream, epoch, _content_type(obj), _producer_id(obj))
            if op == "end":
                stream = check_stream_id(obj.get("stream"))
                self._check_scope(stream)
                return EndOp(stream, *_end_fields(obj))
            raise _unknown_op(op)
        except ProtocolError as exc:
            return FrameError(exc, stream, seq)

    def _check_scope(self, stream: str) -> None:
        if self.allows is not None and not self.allows(stream):
            raise ProtocolError("forbidden", f"this API key may not use stream {stream}")

    def _append(self, obj: dict[str, Any], stream: str, seq: int, text: bool) -> AppendOp:
        if "chunks" in obj:
            values = obj["chunks"]
            if not isinstance(values, list) or not values:
                raise ProtocolError("bad_frame", "'chunks' must be a non-empty list")
        elif "chunk" in obj:
            values = [obj["chunk"]]
        else:
            raise ProtocolError("bad_frame", "append needs 'chunk' or 'chunks'")
        if seq + len(values) - 1 > MAX_EXACT_INT:
            raise ProtocolError("bad_frame", f"the seq of the append's last chunk must be at most {MAX_EXACT_INT}")
        limit = self.max_chunk_bytes
        chunks: list[bytes] = []
        nbytes = 0
        for value in values:
            if text and not isinstance(value, str):
                raise ProtocolError("content_type", "a text stream takes string chunks only")
            raw = right_sized(orjson.dumps(value))
            if len(raw) > limit:
                raise ProtocolError("chunk_too_large", f"a chunk is {len(raw)} bytes; the limit is {limit}")
            chunks.append(raw)
            nbytes += len(raw)
        return AppendOp(stream, seq, chunks, nbytes)


def right_sized(raw: bytes) -> bytes:
    """A copy of orjson's answer holding its own size: orjson (3.12+) over-allocates the bytes it
    returns (4 KiB for one byte) and never shrinks them, which a chunk held until Redis has it must
    not carry (flow control counts 2 x its size + CHUNK_OVERHEAD_BYTES). ~90 ns; the fastest copy."""
    return b"".join((raw, b""))


# -- connectionless producer requests (HTTP ingest) --------------------------------------------

MAX_WRITE_CHUNKS = 10_000  # chunks in one HTTP append


@dataclass(frozen=True, slots=True)
class WriteOp:
    """An HTTP producer's append (``chunks`` JSON-encoded, seq ``seq`` on) and/or end of one stream;
    no chunks and no end: a heartbeat."""

    stream: str
    epoch: int
    seq: int
    chunks: list[bytes]
    producer: str | None
    content_type: str
    end: tuple[str, str] | None


def decode_open_body(body: bytes, stream: str) -> OpenOp:
    """The JSON body of ``POST /v1/streams/{id}/open`` (may be empty); raises ProtocolError."""
    obj = _load_object(body) if body.strip() else {}
    return OpenOp(stream, _positive_int(obj, "epoch", required=False), _content_type(obj), _producer_id(obj))


def decode_end_body(body: bytes) -> tuple[int, str, str]:
    """``(epoch, reason, message)``: the JSON body of ``POST /v1/streams/{id}/end``; raises ProtocolError."""
    obj = _load_object(body)
    epoch = _positive_int(obj, "epoch", required=True) or 0
    return (epoch, *_end_fields(obj))


def decode_write(body: bytes, stream: str, max_chunk_bytes: int) -> WriteOp:
    """The JSON body of ``POST /v1/streams/{id}/append``; raises ProtocolError.

    The fields of the websocket's ``open``, ``append`` and ``end`` in one object, the stream
    named by the URL: ``epoch`` is required; ``seq`` with ``chunk`` or ``chunks``; ``end`` an
    object with ``reason`` and ``message``.
    """
    obj = _load_object(body)
    epoch = _positive_int(obj, "epoch", required=True) or 0
    content_type = _content_type(obj)
    end = None
    if "end" in obj:
        if not isinstance(obj["end"], dict):
            raise ProtocolError("bad_frame", "'end' must be an object with 'reason' and 'message'")
        end = _end_fields(obj["end"])
    chunks: list[bytes] = []
    seq = 0
    if "chunks" in obj or "chunk" in obj:
        values = obj.get("chunks")
        if isinstance(values, list) and len(values) > MAX_WRITE_CHUNKS:
            raise ProtocolError("bad_frame", f"an append takes at most {MAX_WRITE_CHUNKS} chunks")
        seq = _positive_int(obj, "seq", required=True) or 0
        chunks = ProducerDecoder(max_chunk_bytes)._append(obj, stream, seq, content_type == "text").chunks
    return WriteOp(stream, epoch, seq, chunks, _producer_id(obj), content_type, end)


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
            if wait_ms is not None and (
                isinstance(wait_ms, bool) or not isinstance(wait_ms, int) or not 0 <= wait_ms <= MAX_EXACT_INT
            ):
                raise ProtocolError("bad_frame", f"'wait_ms' must be an integer from 0 to {MAX_EXACT_INT}")
            return SubscribeOp(stream, parse_optional_cursor(obj.get("cursor")), wait_ms)
        raise _unknown_op(op)
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


def ws_chunk_prefix(stream: str) -> bytes:
    """The bytes every chunk frame of ``stream`` starts with; computed once per stream."""
    return b'{"type":"chunk","stream":' + orjson.dumps(stream) + b',"cursor":"'


def ws_chunk_format(stream: str, gen: int) -> bytes:
    """The websocket chunk frame of ``stream`` in ``gen`` as ``format % (offset, chunk)``: its
    constant head escaped into a %-format, so that a chunk costs one format."""
    return _ws_chunk_head(stream, gen) + b'%010d","data":%s}'


def _ws_chunk_head(stream: str, gen: int) -> bytes:
    """A chunk frame's constant start up to its offset, escaped for a %-format."""
    return (ws_chunk_prefix(stream) + b"%d-" % gen).replace(b"%", b"%%")


def encode_ws_entries(chunk: bytes, stream: str, gen: int, entries: list[Entry]) -> list[bytes]:
    """Websocket frames for ``entries``, one per entry, ``chunk`` being :func:`ws_chunk_format`'s.
    Chunks are spliced, not re-encoded."""
    end = entries[-1] if entries and entries[-1].data is None else None
    out = [chunk % (entry.offset, entry.data) for entry in (entries[:-1] if end is not None else entries)]
    if end is not None:
        out.append(end_frame(stream, format_cursor(gen, end.offset), end.reason or "", end.message))
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
                value = orjson.loads(entry.data)
                # A text stream holds strings, but an entry stored before its stream's content type
                # was checked may not be one: it is sent as its JSON text rather than break the reader.
                data = value if isinstance(value, str) else entry.data
                parts.append(sse_event("chunk", data, format_cursor(gen, entry.offset)))
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

    def chunk_template(self, stream: str, gen: int, text: bool) -> bytes | None:
        """A chunk's frame as ``template % (offset, data)`` (the offset as 10 ASCII digits, the
        chunk's stored JSON), for a store to frame a replayed page itself; None: not this codec."""
        return None

    def framed(self, stream: str, gen: int, frames: list[bytes], end: Entry | None, text: bool) -> bytes:
        """Frames made from :meth:`chunk_template`, then the end if given, as :meth:`entries` joins them."""
        raise NotImplementedError

    def error(self, stream: str, code: str, message: str) -> bytes:
        raise NotImplementedError

    def gap(self, stream: str, gen: int, had: int, next_offset: int) -> bytes:
        raise NotImplementedError

    def reset(self, stream: str, reason: str) -> bytes:
        raise NotImplementedError


_FORMATS_KEPT = 4096  # streams whose chunk format a WsCodec keeps (all forgotten at once past it)


class WsCodec(FrameCodec):
    """Websocket: NDJSON frames; one item of the outbox may hold several lines.

    It keeps the chunk format of the streams it encoded last (a memo, not state: the frames are
    the same without it), as a publication of one chunk, the live path's common case, is encoded
    once for all its subscribers and would otherwise build its stream's format each time.
    """

    kind = "ws"

    def __init__(self) -> None:
        self._formats: dict[str, tuple[int, bytes]] = {}  # stream -> (gen, ws_chunk_format)

    def entries(self, stream: str, gen: int, entries: list[Entry], text: bool) -> bytes:
        known = self._formats.get(stream)
        if known is not None and known[0] == gen:
            chunk = known[1]
        else:
            if len(self._formats) >= _FORMATS_KEPT:
                self._formats.clear()
            chunk = ws_chunk_format(stream, gen)
            self._formats[stream] = (gen, chunk)
        if len(entries) == 1:
            only = entries[0]
            if only.data is not None:
                return chunk % (only.offset, only.data)
        return b"\n".join(encode_ws_entries(chunk, stream, gen, entries))

    def chunk_template(self, stream: str, gen: int, text: bool) -> bytes | None:
        # encode_ws_entries' chunk format, the offset already formatted
        return _ws_chunk_head(stream, gen) + b'%s","data":%s}'

    def framed(self, stream: str, gen: int, frames: list[bytes], end: Entry | None, text: bool) -> bytes:
        if end is not None:
            frames = [*frames, end_frame(stream, format_cursor(gen, end.offset), end.reason or "", end.message)]
        return b"\n".join(frames)

    def error(self, stream: str, code: str, message: str) -> bytes:
        return error_frame(code, message, stream)

    def gap(self, stream: str, gen: int, had: int, next_offset: int) -> bytes:
        return frame(type="gap", stream=stream, cursor=format_cursor(gen, had), next=format_cursor(gen, next_offset))

    def reset(self, stream: str, reason: str) -> bytes:
        return frame(type="reset", stream=stream, reason=reason)


# The name of relayd's SSE error event. Not "error": EventSource fires its own "error" event when
# the connection drops, so a page listening for "error" could not tell the two apart.
SSE_ERROR_EVENT = "relayd-error"
# How long EventSource waits before reconnecting after an error event (the response ends after
# it). Long by default: reconnecting at once cannot help with stream_not_found or internal.
SSE_ERROR_RETRY_MS = 10_000
# Errors that a reconnect fixes at once: the drain (another instance, or the restarted one, takes
# the reconnect) and an expired token (the page reconnects with a fresh one).
_SSE_QUICK_RETRY = {"shutting_down": b"retry: 1000\n", "token_expired": b"retry: 1000\n"}


class SseCodec(FrameCodec):
    """Server-Sent Events: one response per stream, so no stream field in the events.

    ``error_event`` is the name of error events: ``relayd-error``, or ``error`` for pages written
    for relayd 0.1 (``?error_event=error``, docs/protocol.md).
    """

    kind = "sse"

    def __init__(self, error_event: str = SSE_ERROR_EVENT) -> None:
        self.error_event = error_event
        self.error_retry = f"retry: {SSE_ERROR_RETRY_MS}\n".encode()

    def entries(self, stream: str, gen: int, entries: list[Entry], text: bool) -> bytes:
        return encode_sse_entries(gen, entries, text)

    def chunk_template(self, stream: str, gen: int, text: bool) -> bytes | None:
        # encode_sse_entries' chunk event of a JSON stream, the offset already formatted (its data
        # is the stored JSON, one line); a text stream's events hold its strings decoded: None
        return None if text else b"id: %d-" % gen + b"%s\nevent: chunk\ndata: %s\n\n"

    def framed(self, stream: str, gen: int, frames: list[bytes], end: Entry | None, text: bool) -> bytes:
        events = b"".join(frames)
        return events + encode_sse_entries(gen, [end], text) if end is not None else events

    def error(self, stream: str, code: str, message: str) -> bytes:
        retry = _SSE_QUICK_RETRY.get(code, self.error_retry)
        return retry + sse_event(self.error_event, orjson.dumps({"code": code, "message": message}))

    def gap(self, stream: str, gen: int, had: int, next_offset: int) -> bytes:
        body = {"cursor": format_cursor(gen, had), "next": format_cursor(gen, next_offset)}
        return sse_event("gap", orjson.dumps(body))

    def reset(self, stream: str, reason: str) -> bytes:
        return sse_event("reset", orjson.dumps({"reason": reason}))


WS_CODEC = WsCodec()
SSE_CODEC = SseCodec()
SSE_LEGACY_CODEC = SseCodec(error_event="error")  # ?error_event=error: the name relayd 0.1 used


# -- producer frames: the one definition, used by relayd (web/ingest.py) and the SDK -------------
# Producer -> relayd ops (what relayd.client writes) and relayd -> producer frames (what
# web/ingest.py writes). Hot ones (append, ack) are formatted from pre-encoded parts.


def open_op(stream_json: bytes, *, content_type: str, epoch: int | None, producer: str) -> bytes:
    """An ``open`` op; ``stream_json`` is ``orjson.dumps(stream)``. Without an epoch the
    ``content_type`` is sent (the stream may be created); with one, the open resumes that epoch."""
    if epoch is None:
        return b'{"op":"open","stream":%s,"content_type":%s,"producer":%s}' % (
            stream_json,
            orjson.dumps(content_type),
            orjson.dumps(producer),
        )
    return b'{"op":"open","stream":%s,"epoch":%d,"producer":%s}' % (stream_json, epoch, orjson.dumps(producer))


def append_op_head(stream_json: bytes) -> bytes:
    """What every ``append`` op of a stream starts with; :func:`append_op` completes it."""
    return b'{"op":"append","stream":%s,"seq":' % stream_json


APPEND_OP_OVERHEAD = 32  # bytes an append op adds after its head besides the chunks' commas: seq, brackets


def append_op(head: bytes, seq: int, chunks: list[bytes]) -> bytes:
    """An ``append`` op from :func:`append_op_head`; ``chunks`` are JSON texts."""
    return b'%s%d,"chunks":[%s]}' % (head, seq, b",".join(chunks))


def end_op(stream: str, reason: str, message: str = "") -> bytes:
    fields: dict[str, Any] = {"op": "end", "stream": stream, "reason": reason}
    if message:
        fields["message"] = message
    return orjson.dumps(fields)


def opened_frame(
    stream: str, *, epoch: int, seq: int, cursor: str | None, status: str, content_type: str, producer: str | None
) -> bytes:
    fields = {"producer": producer} if producer is not None else {}
    return frame(
        type="opened",
        stream=stream,
        epoch=epoch,
        seq=seq,
        cursor=cursor,
        status=status,
        content_type=content_type,
        **fields,
    )


def ack_prefix(stream: str) -> bytes:
    """The part of ``stream``'s acks before the seq: a producer connection keeps it per stream."""
    return b'{"type":"ack","stream":%s,"seq":' % orjson.dumps(stream)


def ack_frame_with(prefix: bytes, seq: int, gen: int, offset: int) -> bytes:
    """An ack from its stream's :func:`ack_prefix`; the cursor is :func:`format_cursor`'s, formatted
    in the same operation (a micro-optimisation: one format per ack, no str in between)."""
    return b'%s%d,"cursor":"%d-%010d"}' % (prefix, seq, gen, offset)


def ended_frame(stream: str, reason: str, cursor: str, message: str = "") -> bytes:
    fields = {"message": message} if message else {}
    return frame(type="ended", stream=stream, reason=reason, cursor=cursor, **fields)


def cancel_frame(stream: str) -> bytes:
    return frame(type="cancel", stream=stream)


def pong_frame(ping_id: Any) -> bytes:
    return frame(type="pong", id=ping_id) if ping_id is not None else b'{"type":"pong"}'
