"""Property-based fuzzing of the decoders and parameter parsers (issue 9, item 21).

Whatever a producer, a consumer or an HTTP request sends, the decoders answer with an op or a
precise ``FrameError``, the parsers with a value or a ``ProtocolError``; nothing else escapes, and
whatever relayd writes back from a decoded op (a pong echoing an id, a stored chunk) can be
encoded. ``derandomize`` and a fixed ``max_examples`` keep the run deterministic and short.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.errors import ProtocolError
from relayd.protocol import (
    MAX_EXACT_INT,
    AppendOp,
    FrameError,
    OpenOp,
    PingOp,
    ProducerDecoder,
    SubscribeOp,
    decode_consumer,
    error_frame,
    frame,
    parse_optional_cursor,
    parse_uint,
)
from relayd.web.sse import sse_codec

FUZZ = settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DECODER = ProducerDecoder(max_chunk_bytes=64 * 1024)

# Integers at the edges relayd cares about: 0, 2^53 (Lua's doubles), 2^63 and 2^64 (Redis ids).
EDGE_INTS = st.sampled_from([0, 1, -1, MAX_EXACT_INT, MAX_EXACT_INT + 1, 2**63 - 1, 2**63, 2**64 - 1])
# Digits of every kind: ASCII, superscripts, circled, Arabic-Indic, fullwidth.
DIGITISH = st.text(alphabet="0123456789-\u00b2\u00b3\u2460\u0663\uff11 +x", max_size=24)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | EDGE_INTS
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | DIGITISH
)
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


class Deep(int):
    """A field value nested this many levels deep, spliced in as text (orjson cannot write it)."""


# Nesting around orjson's limits: it reads 1024 levels and writes 254.
DEEP = st.integers(min_value=1, max_value=1100).map(Deep)
VALUES = JSON | DEEP | st.sampled_from(["json", "text", "completed", "error", "s", "", "1-0000000001"])
FIELDS = (
    "stream",
    "seq",
    "epoch",
    "chunk",
    "chunks",
    "content_type",
    "reason",
    "message",
    "producer",
    "id",
    "cursor",
    "wait_ms",
    "token",
)
OPS = ("open", "append", "end", "ping", "subscribe", "unsubscribe", "cancel", "auth")


def frames(op: str) -> st.SearchStrategy[dict[str, Any]]:
    """Frames of ``op``: every field present half of the time, values valid-looking or anything."""
    return st.fixed_dictionaries(
        {"op": st.just(op), "stream": st.just("s") | VALUES},
        optional={name: VALUES for name in FIELDS[1:]},
    )


def encode(fields: dict[str, Any]) -> bytes:
    def value(v: Any) -> bytes:
        return b"[" * v + b"]" * v if isinstance(v, Deep) else orjson.dumps(v)

    return b"{" + b",".join(orjson.dumps(k) + b":" + value(v) for k, v in fields.items()) + b"}"


def lines(op: str) -> st.SearchStrategy[bytes | str]:
    """Frames of ``op`` as bytes or text, frames whose op is any value, and raw junk."""
    encoded = (frames(op) | st.builds(lambda f, v: {**f, "op": v}, frames(op), VALUES)).map(encode)
    return encoded | encoded.map(bytes.decode) | st.binary(max_size=64) | st.text(max_size=64)


def assert_answerable(result: Any) -> None:
    """What relayd writes back for ``result`` can be encoded."""
    if isinstance(result, FrameError):
        error_frame(result.error.code, result.error.message, result.stream, result.seq)
    elif isinstance(result, PingOp):
        frame(type="pong", id=result.id)
    elif isinstance(result, AppendOp):
        assert result.seq + len(result.chunks) - 1 <= MAX_EXACT_INT
        for chunk in result.chunks:
            orjson.loads(chunk)
    elif isinstance(result, OpenOp):
        assert result.epoch is None or 1 <= result.epoch <= MAX_EXACT_INT
    elif isinstance(result, SubscribeOp):
        assert result.cursor is None or all(0 <= part <= MAX_EXACT_INT for part in result.cursor)
        assert result.wait_ms is None or 0 <= result.wait_ms <= MAX_EXACT_INT


@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data(), text_stream=st.booleans())
def test_the_producer_decoder_answers_every_line(op: str, data: st.DataObject, text_stream: bool) -> None:
    line = data.draw(lines(op))
    result = DECODER.decode(line, frozenset({"s"}) if text_stream else frozenset())
    assert_answerable(result)


@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data())
def test_the_consumer_decoder_answers_every_line(op: str, data: st.DataObject) -> None:
    line = data.draw(lines(op))
    assert_answerable(decode_consumer(line))


@FUZZ
@given(DIGITISH | st.text(max_size=40) | st.integers(min_value=0, max_value=10**30).map(str))
def test_http_parameters_parse_or_raise_protocol_error(text: str) -> None:
    """``wait_ms``, ``limit``, ``cursor``/``Last-Event-ID`` and ``error_event``: a value or bad_frame."""
    for parse in (lambda t: parse_uint(t, "wait_ms"), parse_optional_cursor, sse_codec):
        try:
            parse(text)
        except ProtocolError as exc:
            assert exc.code == "bad_frame"
