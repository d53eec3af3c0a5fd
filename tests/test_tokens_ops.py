"""``POST /v1/tokens`` and the operator endpoints: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.config import Config
from tests.conftest_redis import _start_on_free_port
from tests.helpers import API_KEY, JWT_SECRET, Relayd, collect_chunks, make_config


async def post_token(relayd: Relayd, body: Any, api_key: str | None = API_KEY) -> tuple[int, Any]:
    assert relayd.session is not None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    data = body if isinstance(body, bytes) else None
    json_body = None if isinstance(body, bytes) else body
    async with relayd.session.post(f"{relayd.url}/v1/tokens", headers=headers, data=data, json=json_body) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


def claims_of(token: str) -> dict[str, Any]:
    """Verify the token as any backend would (shared secret, audience relayd) and return its claims."""
    return jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="relayd")


# -- POST /v1/tokens ------------------------------------------------------------------------------


async def test_minted_token_is_accepted_by_relayd(relayd: Relayd) -> None:
    """A token minted with a good API key carries the asked claims and opens exactly the streams it names."""
    before = int(time.time())
    status, body = await post_token(relayd, {"streams": ["chat-42"], "rights": ["read", "cancel"], "ttl_s": 120})
    assert status == 200, body
    claims = claims_of(body["token"])
    assert claims["streams"] == ["chat-42"] and claims["rights"] == ["read", "cancel"]
    assert claims["exp"] == body["expires_at"] and claims["exp"] - claims["iat"] == 120
    assert before <= claims["iat"] <= int(time.time())

    async with await relayd.producer() as producer:
        await producer.open("chat-42")
        await producer.append("chat-42", 1, "hi")
        consumer = await relayd.consumer("chat-42", token=body["token"])
        await consumer.expect("subscribed", stream="chat-42")
        await consumer.expect("chunk", stream="chat-42", data="hi")
        await consumer.send({"op": "cancel", "stream": "chat-42"})  # the cancel right came through
        await consumer.expect("cancel_requested", stream="chat-42")
        assert await producer.next() == {"type": "cancel", "stream": "chat-42"}
        await producer.end("chat-42", "cancelled")
        _, end = await collect_chunks(consumer, "chat-42")
        assert end["reason"] == "cancelled"
    other = await relayd.consumer("chat-43", token=body["token"])
    assert await other.closed() == 4003


async def test_token_defaults_read_right_and_default_ttl(relayd: Relayd) -> None:
    """Without rights and ttl_s the token grants read for auth.token_ttl_s (300 s by default)."""
    status, body = await post_token(relayd, {"streams": ["user-7/*"], "sub": "user-7"})
    assert status == 200, body
    claims = claims_of(body["token"])
    assert claims["rights"] == ["read"] and claims["sub"] == "user-7"
    assert claims["exp"] - claims["iat"] == 300


@pytest.mark.parametrize("api_key", [None, "wrong-key-0123456789abcdef", ""], ids=["missing", "wrong", "empty"])
async def test_token_endpoint_refuses_a_missing_or_wrong_key(relayd: Relayd, api_key: str | None) -> None:
    """Without a valid API key the token endpoint answers 401 unauthorized and mints nothing."""
    status, body = await post_token(relayd, {"streams": ["s"]}, api_key=api_key)
    assert status == 401
    assert body["error"]["code"] == "unauthorized" and "token" not in body


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'"streams"',
        {},
        {"streams": "chat-42"},
        {"streams": []},
        {"streams": ["bad id"]},
        {"streams": ["s"], "rights": ["write"]},
        {"streams": ["s"], "rights": "read"},
        {"streams": ["s"], "ttl_s": 0},
        {"streams": ["s"], "ttl_s": -5},
        {"streams": ["s"], "ttl_s": "60"},
        {"streams": ["s"], "ttl_s": True},
        {"streams": ["s"], "ttl_s": 1.5},
        {"streams": ["s"], "sub": 7},
    ],
)
async def test_token_endpoint_refuses_a_bad_body_with_400_bad_frame(relayd: Relayd, body: Any) -> None:
    """A body that is not JSON, not an object, or has fields of the wrong type or value is 400 bad_frame."""
    status, answer = await post_token(relayd, body)
    assert status == 400, answer
    assert answer["error"]["code"] == "bad_frame" and answer["error"]["message"]


async def test_token_ttl_is_capped_by_token_max_ttl(config_factory: Callable[..., Config]) -> None:
    """A ttl_s above auth.token_max_ttl_s is cut to the cap."""
    async with Relayd(config_factory(auth={"token_ttl_s": 60, "token_max_ttl_s": 600})) as relayd:
        status, body = await post_token(relayd, {"streams": ["s"], "ttl_s": 86_400})
        assert status == 200, body
        claims = claims_of(body["token"])
        assert claims["exp"] - claims["iat"] == 600
        assert body["expires_at"] <= time.time() + 601
        status, body = await post_token(relayd, {"streams": ["s"]})
        assert claims_of(body["token"])["exp"] - claims_of(body["token"])["iat"] == 60


# -- health -------------------------------------------------------------------------------------


async def test_healthz_and_readyz_answer_200(relayd: Relayd) -> None:
    """``/healthz`` and ``/readyz`` answer 200 with a JSON status when Redis is up."""
    assert relayd.session is not None
    async with relayd.session.get(f"{relayd.url}/healthz") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    async with relayd.session.get(f"{relayd.url}/readyz") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ready"}


async def test_readyz_is_503_when_redis_is_unreachable(tmp_path: Path, key_prefix: str) -> None:
    """With its Redis stopped, relayd's ``/readyz`` answers 503 while ``/healthz`` stays 200."""
    redis = await asyncio.to_thread(_start_on_free_port, tmp_path / "r")
    try:
        config = make_config(redis.url, key_prefix, str(tmp_path / "d"), redis={"timeout_ms": 1000, "retry_ms": 200})
        async with Relayd(config) as relayd:
            assert relayd.session is not None
            async with relayd.session.get(f"{relayd.url}/readyz") as resp:
                assert resp.status == 200 and await resp.json() == {"status": "ready"}
            await asyncio.to_thread(redis.stop)
            async with relayd.session.get(f"{relayd.url}/readyz") as resp:
                assert resp.status == 503
                body = await resp.json()
            assert body["status"] == "redis_unavailable" and body["message"]
            async with relayd.session.get(f"{relayd.url}/healthz") as resp:
                assert resp.status == 200
    finally:
        await asyncio.to_thread(redis.stop)


# -- metrics ------------------------------------------------------------------------------------


async def scrape(relayd: Relayd) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed into {(sample name, labels): value}."""
    assert relayd.session is not None
    async with relayd.session.get(f"{relayd.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_are_exposed_and_move_under_traffic(relayd: Relayd) -> None:
    """``/metrics`` exposes relayd_* counters, and they count exactly the traffic this relayd handled."""
    before = await scrape(relayd)
    for name in (
        "relayd_chunks_in_total",
        "relayd_bytes_in_total",
        "relayd_streams_started_total",
        "relayd_redis_errors_total",
    ):
        assert (name, ()) in before, name
    assert before[("relayd_chunks_in_total", ())] == 0

    async with await relayd.producer() as producer:
        await producer.open("m")
        await producer.append("m", 1, "a", "b", "c")
        await producer.append("m", 4, {"d": 4})
        await producer.append("m", 1, "a")  # a resend: acknowledged, not stored again
        await producer.end("m")
    consumer = await relayd.consumer("m")
    await consumer.expect("subscribed", stream="m")
    chunks, _ = await collect_chunks(consumer, "m")
    assert len(chunks) == 4
    assert relayd.session is not None
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await relayd.session.ws_connect(f"{relayd.url}/v1/ingest", headers={"Authorization": "Bearer nope"})

    after = await scrape(relayd)
    assert after[("relayd_chunks_in_total", ())] == 4
    assert after[("relayd_bytes_in_total", ())] == len(b'"a""b""c"{"d":4}')
    assert after[("relayd_streams_started_total", ())] == 1
    assert after[("relayd_streams_ended_total", (("reason", "completed"),))] == 1
    assert after[("relayd_connections_opened_total", (("role", "producer"),))] == 1
    assert after[("relayd_connections_opened_total", (("role", "consumer_ws"),))] == 1
    assert after[("relayd_chunks_delivered_total", (("path", "replay"),))] == 4
    assert after[("relayd_auth_failures_total", (("reason", "unauthorized"),))] == 1
    assert after[("relayd_connections", (("role", "consumer_ws"),))] == 1
    assert after[("relayd_redis_batch_size_count", ())] > before[("relayd_redis_batch_size_count", ())]
