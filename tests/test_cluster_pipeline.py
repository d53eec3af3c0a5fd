"""relayd.store.cluster: pipelined writes to a real Valkey Cluster, through redirects and failures."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest

from relayd.embedded import free_port
from relayd.errors import StoreUnavailable
from relayd.store.cluster import ClusterWriter
from relayd.store.resp import encode_command
from relayd.store.slots import key_slot
from tests.conftest_cluster import Cluster

# Appends ARGV[1] to a per-stream list if it is the next sequence number: idempotent like
# relayd's append script, and an out-of-order write shows up as a GAP error reply. With
# ARGV[2] == "0" a gap is accepted (a killed master may lose its last acknowledged writes).
ORDERED_APPEND = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local seq = tonumber(ARGV[1])
if seq <= last then return 'dup' end
if seq ~= last + 1 and ARGV[2] == '1' then return redis.error_reply('GAP ' .. last .. ' ' .. seq) end
redis.call('RPUSH', KEYS[1], seq)
redis.call('SET', KEYS[2], seq)
return 'ok'
"""
ORDERED_SHA = hashlib.sha1(ORDERED_APPEND.encode()).hexdigest()


def append(prefix: str, stream: int, seq: int, strict: bool = True) -> tuple[int, bytes]:
    list_key, last_key = f"{prefix}:{{s{stream}}}:list", f"{prefix}:{{s{stream}}}:last"
    command = encode_command(["EVALSHA", ORDERED_SHA, 2, list_key, last_key, seq, "1" if strict else "0"])
    return key_slot(list_key), command


def stored(cluster: Cluster, prefix: str, stream: int) -> list[int]:
    key = f"{prefix}:{{s{stream}}}:list"
    with cluster.owner_of(key_slot(key)).client() as client:
        return [int(v) for v in client.lrange(key, 0, -1)]


@pytest.fixture
async def writer(redis_cluster: Cluster) -> AsyncIterator[ClusterWriter]:
    w = ClusterWriter(redis_cluster.seed_url, timeout_s=5.0, scripts=[ORDERED_APPEND])
    await w.start()
    yield w
    await w.close()


async def test_replies_come_in_submission_order_across_masters(
    writer: ClusterWriter, redis_cluster: Cluster, key_prefix: str
) -> None:
    """One batch over keys on every master: each reply sits at its command's index."""
    keys = [f"{key_prefix}:k{i}" for i in range(60)]
    assert len({writer.node_for_slot(key_slot(k)) for k in keys}) == 3
    commands = []
    for i, key in enumerate(keys):
        commands.append((key_slot(key), encode_command(["SET", key, f"v{i}"])))
        commands.append((key_slot(key), encode_command(["GET", key])))
    replies = await writer.send(commands)
    assert replies == [r for i in range(60) for r in (b"OK", f"v{i}".encode())]
    assert await writer.send([]) == []


async def test_errors_stay_in_their_place(writer: ClusterWriter, key_prefix: str) -> None:
    """A command refused by Redis is a ReplyError at its index; its neighbours are unaffected."""
    key = f"{key_prefix}:x"
    replies = await writer.send([(key_slot(key), encode_command(["SET", key, "1"])), (0, encode_command(["NOPE"]))])
    assert replies[0] == b"OK"
    assert isinstance(replies[1], hiredis.ReplyError)


async def test_pipelined_batches_keep_per_slot_order(
    writer: ClusterWriter, redis_cluster: Cluster, key_prefix: str
) -> None:
    """Fifty batches in flight at once, 30 streams each: every append runs in order."""
    batches = [[append(key_prefix, s, seq) for s in range(30)] for seq in range(1, 51)]
    results = await asyncio.gather(*(writer.send(b) for b in batches))
    assert all(reply == b"ok" for replies in results for reply in replies)
    assert all(stored(redis_cluster, key_prefix, s) == list(range(1, 51)) for s in range(30))


async def test_moved_and_ask_during_a_slot_migration(
    writer: ClusterWriter, redis_cluster: Cluster, key_prefix: str
) -> None:
    """ASK while a slot is half migrated, MOVED once it is: both followed, order kept."""
    slot, _ = append(key_prefix, 0, 1)
    assert (await writer.send([append(key_prefix, 0, 1)])) == [b"ok"]
    source = redis_cluster.owner_of(slot)
    target = next(n for n in redis_cluster.masters() if n is not source)
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    keys = source.command("CLUSTER", "GETKEYSINSLOT", slot, 100)
    source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    # the source no longer has the keys: it answers ASK and the writer asks the target
    assert await writer.send([append(key_prefix, 0, 2), append(key_prefix, 0, 3)]) == [b"ok", b"ok"]
    assert writer.node_for_slot(slot) == source.addr  # ASK does not change the map
    for node in redis_cluster.masters():
        node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    redis_cluster.wait_ok()
    # the source now answers MOVED: the writer re-reads the map and follows. A batch sent once
    # the MOVED is known, while the bounced one waits for its resend, must not overtake it.
    probe = next(k for i in range(1000) if writer.node_for_slot(key_slot(k := f"{key_prefix}:p{i}")) == source.addr)
    first = writer.send([append(key_prefix, 0, 4)])
    # the source answers in order: once the probe is answered, the MOVED before it was read
    await writer.send([(key_slot(probe), encode_command(["GET", probe]))])
    assert writer.node_for_slot(slot) == target.addr
    second = writer.send([append(key_prefix, 0, seq) for seq in range(5, 10)])
    assert await first == [b"ok"]
    assert await second == [b"ok"] * 5
    assert stored(redis_cluster, key_prefix, 0) == list(range(1, 10))


async def test_killed_connections_recover(writer: ClusterWriter, redis_cluster: Cluster, key_prefix: str) -> None:
    """CLIENT KILL on every master while batches stream: all are answered, nothing reordered."""

    progress = Progress()

    async def stream_writes() -> None:
        for seq in range(1, 201):
            replies = await writer.send([append(key_prefix, s, seq) for s in range(12)])
            assert replies == [b"ok"] * 12
            await progress.add()

    task = asyncio.create_task(stream_writes())
    await progress.reach(20)
    killed = sum(node.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") for node in redis_cluster.masters())
    assert killed >= 3
    await task
    assert all(stored(redis_cluster, key_prefix, s) == list(range(1, 201)) for s in range(12))


async def test_a_node_that_does_not_answer_fails_the_batch_in_time(
    writer: ClusterWriter, redis_cluster: Cluster, key_prefix: str
) -> None:
    """A paused master: the batch fails with StoreUnavailable at its deadline; later ones work."""
    key = f"{key_prefix}:paused"
    node = redis_cluster.owner_of(key_slot(key))
    node.command("CLIENT", "PAUSE", 10_000, "WRITE")  # SET waits; UNPAUSE does not
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="in time"):
            await writer.send([(key_slot(key), encode_command(["SET", key, "1"]))], timeout_s=0.3)
        assert time.monotonic() - started < 2
    finally:
        node.command("CLIENT", "UNPAUSE")
    assert await writer.send([(key_slot(key), encode_command(["SET", key, "2"]))]) == [b"OK"]


async def test_no_reachable_seed_is_store_unavailable() -> None:
    writer = ClusterWriter(f"redis+cluster://127.0.0.1:{free_port()}", timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="cluster topology"):
        await writer.start()
    await writer.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await writer.send([(0, encode_command(["PING"]))])


async def test_failover_and_killed_master_mid_stream(redis_cluster_replicas: Cluster, key_prefix: str) -> None:
    """Writes keep flowing through a manual failover and a killed master; per-slot order holds."""
    cluster = redis_cluster_replicas
    writer = ClusterWriter(cluster.seed_url, timeout_s=10.0, scripts=[ORDERED_APPEND])
    await writer.start()
    streams = range(24)
    progress = Progress()
    strict = True
    sent = 0
    stop = asyncio.Event()

    async def stream_writes() -> None:
        nonlocal sent
        pending: list[asyncio.Future[list[Any]]] = []
        while not stop.is_set() or pending:
            if not stop.is_set() and len(pending) < 4:  # four batches in flight at a time
                sent += 1
                pending.append(writer.send([append(key_prefix, s, sent, strict) for s in streams]))
                continue
            replies = await pending.pop(0)
            assert all(r in (b"ok", b"dup") for r in replies), replies
            await progress.add()

    task = asyncio.create_task(stream_writes())
    try:
        await progress.reach(20)
        (replica,) = cluster.replicas_of(cluster.masters()[0])
        await asyncio.to_thread(cluster.failover, replica)
        await progress.reach(progress.count + 20, timeout_s=10)
        assert replica.addr in writer.masters
        strict = False  # a killed master may take its last acknowledged writes with it
        victim = next(n for n in cluster.masters() if n is not replica)
        await asyncio.to_thread(cluster.kill, victim)
        await progress.reach(progress.count + 20, timeout_s=10)  # writes resume
    finally:
        stop.set()
        await task
        await writer.close()
    for s in streams:
        values = stored(cluster, key_prefix, s)
        assert values == sorted(set(values)), f"stream {s} reordered: {values}"
        assert values[-1] == sent  # every batch was answered "ok": the last one is stored


class Progress:
    """A count of acknowledged batches that a test can wait on."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def add(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def reach(self, count: int, timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self.count >= count)
