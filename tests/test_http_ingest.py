"""HTTP producers (``POST /v1/streams/{id}/append``, ``/open``, ``/end``) with real aiohttp clients.

The guarantees of the websocket ingest over plain requests: acknowledged after the durable write
with the cursor, one group commit for concurrent requests, a resend answered the same and stored
once, fencing either way with a websocket producer, producer_lost when the posts stop, cancel
reaching the producer, consumers getting each chunk live exactly once; and the error codes.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relayd.auth import hash_api_key
from relayd.client import Refused, StreamAlreadyEnded, Unauthorized, http_append
from relayd.config import Config
from relayd.embedded import EmbeddedRedis
from tests.helpers import API_KEY, Relayd, collect_chunks, make_config, poll_until

S = "chat-http"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def post(
    server: Relayd, path: str, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST to relayd; the status and JSON answer."""
    assert server.session is not None
    async with server.session.post(
        f"{server.url}{path}",
        json=body if raw is None else None,
        data=raw,
        headers=AUTH if headers is None else headers,
    ) as response:
        return response.status, await response.json()


async def append(server: Relayd, stream: str = S, **body: Any) -> tuple[int, dict[str, Any]]:
    return await post(server, f"/v1/streams/{stream}/append", {"epoch": 1, **body})


async def test_an_append_is_acked_with_its_cursor_and_consumers_get_it_live_exactly_once(relayd: Relayd) -> None:
    status, first = await append(relayd, seq=1, chunks=[{"delta": "Hel"}], producer="job-7")
    assert status == 200, first
    assert first == {
        "stream": S, "epoch": 1, "seq": 1, "cursor": first["cursor"], "stored": 1, "cancel_requested": False,
    }  # fmt: skip
    async with await relayd.consumer(S) as consumer:
        await consumer.expect("subscribed")
        assert (await consumer.expect("chunk"))["data"] == {"delta": "Hel"}
        status, again = await append(relayd, seq=1, chunks=[{"delta": "Hel"}])  # its answer was lost: resent
        assert status == 200 and again == {**first, "stored": 0}
        status, second = await append(relayd, seq=2, chunk="lo")
        assert status == 200 and second["seq"] == 2 and second["cursor"] > first["cursor"]
        status, done = await append(relayd, seq=3, chunks=[" world"], end={"reason": "completed"})
        assert status == 200 and done["ended"]["reason"] == "completed" and done["ended"]["cursor"] > done["cursor"]
        chunks, ended = await collect_chunks(consumer, S)
    assert [c["data"] for c in chunks] == ["lo", " world"]  # "Hel" came first, and once
    assert [c["cursor"] for c in chunks] == [second["cursor"], done["cursor"]]
    assert ended["reason"] == "completed" and ended["cursor"] == done["ended"]["cursor"]
    status, resent = await append(relayd, seq=3, chunks=[" world"], end={"reason": "completed"})
    assert status == 200 and resent == {**done, "stored": 0}


async def test_concurrent_requests_share_the_store_pipeline(config_factory: Callable[..., Config]) -> None:
    """Appends from many requests at once leave in a few pipelined batches, not one round trip each."""
    async with Relayd(config_factory(batch={"linger_ms": 20})) as server:
        streams = [f"many-{i}" for i in range(40)]
        for stream in streams:  # leases: one write round trip per request from now on
            assert (await append(server, stream, seq=1, chunks=["a"]))[0] == 200
        registry = server.relay.metrics.registry
        batches = registry.get_sample_value("relayd_redis_batch_size_count")
        answers = await asyncio.gather(*(append(server, stream, seq=2, chunks=["b"]) for stream in streams))
        assert [status for status, _ in answers] == [200] * len(streams)
        sent = registry.get_sample_value("relayd_redis_batch_size_count") - batches
        assert sent <= len(streams) / 4, f"{sent} batches for {len(streams)} requests"


async def test_fencing_works_both_ways_with_a_websocket_producer(relayd: Relayd) -> None:
    async with await relayd.producer() as ws:
        assert (await ws.open(S))["epoch"] == 1
        assert (await ws.append(S, 1, "ws"))["type"] == "ack"
        status, taken = await append(relayd, epoch=2, seq=1, chunks=["http"])  # a newer run, over HTTP
        assert status == 200 and taken["epoch"] == 2
        refused = await ws.append(S, 2, "stale")
        assert (refused["type"], refused["code"]) == ("error", "fenced")
        assert (await ws.open(S))["epoch"] == 3  # the websocket takes it back
        status, fenced = await append(relayd, epoch=2, seq=2, chunks=["late"])
        assert status == 409 and fenced["error"]["code"] == "fenced" and fenced["error"]["epoch"] == 3
        assert (await ws.append(S, 1, "ws again"))["type"] == "ack"


async def test_an_http_producer_that_stops_posting_gets_its_stream_ended_producer_lost(
    config_factory: Callable[..., Config],
) -> None:
    async with Relayd(config_factory(streams={"producer_timeout_ms": 300})) as server:
        assert (await append(server, seq=1, chunks=["a"]))[0] == 200
        async with await server.consumer(S) as consumer:
            chunks, ended = await collect_chunks(consumer, S)
        assert [c["data"] for c in chunks] == ["a"] and ended["reason"] == "producer_lost"
        status, late = await append(server, seq=2, chunks=["b"])
        assert status == 409 and late["error"] == {
            "code": "stream_ended", "message": late["error"]["message"], "status": "producer_lost",
        }  # fmt: skip


async def test_a_consumer_cancel_reaches_the_http_producer_which_ends_the_stream(relayd: Relayd) -> None:
    status, opened = await post(relayd, f"/v1/streams/{S}/open", {"producer": "job-1", "content_type": "text"})
    assert status == 200 and opened == {
        "stream": S, "epoch": 1, "seq": 0, "cursor": None, "status": "open", "content_type": "text",
        "cancel_requested": False, "producer": "job-1",
    }  # fmt: skip
    token = relayd.token([S], ("read", "cancel"))
    async with await relayd.consumer(S, token=token) as consumer:
        await consumer.expect("subscribed")
        await consumer.send({"op": "cancel", "stream": S})
        await consumer.expect("cancel_requested")
        status, answer = await append(relayd, seq=1, chunks=["last words"])
        assert status == 200 and answer["cancel_requested"] is True
        status, ended = await post(relayd, f"/v1/streams/{S}/end", {"epoch": 1, "reason": "cancelled"})
        assert status == 200 and ended["ended"]["reason"] == "cancelled"
        chunks, end = await collect_chunks(consumer, S)
    assert [c["data"] for c in chunks] == ["last words"] and end["reason"] == "cancelled"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "bad_frame"),
        (b"[1]", "bad_frame"),
        (b'{"seq": 1, "chunks": ["a"]}', "bad_frame"),  # no epoch
        (b'{"epoch": 0, "seq": 1, "chunks": ["a"]}', "bad_frame"),
        (b'{"epoch": 1, "chunks": ["a"]}', "bad_frame"),  # no seq
        (b'{"epoch": 1, "seq": 1, "chunks": []}', "bad_frame"),
        (b'{"epoch": 1, "seq": 1, "chunks": ["a"], "end": "completed"}', "bad_frame"),
        (b'{"epoch": 1, "seq": 1, "chunks": ["a"], "end": {"reason": "producer_lost"}}', "bad_frame"),
        (b'{"epoch": 1, "seq": 1, "chunks": ["a"], "producer": "no spaces"}', "bad_frame"),
        (b'{"epoch": 1, "seq": 1, "chunks": [1], "content_type": "text"}', "content_type"),
        (b'{"epoch": 1, "seq": 1, "chunk": "' + b"x" * 2000 + b'"}', "chunk_too_large"),
    ],
)
async def test_a_bad_request_is_refused_400_with_the_ingest_code(relayd_small: Relayd, body: bytes, code: str) -> None:
    status, answer = await post(relayd_small, f"/v1/streams/{S}/append", raw=body)
    assert status == 400 and answer["error"]["code"] == code, answer


@pytest.fixture
async def relayd_small(config_factory: Callable[..., Config]) -> Any:
    async with Relayd(config_factory(limits={"max_frame_bytes": 4096, "max_chunk_bytes": 1024})) as server:
        yield server


async def test_refusals_say_what_the_producer_needs_to_know(relayd_small: Relayd) -> None:
    server = relayd_small
    assert (await append(server, seq=1, chunks=["a"], content_type="text"))[0] == 200
    status, gap = await append(server, seq=5, chunks=["e"])
    assert status == 409 and gap["error"]["code"] == "seq_gap" and gap["error"]["seq"] == 1
    status, text = await append(server, seq=2, chunks=[{"not": "text"}])
    assert status == 400 and text["error"]["code"] == "content_type"
    status, big = await post(server, f"/v1/streams/{S}/append", raw=b'{"epoch": 1, "x": "' + b"x" * 5000 + b'"}')
    assert status == 413 and big["error"]["code"] == "body_too_large"
    status, bad_id = await append(server, "bad id!", seq=1, chunks=["a"])
    assert status == 400 and bad_id["error"]["code"] == "invalid_stream_id"
    status, unauthorized = await post(server, f"/v1/streams/{S}/append", {"epoch": 1}, headers={})
    assert status == 401 and unauthorized["error"]["code"] == "unauthorized"
    status, ended = await post(server, f"/v1/streams/{S}/end", {"epoch": 1, "reason": "error", "message": "boom"})
    assert status == 200 and ended["ended"]["reason"] == "error" and ended["seq"] == 1
    status, late = await append(server, seq=2, chunks=["b"])
    assert status == 409 and late["error"]["code"] == "stream_ended" and late["error"]["status"] == "error"


async def test_an_api_key_limited_to_other_streams_is_refused_403(config_factory: Callable[..., Config]) -> None:
    scoped = "rk_scoped_key_0123456789abcdef"
    config = config_factory(
        auth={"api_keys": [hash_api_key(API_KEY), hash_api_key(scoped)], "api_key_streams": [
            f"{hash_api_key(scoped)} tenant-a/*"
        ]}
    )  # fmt: skip
    async with Relayd(config) as server:
        headers = {"Authorization": f"Bearer {scoped}"}
        body = {"epoch": 1, "seq": 1, "chunks": ["a"]}
        status, answer = await post(server, f"/v1/streams/{S}/append", body, headers=headers)
        assert status == 403 and answer["error"]["code"] == "forbidden"
        status, answer = await post(server, "/v1/streams/tenant-a/chat-1/append", body, headers=headers)
        assert status == 200 and answer["stream"] == "tenant-a/chat-1"


async def test_requests_spread_over_two_instances_reach_a_consumer_once_in_order_and_cancel_everywhere(
    config_factory: Callable[..., Config],
) -> None:
    """Behind a load balancer each request may reach another relayd: each instance opens the stream
    with the request's epoch (resuming it), the consumer on one of them gets every chunk live once,
    and a cancel asked on one instance is told by both."""
    config = config_factory()
    async with Relayd(config) as a, Relayd(config) as b:
        assert (await append(a, seq=1, chunks=[0]))[0] == 200
        token = a.token([S], ("read", "cancel"))
        async with await a.consumer(S, token=token) as consumer:
            await consumer.expect("subscribed")
            for seq in range(2, 7):
                status, answer = await append((a, b)[seq % 2], seq=seq, chunks=[seq - 1])
                assert status == 200 and answer["stored"] == 1, answer
            status, resent = await append(b, seq=6, chunks=[5])
            assert status == 200 and resent["stored"] == 0
            await consumer.send({"op": "cancel", "stream": S})
            first = await consumer.expect("chunk")  # from the history, then live ones and the answer
            frames, _ = await consumer.until("cancel_requested")
            await poll_until(lambda: b.relay.cancel_requested(S), "the cancel reaching b through Redis")
            for server, seq in ((a, 7), (b, 8)):
                status, answer = await append(server, seq=seq, chunks=[seq - 1])
                assert status == 200 and answer["cancel_requested"] is True, answer
            assert (await post(b, f"/v1/streams/{S}/end", {"epoch": 1, "reason": "cancelled"}))[0] == 200
            chunks, end = await collect_chunks(consumer, S)
        data = [first["data"], *(f["data"] for f in frames if f["type"] == "chunk"), *(c["data"] for c in chunks)]
        assert data == list(range(8)) and end["reason"] == "cancelled"


async def test_an_append_in_flight_when_relayd_stops_is_answered_before_it_exits(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """The graceful drain loses nothing acknowledged: a request whose write waits for Redis when
    the shutdown starts still gets its ack (within server.drain_timeout_s)."""
    config = make_config(private_redis.url, key_prefix, str(tmp_path), redis={"timeout_ms": 30_000})
    assert private_redis.pid is not None
    async with Relayd(config) as server:
        assert (await append(server, seq=1, chunks=["stored"]))[0] == 200
        os.kill(private_redis.pid, signal.SIGSTOP)  # the next write cannot finish...
        try:
            in_flight = asyncio.create_task(append(server, seq=2, chunks=["in flight"]))
            await poll_until(lambda: not server.relay.write_admits(1 << 40), "relayd holding the append")
            stopping = asyncio.create_task(server.server.stop())
            await poll_until(lambda: server.server.runtime.draining.is_set(), "the drain")
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
        status, answer = await in_flight
        assert status == 200 and answer["seq"] == 2, answer
        await stopping


async def test_the_sdk_http_append_writes_resends_and_raises_the_refusal(relayd: Relayd) -> None:
    """relayd.client.http_append: the SDK's one-call HTTP producer."""
    stream = "user-7/chat-3"  # a "/" in the id
    answer = await http_append(relayd.url, API_KEY, stream, epoch=1, seq=1, chunks=["a", {"b": 2}], producer="job")
    assert (answer["seq"], answer["stored"], answer["cancel_requested"]) == (2, 2, False)
    again = await http_append(relayd.url, API_KEY, stream, epoch=1, seq=1, chunks=["a", {"b": 2}])
    assert again == {**answer, "stored": 0}
    with pytest.raises(Refused) as gap:
        await http_append(relayd.url, API_KEY, stream, epoch=1, seq=9, chunks=["x"])
    assert (gap.value.code, gap.value.seq, gap.value.stream) == ("seq_gap", 2, stream)
    done = await http_append(relayd.url, API_KEY, stream, epoch=1, end="completed", session=relayd.session)
    assert done["ended"]["reason"] == "completed"
    with pytest.raises(StreamAlreadyEnded):
        await http_append(relayd.url, API_KEY, stream, epoch=1, seq=3, chunks=["late"])
    with pytest.raises(Unauthorized):
        await http_append(relayd.url, "wrong", stream, epoch=1, seq=3, chunks=["late"])
    async with await relayd.consumer(stream) as consumer:
        chunks, end = await collect_chunks(consumer, stream)
    assert [c["data"] for c in chunks] == ["a", {"b": 2}] and end["reason"] == "completed"


async def test_a_pipelined_append_resent_after_the_end_overtook_it_is_answered_as_the_first_time(
    relayd: Relayd,
) -> None:
    """Pipelined requests: seq 1-2 stored (its answer lost), then seq 3 with the end; the resend of
    seq 1-2 is acknowledged the same, not refused stream_ended, as before the end."""
    status, first = await append(relayd, seq=1, chunks=["a", "b"])
    assert status == 200
    status, ended = await append(relayd, seq=3, chunk="c", end={"reason": "completed"})
    assert status == 200 and ended["ended"]["reason"] == "completed"
    status, again = await append(relayd, seq=1, chunks=["a", "b"])
    assert (status, again) == (200, {**first, "stored": 0})
    status, late = await append(relayd, seq=4, chunk="d")  # new data after the end: refused
    assert (status, late["error"]["code"]) == (409, "stream_ended")
