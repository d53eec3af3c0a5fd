#!/usr/bin/env python3
"""The yardstick: a minimal relay on relayd's wire protocol, the floor relayd is measured against.

It speaks the subset of docs/protocol.md that the benchmarks use, with the same frames byte for
byte, so ``fleet.py --target yardstick`` runs every workload unchanged:

- producers, ``GET /v1/ingest``: ``open`` (answered ``opened`` at once, epoch 1, seq 0),
  ``append`` with ``chunk`` or ``chunks`` (each chunk ``orjson.loads`` / ``dumps``-ed, as relayd
  does, and ``XADD``-ed; one ``ack`` per append once Redis has its chunks), ``end`` (an ``XADD``
  of the end; ``ended`` once Redis has it), ``ping``;
- consumers, ``GET /v1/streams/{id}/ws[?cursor=]``: ``subscribed``, then the history after the
  cursor read with ``XRANGE`` in pages (500 entries, relayd's ``consumer.catchup_page``), then
  the live tail with no gap and no duplicate at the handoff, then ``end``; cursors are relayd's
  (``<generation>-<offset, 10 digits>``), and so are the Redis entry ids (``<generation>-<offset>``).

What it does per chunk, and nothing more: every ``XADD`` issued during one event-loop iteration
goes out in one pipelined write on one Redis connection (hand-encoded RESP, hiredis parses the
replies); when a reply arrives the chunk is durable, its frame is built once and, per stream and
per batch of replies, the frames are joined into one websocket message that is written to every
subscriber's transport; each producer connection gets its acks of that batch in one message.

What it does not do (it is a floor, not a product): no dedupe by sequence number, no epochs or
fencing, no stream metadata or expiry, no auth (any key or token is accepted), no flow control
and no bound on any queue (a slow consumer grows the transport's buffer), no scale-out. It uses
relayd's garbage-collector settings (``gc.freeze`` and a young-generation threshold of 50 000),
so that it does not lose to relayd on a knob rather than on work.

    python benchmarks/yardstick.py --port 8090 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import secrets
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import hiredis
import orjson
import uvloop
from aiohttp import WSMsgType, web

NOT_ENOUGH_DATA: Any = object()  # what hiredis returns for an incomplete reply (None is a nil reply)


def ws_text(payload: bytes) -> bytes:
    """A server websocket text frame: unmasked, uncompressed, one write."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Redis(asyncio.Protocol):
    """One Redis connection. Commands sent during a loop iteration go out in one write; each reply
    is handed to its command's ``(fn, arg)`` in order, then ``after_replies`` runs once per read."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.waiting: deque[tuple[Callable[[Any, Any], None], Any]] = deque()
        self.scheduled = False
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.after_replies: Callable[[], None] = lambda: None
        self.writes = 0
        self.commands = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, command: bytes, fn: Callable[[Any, Any], None], arg: Any) -> None:
        self.out.append(command)
        self.waiting.append((fn, arg))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        self.writes += 1
        self.commands += len(self.out)
        assert self.transport is not None
        self.transport.write(b"".join(self.out))
        self.out.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting, gets = self.waiting, self.reader.gets
        while (reply := gets()) is not NOT_ENOUGH_DATA:
            fn, arg = waiting.popleft()
            fn(arg, reply)
        self.after_replies()

    def call(self, *args: bytes) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.send(resp(*args), _resolve, fut)
        return fut


def _resolve(fut: asyncio.Future[Any], reply: Any) -> None:
    if not fut.done():
        fut.set_result(reply)


class Peer:
    """One websocket connection's transport; replies of one batch are joined into one message."""

    __slots__ = ("held", "pending", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.pending: list[bytes] = []  # producer replies of the current batch
        self.held: list[bytes] | None = None  # consumer catching up: live frames wait here

    def write(self, frames: list[bytes]) -> None:
        if frames and not self.transport.is_closing():
            self.transport.write(ws_text(b"\n".join(frames)))


class Stream:
    __slots__ = ("batch", "durable", "end", "gen", "head", "key", "offset", "sid", "sid_json", "subs")

    def __init__(self, sid: str, key_prefix: bytes) -> None:
        self.sid = sid
        self.sid_json = orjson.dumps(sid)
        self.key = key_prefix + sid.encode()
        self.gen = time.time_ns() // 1_000_000
        self.offset = 0  # the last offset given to an XADD
        self.durable = 0  # the last offset Redis acknowledged (chunk or end)
        self.end: int | None = None  # the end's offset once durable
        self.subs: list[Peer] = []
        self.batch: list[bytes] = []  # frames made durable in the current batch of replies
        self.head = b'{"type":"chunk","stream":' + self.sid_json + b',"cursor":"'

    def cursor(self, offset: int) -> bytes:
        return b"%d-%010d" % (self.gen, offset)

    def end_frame(self, offset: int, reason: bytes) -> bytes:
        return b'{"type":"end","stream":%s,"cursor":"%s","reason":"%s"}' % (self.sid_json, self.cursor(offset), reason)


class Yardstick:
    def __init__(self, redis: Redis, key_prefix: bytes, page: int) -> None:
        self.redis = redis
        self.key_prefix = key_prefix
        self.page = page
        self.streams: dict[str, Stream] = {}
        self.dirty_streams: list[Stream] = []
        self.dirty_peers: list[Peer] = []
        self.chunks_in = 0
        self.delivered = 0
        self.sockets: set[web.WebSocketResponse] = set()
        redis.after_replies = self.flush

    def stream(self, sid: str) -> Stream:
        s = self.streams.get(sid)
        if s is None:
            s = self.streams[sid] = Stream(sid, self.key_prefix)
        return s

    # -- writes -------------------------------------------------------------------------------

    def append(self, peer: Peer, s: Stream, seq: int, chunks: list[bytes]) -> None:
        send, key, last = self.redis.send, s.key, len(chunks) - 1
        self.chunks_in += len(chunks)
        for n, data in enumerate(chunks):
            s.offset += 1
            entry = b"%d-%d" % (s.gen, s.offset)
            cmd = b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$1\r\nd\r\n$%d\r\n%s\r\n" % (
                len(key), key, len(entry), entry, len(data), data
            )  # fmt: skip
            send(cmd, self.on_chunk, (s, s.offset, data, peer if n == last else None, seq + last))

    def end(self, peer: Peer, s: Stream, reason: bytes) -> None:
        s.offset += 1
        entry = b"%d-%d" % (s.gen, s.offset)
        self.redis.send(resp(b"XADD", s.key, entry, b"e", reason), self.on_end, (s, s.offset, peer, reason))

    def on_chunk(self, arg: tuple[Stream, int, bytes, Peer | None, int], reply: Any) -> None:
        s, offset, data, peer, seq = arg
        if type(reply) is hiredis.ReplyError:
            if peer is not None:
                self.reply(peer, b'{"type":"error","code":"internal","message":%s}' % orjson.dumps(str(reply)))
            return
        s.durable = offset
        cursor = s.cursor(offset)
        if s.subs:
            if not s.batch:
                self.dirty_streams.append(s)
            s.batch.append(b'%s%s","data":%s}' % (s.head, cursor, data))
        if peer is not None:
            self.reply(peer, b'{"type":"ack","stream":%s,"seq":%d,"cursor":"%s"}' % (s.sid_json, seq, cursor))

    def on_end(self, arg: tuple[Stream, int, Peer, bytes], reply: Any) -> None:
        s, offset, peer, reason = arg
        s.durable = s.end = offset
        if s.subs:
            if not s.batch:
                self.dirty_streams.append(s)
            s.batch.append(s.end_frame(offset, reason))
        self.reply(
            peer,
            b'{"type":"ended","stream":%s,"reason":"%s","cursor":"%s"}' % (s.sid_json, reason, s.cursor(offset)),
        )

    def reply(self, peer: Peer, frame: bytes) -> None:
        if not peer.pending:
            self.dirty_peers.append(peer)
        peer.pending.append(frame)

    def flush(self) -> None:
        """After a read of Redis replies: one message per stream to each subscriber (built once),
        one message of acks per producer."""
        for s in self.dirty_streams:
            batch, s.batch = s.batch, []
            payload = ws_text(b"\n".join(batch))
            for sub in s.subs:
                if sub.held is not None:
                    sub.held.extend(batch)
                elif not sub.transport.is_closing():
                    sub.transport.write(payload)
            self.delivered += len(batch) * len(s.subs)
            if s.end is not None:  # the end went out: only subscribers still catching up remain
                s.subs = [sub for sub in s.subs if sub.held is not None]
        self.dirty_streams.clear()
        for peer in self.dirty_peers:
            frames, peer.pending = peer.pending, []
            peer.write(frames)
        self.dirty_peers.clear()

    # -- reads --------------------------------------------------------------------------------

    async def catch_up(self, s: Stream, sub: Peer, after: int) -> None:
        """History after ``after`` by XRANGE pages, then what arrived live meanwhile."""
        sub.held = []
        s.subs.append(sub)
        upto, first = s.durable, after + 1
        try:
            while first <= upto:
                entries = await self.redis.call(
                    b"XRANGE", s.key, b"%d-%d" % (s.gen, first), b"%d-%d" % (s.gen, upto), b"COUNT", b"%d" % self.page
                )
                if not entries:
                    break
                frames = []
                for entry_id, fields in entries:
                    offset = int(entry_id.rpartition(b"-")[2])
                    if fields[0] == b"d":
                        frames.append(b'%s%s","data":%s}' % (s.head, s.cursor(offset), fields[1]))
                    else:
                        frames.append(s.end_frame(offset, fields[1]))
                    first = offset + 1
                sub.write(frames)
                self.delivered += len(frames)
        finally:
            held, sub.held = sub.held, None
        sub.write(held)
        if s.end is not None:  # the end was in the history or in what was held
            with contextlib.suppress(ValueError):
                s.subs.remove(sub)


# -- handlers -----------------------------------------------------------------------------------

YS = web.AppKey("yardstick", Yardstick)


async def ingest(request: web.Request) -> web.StreamResponse:
    ys = request.app[YS]
    ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 22)
    await ws.prepare(request)
    assert request.transport is not None
    peer = Peer(request.transport)
    ys.sockets.add(ws)
    streams, loads, dumps = ys.streams, orjson.loads, orjson.dumps
    try:
        while True:
            msg = await ws.receive()
            if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
                break
            data = msg.data
            for line in data.split("\n") if "\n" in data else (data,):
                if not line:
                    continue
                try:
                    obj = loads(line)
                    op = obj["op"]
                    if op == "append":
                        s = streams[obj["stream"]]
                        chunks = [dumps(obj["chunk"])] if "chunk" in obj else [dumps(c) for c in obj["chunks"]]
                        ys.append(peer, s, obj["seq"], chunks)
                    elif op == "open":
                        s = ys.stream(obj["stream"])
                        cursor = b'"%s"' % s.cursor(s.durable) if s.durable else b"null"
                        status = b"open" if s.end is None else b"completed"
                        peer.write(
                            [
                                b'{"type":"opened","stream":%s,"epoch":1,"seq":0,"cursor":%s,"status":"%s",'
                                b'"content_type":"json"}' % (s.sid_json, cursor, status)
                            ]
                        )
                    elif op == "end":
                        ys.end(peer, streams[obj["stream"]], obj.get("reason", "completed").encode())
                    elif op == "ping":
                        peer.write([dumps({"type": "pong", "id": obj.get("id")})])
                    else:
                        raise ValueError(f"unknown op {op!r}")
                except Exception as exc:  # a floor: any bad line is one error frame
                    peer.write([dumps({"type": "error", "code": "bad_frame", "message": repr(exc)})])
    finally:
        ys.sockets.discard(ws)
    return ws


async def consume(request: web.Request) -> web.StreamResponse:
    ys = request.app[YS]
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    assert request.transport is not None
    sub = Peer(request.transport)
    s = ys.stream(request.match_info["stream"])
    after = 0
    gen, _, offset = request.query.get("cursor", "").partition("-")
    if offset and int(gen) == s.gen:
        after = int(offset)
    ys.sockets.add(ws)
    sub.write([b'{"type":"subscribed","stream":%s}' % s.sid_json])
    try:
        if s.durable > after:
            await ys.catch_up(s, sub, after)
        elif s.end is None:
            s.subs.append(sub)
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT and '"ping"' in msg.data:
                sub.write([b'{"type":"pong"}'])
            elif msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
                break
    finally:
        ys.sockets.discard(ws)
        with contextlib.suppress(ValueError):
            s.subs.remove(sub)
    return ws


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    ys = request.app[YS]
    # relayd's metric names, so the benchmark's scraper reads both
    text = (
        "# the yardstick (benchmarks/yardstick.py)\n"
        f"relayd_chunks_in_total {ys.chunks_in}\n"
        f"relayd_chunks_delivered_total {ys.delivered}\n"
        f"relayd_redis_batch_size_sum {ys.redis.commands}\n"
        f"relayd_redis_batch_size_count {ys.redis.writes}\n"
    )
    return web.Response(text=text)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    url = urlparse(args.redis_url)
    _, redis = await loop.create_connection(Redis, url.hostname or "127.0.0.1", url.port or 6379)
    if url.password:
        await redis.call(b"AUTH", *([url.username.encode()] if url.username else []), url.password.encode())
    if url.path.strip("/") not in ("", "0"):
        await redis.call(b"SELECT", url.path.strip("/").encode())
    ys = Yardstick(redis, f"{args.key_prefix}:".encode(), args.catchup_page)
    app = web.Application()
    app[YS] = ys
    app.router.add_get("/v1/ingest", ingest)
    app.router.add_get("/v1/streams/{stream:.+}/ws", consume)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    app.router.add_get("/metrics", metrics)

    async def close_sockets(_app: web.Application) -> None:
        await asyncio.gather(*(ws.close() for ws in list(ys.sockets)), return_exceptions=True)

    app.on_shutdown.append(close_sockets)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    gc.collect()  # relayd's settings (relayd/server.py tune_gc)
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"yardstick listening on {args.host}:{args.port}, Redis {args.redis_url}", flush=True)
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopped, redis.lost], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    await runner.cleanup()
    if redis.transport is not None:
        redis.transport.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--key-prefix", default=f"yardstick{secrets.token_hex(4)}", help="Redis keys: PREFIX:<stream>")
    ap.add_argument("--catchup-page", type=int, default=500, help="XRANGE entries per page (relayd's default)")
    uvloop.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
