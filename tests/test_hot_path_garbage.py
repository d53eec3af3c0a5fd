"""The hot path leaves nothing for the cyclic GC: relayd on a real Valkey, a producer and a live
consumer on real websockets, one chunk per message.

Each object an append makes (the op, the store's write, the outcome, the publication, the ack,
the delivery) must be freed by reference counting when its work is done. One kept by a reference
cycle waits for the cyclic GC's full collections, which come rarely once the heap is large: at
S=1000 a cycle per append once held hundreds of MiB (benchmarks/RESULTS.md, "How the RSS growth
was found"). tests/test_plain_appends.py checks the store's own objects; this checks the whole
path, client included, by the garbage one collection finds after the GC was off for a run.
"""

from __future__ import annotations

import gc

from tests.helpers import Relayd

APPENDS = 300


async def test_appends_and_their_deliveries_leave_no_cyclic_garbage(relayd: Relayd) -> None:
    async with await relayd.producer() as producer, await relayd.consumer("gc") as consumer:
        await consumer.expect("subscribed")
        assert (await producer.open("gc"))["type"] == "opened"

        async def one(seq: int) -> None:
            await producer.send({"op": "append", "stream": "gc", "seq": seq, "chunk": {"i": seq}})
            await producer.expect("ack", seq=seq)
            assert (await consumer.expect("chunk"))["data"] == {"i": seq}

        for seq in range(1, 21):  # warm up: every cache and lazily made object exists
            await one(seq)
        gc.collect()
        gc.disable()
        try:
            for seq in range(21, 21 + APPENDS):
                await one(seq)
            found = gc.collect()  # unreachable objects only a collection frees: cycles
        finally:
            gc.enable()
        # a cycle per append is at least two objects per append
        assert found < APPENDS, f"{found} objects in reference cycles after {APPENDS} appends"
