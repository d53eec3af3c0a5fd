"""Security settings against a real relayd: per-key stream scopes, the failed-credential limit, the origin warning.

(issue 9, item 26; docs/operations.md, "Security")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.auth import hash_api_key
from relayd.config import Config, build_config
from relayd.errors import ConfigError
from tests.helpers import API_KEY, JWT_SECRET, Relayd

TENANT_KEY = "rk_tenant_a_key_0123456789abcdef"


def scoped(config_factory: Callable[..., Config], **tables: dict[str, Any]) -> Config:
    keys = [hash_api_key(API_KEY), hash_api_key(TENANT_KEY)]
    auth = {"api_keys": keys, "api_key_streams": [f"{hash_api_key(TENANT_KEY)} tenant-a/* status"]}
    return config_factory(auth={**auth, **tables.pop("auth", {})}, **tables)


async def metric(relayd: Relayd, name: str) -> float:
    assert relayd.session is not None
    async with relayd.session.get(f"{relayd.url}/metrics") as resp:
        families = text_string_to_metric_families(await resp.text())
    return sum(s.value for f in families for s in f.samples if s.name == name)


async def test_a_scoped_api_key_opens_only_its_streams(config_factory: Callable[..., Config]) -> None:
    """A key with stream prefixes gets ``forbidden`` for any other stream; the connection goes on."""
    async with Relayd(scoped(config_factory)) as server:
        async with await server.producer(api_key=TENANT_KEY) as producer:
            refused = await producer.open("tenant-b/chat-1")
            assert refused["type"] == "error" and refused["code"] == "forbidden", refused
            assert refused["stream"] == "tenant-b/chat-1"
            await producer.send({"op": "end", "stream": "tenant-b/chat-1", "reason": "completed"})
            assert (await producer.next())["code"] == "forbidden"
            assert (await producer.open("tenant-a/chat-1"))["type"] == "opened"
            assert (await producer.open("status"))["type"] == "opened"
            assert (await producer.append("tenant-a/chat-1", 1, "hi"))["type"] == "ack"
        async with await server.producer() as unscoped:  # a key without an entry: every stream
            assert (await unscoped.open("tenant-b/chat-1"))["type"] == "opened"


@pytest.mark.parametrize(
    ("streams", "status"),
    [(["tenant-a/chat-1"], 200), (["tenant-a/*"], 200), (["tenant-b/chat-1"], 403), (["*"], 403), (["tenant-*"], 403)],
)
async def test_a_scoped_api_key_mints_tokens_only_for_its_streams(
    config_factory: Callable[..., Config], streams: list[str], status: int
) -> None:
    async with Relayd(scoped(config_factory)) as server:
        assert server.session is not None
        headers = {"Authorization": f"Bearer {TENANT_KEY}"}
        async with server.session.post(f"{server.url}/v1/tokens", headers=headers, json={"streams": streams}) as resp:
            assert resp.status == status, await resp.text()
            if status == 403:
                assert (await resp.json())["error"]["code"] == "forbidden"


async def test_an_address_that_fails_too_often_gets_429_even_with_a_good_key(
    config_factory: Callable[..., Config],
) -> None:
    """After ``auth.max_failures`` wrong keys, tokens or admin keys, the address is refused 429 with Retry-After."""
    config = config_factory(auth={"max_failures": 3, "failure_window_s": 600, "admin_keys": [hash_api_key(API_KEY)]})
    async with Relayd(config) as server:
        session = server.session
        assert session is not None
        bad = {"Authorization": "Bearer rk_wrong_key_0123456789abcdef"}
        # first: a websocket refusal is counted when its handler returns, after the close handshake
        # (an HTTP refusal is counted before the answer is sent)
        refused = await server.consumer("s", token="not.a.token")
        assert await refused.closed() == 4001
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await server.producer(api_key="rk_wrong_key_0123456789abcdef")
        assert exc.value.status == 401
        async with session.get(f"{server.url}/v1/admin/streams", headers=bad) as resp:
            assert resp.status == 401
        async with session.post(f"{server.url}/v1/tokens", headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            assert resp.status == 429
            assert 1 <= int(resp.headers["Retry-After"]) <= 200
            assert (await resp.json())["error"]["code"] == "too_many_failures"
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await server.producer()
        assert exc.value.status == 429
        async with session.get(f"{server.url}/healthz") as resp:  # routes without credentials are not limited
            assert resp.status == 200
        assert await metric(server, "relayd_auth_throttled_total") == 2


async def test_expired_and_forbidden_tokens_do_not_count_as_failures(config_factory: Callable[..., Config]) -> None:
    """Honest clients (a token that just expired, or one for another stream) are never throttled."""
    async with Relayd(config_factory(auth={"max_failures": 2, "failure_window_s": 600})) as server:
        assert server.session is not None
        now = time.time()
        expired = jwt.encode({"streams": ["s"], "exp": now - 10, "aud": "relayd"}, JWT_SECRET, algorithm="HS256")
        other = server.token(["other"])
        for token, status in [(expired, 401), (other, 403)] * 3:
            async with server.session.get(f"{server.url}/v1/streams/s/events", params={"token": token}) as resp:
                assert resp.status == status
        async with server.session.post(f"{server.url}/v1/tokens", headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status == 400  # not 429: the body is missing, the key is fine
        assert await metric(server, "relayd_auth_throttled_total") == 0


async def test_api_keys_with_any_origin_log_a_startup_warning(
    config_factory: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relayd")
    async with Relayd(config_factory()):
        pass
    assert any("allowed_origins is '*'" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    async with Relayd(config_factory(server={"allowed_origins": ["https://app.example.com"]})):
        pass
    assert not any("allowed_origins" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    # the zero-config development start (no API key configured: the development key) is not warned about
    async with Relayd(config_factory(auth={"api_keys": [], "jwt_secret": ""})):
        pass
    assert not any("allowed_origins" in r.getMessage() for r in caplog.records), caplog.text


SECRET_ENV = {"RELAYD_AUTH_JWT_SECRET": JWT_SECRET}


def test_a_scope_naming_no_configured_key_is_a_config_error_at_load() -> None:
    """Checked when the config is built (so ``relayd check-config`` reports it), against env keys too."""
    entry = f"{hash_api_key(TENANT_KEY)} tenant-a/*"
    with pytest.raises(ConfigError) as exc:
        build_config({"auth": {"api_key_streams": [entry]}}, env={"RELAYD_API_KEYS": API_KEY, **SECRET_ENV})
    assert exc.value.key == "auth.api_key_streams[0]"
    keys = {"RELAYD_API_KEYS": f"{API_KEY},{TENANT_KEY}", **SECRET_ENV}  # API keys need a JWT secret
    config = build_config({"auth": {"api_key_streams": [entry]}}, env=keys)
    assert config.auth.api_key_streams == (entry,)
