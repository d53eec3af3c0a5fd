"""Read one stream from relayd: ``consume()`` returns a :class:`Consumer` to iterate.

The consumer is a pull loop over one websocket (``/v1/streams/{id}/ws``, docs/protocol.md):
each step of the caller's iteration reads at most one websocket message, so a slow caller
slows the connection down (relayd then catches it up from Redis) instead of growing a buffer
here. Everything else hangs off that loop:

- **resume**: the cursor of the last chunk handed to the caller is the resume point; after any
  drop (relayd restart, 1012 drain, 4008, network) it reconnects with backoff and asks for what
  follows it, and drops any chunk at or before it (cursors of one stream sort lexicographically),
  so the caller sees every chunk once, in order;
- **tokens**: ``fetch_token`` supplies a JWT at connect, after a 4001/4002 close, and shortly
  before the current token's ``exp`` (sent as an ``auth`` op on the open connection, so a long
  stream is never interrupted by its token);
- **ends**: ``completed`` ends the iteration, other reasons raise a :class:`StreamFailed`
  subclass after the last chunk; ``gap`` and ``reset`` raise, explicitly, and leave the
  consumer usable (iterate again to go on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from relayd.client.errors import (
    ConnectionFailed,
    Forbidden,
    StreamGap,
    StreamReset,
    Unauthorized,
    refused_from_frame,
    stream_failed,
)
from relayd.client.retry import Retry
from relayd.client.token_keeper import AuthSender, TokenKeeper, TokenSource, token_allows
from relayd.errors import CloseCode, ProtocolError
from relayd.protocol import is_valid_stream_id, parse_optional_cursor, split_message

__all__ = ["Consumer", "Decoder", "End", "TokenSource", "consume"]

log = logging.getLogger("relayd.client.consumer")

Decoder = Callable[[Any], Any]

SUBPROTOCOL = "relayd.v1"
# relayd pings every server.heartbeat_s (20 s); any data resets this timer, so it only fires on a
# connection that went silent (a vanished host), which a plain read would wait on forever.
_HEARTBEAT_S = 30.0
# Bounds the handshake only (aiohttp's default is 300 s in total, which would stall a reconnect to
# a vanished host); once upgraded, the websocket has no read timeout, the heartbeat watches it.
_HANDSHAKE_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=10.0)
# Subscription errors after which subscribing again may succeed: reconnect with backoff.
_TRANSIENT_ERRORS = frozenset({"store_unavailable", "internal", "shutting_down"})
_AUTH_CLOSES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.TOKEN_EXPIRED})
_RETRY_HTTP_STATUSES = frozenset({408, 429})
# A connection open this long without a chunk (a quiet live stream) was healthy: its drop starts
# a new run of failures rather than continuing the last one.
_HEALTHY_AFTER_S = 10.0


@dataclass(frozen=True, slots=True)
class End:
    """How a stream ended: ``reason`` (completed, error, cancelled, producer_lost), the
    producer's ``message`` if any, and the end's ``cursor``."""

    reason: str
    message: str | None
    cursor: str | None


def consume(
    url: str,
    stream: str,
    *,
    token: str | None = None,
    fetch_token: TokenSource | None = None,
    cursor: str | None = None,
    decoder: Decoder | None = None,
    wait_ms: int | None = None,
    reconnect: bool = True,
    raise_on_end: bool = True,
    max_retries: int | None = 10,
    backoff_initial_s: float = 0.1,
    backoff_max_s: float = 5.0,
    session: aiohttp.ClientSession | None = None,
) -> Consumer:
    """A :class:`Consumer` of ``stream`` at relayd's base ``url`` (``http(s)://host:port``).

    Nothing is connected until the first iteration (or ``async with``). ``max_retries`` bounds
    the reconnection attempts in a row (None: no bound); ``session`` lets the caller share an
    aiohttp session (the consumer then does not close it).
    """
    return Consumer(
        url,
        stream,
        token=token,
        fetch_token=fetch_token,
        cursor=cursor,
        decoder=decoder,
        wait_ms=wait_ms,
        reconnect=reconnect,
        raise_on_end=raise_on_end,
        max_retries=max_retries,
        backoff_initial_s=backoff_initial_s,
        backoff_max_s=backoff_max_s,
        session=session,
    )


class Consumer:
    """An async iterator over one stream's decoded chunks; see :func:`consume`."""

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        token: str | None,
        fetch_token: TokenSource | None,
        cursor: str | None,
        decoder: Decoder | None,
        wait_ms: int | None,
        reconnect: bool,
        raise_on_end: bool,
        max_retries: int | None,
        backoff_initial_s: float,
        backoff_max_s: float,
        session: aiohttp.ClientSession | None,
    ) -> None:
        if not is_valid_stream_id(stream):
            raise ValueError(f"invalid stream id {stream[:40]!r}: 1-200 characters of A-Z a-z 0-9 _ - . : / @ =")
        try:
            parse_optional_cursor(cursor)
        except ProtocolError as exc:
            raise ValueError(f"invalid cursor {cursor!r}") from exc
        if not token and fetch_token is None:
            raise ValueError("a token or a fetch_token callable is required")
        if wait_ms is not None and wait_ms < 0:
            raise ValueError("wait_ms must be >= 0")
        self.stream = stream
        self._base = _ws_base(url)
        self._tokens = TokenKeeper(token, fetch_token, f"stream {stream}")
        self._cursor = cursor or None
        self._decoder = decoder
        self._wait_ms = wait_ms
        self._reconnect = reconnect
        self._raise_on_end = raise_on_end
        self._retry = Retry(backoff_initial_s, backoff_max_s, max_retries)
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._frames: deque[dict[str, Any]] = deque()
        self._end: End | None = None
        self._closed = False
        self._busy = False  # an __anext__ is running: a second concurrent one is a caller bug
        self._gap_seen: tuple[Any, Any] | None = None
        self._auth_refusals = 0  # tokens refused in a row (4001/4002); reset by "subscribed"
        self._cancel_wanted = False  # cancel() called, relayd has not confirmed it yet
        self._cancels_unanswered = 0  # cancel ops sent on this connection, not answered yet
        self._send_lock = asyncio.Lock()
        self._connected_at = 0.0  # time.monotonic() of the last successful connect

    # -- public ------------------------------------------------------------------------------

    @property
    def cursor(self) -> str | None:
        """Cursor of the last chunk yielded: persist it, pass it as ``cursor=`` to resume."""
        return self._cursor

    @property
    def end(self) -> End | None:
        """How the stream ended, once the iteration reached its end; else None."""
        return self._end

    async def __aenter__(self) -> Consumer:
        if self._ws is None and self._end is None and not self._closed:
            try:
                await self._connect()
            except BaseException:
                await self.aclose()
                raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Any:
        if self._busy:
            raise RuntimeError("Consumer is already being iterated by another task")
        self._busy = True
        try:
            while True:
                if self._end is not None or self._closed:
                    raise StopAsyncIteration
                frame = await self._next_frame()
                kind = frame.get("type")
                if kind == "chunk" or kind == "end":
                    # Delivery, not the ``subscribed`` before it, ends a run of failures: relayd
                    # subscribes before its catch-up read, which fails while Redis is down.
                    self._retry.succeeded()
                if kind == "chunk":
                    cursor = frame.get("cursor")
                    if not isinstance(cursor, str) or (self._cursor is not None and cursor <= self._cursor):
                        continue  # already handed out (a resend across a reconnect): never twice
                    data = frame.get("data")
                    value = self._decoder(data) if self._decoder is not None else data
                    self._cursor = cursor
                    return value
                if kind == "end":
                    await self._ended(frame)
                else:
                    await self._control(frame)
        except (StopAsyncIteration, StreamGap, StreamReset):
            raise
        except Exception:
            await self.aclose()  # every other failure is final: release the connection now
            raise
        finally:
            self._busy = False

    async def cancel(self) -> None:
        """Ask the producer to stop; the iteration then ends with the stream's ``cancelled`` end.

        Needs a token with the ``cancel`` right (:class:`Forbidden` otherwise). Sent on the
        open connection, or as soon as the consumer connects; sent again after a reconnect
        until relayd has answered it. A stream that already ended is left alone.
        """
        if self._end is not None or self._closed:
            return
        token = self._tokens.token
        if token is not None and token_allows(token, self.stream, "cancel") is False:
            raise Forbidden("the token lacks the cancel right on this stream", stream=self.stream)
        self._cancel_wanted = True
        if self._ws is not None:
            await self._send_cancel(self._ws)

    async def aclose(self) -> None:
        """Close the connection (idempotent); the iteration then stops."""
        self._closed = True
        self._tokens.stop()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- frames ------------------------------------------------------------------------------

    async def _next_frame(self) -> dict[str, Any]:
        """The next frame, reading one websocket message when none is buffered; reconnects."""
        while not self._frames:
            if self._closed:
                raise StopAsyncIteration
            ws = self._ws if self._ws is not None else await self._connect()
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                self._frames.extend(orjson.loads(line) for line in split_message(msg.data))
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                await self._dropped(ws, ws.close_code, str(msg.extra or ""))
            elif msg.type is aiohttp.WSMsgType.ERROR:
                await self._dropped(ws, ws.close_code, str(msg.data))
        return self._frames.popleft()

    async def _ended(self, frame: dict[str, Any]) -> None:
        reason = str(frame.get("reason") or "completed")
        message = frame.get("message")
        cursor = frame.get("cursor")
        self._end = End(
            reason, message if isinstance(message, str) else None, cursor if isinstance(cursor, str) else None
        )
        await self.aclose()
        if reason != "completed" and self._raise_on_end:
            raise stream_failed(reason, self._end.message or "", self._end.cursor, self.stream)
        raise StopAsyncIteration

    async def _control(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "subscribed":
            self._auth_refusals = 0  # the token was accepted
        elif kind == "gap":
            seen = (frame.get("cursor"), frame.get("next"))
            if seen != self._gap_seen:  # the same gap again after a reconnect was already raised
                self._gap_seen = seen
                raise StreamGap(frame.get("cursor"), str(frame.get("next")), self.stream)
        elif kind == "reset":
            # The old cursor means nothing in the new generation: resume from its start.
            self._cursor = None
            self._gap_seen = None
            raise StreamReset(str(frame.get("reason") or "stream_replaced"), self.stream)
        elif kind == "cancel_requested":
            self._cancel_answered()
        elif kind == "error":
            await self._error(frame)

    async def _error(self, frame: dict[str, Any]) -> None:
        code = frame.get("code")
        if frame.get("stream") is None and code in ("unauthorized", "token_expired"):
            # The answer to a refreshed token's ``auth``: the old token stays in force until it
            # expires (4002); the reconnect then fetches another one.
            log.warning("relayd refused the refreshed token (%s): %s", code, frame.get("message"))
            self._tokens.forget()
            return
        if code == "stream_ended":
            # Only a cancel is answered so: the stream ended first, and its end frame says how.
            self._cancel_answered()
            return
        if code == "forbidden" and self._cancels_unanswered:
            self._cancel_answered()  # a refused cancel (the token lacks the right)
            raise refused_from_frame(frame)
        if code in _TRANSIENT_ERRORS and self._reconnect:
            log.info("stream %s: %s; subscribing again", self.stream, code)
            self._lost(refused_from_frame(frame))
            await self._discard()
            return
        raise refused_from_frame(frame)

    # -- connection --------------------------------------------------------------------------

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """Open the websocket (with backoff after failures) and subscribe from the cursor."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            await self._retry.wait(f"stream {self.stream}")
            token = await self._tokens.get()
            if self._closed:  # aclose() from another task while this one waited
                raise StopAsyncIteration
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=_HANDSHAKE_TIMEOUT)
            try:
                ws = await self._session.ws_connect(
                    self._url(),
                    protocols=(SUBPROTOCOL, f"bearer.{token}"),
                    heartbeat=_HEARTBEAT_S,
                    max_msg_size=0,  # relayd coalesces frames; it bounds what it sends itself
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status < 500 and exc.status not in _RETRY_HTTP_STATUSES:
                    raise ConnectionFailed(f"relayd refused the websocket: HTTP {exc.status}") from exc
                self._failed(exc)
                continue
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self._failed(exc)
                continue
            if self._closed:
                await ws.close()
                raise StopAsyncIteration
            self._ws = ws
            self._connected_at = time.monotonic()
            self._frames.clear()
            self._cancels_unanswered = 0
            if self._cancel_wanted:  # not confirmed on the last connection: ask again
                await self._send_cancel(ws)
            self._tokens.watch(self._auth_sender(ws))
            return ws

    def _failed(self, exc: BaseException) -> None:
        if not self._reconnect:
            raise ConnectionFailed(f"cannot reach relayd at {self._base}: {exc}") from exc
        self._retry.failed(exc)
        log.info("stream %s: connection attempt %d failed: %s", self.stream, self._retry.failures, exc)

    def _lost(self, error: BaseException) -> None:
        """An open connection failed: one more failure, unless it had been healthy a while."""
        if time.monotonic() - self._connected_at >= _HEALTHY_AFTER_S:
            self._retry.succeeded()  # a long-lived connection that drops starts a new run
        self._retry.failed(error)

    async def _dropped(self, ws: aiohttp.ClientWebSocketResponse, code: int | None, reason: str) -> None:
        """The connection closed: raise what it means, or count a failure and reconnect."""
        if ws is not self._ws:
            return
        await self._discard()
        if self._closed:
            raise StopAsyncIteration
        if code in _AUTH_CLOSES:
            wire = reason or ("token_expired" if code == CloseCode.TOKEN_EXPIRED else "unauthorized")
            refused = Unauthorized("relayd refused the token", code=wire, stream=self.stream)
            self._auth_refusals += 1
            # Without fetch_token nothing changes on a retry; with it, a freshly fetched token
            # refused again means fetch_token hands out tokens relayd does not accept.
            if not self._tokens.can_fetch or self._auth_refusals > 1:
                raise refused
            self._tokens.forget()  # fetch a fresh one for the reconnect
            self._lost(refused)
            log.info("stream %s: token refused (%s); fetching a new one", self.stream, wire)
            return
        if code == CloseCode.FORBIDDEN:
            raise Forbidden(reason or "the token does not allow this stream", stream=self.stream)
        error = ConnectionFailed(f"connection closed (code {code} {reason})".strip())
        if not self._reconnect:
            raise error
        self._lost(error)
        log.info(
            "stream %s: relayd closed the connection (code %s %s); resuming after cursor %s",
            self.stream,
            code,
            reason,
            self._cursor,
        )

    async def _discard(self) -> None:
        self._tokens.stop()
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            await ws.close()

    def _url(self) -> str:
        query: dict[str, str] = {}
        if self._cursor is not None:
            query["cursor"] = self._cursor
        if self._wait_ms is not None:
            query["wait_ms"] = str(self._wait_ms)
        # "/" and the like are valid in stream ids: quote the id into one path segment.
        path = f"/v1/streams/{quote(self.stream, safe='')}/ws"
        return f"{self._base}{path}?{urlencode(query)}" if query else f"{self._base}{path}"

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, op: dict[str, Any]) -> bool:
        """Write one op on ``ws`` if it is still the open connection; whether it was written."""
        async with self._send_lock:
            if ws is not self._ws or ws.closed:
                return False  # the reader sees the close and reconnects; what is pending is sent again
            try:
                await ws.send_str(orjson.dumps(op).decode())
            except (aiohttp.ClientError, ConnectionError) as exc:
                log.info("stream %s: could not send %s: %s", self.stream, op.get("op"), exc)
                return False
            return True

    async def _send_cancel(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if await self._send(ws, {"op": "cancel", "stream": self.stream}):
            self._cancels_unanswered += 1

    def _cancel_answered(self) -> None:
        self._cancel_wanted = False
        self._cancels_unanswered = max(0, self._cancels_unanswered - 1)

    def _auth_sender(self, ws: aiohttp.ClientWebSocketResponse) -> AuthSender:
        async def send_auth(token: str) -> bool:
            return await self._send(ws, {"op": "auth", "token": token})

        return send_auth


def _ws_base(url: str) -> str:
    """``http(s)://`` or ``ws(s)://host:port[/prefix]`` -> the ``ws(s)://`` base, no trailing slash."""
    base = url.rstrip("/")
    for scheme, ws_scheme in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(scheme):
            return ws_scheme + base[len(scheme) :]
    if base.startswith(("ws://", "wss://")):
        return base
    raise ValueError(f"relayd url must start with http://, https://, ws:// or wss://, got {url!r}")
