"""The admin API (``/v1/admin/...``) against a real relayd and Valkey, read with a real HTTP client."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from relayd.auth import hash_api_key
from relayd.config import Config
from relayd.store.keys import Keys
from tests.helpers import Peer, Relayd, collect_chunks

ADMIN_KEY = "rk_admin_test_key_0123456789abcdef"


@pytest.fixture
async def admin(config_factory: Callable[..., Config]) -> AsyncIterator[Relayd]:
    """relayd with one admin key configured (as a hash, like auth.api_keys)."""
    async with Relayd(config_factory(auth={"admin_keys": [hash_api_key(ADMIN_KEY)]})) as server:
        yield server


@pytest.fixture
async def rds(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    """A redis-py client on the session's server: the test reads (or breaks) relayd's keys with it."""
    client = aioredis.Redis.from_url(redis_server)
    try:
        yield client
    finally:
        await client.aclose()


async def call(
    relayd: Relayd, method: str, path: str, *, key: str | None = ADMIN_KEY, **kwargs: Any
) -> tuple[int, Any]:
    assert relayd.session is not None
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with relayd.session.request(method, f"{relayd.url}{path}", headers=headers, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def ndjson(relayd: Relayd, path: str, **params: str) -> list[dict[str, Any]]:
    """Every object of a streamed NDJSON answer, read to its end."""
    assert relayd.session is not None
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with relayd.session.get(f"{relayd.url}{path}", headers=headers, params=params) as resp:
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        return [orjson.loads(line) async for line in resp.content if line.strip()]


async def produce(producer: Peer, stream: str, chunks: list[Any], end: str | None = None, **open_fields: Any) -> None:
    opened = await producer.open(stream, **open_fields)
    assert opened["type"] == "opened", opened
    for seq, chunk in enumerate(chunks, start=1):
        assert (await producer.append(stream, seq, chunk))["type"] == "ack"
    if end is not None:
        assert (await producer.end(stream, end))["type"] == "ended"


ROUTES = [
    ("GET", "/v1/admin/status"),
    ("GET", "/v1/admin/streams"),
    ("GET", "/v1/admin/streams/s-1"),
    ("GET", "/v1/admin/streams/s-1/tail"),
    ("GET", "/v1/admin/streams/s-1/export"),
    ("POST", "/v1/admin/streams/s-1/end"),
    ("DELETE", "/v1/admin/streams/s-1"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_route_refuses_a_missing_or_wrong_admin_key(admin: Relayd, method: str, path: str) -> None:
    """No key, a wrong key, or a producer API key: 401 with a JSON error, and nothing happens."""
    from tests.helpers import API_KEY

    for key, message in ((None, "missing admin key"), ("rk_wrong_key_0123456789abcdef", "invalid admin key")):
        status, body = await call(admin, method, path, key=key)
        assert (status, body) == (401, {"error": {"code": "unauthorized", "message": message}})
    status, _ = await call(admin, method, path, key=API_KEY)
    assert status == 401


async def test_admin_api_is_off_without_admin_keys(relayd: Relayd) -> None:
    """API keys configured but no admin key: every admin route says how to turn it on."""
    status, body = await call(relayd, "GET", "/v1/admin/status")
    assert status == 401 and "auth.admin_keys" in body["error"]["message"]


async def test_admin_keys_from_the_environment(config_factory: Callable[..., Config], tmp_path: Path) -> None:
    """RELAYD_ADMIN_KEYS holds plain keys, like RELAYD_API_KEYS."""
    from relayd.config import build_config

    base = config_factory()
    config = build_config(
        {
            "redis": {"url": base.redis.url, "key_prefix": base.redis.key_prefix},
            "server": {"port": 0},
            "auth": {"api_keys": list(base.auth.api_keys), "jwt_secret": base.auth.jwt_secret},
            "embedded": {"data_dir": str(tmp_path)},
        },
        env={"RELAYD_ADMIN_KEYS": f"{ADMIN_KEY}, rk_other_admin_key_0123456789"},
    )
    async with Relayd(config) as server:
        assert (await call(server, "GET", "/v1/admin/status"))[0] == 200
        assert (await call(server, "GET", "/v1/admin/status", key="rk_other_admin_key_0123456789"))[0] == 200


async def test_dev_mode_writes_and_accepts_a_development_admin_key(
    config_factory: Callable[..., Config], tmp_path: Path
) -> None:
    """No API key configured: the third line of dev-credentials is an admin key relayd accepts, kept across restarts."""
    config = config_factory(auth={"api_keys": []})
    async with Relayd(config) as server:
        lines = (tmp_path / "dev-credentials").read_text().split()
        assert len(lines) == 3 and lines[2] == server.server.dev_admin_key
        assert (await call(server, "GET", "/v1/admin/status", key=lines[2]))[0] == 200
        assert (await call(server, "GET", "/v1/admin/status", key=lines[0]))[0] == 401  # the dev API key is not one
    async with Relayd(config) as server:
        assert (tmp_path / "dev-credentials").read_text().split() == lines
        assert (await call(server, "GET", "/v1/admin/status", key=lines[2]))[0] == 200


async def test_unknown_and_invalid_streams(admin: Relayd) -> None:
    """An unknown stream is 404 stream_not_found on every per-stream route; an invalid id is 400."""
    for method, path in ROUTES[2:]:
        body = {"json": {"reason": "completed"}} if method == "POST" else {}
        status, answer = await call(admin, method, path.replace("s-1", "nope-1"), **body)
        assert status == 404 and answer["error"]["code"] == "stream_not_found", (path, answer)
    status, answer = await call(admin, "GET", "/v1/admin/streams/bad%20id")
    assert status == 400 and answer["error"]["code"] == "invalid_stream_id"


async def test_ls_filters_by_status_and_prefix_newest_first(admin: Relayd) -> None:
    """ls lists every stream with its status, chunk count, size, age and local consumers."""
    async with await admin.producer() as producer:
        await produce(producer, "a-1", ["x", "y"], end="completed")
        await produce(producer, "a-2", [{"n": 1}])
        await produce(producer, "b-1", [])
        consumer = await admin.consumer("a-2")
        await consumer.expect("subscribed")
        await consumer.expect("chunk")  # replayed: the subscription is registered with the hub

        status, body = await call(admin, "GET", "/v1/admin/streams")
        assert status == 200 and body["truncated"] is False
        assert sorted(s["id"] for s in body["streams"]) == ["a-1", "a-2", "b-1"]
        created = [s["created_ms"] for s in body["streams"]]
        assert created == sorted(created, reverse=True)
        by_id = {s["id"]: s for s in body["streams"]}
        assert by_id["a-1"]["status"] == "completed" and by_id["a-1"]["chunks"] == 2
        assert by_id["a-2"]["status"] == "open" and by_id["a-2"]["chunks"] == 1
        assert by_id["a-2"]["consumers"] == 1 and by_id["a-1"]["consumers"] == 0
        assert all(s["bytes"] > 0 and s["age_s"] >= 0 for s in body["streams"])

        async def ids(**params: str) -> list[str]:
            status, body = await call(admin, "GET", "/v1/admin/streams", params=params)
            assert status == 200, body
            return [s["id"] for s in body["streams"]]

        assert sorted(await ids(status="open")) == ["a-2", "b-1"]
        assert await ids(status="ended") == ["a-1"]
        assert sorted(await ids(prefix="a-")) == ["a-1", "a-2"]
        assert await ids(status="open", prefix="a-") == ["a-2"]
        status, body = await call(admin, "GET", "/v1/admin/streams", params={"limit": "1"})
        assert len(body["streams"]) == 1 and body["truncated"] is True
        for bad in ({"status": "closed"}, {"limit": "0"}, {"prefix": "a b"}):
            assert (await call(admin, "GET", "/v1/admin/streams", params=bad))[0] == 400
        await consumer.ws.close()


async def command_calls(rds: aioredis.Redis, name: str) -> int:
    """Calls of a command (``memory`` counts ``MEMORY USAGE``) the server has run so far."""
    stats = await rds.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.removeprefix("cmdstat_").split("|")[0] == name)


async def test_ls_reads_full_stats_only_for_the_streams_it_shows(admin: Relayd, rds: aioredis.Redis) -> None:
    """ls sorts every stream it finds on one HMGET each; XLEN and MEMORY USAGE run only for the ``limit`` shown."""
    async with await admin.producer() as producer:  # connected throughout: no end or sweep meanwhile
        for i in range(12):
            await produce(producer, f"many-{i:02d}", [], end="completed" if i % 2 else None)
        everything = [s["id"] for s in (await call(admin, "GET", "/v1/admin/streams"))[1]["streams"]]
        assert sorted(everything) == [f"many-{i:02d}" for i in range(12)]
        ended = [i for i in everything if int(i[-2:]) % 2]
        for which, expected in (("all", everything), ("ended", ended)):
            before = [await command_calls(rds, name) for name in ("hmget", "xlen", "memory")]
            status, body = await call(admin, "GET", "/v1/admin/streams", params={"limit": "3", "status": which})
            assert status == 200 and [s["id"] for s in body["streams"]] == expected[:3] and body["truncated"] is True
            after = [await command_calls(rds, name) for name in ("hmget", "xlen", "memory")]
            # one HMGET per stream found, open or ended; XLEN and two MEMORY USAGE for each one shown
            assert [b - a for a, b in zip(before, after, strict=True)] == [12, 3, 6]


async def test_show_an_open_and_an_ended_stream(admin: Relayd) -> None:
    """show: status, end reason and message, content type, epoch, times, first/last cursor, size, TTL."""
    async with await admin.producer() as producer:
        await produce(producer, "s-open", ["a", "b", "c"], content_type="text")
        status, s = await call(admin, "GET", "/v1/admin/streams/s-open")
        assert status == 200
        assert s["status"] == "open" and s["reason"] is None and s["content_type"] == "text"
        assert (s["epoch"], s["seq"], s["chunks"], s["entries"]) == (1, 3, 3, 3)
        gen = s["first_cursor"].split("-")[0]
        assert s["first_cursor"] == f"{gen}-0000000001" and s["last_cursor"] == f"{gen}-0000000003"
        assert s["ended_ms"] is None and s["created_ms"] <= s["updated_ms"]
        assert 0 < s["ttl_s"] <= 86_400 and s["bytes"] > 0 and s["consumers"] == 0

        await produce(producer, "s-err", [1])
        await producer.end("s-err", "error", message="model timed out")
        status, s = await call(admin, "GET", "/v1/admin/streams/s-err")
        assert s["status"] == "error" and s["reason"] == "error" and s["message"] == "model timed out"
        assert s["chunks"] == 1 and s["entries"] == 2 and s["last_cursor"].endswith("-0000000002")
        assert s["ended_ms"] >= s["created_ms"] and 0 < s["ttl_s"] <= 3600


async def test_tail_follows_live_chunks_until_the_end(admin: Relayd) -> None:
    """tail without from: only chunks stored after it started, live, then the end; the response closes."""
    assert admin.session is not None
    async with await admin.producer() as producer:
        await produce(producer, "t-1", [{"old": 1}])
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with admin.session.get(f"{admin.url}/v1/admin/streams/t-1/tail", headers=headers) as resp:
            assert resp.status == 200
            await producer.append("t-1", 2, {"new": 2})
            first = orjson.loads(await resp.content.readline())
            assert first["type"] == "chunk" and first["data"] == {"new": 2} and first["cursor"].endswith("0002")
            await producer.append("t-1", 3, {"new": 3})
            await producer.end("t-1", "completed")
            rest = [orjson.loads(line) async for line in resp.content if line.strip()]
        assert [f["type"] for f in rest] == ["chunk", "end"] and rest[1]["reason"] == "completed"


async def test_tail_from_start_replays_then_ends(admin: Relayd) -> None:
    """tail from=start of an ended stream: every chunk, then the end; of an ended stream from now: just the end."""
    async with await admin.producer() as producer:
        await produce(producer, "t-2", ["a", "b"], end="cancelled", content_type="text")
    frames = await ndjson(admin, "/v1/admin/streams/t-2/tail", **{"from": "start"})
    assert [(f["type"], f.get("data") or f.get("reason")) for f in frames] == [
        ("chunk", "a"),
        ("chunk", "b"),
        ("end", "cancelled"),
    ]
    frames = await ndjson(admin, "/v1/admin/streams/t-2/tail")
    assert [f["type"] for f in frames] == ["end"]


async def test_tail_wait_ms_of_a_stream_not_there(admin: Relayd) -> None:
    """tail wait_ms=N of a missing stream: 200, then stream_not_found after N ms; bad wait_ms values get 400."""
    frames = await ndjson(admin, "/v1/admin/streams/t-none/tail", wait_ms="50")
    assert [(f["type"], f["code"]) for f in frames] == [("error", "stream_not_found")]
    assert (await call(admin, "GET", "/v1/admin/streams/t-none/tail", params={"wait_ms": "0"}))[0] == 404
    for bad in ("-1", "1.5", "²", "3600001", "9" * 5000):
        status, body = await call(admin, "GET", "/v1/admin/streams/t-none/tail", params={"wait_ms": bad})
        assert (status, body["error"]["code"]) == (400, "bad_frame"), bad


def handler_running(function: Callable[..., Any]) -> asyncio.Task[Any]:
    """The task whose chain of awaits is inside ``function`` now (the aiohttp handler serving a request)."""
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        while coro is not None:
            if getattr(coro, "cr_code", None) is function.__code__:
                return task
            coro = getattr(coro, "cr_await", None)
    raise AssertionError(f"no task in {function.__qualname__}")


@pytest.mark.parametrize("route", ["tail", "sse"])
async def test_a_cancelled_response_leaves_no_task_and_no_subscription(admin: Relayd, route: str) -> None:
    """A handler cancelled while it streams (shutdown, aiohttp's handler_cancellation) reaps every task it made."""
    # the interpreted function that awaits transport.deliver (compiled in the compiled build, where
    # its coroutines have no code object to find)
    from relayd.web.admin_tail import follow
    from relayd.web.sse import events as sse_route

    events = inspect.unwrap(sse_route)  # not the connection limit's wrapper, which every route shares

    assert admin.session is not None
    async with await admin.producer() as producer:
        await produce(producer, "cx-1", ["a"])
        if route == "tail":
            url, params = f"{admin.url}/v1/admin/streams/cx-1/tail", {"from": "start"}
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            name, streaming = "relayd-admin-tail-writer", follow
        else:
            url, params, headers = f"{admin.url}/v1/streams/cx-1/events", {"token": admin.token()}, {}
            name, streaming = "relayd-sse-writer", events
        async with admin.session.get(url, params=params, headers=headers) as resp:
            assert resp.status == 200
            while b'"a"' not in await resp.content.readline():  # the subscription delivers
                pass
            hub = admin.relay._hub
            assert hub.subscriber_count("cx-1") == 1
            assert any(t.get_name().startswith(name) for t in asyncio.all_tasks())
            handler = handler_running(streaming)
            handler.cancel()
            await asyncio.wait([handler])
            # no exception left behind as the thread's current one (tests/test_compiled_rules.py)
            assert sys.exc_info() == (None, None, None)
        assert hub.subscriber_count("cx-1") == 0
        assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(name)] == []


async def test_export_is_complete_and_in_order_across_pages(
    config_factory: Callable[..., Config],
) -> None:
    """export reads the stream page by page: every chunk once, in order, the end, and a trailer with the count."""
    config = config_factory(auth={"admin_keys": [hash_api_key(ADMIN_KEY)]}, consumer={"catchup_page": 7})
    async with Relayd(config) as server, await server.producer() as producer:
        await produce(producer, "e-1", [{"i": i} for i in range(50)], end="completed")
        await produce(producer, "e-open", ["only"])
        frames = await ndjson(server, "/v1/admin/streams/e-1/export")
        assert [f["data"]["i"] for f in frames[:-2]] == list(range(50))
        assert [f["cursor"] for f in frames[:-1]] == sorted(f["cursor"] for f in frames[:-1])
        assert frames[-2]["type"] == "end" and frames[-2]["reason"] == "completed"
        assert frames[-1] == {"type": "exported", "stream": "e-1", "chunks": 50, "cursor": frames[-2]["cursor"]}
        frames = await ndjson(server, "/v1/admin/streams/e-open/export")  # an open stream: what is stored now
        assert [f["type"] for f in frames] == ["chunk", "exported"] and frames[1]["chunks"] == 1


async def test_export_says_when_the_log_is_gone_but_the_meta_remains(
    admin: Relayd, rds: aioredis.Redis, key_prefix: str
) -> None:
    """History missing anywhere (log deleted or expired under its meta, entries removed): a gap says so."""
    async with await admin.producer() as producer:
        await produce(producer, "lost-1", ["a", "b", "c"], end="completed")
        await produce(producer, "lost-2", ["a", "b", "c", "d"])
        await produce(producer, "lost-3", ["a", "b", "c", "d", "e"], end="completed")
    keys = Keys(key_prefix)
    gen = (await call(admin, "GET", "/v1/admin/streams/lost-1"))[1]["first_cursor"].split("-")[0]
    assert await rds.delete(keys.log("lost-1")) == 1
    frames = await ndjson(admin, "/v1/admin/streams/lost-1/export")
    assert frames == [
        {"type": "gap", "stream": "lost-1", "cursor": f"{gen}-0000000000", "next": f"{gen}-0000000005"},
        {"type": "exported", "stream": "lost-1", "chunks": 0, "cursor": None},
    ]
    # The tail of the log gone (entries 3 and 4 of an open stream): what is there, then the gap.
    gen = (await call(admin, "GET", "/v1/admin/streams/lost-2"))[1]["first_cursor"].split("-")[0]
    assert await rds.xdel(keys.log("lost-2"), f"{gen}-3", f"{gen}-4") == 2
    frames = await ndjson(admin, "/v1/admin/streams/lost-2/export")
    assert [f["type"] for f in frames] == ["chunk", "chunk", "gap", "exported"]
    assert frames[2] == {"type": "gap", "stream": "lost-2", "cursor": f"{gen}-0000000002", "next": f"{gen}-0000000005"}
    assert frames[3]["chunks"] == 2 and frames[3]["cursor"] == f"{gen}-0000000002"
    # Entries gone from the middle of a page: a gap between the chunks around them.
    gen = (await call(admin, "GET", "/v1/admin/streams/lost-3"))[1]["first_cursor"].split("-")[0]
    assert await rds.xdel(keys.log("lost-3"), f"{gen}-2", f"{gen}-3") == 2
    frames = await ndjson(admin, "/v1/admin/streams/lost-3/export")
    assert [f.get("data") or f["type"] for f in frames] == ["a", "gap", "d", "e", "end", "exported"]
    assert (frames[1]["cursor"], frames[1]["next"]) == (f"{gen}-0000000001", f"{gen}-0000000004")


async def test_end_reaches_live_consumers_and_tells_the_producer(admin: Relayd) -> None:
    """end: a live consumer gets the end frame, the producer an ``ended`` frame and stream_ended afterwards."""
    async with await admin.producer() as producer:
        await produce(producer, "x-1", ["a"])
        consumer = await admin.consumer("x-1")
        await consumer.expect("subscribed")
        await consumer.expect("chunk", data="a")
        status, body = await call(
            admin, "POST", "/v1/admin/streams/x-1/end", json={"reason": "error", "message": "stopped by ops"}
        )
        assert status == 200 and body["result"] == "ended" and body["reason"] == "error"
        end = await consumer.expect("end", reason="error", message="stopped by ops")
        assert end["cursor"] == body["cursor"]
        told = await producer.next()
        assert told == {
            "type": "ended",
            "stream": "x-1",
            "reason": "error",
            "cursor": body["cursor"],
            "message": "stopped by ops",
        }
        await producer.send({"op": "append", "stream": "x-1", "seq": 2, "chunk": "late"})
        assert (await producer.next())["code"] == "stream_ended"

        status, body = await call(admin, "POST", "/v1/admin/streams/x-1/end", json={"reason": "error"})
        assert status == 200 and body["result"] == "already_ended"
        status, body = await call(admin, "POST", "/v1/admin/streams/x-1/end", json={"reason": "completed"})
        assert status == 409 and body["error"]["code"] == "stream_ended"
        status, body = await call(admin, "POST", "/v1/admin/streams/x-1/end", json={"reason": "producer_lost"})
        assert status == 400
        bodies: list[Any] = [
            {"reason": []},
            {"reason": {"a": 1}},
            {"reason": 1},
            {"reason": "error", "message": []},
            [],
        ]
        for bad in bodies:  # a reason or message of the wrong type, a body not an object
            status, body = await call(admin, "POST", "/v1/admin/streams/x-1/end", json=bad)
            assert status == 400 and body["error"]["code"] == "bad_frame", (bad, body)
        await consumer.ws.close()


async def test_rm_deletes_an_ended_stream_and_an_open_one_only_with_force(admin: Relayd) -> None:
    """rm of an ended stream deletes it; of an open one: 409, unless forced, which ends it (cancelled) first."""
    async with await admin.producer() as producer:
        await produce(producer, "r-ended", ["a"], end="completed")
        status, body = await call(admin, "DELETE", "/v1/admin/streams/r-ended")
        assert (status, body) == (200, {"stream": "r-ended", "deleted": True, "ended_first": False})
        assert (await call(admin, "GET", "/v1/admin/streams/r-ended"))[0] == 404

        await produce(producer, "r-open", ["a"])
        consumer = await admin.consumer("r-open")
        await consumer.expect("subscribed")
        await consumer.expect("chunk")
        status, body = await call(admin, "DELETE", "/v1/admin/streams/r-open")
        assert status == 409 and body["error"]["code"] == "stream_open"
        status, body = await call(admin, "DELETE", "/v1/admin/streams/r-open", params={"force": "1"})
        assert (status, body) == (200, {"stream": "r-open", "deleted": True, "ended_first": True})
        chunks, end = await collect_chunks(consumer, "r-open")
        assert chunks == [] and end["reason"] == "cancelled"
        assert (await call(admin, "GET", "/v1/admin/streams/r-open"))[0] == 404
        await consumer.ws.close()


async def test_status_summarises_the_running_relayd(admin: Relayd) -> None:
    """status: version, uptime, connections by role, open streams, subscriptions, chunk totals, Redis health."""
    from relayd import __version__

    async with await admin.producer() as producer:
        await produce(producer, "st-1", ["a", "b"])
        consumer = await admin.consumer("st-1")
        await consumer.expect("subscribed")
        await consumer.expect("chunk")
        await consumer.expect("chunk")
        status, st = await call(admin, "GET", "/v1/admin/status")
        assert status == 200
        assert st["version"] == __version__ and st["uptime_s"] >= 0 and st["draining"] is False
        assert st["connections"] == {"producer": 1, "consumer_ws": 1, "consumer_sse": 0}
        assert st["streams"] == {"open": 1, "held_here": 1} and st["subscriptions"] == 1
        assert st["chunks"]["stored"] == 2 and st["chunks"]["delivered"] == 2
        assert st["chunks"]["stored_per_s"] > 0 and st["chunks"]["window_s"] > 0
        assert st["redis"]["mode"] == "external" and st["redis"]["ok"] is True and st["redis"]["latency_ms"] >= 0
        await consumer.ws.close()


async def test_percent_encoded_ids_with_slashes(admin: Relayd) -> None:
    """Stream ids may hold '/': the API takes them percent-encoded in the path."""
    assert admin.session is not None
    async with await admin.producer() as producer:
        await produce(producer, "user-7/chat:1", ["a"])
    url = f"{admin.url}/v1/admin/streams/user-7%2Fchat%3A1"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with admin.session.get(aiohttp.client.URL(url, encoded=True), headers=headers) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == "user-7/chat:1"


def test_admin_keys_config_is_checked() -> None:
    """auth.admin_keys takes only sha256 hashes, RELAYD_ADMIN_KEYS only keys of 16 characters or more."""
    from relayd.config import build_config
    from relayd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"auth\.admin_keys\[0\]: must be a hash"):
        build_config({"auth": {"admin_keys": [ADMIN_KEY]}}, env={})
    with pytest.raises(ConfigError, match=r"auth\.admin_keys: plain admin keys must be at least 16"):
        build_config({}, env={"RELAYD_ADMIN_KEYS": "short"})
    config = build_config({"auth": {"admin_keys": [hash_api_key(ADMIN_KEY)]}}, env={"RELAYD_ADMIN_KEYS": ADMIN_KEY})
    assert config.auth.admin_keys == (hash_api_key(ADMIN_KEY),) and config.admin_key_secrets == (ADMIN_KEY,)
    assert ADMIN_KEY not in repr(config)


@pytest.mark.parametrize("limit", ["\u00b2", "\u2460", "9" * 5000, "0", "-1", ""])
async def test_ls_with_an_invalid_limit_is_400(admin: Relayd, limit: str) -> None:
    """A ``limit`` that is not ASCII digits from 1 to the maximum is 400 bad_frame, never 500."""
    status, body = await call(admin, "GET", "/v1/admin/streams", params={"limit": limit})
    assert status == 400 and body["error"]["code"] == "bad_frame", body
