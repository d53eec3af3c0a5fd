"""Measure what relayd and Redis need per connection, per subscription and per stored chunk.

Starts a private Valkey (the embedded server's binary, on a TCP port) and ``relayd serve`` as a
separate process, then:

1. **relayd memory per idle consumer websocket**: RSS of the relayd process (``VmRSS``) before
   and after opening ``--conns`` consumer websockets, each subscribed to one open stream;
2. **relayd memory per extra subscription**: RSS before and after ``--subs`` more subscriptions
   multiplexed on ``/v1/ws`` connections (``--subs-per-conn`` each);
3. **Redis memory per chunk**: ``MEMORY USAGE <key> SAMPLES 0`` of a stream's log and meta keys
   after writing ``--chunks`` chunks of a given JSON size, for several sizes.

    python benchmarks/sizing.py                    # defaults: 1000 conns, 10000 subs, 2000 chunks
    python benchmarks/sizing.py --conns 2000 --json

RSS deltas include allocator slack, so they are rounded up in docs/operations.md ("Sizing").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis

from relayd.auth import TokenAuthority
from relayd.embedded import EmbeddedRedis, free_port

API_KEY = "rk_sizing_key_0123456789abcdef"
JWT_SECRET = "sizing-secret-0123456789abcdef0123456789"
PREFIX = "sizing"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def settled_rss(pid: int, session: aiohttp.ClientSession, url: str) -> int:
    """RSS once relayd is idle: a request round trip, a short pause, the lower of two readings."""
    async with session.get(f"{url}/healthz") as resp:
        assert resp.status == 200
    readings = []
    for _ in range(2):
        await asyncio.sleep(0.5)  # a measurement pause, not a synchronisation
        readings.append(rss_bytes(pid))
    return min(readings)


async def open_streams(session: aiohttp.ClientSession, url: str, names: list[str]) -> aiohttp.ClientWebSocketResponse:
    """One producer connection holding every stream in ``names`` open (batched opens)."""
    ws = await session.ws_connect(f"{url}/v1/ingest", headers={"Authorization": f"Bearer {API_KEY}"})
    for start in range(0, len(names), 500):
        batch = names[start : start + 500]
        await ws.send_str("\n".join(orjson.dumps({"op": "open", "stream": s}).decode() for s in batch))
        got = 0
        while got < len(batch):
            msg = await ws.receive()
            got += sum(1 for line in msg.data.split("\n") if '"opened"' in line)
    return ws


async def wait_subscribed(ws: aiohttp.ClientWebSocketResponse, count: int) -> None:
    got = 0
    while got < count:
        msg = await ws.receive(timeout=30)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        got += sum(1 for line in msg.data.split("\n") if '"subscribed"' in line)


async def measure_connections(url: str, pid: int, conns: int, subs: int, per_conn: int) -> dict[str, Any]:
    tokens = TokenAuthority(secret=JWT_SECRET, max_ttl_s=86_400)
    token = tokens.mint(["*"], ["read"], ttl_s=3600)[0]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streams = [f"s{i}" for i in range(max(conns, subs))]
        empty = await settled_rss(pid, session, url)
        producer = await open_streams(session, url, streams)
        base = await settled_rss(pid, session, url)

        consumers = []
        for i in range(conns):
            ws = await session.ws_connect(f"{url}/v1/streams/{streams[i]}/ws", params={"token": token})
            consumers.append(ws)
        await asyncio.gather(*(wait_subscribed(ws, 1) for ws in consumers))
        with_conns = await settled_rss(pid, session, url)

        mux = []
        for start in range(0, subs, per_conn):
            ws = await session.ws_connect(f"{url}/v1/ws", params={"token": token})
            names = streams[start : start + per_conn]
            await ws.send_str("\n".join(orjson.dumps({"op": "subscribe", "stream": s}).decode() for s in names))
            await wait_subscribed(ws, len(names))
            mux.append(ws)
        with_subs = await settled_rss(pid, session, url)

        for ws in [*consumers, *mux, producer]:
            await ws.close()
    mux_conns = len(mux)
    per_sub = (with_subs - with_conns) / subs
    # the multiplexed connections themselves cost what the idle ones did; the rest is the subscriptions
    per_conn_bytes = (with_conns - base) / conns
    per_extra_sub = (with_subs - with_conns - mux_conns * per_conn_bytes) / (subs - mux_conns)
    return {
        "rss_idle_mib": round(empty / 2**20, 1),
        "open_streams": len(streams),
        "bytes_per_open_stream": round((base - empty) / len(streams)),
        "rss_base_mib": round(base / 2**20, 1),
        "conns": conns,
        "rss_with_conns_mib": round(with_conns / 2**20, 1),
        "bytes_per_consumer_ws": round(per_conn_bytes),
        "subs": subs,
        "subs_per_conn": per_conn,
        "rss_with_subs_mib": round(with_subs / 2**20, 1),
        "bytes_per_subscription_raw": round(per_sub),
        "bytes_per_extra_subscription": round(per_extra_sub),
    }


async def write_stream(url: str, stream: str, chunks: int, chunk: Any) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{url}/v1/ingest", headers={"Authorization": f"Bearer {API_KEY}"}) as ws,
    ):
        await ws.send_str(orjson.dumps({"op": "open", "stream": stream}).decode())
        await ws.receive()
        for start in range(0, chunks, 100):
            n = min(100, chunks - start)
            # seq is the sequence number of the first chunk of the append
            await ws.send_str(
                orjson.dumps({"op": "append", "stream": stream, "seq": start + 1, "chunks": [chunk] * n}).decode()
            )
            msg = await ws.receive()
            assert '"ack"' in msg.data, msg.data
        await ws.send_str(orjson.dumps({"op": "end", "stream": stream, "reason": "completed"}).decode())
        msg = await ws.receive()
        assert '"ended"' in msg.data, msg.data


async def measure_redis(url: str, redis_url: str, chunks: int) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    rows = []
    samples = {
        "OpenAI chat-completion delta": {
            "id": "chatcmpl-3f9a1c",
            "choices": [{"index": 0, "delta": {"content": " token"}}],
            "i": 42,
            "t": 1763745600123456789,
        },
        "short text (20 B)": "a short piece of tex",
        "256 B": "x" * 254,
        "1 KiB": "x" * 1022,
        "4 KiB": "x" * 4094,
    }
    for label, chunk in samples.items():
        stream = f"mem-{len(rows)}"
        await write_stream(url, stream, chunks, chunk)
        log_key, meta_key = f"{PREFIX}:{{{stream}}}:log", f"{PREFIX}:{{{stream}}}:meta"
        log_bytes = int(client.execute_command("MEMORY", "USAGE", log_key, "SAMPLES", "0"))
        meta_bytes = int(client.execute_command("MEMORY", "USAGE", meta_key, "SAMPLES", "0"))
        size = len(orjson.dumps(chunk))
        rows.append(
            {
                "chunk": label,
                "json_bytes": size,
                "chunks": chunks,
                "log_bytes": log_bytes,
                "meta_bytes": meta_bytes,
                "bytes_per_chunk": round(log_bytes / (chunks + 1), 1),
                "overhead_per_chunk": round(log_bytes / (chunks + 1) - size, 1),
            }
        )
    client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--subs", type=int, default=10_000)
    parser.add_argument("--subs-per-conn", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sz-") as tmp:
        valkey = EmbeddedRedis(Path(tmp) / "v", port=free_port(), appendfsync="no")
        valkey.start()
        port = free_port()
        env = {
            **os.environ,
            "RELAYD_REDIS_URL": valkey.url,
            "RELAYD_REDIS_KEY_PREFIX": PREFIX,
            "RELAYD_API_KEYS": API_KEY,
            "RELAYD_AUTH_JWT_SECRET": JWT_SECRET,
            "RELAYD_EMBEDDED_DATA_DIR": str(Path(tmp) / "d"),
            "RELAYD_LIMITS_MAX_STREAMS_PER_CONNECTION": str(max(args.conns, args.subs, args.subs_per_conn)),
            "RELAYD_LOG_LEVEL": "warning",
        }
        command = [str(Path(sys.executable).with_name("relayd")), "serve", "--port", str(port)]
        relayd = subprocess.Popen(command, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            gc.collect()
            conns = asyncio.run(measure_connections(url, relayd.pid, args.conns, args.subs, args.subs_per_conn))
            mem = asyncio.run(measure_redis(url, valkey.url, args.chunks))
        finally:
            relayd.send_signal(signal.SIGTERM)
            relayd.wait(30)
            valkey.stop()

    result = {"relayd": conns, "redis": mem}
    if args.json:
        print(json.dumps(result))
        return
    c = conns
    print(f"relayd RSS: {c['rss_idle_mib']} MiB idle")
    print(f"  +1 producer holding {c['open_streams']} open streams: {c['rss_base_mib']} MiB")
    print(f"  -> {c['bytes_per_open_stream']} bytes per open stream")
    print(f"  +{c['conns']} idle consumer websockets (1 subscription each): {c['rss_with_conns_mib']} MiB")
    print(f"  -> {c['bytes_per_consumer_ws']} bytes per consumer websocket")
    print(f"  +{c['subs']} subscriptions on /v1/ws ({c['subs_per_conn']} per connection): {c['rss_with_subs_mib']} MiB")
    print(f"  -> {c['bytes_per_extra_subscription']} bytes per extra subscription")
    print(f"Redis (MEMORY USAGE ... SAMPLES 0), streams of {args.chunks} chunks + end:")
    print(f"  {'chunk':36} {'JSON B':>7} {'log B':>10} {'B/chunk':>8} {'overhead':>8} {'meta B':>7}")
    for r in mem:
        print(
            f"  {r['chunk']:36} {r['json_bytes']:>7} {r['log_bytes']:>10} {r['bytes_per_chunk']:>8} "
            f"{r['overhead_per_chunk']:>8} {r['meta_bytes']:>7}"
        )


if __name__ == "__main__":
    main()
