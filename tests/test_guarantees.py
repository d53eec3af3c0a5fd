"""relayd's seven guarantees (README, "What relayd guarantees"), each against a real relayd, real sockets, real Valkey.

1 order, 2 no loss after ack (across a restart), 3 no duplicates, 4 durable first, 5 explicit
loss, 6 bounded memory, 7 bad input keeps the server serving. Synchronisation is on frames and
acks; where there is no event (Redis state, a metric, hub registration) a deadline-bounded poll.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from relayd.config import Config
from relayd.outbox import Outbox
from tests.helpers import ConnectionClosed, Peer, Relayd, poll_until

ConfigFactory = Callable[..., Config]


# --- local helpers ----------------------------------------------------------------------------


@pytest.fixture
async def rds(redis_server: str) -> Any:
    """An async redis-py client on the session's server (the test reads relayd's keys with it)."""
    client = aioredis.Redis.from_url(redis_server)
    try:
        yield client
    finally:
        await client.aclose()


def log_key(prefix: str, stream: str) -> str:
    return f"{prefix}:{{{stream}}}:log"


def meta_key(prefix: str, stream: str) -> str:
    return f"{prefix}:{{{stream}}}:meta"


def entry_id(cursor: str) -> str:
    """The Redis entry id behind a cursor of a chunk written before any takeover or end (the key
    layout is ``<generation>-<lane * 2^32 + offset>``, lane 0 until the first fence)."""
    gen, _, offset = cursor.partition("-")
    return f"{gen}-{int(offset)}"


def offset_of(entry: bytes | str) -> int:
    text = entry.decode() if isinstance(entry, bytes) else entry
    return int(text.partition("-")[2]) % 2**32  # the offset, without the lane


def gen_of(cursor: str) -> str:
    return cursor.partition("-")[0]


def appends_for(stream: str, first: int, last: int, sizes: tuple[int, ...] = (1,)) -> list[dict[str, Any]]:
    """Append ops carrying chunks ``{"i": first}`` .. ``{"i": last}``, cycling through ``sizes`` per op."""
    ops: list[dict[str, Any]] = []
    seq, k = first, 0
    while seq <= last:
        size = min(sizes[k % len(sizes)], last - seq + 1)
        ops.append({"op": "append", "stream": stream, "seq": seq, "chunks": [{"i": i} for i in range(seq, seq + size)]})
        seq += size
        k += 1
    return ops


async def pump(
    producer: Peer,
    ops: list[dict[str, Any]],
    *,
    window: int = 32,
    per_message: int = 4,
    on_ack: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Send append ops pipelined (at most ``window`` unanswered, ``per_message`` ops per websocket
    message); every answer must be the ack of its op, in order. Returns the acks."""
    credit = asyncio.Semaphore(window)
    acks: list[dict[str, Any]] = []

    async def read() -> None:
        for op in ops:
            ack = await producer.next()
            last_seq = op["seq"] + len(op.get("chunks", [op.get("chunk")])) - 1
            assert ack.get("type") == "ack" and ack["stream"] == op["stream"] and ack["seq"] == last_seq, (op, ack)
            acks.append(ack)
            credit.release()
            if on_ack is not None:
                on_ack(ack)

    async def write() -> None:
        for i in range(0, len(ops), per_message):
            group = ops[i : i + per_message]
            for _ in group:
                await credit.acquire()
            await producer.send(*group)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(read())
        tg.create_task(write())
    return acks


async def metric(server: Relayd, name: str) -> float:
    """Sum of a metric's samples from ``GET /metrics`` (0 when absent)."""
    assert server.session is not None
    async with server.session.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        body = await resp.text()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.asynccontextmanager
async def background(*coros: Awaitable[Any]) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Run coroutines as tasks for the block; whatever is still running when it exits is cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def follow(peer: Peer, stream: str, timeout: float = 15.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every frame of ``stream`` up to its end: (non-end frames, end frame); fails on an error."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await peer.next(timeout)
            if frame.get("stream") != stream or frame["type"] == "subscribed":
                continue
            assert frame["type"] != "error", frame
            if frame["type"] == "end":
                return frames, frame
            frames.append(frame)


def padded_appends(stream: str, total: int, pad: str) -> list[dict[str, Any]]:
    return [{"op": "append", "stream": stream, "seq": i, "chunk": {"i": i, "pad": pad}} for i in range(1, total + 1)]


def data_of(frames: list[dict[str, Any]]) -> list[int]:
    return [f["data"]["i"] for f in frames if f["type"] == "chunk"]


def assert_cursors_increase(frames: list[dict[str, Any]]) -> None:
    cursors = [f["cursor"] for f in frames if "cursor" in f and f["type"] in ("chunk", "end")]
    assert all(a < b for a, b in itertools.pairwise(cursors)), "cursors must strictly increase"


class RawWs:
    """A websocket client on a raw TCP socket with a tiny receive buffer, reading only when told.

    aiohttp would read ahead into its own queue; this one lets the kernel buffers fill, so
    relayd really sees a consumer that does not keep up.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.gate: asyncio.Queue[int] | None = None  # byte allowances; None: read freely
        self.received = 0

    @classmethod
    async def connect(cls, server: Relayd, path: str, rcvbuf: int = 4096) -> RawWs:
        host, port = server.config.server.host, server.server.port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        raw = cls(reader, writer)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return raw

    async def __aenter__(self) -> RawWs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            size = 65536
            if self.gate is not None:
                size = await self.gate.get()
                if size < 0:
                    self.gate = None
                    size = 65536
            data = await self.reader.read(size)
            if not data:
                raise ConnectionClosed(None, "EOF")
            self.received += len(data)
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        self.writer.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    async def message(self) -> bytes:
        """The next text message; ConnectionClosed(code) on a close frame, (None) on EOF."""
        while True:
            b0, b1 = await self._take(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self._take(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self._take(8))
            assert b0 & 0x80, "relayd does not fragment messages"
            payload = await self._take(length)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise ConnectionClosed(code, payload[2:].decode(errors="replace"))
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode in (0x1, 0x2):
                return payload

    async def frames_until_closed(self, timeout: float) -> tuple[list[dict[str, Any]], int | None]:
        frames: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.message()
                    frames.extend(orjson.loads(line) for line in message.split(b"\n") if line.strip())
        except (ConnectionClosed, ConnectionError) as exc:
            return frames, getattr(exc, "code", None)

    async def follow(self, stream: str, timeout: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                for line in (await self.message()).split(b"\n"):
                    if not line.strip():
                        continue
                    frame = orjson.loads(line)
                    if frame.get("stream") != stream or frame["type"] == "subscribed":
                        continue
                    assert frame["type"] != "error", frame
                    if frame["type"] == "end":
                        return frames, frame
                    frames.append(frame)


def watch_outbox(server: Relayd, stream: str) -> list[Outbox]:
    """The outboxes subscribed to ``stream``: their ``peak`` is the most they ever queued."""
    return [sub.outbox for sub in server.relay._hub._subs[stream]]


# --- 1. order -----------------------------------------------------------------------------------


async def test_order_of_many_batched_multi_chunk_appends(config_factory: ConfigFactory) -> None:
    """A live and a replaying consumer get each of three multiplexed streams in append order."""
    async with Relayd(config_factory(batch={"linger_ms": 1.0})) as server:
        streams = ["ord-a", "ord-b", "ord-c"]
        live = {s: await server.consumer(s) for s in streams}
        producer = await server.producer()
        for s in streams:
            assert (await producer.open(s))["type"] == "opened"
        per_stream = [appends_for(s, 1, 1500, sizes=(1, 3, 7, 2, 5)) for s in streams]
        ops = [op for group in zip(*per_stream, strict=False) for op in group]  # interleave the streams
        batch_counts_before = await metric(server, "relayd_redis_batch_size_count")
        await pump(producer, ops, window=96, per_message=6)
        for s in streams:
            assert (await producer.end(s))["type"] == "ended"
        # several appends really went to Redis per pipeline
        commands = await metric(server, "relayd_redis_batch_size_sum")
        batches = await metric(server, "relayd_redis_batch_size_count") - batch_counts_before
        assert commands / batches > 2, (commands, batches)
        for s in streams:
            frames, end = await follow(live[s], s)
            assert data_of(frames) == list(range(1, 1501))
            assert_cursors_increase([*frames, end])
            replay = await server.consumer(s)
            frames, end = await follow(replay, s)
            assert data_of(frames) == list(range(1, 1501))
            assert end["reason"] == "completed"
            assert_cursors_increase([*frames, end])
            await replay.ws.close()
            await live[s].ws.close()
        await producer.ws.close()


# --- 2. no loss after ack, across a restart ------------------------------------------------------


async def test_acknowledged_chunks_survive_a_relayd_restart(config_factory: ConfigFactory, rds: Any) -> None:
    """Everything acked before a restart is served by the next relayd; producer and consumer resume exactly."""
    config = config_factory()
    stream = "restart-1"
    first = Relayd(config)
    await first.__aenter__()
    try:
        live = await first.consumer(stream)
        await live.expect("subscribed", stream=stream)
        early = await first.consumer(stream)  # reads 60 chunks, then goes away before the restart
        await early.expect("subscribed", stream=stream)
        producer = await first.producer()
        opened = await producer.open(stream)
        epoch = opened["epoch"]
        await pump(producer, appends_for(stream, 1, 100, sizes=(2,)))
        early_frames = [await early.expect("chunk") for _ in range(60)]
        await early.ws.close()
        live_frames: list[dict[str, Any]] = []

        async def read_live() -> int | None:
            try:
                while True:
                    frame = await live.next(15.0)
                    if frame["type"] == "chunk":
                        live_frames.append(frame)
            except ConnectionClosed as exc:
                return exc.code

        async with background(read_live()) as (live_reader,):
            # a burst still in flight when relayd stops (a graceful stop, as on SIGTERM): only acks promise
            await producer.send(*appends_for(stream, 101, 160, sizes=(3,)))
            async with background(first.server.stop()) as (stopping,):
                acked = 100
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        frame = await producer.next()
                        assert frame["type"] == "ack", frame
                        assert frame["seq"] > acked
                        acked = frame["seq"]
                await stopping
            assert producer.ws.close_code == 1012  # service restart: reconnect
            assert await live_reader == 1012
    finally:
        await first.__aexit__(None, None, None)

    async with Relayd(config) as second:
        # every acknowledged chunk is there, before any producer comes back
        fresh = await second.consumer(stream)
        await fresh.expect("subscribed", stream=stream)
        before: list[dict[str, Any]] = []
        while len(before) < acked:
            frame = await fresh.next()
            assert frame["type"] == "chunk", frame
            before.append(frame)
        assert data_of(before) == list(range(1, acked + 1))

        # the live consumer, and the one that left early, resume from their last cursors on the new instance
        resumed = await second.consumer(stream, cursor=live_frames[-1]["cursor"])
        early_resumed = await second.consumer(stream, cursor=early_frames[-1]["cursor"])

        # the producer resumes its epoch: relayd says what it stored, the producer goes on from there
        producer = await second.producer()
        opened = await producer.open(stream, epoch=epoch)
        assert opened["type"] == "opened" and opened["epoch"] == epoch
        stored = opened["seq"]
        assert acked <= stored <= 160
        if stored == acked:
            assert opened["cursor"] == before[-1]["cursor"]
        else:  # the burst's tail reached Redis though its ack never reached the producer
            assert opened["cursor"] > before[-1]["cursor"]
        # resend from an already-acked point (idempotent), then new chunks
        await pump(producer, appends_for(stream, acked - 5, 200, sizes=(4,)))
        assert (await producer.end(stream))["type"] == "ended"

        rest, end = await follow(fresh, stream)
        assert data_of(before) + data_of(rest) == list(range(1, 201))
        assert_cursors_increase([*before, *rest, end])
        frames, end2 = await follow(resumed, stream)
        assert [f["type"] for f in frames] == ["chunk"] * len(frames)  # no gap, no reset
        assert data_of(live_frames) + data_of(frames) == list(range(1, 201))
        assert end2 == end
        frames, _ = await follow(early_resumed, stream)
        assert [f["type"] for f in frames] == ["chunk"] * len(frames)
        assert data_of(early_frames) + data_of(frames) == list(range(1, 201))
        assert await rds.xlen(log_key(config.redis.key_prefix, stream)) == 201
        for peer in (fresh, resumed, early_resumed, producer):
            await peer.ws.close()


# --- 3. no duplicates ----------------------------------------------------------------------------


async def test_resent_and_overlapping_appends_are_stored_once(relayd: Relayd, key_prefix: str, rds: Any) -> None:
    """Resending acked appends stores nothing twice, an overlapping resend stores only its tail."""
    stream = "dup-1"
    key = log_key(key_prefix, stream)
    live = await relayd.consumer(stream)
    await live.expect("subscribed")
    producer = await relayd.producer()
    await producer.open(stream)
    ack5 = await producer.append(stream, 1, *[{"i": i} for i in range(1, 6)])
    ack10 = await producer.append(stream, 6, *[{"i": i} for i in range(6, 11)])
    assert (ack5["seq"], ack10["seq"]) == (5, 10)
    assert await rds.xlen(key) == 10

    # the same appends again, even with other content: acked again, identical cursors, nothing stored
    again5 = await producer.append(stream, 1, *[{"i": -i} for i in range(1, 6)])
    assert again5 == ack5
    again10 = await producer.append(stream, 6, *[{"i": i} for i in range(6, 11)])
    assert again10 == ack10
    again_one = await producer.append(stream, 3, {"i": 3})
    assert again_one["type"] == "ack" and again_one["seq"] == 3
    assert await rds.xlen(key) == 10

    # overlapping: 8..13 when 10 is stored -> only 11..13 are new
    overlap = await producer.append(stream, 8, *[{"i": i} for i in range(8, 14)])
    assert overlap["seq"] == 13
    assert await rds.xlen(key) == 13

    # a reconnected producer resumes its epoch and resends with overlap
    await producer.ws.close()
    producer = await relayd.producer()
    opened = await producer.open(stream, epoch=1)
    assert opened["seq"] == 13 and opened["cursor"] == overlap["cursor"]
    ack = await producer.append(stream, 12, *[{"i": i} for i in range(12, 16)])
    assert ack["seq"] == 15
    await producer.end(stream)

    rows = await rds.xrange(key)
    assert [offset_of(entry) for entry, _ in rows] == list(range(1, 17))
    assert [orjson.loads(f[b"d"])["i"] for _, f in rows[:-1]] == list(range(1, 16))
    assert rows[-1][1][b"e"] == b"completed"

    frames, _ = await follow(live, stream)
    assert data_of(frames) == list(range(1, 16))
    fresh = await relayd.consumer(stream)
    frames, _ = await follow(fresh, stream)
    assert data_of(frames) == list(range(1, 16))
    for peer in (live, fresh, producer):
        await peer.ws.close()


async def test_a_producer_id_resumes_only_the_epoch_it_started(relayd: Relayd, key_prefix: str, rds: Any) -> None:
    """The recorded producer id is tied to its epoch: an epoch started without it (by a relayd that
    does not know producer ids, during a rolling upgrade) is not resumed by that id but taken over."""
    stream = "pid-epoch"
    async with await relayd.producer() as producer:
        assert (await producer.open(stream, producer="w1"))["epoch"] == 1
        await pump(producer, appends_for(stream, 1, 3))
        assert (await producer.open(stream, producer="w1"))["epoch"] == 1  # resumes, as its own
        meta = await rds.hgetall(meta_key(key_prefix, stream))
        assert meta[b"pid"] == b"w1" and meta[b"pidep"] == b"1", meta
        # a takeover as the previous open.lua does it: the epoch moves on, pid is left behind
        await rds.hset(meta_key(key_prefix, stream), mapping={"epoch": 2, "base": 3, "seq": 0})
        taken = await producer.open(stream, producer="w1")
        assert taken["epoch"] == 3 and taken["seq"] == 0, taken
        meta = await rds.hgetall(meta_key(key_prefix, stream))
        assert meta[b"pid"] == b"w1" and meta[b"pidep"] == b"3", meta
        assert (await producer.open(stream))["epoch"] == 4  # a takeover without an id forgets it
        assert b"pid" not in await rds.hgetall(meta_key(key_prefix, stream))


async def test_resume_from_any_cursor_gets_exactly_the_rest(relayd: Relayd) -> None:
    """A consumer resuming from a cursor gets exactly the chunks after it, then the end."""
    stream = "dup-resume"
    producer = await relayd.producer()
    await producer.open(stream)
    acks = await pump(producer, appends_for(stream, 1, 50))
    ended = await producer.end(stream)
    cursors = {ack["seq"]: ack["cursor"] for ack in acks}
    for after in (1, 2, 25, 49, 50):
        consumer = await relayd.consumer(stream, cursor=cursors[after])
        frames, end = await follow(consumer, stream)
        assert data_of(frames) == list(range(after + 1, 51)), after
        assert end["cursor"] == ended["cursor"]
        await consumer.ws.close()
    # from the end's own cursor: only the end again
    consumer = await relayd.consumer(stream, cursor=ended["cursor"])
    frames, end = await follow(consumer, stream)
    assert frames == [] and end["reason"] == "completed"
    await consumer.ws.close()
    await producer.ws.close()


@pytest.mark.parametrize("catchup_page", [7, 500])
async def test_consumers_joining_mid_stream_get_every_chunk_once(
    config_factory: ConfigFactory, catchup_page: int
) -> None:
    """Twenty consumers joining while 500 chunks are written each get every chunk once, in order."""
    stream = "handoff"
    total, joiners = 500, 20
    async with Relayd(config_factory(consumer={"catchup_page": catchup_page})) as server:
        thresholds = [k * total // joiners for k in range(joiners)]
        reached = [asyncio.Event() for _ in thresholds]
        cursor_at: dict[int, str | None] = {0: None}
        state = {"next": 0}

        def on_ack(ack: dict[str, Any]) -> None:
            while state["next"] < joiners and thresholds[state["next"]] <= ack["seq"]:
                cursor_at[state["next"]] = ack["cursor"]
                reached[state["next"]].set()
                state["next"] += 1

        reached[0].set()
        written = asyncio.Event()
        mid_stream: list[int] = []  # joiners that subscribed while chunks were still being written

        async def join(k: int) -> tuple[int, list[dict[str, Any]], str | None]:
            await reached[k].wait()
            cursor = cursor_at[k] if k % 2 else None  # odd joiners resume from the latest ack
            if k % 3 == 0:
                peer = await server.consumer(None)
                await peer.send({"op": "subscribe", "stream": stream, "cursor": cursor or ""})
            else:
                peer = await server.consumer(stream, cursor=cursor)
            try:
                await peer.expect("subscribed", stream=stream)
                if not written.is_set():
                    mid_stream.append(k)
                frames, _ = await follow(peer, stream)
            finally:
                await peer.ws.close()
            return k, frames, cursor

        async def produce() -> None:
            producer = await server.producer()
            await producer.open(stream)
            await pump(producer, appends_for(stream, 1, total, sizes=(1, 1, 2)), window=4, per_message=1, on_ack=on_ack)
            written.set()
            await producer.end(stream)
            await producer.ws.close()

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(join(k)) for k in range(joiners)]
            tg.create_task(produce())
        for task in tasks:
            k, frames, cursor = task.result()
            start = 1 if cursor is None else int(cursor.rpartition("-")[2]) + 1
            assert [f["type"] for f in frames] == ["chunk"] * len(frames), k
            assert data_of(frames) == list(range(start, total + 1)), f"joiner {k}"
        # the test really exercised both paths and the handoff between them
        assert len(mid_stream) >= joiners // 2, mid_stream
        assert await metric(server, 'relayd_chunks_delivered_total{path="live"}') > 0
        assert await metric(server, 'relayd_chunks_delivered_total{path="replay"}') > 0


# --- 4. durable first ---------------------------------------------------------------------------


async def test_every_delivered_chunk_is_already_in_redis(relayd: Relayd, key_prefix: str, rds: Any) -> None:
    """Each chunk a live consumer receives is found in Redis at the moment it is received."""
    stream = "durable"
    key = log_key(key_prefix, stream)
    consumers = [await relayd.consumer(stream) for _ in range(3)]
    producer = await relayd.producer()
    await producer.open(stream)

    async def check(peer: Peer) -> int:
        checked = 0
        while True:
            frame = await peer.next()
            if frame["type"] == "subscribed":
                continue
            if frame["type"] == "end":
                return checked
            assert frame["type"] == "chunk", frame
            rows = await rds.xrange(key, entry_id(frame["cursor"]), entry_id(frame["cursor"]))
            assert len(rows) == 1, f"{frame['cursor']} delivered before Redis had it"
            assert orjson.loads(rows[0][1][b"d"]) == frame["data"]
            checked += 1

    async def produce() -> None:
        await pump(producer, appends_for(stream, 1, 600, sizes=(1, 4, 2)), window=64, per_message=8)
        await producer.end(stream)

    async with asyncio.TaskGroup() as tg:
        checks = [tg.create_task(check(peer)) for peer in consumers]
        tg.create_task(produce())
    assert [c.result() for c in checks] == [600, 600, 600]
    for peer in (*consumers, producer):
        await peer.ws.close()


# --- 5. explicit loss ---------------------------------------------------------------------------


async def test_trimmed_history_is_announced_with_a_gap(
    config_factory: ConfigFactory, key_prefix: str, rds: Any
) -> None:
    """A consumer whose history was trimmed by the length cap gets a gap frame, then the oldest stored on."""
    stream = "trim"
    key = log_key(key_prefix, stream)
    async with Relayd(config_factory(streams={"max_chunks": 10})) as server:
        producer = await server.producer()
        await producer.open(stream)
        acks = await pump(producer, appends_for(stream, 1, 1000, sizes=(10,)), per_message=10)
        ended = await producer.end(stream)
        cursors = {ack["seq"]: ack["cursor"] for ack in acks}
        info = await rds.xinfo_stream(key)
        oldest = offset_of(info["first-entry"][0])
        assert oldest > 10, "Valkey did not trim: write more"  # MAXLEN ~ trims whole nodes only
        gen = gen_of(ended["cursor"])

        from_start = await server.consumer(stream)
        await from_start.expect("subscribed")
        gap = await from_start.expect("gap", stream=stream)
        assert entry_id(gap["next"]) == f"{gen}-{oldest}"
        assert gap["cursor"] < gap["next"]
        frames, end = await follow(from_start, stream)
        assert frames[0]["cursor"] == gap["next"]
        assert data_of(frames) == list(range(oldest, 1001))
        assert end["cursor"] == ended["cursor"]

        trimmed_cursor = cursors[10]
        resumed = await server.consumer(stream, cursor=trimmed_cursor)
        await resumed.expect("subscribed")
        gap = await resumed.expect("gap", stream=stream, cursor=trimmed_cursor)
        assert entry_id(gap["next"]) == f"{gen}-{oldest}"
        frames, _ = await follow(resumed, stream)
        assert data_of(frames) == list(range(oldest, 1001))

        # a cursor still inside the stored history: no gap, exactly the rest
        kept = await server.consumer(stream, cursor=cursors[990])
        frames, _ = await follow(kept, stream)
        assert [f["type"] for f in frames] == ["chunk"] * 10
        assert data_of(frames) == list(range(991, 1001))
        for peer in (from_start, resumed, kept, producer):
            await peer.ws.close()


async def test_replaced_stream_resets_an_old_cursor(relayd: Relayd, key_prefix: str, rds: Any) -> None:
    """A consumer with a cursor of a lost stream's old generation gets reset, then the new generation."""
    stream = "replaced"
    producer = await relayd.producer()
    await producer.open(stream)
    acks = await pump(producer, appends_for(stream, 1, 20))
    old_cursor = acks[9]["cursor"]
    # the stream expires (or Redis is flushed): both keys gone
    assert await rds.delete(log_key(key_prefix, stream), meta_key(key_prefix, stream)) == 2
    refused = await producer.append(stream, 21, {"i": 21})
    assert refused["type"] == "error" and refused["code"] == "stream_ended", refused

    again = await producer.open(stream)
    assert again["type"] == "opened" and again["seq"] == 0 and again["cursor"] is None
    await pump(producer, [{"op": "append", "stream": stream, "seq": 1, "chunks": [{"i": 101}, {"i": 102}]}])
    ended = await producer.end(stream)
    assert gen_of(ended["cursor"]) != gen_of(old_cursor)

    consumer = await relayd.consumer(stream, cursor=old_cursor)
    await consumer.expect("subscribed")
    await consumer.expect("reset", stream=stream, reason="stream_replaced")
    frames, end = await follow(consumer, stream)
    assert data_of(frames) == [101, 102]
    assert all(gen_of(f["cursor"]) == gen_of(ended["cursor"]) for f in frames)
    assert end["cursor"] == ended["cursor"]
    await consumer.ws.close()
    await producer.ws.close()


async def test_live_consumer_of_a_replaced_stream_is_reset(relayd: Relayd, key_prefix: str, rds: Any) -> None:
    """A consumer following a stream live when it is lost and created again gets reset, then the new generation."""
    stream = "replaced-live"
    consumer = await relayd.consumer(stream)
    await consumer.expect("subscribed")
    producer = await relayd.producer()
    await producer.open(stream)
    await pump(producer, appends_for(stream, 1, 5))
    for i in range(1, 6):
        assert (await consumer.expect("chunk"))["data"] == {"i": i}
    assert await rds.delete(log_key(key_prefix, stream), meta_key(key_prefix, stream)) == 2

    other = await relayd.producer()
    assert (await other.open(stream))["seq"] == 0
    await pump(other, [{"op": "append", "stream": stream, "seq": 1, "chunks": [{"i": 101}, {"i": 102}, {"i": 103}]}])
    ended = await other.end(stream)

    reset = await consumer.next(timeout=3.0)
    assert reset["type"] == "reset" and reset["reason"] == "stream_replaced", reset
    frames, end = await follow(consumer, stream, timeout=3.0)
    assert data_of(frames) == [101, 102, 103]
    assert end["cursor"] == ended["cursor"]
    for peer in (consumer, producer, other):
        await peer.ws.close()


async def test_vanished_stream_ends_in_stream_not_found(relayd: Relayd, key_prefix: str, rds: Any) -> None:
    """A consumer of a stream that is gone and not created again gets stream_not_found after wait_ms."""
    stream = "vanished"
    producer = await relayd.producer()
    await producer.open(stream)
    acks = await pump(producer, appends_for(stream, 1, 5))
    await producer.end(stream)
    await producer.ws.close()
    assert await rds.delete(log_key(key_prefix, stream), meta_key(key_prefix, stream)) == 2

    consumer = await relayd.consumer(None)
    for cursor in (acks[2]["cursor"], ""):
        started = time.monotonic()
        await consumer.send({"op": "subscribe", "stream": stream, "cursor": cursor, "wait_ms": 300})
        await consumer.expect("subscribed", stream=stream)
        error = await consumer.expect("error", stream=stream, code="stream_not_found")
        assert 0.3 <= time.monotonic() - started < 5.0, error
    # the connection is still usable
    await consumer.send({"op": "ping", "id": 7})
    await consumer.expect("pong", id=7)
    await consumer.ws.close()


# --- 6. bounded memory ---------------------------------------------------------------------------


def _kernel_send_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


async def test_consumer_that_never_reads_is_closed_4008_and_others_get_everything(
    config_factory: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer that stops reading is disconnected as slow_consumer within bounded memory; others are unaffected."""
    caplog.set_level(logging.INFO, logger="relayd")
    cap = 64 * 1024
    stream = "slow-never"
    config = config_factory(consumer={"send_timeout_ms": 500, "max_queue_bytes": cap})
    chunk = "x" * 10_000
    total = (2 * _kernel_send_buffer_max() + 4 * 1024 * 1024) // len(chunk)  # more than the kernel can buffer
    async with Relayd(config) as server, contextlib.AsyncExitStack() as stack:
        stuck = await RawWs.connect(server, f"/v1/streams/{stream}/ws?token={server.token()}")
        await stack.enter_async_context(stuck)
        good = await server.consumer(stream)
        await good.expect("subscribed")
        hub = server.relay._hub

        async def both_registered() -> bool:
            return hub.subscriber_count(stream) == 2

        await poll_until(both_registered, "both subscriptions")
        peaks = watch_outbox(server, stream)
        producer = await server.producer()
        await producer.open(stream)
        ops = padded_appends(stream, total, chunk)
        async with background(follow(good, stream, timeout=30.0)) as (good_task,):
            await pump(producer, ops, window=64, per_message=8)
            await producer.end(stream)
            frames, _ = await good_task
        assert data_of(frames) == list(range(1, total + 1))

        async def disconnected() -> bool:
            return await metric(server, "relayd_slow_consumer_disconnects_total") >= 1

        await poll_until(disconnected, "the slow consumer to be closed")
        # what the stuck consumer got, read now: a clean prefix, then the close (4008) or EOF after the abort
        got, code = await stuck.frames_until_closed(timeout=10.0)
        assert code in (4008, None)
        assert {f["type"] for f in got} <= {"subscribed", "chunk"}, "no gap or reset for a consumer that only stalls"
        chunks = data_of(got)
        assert chunks == list(range(1, len(chunks) + 1))
        assert len(chunks) < total
        assert stuck.received < total * len(chunk)
        assert any("code=4008" in r.getMessage() for r in caplog.records), "no log line for the 4008 close"
        frame_overhead = 200
        for outbox in peaks:
            assert outbox.peak <= outbox._max_bytes + len(chunk) + frame_overhead, (outbox.peak, outbox._max_bytes)
        await good.ws.close()
        await producer.ws.close()


async def test_slow_reader_catches_up_from_redis_without_gap_or_duplicate(config_factory: ConfigFactory) -> None:
    """A consumer reading far slower than the producer writes gets everything once, via catch-up, in bounded memory."""
    cap = 64 * 1024
    stream = "slow-reader"
    chunk = "y" * 10_000
    total = 300
    async with (
        Relayd(config_factory(consumer={"max_queue_bytes": cap})) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        slow = await RawWs.connect(server, f"/v1/streams/{stream}/ws?token={server.token()}")
        await stack.enter_async_context(slow)
        slow.gate = asyncio.Queue()
        hub = server.relay._hub

        async def registered() -> bool:
            return hub.subscriber_count(stream) == 1

        await poll_until(registered, "the subscription")
        peaks = watch_outbox(server, stream)
        catchups = await metric(server, "relayd_consumer_catchups_total")
        producer = await server.producer()
        await producer.open(stream)
        ops = padded_appends(stream, total, chunk)
        gate = slow.gate
        async with background(slow.follow(stream, timeout=30.0)) as (reader,):
            # the reader may take 2 KB per 10 KB chunk acknowledged while the producer runs, then reads freely
            await pump(producer, ops, window=16, per_message=4, on_ack=lambda ack: gate.put_nowait(2048))
            await producer.end(stream)
            gate.put_nowait(-1)
            frames, end = await reader
        assert end["reason"] == "completed"
        assert [f["type"] for f in frames] == ["chunk"] * total
        assert data_of(frames) == list(range(1, total + 1))
        assert await metric(server, "relayd_consumer_catchups_total") > catchups
        for outbox in peaks:
            assert outbox.peak <= outbox._max_bytes + len(chunk) + 200, (outbox.peak, outbox._max_bytes)
        await producer.ws.close()


# --- 7. bad input ------------------------------------------------------------------------------


async def test_bad_input_gets_errors_while_others_are_served(
    config_factory: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage and oversized frames get error frames or a 1009 close and a log line; other clients are unaffected."""
    caplog.set_level(logging.INFO, logger="relayd")
    limits = {"max_frame_bytes": 64 * 1024, "max_chunk_bytes": 8 * 1024}
    async with Relayd(config_factory(limits=limits)) as server:
        stream = "bystander"
        watcher = await server.consumer(stream)
        await watcher.expect("subscribed")
        good = await server.producer()
        await good.open(stream)
        bystanders = (
            follow(watcher, stream),
            pump(good, appends_for(stream, 1, 2000, sizes=(3,)), window=8, per_message=2),
        )
        async with background(*bystanders) as (watch_task, good_task):
            bad = await server.producer()
            assert (await bad.open("bad-own"))["type"] == "opened"
            assert (await bad.open("bad-text", content_type="text"))["type"] == "opened"
            cases: list[tuple[str | bytes, str]] = [
                ("this is not json", "bad_frame"),
                ("[1, 2, 3]", "bad_frame"),
                ("{}", "unknown_op"),
                ('{"op": "explode"}', "unknown_op"),
                (b"\xff\xfe\x00garbage", "bad_frame"),
                ('{"op": "open", "stream": "has space"}', "invalid_stream_id"),
                ('{"op": "open", "stream": "ok", "epoch": -1}', "bad_frame"),
                ('{"op": "append", "stream": "bad-own", "seq": "one", "chunk": 1}', "bad_frame"),
                ('{"op": "append", "stream": "bad-own", "seq": 1}', "bad_frame"),
                ('{"op": "append", "stream": "never-opened", "seq": 1, "chunk": 1}', "not_open"),
                ('{"op": "append", "stream": "bad-own", "seq": 5, "chunk": 1}', "seq_gap"),
                ('{"op": "append", "stream": "bad-text", "seq": 1, "chunk": {"a": 1}}', "content_type"),
                (
                    orjson.dumps({"op": "append", "stream": "bad-own", "seq": 1, "chunk": "z" * 9000}).decode(),
                    "chunk_too_large",
                ),
                ('{"op": "end", "stream": "bad-own", "reason": "exploded"}', "bad_frame"),
            ]
            for data, code in cases:
                await bad.send_raw(data)
                error = await bad.expect("error", code=code)
                assert error["message"], error
            # several lines in one message: each answered, in order, good ones still work
            await bad.send_raw(
                'nope\n{"op": "append", "stream": "bad-own", "seq": 1, "chunk": {"ok": 1}}\n{"op": "ping"}'
            )
            await bad.expect("error", code="bad_frame")
            answers = [await bad.next(), await bad.next()]  # a pong need not wait for Redis as the ack does
            assert sorted(a["type"] for a in answers) == ["ack", "pong"], answers
            assert next(a for a in answers if a["type"] == "ack")["seq"] == 1

            # a consumer sending garbage gets errors and keeps its connection
            noisy = await server.consumer(None)
            for data, code in [("{{{", "bad_frame"), ('{"op": "dance"}', "unknown_op")]:
                await noisy.send_raw(data)
                await noisy.expect("error", code=code)
            await noisy.send({"op": "subscribe", "stream": "no spaces allowed"})
            await noisy.expect("error", code="invalid_stream_id")
            await noisy.send({"op": "ping", "id": 1})
            await noisy.expect("pong", id=1)

            # an oversized message closes that connection with 1009, and only that one
            await bad.send_raw("x" * (64 * 1024 + 1))
            assert await bad.closed() == 1009

            await good_task
            assert (await good.end(stream))["type"] == "ended"
            frames, _ = await watch_task
            assert data_of(frames) == list(range(1, 2001))
        # the server still accepts new work
        fresh = await server.producer()
        assert (await fresh.open("after"))["type"] == "opened"
        malformed = [code for _, code in cases if code not in ("not_open", "seq_gap")]  # refused by the codec
        assert await metric(server, "relayd_bad_frames_total") >= len(malformed) + 4

        # and a log line: the first refusal of each connection, the count when it closes, the oversize
        def logged(*parts: str) -> bool:
            return any(all(p in r.getMessage() for p in parts) for r in caplog.records if r.name.startswith("relayd"))

        assert logged("producer", "refused frame", "bad_frame"), "no log line for a producer's refused frame"
        assert logged("consumer", "refused frame", "bad_frame"), "no log line for a consumer's refused frame"
        assert logged(str(64 * 1024 + 1)), "no log line for the oversized message"

        async def close_logged() -> bool:
            return logged("producer closed", f"refused={len(malformed) + 1}")

        await poll_until(close_logged, "the bad producer's close line")
        for peer in (fresh, noisy, good, watcher):
            await peer.ws.close()


async def test_slow_but_steady_reader_is_not_closed_as_slow_consumer(config_factory: ConfigFactory) -> None:
    """A consumer that keeps reading, slower than one queue per send timeout, is never closed with 4008."""
    stream = "steady"
    chunk = "z" * 1500
    total = 400  # ~600 KB through a reader that takes ~100 KB/s: every write waits far past the timeout
    consumer_cfg = {"max_queue_bytes": 64 * 1024, "send_timeout_ms": 100}
    async with (
        Relayd(config_factory(consumer=consumer_cfg)) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        steady = await RawWs.connect(server, f"/v1/streams/{stream}/ws?token={server.token()}")
        await stack.enter_async_context(steady)
        gate: asyncio.Queue[int] = asyncio.Queue()
        steady.gate = gate

        async def feed() -> None:
            while True:  # the client's own reading pace, not a synchronisation
                gate.put_nowait(2048)
                await asyncio.sleep(0.02)

        hub = server.relay._hub

        async def registered() -> bool:
            return hub.subscriber_count(stream) == 1

        await poll_until(registered, "the subscription")
        # A constrained link: a small kernel send buffer on relayd's side, so writes really wait.
        owner = hub._subs[stream][0].owner
        sock = owner.ws._req.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        slow_before = await metric(server, "relayd_slow_consumer_disconnects_total")
        producer = await server.producer()
        await producer.open(stream)
        async with background(steady.follow(stream, timeout=40.0), feed()) as (reader, feeder):
            await pump(producer, padded_appends(stream, total, chunk), window=16, per_message=4)
            await producer.end(stream)
            frames, end = await reader
            feeder.cancel()
        assert end["reason"] == "completed"
        assert data_of(frames) == list(range(1, total + 1))
        assert await metric(server, "relayd_slow_consumer_disconnects_total") == slow_before
        await producer.ws.close()
