"""The drain runs while relayd still listens: probes and scrapes see it, new clients are turned away."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp

from relayd.embedded import EmbeddedRedis
from relayd.server import Server
from tests.helpers import API_KEY, Peer, make_config


async def test_readyz_and_metrics_answer_during_the_drain(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    config = make_config(
        private_redis.url,
        key_prefix,
        str(tmp_path),
        redis={"timeout_ms": 30_000, "retry_ms": 30_000},
        server={"drain_timeout_s": 30.0},
    )
    server = Server(config)
    await server.start()
    assert server.runtime is not None and private_redis.pid is not None
    stopping: asyncio.Task[None] | None = None
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(f"{server.url}/v1/ingest", headers={"Authorization": f"Bearer {API_KEY}"})
            producer = Peer(ws)
            await producer.open("drain-1")
            assert (await producer.append("drain-1", 1, "stored"))["type"] == "ack"

            os.kill(private_redis.pid, signal.SIGSTOP)  # the next write cannot finish...
            await producer.send({"op": "append", "stream": "drain-1", "seq": 2, "chunk": "in flight"}, {"op": "ping"})
            await producer.expect("pong")  # relayd read the append: it is in the batcher
            stopping = asyncio.create_task(server.stop())
            await server.runtime.draining.wait()  # ...so the drain waits for it, listener open

            async with http.get(f"{server.url}/readyz") as resp:
                assert resp.status == 503 and (await resp.json())["status"] == "draining"
            async with http.get(f"{server.url}/metrics") as resp:
                assert "relayd_draining 1.0" in await resp.text()
            async with http.get(f"{server.url}/v1/streams/drain-1/events") as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == "shutting_down"

            os.kill(private_redis.pid, signal.SIGCONT)
            assert (await producer.expect("ack", seq=2))["stream"] == "drain-1"  # acknowledged before the close
            assert await producer.closed() == 1012
            await stopping
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
            if stopping is None:
                await server.stop()
            elif not stopping.done():
                await stopping
