"""relayd on a Valkey Cluster (``redis.url = "redis+cluster://..."``): two instances, streams on
every master, the admin reads, lost scripts, and a master failover mid-stream.

Two in-process relayd servers share one deployment (one key prefix) on a real cluster started
from the embedded default's binary (tests/conftest_cluster.py): the session's 3-master cluster,
or a 3+3 cluster of the test's own for failovers. The producer sits on A, consumers on B, so
every chunk crosses the cluster: written by A's pipeline to the master of the stream's slot,
published there with SPUBLISH by the script, and received by B's SSUBSCRIBE on that master.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from relayd.auth import hash_api_key
from relayd.cli import main
from relayd.config import Config
from relayd.store.keys import Keys
from relayd.store.slots import key_slot
from tests.conftest_cluster import Cluster, ClusterNode
from tests.helpers import Peer, Relayd, collect_chunks, make_config, poll_until
from tests.test_scaleout import sse_events

ADMIN_KEY = "rk_admin_cluster_key_0123456789abcdef"


def cluster_config(cluster: Cluster, key_prefix: str, tmp_path: Path, **tables: dict[str, Any]) -> Config:
    tables.setdefault("auth", {})["admin_keys"] = [hash_api_key(ADMIN_KEY)]
    return make_config(cluster.seed_url, key_prefix, str(tmp_path), **tables)


@asynccontextmanager
async def instances(config: Config, count: int = 2) -> AsyncIterator[list[Relayd]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Relayd(config)) for _ in range(count)]


def one_stream_per_master(cluster: Cluster, word: str) -> dict[str, ClusterNode]:
    """Stream ids ``<word>-<n>``, one on each master: id -> the master that owns its slot."""
    masters = cluster.masters()
    found: dict[str, ClusterNode] = {}
    for n in range(1000):
        stream = f"{word}-{n}"
        owner = cluster.owner_of(key_slot(stream))
        if owner not in found.values():
            found[stream] = owner
        if len(found) == len(masters):
            return found
    raise AssertionError("no stream id found for every master")


async def admin_call(server: Relayd, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    assert server.session is not None
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with server.session.request(method, f"{server.url}{path}", headers=headers, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_streams_on_every_master_reach_consumers_on_the_other_instance(
    redis_cluster: Cluster, key_prefix: str, tmp_path: Path
) -> None:
    """Producer on A, one stream per master; on B a websocket and an SSE consumer per stream,
    subscribed before the first chunk, and a late joiner: every chunk once, in order, the end."""
    streams = one_stream_per_master(redis_cluster, "m")
    async with instances(cluster_config(redis_cluster, key_prefix, tmp_path)) as (a, b):
        producer = await a.producer()
        for stream in streams:
            assert (await producer.open(stream))["type"] == "opened"
        websockets: dict[str, Peer] = {}
        for stream in streams:
            websockets[stream] = await b.consumer(stream)
            await websockets[stream].expect("subscribed")

        async def read_sse(stream: str) -> list[tuple[str, dict[str, Any]]]:
            return [item async for item in sse_events(b, stream)]

        sse = {stream: asyncio.create_task(read_sse(stream)) for stream in streams}
        await poll_until(lambda: all(b.relay.subscriber_count(s) == 2 for s in streams), "B's subscribers")
        for seq in range(1, 31):
            for stream in streams:
                assert (await producer.append(stream, seq, {"n": seq}))["type"] == "ack"
            if seq == 10:
                late = next(iter(streams))
                joiner = await b.consumer(late)
                await joiner.expect("subscribed")
        for stream in streams:
            assert (await producer.end(stream))["type"] == "ended"
        for stream, ws in websockets.items():
            chunks, end = await collect_chunks(ws, stream)
            assert [f["data"]["n"] for f in chunks] == list(range(1, 31)) and end["reason"] == "completed"
            events = await asyncio.wait_for(sse[stream], 10)
            assert [data["n"] for event, data in events if event == "chunk"] == list(range(1, 31))
            assert events[-1][0] == "end"
        chunks, end = await collect_chunks(joiner, late)
        assert [f["data"]["n"] for f in chunks] == list(range(1, 31)) and end["reason"] == "completed"


async def test_wait_and_cancel_cross_instances_on_a_cluster(
    redis_cluster: Cluster, key_prefix: str, tmp_path: Path
) -> None:
    """A consumer on B waits for a stream A creates later; its cancel reaches the producer on A
    as a ``cancel`` frame, and the stream ends ``cancelled`` for it."""
    config = cluster_config(redis_cluster, key_prefix, tmp_path, streams={"cancel_grace_ms": 30_000})
    async with instances(config) as (a, b):
        token = b.token(["later"], rights=("read", "cancel"))
        consumer = await b.consumer("later", token=token, wait_ms="10000")
        await consumer.expect("subscribed")
        await poll_until(lambda: b.relay.subscriber_count("later") == 1, "registered")
        producer = await a.producer()
        await producer.open("later")
        await producer.append("later", 1, "first")
        assert (await consumer.expect("chunk"))["data"] == "first"
        await consumer.send({"op": "cancel", "stream": "later"})
        assert await producer.next() == {"type": "cancel", "stream": "later"}
        assert (await producer.end("later", "cancelled"))["type"] == "ended"
        chunks, end = await collect_chunks(consumer, "later")
        assert chunks == [] and end["reason"] == "cancelled"


async def test_admin_api_and_direct_cli_see_every_master(
    redis_cluster: Cluster, key_prefix: str, tmp_path: Path
) -> None:
    """ls (a SCAN of every master, and the open index), show, export and rm on B for streams A
    wrote on every master; the CLI's direct mode reads the same from the cluster."""
    streams = list(one_stream_per_master(redis_cluster, "adm"))
    assert len(streams) == 3
    async with instances(cluster_config(redis_cluster, key_prefix, tmp_path)) as (a, b):
        producer = await a.producer()
        for i, stream in enumerate(streams):
            await producer.open(stream)
            for seq in range(1, i + 2):
                assert (await producer.append(stream, seq, f"{stream}:{seq}"))["type"] == "ack"
            if i:
                await producer.end(stream)
        status, body = await admin_call(b, "GET", "/v1/admin/streams")
        assert status == 200 and not body["truncated"]
        assert {s["id"]: s["chunks"] for s in body["streams"]} == {s: i + 1 for i, s in enumerate(streams)}
        status, body = await admin_call(b, "GET", "/v1/admin/streams", params={"status": "open"})
        assert [s["id"] for s in body["streams"]] == streams[:1]
        status, body = await admin_call(b, "GET", "/v1/admin/streams", params={"status": "ended"})
        assert sorted(s["id"] for s in body["streams"]) == sorted(streams[1:])
        status, shown = await admin_call(b, "GET", f"/v1/admin/streams/{streams[2]}")
        assert status == 200 and shown["status"] == "completed" and shown["chunks"] == 3

        direct = ("--config", str(tmp_path / "relay.toml"), "--redis-url", redis_cluster.seed_url)
        (tmp_path / "relay.toml").write_text(f'[redis]\nkey_prefix = "{key_prefix}"\n')
        result = await asyncio.to_thread(CliRunner().invoke, main, ["streams", "ls", *direct, "--json"])
        assert result.exit_code == 0, result.output
        assert sorted(s["id"] for s in orjson.loads(result.stdout)["streams"]) == sorted(streams)
        result = await asyncio.to_thread(CliRunner().invoke, main, ["streams", "export", streams[2], *direct])
        assert result.exit_code == 0, result.output
        exported = [orjson.loads(line) for line in result.stdout.splitlines()]
        assert [f.get("data") for f in exported] == [f"{streams[2]}:{seq}" for seq in (1, 2, 3)] + [None]

        assert b.session is not None
        async with b.session.get(
            f"{b.url}/v1/admin/streams/{streams[1]}/export", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            lines = [orjson.loads(line) async for line in resp.content if line.strip()]
        assert [f["type"] for f in lines] == ["chunk", "chunk", "end", "exported"]

        for stream in streams[1:]:
            status, body = await admin_call(b, "DELETE", f"/v1/admin/streams/{stream}")
            assert (status, body["deleted"]) == (200, True)
        status, body = await admin_call(b, "DELETE", f"/v1/admin/streams/{streams[0]}", params={"force": "1"})
        assert (status, body["ended_first"]) == (200, True)
        status, body = await admin_call(b, "GET", "/v1/admin/streams", params={"status": "all"})
        assert body["streams"] == []
        assert b.server.store is not None and await b.server.store.open_count() == 0


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_scripts_flushed_mid_stream_are_loaded_again(
    kind: str, request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path
) -> None:
    """SCRIPT FLUSH on every server (a restart without persistence, an operator): the next
    EVALSHA gets NOSCRIPT, the scripts are loaded again and the write goes through."""
    if kind == "cluster":
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        url, servers = cluster.seed_url, [node.url for node in cluster.masters()]
    else:
        url = request.getfixturevalue("redis_server")
        servers = [url]
    async with Relayd(make_config(url, key_prefix, str(tmp_path))) as server:
        producer = await server.producer()
        await producer.open("flushed")
        assert (await producer.append("flushed", 1, 1))["type"] == "ack"
        for node_url in servers:
            await asyncio.to_thread(_script_flush, node_url)
        assert (await producer.append("flushed", 2, 2))["type"] == "ack"
        assert (await producer.end("flushed"))["type"] == "ended"
        consumer = await server.consumer("flushed")
        chunks, _ = await collect_chunks(consumer, "flushed")
        assert [f["data"] for f in chunks] == [1, 2]


def _script_flush(url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        client.script_flush()


# failover ------------------------------------------------------------------------------------------


async def produce_through(producer: Peer, stream: str, first: int, last: int) -> None:
    """Append ``first..last`` (the chunk is its seq), one at a time, until each is acknowledged.

    A refusal that says the store lost or missed something is answered as the SDK does: resend
    from what is stored (``seq_gap`` carries the last stored seq; the test keeps every chunk).
    """
    seq = first
    while seq <= last:
        frame = await producer.append(stream, seq, seq)
        if frame["type"] == "ack" or frame.get("code") == "seq_gap":
            seq = frame["seq"] + 1
        elif frame.get("code") == "store_unavailable":
            continue
        else:
            raise AssertionError(f"unexpected answer to append {seq}: {frame}")


def check_delivery(frames: list[dict[str, Any]], end: dict[str, Any], last: int) -> bool:
    """No duplicate, no silent gap: the chunks come in runs, each from offset 1 on, consecutive,
    the chunk at offset n being n; a new run only after a reset with reason history_lost; the
    last run is the whole stream, then the end. True if history was lost (and said so)."""
    runs: list[list[int]] = [[]]
    for frame in frames:
        if frame["type"] == "reset":
            assert frame["reason"] == "history_lost", frame
            runs.append([])
        else:
            assert frame["type"] == "chunk", frame  # a gap frame would mean chunks lost
            offset = int(frame["cursor"].rsplit("-", 1)[1])
            assert frame["data"] == offset, frame
            runs[-1].append(offset)
    for run in runs:
        assert run == list(range(1, len(run) + 1)), run
    assert runs[-1] == list(range(1, last + 1))
    assert end["reason"] == "completed"
    return len(runs) > 1


async def failover_mid_stream(
    cluster: Cluster, key_prefix: str, tmp_path: Path, fail: Callable[[ClusterNode], object]
) -> bool:
    """Producer on A appends from 1 on; ``fail(master of the stream)`` starts at chunk 20 and the
    appends go on all through it, then 20 more; a consumer on B reads it all. Returns whether
    history was lost (checked either way)."""
    config = cluster_config(cluster, key_prefix, tmp_path, redis={"retry_ms": 30_000})
    stream = "fo-1"
    master = cluster.owner_of(key_slot(Keys(key_prefix).meta(stream)))
    async with instances(config) as (a, b):
        producer = await a.producer()
        assert (await producer.open(stream))["type"] == "opened"
        consumer = await b.consumer(stream)
        await consumer.expect("subscribed")
        await poll_until(lambda: b.relay.subscriber_count(stream) == 1, "registered")
        await produce_through(producer, stream, 1, 20)
        failing = asyncio.create_task(asyncio.to_thread(fail, master))
        seq = 21
        while not failing.done():  # appends all through the failover
            await produce_through(producer, stream, seq, seq)
            seq += 1
        await failing
        last = seq + 19
        await produce_through(producer, stream, seq, last)
        assert (await producer.end(stream))["type"] == "ended"
        frames, end = await consumer.until("end", timeout=30)
        return check_delivery(frames, end, last)


async def test_a_manual_failover_mid_stream_loses_nothing(
    redis_cluster_replicas: Cluster, key_prefix: str, tmp_path: Path
) -> None:
    """CLUSTER FAILOVER on the replica of the stream's master while chunks flow: the producer's
    writes follow the new master, B's consumer gets every chunk once, in order, and the end.
    A manual failover waits for the replica to catch up, so no history is lost."""

    def promote(master: ClusterNode) -> None:
        redis_cluster_replicas.failover(redis_cluster_replicas.replicas_of(master)[0])

    lost = await failover_mid_stream(redis_cluster_replicas, key_prefix, tmp_path, promote)
    assert not lost


async def test_a_killed_master_mid_stream_loses_nothing_silently(
    redis_cluster_replicas: Cluster, key_prefix: str, tmp_path: Path
) -> None:
    """SIGKILL of the stream's master while chunks flow: its replica takes over (~2 s); the
    producer's writes wait and follow it; B's consumer gets every chunk once, in order, and the
    end, or, if the replica lacked acknowledged writes (asynchronous replication), a reset with
    reason history_lost first and then the whole stream as stored."""
    cluster = redis_cluster_replicas

    def kill(master: ClusterNode) -> None:
        # Once the replica has what the master had at the start (the stream, chunks 1-20), kill
        # it while appends flow: only the last ones can be missing on the replica.
        target = master.command("INFO", "replication")["master_repl_offset"]
        cluster._wait(lambda: master.command("INFO", "replication")["slave0"]["offset"] >= target, 10)
        cluster.kill(master)

    lost = await failover_mid_stream(cluster, key_prefix, tmp_path, kill)
    print(f"killed master: history lost = {lost}")


async def test_a_failover_to_a_replica_that_missed_acknowledged_writes_resets_with_history_lost(
    redis_cluster_replicas: Cluster, key_prefix: str, tmp_path: Path
) -> None:
    """The replica is frozen (SIGSTOP) and cut off while chunks 21-25 are acknowledged and delivered to B;
    the master is killed and the replica, thawed, takes over without them. B's consumer gets
    reset(history_lost) and the stream as stored (1-20), never a silent skip; the producer is
    told ``seq_gap`` (last stored: 20), resends, and B gets 21-30 and the end."""
    cluster = redis_cluster_replicas
    config = cluster_config(cluster, key_prefix, tmp_path, redis={"retry_ms": 30_000})
    stream = "lost-1"
    master = cluster.owner_of(key_slot(stream))
    replica = cluster.replicas_of(master, online=True)[0]
    async with instances(config) as (a, b):
        producer = await a.producer()
        assert (await producer.open(stream))["type"] == "opened"
        consumer = await b.consumer(stream)
        await consumer.expect("subscribed")
        await poll_until(lambda: b.relay.subscriber_count(stream) == 1, "registered")
        await produce_through(producer, stream, 1, 20)
        target = master.command("INFO", "replication")["master_repl_offset"]
        await poll_until(lambda: master.command("INFO", "replication")["slave0"]["offset"] >= target, "replicated")
        # Frozen, and cut off: what the master writes next never reaches it (a frozen replica
        # alone would read it from its socket once thawed).
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            master.command("CLIENT", "KILL", "TYPE", "replica")
            await produce_through(producer, stream, 21, 25)
            assert [(await consumer.expect("chunk"))["data"] for _ in range(25)] == list(range(1, 26))
            master.proc.kill()
            master.proc.wait()
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        await asyncio.to_thread(
            cluster._wait, lambda: all(cluster._roles(n).get(replica.node_id) == "master" for n in cluster.alive), 20
        )
        reset = await consumer.expect("reset", timeout=20)
        assert reset["reason"] == "history_lost"
        assert [(await consumer.expect("chunk"))["data"] for _ in range(20)] == list(range(1, 21))
        frame = await producer.append(stream, 26, 26)
        assert (frame["type"], frame.get("code"), frame.get("seq")) == ("error", "seq_gap", 20)
        await produce_through(producer, stream, 21, 30)
        assert (await producer.end(stream))["type"] == "ended"
        chunks, end = await collect_chunks(consumer, stream)
        assert [f["data"] for f in chunks] == list(range(21, 31)) and end["reason"] == "completed"
