#!/usr/bin/env python3
"""relayd's CPU per one-chunk producer message, through real sockets, side by side with a commit.

`hotpath.py` times relayd's Python per append without sockets; this adds what it leaves out on
the producer side: the websocket reading (aiohttp's parser, the handler task), the socket writes
of the acks, the Redis pipeline's I/O. One relayd process (pinned to ``--relay-cpu``) on a private
Valkey; ``--conns`` producer connections, one stream each, each with one append in flight (send
one chunk, wait for its ack: one message per read, as a fleet of one producer per stream sends),
no consumers. The figure is relayd's own CPU time (``time.process_time`` in the relayd process)
over ``--appends`` acknowledged appends per connection, divided by the appends; the minimum of
``--runs`` runs (other work on the machine only adds time). With ``--ref`` the runs alternate
between this tree and the commit (git archive into a temp dir), so drift falls on both:

    python benchmarks/ingest_path.py                  # this work tree
    python benchmarks/ingest_path.py --ref 8c8110b    # side by side with a commit, and the ratio
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from refs import extract_relayd  # benchmarks/refs.py

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "rk_bench_ingest_path_0123456789"
CHUNK = {"id": "chatcmpl-3f9a1c", "choices": [{"index": 0, "delta": {"content": " token"}}], "i": 42}


async def _serve(redis_url: str) -> None:
    """The relayd side: start, print the port, answer each stdin line with this process's CPU time."""
    from relayd.auth import hash_api_key
    from relayd.config import build_config
    from relayd.server import Server

    raw = {
        "server": {"host": "127.0.0.1", "port": 0, "allowed_origins": ["http://127.0.0.1"]},
        "redis": {"url": redis_url, "key_prefix": f"ip-{os.getpid()}"},
        "auth": {"api_keys": [hash_api_key(API_KEY)], "jwt_secret": "s" * 40},
        "log": {"level": "warning"},
    }
    server = Server(build_config(raw, env={}))
    await server.start()
    print(server.url, flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "cpu":
            print(time.process_time(), flush=True)
    await server.stop()


async def _drive(url: str, conns: int, appends: int, mark: Any) -> float:
    """Warm up, then time ``appends`` acknowledged appends per connection; relayd's CPU us per append."""
    import aiohttp
    import orjson

    async with aiohttp.ClientSession() as session:
        sockets = [
            await session.ws_connect(f"{url}/v1/ingest", headers={"Authorization": f"Bearer {API_KEY}"})
            for _ in range(conns)
        ]
        for n, ws in enumerate(sockets):
            await ws.send_str(orjson.dumps({"op": "open", "stream": f"ip-{n}"}).decode())
            assert orjson.loads(await ws.receive_str())["type"] == "opened"

        async def producer(n: int, first: int, count: int) -> None:
            ws = sockets[n]
            head = b'{"op":"append","stream":"ip-%d","seq":' % n
            tail = b',"chunk":' + orjson.dumps(CHUNK) + b"}"
            for seq in range(first, first + count):
                await ws.send_str((head + str(seq).encode() + tail).decode())
                frame = orjson.loads(await ws.receive_str())
                assert frame["type"] == "ack" and frame["seq"] == seq, frame

        warm = max(appends // 10, 20)
        await asyncio.gather(*(producer(n, 1, warm) for n in range(conns)))
        before = mark()
        await asyncio.gather(*(producer(n, warm + 1, appends) for n in range(conns)))
        cpu = mark() - before
        for ws in sockets:
            await ws.close()
    return cpu * 1e6 / (conns * appends)


def _run_once(tree: str | None, redis_url: str, args: argparse.Namespace) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = tree or str(ROOT)
    cmd = [sys.executable, __file__, "--serve", redis_url]
    if args.relay_cpu is not None:
        cmd = ["taskset", "-c", args.relay_cpu, *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        url = proc.stdout.readline().strip()

        def mark() -> float:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("cpu\n")
            proc.stdin.flush()
            return float(proc.stdout.readline())

        import uvloop

        return uvloop.run(_drive(url, args.conns, args.appends, mark))
    finally:
        proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", type=int, default=100, help="producer connections, one stream each")
    parser.add_argument("--appends", type=int, default=300, help="timed appends per connection")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--ref", action="append", default=[], help="also run relayd/ as of this commit, alternating (repeatable)"
    )
    parser.add_argument("--relay-cpu", default="0", help="taskset -c for relayd ('' for none)")
    parser.add_argument("--aux-cpu", default="1", help="this generator's and Valkey's core ('' for none)")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_serve(args.serve))
        return
    args.relay_cpu = args.relay_cpu or None
    if args.aux_cpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.aux_cpu.split(",")})  # Valkey inherits it
    from relayd.embedded import EmbeddedRedis, free_port

    with tempfile.TemporaryDirectory() as scratch:
        redis = EmbeddedRedis(Path(scratch) / "valkey", port=free_port(), appendfsync="no")
        redis.start()
        try:
            trees: dict[str, str | None] = {"this tree": None}
            for ref in args.ref:
                tree = Path(scratch) / f"ref-{ref}"
                tree.mkdir()
                extract_relayd(ref, tree)
                trees[ref] = str(tree)
            best = dict.fromkeys(trees, float("inf"))
            for _ in range(args.runs):
                for name, tree_path in trees.items():
                    best[name] = min(best[name], _run_once(tree_path, redis.url, args))
        finally:
            redis.stop()
    line = (
        f"relayd CPU per one-chunk producer message ({args.conns} connections, one append in flight each,"
        f" min of {args.runs} x {args.appends * args.conns}): {best['this tree']:.2f} us"
    )
    for ref in args.ref:
        line += f"; {ref}: {best[ref]:.2f} us (now x{best['this tree'] / best[ref]:.2f})"
    print(line)


if __name__ == "__main__":
    main()
