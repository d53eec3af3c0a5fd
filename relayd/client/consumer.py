"""Read one stream from relayd: ``consume()`` returns a :class:`Consumer` to iterate.

The consumer is a pull loop over one websocket (``/v1/streams/{id}/ws``, docs/protocol.md):
each step of the caller's iteration reads at most one websocket message, so a slow caller
slows the connection down (relayd then catches it up from Redis) instead of growing a buffer
here. The connection under the loop (backoff, the token at connect, what a close means) is
:class:`~relayd.client.consumer_connection.ConsumerConnection`. Everything else hangs off the loop:

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

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from relayd.client.consumer_connection import ConsumerConnection
from relayd.client.errors import (
    Forbidden,
    StreamGap,
    StreamReset,
    refused_from_frame,
    stream_failed,
)
from relayd.client.retry import Retry
from relayd.client.token_keeper import TokenKeeper, TokenSource, token_allows
from relayd.client.urls import ws_base
from relayd.errors import ProtocolError
from relayd.protocol import is_valid_stream_id, parse_optional_cursor, split_message

__all__ = ["Consumer", "Decoder", "End", "TokenSource", "consume"]

log = logging.getLogger("relayd.client.consumer")

Decoder = Callable[[Any], Any]

# Subscription errors after which subscribing again may succeed: reconnect with backoff.
_TRANSIENT_ERRORS = frozenset({"store_unavailable", "internal", "shutting_down"})


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
        self._tokens = TokenKeeper(token, fetch_token, f"stream {stream}")
        self._conn = ConsumerConnection(
            ws_base(url),
            stream,
            self._tokens,
            Retry(backoff_initial_s, backoff_max_s, max_retries),
            wait_ms=wait_ms,
            reconnect=reconnect,
            session=session,
        )
        self._cursor = cursor or None
        self._decoder = decoder
        self._raise_on_end = raise_on_end
        self._frames: deque[dict[str, Any]] = deque()
        self._end: End | None = None
        self._busy = False  # an __anext__ is running: a second concurrent one is a caller bug
        self._gap_seen: tuple[Any, Any] | None = None
        self._cancel_wanted = False  # cancel() called, relayd has not confirmed it yet
        self._cancels_unanswered = 0  # cancel ops sent on this connection, not answered yet

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
        if self._conn.ws is None and self._end is None and not self._conn.closed:
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
                if self._end is not None or self._conn.closed:
                    raise StopAsyncIteration
                frame = await self._next_frame()
                kind = frame.get("type")
                if kind == "chunk" or kind == "end":
                    self._conn.delivered()  # not ``subscribed``: see consumer_connection
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
        if self._end is not None or self._conn.closed:
            return
        token = self._tokens.token
        if token is not None and token_allows(token, self.stream, "cancel") is False:
            raise Forbidden("the token lacks the cancel right on this stream", stream=self.stream)
        self._cancel_wanted = True
        if self._conn.ws is not None:
            await self._send_cancel(self._conn.ws)

    async def aclose(self) -> None:
        """Close the connection (idempotent); the iteration then stops."""
        await self._conn.close()

    # -- frames ------------------------------------------------------------------------------

    async def _next_frame(self) -> dict[str, Any]:
        """The next frame, reading one websocket message when none is buffered; reconnects."""
        while not self._frames:
            if self._conn.closed:
                raise StopAsyncIteration
            ws = self._conn.ws if self._conn.ws is not None else await self._connect()
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                self._frames.extend(orjson.loads(line) for line in split_message(msg.data))
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                await self._conn.dropped(ws, ws.close_code, str(msg.extra or ""))
            elif msg.type is aiohttp.WSMsgType.ERROR:
                await self._conn.dropped(ws, ws.close_code, str(msg.data))
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
            self._conn.subscribed()
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
        if code in _TRANSIENT_ERRORS and self._conn.reconnect:
            log.info("stream %s: %s; subscribing again", self.stream, code)
            self._conn.lost(refused_from_frame(frame))
            await self._conn.discard()
            return
        raise refused_from_frame(frame)

    # -- connection --------------------------------------------------------------------------

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """Connect (see :class:`ConsumerConnection`) and restate what this consumer still wants."""
        ws = await self._conn.connect(self._cursor)
        self._frames.clear()
        self._cancels_unanswered = 0
        if self._cancel_wanted:  # not confirmed on the last connection: ask again
            await self._send_cancel(ws)
        return ws

    async def _send_cancel(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if await self._conn.send(ws, {"op": "cancel", "stream": self.stream}):
            self._cancels_unanswered += 1

    def _cancel_answered(self) -> None:
        self._cancel_wanted = False
        self._cancels_unanswered = max(0, self._cancels_unanswered - 1)
