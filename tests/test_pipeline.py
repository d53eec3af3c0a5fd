"""relayd.store.pipeline: the group commit's ordering, against a wire the test answers by hand.

The wire is a real class implementing the pipeline's Wire protocol (no Redis): each ``send``
returns a future the test resolves when and how it wants, as a cluster's masters would answer.
Runs against real Redis and a real cluster are in test_batcher.py and test_cluster_relay.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from relayd.config import BatchConfig
from relayd.metrics import Metrics
from relayd.store.pipeline import Pipeline, Write
from tests.doubles import until


class ManualWire:
    """Records each batch sent and hands back a future the test resolves."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[Write], asyncio.Future[list[Any]]]] = []

    def send(self, writes: list[Write]) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.sent.append((writes, future))
        return future

    async def reconnect(self) -> None:
        return None

    def abort(self) -> None:
        return None


async def test_a_batch_answered_early_waits_for_the_batches_before_it() -> None:
    """Two batches on the wire; the second is answered first (another master was quicker):
    callbacks still run in submission order, which is what keeps a stream's appends in order."""
    wire = ManualWire()
    pipeline = Pipeline(wire, BatchConfig(max_inflight=2), 1000, 5000, Metrics(), lambda: None)
    done: list[tuple[str, Any]] = []

    def write(name: str, slot: int) -> Write:
        return Write(name.encode(), lambda reply, exc: done.append((name, reply)), slot)

    pipeline.submit(write("first", 1))
    await until(lambda: len(wire.sent) == 1)
    pipeline.submit(write("second", 2))
    await until(lambda: len(wire.sent) == 2)
    assert [[w.slot for w in writes] for writes, _ in wire.sent] == [[1], [2]]
    wire.sent[1][1].set_result([b"r2"])
    await asyncio.sleep(0)  # the loop runs the pipeline's reply callback
    assert done == []
    wire.sent[0][1].set_result([b"r1"])
    await pipeline.drain()
    assert done == [("first", b"r1"), ("second", b"r2")]
    await pipeline.close()
