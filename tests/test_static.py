"""GET /v1/client.js: the browser client served by relayd, cacheable and importable cross-origin."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Callable
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

from relayd.config import Config
from relayd.web.static import CLIENT_JS
from tests.helpers import Relayd

SOURCE = Path(__file__).resolve().parents[1] / "relayd" / "web" / "static" / CLIENT_JS


async def test_client_js_is_served_as_javascript_with_cache_headers(relayd: Relayd) -> None:
    assert relayd.session is not None
    async with relayd.session.get(f"{relayd.url}/v1/client.js") as resp:
        body = await resp.read()
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert resp.headers["Cache-Control"] == "public, max-age=300"
        etag = resp.headers["ETag"]
    assert body == SOURCE.read_bytes()
    assert etag == f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    assert re.search(rb"^export \{[^}]*\bconnect\b", body, re.M), "the module exports connect"


async def test_if_none_match_with_the_etag_answers_304_without_a_body(relayd: Relayd) -> None:
    assert relayd.session is not None
    async with relayd.session.get(f"{relayd.url}/v1/client.js") as resp:
        etag = resp.headers["ETag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        async with relayd.session.get(f"{relayd.url}/v1/client.js", headers={"If-None-Match": header}) as resp:
            assert resp.status == 304, header
            assert await resp.read() == b""
            assert resp.headers["ETag"] == etag
            assert resp.headers["Cache-Control"] == "public, max-age=300"
    async with relayd.session.get(f"{relayd.url}/v1/client.js", headers={"If-None-Match": '"stale"'}) as resp:
        assert resp.status == 200


async def test_head_answers_headers_only(relayd: Relayd) -> None:
    assert relayd.session is not None
    async with relayd.session.head(f"{relayd.url}/v1/client.js") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"


async def test_cross_origin_pages_may_import_it(relayd: Relayd) -> None:
    """A module script from another origin needs CORS; the origin rules are the other routes'."""
    assert relayd.session is not None
    origin = {"Origin": "http://app.example"}
    async with relayd.session.get(f"{relayd.url}/v1/client.js", headers=origin) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_disallowed_origin_is_refused_like_on_other_browser_routes(
    config_factory: Callable[..., Config],
) -> None:
    config = config_factory(server={"allowed_origins": ["http://app.example"]})
    async with Relayd(config) as server:
        assert server.session is not None
        url = f"{server.url}/v1/client.js"
        async with server.session.get(url, headers={"Origin": "http://app.example"}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
        async with server.session.get(url, headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403


def test_the_client_ships_as_package_data() -> None:
    """The wheel must carry the file: it is matched by package-data and readable as a resource."""
    pyproject = tomllib.loads((SOURCE.parents[3] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["relayd"]
    assert any(fnmatch(f"web/static/{CLIENT_JS}", pattern) for pattern in patterns)
    assert resources.files("relayd.web").joinpath("static", CLIENT_JS).read_bytes() == SOURCE.read_bytes()
