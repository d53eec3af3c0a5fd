"""``relayd serve --workers 2`` as a real process group: one port, one embedded server, streams
across workers, a killed worker restarted, metrics of all workers, a graceful stop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import aiohttp
import orjson

from tests.helpers import Peer, collect_chunks, poll_until, relayd_serve
from tests.test_cli import write_toml

DRAIN_TIMEOUT_S = 5


def worker_pids(supervisor: int) -> set[int]:
    """The supervisor's children that are relayd workers (not the embedded server)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    pids = set()
    for pid in map(int, children):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"relayd.cli" in cmdline:
            pids.add(pid)
    return pids


async def test_two_workers_share_a_port_serve_across_workers_and_survive_a_kill(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = write_toml(
        tmp_path / "relayd.toml",
        f'[server]\nhost = "127.0.0.1"\ndrain_timeout_s = {DRAIN_TIMEOUT_S}\n\n'
        f'[embedded]\ndata_dir = "{data_dir}"\nappendfsync = "no"\n',
    )

    def both_listen(lines: list[str]) -> bool:  # the parent's line, then one per worker once it listens
        return sum(line.startswith("relayd: listening on") for line in lines) == 2

    serving = relayd_serve("--config", str(config), "--port", "0", "--workers", "2", ready=both_listen)
    async with serving as (proc, stderr):
        ports = [re.match(r"relayd: 2 workers on 127\.0\.0\.1:(\d+)$", line.strip()) for line in stderr]
        port = int(next(m for m in ports if m).group(1))
        url = f"http://127.0.0.1:{port}"
        api_key = (data_dir / "dev-credentials").read_text().split()[0]
        secret = (data_dir / "dev-credentials").read_text().split()[1]
        first = worker_pids(proc.pid)
        assert len(first) == 2

        async with aiohttp.ClientSession() as http:
            token = await _token(http, url, api_key)
            # Consumers over fresh connections until both workers have some (the kernel spreads them
            # by a hash of the client's address and port): whichever worker takes the producer, some
            # consumers are on the other one.
            consumers: list[Peer] = []
            counts = [0, 0]
            while min(counts) == 0:
                assert len(consumers) < 40, "SO_REUSEPORT never chose the second worker"
                ws = await http.ws_connect(f"{url}/v1/streams/w1/ws", params={"token": token, "wait_ms": "10000"})
                consumers.append(Peer(ws))
                await consumers[-1].expect("subscribed")
                found = re.findall(r'relayd_subscriptions\{worker="(\d)"\} (\d+)', await _metrics(http, url))
                counts = [0, 0]
                for worker, n in found:
                    counts[int(worker)] = int(float(n))

            async def all_counted() -> bool:  # /metrics, from either worker, covers both
                found = re.findall(r'relayd_subscriptions\{worker="\d"\} (\d+)', await _metrics(http, url))
                return sum(int(float(n)) for n in found) == len(consumers)

            await poll_until(all_counted, "every subscription in /metrics")
            producer = Peer(await http.ws_connect(f"{url}/v1/ingest", headers={"Authorization": f"Bearer {api_key}"}))
            await producer.send({"op": "open", "stream": "w1"})
            await producer.expect("opened")
            for seq in range(1, 21):
                assert (await producer.append("w1", seq, seq))["type"] == "ack"
            await producer.end("w1")
            for consumer in consumers:
                chunks, end = await collect_chunks(consumer, "w1")
                assert [f["data"] for f in chunks] == list(range(1, 21)) and end["reason"] == "completed"

            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            # the supervisor restarts it (a new pid next to the survivor), and it listens again
            await poll_until(lambda: (now := worker_pids(proc.pid)) and len(now) == 2 and victim not in now, "restart")

            async def all_answer() -> bool:
                return [await _readyz(http, url) for _ in range(6)] == [200] * 6

            await poll_until(all_answer, "every connection answered", timeout=20)
            assert secret  # both workers share the development credentials the supervisor made

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), DRAIN_TIMEOUT_S + 10)
        assert code == 0, "".join(stderr)
        assert "exited with status -9" in "".join(stderr)  # logged when the worker was restarted


async def _token(http: aiohttp.ClientSession, url: str, api_key: str) -> str:
    headers = {"Authorization": f"Bearer {api_key}"}
    async with http.post(f"{url}/v1/tokens", headers=headers, json={"streams": ["w1"], "rights": ["read"]}) as resp:
        assert resp.status == 200, await resp.text()
        return str(orjson.loads(await resp.read())["token"])


async def _metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as resp:
        return await resp.text()


async def _readyz(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(f"{url}/readyz", headers={"Connection": "close"}) as resp:
            return resp.status
    except aiohttp.ClientError:
        return 0
