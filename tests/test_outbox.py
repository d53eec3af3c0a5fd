"""What relayd holds for a peer is bounded, and a peer that takes nothing is let go (relayd/outbox.py).

Real relayd, real sockets: raw websocket clients with small receive buffers that read only when
told, so relayd really sees peers that stall, read slowly, or flood it without reading.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import socket
import time
from pathlib import Path

import orjson
import pytest

from relayd.outbox import Outbox
from relayd.subscription import State
from relayd.web.transport import ws_text_frame
from tests.helpers import API_KEY, Relayd
from tests.test_guarantees import (
    ConfigFactory,
    RawWs,
    background,
    data_of,
    metric,
    padded_appends,
    poll_until,
    pump,
)


async def raw_ws(server: Relayd, path: str, *, headers: str = "", rcvbuf: int = 4096) -> RawWs:
    """A raw websocket client (see RawWs) with extra request headers."""
    host, port = server.config.server.host, server.server.port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return RawWs(reader, writer)


def text_message(payload: bytes) -> bytes:
    """A client text frame of any size, masked with a zero key (XOR with it is the identity)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = b"\x81\xfe" + n.to_bytes(2, "big")
    else:
        head = b"\x81\xff" + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def rss_bytes() -> int:
    """Resident memory of this process (relayd runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def gone(server: Relayd, role: str) -> bool:
    return await metric(server, f'relayd_connections{{role="{role}"}}') == 0


def close_line(caplog: pytest.LogCaptureFixture, role: str) -> dict[str, str]:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{role} closed")]
    assert len(lines) == 1, lines
    return dict(re.findall(r"(\w+)=(\S+)", lines[0]))


async def test_a_consumer_that_reads_nothing_is_closed_without_its_help(
    config_factory: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled reader is dropped within the send timeout (plus a second for the close), never reading again."""
    caplog.set_level(logging.INFO, logger="relayd")
    stream = "stuck"
    chunk = "x" * 10_000
    total = 1500  # far more than the kernel buffers hold
    config = config_factory(consumer={"send_timeout_ms": 500, "max_queue_bytes": 64 * 1024})
    async with Relayd(config) as server, contextlib.AsyncExitStack() as stack:
        stuck = await raw_ws(server, f"/v1/streams/{stream}/ws?token={server.token()}")
        await stack.enter_async_context(stuck)

        async def registered() -> bool:
            return server.relay._hub.subscriber_count(stream) == 1

        await poll_until(registered, "the subscription")
        # a known kernel send buffer on relayd's side: what may be lost in it when relayd aborts
        owner = server.relay._hub._subs[stream][0].owner
        sock = owner.ws._req.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        kernel = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        producer = await server.producer()
        await producer.open(stream)
        await pump(producer, padded_appends(stream, total, chunk), window=64, per_message=8)
        started = time.monotonic()

        async def closed() -> bool:
            return await gone(server, "consumer_ws")

        await poll_until(closed, "relayd to close the stalled consumer", timeout=5.0)
        assert time.monotonic() - started < 5.0
        assert await metric(server, 'relayd_forced_closes_total{reason="slow_consumer",role="consumer_ws"}') == 1
        assert await metric(server, "relayd_slow_consumer_disconnects_total") == 1
        fields = close_line(caplog, "consumer_ws")
        assert fields["close_reason"] == "slow_consumer"
        # it took nothing, so the close frame could not reach it: the transport was aborted
        assert fields["close_code"] == "1006"

        # The close line and the metric count only chunks that left relayd: as the client read
        # nothing, no more than its receive buffer, relayd's kernel buffer and the transport's
        # own bounded buffer hold (the abort may have discarded all of them).
        client = stuck.writer.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        could_leave = (client + kernel + 2 * 64 * 1024) // len(chunk) + 2
        chunks_out = int(fields["chunks_out"])
        assert 0 < chunks_out <= could_leave, (chunks_out, could_leave)
        assert 0 < await metric(server, "relayd_chunks_delivered_total") <= could_leave
        await producer.ws.close()


async def test_a_slow_steady_reader_outlives_many_heartbeats(config_factory: ConfigFactory) -> None:
    """A reader that takes ~100 KB/s and answers pings only when it reaches them is not cut by the heartbeat."""
    stream = "steady-heartbeat"
    chunk = "z" * 1500
    total = 400  # ~600 KB: ~6 s of reading, several heartbeats, each ping ~3 s behind data
    config = config_factory(server={"heartbeat_s": 1.0}, consumer={"max_queue_bytes": 64 * 1024})
    async with Relayd(config) as server, contextlib.AsyncExitStack() as stack:
        steady = await raw_ws(server, f"/v1/streams/{stream}/ws?token={server.token()}")
        await stack.enter_async_context(steady)
        gate: asyncio.Queue[int] = asyncio.Queue()
        steady.gate = gate

        async def feed() -> None:
            while True:  # the client's own reading pace, not a synchronisation
                gate.put_nowait(2048)
                await asyncio.sleep(0.02)

        async def registered() -> bool:
            return server.relay._hub.subscriber_count(stream) == 1

        await poll_until(registered, "the subscription")
        # relayd's kernel may hold ~256 KB for it: a ping written now waits ~3 s to be read
        owner = server.relay._hub._subs[stream][0].owner
        sock = owner.ws._req.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
        producer = await server.producer()
        await producer.open(stream)
        async with background(steady.follow(stream, timeout=40.0), feed()) as (reader, _):
            await pump(producer, padded_appends(stream, total, chunk), window=16, per_message=4)
            await producer.end(stream)
            frames, end = await reader
        assert end["reason"] == "completed"
        assert data_of(frames) == list(range(1, total + 1))
        for reason in ("slow_consumer", "heartbeat_timeout"):
            assert await metric(server, f'relayd_forced_closes_total{{reason="{reason}",role="consumer_ws"}}') == 0
        await producer.ws.close()


async def test_a_silent_idle_peer_is_still_closed_by_the_heartbeat(config_factory: ConfigFactory) -> None:
    """An idle consumer that never answers a ping is closed one heartbeat and a half after it went quiet."""
    config = config_factory(server={"heartbeat_s": 0.3})
    async with Relayd(config) as server:
        async with await raw_ws(server, f"/v1/streams/idle/ws?token={server.token()}"):

            async def closed() -> bool:
                return await gone(server, "consumer_ws")

            await poll_until(closed, "the heartbeat to close the silent consumer", timeout=5.0)
        assert await metric(server, 'relayd_forced_closes_total{reason="heartbeat_timeout",role="consumer_ws"}') == 1


async def _bystander_latency(server: Relayd, stream: str, stop: asyncio.Event) -> list[float]:
    """Round trips append -> delivery on another stream, one at a time, until ``stop``."""
    consumer = await server.consumer(stream)
    await consumer.expect("subscribed")
    producer = await server.producer()
    await producer.open(stream)
    seconds: list[float] = []
    seq = 0
    while not stop.is_set():
        seq += 1
        started = time.monotonic()
        await producer.send({"op": "append", "stream": stream, "seq": seq, "chunk": seq})
        await consumer.expect("chunk")
        seconds.append(time.monotonic() - started)
        await producer.expect("ack")
    await producer.ws.close()
    await consumer.ws.close()
    return seconds


@pytest.mark.parametrize(
    ("role", "line"),
    [
        ("consumer_ws", orjson.dumps({"op": "ping", "id": "p" * 200})),
        ("consumer_ws", b"1"),
        ("producer", orjson.dumps({"op": "ping", "id": "p" * 200})),
        ("producer", b"1"),
    ],
    ids=["consumer-pings", "consumer-junk", "producer-pings", "producer-junk"],
)
async def test_a_peer_that_floods_requests_and_never_reads_is_closed_in_bounded_memory(
    config_factory: ConfigFactory, role: str, line: bytes
) -> None:
    """Pings and junk lines earn replies; unread, they are bounded in bytes, the peer is closed, others keep pace."""
    config = config_factory(consumer={"max_queue_bytes": 64 * 1024}, limits={"max_unacked_bytes": 64 * 1024})
    async with Relayd(config) as server:
        if role == "producer":
            flooder = await raw_ws(server, "/v1/ingest", headers=f"Authorization: Bearer {API_KEY}\r\n")
            per_message = (1024 * 1024 - 1) // (len(line) + 1)
        else:
            flooder = await raw_ws(server, f"/v1/ws?token={server.token()}")
            per_message = (64 * 1024 - 1) // (len(line) + 1)
        message = text_message(b"\n".join([line] * per_message))
        stop = asyncio.Event()
        async with background(_bystander_latency(server, "bystander", stop)) as (bystander,):
            before = rss_bytes()
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < 64 * 1024 * 1024:  # 64 MiB of requests, unless relayd closes it first
                    flooder.writer.write(message)
                    await flooder.writer.drain()
                    sent += len(message)

            async def closed() -> bool:  # the bystander has a connection of this role too
                return await metric(server, f'relayd_connections{{role="{role}"}}') == 1

            await poll_until(closed, "relayd to close the flooding peer")
            grown = rss_bytes() - before
            stop.set()
            seconds = await bystander
        await flooder.close()
        assert sent < 64 * 1024 * 1024, "relayd kept reading a peer that reads none of its replies"
        assert grown < 24 * 1024 * 1024, f"relayd grew by {grown / 2**20:.0f} MiB"
        assert await metric(server, f'relayd_forced_closes_total{{reason="queue_full",role="{role}"}}') == 1
        assert seconds and max(seconds) < 0.5, f"another stream waited {max(seconds):.2f} s"


async def test_a_ping_id_is_bounded(relayd: Relayd) -> None:
    """A ping whose id would make a large pong is refused with bad_frame; a small one is echoed."""
    consumer = await relayd.consumer(None)
    await consumer.send({"op": "ping", "id": "i" * 300})
    await consumer.expect("error", code="bad_frame")
    await consumer.send({"op": "ping", "id": "i" * 200})
    await consumer.expect("pong", id="i" * 200)
    producer = await relayd.producer()
    await producer.send({"op": "ping", "id": ["x" * 300]})
    await producer.expect("error", code="bad_frame")
    await consumer.ws.close()
    await producer.ws.close()


# --- one publication, many connections ---------------------------------------------------------


async def test_one_tick_frames_a_batch_once_for_every_connection_that_queued_it() -> None:
    """Outboxes flushed in one tick with the same batch get one message built once, byte for
    byte; an outbox with another batch gets its own; big payloads get the longer length forms."""
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    framed: list[list[bytes]] = []

    def framer(batch: list[bytes]) -> bytes:  # one pure function shared by every outbox, counted
        framed.append(batch)
        return ws_text_frame(batch)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    ends = [await accepted.get() for _ in clients]  # relayd's side of each connection
    outboxes = [Outbox(_never, 1 << 20, 10.0, None, framer=framer, write_frame=end.transport.write) for end in ends]
    pub, control, medium, big = b'{"i":1}', b'{"type":"pong"}', b'"' + b"m" * 300 + b'"', b'"' + b"b" * 70_000 + b'"'
    a, c, b, d, e = outboxes  # queued in this order: a and c share a batch, b, d and e do not
    assert a.offer(pub, 1) and c.offer(pub, 1)
    b.control(control)
    assert b.offer(pub, 1) and d.offer(medium, 1) and e.offer(big, 1)
    for outbox in outboxes:
        await outbox.flush(5.0)
    assert framed == [[pub], [control, pub], [medium], [big]]  # c reused a's message

    async def message(reader: asyncio.StreamReader) -> bytes:
        b0, b1 = await reader.readexactly(2)
        assert b0 == 0x81 and not b1 & 0x80  # one unmasked, unfragmented text frame
        n = b1 & 0x7F
        if n >= 126:
            n = int.from_bytes(await reader.readexactly(2 if n == 126 else 8), "big")
        return await reader.readexactly(n)

    got = [await message(reader) for reader, _ in clients]
    assert got == [pub, pub, b"\n".join([control, pub]), medium, big]  # the clients of a, c, b, d, e
    for outbox in outboxes:
        assert outbox.written > 0 and outbox.chunks_written == 1
        outbox.close()
    for writer in [*ends, *(writer for _, writer in clients)]:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def _never(batch: list[bytes]) -> None:
    raise AssertionError("the fast path writes every batch here")


async def test_a_fan_out_reaches_every_reader_intact_while_a_stalled_one_falls_back_and_catches_up(
    config_factory: ConfigFactory,
) -> None:
    """One stream to many consumers: each reading one gets every chunk once, in order, the same
    bytes as the others (small, 16-bit and 64-bit websocket lengths); one that reads nothing
    meanwhile is held to its queue, reads the rest from Redis, and gets everything once too."""
    stream = "fan"
    config = config_factory(consumer={"max_queue_bytes": 64 * 1024, "send_timeout_ms": 30_000})
    sizes = [1, 300, 70_000]
    total = 45
    expected = [{"i": i, "pad": "x" * sizes[i % 3]} for i in range(1, total + 1)]
    async with Relayd(config) as server, contextlib.AsyncExitStack() as stack:
        path = f"/v1/streams/{stream}/ws?token={server.token()}"
        readers = [await stack.enter_async_context(await raw_ws(server, path, rcvbuf=256 * 1024)) for _ in range(12)]
        stalled = await stack.enter_async_context(await raw_ws(server, path))
        stalled.gate = asyncio.Queue()  # reads nothing until told

        async def registered() -> bool:
            return server.relay._hub.subscriber_count(stream) == 13

        await poll_until(registered, "the subscriptions")
        followed = [asyncio.create_task(r.follow(stream, timeout=30)) for r in readers]
        producer = await server.producer()
        await producer.open(stream)

        async def live() -> bool:  # the empty stream read: every chunk goes the live way from here
            return all(sub.state is State.LIVE for sub in server.relay._hub._subs[stream])

        await poll_until(live, "the subscriptions live")
        ops = [{"op": "append", "stream": stream, "seq": i, "chunk": c} for i, c in enumerate(expected, 1)]
        await pump(producer, ops, window=8, per_message=1)
        await producer.end(stream)
        results = await asyncio.gather(*followed)
        first = results[0][0]
        assert [f["data"] for f in first] == expected
        assert all(frames == first and end["reason"] == "completed" for frames, end in results)
        assert await metric(server, "relayd_consumer_catchups_total") >= 1  # the stalled one fell back
        stalled.gate.put_nowait(-1)  # now it reads freely
        frames, end = await stalled.follow(stream, timeout=30)
        assert [f["data"] for f in frames] == expected and end["reason"] == "completed"
        assert [f["cursor"] for f in frames] == [f["cursor"] for f in first]
        await producer.ws.close()
