"""relayd.store.pubsub: the broker's subscriptions, on one real Valkey and on a real cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from relayd.embedded import free_port
from relayd.errors import StoreUnavailable
from relayd.store.pubsub import PubSub, RedisPubSub
from relayd.store.slots import key_slot
from tests.conftest_cluster import Cluster

# the shape of relayd's append script: write in the stream's slot, notify in the same script
WRITE_AND_PUBLISH = "redis.call('RPUSH', KEYS[1], ARGV[1]); return redis.call('{publish}', KEYS[2], ARGV[1])"


class Recorder:
    """The broker's side: messages, resets and confirmed subscriptions, each awaitable."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        self.resets = 0
        self.subscribed: list[bytes] = []
        self._changed = asyncio.Condition()

    def on_message(self, channel: bytes, payload: bytes) -> None:
        self.messages.put_nowait((channel, payload))

    def on_reset(self) -> None:
        self.resets += 1
        asyncio.get_running_loop().create_task(self._notify())

    def on_subscribed(self, channel: bytes) -> None:
        self.subscribed.append(channel)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(condition)

    async def next(self, timeout_s: float = 5.0) -> tuple[bytes, bytes]:
        async with asyncio.timeout(timeout_s):
            return await self.messages.get()


def make(url: str, recorder: Recorder, sharded: bool = False) -> RedisPubSub:
    return RedisPubSub(
        url,
        recorder.on_message,
        recorder.on_reset,
        sharded=sharded,
        on_subscribed=recorder.on_subscribed,
        timeout_s=2.0,
        ping_interval_s=0.5,
    )


@pytest.fixture
async def client(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    async with aioredis.Redis.from_url(redis_server) as c:
        yield c


# single node ---------------------------------------------------------------------------------


async def test_publish_inside_a_script_reaches_subscribers(
    redis_server: str, client: aioredis.Redis, key_prefix: str
) -> None:
    """PUBLISH inside EVAL works on a single node; stream and global channels both arrive."""
    rec = Recorder()
    pubsub: PubSub = make(redis_server, rec)
    await pubsub.start()
    live, glob = f"{key_prefix}:{{s1}}:live".encode(), f"{key_prefix}:ctl".encode()
    pubsub.subscribe(live)
    pubsub.subscribe(live)  # idempotent
    pubsub.subscribe_global(glob)
    await rec.until(lambda: live in rec.subscribed)
    script = WRITE_AND_PUBLISH.format(publish="PUBLISH")
    assert await client.eval(script, 2, f"{key_prefix}:{{s1}}:log", live, "c1") == 1
    assert await rec.next() == (live, b"c1")
    await client.publish(glob, b"cancel")
    assert await rec.next() == (glob, b"cancel")
    assert pubsub.up
    await pubsub.close()
    assert not pubsub.up


async def test_subscribe_unsubscribe_races(redis_server: str, client: aioredis.Redis, key_prefix: str) -> None:
    """Subscribe, unsubscribe, subscribe before any answer: subscribed; unsubscribe stops delivery."""
    rec = Recorder()
    pubsub = make(redis_server, rec)
    await pubsub.start()
    a, b = f"{key_prefix}:{{a}}:live".encode(), f"{key_prefix}:{{b}}:live".encode()
    pubsub.subscribe(a)
    pubsub.unsubscribe(a)
    pubsub.subscribe(a)
    pubsub.subscribe(b)
    pubsub.unsubscribe(b)
    pubsub.unsubscribe(b)  # idempotent
    await rec.until(lambda: rec.subscribed.count(a) == 2)
    await client.publish(b, b"not wanted")
    await client.publish(a, b"wanted")
    assert await rec.next() == (a, b"wanted")
    assert rec.messages.empty()
    assert await client.execute_command("PUBSUB", "NUMSUB", a, b) == [a, 1, b, 0]
    await pubsub.close()


async def test_killed_connection_resubscribes_then_resets(
    redis_server: str, client: aioredis.Redis, key_prefix: str
) -> None:
    """CLIENT KILL TYPE pubsub: reconnect, resubscribe, then on_reset; later messages arrive."""
    rec = Recorder()
    pubsub = make(redis_server, rec)
    await pubsub.start()
    live, glob = f"{key_prefix}:{{s}}:live".encode(), f"{key_prefix}:g".encode()
    pubsub.subscribe(live)
    pubsub.subscribe_global(glob)
    await rec.until(lambda: live in rec.subscribed)
    assert await client.client_kill_filter(_type="pubsub") >= 1
    await rec.until(lambda: rec.resets == 1)
    assert pubsub.up
    # on_reset came after the server confirmed the subscriptions: a publish now is delivered
    await client.publish(live, b"after")
    await client.publish(glob, b"g-after")
    assert {await rec.next(), await rec.next()} == {(live, b"after"), (glob, b"g-after")}
    await pubsub.close()


async def test_unreachable_server_is_store_unavailable() -> None:
    pubsub = make(f"redis://127.0.0.1:{free_port()}", Recorder())
    with pytest.raises(StoreUnavailable):
        await pubsub.start()
    await pubsub.close()


# cluster -------------------------------------------------------------------------------------


def channels_on_every_master(cluster: Cluster, prefix: str) -> list[bytes]:
    """One stream channel per master."""
    found: dict[int, bytes] = {}
    for i in range(200):
        channel = f"{prefix}:{{s{i}}}:live".encode()
        found.setdefault(cluster.owner_of(key_slot(channel)).port, channel)
        if len(found) == len(cluster.masters()):
            return list(found.values())
    raise AssertionError("no channel found for some master")


async def spublish_by_script(cluster: Cluster, channel: bytes, payload: bytes) -> int:
    """The append script's pattern on a cluster: write a key and SPUBLISH in one script."""
    log_key = channel.replace(b":live", b":log")
    node = cluster.owner_of(key_slot(channel))
    async with aioredis.Redis(port=node.port) as c:
        result: int = await c.eval(WRITE_AND_PUBLISH.format(publish="SPUBLISH"), 2, log_key, channel, payload)
        return result


async def test_sharded_and_global_channels_on_a_cluster(redis_cluster: Cluster, key_prefix: str) -> None:
    """SPUBLISH inside a script on each master reaches the SSUBSCRIBEr; PUBLISH reaches SUBSCRIBE."""
    rec = Recorder()
    pubsub = make(redis_cluster.seed_url, rec, sharded=True)
    await pubsub.start()
    channels = channels_on_every_master(redis_cluster, key_prefix)
    for channel in channels:
        pubsub.subscribe(channel)
    glob = f"{key_prefix}:ctl".encode()
    pubsub.subscribe_global(glob)
    await rec.until(lambda: set(channels) <= set(rec.subscribed) and pubsub.up)
    for i, channel in enumerate(channels):
        assert await spublish_by_script(redis_cluster, channel, b"c%d" % i) == 1
        assert await rec.next() == (channel, b"c%d" % i)
    other = redis_cluster.masters()[-1]  # a cluster forwards PUBLISH to every node
    async with aioredis.Redis(port=other.port) as c:
        await c.publish(glob, b"cancel")
    assert await rec.next() == (glob, b"cancel")
    assert rec.resets == 0
    await pubsub.close()


async def test_spublish_to_another_slot_in_a_script_is_refused(redis_cluster: Cluster, key_prefix: str) -> None:
    """A script may SPUBLISH only in the slot of its keys (why the channel holds the hash tag)."""
    key, channel = f"{key_prefix}:{{a}}:log", f"{key_prefix}:{{b}}:live"
    assert key_slot(key) != key_slot(channel)
    node = redis_cluster.owner_of(key_slot(key))
    async with aioredis.Redis(port=node.port) as c:
        with pytest.raises(redis.exceptions.ResponseError):
            await c.eval(WRITE_AND_PUBLISH.format(publish="SPUBLISH"), 1, key, "x")  # channel undeclared
        with pytest.raises(redis.exceptions.ResponseError):
            await c.eval(WRITE_AND_PUBLISH.format(publish="SPUBLISH"), 2, key, channel, "x")


async def test_cluster_connections_killed_then_reset(redis_cluster: Cluster, key_prefix: str) -> None:
    """CLIENT KILL TYPE pubsub on every master: all resubscribed, then one reset, then delivery."""
    rec = Recorder()
    pubsub = make(redis_cluster.seed_url, rec, sharded=True)
    await pubsub.start()
    channels = channels_on_every_master(redis_cluster, key_prefix)
    for channel in channels:
        pubsub.subscribe(channel)
    await rec.until(lambda: set(channels) <= set(rec.subscribed) and pubsub.up)
    killed = 0
    for node in redis_cluster.masters():
        async with aioredis.Redis(port=node.port) as c:
            killed += await c.client_kill_filter(_type="pubsub")
    assert killed >= 3
    await rec.until(lambda: rec.resets >= 1 and pubsub.up)
    for channel in channels:
        assert await spublish_by_script(redis_cluster, channel, b"after") == 1
        assert await rec.next() == (channel, b"after")
    await pubsub.close()


async def test_slot_moved_away_resubscribes_on_the_new_master(redis_cluster: Cluster, key_prefix: str) -> None:
    """The server's own sunsubscribe when a slot migrates: SSUBSCRIBE at the new owner, reset."""
    rec = Recorder()
    pubsub = make(redis_cluster.seed_url, rec, sharded=True)
    await pubsub.start()
    channel = f"{key_prefix}:{{moving}}:live".encode()
    slot = key_slot(channel)
    pubsub.subscribe(channel)
    await rec.until(lambda: channel in rec.subscribed and pubsub.up)
    source = redis_cluster.owner_of(slot)
    target = next(n for n in redis_cluster.masters() if n is not source)
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    for node in redis_cluster.masters():
        node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    redis_cluster.wait_ok()
    await rec.until(lambda: rec.resets == 1 and pubsub.up)
    assert await spublish_by_script(redis_cluster, channel, b"moved") == 1
    assert await rec.next() == (channel, b"moved")
    await pubsub.close()
