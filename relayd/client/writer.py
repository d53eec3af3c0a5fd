"""``Writer``: one stream of a Producer, and ``StreamResult``, how a stream ended.

The writer is the stream-level API on top of the shared connection (:mod:`relayd.client.session`):
encoding, refusing what cannot be sent, and how a stream ends (by the code, an exception or a
consumer's cancel). Its state machine is :class:`~relayd.client.stream_state.StreamState`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import orjson

from relayd.client.encoding import Encoder
from relayd.client.errors import ChunkTooLarge, ClientError, ProducerClosed, StreamEndedByServer, again
from relayd.client.session import Connection
from relayd.client.stream_state import StreamState

__all__ = ["EndReason", "OnCancel", "StreamResult", "Writer"]

EndReason = Literal["completed", "error", "cancelled"]
OnCancel = Callable[[], Any]  # sync, or returning an awaitable


@dataclass(frozen=True, slots=True)
class StreamResult:
    """How a stream ended: ``reason`` and the end's ``cursor`` as relayd stored them.

    ``chunks`` counts the chunks this producer appended (acknowledged ones, unless relayd ended
    the stream first). ``error`` is the upstream's exception when :meth:`Producer.stream` was told
    not to raise it. ``ended_by_server`` is set when relayd ended the stream without being asked
    (an operator's ``relayd streams end``): ``reason`` is then the operator's, and its
    ``message`` says why.
    """

    stream: str
    reason: str
    cursor: str | None
    chunks: int
    error: BaseException | None = None
    ended_by_server: StreamEndedByServer | None = None


class Writer:
    """Appends to one stream; made by :meth:`Producer.writer`, used as ``async with``.

    Leaving the block without :meth:`end` ends the stream ``completed``; with an exception,
    ``error`` with ``str(exc)`` as the message (the exception propagates); after a consumer's
    cancel request, ``cancelled``. If the task is cancelled, the end (``cancelled``) is queued,
    not awaited; the Producer's exit waits for it.
    """

    def __init__(self, conn: Connection, stream: str, encoder: Encoder, content_type: str) -> None:
        self._conn = conn
        self._encoder = encoder
        self._text = content_type == "text"
        self._state: StreamState = conn.add_stream(stream, content_type)
        self.stream = stream

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when a consumer asked to cancel the stream (stop and end it ``cancelled``), or when
        relayd ended it (:attr:`ended_by_server`; ending it again is then a no-op)."""
        return self._state.cancelled

    @property
    def ended_by_server(self) -> StreamEndedByServer | None:
        """Why relayd ended the stream unasked (an operator's ``relayd streams end``), else None."""
        return self._state.ended_by_server

    @property
    def cursor(self) -> str | None:
        """The cursor of the last acknowledged chunk (None before the first ack)."""
        return self._state.cursor

    @property
    def chunks(self) -> int:
        """Chunks appended so far (acknowledged or not)."""
        return self._state.next_seq - 1

    @property
    def failure(self) -> ClientError | None:
        """Why the stream takes no more chunks (a refusal, the connection giving up), else None."""
        return self._state.failure

    @property
    def can_end(self) -> bool:
        """False once no end can be written any more (ended, fenced, connection gone)."""
        return not self._state.terminal

    def on_cancel(self, callback: OnCancel) -> None:
        """Call ``callback()`` (sync, or returning an awaitable) when a consumer asks to cancel."""
        self._state.cancel_callbacks.append(callback)
        if self._state.cancelled.is_set():
            self._conn.run_callback(callback)

    async def send(self, item: Any) -> bool:
        """Encode ``item`` and append it; False if the encoder made nothing of it.

        Returns once the chunk is queued inside the ack window: waits while the Producer's
        unacknowledged bytes would exceed ``max_unacked_bytes``. Raises the stream's failure
        (:class:`ProducerFenced`, :class:`StreamAlreadyEnded`, a :class:`Refused` chunk,
        :class:`ConnectionFailed`), ``ProducerClosed`` after :meth:`end`, ``TypeError`` for a
        value that is not JSON (or not a string on a text stream), and :class:`ChunkTooLarge`
        (a ``ValueError`` too) for a chunk that, framed as an ``append``, exceeds the
        Producer's ``max_message_bytes``: that chunk is not sent, the stream and the other
        streams are unaffected.
        """
        state = self._state
        self._check()
        value = self._encoder(item)
        if value is None or (isinstance(value, str) and not value):
            return False
        if self._text and not isinstance(value, str):
            raise TypeError(f"a text stream takes strings; the encoder returned {type(value).__name__}")
        data = orjson.dumps(value)
        limit = self._conn.message_limit
        if len(data) + state.append_overhead > limit:
            raise ChunkTooLarge(
                f"stream {self.stream}: a chunk of {len(data)} bytes does not fit a message of {limit} bytes"
                f" (max_message_bytes, or less after a 1009 from relayd; {state.append_overhead} bytes of framing)",
                len(data),
                limit,
            )
        await self._conn.reserve(len(data))
        try:
            self._check()
        except BaseException:
            self._conn.release(len(data))
            raise
        state.enqueue(data)
        return True

    def _check(self) -> None:
        state = self._state
        if state.failure is not None:
            raise again(state.failure)
        if state.end_request is not None or state.done:
            raise ProducerClosed(f"stream {self.stream} has been ended")

    async def flush(self) -> None:
        """Wait until every chunk sent so far is acknowledged (stored in Redis)."""
        state = self._state
        while not state.idle.is_set():
            await state.idle.wait()
        if state.failure is not None:
            raise again(state.failure)

    async def end(self, reason: EndReason = "completed", message: str | None = None) -> StreamResult:
        """End the stream once every chunk is acknowledged; return how relayd stored the end.

        ``message`` (at most 1000 characters are kept) says why, for ``error``. Idempotent: a
        second call waits for the same end. If a chunk was refused (see :meth:`send`), ending
        ``completed`` ends ``error`` instead and raises the refusal. If relayd already ended the
        stream unasked, returns that end, with ``ended_by_server`` set.
        """
        state = self._state
        failure = state.failure
        if failure is not None and not state.terminal and reason == "completed":
            state.request_end("error", str(failure))
        else:
            state.request_end(reason, message or "")
        try:
            ended = await state.ended
        except ClientError as exc:
            raise again(exc) from exc  # every waiter gets its own copy of the stored failure
        by_server = state.ended_by_server
        if failure is not None and reason == "completed" and by_server is None:
            raise again(failure)
        return StreamResult(self.stream, ended.reason, ended.cursor, self.chunks, ended_by_server=by_server)

    def end_nowait(self, reason: EndReason, message: str = "") -> None:
        """Queue the end without waiting for it (the Producer's exit waits)."""
        self._state.request_end(reason, message)

    async def __aenter__(self) -> Writer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        state = self._state
        if state.done or state.terminal:
            return
        if exc is None:
            await self.end("cancelled" if state.cancelled.is_set() else "completed")
        elif not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt: do not await
            self.end_nowait("cancelled", f"producer stopped: {type(exc).__name__}")
        else:
            with contextlib.suppress(ClientError):
                await self.end("error", str(exc) or type(exc).__name__)
