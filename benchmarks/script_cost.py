#!/usr/bin/env python3
"""Valkey's CPU per appended chunk on relayd's write path, against a plain XADD.

Redis work per chunk is issue 10's target 3 (a plain XADD's cost, 2-4 us). This measures it
without relayd's process or any websocket in the way, so a noisy machine changes little: the
figure is the server's own CPU time (``INFO cpu``, user + sys) over a run, divided by the chunks
appended, and Valkey is pinned to its own core when ``--server-cpu`` is given.

Modes (each on a fresh embedded Valkey, as relayd starts it, with ``appendfsync no``):

- ``xadd``: ``XADD <log> MAXLEN ~ N <gen>-<n> d <chunk>`` pipelined: the yardstick;
- ``relayd``: relayd's RedisStore (its pipeline and append.lua), one chunk per append, streams
  opened first; with ``redis.notify`` on and nobody else following (one relayd);
- ``relayd-followed``: the same with another instance in every stream's followers Set (the
  script publishes; a subscriber on a second connection reads the channel);
- ``relayd-nonotify``: ``redis.notify = false``.

    python benchmarks/script_cost.py                       # every mode, 200 streams, 100k chunks
    python benchmarks/script_cost.py --ref 3c32a82          # also relayd's scripts as of a commit
    python benchmarks/script_cost.py --server-cpu 1 --runs 5

``--ref`` runs the relayd modes again with relayd/ from that commit (git archive to a temp dir),
side by side, and prints the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from refs import run_at_ref  # benchmarks/refs.py

ROOT = Path(__file__).resolve().parent.parent
CHUNK = b'{"id":"chatcmpl-3f9a1c","choices":[{"index":0,"delta":{"content":" token"}}],"i":42,"t":1763745600123}'


def _server_cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _run(
    mode: str, streams: int, chunks: int, batch: int, server_cpu: str | None, per_append: int = 1
) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from relayd.config import Config, RedisConfig, StreamsConfig
    from relayd.embedded import EmbeddedRedis
    from relayd.metrics import Metrics
    from relayd.store.redis_streams import RedisStore

    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedRedis(Path(data), appendfsync="no")
        url = server.start()
        try:
            if server_cpu:
                pin = ["taskset", "-pc", server_cpu, str(server.pid)]
                await asyncio.to_thread(subprocess.run, pin, check=True, capture_output=True)
            admin = aioredis.Redis.from_url(url)
            names = [f"bench-{i}" for i in range(streams)]
            per_stream = chunks // streams
            if mode == "xadd":
                before = _server_cpu(await admin.info("cpu"))
                for start in range(0, per_stream, max(1, batch // streams)):
                    pipe = admin.pipeline(transaction=False)
                    for n in range(start + 1, min(start + max(1, batch // streams), per_stream) + 1):
                        for name in names:
                            pipe.execute_command(
                                "XADD", f"p:{{{name}}}:log", "MAXLEN", "~", 100000, f"1-{n}", "d", CHUNK
                            )
                    await pipe.execute()
                after = _server_cpu(await admin.info("cpu"))
                await admin.aclose()
                return {"mode": mode, "us_per_chunk": (after - before) * 1e6 / (per_stream * streams)}
            notify = mode != "relayd-nonotify"
            config = Config(redis=RedisConfig(key_prefix="p", notify=notify), streams=StreamsConfig(max_chunks=100000))
            store = RedisStore(config, url, Metrics(), instance="bench")
            await store.start()
            listener = None
            if mode == "relayd-followed":
                listener = admin.pubsub()
                for name in names:
                    await admin.sadd(f"p:{{{name}}}:fol", "other")  # another instance follows
                    await listener.subscribe(f"p:{{{name}}}:live")
            handles = []
            for name in names:
                opened: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                store.open(name, None, "json", None, opened.set_result)
                outcome = await opened
                handles.append(store.append_handle(name, outcome.epoch, outcome.gen))
            before = _server_cpu(await admin.info("cpu"))
            started = time.process_time()
            answered = 0

            def done(_: Any) -> None:
                nonlocal answered
                answered += 1

            sent = 0
            appends = [CHUNK] * per_append
            for seq in range(1, per_stream + 1, per_append):
                for handle in handles:
                    store.append(handle, seq, appends, done)
                    sent += 1
                if sent - answered > max(1, batch * 4 // per_append):
                    await store.drain()
                    if listener is not None:
                        while await listener.get_message(timeout=0) is not None:
                            pass
            await store.drain()
            own = time.process_time() - started
            after = _server_cpu(await admin.info("cpu"))
            assert answered == sent, (answered, sent)
            if listener is not None:
                await listener.aclose()
            await store.close()
            await admin.aclose()
            stored = sent * per_append
            return {"mode": mode, "us_per_chunk": (after - before) * 1e6 / stored, "own_us": own * 1e6 / stored}
        finally:
            server.stop()


def _median_of(mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """Medians of Valkey's CPU and of this process's own CPU (the write path's Python) per chunk."""
    runs = [
        asyncio.run(_run(mode, args.streams, args.chunks, args.batch, args.server_cpu, args.per_append))
        for _ in range(args.runs)
    ]
    return statistics.median(r["us_per_chunk"] for r in runs), statistics.median(r.get("own_us", 0.0) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=200, help="appends in flight (about one pipeline)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--server-cpu", default=None, help="taskset core list for Valkey")
    parser.add_argument("--modes", default="xadd,relayd,relayd-followed,relayd-nonotify")
    parser.add_argument("--ref", default=None, help="also run the relayd modes with relayd/ from this commit")
    parser.add_argument(
        "--per-append", type=int, default=1, help="chunks per append (relayd modes; xadd: one XADD per chunk)"
    )
    parser.add_argument("--json", action="store_true", help="(internal) print one JSON object of medians")
    args = parser.parse_args()
    modes = args.modes.split(",")
    results = {mode: _median_of(mode, args) for mode in modes}
    if args.json:
        print(json.dumps(results))
        return
    old: dict[str, list[float]] = {}
    if args.ref:
        argv = ["--json", "--modes", ",".join(m for m in modes if m != "xadd"), "--streams", str(args.streams)]
        argv += ["--chunks", str(args.chunks), "--batch", str(args.batch), "--runs", str(args.runs)]
        argv += ["--per-append", str(args.per_append)] if args.per_append != 1 else []
        argv += ["--server-cpu", args.server_cpu] if args.server_cpu else []
        old = json.loads(run_at_ref(args.ref, __file__, argv))
    print(
        f"Valkey CPU per chunk (and this process's own: the write path's Python), medians of {args.runs} runs; "
        f"{args.streams} streams, {args.chunks} chunks, {args.per_append} chunk(s) per append, ~{args.batch} in flight"
    )
    base = results["xadd"][0] if "xadd" in results else 0.0
    for mode in modes:
        valkey, own = results[mode]
        line = f"  {mode:18s} {valkey:6.2f} us (own {own:5.2f})"
        if base and mode != "xadd":
            line += f"  x{valkey / base:.2f} of xadd"
        if mode in old:
            old_valkey, old_own = old[mode]
            line += f"  | {args.ref}: {old_valkey:6.2f} us  now x{valkey / old_valkey:.2f}"
            line += f" (own x{own / old_own:.2f})" if old_own else ""
        print(line)


if __name__ == "__main__":
    main()
