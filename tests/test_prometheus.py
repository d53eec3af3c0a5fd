"""A real Prometheus server scrapes a running relayd: the target is up and the key series move.

Prometheus is an external server with no event to wait on, so its HTTP API is polled at a short
interval until each condition holds, with one deadline for the whole test.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relayd.embedded import free_port
from tests.helpers import Peer, Relayd, collect_chunks

PROMETHEUS = "/usr/bin/prometheus"
DEADLINE_S = 25.0  # the whole test; Prometheus starts in about a second and scrapes every second


class Prometheus:
    """A Prometheus process scraping one target every second, and its query API."""

    def __init__(self, url: str, session: aiohttp.ClientSession, deadline: float) -> None:
        self.url = url
        self.session = session
        self.deadline = deadline

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}{path}", params=params) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "success", body
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The value of a single-series query, None while it has no result."""
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def until(self, what: str, check: Any) -> Any:
        """Poll ``check()`` (a coroutine function) until it returns something truthy."""
        while True:
            found = await check()
            if found:
                return found
            assert time.monotonic() < self.deadline, f"Prometheus: timed out waiting for {what}"
            await asyncio.sleep(0.1)  # polling an external server's API, not a synchronisation


def prometheus_command(target: str, tmp: Path, port: int) -> list[str]:
    """The command line of a Prometheus scraping ``target`` every second, its files under ``tmp``."""
    binary = PROMETHEUS if Path(PROMETHEUS).exists() else shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run scripts/test.sh (it installs prometheus with apt)")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: relayd\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


@contextlib.asynccontextmanager
async def prometheus(target: str, tmp: Path, session: aiohttp.ClientSession) -> AsyncIterator[Prometheus]:
    port = free_port()
    command = prometheus_command(target, tmp, port)
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=log)
        prom = Prometheus(f"http://127.0.0.1:{port}", session, time.monotonic() + DEADLINE_S)
        try:

            async def ready() -> bool:
                assert proc.returncode is None, f"prometheus exited: {log_tail(log_path)}"
                try:
                    async with session.get(f"{prom.url}/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await prom.until("/-/ready", ready)
            yield prom
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def traffic(server: Relayd, producer: Peer, stream: str, chunks: int) -> None:
    """One stream: a live consumer, ``chunks`` appends, the end."""
    consumer = await server.consumer(stream)
    await consumer.expect("subscribed")
    await producer.open(stream)
    for seq in range(1, chunks + 1):
        assert (await producer.append(stream, seq, {"i": seq}))["type"] == "ack"
    await producer.end(stream)
    got, _ = await collect_chunks(consumer, stream)
    assert len(got) == chunks
    await consumer.ws.close()


async def test_prometheus_scrapes_relayd_and_sees_traffic(relayd: Relayd, tmp_path: Path) -> None:
    """Prometheus finds the target up, chunks_in rising, an ack-latency quantile and connections by role."""
    host_port = relayd.url.removeprefix("http://")
    async with aiohttp.ClientSession() as session, prometheus(host_port, tmp_path, session) as prom:
        producer = await relayd.producer()
        watcher = await relayd.consumer("prom-watch")  # stays connected: a consumer_ws to see by role
        await watcher.expect("subscribed")
        await traffic(relayd, producer, "prom-1", 20)

        async def target_up() -> bool:
            targets = (await prom.get("/api/v1/targets"))["activeTargets"]
            return any(t["scrapeUrl"] == f"{relayd.url}/metrics" and t["health"] == "up" for t in targets)

        await prom.until("the relayd target to be up", target_up)

        async def chunks_in() -> float | None:
            value = await prom.value('relayd_chunks_in_total{job="relayd"}')
            return value if value is not None and value >= 20 else None

        first = await prom.until("relayd_chunks_in_total >= 20", chunks_in)
        await traffic(relayd, producer, "prom-2", 30)

        async def increased() -> bool:
            value = await prom.value('relayd_chunks_in_total{job="relayd"}')
            return value is not None and value >= first + 30

        await prom.until("relayd_chunks_in_total to increase by 30", increased)

        async def ack_p99() -> float | None:
            value = await prom.value("histogram_quantile(0.99, sum by (le) (relayd_ack_latency_seconds_bucket))")
            return value if value is not None and not math.isnan(value) else None

        p99 = await prom.until("an ack latency quantile", ack_p99)
        assert 0 < p99 <= 2.5

        async def by_role() -> dict[str, float] | None:
            result = await prom.query("relayd_connections")
            roles = {r["metric"]["role"]: float(r["value"][1]) for r in result}
            return roles if roles.get("producer") == 1 and roles.get("consumer_ws", 0) >= 1 else None

        roles = await prom.until("connections by role (1 producer, a consumer_ws)", by_role)
        assert set(roles) == {"producer", "consumer_ws", "consumer_sse"}
        assert await prom.value("relayd_redis_up") == 1
        await producer.ws.close()
        await watcher.ws.close()
