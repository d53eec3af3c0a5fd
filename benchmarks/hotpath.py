#!/usr/bin/env python3
"""relayd's own Python per append, without sockets, Redis or aiohttp: a steady figure on a noisy box.

The fleet and firehose benchmarks measure everything a chunk costs (syscalls, aiohttp's websocket
reader, Valkey), and on a shared machine their run-to-run spread (+-10%) hides a 5% change. This
drives the code relayd runs per append, in process, with the store's answers made up:

    producer line -> ProducerDecoder.decode -> Relay.append -> RedisStore.append (the plain
    XADD and the followers probe; append.lua for a hold's first append) -> (the pipeline's
    replies, synthesised) -> the outcome -> Relay.append's done -> Hub.publish ->
    Subscriber._deliver -> Outbox.offer ... end-of-tick flush (the transport write is a no-op)
    and the ack: FramePeer.acked -> the producer's Outbox

with ``--subscribers`` live consumers on each of ``--streams`` streams, one chunk per append.
Each run times ``--appends`` appends; the minimum of ``--runs`` runs is printed (other work on
the machine only adds time). ``--ref`` runs the same against relayd/ from a commit (git archive
to a temp dir, this script unchanged) and prints the ratio:

    python benchmarks/hotpath.py                      # this work tree
    python benchmarks/hotpath.py --ref 74b54fb        # side by side with a commit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import orjson
from refs import run_at_ref  # benchmarks/refs.py

ROOT = Path(__file__).resolve().parent.parent
CHUNK = {"id": "chatcmpl-3f9a1c", "choices": [{"index": 0, "delta": {"content": " token"}}], "i": 42}


class _Owner:
    def subscription_done(self, sub: Any) -> None:
        pass


async def _measure(streams: int, subscribers: int, appends: int, runs: int) -> float:
    from relayd.config import Config
    from relayd.metrics import Metrics
    from relayd.outbox import Outbox
    from relayd.producer import Held
    from relayd.protocol import WS_CODEC, ProducerDecoder
    from relayd.relay import Relay
    from relayd.store.redis_streams import RedisStore
    from relayd.subscription import State, Subscriber
    from relayd.web.ingest import FramePeer

    config = Config()
    metrics = Metrics()
    store = RedisStore(config, "redis://127.0.0.1:1", metrics, instance="bench")
    gen = 1_764_950_000_000
    relay = Relay(config, store, metrics)

    async def nothing(batch: list[bytes]) -> None:
        pass

    def discard(batch: list[bytes]) -> None:
        pass

    producer_box = Outbox(nothing, 1 << 30, 10.0, None, discard)
    session = relay.session(FramePeer(producer_box))
    names = [f"bench-{i}" for i in range(streams)]
    subs = []
    for name in names:
        for _ in range(subscribers):
            sink = Outbox(nothing, 1 << 30, 10.0, None, discard)
            sub = Subscriber(relay._hub, name, sink, WS_CODEC, cursor=None, wait_s=0.0, owner=_Owner())
            relay._hub.add(sub)
            sub.state, sub.gen, sub.text = State.LIVE, gen, False
            subs.append(sub)
    decoder = ProducerDecoder(config.limits.max_chunk_bytes)
    try:
        decoder.decode(b"{}", session.text_streams, session.held)  # type: ignore[call-arg]
        known: tuple[Any, ...] = (session.text_streams, session.held)
    except TypeError:  # a relayd from before the decoder knew the connection's streams
        known = (session.text_streams,)
    best = float("inf")
    appender = getattr(store, "_appender", None)  # a relayd whose appends are plain XADDs
    for _ in range(runs):
        for name in names:  # new holds: each run's seqs start at 1
            session.hold(name, Held(1, gen, False, store.append_handle(name, 1, gen)))
        for sub in subs:
            sub.next = 1
        lines = [
            orjson.dumps({"op": "append", "stream": names[i % streams], "seq": i // streams + 1, "chunk": CHUNK})
            for i in range(appends)
        ]
        # what append.lua answers for a new chunk, as hiredis hands it over; each stream's offsets
        # follow on, so every subscriber delivers each chunk
        per_stream = {name: 0 for name in names}

        def submit_for(payload: bytes, done: Any, slot: int, _per: dict[str, int] = per_stream) -> None:
            key = payload[payload.index(b"{") + 1 : payload.index(b"}")].decode()
            n = _per[key] = _per[key] + 1
            done([b"ok", gen, n, n, n], None)

        def submit_write(write: Any, _per: dict[str, int] = per_stream) -> None:
            # the plain path: XADD answers the id, SRANDMEMBER no other follower; the script
            # (each hold's first append) what append.lua answers for a new chunk
            payload = write.payload
            if payload.startswith(b"*9\r\n$4\r\nXADD"):
                write.done(b"0-1", None)  # (the id it answers is not read)
            elif payload.startswith(b"*3\r\n$11\r\nSRANDMEMBER"):
                write.done([], None)
            else:
                key = payload[payload.index(b"{") + 1 : payload.index(b"}")].decode()
                n = _per[key] = _per[key] + 1
                write.done([b"ok", gen, n, n, n, 0, 0, n, b"json", 0], None)

        if appender is None:
            store._submit = submit_for  # type: ignore[method-assign]
        else:
            appender._submit = submit_write
        start = time.perf_counter()
        for i, line in enumerate(lines):
            op = decoder.decode(line, *known)
            relay.append(session, op)  # type: ignore[arg-type]
            if i % 64 == 63:
                await asyncio.sleep(0)  # end of a tick: the outboxes flush
        await asyncio.sleep(0)
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
    return best * 1e6 / appends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=1, help="live consumers per stream")
    parser.add_argument("--appends", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ref", default=None, help="also run relayd/ as of this commit, side by side")
    parser.add_argument("--json", action="store_true", help="(internal) print the figure as JSON")
    args = parser.parse_args()
    import uvloop

    figure = uvloop.run(_measure(args.streams, args.subscribers, args.appends, args.runs))
    if args.json:
        print(json.dumps(figure))
        return
    line = (
        f"relayd's Python per append ({args.streams} streams x {args.subscribers} live consumers, one chunk each,"
        f" min of {args.runs} x {args.appends}): {figure:.2f} us"
    )
    if args.ref:
        argv = ["--json", "--streams", str(args.streams), "--subscribers", str(args.subscribers)]
        argv += ["--appends", str(args.appends), "--runs", str(args.runs)]
        old = float(run_at_ref(args.ref, __file__, argv))
        line += f"; {args.ref}: {old:.2f} us (now x{figure / old:.2f})"
    print(line)


if __name__ == "__main__":
    main()
