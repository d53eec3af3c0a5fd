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
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from yarl import URL

from relayd.client.claims import token_allows, token_expiry
from relayd.client.errors import (
    ConnectionFailed,
    Forbidden,
    StreamGap,
    StreamReset,
    Unauthorized,
    refused_from_frame,
    stream_failed,
)
from relayd.errors import CloseCode, ProtocolError
from relayd.protocol import is_valid_stream_id, parse_optional_cursor

__all__ = ["Consumer", "Decoder", "End", "TokenSource", "consume"]

log = logging.getLogger("relayd.client.consumer")

TokenSource = Callable[[], str | Awaitable[str]]
Decoder = Callable[[Any], Any]

SUBPROTOCOL = "relayd.v1"
# relayd pings every server.heartbeat_s (20 s); any data resets this timer, so it only fires on a
# connection that went silent (a vanished host), which a plain read would wait on forever.
_HEARTBEAT_S = 30.0
# Refresh this share of a token's remaining lifetime before its exp, capped: early enough that
# the auth op arrives before relayd closes with 4002, late enough not to fetch in a loop.
_REFRESH_SHARE = 1 / 3
_REFRESH_LEAD_MAX_S = 60.0
# Subscription errors after which subscribing again may succeed: reconnect with backoff.
_TRANSIENT_ERRORS = frozenset({"store_unavailable", "internal", "shutting_down"})
_AUTH_CLOSES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.TOKEN_EXPIRED})
_RETRY_HTTP_STATUSES = frozenset({408, 429})


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
        if backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("backoff: need 0 < backoff_initial_s <= backoff_max_s")
        self.stream = stream
        self._base = _ws_base(url)
        self._token = token or None
        self._fetch_token = fetch_token
        self._cursor = cursor or None
        self._decoder = decoder
        self._wait_ms = wait_ms
        self._reconnect = reconnect
        self._raise_on_end = raise_on_end
        self._max_retries = max_retries
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._frames: deque[dict[str, Any]] = deque()
        self._end: End | None = None
        self._closed = False
        self._busy = False  # an __anext__ is running: a second concurrent one is a caller bug
        self._failures = 0  # connection attempts failed in a row; reset by "subscribed"
        self._last_error: BaseException | None = None
        self._gap_seen: tuple[Any, Any] | None = None
        self._cancel_pending = False  # cancel sent (or to send) and not yet answered
        self._send_lock = asyncio.Lock()
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._refresh_task: asyncio.Task[None] | None = None

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
        if self._token is not None and token_allows(self._token, self.stream, "cancel") is False:
            raise Forbidden("the token lacks the cancel right on this stream", stream=self.stream)
        self._cancel_pending = True
        if self._ws is not None:
            await self._send(self._ws, {"op": "cancel", "stream": self.stream})

    async def aclose(self) -> None:
        """Close the connection (idempotent); the iteration then stops."""
        self._closed = True
        self._stop_refresh()
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
                text = msg.data if isinstance(msg.data, str) else msg.data.decode()
                self._frames.extend(orjson.loads(line) for line in text.split("\n") if line.strip())
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
            self._failures = 0
            self._last_error = None
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
            self._cancel_pending = False
        elif kind == "authed":
            expires_at = frame.get("expires_at")
            if isinstance(expires_at, int | float):
                self._schedule_refresh(float(expires_at))
        elif kind == "error":
            await self._error(frame)

    async def _error(self, frame: dict[str, Any]) -> None:
        code = frame.get("code")
        if frame.get("stream") is None and code in ("unauthorized", "token_expired"):
            # The answer to a refreshed token's ``auth``: the old token stays in force until it
            # expires (4002); the reconnect then fetches another one.
            log.warning("relayd refused the refreshed token (%s): %s", code, frame.get("message"))
            self._token = None
            return
        if self._cancel_pending and code in ("forbidden", "stream_ended"):
            self._cancel_pending = False  # the answer to our cancel; the subscription goes on
            if code == "forbidden":
                raise refused_from_frame(frame)
            return
        if code in _TRANSIENT_ERRORS and self._reconnect:
            log.info("stream %s: %s; subscribing again", self.stream, code)
            self._last_error = refused_from_frame(frame)
            self._failures += 1
            await self._discard()
            return
        raise refused_from_frame(frame)

    # -- connection --------------------------------------------------------------------------

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """Open the websocket (with backoff after failures) and subscribe from the cursor."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._failures:
                if self._max_retries is not None and self._failures > self._max_retries:
                    raise ConnectionFailed(
                        f"gave up on stream {self.stream} after {self._failures} failed attempts: {self._last_error}",
                        attempts=self._failures,
                    ) from self._last_error
                await asyncio.sleep(self._delay(self._failures))
            token = await self._current_token()
            if self._session is None:
                self._session = aiohttp.ClientSession()
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
            self._ws = ws
            self._frames.clear()
            if self._cancel_pending:
                await self._send(ws, {"op": "cancel", "stream": self.stream})
            self._schedule_refresh(token_expiry(token))
            return ws

    def _failed(self, exc: BaseException) -> None:
        if not self._reconnect:
            raise ConnectionFailed(f"cannot reach relayd at {self._base}: {exc}") from exc
        self._failures += 1
        self._last_error = exc
        log.info("stream %s: connection attempt %d failed: %s", self.stream, self._failures, exc)

    async def _dropped(self, ws: aiohttp.ClientWebSocketResponse, code: int | None, reason: str) -> None:
        """The connection closed: raise what it means, or count a failure and reconnect."""
        if ws is not self._ws:
            return
        await self._discard()
        if self._closed:
            raise StopAsyncIteration
        if code in _AUTH_CLOSES:
            wire = reason or ("token_expired" if code == CloseCode.TOKEN_EXPIRED else "unauthorized")
            if self._fetch_token is None:
                raise Unauthorized("relayd closed the connection", code=wire, stream=self.stream)
            self._token = None  # fetch a fresh one for the reconnect
            self._last_error = Unauthorized("token refused", code=wire, stream=self.stream)
            self._failures += 1
            log.info("stream %s: token refused (%s); fetching a new one", self.stream, wire)
            return
        if code == CloseCode.FORBIDDEN:
            raise Forbidden(reason or "the token does not allow this stream", stream=self.stream)
        error = ConnectionFailed(f"connection closed (code {code} {reason})".strip())
        if not self._reconnect:
            raise error
        self._failures += 1
        self._last_error = error
        log.info(
            "stream %s: relayd closed the connection (code %s %s); resuming after cursor %s",
            self.stream,
            code,
            reason,
            self._cursor,
        )

    async def _discard(self) -> None:
        self._stop_refresh()
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            await ws.close()

    def _url(self) -> URL:
        query: dict[str, str] = {}
        if self._cursor is not None:
            query["cursor"] = self._cursor
        if self._wait_ms is not None:
            query["wait_ms"] = str(self._wait_ms)
        # "/" and the like are valid in stream ids: quote the id into one path segment.
        path = f"/v1/streams/{quote(self.stream, safe='')}/ws"
        return URL(f"{self._base}{path}{'?' + urlencode(query) if query else ''}", encoded=True)

    def _delay(self, failures: int) -> float:
        """Exponential backoff with jitter (half fixed, half random) for the n-th failure."""
        initial, cap = self._backoff
        delay = min(cap, initial * 2.0 ** min(failures - 1, 30))
        return delay / 2 + random.random() * delay / 2

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, op: dict[str, Any]) -> None:
        async with self._send_lock:
            if ws.closed:
                return  # the reader sees the close and reconnects; pending ops are sent again
            try:
                await ws.send_str(orjson.dumps(op).decode())
            except (aiohttp.ClientError, ConnectionError) as exc:
                log.info("stream %s: could not send %s: %s", self.stream, op.get("op"), exc)

    # -- tokens ------------------------------------------------------------------------------

    async def _current_token(self) -> str:
        if self._token is None:
            self._token = await self._call_fetch_token()
        return self._token

    async def _call_fetch_token(self) -> str:
        assert self._fetch_token is not None  # a consumer without a token has fetch_token
        result = self._fetch_token()
        token = await result if inspect.isawaitable(result) else result
        if not isinstance(token, str) or not token:
            raise TypeError(f"fetch_token must return a JWT string, got {type(token).__name__}")
        return token

    def _schedule_refresh(self, expires_at: float | None) -> None:
        self._stop_refresh()
        if self._fetch_token is None or expires_at is None or self._ws is None:
            return
        remaining = expires_at - time.time()
        delay = max(0.0, remaining - min(_REFRESH_LEAD_MAX_S, remaining * _REFRESH_SHARE))
        self._refresh_timer = asyncio.get_running_loop().call_later(delay, self._refresh_due)

    def _refresh_due(self) -> None:
        self._refresh_timer = None
        self._refresh_task = asyncio.create_task(self._refresh(), name="relayd-consumer-token-refresh")

    async def _refresh(self) -> None:
        ws = self._ws
        try:
            token = await self._call_fetch_token()
        except Exception:
            # Not fatal yet: the old token holds until its exp, and the reconnect after the 4002
            # calls fetch_token again, raising to the caller if it still fails.
            log.warning("stream %s: fetch_token failed; relayd will close at expiry", self.stream, exc_info=True)
            return
        self._token = token
        if ws is not None and ws is self._ws:
            await self._send(ws, {"op": "auth", "token": token})
            self._schedule_refresh(token_expiry(token))

    def _stop_refresh(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        task, self._refresh_task = self._refresh_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()


def _ws_base(url: str) -> str:
    """``http(s)://`` or ``ws(s)://host:port[/prefix]`` -> the ``ws(s)://`` base, no trailing slash."""
    base = url.rstrip("/")
    for scheme, ws_scheme in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(scheme):
            return ws_scheme + base[len(scheme) :]
    if base.startswith(("ws://", "wss://")):
        return base
    raise ValueError(f"relayd url must start with http://, https://, ws:// or wss://, got {url!r}")
