"""kill -9 of the instance that holds the producer, mid-stream: the SDK producer reconnects
through the load balancer to another instance and resumes; consumers on that instance see every
chunk once, in order, and the end. Real ``relayd serve`` processes on one Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from relayd.auth import hash_api_key
from relayd.client import Producer
from tests.helpers import API_KEY, JWT_SECRET, Client, collect_chunks, listening_port, relayd_serve
from tests.test_cli import write_toml


class Balancer:
    """A TCP load balancer on port 0: each connection goes to the first upstream that accepts it."""

    def __init__(self, upstreams: list[int]) -> None:
        self.upstreams = upstreams
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.upstreams:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue  # that instance is down: the next one
            for src, dst in ((reader, up_writer), (up_reader, writer)):
                task = asyncio.create_task(_pipe(src, dst))
                self._pipes.add(task)
                task.add_done_callback(self._pipes.discard)
            return
        writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.close()


@contextlib.asynccontextmanager
async def relayd_process(config: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``relayd serve --config CONFIG --port 0`` as a process; yields it and its port once it listens."""
    async with relayd_serve(
        "--config", str(config), "--port", "0", ready=lambda lines: listening_port(lines) is not None,
        env={"RELAYD_AUTH_JWT_SECRET": JWT_SECRET},
    ) as (proc, lines):  # fmt: skip
        port = listening_port(lines)
        assert port is not None
        yield proc, port


async def test_killing_the_producers_instance_moves_it_to_another_with_no_gap_and_no_duplicate(
    redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    toml = (
        f'[server]\nhost = "127.0.0.1"\ndrain_timeout_s = 2\n\n'
        f'[redis]\nurl = "{redis_server}"\nkey_prefix = "{key_prefix}"\n\n'
        f'[auth]\napi_keys = ["{hash_api_key(API_KEY)}"]\n\n'
        f'[streams]\nproducer_timeout_ms = 30000\n\n[embedded]\ndata_dir = "{tmp_path / "unused"}"\n'
    )
    config = write_toml(tmp_path / "relayd.toml", toml)
    async with (
        relayd_process(config) as (a, port_a),
        relayd_process(config) as (_, port_b),
        Balancer([port_a, port_b]) as balancer,  # the producer lands on A while A lives
        Client(f"http://127.0.0.1:{port_b}") as b,  # the consumer is on B
    ):
        consumer = await b.consumer("moving", wait_ms="10000")
        await consumer.expect("subscribed")
        async with Producer(f"http://127.0.0.1:{balancer.port}", API_KEY, reconnect_timeout_s=30) as producer:
            writer = producer.writer("moving")
            for i in range(1, 51):
                await writer.send(i)
            seen = [(await consumer.expect("chunk"))["data"] for _ in range(50)]
            assert seen == list(range(1, 51))
            a.send_signal(signal.SIGKILL)  # the instance holding the producer, mid-stream
            await a.wait()
            for i in range(51, 101):
                await writer.send(i)
            result = await writer.end()
        assert result.reason == "completed"
        chunks, end = await collect_chunks(consumer, "moving", timeout=30)
        assert seen + [f["data"] for f in chunks] == list(range(1, 101))
        assert end["reason"] == "completed"
