"""The consumer's websocket: connect with backoff and a token, and decide what a drop means.

:class:`~relayd.client.consumer.Consumer` reads frames and keeps the cursor; this module owns
everything about the connection under it (docs/protocol.md, "Consumer websocket"):

- **connecting**: the ``/v1/streams/{id}/ws`` URL from the cursor, the token as a
  ``bearer.<jwt>`` subprotocol (fetched when missing), backoff between attempts (:class:`Retry`);
- **drops**: a 4001/4002 close fetches another token and reconnects (once: a fresh token
  refused again raises :class:`Unauthorized`); 4003 raises :class:`Forbidden`; any other close
  counts a failure and reconnects, unless reconnecting is off;
- **a run of failures** ends only with delivery (the consumer calls :meth:`delivered` on a chunk
  or the end), or when a connection that stayed up :data:`_HEALTHY_AFTER_S` drops: relayd says
  ``subscribed`` before its catch-up read, which fails while Redis is down, so a subscription
  alone proves nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from relayd.client.errors import ConnectionFailed, Forbidden, Unauthorized
from relayd.client.retry import Retry
from relayd.client.token_keeper import AuthSender, TokenKeeper
from relayd.errors import CloseCode

__all__ = ["ConsumerConnection"]

log = logging.getLogger("relayd.client.consumer")

SUBPROTOCOL = "relayd.v1"
# relayd pings every server.heartbeat_s (20 s); any data resets this timer, so it only fires on a
# connection that went silent (a vanished host), which a plain read would wait on forever.
_HEARTBEAT_S = 30.0
# Bounds the handshake only (aiohttp's default is 300 s in total, which would stall a reconnect to
# a vanished host); once upgraded, the websocket has no read timeout, the heartbeat watches it.
_HANDSHAKE_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=10.0)
_AUTH_CLOSES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.TOKEN_EXPIRED})
_RETRY_HTTP_STATUSES = frozenset({408, 429})
# A connection open this long without a chunk (a quiet live stream) was healthy: its drop starts
# a new run of failures rather than continuing the last one.
_HEALTHY_AFTER_S = 10.0


class ConsumerConnection:
    """The websocket of one consumer, replaced on every reconnect; see the module docstring."""

    def __init__(
        self,
        base: str,
        stream: str,
        tokens: TokenKeeper,
        retry: Retry,
        *,
        wait_ms: int | None,
        reconnect: bool,
        session: aiohttp.ClientSession | None,
    ) -> None:
        self.base = base  # ws(s)://host:port[/prefix]
        self.stream = stream
        self.tokens = tokens
        self.retry = retry
        self.reconnect = reconnect
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.closed = False
        self._wait_ms = wait_ms
        self._session = session
        self._own_session = session is None
        self._connected_at = 0.0  # time.monotonic() of the last successful connect
        self._auth_refusals = 0  # tokens refused in a row (4001/4002); reset by "subscribed"
        self._send_lock = asyncio.Lock()

    async def connect(self, cursor: str | None) -> aiohttp.ClientWebSocketResponse:
        """Open the websocket (with backoff after failures), subscribing after ``cursor``."""
        while True:
            if self.closed:
                raise StopAsyncIteration
            await self.retry.wait(f"stream {self.stream}")
            token = await self.tokens.get()
            if self.closed:  # close() from another task while this one waited
                raise StopAsyncIteration
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=_HANDSHAKE_TIMEOUT)
            try:
                ws = await self._session.ws_connect(
                    self.url(cursor),
                    protocols=(SUBPROTOCOL, f"bearer.{token}"),
                    heartbeat=_HEARTBEAT_S,
                    max_msg_size=0,  # relayd coalesces frames; it bounds what it sends itself
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status < 500 and exc.status not in _RETRY_HTTP_STATUSES:
                    raise ConnectionFailed(f"relayd refused the websocket: HTTP {exc.status}") from exc
                self._attempt_failed(exc)
                continue
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self._attempt_failed(exc)
                continue
            if self.closed:
                await ws.close()
                raise StopAsyncIteration
            self.ws = ws
            self._connected_at = time.monotonic()
            self.tokens.watch(self._auth_sender(ws))
            return ws

    def subscribed(self) -> None:
        """relayd accepted the token (not yet a success: see the module docstring)."""
        self._auth_refusals = 0

    def delivered(self) -> None:
        """A chunk or the end arrived: the run of failures, if any, is over."""
        self.retry.succeeded()

    def lost(self, error: BaseException) -> None:
        """An open connection failed: one more failure, unless it had been healthy a while."""
        if time.monotonic() - self._connected_at >= _HEALTHY_AFTER_S:
            self.retry.succeeded()  # a long-lived connection that drops starts a new run
        self.retry.failed(error)

    def _attempt_failed(self, exc: BaseException) -> None:
        if not self.reconnect:
            raise ConnectionFailed(f"cannot reach relayd at {self.base}: {exc}") from exc
        self.retry.failed(exc)
        log.info("stream %s: connection attempt %d failed: %s", self.stream, self.retry.failures, exc)

    async def dropped(self, ws: aiohttp.ClientWebSocketResponse, code: int | None, reason: str) -> None:
        """``ws`` closed: raise what it means, or count a failure (the next read reconnects)."""
        if ws is not self.ws:
            return
        await self.discard()
        if self.closed:
            raise StopAsyncIteration
        if code in _AUTH_CLOSES:
            wire = reason or ("token_expired" if code == CloseCode.TOKEN_EXPIRED else "unauthorized")
            refused = Unauthorized("relayd refused the token", code=wire, stream=self.stream)
            self._auth_refusals += 1
            # Without fetch_token nothing changes on a retry; with it, a freshly fetched token
            # refused again means fetch_token hands out tokens relayd does not accept.
            if not self.tokens.can_fetch or self._auth_refusals > 1:
                raise refused
            self.tokens.forget()  # fetch a fresh one for the reconnect
            self.lost(refused)
            log.info("stream %s: token refused (%s); fetching a new one", self.stream, wire)
            return
        if code == CloseCode.FORBIDDEN:
            raise Forbidden(reason or "the token does not allow this stream", stream=self.stream)
        error = ConnectionFailed(f"connection closed (code {code} {reason})".strip())
        if not self.reconnect:
            raise error
        self.lost(error)
        log.info("stream %s: relayd closed the connection (code %s %s); resuming", self.stream, code, reason)

    async def discard(self) -> None:
        """Drop the current websocket (the next read reconnects)."""
        self.tokens.stop()
        ws, self.ws = self.ws, None
        if ws is not None and not ws.closed:
            await ws.close()

    async def close(self) -> None:
        """Close for good (idempotent), and the session if it is ours."""
        self.closed = True
        self.tokens.stop()
        ws, self.ws = self.ws, None
        if ws is not None:
            await ws.close()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, cursor: str | None) -> str:
        query: dict[str, str] = {}
        if cursor is not None:
            query["cursor"] = cursor
        if self._wait_ms is not None:
            query["wait_ms"] = str(self._wait_ms)
        # "/" and the like are valid in stream ids: quote the id into one path segment.
        path = f"/v1/streams/{quote(self.stream, safe='')}/ws"
        return f"{self.base}{path}?{urlencode(query)}" if query else f"{self.base}{path}"

    async def send(self, ws: aiohttp.ClientWebSocketResponse, op: dict[str, Any]) -> bool:
        """Write one op on ``ws`` if it is still the open connection; whether it was written."""
        async with self._send_lock:
            if ws is not self.ws or ws.closed:
                return False  # the reader sees the close and reconnects; what is pending is sent again
            try:
                await ws.send_str(orjson.dumps(op).decode())
            except (aiohttp.ClientError, ConnectionError) as exc:
                log.info("stream %s: could not send %s: %s", self.stream, op.get("op"), exc)
                return False
            return True

    def _auth_sender(self, ws: aiohttp.ClientWebSocketResponse) -> AuthSender:
        async def send_auth(token: str) -> bool:
            return await self.send(ws, {"op": "auth", "token": token})

        return send_auth
