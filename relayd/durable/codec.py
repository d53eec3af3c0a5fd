"""The Durable Streams protocol's pure part: offsets, header values, bodies and SSE events.

No I/O. How a stream's bytes are kept as relayd entries (one chunk per entry, so relayd's own
consumers read the same stream):

- ``application/json``: one entry per message, its JSON text; a POSTed array is flattened one
  level (``[a, b]`` is two messages). A read answers one JSON array of the messages.
- ``text/*``: one entry per append, the text as a JSON string (a relayd ``text`` stream).
- anything else (bytes): one entry per append, the bytes base64-encoded in a JSON string (also
  a relayd ``text`` stream, whose chunks relayd's consumers see as base64 text).

An offset is a relayd cursor, ``<generation>-<entry offset>`` (``1764950000000-0000000042``): a
Durable Streams reader and relayd's own consumers (``cursor``, ``Last-Event-ID``) resume from the
same strings. They sort as strings: a generation is the stream's creation time in ms (13 digits
until the year 2286), the entry offset is zero-padded to 10 digits; a stream deleted and created
again gets a later generation.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import orjson

from relayd.errors import ProtocolError
from relayd.model import Entry
from relayd.protocol import MAX_WRITE_CHUNKS, format_cursor, right_sized

START = "-1"
NOW = "now"
_OFFSET_RE = re.compile(r"([0-9]{1,16})-([0-9]{10,16})")
_TTL_RE = re.compile(r"0|[1-9][0-9]{0,15}")
_UINT_RE = re.compile(r"[0-9]{1,16}")
_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")
MAX_EXACT_INT = 2**53 - 1
# Stream-Cursor: 20 s intervals since this epoch (the protocol's reference values)
_CURSOR_EPOCH_MS = 1_728_432_000_000  # 2024-10-09T00:00:00Z
_CURSOR_INTERVAL_MS = 20_000


def bad(message: str) -> ProtocolError:
    return ProtocolError("bad_request", message)


# offsets ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offset:
    """A parsed ``offset``: the start, the tail (``now``), or after entry ``after`` of ``gen``."""

    gen: int | None = None
    after: int = 0
    now: bool = False


def format_offset(gen: int, after: int) -> str:
    return format_cursor(gen, after)


def parse_offset(values: list[str]) -> Offset:
    """The ``offset`` query parameter (all its values): absent or ``-1``: the start."""
    if not values:
        return Offset()
    if len(values) > 1:
        raise bad("offset must be given once")
    text = values[0]
    if text == START:
        return Offset()
    if text == NOW:
        return Offset(now=True)
    match = _OFFSET_RE.fullmatch(text)
    if match is None:
        raise bad("malformed offset")
    return Offset(int(match[1]), int(match[2]))


# headers ------------------------------------------------------------------------------------------


def media_type(content_type: str) -> str:
    """``Text/Plain; charset=utf-8`` -> ``text/plain``: what appends are matched on."""
    return content_type.split(";", 1)[0].strip().lower()


def kind_of(media: str) -> str:
    """relayd's content type for the stream's entries."""
    return "json" if media == "application/json" else "text"


def encoding_of(media: str) -> str:
    """How entries turn into bytes: ``json``, ``text`` or ``base64``."""
    if media == "application/json":
        return "json"
    return "text" if media.startswith("text/") else "base64"


def parse_ttl(text: str) -> int:
    if _TTL_RE.fullmatch(text) is None:
        raise bad("Stream-TTL must be a non-negative integer of seconds")
    return int(text)


def parse_expires_at(text: str) -> int:
    """``Stream-Expires-At`` (RFC 3339) as unix ms."""
    if _RFC3339_RE.fullmatch(text) is None:
        raise bad("Stream-Expires-At must be an RFC 3339 timestamp")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError as exc:
        raise bad("Stream-Expires-At must be an RFC 3339 timestamp") from exc
    return int(moment.timestamp() * 1000)


def parse_producer(pid: str | None, epoch: str | None, seq: str | None) -> tuple[str, int, int] | None:
    """``Producer-Id``, ``Producer-Epoch``, ``Producer-Seq``: all three or none."""
    if pid is None and epoch is None and seq is None:
        return None
    if pid is None or epoch is None or seq is None:
        raise bad("Producer-Id, Producer-Epoch and Producer-Seq go together")
    if not pid:
        raise bad("Producer-Id must not be empty")
    values = []
    for name, text in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if _UINT_RE.fullmatch(text) is None or int(text) > MAX_EXACT_INT:
            raise bad(f"{name} must be a non-negative integer up to 2^53-1")
        values.append(int(text))
    return pid, values[0], values[1]


# bodies -------------------------------------------------------------------------------------------


def chunks_of(media: str, body: bytes, *, create: bool = False) -> list[bytes]:
    """The entries an append's (or a create's) body becomes; ``ProtocolError`` if it is invalid."""
    if not body:
        return []  # a create without content (an append needs a body: checked before)
    encoding = encoding_of(media)
    if encoding == "json":
        value = _load_json(body)
        if isinstance(value, list):
            if not value and not create:
                raise bad("an empty JSON array appends nothing")
            if len(value) > MAX_WRITE_CHUNKS:  # one store script per append: bounded as an HTTP ingest append
                raise ProtocolError(
                    "too_many_messages", f"a JSON array of {len(value)} messages; at most {MAX_WRITE_CHUNKS} per append"
                )
            return [_dump_json(item) for item in value]
        return [_dump_json(value)]
    if encoding == "text":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad("a text stream takes UTF-8 text") from exc
        return [right_sized(orjson.dumps(text))]
    return [b'"' + base64.b64encode(body) + b'"']


def _load_json(body: bytes) -> object:
    # The standard library, not orjson: orjson reads an integer beyond 64 bits as a float, and a
    # stored message must keep its value.
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise bad("the body is not valid JSON") from exc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _dump_json(value: object) -> bytes:
    try:
        # held until Redis has it: right-sized (1 MB of "[0,0,...]" held 2 GB as orjson answers it)
        return right_sized(orjson.dumps(value))
    except orjson.JSONEncodeError:
        pass
    try:  # an integer beyond 64 bits, or nesting deeper than orjson writes
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:
        raise bad("the JSON cannot be stored") from exc


def body_of(encoding: str, entries: list[Entry]) -> bytes:
    """The bytes of ``entries`` (data entries only) as a read answers them."""
    datas = [e.data for e in entries if e.data is not None]
    if encoding == "json":
        return b"[" + b",".join(datas) + b"]"
    if encoding == "text":
        return "".join(_text(d) for d in datas).encode()
    return b"".join(_bytes(d) for d in datas)


def _text(data: bytes) -> str:
    value = orjson.loads(data)
    return value if isinstance(value, str) else data.decode()  # a JSON chunk of a relayd producer: as is


def _bytes(data: bytes) -> bytes:
    try:
        return base64.b64decode(orjson.loads(data), validate=True)
    except (orjson.JSONDecodeError, TypeError, binascii.Error):
        return data  # not written through the mount: the chunk's JSON, as is


# caching ------------------------------------------------------------------------------------------


def etag(gen: int, start: int, end: int, closed: bool) -> str:
    return f'"{gen}:{start}:{end}{":c" if closed else ""}"'


def cursor(now_ms: int, client: str | None) -> str:
    """``Stream-Cursor``: the current 20 s interval; never at or below the client's (with jitter)."""
    current = (now_ms - _CURSOR_EPOCH_MS) // _CURSOR_INTERVAL_MS
    if client is not None and _UINT_RE.fullmatch(client) is not None and int(client) >= current:
        jitter_s = 1 + secrets.randbelow(3600)
        return str(int(client) + max(1, jitter_s * 1000 // _CURSOR_INTERVAL_MS))
    return str(current)


# SSE ----------------------------------------------------------------------------------------------


def sse_event(event: str, data: str) -> bytes:
    """One event; every line break in ``data`` starts a new ``data:`` line (no injected events)."""
    # A reader drops one space after "data:": a line that starts with one gets another.
    lines = ("data: " + line if line[:1] == " " else "data:" + line for line in _LINE_BREAK_RE.split(data))
    return (f"event: {event}\n" + "\n".join(lines) + "\n\n").encode()


def sse_data(encoding: str, entries: list[Entry]) -> str:
    body = body_of(encoding, entries)
    return base64.b64encode(body).decode() if encoding == "base64" else body.decode()


def sse_control(next_offset: str, cursor_value: str | None, *, up_to_date: bool, closed: bool) -> bytes:
    control: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        control["streamClosed"] = True
    elif cursor_value is not None:
        control["streamCursor"] = cursor_value
    if up_to_date:
        control["upToDate"] = True
    return sse_event("control", orjson.dumps(control).decode())
