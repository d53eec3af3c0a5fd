"""Producer websocket (``GET /v1/ingest``): the bad-input matrix, flow control, liveness and cancel.

Every refusal is checked against the exact error code of docs/protocol.md, and every test that
sends bad input then proves the connection still works: a valid append is still acknowledged.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from relayd.config import Config
from tests.helpers import API_KEY, Peer, Relayd, collect_chunks

_alive_ids = itertools.count()


async def expect_error(peer: Peer, code: str, **fields: Any) -> dict[str, Any]:
    """The next frame is an error frame with ``code`` (and ``fields``) and a message."""
    frame = await peer.expect("error", code=code, **fields)
    assert isinstance(frame.get("message"), str) and frame["message"], frame
    return frame


async def assert_still_works(peer: Peer) -> None:
    """The connection still serves: a fresh stream opens and a valid append is acknowledged."""
    stream = f"alive-{next(_alive_ids)}"
    opened = await peer.open(stream)
    assert opened["type"] == "opened" and opened["stream"] == stream, opened
    ack = await peer.append(stream, 1, {"ok": True})
    assert ack["type"] == "ack" and ack["stream"] == stream and ack["seq"] == 1, ack


# -- malformed frames ---------------------------------------------------------------------------


async def test_not_json_is_bad_frame(relayd: Relayd) -> None:
    """A message that is not JSON is refused with bad_frame and the connection stays usable."""
    async with await relayd.producer() as producer:
        await producer.send_raw("this is {not json")
        await expect_error(producer, "bad_frame")
        await producer.send_raw(b'{"op": "open", "stream": ')
        await expect_error(producer, "bad_frame")
        await assert_still_works(producer)


async def test_json_that_is_not_an_object_is_bad_frame(relayd: Relayd) -> None:
    """JSON arrays, strings, numbers and null are refused with bad_frame, one error each."""
    async with await relayd.producer() as producer:
        for raw in ('[{"op": "ping"}]', '"ping"', "42", "null", "true"):
            await producer.send_raw(raw)
            await expect_error(producer, "bad_frame")
        await assert_still_works(producer)


async def test_unknown_op_is_unknown_op(relayd: Relayd) -> None:
    """An op relayd does not know (including consumer ops) is refused with unknown_op."""
    async with await relayd.producer() as producer:
        for op in ("frobnicate", "subscribe", "", 7):
            await producer.send({"op": op, "stream": "s"})
            await expect_error(producer, "unknown_op")
        await assert_still_works(producer)


async def test_missing_op_is_unknown_op(relayd: Relayd) -> None:
    """An object without ``op`` is refused with unknown_op."""
    async with await relayd.producer() as producer:
        await producer.send({"stream": "s", "seq": 1, "chunk": "x"})
        await expect_error(producer, "unknown_op")
        await producer.send({})
        await expect_error(producer, "unknown_op")
        await assert_still_works(producer)


async def test_oversized_websocket_message_closes_1009(config_factory: Callable[..., Config]) -> None:
    """A message larger than limits.max_frame_bytes closes the connection with 1009; others are unaffected."""
    config = config_factory(limits={"max_frame_bytes": 4096, "max_chunk_bytes": 1024})
    async with Relayd(config) as relayd, await relayd.producer() as bystander:
        await assert_still_works(bystander)
        producer = await relayd.producer()
        await assert_still_works(producer)
        await producer.send_raw(orjson.dumps({"op": "append", "stream": "big", "seq": 1, "chunk": "x" * 5000}).decode())
        assert await producer.closed() == 1009
        # The relay as a whole keeps working: the other connection and a new one.
        await assert_still_works(bystander)
        async with await relayd.producer() as fresh:
            await assert_still_works(fresh)


async def test_oversized_chunk_is_chunk_too_large(config_factory: Callable[..., Config]) -> None:
    """A chunk larger than limits.max_chunk_bytes (in a message that fits) is refused; nothing is stored."""
    config = config_factory(limits={"max_frame_bytes": 8192, "max_chunk_bytes": 1024})
    async with Relayd(config) as relayd, await relayd.producer() as producer:
        await producer.open("s")
        await producer.send({"op": "append", "stream": "s", "seq": 1, "chunk": "y" * 2000})
        await expect_error(producer, "chunk_too_large", stream="s", seq=1)
        # one oversized chunk among small ones refuses the whole append
        await producer.send({"op": "append", "stream": "s", "seq": 1, "chunks": ["a", "z" * 1100, "b"]})
        await expect_error(producer, "chunk_too_large", stream="s", seq=1)
        # seq 1 was never stored: it is still the next expected number
        ack = await producer.append("s", 1, "y" * 1000)
        assert ack["type"] == "ack" and ack["seq"] == 1, ack
        await assert_still_works(producer)


async def test_invalid_stream_ids_are_invalid_stream_id(relayd: Relayd) -> None:
    """Ids with spaces, braces, 201 characters, empty or not a string are refused on open, append and end."""
    bad_ids: list[Any] = ["has space", "br{ace}", "{x}", "x" * 201, "", "new\nline", 42, None]
    async with await relayd.producer() as producer:
        for bad in bad_ids:
            await producer.send({"op": "open", "stream": bad})
            await expect_error(producer, "invalid_stream_id")
            await producer.send({"op": "append", "stream": bad, "seq": 1, "chunk": "x"})
            await expect_error(producer, "invalid_stream_id")
            await producer.send({"op": "end", "stream": bad, "reason": "completed"})
            await expect_error(producer, "invalid_stream_id")
        # the boundary is valid: 200 characters from the whole allowed alphabet
        longest = ("Az09_-.:/@=" * 20)[:200]
        opened = await producer.open(longest)
        assert opened["type"] == "opened" and opened["stream"] == longest, opened
        await assert_still_works(producer)


# -- stream state -------------------------------------------------------------------------------


async def test_append_before_open_is_not_open(relayd: Relayd) -> None:
    """Appending to (or ending) a stream this connection has not opened is refused with not_open."""
    async with await relayd.producer() as producer:
        await producer.send({"op": "append", "stream": "never-opened", "seq": 1, "chunk": "x"})
        await expect_error(producer, "not_open", stream="never-opened", seq=1)
        await producer.send({"op": "end", "stream": "never-opened", "reason": "completed"})
        await expect_error(producer, "not_open", stream="never-opened")
        # opened by another connection is still not opened by this one
        async with await relayd.producer() as other:
            assert (await other.open("theirs"))["type"] == "opened"
            await producer.send({"op": "append", "stream": "theirs", "seq": 1, "chunk": "x"})
            await expect_error(producer, "not_open", stream="theirs", seq=1)
        await assert_still_works(producer)


async def test_append_after_end_is_stream_ended(relayd: Relayd) -> None:
    """After the end, an append on the same connection, or after re-opening the ended stream, gets stream_ended."""
    async with await relayd.producer() as producer:
        await producer.open("s")
        assert (await producer.append("s", 1, "a"))["type"] == "ack"
        ended = await producer.end("s")
        assert ended["type"] == "ended" and ended["reason"] == "completed", ended
        await producer.send({"op": "append", "stream": "s", "seq": 2, "chunk": "b"})
        await expect_error(producer, "stream_ended", stream="s", seq=2)
        await assert_still_works(producer)

    async with await relayd.producer() as again:
        opened = await again.open("s")
        assert opened["type"] == "opened" and opened["status"] == "completed", opened
        await again.send({"op": "append", "stream": "s", "seq": 1, "chunk": "c"})
        await expect_error(again, "stream_ended", stream="s", seq=1)
        await assert_still_works(again)

    # nothing after the end was stored
    consumer = await relayd.consumer("s")
    await consumer.expect("subscribed", stream="s")
    chunks, end = await collect_chunks(consumer, "s")
    assert [c["data"] for c in chunks] == ["a"] and end["reason"] == "completed"


async def test_end_with_the_same_reason_is_idempotent(relayd: Relayd) -> None:
    """Ending an already ended stream with the same reason is acknowledged again with the same cursor."""
    async with await relayd.producer() as producer:
        await producer.open("s")
        await producer.append("s", 1, "a")
        first = await producer.end("s")
        assert first["type"] == "ended", first
        second = await producer.end("s")
        assert second == first, (first, second)
        await producer.send({"op": "end", "stream": "s", "reason": "error"})
        await expect_error(producer, "stream_ended", stream="s")
        await assert_still_works(producer)


async def test_open_with_a_lower_epoch_is_fenced(relayd: Relayd) -> None:
    """An open with an epoch lower than the stream's current one is refused with fenced."""
    async with await relayd.producer() as producer:
        assert (await producer.open("s"))["epoch"] == 1
        taken = await producer.open("s")  # no epoch: take over, epoch + 1
        assert taken["type"] == "opened" and taken["epoch"] == 2 and taken["seq"] == 0, taken
        await producer.send({"op": "open", "stream": "s", "epoch": 1})
        await expect_error(producer, "fenced", stream="s")
        # the current epoch resumes; a higher one starts that epoch
        resumed = await producer.open("s", epoch=2)
        assert resumed["type"] == "opened" and resumed["epoch"] == 2, resumed
        higher = await producer.open("s", epoch=7)
        assert higher["type"] == "opened" and higher["epoch"] == 7 and higher["seq"] == 0, higher
        await producer.send({"op": "open", "stream": "s", "epoch": 6})
        await expect_error(producer, "fenced", stream="s")
        ack = await producer.append("s", 1, "after")
        assert ack["type"] == "ack" and ack["seq"] == 1, ack
        await assert_still_works(producer)


async def test_a_producer_taking_over_fences_the_first(relayd: Relayd) -> None:
    """When a second producer takes a stream over, the first one's next append (and end) gets fenced."""
    first = await relayd.producer()
    second = await relayd.producer()
    async with first, second:
        assert (await first.open("s"))["epoch"] == 1
        assert (await first.append("s", 1, "from-first"))["type"] == "ack"
        taken = await second.open("s")
        assert taken["type"] == "opened" and taken["epoch"] == 2, taken
        await first.send({"op": "append", "stream": "s", "seq": 2, "chunk": "stale"})
        await expect_error(first, "fenced", stream="s", seq=2)
        # resuming with its old epoch does not help either
        await first.send({"op": "open", "stream": "s", "epoch": 1})
        await expect_error(first, "fenced", stream="s")
        await assert_still_works(first)
        assert (await second.append("s", 1, "from-second"))["type"] == "ack"
        assert (await second.end("s"))["type"] == "ended"

    consumer = await relayd.consumer("s")
    await consumer.expect("subscribed", stream="s")
    chunks, end = await collect_chunks(consumer, "s")
    assert [c["data"] for c in chunks] == ["from-first", "from-second"]
    assert end["reason"] == "completed"


async def test_two_takeovers_near_the_exact_integer_limit_cannot_both_succeed(relayd: Relayd) -> None:
    """Epochs stay exact (the store's Lua counts in doubles): the takeover that would pass 2^53-1 is
    fenced, so two producers can never share an epoch and both write (issue 9, item 22)."""
    top = 2**53 - 1
    async with await relayd.producer() as first, await relayd.producer() as second:
        assert (await first.open("near", epoch=top - 1))["epoch"] == top - 1
        taken = await second.open("near")  # the last exact epoch
        assert taken["type"] == "opened" and taken["epoch"] == top, taken
        async with await relayd.producer() as third:
            await third.send({"op": "open", "stream": "near"})
            await expect_error(third, "fenced", stream="near")
            await third.send({"op": "append", "stream": "near", "seq": 1, "chunk": "third"})
            await expect_error(third, "not_open", stream="near")
        assert (await second.append("near", 1, "second"))["type"] == "ack"
        await first.send({"op": "append", "stream": "near", "seq": 1, "chunk": "first"})
        await expect_error(first, "fenced", stream="near")
        resumed = await second.open("near", epoch=top)  # the holder can still resume with its epoch
        assert resumed["type"] == "opened" and resumed["epoch"] == top and resumed["seq"] == 1, resumed


async def test_open_repeated_by_the_same_producer_resumes_instead_of_taking_over(relayd: Relayd) -> None:
    """An open without epoch but with the producer id of the current epoch resumes that epoch.

    It is what makes an open idempotent when its ``opened`` was lost with the connection: the
    repeat gets the epoch and the last stored seq, so nothing is stored twice. Another producer
    id (or none) still takes the stream over, and a takeover gives the epoch to the new id.
    """
    first, second, third = await relayd.producer(), await relayd.producer(), await relayd.producer()
    async with first, second, third:
        opened = await first.open("s", producer="writer-x")
        assert opened["epoch"] == 1 and opened["seq"] == 0 and opened["producer"] == "writer-x", opened
        assert (await first.append("s", 1, 1, 2, 3))["seq"] == 3
        # a new connection of the same producer (the first one's close not noticed yet): resume
        resumed = await second.open("s", producer="writer-x")
        assert resumed["type"] == "opened" and resumed["epoch"] == 1 and resumed["seq"] == 3, resumed
        assert resumed["status"] == "open" and resumed["cursor"] is not None, resumed
        assert (await second.append("s", 3, 3, 4))["seq"] == 4  # overlapping resend: only 4 is new
        assert (await second.append("s", 5, 5))["seq"] == 5
        # another producer id takes over and fences epoch 1 on both connections of writer-x
        taken = await third.open("s", producer="writer-y")
        assert taken["epoch"] == 2 and taken["seq"] == 0 and taken["producer"] == "writer-y", taken
        await first.send({"op": "append", "stream": "s", "seq": 4, "chunk": "stale"})
        await expect_error(first, "fenced", stream="s", seq=4)
        await second.send({"op": "append", "stream": "s", "seq": 6, "chunk": "stale"})
        await expect_error(second, "fenced", stream="s", seq=6)
        assert (await third.append("s", 1, "y1"))["seq"] == 1
        # writer-x no longer owns the current epoch: its open is a takeover, not a resume
        again = await second.open("s", producer="writer-x")
        assert again["epoch"] == 3 and again["seq"] == 0, again
        await third.send({"op": "append", "stream": "s", "seq": 2, "chunk": "stale"})
        await expect_error(third, "fenced", stream="s", seq=2)
        assert (await second.append("s", 1, "x3"))["seq"] == 1
        assert (await second.end("s"))["type"] == "ended"
        # an ended stream stays ended, whoever opens it
        assert (await first.open("s", producer="writer-x"))["status"] == "completed"

    consumer = await relayd.consumer("s")
    await consumer.expect("subscribed", stream="s")
    chunks, end = await collect_chunks(consumer, "s")
    assert [c["data"] for c in chunks] == [1, 2, 3, 4, 5, "y1", "x3"]
    assert end["reason"] == "completed"


async def test_producer_id_follows_the_epoch(relayd: Relayd) -> None:
    """Only the producer that started the current epoch resumes by id: an explicit new epoch records
    its id, a takeover without an id forgets the old one."""
    async with await relayd.producer() as producer:
        assert (await producer.open("s", producer="a"))["epoch"] == 1
        assert (await producer.open("s", epoch=5, producer="b"))["epoch"] == 5
        assert (await producer.open("s", producer="a"))["epoch"] == 6  # "a" lost it at epoch 5
        assert (await producer.open("s", producer="a"))["epoch"] == 6  # and owns epoch 6
        assert (await producer.open("s", epoch=6))["epoch"] == 6  # an explicit epoch resumes as always
        assert (await producer.open("s"))["epoch"] == 7  # no id: a takeover that forgets "a"
        assert (await producer.open("s", producer="a"))["epoch"] == 8
        assert (await producer.open("s", epoch=8, producer="z"))["epoch"] == 8  # resuming keeps "a"
        assert (await producer.open("s", producer="a"))["epoch"] == 8
        created = await producer.open("fresh", epoch=4, producer="c")
        assert created["epoch"] == 4 and created["seq"] == 0, created
        assert (await producer.open("fresh", producer="c"))["epoch"] == 4


@pytest.mark.parametrize("value", ["", "p" * 65, "has space", "slash/no", 7, ["x"], True])
async def test_invalid_producer_id_is_bad_frame(relayd: Relayd, value: Any) -> None:
    """A producer id that is not 1-64 of A-Z a-z 0-9 _ . : - is refused with bad_frame naming the field."""
    async with await relayd.producer() as producer:
        await producer.send({"op": "open", "stream": "s", "producer": value})
        error = await expect_error(producer, "bad_frame", stream="s")
        assert "producer" in error["message"], error
        await assert_still_works(producer)


async def test_seq_gap_names_the_last_stored_seq(relayd: Relayd) -> None:
    """An append that skips sequence numbers is refused with seq_gap; the error's seq is the last stored one."""
    async with await relayd.producer() as producer:
        await producer.open("s")
        assert (await producer.append("s", 1, "a", "b"))["seq"] == 2
        await producer.send({"op": "append", "stream": "s", "seq": 4, "chunk": "d"})
        await expect_error(producer, "seq_gap", stream="s", seq=2)
        # a seq that does not start at 1 in a new epoch is a gap too
        await producer.open("t")
        await producer.send({"op": "append", "stream": "t", "seq": 5, "chunk": "x"})
        await expect_error(producer, "seq_gap", stream="t", seq=0)
        ack = await producer.append("s", 3, "c")
        assert ack["type"] == "ack" and ack["seq"] == 3, ack
        await assert_still_works(producer)


async def test_text_stream_refuses_non_string_chunks(relayd: Relayd) -> None:
    """A text stream refuses a non-string chunk with content_type; strings are accepted."""
    async with await relayd.producer() as producer:
        opened = await producer.open("txt", content_type="text")
        assert opened["content_type"] == "text", opened
        for chunk in ({"delta": "x"}, 42, ["a"], None, True):
            await producer.send({"op": "append", "stream": "txt", "seq": 1, "chunk": chunk})
            await expect_error(producer, "content_type", stream="txt", seq=1)
        await producer.send({"op": "append", "stream": "txt", "seq": 1, "chunks": ["ok", {"no": 1}]})
        await expect_error(producer, "content_type", stream="txt", seq=1)
        ack = await producer.append("txt", 1, "plain text")
        assert ack["type"] == "ack" and ack["seq"] == 1, ack
        await assert_still_works(producer)


async def test_end_with_an_invalid_reason_is_bad_frame(relayd: Relayd) -> None:
    """An end whose reason is not completed, error or cancelled (producer_lost included) is bad_frame."""
    async with await relayd.producer() as producer:
        await producer.open("s")
        for reason in ("done", "producer_lost", "", None, 3):
            await producer.send({"op": "end", "stream": "s", "reason": reason})
            await expect_error(producer, "bad_frame", stream="s")
        await producer.send({"op": "end", "stream": "s", "reason": "error", "message": 5})
        await expect_error(producer, "bad_frame", stream="s")
        # the stream was not ended by any of these
        ack = await producer.append("s", 1, "still open")
        assert ack["type"] == "ack", ack
        await assert_still_works(producer)


async def test_several_ops_in_one_ndjson_message_are_all_answered(relayd: Relayd) -> None:
    """One message holding appends, a bad line, a ping and the end gets every answer; acks and end in order."""
    async with await relayd.producer() as producer:
        assert (await producer.open("nd"))["type"] == "opened"
        lines = [
            {"op": "append", "stream": "nd", "seq": 1, "chunk": "a"},
            {"op": "append", "stream": "nd", "seq": 2, "chunks": ["b", "c"]},
            {"op": "bogus"},
            {"op": "ping", "id": "p1"},
            {"op": "append", "stream": "nd", "seq": 4, "chunk": "d"},
            {"op": "end", "stream": "nd", "reason": "completed"},
        ]
        await producer.send_raw("\n".join(orjson.dumps(line).decode() for line in lines) + "\n")
        answers = [await producer.next() for _ in range(6)]
        # Refusals and pongs are answered at once, acks when Redis has the chunks: compare by kind.
        stored = [a for a in answers if a["type"] in ("ack", "ended")]
        assert [(a["type"], a.get("seq")) for a in stored] == [("ack", 1), ("ack", 3), ("ack", 4), ("ended", None)]
        assert stored[-1]["reason"] == "completed"
        cursors = [a["cursor"] for a in stored]
        assert cursors == sorted(cursors) and len(set(cursors)) == 4
        others = [a for a in answers if a["type"] not in ("ack", "ended")]
        assert len(others) == 2
        assert others[0]["type"] == "error" and others[0]["code"] == "unknown_op", others
        assert others[1] == {"type": "pong", "id": "p1"}
        await assert_still_works(producer)

    consumer = await relayd.consumer("nd")
    await consumer.expect("subscribed", stream="nd")
    chunks, end = await collect_chunks(consumer, "nd")
    assert [c["data"] for c in chunks] == ["a", "b", "c", "d"] and end["reason"] == "completed"


async def test_ping_is_answered_with_pong_echoing_the_id(relayd: Relayd) -> None:
    """``ping`` gets ``pong``; any ``id`` is echoed back unchanged, whatever its JSON type."""
    async with await relayd.producer() as producer:
        await producer.send({"op": "ping"})
        assert await producer.next() == {"type": "pong"}
        for ping_id in ("abc", 42, {"nested": [1, 2]}, 0, ""):
            await producer.send({"op": "ping", "id": ping_id})
            assert await producer.next() == {"type": "pong", "id": ping_id}
        await assert_still_works(producer)


def nested(depth: int) -> str:
    """A JSON array ``depth`` levels deep."""
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ('{"op": "open", "stream": "h", "content_type": ["text"]}', "bad_frame"),
        ('{"op": "open", "stream": "h", "content_type": {"a": 1}}', "bad_frame"),
        ('{"op": "end", "stream": "h", "reason": ["completed"]}', "bad_frame"),
        ('{"op": "end", "stream": "h", "reason": {}}', "bad_frame"),
        ('{"op": ["append"], "stream": "h"}', "unknown_op"),
        (f'{{"op": "append", "stream": "h", "seq": 1, "chunk": {nested(255)}}}', "bad_frame"),
        (f'{{"op": "append", "stream": "h", "seq": 1, "chunk": {nested(1023)}}}', "bad_frame"),
        (f'{{"op": "ping", "id": {nested(254)}}}', "bad_frame"),
        (f'{{"op": "ping", "id": {nested(1023)}}}', "bad_frame"),
        ('{"op": "open", "stream": "h", "epoch": 9007199254740992}', "bad_frame"),
        ('{"op": "append", "stream": "h", "seq": 9007199254740991, "chunks": ["a", "b"]}', "bad_frame"),
    ],
    ids=[
        "content_type-list",
        "content_type-object",
        "reason-list",
        "reason-object",
        "op-list",
        "chunk-255-deep",
        "chunk-1023-deep",
        "ping-id-254-deep",
        "ping-id-1023-deep",
        "epoch-2^53",
        "last-seq-2^53",
    ],
)
async def test_hostile_frames_get_an_error_frame_and_the_connection_stays(relayd: Relayd, line: str, code: str) -> None:
    """Fields of the wrong JSON type, nesting past the limit and integers past 2^53-1 each earn an error frame;
    the producer connection (and every other stream on it) stays up (issue 9, item 21)."""
    async with await relayd.producer() as producer:
        assert (await producer.open("other"))["type"] == "opened"
        await producer.send_raw(line)
        await expect_error(producer, code)
        ack = await producer.append("other", 1, "still here")
        assert ack["type"] == "ack", ack
        await assert_still_works(producer)


async def test_nesting_up_to_the_limit_is_stored_and_echoed(relayd: Relayd) -> None:
    """A chunk and a ping id nested up to the documented depth (128 levels, the frame included) are accepted."""
    async with await relayd.producer() as producer:
        await producer.open("deep")
        chunk = orjson.loads(nested(126))  # levels 3-128: the frame is level 1, its "chunks" list level 2
        ack = await producer.append("deep", 1, chunk)
        assert ack["type"] == "ack", ack
        ping_id = orjson.loads(nested(127))  # levels 2-128
        await producer.send({"op": "ping", "id": ping_id})
        assert await producer.next() == {"type": "pong", "id": ping_id}
    consumer = await relayd.consumer("deep")
    await consumer.expect("subscribed", stream="deep")
    frame = await consumer.expect("chunk", stream="deep")
    assert frame["data"] == chunk


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-0123456789abcdef"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "not-bearer", "empty-bearer"],
)
async def test_missing_or_wrong_api_key_is_http_401_before_upgrade(relayd: Relayd, headers: dict[str, str]) -> None:
    """Without a valid API key the upgrade is refused with HTTP 401 and an ``unauthorized`` JSON body."""
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    assert relayd.session is not None
    async with relayd.session.get(f"{relayd.url}/v1/ingest", headers={**upgrade, **headers}) as resp:
        assert resp.status == 401
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"]["code"] == "unauthorized" and isinstance(body["error"]["message"], str)
    assert API_KEY not in str(body)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await relayd.session.ws_connect(f"{relayd.url}/v1/ingest", headers=headers)
    assert refused.value.status == 401


# -- flow control -------------------------------------------------------------------------------


async def test_flow_control_burst_gets_every_ack(config_factory: Callable[..., Config]) -> None:
    """With a tiny limits.max_unacked_bytes, a burst of appends is paced, not dropped: every seq is acked once."""
    config = config_factory(limits={"max_unacked_bytes": 512})
    total = 1200
    async with Relayd(config) as relayd, await relayd.producer() as producer:
        await producer.open("burst")
        acks: list[int] = []

        async def read_acks() -> None:
            while not acks or acks[-1] < total:
                frame = await producer.next()
                assert frame["type"] == "ack", frame
                acks.append(frame["seq"])

        reader = asyncio.create_task(read_acks())
        seq = 1
        while seq <= total:
            # a mix of single appends and NDJSON messages holding ten appends each
            count = 1 if seq % 3 else 10
            ops = [
                {"op": "append", "stream": "burst", "seq": s, "chunk": {"i": s, "pad": "p" * 100}}
                for s in range(seq, min(seq + count, total + 1))
            ]
            await producer.send(*ops)
            seq += len(ops)
        await asyncio.wait_for(reader, 30)
        assert acks == list(range(1, total + 1))
        assert (await producer.end("burst"))["type"] == "ended"

    # everything was stored, in order: read it back on a fresh relayd against the same Redis
    async with Relayd(config) as again:
        consumer = await again.consumer("burst")
        await consumer.expect("subscribed", stream="burst")
        chunks, end = await collect_chunks(consumer, "burst")
        assert [c["data"]["i"] for c in chunks] == list(range(1, total + 1))
        assert end["reason"] == "completed"


# -- producer liveness ----------------------------------------------------------------------------


async def test_producer_that_disconnects_leaves_the_stream_producer_lost(
    config_factory: Callable[..., Config],
) -> None:
    """A producer that goes away without ending: after streams.producer_timeout_ms the stream ends producer_lost."""
    config = config_factory(streams={"producer_timeout_ms": 300})
    async with Relayd(config) as relayd:
        producer = await relayd.producer()
        await producer.open("lost")
        await producer.append("lost", 1, "before")
        consumer = await relayd.consumer("lost")
        await consumer.expect("subscribed", stream="lost")
        await producer.ws.close()  # gone without an end
        chunks, end = await collect_chunks(consumer, "lost")
        assert [c["data"] for c in chunks] == ["before"]
        assert end["reason"] == "producer_lost", end
        meta = await relayd.relay._store.read_meta("lost")
        assert meta is not None and meta.status == "producer_lost"


async def test_connected_silent_producer_keeps_its_stream_open(config_factory: Callable[..., Config]) -> None:
    """A producer silent for three producer timeouts but still connected keeps its stream open until it ends it."""
    timeout_ms = 300
    config = config_factory(streams={"producer_timeout_ms": timeout_ms})
    async with Relayd(config) as relayd, await relayd.producer() as producer:
        opened = await producer.open("quiet")
        assert opened["type"] == "opened"
        consumer = await relayd.consumer("quiet")
        await consumer.expect("subscribed", stream="quiet")
        started = await relayd.relay._store.read_meta("quiet")
        assert started is not None
        t0 = started.updated_ms
        # Wait (by polling the stream's meta in Redis) until relayd has recorded activity three
        # timeouts after the open: the sweep ran many times while the producer said nothing.
        async with asyncio.timeout(20):
            while True:
                meta = await relayd.relay._store.read_meta("quiet")
                assert meta is not None and meta.status == "open", meta
                if meta.updated_ms - t0 >= 3 * timeout_ms:
                    break
                await asyncio.sleep(timeout_ms / 6000)  # poll interval, not a synchronisation
        assert time.time() * 1000 - t0 >= 3 * timeout_ms
        ended = await producer.end("quiet")
        assert ended["type"] == "ended" and ended["reason"] == "completed", ended
        chunks, end = await collect_chunks(consumer, "quiet")
        assert chunks == [] and end["reason"] == "completed", end


# -- cancel ---------------------------------------------------------------------------------------


async def test_cancel_reaches_the_producer_which_ends_cancelled(relayd: Relayd) -> None:
    """A consumer with the cancel right asks to cancel; the producer gets ``cancel``, ends cancelled; all see it."""
    async with await relayd.producer() as producer:
        await producer.open("c")
        await producer.append("c", 1, "partial")
        consumer = await relayd.consumer("c", token=relayd.token(["c"], ("read", "cancel")))
        await consumer.expect("subscribed", stream="c")
        await consumer.expect("chunk", stream="c", data="partial")
        await consumer.send({"op": "cancel", "stream": "c"})
        await consumer.expect("cancel_requested", stream="c")
        assert await producer.next() == {"type": "cancel", "stream": "c"}
        ended = await producer.end("c", "cancelled")
        assert ended["type"] == "ended" and ended["reason"] == "cancelled", ended
        end = await consumer.expect("end", stream="c", reason="cancelled")
        assert end["cursor"] == ended["cursor"]
        await assert_still_works(producer)


async def test_cancel_without_the_right_is_forbidden(relayd: Relayd) -> None:
    """A consumer whose token lacks ``cancel`` gets error forbidden; the producer hears nothing; both go on."""
    async with await relayd.producer() as producer:
        await producer.open("c")
        consumer = await relayd.consumer("c", token=relayd.token(["c"], ("read",)))
        await consumer.expect("subscribed", stream="c")
        await consumer.send({"op": "cancel", "stream": "c"})
        await consumer.expect("error", code="forbidden", stream="c")
        # the producer was not asked to cancel: its next frame is the answer to its own ping
        await producer.send({"op": "ping", "id": 1})
        assert await producer.next() == {"type": "pong", "id": 1}
        await producer.append("c", 1, "more")
        await consumer.expect("chunk", stream="c", data="more")
        await producer.end("c")
        await consumer.expect("end", stream="c", reason="completed")


async def test_producer_ignoring_cancel_gets_the_stream_ended_after_the_grace(
    config_factory: Callable[..., Config],
) -> None:
    """If the producer ignores ``cancel``, relayd ends the stream cancelled after streams.cancel_grace_ms."""
    config = config_factory(streams={"cancel_grace_ms": 200})
    async with Relayd(config) as relayd, await relayd.producer() as producer:
        await producer.open("stubborn")
        await producer.append("stubborn", 1, "x")
        consumer = await relayd.consumer("stubborn", token=relayd.token(["stubborn"], ("read", "cancel")))
        await consumer.expect("subscribed", stream="stubborn")
        await consumer.send({"op": "cancel", "stream": "stubborn"})
        assert await producer.next() == {"type": "cancel", "stream": "stubborn"}
        started = time.monotonic()
        chunks, end = await collect_chunks(consumer, "stubborn")
        assert time.monotonic() - started >= 0.15  # not before the grace (less a little timer slack)
        assert [c["data"] for c in chunks] == ["x"] and end["reason"] == "cancelled", end
        # the producer is told at once, as for an operator's end, not only by its next append's refusal
        ended = await producer.next()
        assert ended["type"] == "ended" and ended["stream"] == "stubborn", ended
        assert ended["reason"] == "cancelled" and ended["cursor"] == end["cursor"], (ended, end)
        await producer.send({"op": "append", "stream": "stubborn", "seq": 2, "chunk": "too late"})
        await expect_error(producer, "stream_ended", stream="stubborn", seq=2)
        await assert_still_works(producer)
