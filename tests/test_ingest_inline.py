"""Producer messages taken as aiohttp's parser completes them (``InlineWebSocketResponse``).

Data messages are handled in the socket's read callback unless the connection must wait (flow
control) or is closing; then they queue for the handler task, behind each other and behind every
control frame, so the peer's order holds. The frames are parsed by aiohttp's reader, so these
tests drive it with the real clients producers use (aiohttp, websockets): fragmented messages,
pings between fragments, invalid UTF-8, oversized messages, bursts in one TCP write.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from relayd.config import Config
from tests.helpers import API_KEY, Relayd, collect_chunks, poll_until


def _append(stream: str, seq: int, **chunk: Any) -> str:
    return orjson.dumps({"op": "append", "stream": stream, "seq": seq, "chunk": {"i": seq, **chunk}}).decode()


async def _frames(ws: ClientConnection) -> AsyncIterator[dict[str, Any]]:
    while True:
        message = await ws.recv()
        for line in message.splitlines():
            yield orjson.loads(line)


async def _next(ws: ClientConnection, type_: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        async for frame in _frames(ws):
            if frame["type"] == type_:
                return frame
    raise AssertionError("connection ended")


def _connect(relayd: Relayd, **kwargs: Any) -> Any:
    url = relayd.ws_url + "/v1/ingest"
    return websockets.connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)


def _close_line(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    lines = [r for r in caplog.records if r.getMessage().startswith("producer closed")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    return lines[0]


async def _closed_logged(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """The close line (written after the peer is gone: no event to wait on, so polled)."""
    await poll_until(
        lambda: any(r.getMessage().startswith("producer closed") for r in caplog.records), "the close line"
    )
    return _close_line(caplog)


async def test_one_message_at_a_time_is_taken_inline(relayd: Relayd, caplog: pytest.LogCaptureFixture) -> None:
    """A producer that waits for each ack has every message handled inline, and the close line says so."""
    caplog.set_level(logging.INFO, logger="relayd.ingest")
    async with await relayd.producer() as producer:
        await producer.open("inline-one")
        for seq in range(1, 21):
            assert (await producer.append("inline-one", seq, {"i": seq}))["seq"] == seq
        assert (await producer.end("inline-one"))["type"] == "ended"
    record = await _closed_logged(caplog)
    assert record.frames_in == 22 and record.chunks_in == 20  # type: ignore[attr-defined]
    assert record.messages_inline == 22  # type: ignore[attr-defined]


async def test_fragmented_message_with_a_ping_between_fragments(relayd: Relayd) -> None:
    """websockets sends a message in fragments; a ping between them is answered and the message is one append."""
    async with _connect(relayd) as ws:
        await ws.send(orjson.dumps({"op": "open", "stream": "inline-frag"}).decode())
        await _next(ws, "opened")
        line = _append("inline-frag", 1, text="x" * 3000)
        parts = [line[:10], line[10:2000], line[2000:]]
        sent_first = asyncio.Event()
        release = asyncio.Event()

        async def fragments() -> AsyncIterator[str]:
            yield parts[0]
            sent_first.set()
            await release.wait()
            yield parts[1]
            yield parts[2]

        sending = asyncio.create_task(ws.send(fragments()))
        await sent_first.wait()
        pong = await ws.ping(b"between")  # a control frame between a message's fragments (RFC 6455 5.4)
        release.set()
        await sending
        async with asyncio.timeout(10):
            await pong
        ack = await _next(ws, "ack")
        assert ack["stream"] == "inline-frag" and ack["seq"] == 1
    consumer = await relayd.consumer("inline-frag")
    await consumer.expect("subscribed")
    chunk = await consumer.expect("chunk")
    assert chunk["data"] == {"i": 1, "text": "x" * 3000}


async def test_invalid_utf8_text_fails_the_connection_1007(relayd: Relayd) -> None:
    """A text message that is not UTF-8 closes the connection with 1007, as RFC 6455 8.1 asks."""
    reader, writer = await _raw_connect(relayd, b"")
    writer.write(_masked_text(b'{"op":"ping","id":"\xff\xfe"}'))
    async with asyncio.timeout(10):
        first, length = await reader.readexactly(2)
        assert first == 0x88 and length >= 2  # a close frame
        assert int.from_bytes((await reader.readexactly(length))[:2], "big") == 1007
    writer.close()


async def test_oversized_message_from_websockets_closes_1009(config_factory: Callable[..., Config]) -> None:
    """limits.max_frame_bytes holds for the inline path too: a larger message closes with 1009."""
    async with (
        Relayd(config_factory(limits={"max_frame_bytes": 4096, "max_chunk_bytes": 1024})) as relayd,
        _connect(relayd) as ws,
    ):
        await ws.send(orjson.dumps({"op": "ping", "id": "x" * 5000}).decode())
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_burst_in_one_write_under_flow_control_keeps_order(
    config_factory: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    """Hundreds of one-append messages in one TCP write, past a tiny unacked limit: the first go inline,
    the rest queue while there is no room, and every ack and every stored chunk comes in seq order."""
    caplog.set_level(logging.INFO, logger="relayd.ingest")
    total = 400
    config = config_factory(limits={"max_unacked_bytes": 2048})
    async with Relayd(config) as relayd:
        async with _connect(relayd) as ws:
            await ws.send(orjson.dumps({"op": "open", "stream": "inline-burst"}).decode())
            await _next(ws, "opened")
            # one write: websockets' send() queues the frame; the messages leave together
            await asyncio.gather(*(ws.send(_append("inline-burst", seq, pad="p" * 100)) for seq in range(1, total + 1)))
            acks: list[int] = []
            async with asyncio.timeout(30):
                async for frame in _frames(ws):
                    assert frame["type"] == "ack", frame
                    acks.append(frame["seq"])
                    if len(acks) == total:
                        break
            assert acks == list(range(1, total + 1))
            await ws.send(orjson.dumps({"op": "end", "stream": "inline-burst", "reason": "completed"}).decode())
            await _next(ws, "ended")
        record = await _closed_logged(caplog)
        assert 0 < record.messages_inline < total + 2  # type: ignore[attr-defined]
        consumer = await relayd.consumer("inline-burst")
        await consumer.expect("subscribed")
        chunks, end = await collect_chunks(consumer, "inline-burst")
        assert [c["data"]["i"] for c in chunks] == list(range(1, total + 1))
        assert end["reason"] == "completed"


async def test_long_message_is_handled_by_the_task_and_the_next_one_after_it(relayd: Relayd) -> None:
    """A message of more than 256 lines goes through the handler task (which yields between turns);
    a one-line message right behind it in the same write is answered after all of its lines."""
    async with await relayd.producer() as producer:
        await producer.open("inline-long")
        lines = [_append("inline-long", seq) for seq in range(1, 601)]
        await producer.send_raw("\n".join(lines))
        await producer.send_raw(_append("inline-long", 601))
        acks = [(await producer.expect("ack"))["seq"] for _ in range(601)]
        assert acks == list(range(1, 602))


def _masked_text(payload: bytes, first: int = 0x81) -> bytes:
    """A client frame: ``first`` is FIN and the opcode (0x81: a whole text message)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    assert n < 65536
    length = bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    return bytes((first,)) + length + mask + body


async def _raw_connect(relayd: Relayd, early: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A producer websocket on a plain socket, ``early`` sent in the handshake's own write; after the 101."""
    host, port = relayd.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = (
        f"GET /v1/ingest HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {API_KEY}\r\n\r\n"
    ).encode()
    writer.write(request + early)
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def test_frames_sent_with_the_handshake_take_the_ordinary_path(
    relayd: Relayd, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends frames before the 101 (in the handshake's own write) keeps aiohttp's reader:
    nothing it sent is lost or reordered, and no message is taken inline."""
    caplog.set_level(logging.INFO, logger="relayd.ingest")
    ping = _masked_text(b'{"op":"ping","id":1}')
    reader, writer = await _raw_connect(relayd, ping + _masked_text(b'{"op":"ping","id":2}'))
    async with asyncio.timeout(10):
        pongs: list[int] = []
        while len(pongs) < 2:
            first, length = await reader.readexactly(2)
            assert first == 0x81 and length < 126
            pongs.extend(orjson.loads(line)["id"] for line in (await reader.readexactly(length)).splitlines())
    assert pongs == [1, 2]
    writer.write(bytes((0x88, 0x82)) + b"\0\0\0\0" + (1000).to_bytes(2, "big"))  # close, masked with zeros
    await writer.drain()
    writer.close()
    record = await _closed_logged(caplog)
    assert record.frames_in == 2 and record.messages_inline == 0  # type: ignore[attr-defined]


async def test_a_message_parsed_while_the_task_takes_a_queued_one_waits_for_it(relayd: Relayd) -> None:
    """A message over aiohttp's queue limit stalls its parser; the parser resumes inside the task's
    read of that message, and what it parses then must queue behind it, not overtake it inline."""
    reader, writer = await _raw_connect(relayd, b"")
    writer.write(_masked_text(b'{"op":"open","stream":"inline-stall"}'))
    # 300 lines (the task's: more than one turn) of ~2 KB, over the queue's 512 KiB, so the
    # parser stalls before the one-line message written right behind it; sent in 60 KB fragments
    long = "\n".join(_append("inline-stall", seq, pad="p" * 2000) for seq in range(1, 301)).encode()
    parts = [long[i : i + 60_000] for i in range(0, len(long), 60_000)]
    opcodes = [0x01] + [0x00] * (len(parts) - 2) + [0x80]  # text, continuations, FIN continuation
    message = b"".join(_masked_text(part, first) for part, first in zip(parts, opcodes, strict=True))
    writer.write(message + _masked_text(_append("inline-stall", 301).encode()))
    seqs: list[int] = []
    async with asyncio.timeout(10):
        while len(seqs) < 302:
            first, length = await reader.readexactly(2)
            assert first == 0x81
            if length == 126:
                length = int.from_bytes(await reader.readexactly(2), "big")
            for line in (await reader.readexactly(length)).splitlines():
                frame = orjson.loads(line)
                assert frame["type"] in ("opened", "ack"), frame
                seqs.append(frame.get("seq", 0))
    assert seqs == [0, *range(1, 302)]
    writer.close()
