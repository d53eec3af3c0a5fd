"""``POST /v1/tokens``: mint a consumer JWT for an API-key holder (your backend)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from relayd.auth import parse_bearer
from relayd.errors import AuthError, ClientError, ProtocolError
from relayd.web.errors import client_error_response, error_response
from relayd.web.keys import RUNTIME


async def mint_token(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    try:
        scope = rt.api_keys.verify(parse_bearer(request.headers.get("Authorization")))
        if not rt.tokens.can_mint:
            return error_response(501, "not_configured", f"{rt.config.auth.jwt_algorithm}: relayd holds no signing key")
        body = await _json_body(request)
        streams = body.get("streams")
        rights = body.get("rights", ["read"])
        ttl_s = body.get("ttl_s")
        if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0):
            raise ProtocolError("bad_frame", "'ttl_s' must be a positive integer")
        if not isinstance(streams, list) or not isinstance(rights, list):
            raise ProtocolError("bad_frame", "'streams' and 'rights' must be lists")
        subject = body.get("sub")
        if subject is not None and not isinstance(subject, str):
            raise ProtocolError("bad_frame", "'sub' must be a string")
        if scope is not None:  # auth.api_key_streams: tokens only for the key's own streams
            for pattern in streams:
                if isinstance(pattern, str) and not scope.covers(pattern):
                    raise AuthError("forbidden", f"this API key may not mint tokens for {pattern[:200]}")
        token, expires_at = rt.tokens.mint(streams, rights, ttl_s=ttl_s, subject=subject)
    except ClientError as exc:
        if exc.code in ("unauthorized",):
            rt.metrics.auth_failure(exc.code)
        return client_error_response(exc)
    return web.json_response({"token": token, "expires_at": expires_at})


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_frame", "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad_frame", "body must be a JSON object")
    return body
