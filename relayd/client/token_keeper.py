"""The consumer's JWT: read its claims (unverified), fetch it, refresh it before it expires.

relayd verifies every token; the client only plans with the claims: ``exp`` to refresh before
relayd closes the connection with 4002, ``streams``/``rights`` to refuse a ``cancel`` the token
cannot make. A token that cannot be read is not an error here: the answer is "unknown" (None).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from relayd.auth import Principal

__all__ = ["AuthSender", "TokenKeeper", "TokenSource", "token_allows", "token_claims", "token_expiry"]

log = logging.getLogger("relayd.client.consumer")

TokenSource = Callable[[], str | Awaitable[str]]
# Refresh this share of a token's remaining lifetime before its exp, capped: early enough that
# the auth op arrives before relayd closes with 4002, late enough not to fetch in a loop.
_REFRESH_SHARE = 1 / 3
_REFRESH_LEAD_MAX_S = 60.0
# At least this long between two fetches by the refresh timer, however close the exp is.
_REFRESH_MIN_INTERVAL_S = 1.0


def token_claims(token: str) -> dict[str, Any] | None:
    """The payload of a compact JWT (``header.payload.signature``), unverified; None if unreadable."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def token_expiry(token: str) -> float | None:
    """The token's ``exp`` (unix seconds), or None when it has none we can read."""
    claims = token_claims(token)
    exp = None if claims is None else claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


def token_allows(token: str, stream: str, right: str) -> bool | None:
    """Whether the token's claims grant ``right`` on ``stream``; None when they cannot be read."""
    claims = token_claims(token)
    if claims is None:
        return None
    streams, rights = claims.get("streams"), claims.get("rights", ["read"])
    if not isinstance(streams, list) or not isinstance(rights, list):
        return None
    principal = Principal(
        streams=tuple(s for s in streams if isinstance(s, str)),
        rights=frozenset(r for r in rights if isinstance(r, str)),
        expires_at=token_expiry(token) or math.inf,
    )
    return principal.allows(stream, right)


AuthSender = Callable[[str], Awaitable[bool]]


class TokenKeeper:
    """A consumer's current JWT: fetched when missing, replaced before it expires.

    ``fetch_token`` (sync or async, returns a JWT) is called when there is no token (at the
    first connect, after :meth:`forget`), and by the refresh timer :meth:`watch` sets at a third
    of the token's remaining life before its ``exp`` (at most a minute before), and never
    sooner than a second after its last fetch. The refreshed token is handed to ``send`` (the
    consumer writes it as an ``auth`` op on the open connection) and kept for the next connect,
    so the stream is never interrupted by its token's expiry.

    A ``fetch_token`` that hands back a token expiring no later than the current one (a cache,
    a static token) ends the proactive refreshing for this connection: refreshing again would
    only fetch the same token in a loop. relayd then closes with 4002 at the exp, and the
    reconnect fetches once more (raising :class:`Unauthorized` if that token is refused too).
    """

    def __init__(self, token: str | None, fetch_token: TokenSource | None, label: str) -> None:
        self.token = token or None
        self._fetch = fetch_token
        self._label = label  # for log lines
        self._send: AuthSender | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_refresh = -math.inf  # time.monotonic() of the refresh timer's last fetch

    @property
    def can_fetch(self) -> bool:
        return self._fetch is not None

    async def get(self) -> str:
        """The token to connect with, fetching one if there is none."""
        if self.token is None:
            self.token = await self.fetch()
        return self.token

    def forget(self) -> None:
        """relayd refused the token: the next :meth:`get` fetches a new one."""
        self.token = None

    async def fetch(self) -> str:
        if self._fetch is None:
            raise RuntimeError("no fetch_token callable")
        result = self._fetch()
        token = await result if inspect.isawaitable(result) else result
        if not isinstance(token, str) or not token:
            raise TypeError(f"fetch_token must return a JWT string, got {type(token).__name__}")
        return token

    def watch(self, send: AuthSender, expires_at: float | None = None) -> None:
        """Refresh the token before ``expires_at`` (default: the current token's ``exp``) via ``send``."""
        self.stop()
        self._send = send
        if expires_at is None and self.token is not None:
            expires_at = token_expiry(self.token)
        if self._fetch is None or expires_at is None:
            return
        remaining = expires_at - time.time()
        delay = max(0.0, remaining - min(_REFRESH_LEAD_MAX_S, remaining * _REFRESH_SHARE))
        delay = max(delay, self._last_refresh + _REFRESH_MIN_INTERVAL_S - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def stop(self) -> None:
        """Stop refreshing (the connection is gone; :meth:`watch` starts again on the next one)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._send = None

    def _due(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._refresh(), name="relayd-consumer-token-refresh")

    async def _refresh(self) -> None:
        send = self._send
        old_expiry = None if self.token is None else token_expiry(self.token)
        self._last_refresh = time.monotonic()
        try:
            token = await self.fetch()
        except Exception:
            # Not fatal yet: the old token holds until its exp, and the reconnect after relayd's
            # 4002 calls fetch_token again, raising to the caller if it still fails.
            log.warning("%s: fetch_token failed; relayd will close at expiry", self._label, exc_info=True)
            return
        new_expiry = token_expiry(token)
        if old_expiry is not None and (new_expiry is None or new_expiry <= old_expiry):
            # Nothing gained (a cached or static token): stop here rather than fetch in a loop.
            log.info("%s: fetch_token returned no later exp; relayd will close at expiry", self._label)
            self._task = None
            return
        self.token = token
        if send is not None and send is self._send and await send(token):
            self._task = None
            self.watch(send)
