"""Origin checks and CORS for browser-facing routes (SSE, consumer websocket, tokens)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from relayd.web.errors import error_response
from relayd.web.keys import RUNTIME

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_BROWSER_PREFIXES = ("/v1/streams/", "/v1/tokens", "/v1/ws", "/v1/client.js")
_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"


def origin_allowed(allowed: tuple[str, ...], origin: str) -> bool:
    return "*" in allowed or origin in allowed


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None or not request.path.startswith(_BROWSER_PREFIXES):
        return await handler(request)
    allowed = request.app[RUNTIME].config.server.allowed_origins
    if not origin_allowed(allowed, origin):
        # Browsers do not apply CORS to websockets, so the origin is checked here for all routes.
        return error_response(403, "forbidden", f"origin {origin} is not allowed")
    headers = {
        "Access-Control-Allow-Origin": "*" if "*" in allowed else origin,
        "Vary": "Origin",
    }
    if request.method == "OPTIONS":
        headers.update(
            {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                "Access-Control-Max-Age": "600",
            }
        )
        return web.Response(status=204, headers=headers)
    response = await handler(request)
    if not response.prepared:
        response.headers.update(headers)
    return response


def cors_headers(request: web.Request) -> dict[str, str]:
    """Headers for a response the handler prepares itself (SSE streams)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return {}
    allowed = request.app[RUNTIME].config.server.allowed_origins
    return {"Access-Control-Allow-Origin": "*" if "*" in allowed else origin, "Vary": "Origin"}
