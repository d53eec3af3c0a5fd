#!/usr/bin/env python3
"""relayd's own Python per live delivery, in process: one stream fanned out to many consumers.

``--mode fanout`` of ``fleet.py`` measures everything a delivery costs, the ``send`` syscall
per consumer included, on a shared machine whose noise hides a 10% change. This drives only the
code relayd runs per publication and per consumer:

    Hub.publish -> Subscriber.on_publication -> Outbox.offer ... the end-of-tick flush ->
    the websocket writer (relayd.web.transport) -> ``transport.write`` (a no-op here)

with ``--consumers`` live subscriptions set up as relayd's consumer websocket sets them up (the
outbox's watchdog, the consumers' global budget, the metrics callbacks), ``--per-tick``
publications of one chunk per event-loop tick (1: the fan-out workload's common case). The
minimum of ``--runs`` runs is printed, in microseconds per delivery.

    python benchmarks/fanout_path.py
    python benchmarks/fanout_path.py --ref 8c8110b    # the same against relayd/ of a commit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from refs import run_at_ref  # benchmarks/refs.py

ROOT = Path(__file__).resolve().parent.parent
CHUNK = b'{"id":"chatcmpl-3f9a1c","choices":[{"index":0,"delta":{"content":" token"}}],"i":42}'


class _Owner:
    def subscription_done(self, sub: Any) -> None:
        pass


class _Transport:
    """What the writer and the watchdog call on a transport, as C builtins (a no-op write)."""

    def __init__(self) -> None:
        self.write = len
        self.is_closing = bool  # bool() is False
        self.get_write_buffer_size = int  # int() is 0

    def get_extra_info(self, name: str) -> None:
        return None

    def abort(self) -> None:
        pass


class _Request:
    def __init__(self) -> None:
        self.transport = _Transport()
        self.writer = None


class _Ws:
    closed = False


async def _measure(consumers: int, publications: int, per_tick: int, runs: int) -> float:
    from relayd.budget import Budget
    from relayd.hub import Hub, Publication
    from relayd.metrics import Metrics
    from relayd.model import Entry
    from relayd.outbox import Outbox
    from relayd.protocol import WS_CODEC
    from relayd.subscription import State, Subscriber
    from relayd.web import transport

    metrics = Metrics()
    budget = Budget(64 << 20)
    hub = Hub(None, metrics, 500)  # type: ignore[arg-type]  # live subscribers never read
    gen, stream = 1_764_950_000_000, "bench-fanout"
    subs = []
    for _ in range(consumers):
        request, ws = _Request(), _Ws()
        write = transport.ws_text_writer(request, ws)  # type: ignore[arg-type]
        # as relayd/web/consume.py makes a consumer's outbox (older relayd: no framer)
        fast: dict[str, Any] = {}
        if hasattr(transport, "ws_text_frame"):
            fast = {"framer": transport.ws_text_frame, "write_frame": transport.ws_frame_writer(request, ws)}  # type: ignore[arg-type]
        outbox = Outbox(
            transport.drained(request, write),  # type: ignore[arg-type]
            1 << 20,
            10.0,
            transport.backlog_of(request),  # type: ignore[arg-type]
            None if fast else write,
            metrics.delivery_latency,
            on_stuck=lambda why: None,
            ping=transport.ws_pinger(request),  # type: ignore[arg-type]
            heartbeat_s=30.0,
            on_delivered=metrics.written,
            budget=budget,
            **fast,
        )
        sub = Subscriber(hub, stream, outbox, WS_CODEC, cursor=None, wait_s=0.0, owner=_Owner())
        if getattr(sub, "_live", None) is not None:  # as Subscriber._run registers (older relayd: no fan-out)
            hub.add(sub, sub)
        else:
            hub.add(sub)
        sub.state, sub.gen, sub.text = State.LIVE, gen, False
        subs.append(sub)
    best = float("inf")
    for _ in range(runs):
        for sub in subs:
            sub.next = 1
        start = time.perf_counter()
        offset = 1
        for _ in range(publications // per_tick):
            for _ in range(per_tick):
                hub.publish(Publication(stream, gen, [Entry(offset, CHUNK)], False, time.monotonic(), len(CHUNK)))
                offset += 1
            await asyncio.sleep(0)  # the end of the tick: the outboxes flush
        await asyncio.sleep(0)
        best = min(best, time.perf_counter() - start)
        assert all(sub.next == offset for sub in subs), "not every consumer got every chunk"
    return best * 1e6 / (publications // per_tick * per_tick * consumers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--consumers", type=int, default=1000)
    parser.add_argument("--publications", type=int, default=600)
    parser.add_argument("--per-tick", type=int, default=1, help="publications per event-loop tick")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ref", default=None, help="also run relayd/ as of this commit, side by side")
    parser.add_argument("--json", action="store_true", help="(internal) print the figure as JSON")
    args = parser.parse_args()
    import uvloop

    figure = uvloop.run(_measure(args.consumers, args.publications, args.per_tick, args.runs))
    if args.json:
        print(json.dumps(figure))
        return
    line = (
        f"relayd's Python per live delivery (1 stream x {args.consumers} consumers, {args.per_tick} publication(s)"
        f" per tick, min of {args.runs} x {args.publications}): {figure:.3f} us"
    )
    if args.ref:
        argv = ["--json", "--consumers", str(args.consumers), "--publications", str(args.publications)]
        argv += ["--per-tick", str(args.per_tick), "--runs", str(args.runs)]
        old = float(run_at_ref(args.ref, __file__, argv))
        line += f"; {args.ref}: {old:.3f} us (now x{figure / old:.2f})"
    print(line)


if __name__ == "__main__":
    main()
