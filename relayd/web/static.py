"""``GET /v1/client.js``: the browser client, served by relayd itself.

Pages import the client from the relayd they talk to, so the client always matches the
server's protocol version and needs no npm package or CDN. The file ships as package data
(relayd/web/static/), is read once when the app is built, and is served with a strong ETag so
browsers revalidate cheaply after ``max-age``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from relayd.web.cors import Handler

CLIENT_JS = "relayd-client.js"
_CACHE_CONTROL = "public, max-age=300"
_JS_CONTENT_TYPE = "text/javascript; charset=utf-8"


@dataclass(frozen=True)
class Asset:
    body: bytes
    etag: str
    content_type: str


def load_asset(name: str, content_type: str = _JS_CONTENT_TYPE) -> Asset:
    body = resources.files("relayd.web").joinpath("static", name).read_bytes()
    return Asset(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"', content_type)


def asset_handler(asset: Asset) -> Handler:
    """A handler serving ``asset``: 200 with the body, or 304 when If-None-Match names it."""
    headers = {"ETag": asset.etag, "Cache-Control": _CACHE_CONTROL}

    async def handler(request: web.Request) -> web.StreamResponse:
        if _matches(request.headers.get("If-None-Match"), asset.etag):
            return web.Response(status=304, headers=headers)
        response = web.Response(body=asset.body, headers=headers)
        response.headers["Content-Type"] = asset.content_type
        return response

    return handler


def client_js() -> Handler:
    """The ``/v1/client.js`` handler; reads the file now (at startup), never per request."""
    return asset_handler(load_asset(CLIENT_JS))


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    # A list of entity tags; weak comparison (W/ prefix ignored), as RFC 9110 asks for GET.
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags
