"""Slow readers do not grow relayd's memory: what a catching-up subscriber buffers is bounded in
bytes (consumer.max_queue_bytes), however large the producer's batches are.

Before, a catching-up subscriber buffered up to 64 *publications*, and a publication can be a
whole producer batch: three slow readers on 9 MB streams took relayd from 64 to 171 MiB.
relayd runs as a real process here so that its resident memory can be read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from relayd.auth import hash_api_key
from tests.helpers import API_KEY, Client
from tests.test_cli import write_toml
from tests.test_guarantees import RawWs
from tests.test_scaleout_failover import relayd_process

CHUNK = "x" * 3000
CHUNKS = 3000  # 9 MB per stream
BATCH = 100  # chunks per producer message: 300 KB publications
READERS = 3
MAX_GROWTH_MIB = 40  # peak RSS growth allowed for the whole run (was > 100 MiB)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


async def produce(client: Client, stream: str) -> None:
    producer = await client.producer()
    await producer.open(stream)
    for seq in range(1, CHUNKS + 1, BATCH):
        await producer.send({"op": "append", "stream": stream, "seq": seq, "chunks": [CHUNK] * BATCH})
    await producer.end(stream)  # answered after every append before it
    await producer.ws.close()


async def slow_reader(port: int, token: str, stream: str) -> tuple[int, dict[str, Any]]:
    """4 KiB receive buffer, 4 KiB read per millisecond: slow but steady. Returns (chunks, end)."""
    where = SimpleNamespace(
        config=SimpleNamespace(server=SimpleNamespace(host="127.0.0.1")), server=SimpleNamespace(port=port)
    )
    async with await RawWs.connect(where, f"/v1/streams/{stream}/ws?token={token}&wait_ms=10000") as ws:  # type: ignore[arg-type]
        ws.gate = asyncio.Queue()

        async def pace() -> None:
            while True:
                ws.gate.put_nowait(4096)  # type: ignore[union-attr]
                await asyncio.sleep(0.001)  # the reader's pace (a workload, not a synchronisation)

        pacer = asyncio.create_task(pace())
        try:
            frames, end = await ws.follow(stream, timeout=50)
        finally:
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer
    return sum(1 for f in frames if f["type"] == "chunk"), end


async def test_slow_readers_on_fast_streams_keep_relayd_memory_bounded(
    redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    toml = (
        f'[server]\nhost = "127.0.0.1"\n\n[redis]\nurl = "{redis_server}"\nkey_prefix = "{key_prefix}"\n\n'
        f'[auth]\napi_keys = ["{hash_api_key(API_KEY)}"]\n\n[embedded]\ndata_dir = "{tmp_path / "unused"}"\n'
    )
    async with relayd_process(write_toml(tmp_path / "relayd.toml", toml)) as (proc, port):
        async with Client(f"http://127.0.0.1:{port}") as client:
            await produce(client, "warm-up")  # the allocator's steady state, before the baseline
            before = peak_rss_mib(proc.pid)
            streams = [f"fast-{i}" for i in range(READERS)]
            readers = [asyncio.create_task(slow_reader(port, client.token(), s)) for s in streams]
            await asyncio.gather(*(produce(client, s) for s in streams))
            results = await asyncio.gather(*readers)
        growth = peak_rss_mib(proc.pid) - before
    assert [(chunks, end["reason"]) for chunks, end in results] == [(CHUNKS, "completed")] * READERS
    assert growth < MAX_GROWTH_MIB, f"relayd's peak RSS grew {growth:.0f} MiB for {READERS} slow readers"
