"""relayd/durable/codec.py: the Durable Streams protocol's pure part, without a loop or socket."""

from __future__ import annotations

import base64
import tracemalloc

import orjson
import pytest

from relayd.durable import codec
from relayd.durable.codec import Offset
from relayd.errors import ProtocolError
from relayd.model import Entry
from relayd.protocol import MAX_WRITE_CHUNKS


def test_offsets_sort_as_strings_in_the_order_of_generation_then_entry() -> None:
    pairs = [(1_700_000_000_000, 9), (1_700_000_000_000, 10), (1_700_000_000_001, 0), (1_800_000_000_000, 2)]
    offsets = [codec.format_offset(gen, after) for gen, after in pairs]
    assert sorted(offsets) == offsets
    assert [codec.parse_offset([o]) for o in offsets] == [Offset(gen, after) for gen, after in pairs]


@pytest.mark.parametrize(
    "values", [[""], ["1,2"], ["0 1"], ["../x"], ["a\x00"], ["1\n"], ["12_34"], ["1-2"], ["-2"], ["NOW"], ["-1", "-1"]]
)
def test_a_malformed_or_repeated_offset_is_refused(values: list[str]) -> None:
    with pytest.raises(ProtocolError):
        codec.parse_offset(values)


def test_the_sentinels_are_the_start_and_the_tail() -> None:
    assert codec.parse_offset([]) == codec.parse_offset(["-1"]) == Offset()
    assert codec.parse_offset(["now"]) == Offset(now=True)


@pytest.mark.parametrize("text", ["01", "+1", "1.5", "1e3", "-1", "", " 1"])
def test_a_ttl_is_a_plain_non_negative_integer(text: str) -> None:
    with pytest.raises(ProtocolError):
        codec.parse_ttl(text)
    assert codec.parse_ttl("0") == 0 and codec.parse_ttl("3600") == 3600


def test_expires_at_takes_rfc3339_with_z_or_an_offset() -> None:
    assert codec.parse_expires_at("2030-01-01T00:00:00Z") == codec.parse_expires_at("2030-01-01T01:00:00+01:00")
    assert codec.parse_expires_at("2030-01-01T00:00:00.5Z") == 1_893_456_000_500
    with pytest.raises(ProtocolError):
        codec.parse_expires_at("tomorrow")
    with pytest.raises(ProtocolError):
        codec.parse_expires_at("2030-13-01T00:00:00Z")


def test_producer_headers_go_together_as_an_id_and_two_exact_integers() -> None:
    assert codec.parse_producer(None, None, None) is None
    assert codec.parse_producer("p", "007", "2") == ("p", 7, 2)
    for bad in [("p", "1", None), ("", "1", "1"), ("p", "-1", "0"), ("p", "1.0", "0"), ("p", "0", str(2**53))]:
        with pytest.raises(ProtocolError):
            codec.parse_producer(*bad)


def test_a_json_array_is_flattened_one_level_into_messages() -> None:
    media = "application/json"
    assert codec.chunks_of(media, b'[1, {"a": [2]}]') == [b"1", b'{"a":[2]}']
    assert codec.chunks_of(media, b"[[1,2],[3]]") == [b"[1,2]", b"[3]"]
    assert codec.chunks_of(media, b"[[[1]]]") == [b"[[1]]"]
    assert codec.chunks_of(media, b'"x"') == [b'"x"']
    assert codec.chunks_of(media, b"[]", create=True) == []
    for bad in [b"[]", b"{", b"NaN", b"[1,]"]:
        with pytest.raises(ProtocolError):
            codec.chunks_of(media, bad)


def test_json_integers_beyond_64_bits_are_kept_exactly() -> None:
    big = str(2**70).encode()
    [chunk] = codec.chunks_of("application/json", big)
    assert chunk == big
    assert codec.body_of("json", [Entry(1, chunk)]) == b"[" + big + b"]"


def test_text_is_kept_as_json_strings_and_bytes_as_base64_both_read_back_exactly() -> None:
    text = "héllo\r\nworld"
    [chunk] = codec.chunks_of("text/plain", text.encode())
    assert orjson.loads(chunk) == text  # a relayd text chunk: relayd's consumers read it as is
    assert codec.body_of("text", [Entry(1, chunk), Entry(2, orjson.dumps("!"))]) == (text + "!").encode()
    data = bytes(range(256))
    [raw] = codec.chunks_of("application/octet-stream", data)
    assert orjson.loads(raw) == base64.b64encode(data).decode()
    assert codec.body_of("base64", [Entry(1, raw), Entry(2, None, "completed")]) == data
    with pytest.raises(ProtocolError):
        codec.chunks_of("text/plain", b"\xff")


def test_media_types_decide_the_encoding() -> None:
    assert codec.media_type(" Application/JSON; charset=utf-8") == "application/json"
    assert [codec.encoding_of(m) for m in ("application/json", "text/csv", "image/png", "application/x-ndjson")] == [
        "json",
        "text",
        "base64",
        "base64",
    ]


def test_sse_data_lines_split_at_every_line_break_so_no_event_can_be_injected() -> None:
    event = codec.sse_event("data", "a\r\n\r\nevent: control\rb\n data: x")
    assert event == b"event: data\ndata:a\ndata:\ndata:event: control\ndata:b\ndata:  data: x\n\n"


def test_a_control_event_omits_the_cursor_once_closed() -> None:
    open_ = orjson.loads(codec.sse_control("o", "7", up_to_date=True, closed=False).split(b"data:")[1])
    assert open_ == {"streamNextOffset": "o", "streamCursor": "7", "upToDate": True}
    closed = orjson.loads(codec.sse_control("o", "7", up_to_date=True, closed=True).split(b"data:")[1])
    assert closed == {"streamNextOffset": "o", "streamClosed": True, "upToDate": True}


def test_the_cursor_never_goes_back_to_or_below_the_clients() -> None:
    now = 1_800_000_000_000
    current = codec.cursor(now, None)
    assert codec.cursor(now, str(int(current) - 5)) == current
    for _ in range(20):
        assert int(codec.cursor(now, current)) > int(current)


def test_the_entries_of_a_json_array_hold_their_size_not_orjsons_buffer() -> None:
    """orjson (3.12+) hands back bytes over-allocated to 4 KiB and more; the entries of a JSON
    array are kept until Redis has them, so each is right-sized (else 1 MB of "[0,0,...]" held 2 GB)."""
    body = ("[" + ",".join(["0"] * 1000) + "]").encode()
    tracemalloc.start()
    try:
        chunks = codec.chunks_of("application/json", body)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(chunks) == 1000
    assert held < 1000 * 200  # a 1-byte entry is a ~34-byte bytes object, not 4 KiB


def test_an_append_of_more_messages_than_one_write_takes_is_refused_before_encoding() -> None:
    """As an HTTP ingest append (protocol.MAX_WRITE_CHUNKS): one Redis script per append stays bounded."""
    body = ("[" + ",".join(["0"] * (MAX_WRITE_CHUNKS + 1)) + "]").encode()
    with pytest.raises(ProtocolError) as refused:
        codec.chunks_of("application/json", body)
    assert refused.value.code == "too_many_messages"
    assert len(codec.chunks_of("application/json", body[:-3] + b"]")) == MAX_WRITE_CHUNKS
