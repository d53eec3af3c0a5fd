#!/usr/bin/env python3
"""An SSE consumer's replay of a finished JSON stream: pages framed by the store vs built per entry.

relayd in this process (the embedded Valkey beside it), one stream of ``--chunks`` OpenAI-style
chunks, then ``--rounds`` rounds of ``--per-round`` whole replays over ``GET /v1/streams/{id}/events``
by an aiohttp client, alternating the two ways of making the events (``SseCodec.chunk_template``:
the store frames the pages, as websocket replays do; ``FrameCodec.chunk_template``, None: an Entry
per chunk, relayd's path before). Prints the medians of the wall time and of this process's CPU
time (relayd and the client) per replay, and checks that both give the same bytes.

    python benchmarks/sse_replay.py                # pin it for steadier figures: taskset -c 0 ...
    python benchmarks/sse_replay.py --openai       # the same with ?format=openai
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from relayd.embedded import EmbeddedRedis
from relayd.protocol import FrameCodec, SseCodec
from relayd.web.openai_sse import OpenAiSseCodec
from tests.helpers import Relayd, make_config

WAYS = {"entries": FrameCodec.chunk_template, "framed": SseCodec.chunk_template}
OPENAI_WAYS = {"entries": FrameCodec.chunk_template, "framed": OpenAiSseCodec.chunk_template}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(chunks: int, rounds: int, per_round: int, openai: bool) -> None:
    codec = OpenAiSseCodec if openai else SseCodec
    ways = OPENAI_WAYS if openai else WAYS
    redis = EmbeddedRedis(tempfile.mkdtemp(), appendfsync="no")
    redis.start()
    try:
        async with Relayd(make_config(redis.url, "sse-replay", tempfile.mkdtemp())) as server:
            async with await server.producer() as producer:
                await producer.open("big")
                for seq in range(1, chunks + 1, 100):
                    batch = [{"i": i, "choices": [{"delta": {"content": " token"}}]} for i in range(seq, seq + 100)]
                    await producer.send({"op": "append", "stream": "big", "seq": seq, "chunks": batch})
                    assert (await producer.next())["seq"] == seq + len(batch) - 1
                await producer.end("big")
            url, params = f"{server.url}/v1/streams/big/events", {"token": server.token(["big"])}
            if openai:
                params["format"] = "openai"
            wall: dict[str, list[float]] = {name: [] for name in WAYS}
            cpu: dict[str, list[float]] = {name: [] for name in WAYS}
            bodies: dict[str, bytes] = {}
            async with aiohttp.ClientSession() as http:
                for n in range(rounds):
                    for name in list(WAYS) if n % 2 == 0 else list(reversed(WAYS)):
                        codec.chunk_template = ways[name]  # type: ignore[method-assign]
                        c0, t0 = cpu_s(), time.perf_counter()
                        for _ in range(per_round):
                            async with http.get(url, params=params) as resp:
                                bodies[name] = await resp.read()
                        wall[name].append((time.perf_counter() - t0) / per_round * 1000)
                        cpu[name].append((cpu_s() - c0) / per_round * 1000)
            codec.chunk_template = ways["framed"]  # type: ignore[method-assign]
    finally:
        redis.stop()
    assert bodies["entries"] == bodies["framed"], "the two ways made different events"
    for name in WAYS:
        print(
            f"{name:8} replay of {chunks} chunks: wall {statistics.median(wall[name]):.1f} ms, "
            f"CPU (relayd + client) {statistics.median(cpu[name]):.1f} ms (medians of {rounds} rounds)"
        )
    ratio = statistics.median(cpu["framed"]) / statistics.median(cpu["entries"])
    print(f"framed / entries CPU: x{ratio:.2f}; {len(bodies['framed'])} bytes each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--openai", action="store_true", help="?format=openai (OpenAI-format SSE)")
    args = parser.parse_args()
    asyncio.run(measure(args.chunks, args.rounds, args.per_round, args.openai))


if __name__ == "__main__":
    main()
