"""The sans-I/O codec: producer and consumer ops decoded, frames encoded, without a socket."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest

from relayd.errors import ProtocolError
from relayd.protocol import (
    CHUNK_OVERHEAD_BYTES,
    MAX_EXACT_INT,
    MAX_JSON_DEPTH,
    SSE_CODEC,
    SSE_LEGACY_CODEC,
    WS_CODEC,
    AppendOp,
    AuthOp,
    CancelOp,
    EndOp,
    Entry,
    FrameError,
    OpenOp,
    PingOp,
    ProducerDecoder,
    SubscribeOp,
    UnsubscribeOp,
    _shallow,
    decode_consumer,
    decode_write,
    encode_sse_entries,
    format_cursor,
    is_valid_stream_id,
    parse_cursor,
    parse_uint,
    split_message,
    sse_event,
    too_deep,
)

DECODER = ProducerDecoder(max_chunk_bytes=100)


def _error(result: object) -> str:
    assert isinstance(result, FrameError), result
    return result.error.code


def test_cursors_round_trip_and_sort_in_append_order() -> None:
    """Cursors parse back to (generation, offset) and sort lexicographically by offset."""
    cursors = [format_cursor(1763745600123, n) for n in (1, 2, 9, 10, 11, 100, 12345)]
    assert cursors == sorted(cursors)
    assert parse_cursor(cursors[3]) == (1763745600123, 10)


@pytest.mark.parametrize("bad", ["", "abc", "12", "12-", "-5", "1-x", "1-2-3", "9" * 30 + "-1"])
def test_malformed_cursors_are_refused(bad: str) -> None:
    """A cursor that is not <digits>-<digits> raises bad_frame."""
    with pytest.raises(ProtocolError) as info:
        parse_cursor(bad)
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize(
    ("stream_id", "valid"),
    [
        ("chat-42", True),
        ("user-7/chat:1@a=b.c_d", True),
        ("a" * 200, True),
        ("a" * 201, False),
        ("", False),
        ("has space", False),
        ("{tag}", False),
        ("é", False),
        (42, False),
    ],
)
def test_stream_id_rule(stream_id: object, valid: bool) -> None:
    """Stream ids are 1-200 characters of a safe set: no spaces and no braces (hash tags)."""
    assert is_valid_stream_id(stream_id) is valid


def test_ndjson_messages_split_into_lines() -> None:
    """A message of several newline-separated objects yields each, skipping blank lines."""
    assert list(split_message('{"a":1}\n\n{"b":2}\n')) == ['{"a":1}', '{"b":2}']
    assert list(split_message(b'{"a":1}')) == [b'{"a":1}']


def test_open_append_end_ping_decode() -> None:
    """Each producer op decodes into its typed op with defaults filled in."""
    assert DECODER.decode('{"op":"open","stream":"s"}') == OpenOp("s", None, "json")
    assert DECODER.decode('{"op":"open","stream":"s","epoch":3,"content_type":"text"}') == OpenOp("s", 3, "text")
    assert DECODER.decode('{"op":"open","stream":"s","producer":"w-1.a:B_9"}') == OpenOp("s", None, "json", "w-1.a:B_9")
    op = DECODER.decode('{"op":"append","stream":"s","seq":4,"chunks":[{"d":"x"},"y",1]}')
    assert op == AppendOp("s", 4, [b'{"d":"x"}', b'"y"', b"1"], 13)
    assert DECODER.decode('{"op":"append","stream":"s","seq":1,"chunk":null}') == AppendOp("s", 1, [b"null"], 4)
    assert DECODER.decode('{"op":"end","stream":"s","reason":"error","message":"boom"}') == EndOp("s", "error", "boom")
    assert DECODER.decode('{"op":"ping","id":7}') == PingOp(7)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("not json", "bad_frame"),
        ("[1,2]", "bad_frame"),
        ('{"stream":"s"}', "unknown_op"),
        ('{"op":"fly"}', "unknown_op"),
        ('{"op":"open","stream":"a b"}', "invalid_stream_id"),
        ('{"op":"open","stream":"s","epoch":0}', "bad_frame"),
        ('{"op":"open","stream":"s","epoch":true}', "bad_frame"),
        ('{"op":"open","stream":"s","content_type":"xml"}', "bad_frame"),
        ('{"op":"open","stream":"s","producer":""}', "bad_frame"),
        ('{"op":"open","stream":"s","producer":"' + "p" * 65 + '"}', "bad_frame"),
        ('{"op":"open","stream":"s","producer":"a b"}', "bad_frame"),
        ('{"op":"open","stream":"s","producer":7}', "bad_frame"),
        ('{"op":"append","stream":"s","chunk":1}', "bad_frame"),
        ('{"op":"append","stream":"s","seq":-1,"chunk":1}', "bad_frame"),
        ('{"op":"append","stream":"s","seq":1}', "bad_frame"),
        ('{"op":"append","stream":"s","seq":1,"chunks":[]}', "bad_frame"),
        ('{"op":"append","stream":"s","seq":1,"chunk":"' + "x" * 200 + '"}', "chunk_too_large"),
        ('{"op":"end","stream":"s","reason":"producer_lost"}', "bad_frame"),
        ('{"op":"end","stream":"s","reason":"error","message":5}', "bad_frame"),
    ],
)
def test_bad_producer_frames_get_precise_codes(line: str, code: str) -> None:
    """Every malformed producer frame maps to the error code docs/protocol.md names."""
    assert _error(DECODER.decode(line)) == code


@pytest.mark.parametrize("stream", ["42", "[1, 2]", '{"a": 1}', '"has space"', '"' + "x" * 201 + '"'])
def test_an_invalid_stream_id_is_not_echoed_in_the_error(stream: str) -> None:
    """The error's ``stream`` is a stream id or nothing: never the JSON value as sent (a number or a
    list would break a client matching errors to streams; an over-long string would come back whole)."""
    result = DECODER.decode('{"op":"append","stream":' + stream + ',"seq":3,"chunk":1}')
    assert isinstance(result, FrameError) and result.error.code == "invalid_stream_id"
    assert result.stream is None, result


_X = '"' + "x" * 200 + '"'


@pytest.mark.parametrize(
    "line",
    [
        '{"op":"append","stream":"s","seq":1,"chunk":{"a":[1,{"b":null}]}}',
        '{"op":"append","stream":"s","seq":4,"chunks":[{"d":"x"},"y",1]}',
        '{"op":"append","stream":"s","seq":4,"chunks":[{"d":"x"}],"chunk":2}',
        '{"op":"append","stream":"s","seq":4,"chunk":2,"chunks":null}',
        '{"op":"append","stream":"s","seq":4,"chunks":[]}',
        '{"op":"append","stream":"s","seq":4,"chunks":{"a":1}}',
        '{"op":"append","stream":"s","seq":4,"chunks":[1,' + _X + "]}",
        '{"op":"append","stream":"s","seq":4,"chunk":' + _X + "}",
        '{"op":"append","stream":"s","seq":' + str(MAX_EXACT_INT) + ',"chunks":[1,2]}',
        '{"op":"append","stream":"s","seq":' + str(MAX_EXACT_INT) + ',"chunks":[1]}',
        '{"op":"append","stream":"s","seq":0,"chunks":[1]}',
        '{"op":"append","stream":"s","seq":true,"chunks":[1]}',
        '{"op":"append","stream":"s","seq":1}',
    ],
)
@pytest.mark.parametrize("text", [False, True])
def test_appends_to_a_held_stream_decode_as_any_append_does(line: str, text: bool) -> None:
    """An append to a stream the connection holds takes a shorter path (``chunk`` and ``chunks``);
    it gives the op, or the error, that the general path gives the same line."""
    streams = {"s"} if text else set()
    held, general = DECODER.decode(line, streams, opened={"s"}), DECODER.decode(line, streams)
    if isinstance(general, FrameError):
        assert isinstance(held, FrameError)
        assert (held.error.code, held.error.message, held.stream, held.seq) == (
            general.error.code,
            general.error.message,
            general.stream,
            general.seq,
        )
    else:
        assert held == general


def test_errors_name_the_stream_and_seq_when_known() -> None:
    """An error on an append carries its stream and seq so the producer can match it."""
    result = DECODER.decode('{"op":"append","stream":"s","seq":9,"chunk":"' + "x" * 200 + '"}')
    assert isinstance(result, FrameError) and result.stream == "s" and result.seq == 9


def test_text_streams_take_strings_only() -> None:
    """On a text stream a non-string chunk is refused with content_type."""
    line = '{"op":"append","stream":"s","seq":1,"chunk":{"a":1}}'
    assert _error(DECODER.decode(line, {"s"})) == "content_type"
    assert isinstance(DECODER.decode(line), AppendOp)


def test_consumer_ops_decode() -> None:
    """Consumer ops decode, with optional cursor and wait."""
    assert decode_consumer('{"op":"subscribe","stream":"s"}') == SubscribeOp("s", None, None)
    assert decode_consumer('{"op":"subscribe","stream":"s","cursor":"5-0000000002","wait_ms":10}') == SubscribeOp(
        "s", (5, 2), 10
    )
    assert decode_consumer('{"op":"unsubscribe","stream":"s"}') == UnsubscribeOp("s")
    assert decode_consumer('{"op":"cancel","stream":"s"}') == CancelOp("s")
    assert decode_consumer('{"op":"auth","token":"t"}') == AuthOp("t")
    assert _error(decode_consumer('{"op":"subscribe","stream":"s","cursor":"zz"}')) == "bad_frame"
    assert _error(decode_consumer('{"op":"subscribe","stream":"s","wait_ms":-1}')) == "bad_frame"
    assert _error(decode_consumer('{"op":"auth"}')) == "bad_frame"


def test_ws_frames_splice_the_stored_json() -> None:
    """Websocket chunk frames embed the stored chunk bytes verbatim, one NDJSON line each."""
    entries = [Entry(1, b'{"delta":"a"}'), Entry(2, b'"b"'), Entry(3, None, "error", "boom")]
    lines = WS_CODEC.entries("s1", 77, entries, text=False).split(b"\n")
    assert [orjson.loads(line) for line in lines] == [
        {"type": "chunk", "stream": "s1", "cursor": "77-0000000001", "data": {"delta": "a"}},
        {"type": "chunk", "stream": "s1", "cursor": "77-0000000002", "data": "b"},
        {"type": "end", "stream": "s1", "cursor": "77-0000000003", "reason": "error", "message": "boom"},
    ]


def test_sse_events_carry_ids_and_split_multiline_text() -> None:
    """SSE events have the cursor as id; text chunks go out raw, one data line per line."""
    out = encode_sse_entries(5, [Entry(1, b'"line1\\nline2"'), Entry(2, None, "completed")], text=True)
    assert out == (
        b"id: 5-0000000001\nevent: chunk\ndata: line1\ndata: line2\n\n"
        b'id: 5-0000000002\nevent: end\ndata: {"reason":"completed"}\n\n'
    )
    assert (
        encode_sse_entries(5, [Entry(3, b'{"a":1}')], text=False)
        == b'id: 5-0000000003\nevent: chunk\ndata: {"a":1}\n\n'
    )
    assert sse_event("gap", "x") == b"event: gap\ndata: x\n\n"
    assert SSE_CODEC.reset("s", "stream_replaced") == b'event: reset\ndata: {"reason":"stream_replaced"}\n\n'


# -- hostile input (issue 9, items 7, 13, 21, 22) ------------------------------------------------


@pytest.mark.parametrize(
    "text", ["\u00b2", "\u2460", "\u0663", "1" * 17, "9" * 5000, "", "-1", "+1", " 1", "1 ", "0x1"]
)
def test_integers_are_ascii_digits_only_with_a_length_bound(text: str) -> None:
    """str.isdigit() takes '²', '①' and Arabic-Indic digits and int() then raises: parse_uint refuses them."""
    with pytest.raises(ProtocolError) as exc:
        parse_uint(text, "wait_ms")
    assert exc.value.code == "bad_frame"


def test_integers_up_to_two_to_the_53_minus_one_are_exact() -> None:
    assert parse_uint("0", "n") == 0 and parse_uint(str(MAX_EXACT_INT), "n") == MAX_EXACT_INT
    with pytest.raises(ProtocolError):
        parse_uint(str(MAX_EXACT_INT + 1), "n")


@pytest.mark.parametrize("cursor", ["1-\u00b2", "\u2460-1", "18446744073709551616-1", f"1-{MAX_EXACT_INT + 1}"])
def test_cursors_outside_the_exact_range_are_refused(cursor: str) -> None:
    """A cursor part above 2^53-1 (one above 2^64 reached Redis and came back as store_unavailable) is bad_frame."""
    with pytest.raises(ProtocolError):
        parse_cursor(cursor)


def test_nesting_depth_counts_the_outer_value_as_level_one() -> None:
    assert not too_deep([], 1) and too_deep([[]], 1) and not too_deep([[]], 2)
    assert too_deep({"a": [{"b": []}]}, 3) and not too_deep({"a": [{"b": 1}]}, 3)
    deep = orjson.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert not too_deep(deep, MAX_JSON_DEPTH) and too_deep([deep], MAX_JSON_DEPTH)


def test_the_shortest_line_nested_past_the_limit_is_not_taken_for_shallow() -> None:
    """A line shorter than any too-deep one skips the bracket count; the shortest too-deep one does not."""
    shortest = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    assert too_deep(orjson.loads(shortest), MAX_JSON_DEPTH)
    assert not _shallow(shortest) and not _shallow(shortest.encode())
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + " "
    assert _shallow(at_limit) and _shallow(at_limit.encode())
    over = b'{"op":"append","stream":"s","seq":1,"chunk":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    assert _error(DECODER.decode(over, opened={"s"})) == "bad_frame"


def test_a_frame_nested_past_the_limit_is_bad_frame_even_if_brackets_hide_in_strings() -> None:
    """Brackets inside strings only make the walk run; the depth of the values decides."""
    shallow = orjson.dumps({"op": "ping", "id": "[" * 200})  # past the walk threshold, within the 256-byte id cap
    assert isinstance(DECODER.decode(shallow), PingOp)
    at_limit = b'{"op": "ping", "id": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert isinstance(DECODER.decode(at_limit), PingOp)
    over = b'{"op": "ping", "id": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    assert _error(DECODER.decode(over)) == "bad_frame"
    assert _error(decode_consumer(over.decode())) == "bad_frame"


def test_seqs_and_epochs_stay_in_the_exact_integer_range() -> None:
    """Lua counts in doubles: an epoch, or the seq of an append's last chunk, above 2^53-1 is bad_frame."""
    assert (
        _error(DECODER.decode(orjson.dumps({"op": "open", "stream": "s", "epoch": MAX_EXACT_INT + 1}))) == "bad_frame"
    )
    assert isinstance(DECODER.decode(orjson.dumps({"op": "open", "stream": "s", "epoch": MAX_EXACT_INT})), OpenOp)
    last = {"op": "append", "stream": "s", "seq": MAX_EXACT_INT - 1, "chunks": [1, 2]}
    assert isinstance(DECODER.decode(orjson.dumps(last)), AppendOp)
    assert _error(DECODER.decode(orjson.dumps({**last, "chunks": [1, 2, 3]}))) == "bad_frame"


def test_the_text_codec_sends_a_stored_non_string_as_its_json_text() -> None:
    entries = [Entry(1, b'"a"'), Entry(2, b"42"), Entry(3, b'{"k":[1]}')]
    out = encode_sse_entries(7, entries, text=True).decode()
    assert out == (
        "id: 7-0000000001\nevent: chunk\ndata: a\n\n"
        "id: 7-0000000002\nevent: chunk\ndata: 42\n\n"
        'id: 7-0000000003\nevent: chunk\ndata: {"k":[1]}\n\n'
    )


def test_sse_error_events_cannot_be_taken_for_eventsource_errors_and_say_when_to_retry() -> None:
    """``relayd-error``, not ``error`` (EventSource's own event); a long retry unless a reconnect fixes it."""
    assert SSE_CODEC.error("s", "stream_not_found", "no") == (
        b'retry: 10000\nevent: relayd-error\ndata: {"code":"stream_not_found","message":"no"}\n\n'
    )
    assert SSE_CODEC.error("s", "shutting_down", "bye").startswith(b"retry: 1000\nevent: relayd-error\n")
    assert SSE_LEGACY_CODEC.error("s", "internal", "x").startswith(b"retry: 10000\nevent: error\n")


def test_the_chunks_of_an_append_hold_their_size_not_orjsons_buffer() -> None:
    """orjson (3.12+) hands back bytes over-allocated to 4 KiB and more; chunks wait in memory for
    Redis, counted by flow control at 2 x their size + CHUNK_OVERHEAD_BYTES, so each is right-sized."""
    body = orjson.dumps({"epoch": 1, "seq": 1, "chunks": ["a"] * 1000})
    tracemalloc.start()
    try:
        op = decode_write(body, "s", 1 << 20)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(op.chunks) == 1000
    assert held < 1000 * CHUNK_OVERHEAD_BYTES  # a 3-byte chunk is a ~36-byte bytes object, not 4 KiB
