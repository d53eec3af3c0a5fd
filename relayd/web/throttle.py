"""The per-address limit on failed credential attempts (``auth.max_failures``), as a middleware.

A request to a route that takes a credential, from an address whose budget of failures is spent
(:class:`relayd.auth.FailureLimiter`), is answered 429 ``too_many_failures`` with ``Retry-After``
before any credential is checked. What counts as a failure: an answer 401 ``unauthorized`` (API
key, admin key, token) or a consumer websocket closed 4001. An expired token (``token_expired``)
or a token for another stream (``forbidden``) does not count: those are honest clients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from relayd.auth import FailureLimiter
from relayd.web.errors import ERROR_CODE, error_response
from relayd.web.keys import RUNTIME

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAILURES = web.AppKey("failures", FailureLimiter)
_CREDENTIAL_ROUTES = ("/v1/ingest", "/v1/tokens", "/v1/streams/", "/v1/ws", "/v1/admin/")


@web.middleware
async def failure_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(_CREDENTIAL_ROUTES):
        return await handler(request)
    limiter = request.app[FAILURES]
    remote = request.remote
    wait_s = limiter.retry_after(remote, time.monotonic())
    if wait_s:
        request.app[RUNTIME].metrics.auth_throttled()
        refusal = error_response(429, "too_many_failures", "too many failed credentials from this address")
        refusal.headers["Retry-After"] = str(math.ceil(wait_s))
        return refusal
    response = await handler(request)
    if response.get(ERROR_CODE) == "unauthorized":  # a 401, or a websocket closed 4001
        limiter.failed(remote, time.monotonic())
    return response
