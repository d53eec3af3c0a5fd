"""The asyncio producer: ``Producer`` (one connection), ``stream()``, ``tee()``, closing.

Every stream of a Producer shares one websocket (:mod:`relayd.client.session`), which batches
per event-loop tick, bounds the ack window, and reconnects and resends without loss or
duplicates. Each stream is written through a :class:`~relayd.client.writer.Writer`. This module
adds the Producer-level API on top: opening writers, piping an iterator into a stream (ending
it by how the iterator ended or a consumer's cancel), and closing within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from relayd.client.encoding import Encoder, default_encoder
from relayd.client.errors import AckTimeout, ClientError, ProducerClosed, again
from relayd.client.retry import Retry
from relayd.client.session import Connection, Options
from relayd.client.upstream import aiter_of, close_after, close_upstream, pump_into
from relayd.client.writer import EndReason, OnCancel, StreamResult, Writer
from relayd.errors import ProtocolError
from relayd.protocol import CONTENT_TYPES, check_stream_id

if TYPE_CHECKING:
    from relayd.client.tee import Tee

__all__ = ["EndReason", "Producer", "StreamResult", "Writer"]

log = logging.getLogger("relayd.client")


class Producer:
    """A connection to relayd's producer websocket, carrying any number of streams.

    ``url`` is relayd's base URL (``http(s)://host:port``, or ``ws(s)://``); ``api_key`` one of
    its API keys. ``encoder`` turns items into chunks (default: :func:`json_encoder` for
    ``content_type="json"`` streams, :func:`text_encoder` for ``"text"``). Options:

    - ``max_unacked_bytes``: the ack window (bytes of chunk JSON sent but not acknowledged, all
      streams together); ``send`` waits when it is full. Memory held is bounded by it.
    - ``reconnect``, ``backoff_initial_s``, ``backoff_max_s``: reconnect after a drop, waiting
      ``backoff_initial_s * 2**n`` (capped, with jitter) between attempts;
      ``reconnect_timeout_s``: give up (:class:`ConnectionFailed`) once an outage has lasted
      that long; an outage runs from the first failure until relayd acknowledges something.
    - ``close_timeout_s``: how long leaving the ``async with`` waits for tee tasks (then
      cancelled), and then for acks and ends.
    - ``max_message_bytes``: the largest websocket message written (relayd's
      ``limits.max_frame_bytes`` must be larger); a chunk that cannot fit one is refused by
      its ``send`` with :class:`ChunkTooLarge`.
    - ``heartbeat_s``: websocket ping interval, to notice a dead connection.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        encoder: Encoder | None = None,
        content_type: str = "json",
        max_unacked_bytes: int = 1 << 20,
        reconnect: bool = True,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        reconnect_timeout_s: float = 60.0,
        close_timeout_s: float = 10.0,
        max_message_bytes: int = 512 * 1024,
        heartbeat_s: float = 20.0,
    ) -> None:
        _check_content_type(content_type)
        if max_unacked_bytes <= 0 or max_message_bytes <= 0:
            raise ValueError("max_unacked_bytes and max_message_bytes must be positive")
        Retry(backoff_initial_s, backoff_max_s, None, deadline_s=reconnect_timeout_s)  # ValueError if invalid
        self.url = url
        self._api_key = api_key
        self.encoder = encoder
        self.content_type = content_type
        self.options = Options(
            max_unacked_bytes=max_unacked_bytes,
            max_message_bytes=max_message_bytes,
            reconnect=reconnect,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            reconnect_timeout_s=reconnect_timeout_s,
            heartbeat_s=heartbeat_s,
            close_timeout_s=close_timeout_s,
        )
        self._conn: Connection | None = None
        self._tees: set[asyncio.Task[Any]] = set()
        self._cleanups: set[asyncio.Task[Any]] = set()

    @property
    def unacked_bytes(self) -> int:
        """Bytes of chunk JSON sent (or queued) and not yet acknowledged; <= max_unacked_bytes."""
        return self._conn.unacked_bytes if self._conn is not None else 0

    @property
    def connection(self) -> Connection:
        if self._conn is None:
            raise ProducerClosed("the Producer is not connected: use `async with Producer(...)`")
        return self._conn

    async def connect(self) -> None:
        """Open the websocket (``async with`` does this). Raises :class:`Unauthorized` for a bad
        key and :class:`ConnectionFailed` if relayd cannot be reached within the reconnect limit."""
        if self._conn is None:
            conn = Connection(self.url, self._api_key, self.options)
            await conn.start()
            self._conn = conn

    async def close(self, *, cancel_tees: bool = False) -> None:
        """Wait for tee tasks (or cancel them), then for acks and ends, then close.

        Tee tasks still reading their upstream after ``close_timeout_s`` are cancelled: their
        streams end ``cancelled`` (as when the task running :meth:`stream` is cancelled). The
        acks and ends then get ``close_timeout_s`` more, so a close takes at most twice that.

        Raises :class:`AckTimeout` if chunks are still unacknowledged after ``close_timeout_s``,
        or the connection's failure (:class:`ConnectionFailed`, :class:`Unauthorized`) if it gave
        up. ``async with`` does not raise these over an exception of its body.
        """
        conn = self._conn
        if conn is None:
            return
        try:
            await self._finish_tees(cancel=cancel_tees)
            settled = await conn.settle(self.options.close_timeout_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.close_timeout_s):
                    await asyncio.gather(*self._cleanups, return_exceptions=True)
            failure = conn.failure
            unacked = sum(len(s.unacked) for s in conn.streams.values())
        finally:
            await conn.close()
            self._conn = None
        if failure is not None:
            raise again(failure)
        if not settled:
            raise AckTimeout(f"{unacked} chunks not acknowledged within {self.options.close_timeout_s}s", unacked)

    async def _finish_tees(self, *, cancel: bool) -> None:
        """Let the tee tasks finish within ``close_timeout_s`` (none if ``cancel``), then cancel them."""
        tees = set(self._tees)
        if not tees:
            return
        _, pending = await asyncio.wait(tees, timeout=0 if cancel else self.options.close_timeout_s)
        if pending and not cancel:
            log.warning(
                "relayd producer closing: %d tee tasks still running after %ss; cancelling them",
                len(pending),
                self.options.close_timeout_s,
            )
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def flush(self) -> None:
        """Wait until every chunk sent so far, on every stream, is acknowledged."""
        conn = self.connection
        await conn.settle(float("inf"))
        conn.check()

    async def __aenter__(self) -> Producer:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.close(cancel_tees=exc is not None)
        except ClientError:
            if exc is None:
                raise
            log.warning("relayd producer closed with work left after an error", exc_info=True)

    def writer(
        self,
        stream_id: str,
        *,
        encoder: Encoder | None = None,
        content_type: str | None = None,
        on_cancel: OnCancel | None = None,
    ) -> Writer:
        """Open ``stream_id`` (taking it over if it exists and is open) and return its writer.

        The open is queued and written with the first chunks, without waiting for relayd.
        """
        try:
            check_stream_id(stream_id)
        except ProtocolError as exc:
            raise ValueError(f"invalid stream id {stream_id!r}: {exc.message}") from None
        ctype = self.content_type if content_type is None else content_type
        _check_content_type(ctype)
        chosen = encoder or (self.encoder if content_type is None else None) or default_encoder(ctype)
        writer = Writer(self.connection, stream_id, chosen, ctype)
        if on_cancel is not None:
            writer.on_cancel(on_cancel)
        return writer

    async def stream(
        self,
        stream_id: str,
        source: AsyncIterable[Any] | Iterable[Any],
        *,
        on_cancel: OnCancel | None = None,
        encoder: Encoder | None = None,
        content_type: str | None = None,
        raise_on_error: bool = True,
    ) -> StreamResult:
        """Append every item of ``source`` to ``stream_id``, then end the stream.

        - ``source`` ends: the stream ends ``completed``.
        - ``source`` raises: the stream ends ``error`` with ``str(exc)`` as its message, then the
          exception is re-raised (the stream is already ended when you see it), or, with
          ``raise_on_error=False``, returned in ``StreamResult.error`` with reason ``error``.
        - a consumer cancels: iteration stops at once (a pending ``__anext__`` is cancelled),
          ``source`` is closed (``aclose()``, or ``close()``, awaited if it returns an
          awaitable: async generators, OpenAI ``AsyncStream``), the stream ends ``cancelled``
          and the result says so; ``on_cancel`` is called first.
        - relayd ends the stream (an operator's ``relayd streams end``): the same as a cancel,
          but the result carries the operator's reason and ``ended_by_server``
          (:class:`StreamEndedByServer`, with the operator's message); nothing is raised.
        - relayd refuses the stream (fenced, already ended) or the connection gives up: the
          source is closed and that :class:`ClientError` is raised.

        A sync iterable is iterated on the event loop, so it must not block: use
        :class:`SyncProducer` for a blocking iterator (a sync SDK stream).
        """
        writer = self.writer(stream_id, encoder=encoder, content_type=content_type, on_cancel=on_cancel)
        return await self.pipe(writer, source, raise_on_error=raise_on_error)

    async def pipe(
        self,
        writer: Writer,
        source: AsyncIterable[Any] | Iterable[Any],
        *,
        tap: Callable[[Any], Awaitable[None]] | None = None,
        raise_on_error: bool = True,
    ) -> StreamResult:
        """:meth:`stream` on an existing writer; ``tap(item)`` sees each item before it is sent."""
        iterator = aiter_of(source)
        pump = asyncio.create_task(pump_into(writer, iterator, tap), name=f"relayd-stream-{writer.stream}")
        cancel = asyncio.create_task(writer.cancelled.wait())
        try:
            await asyncio.wait((pump, cancel), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pump.cancel()
            writer.end_nowait("cancelled", "the producer task was cancelled")
            self._cleanup(close_after(pump, source, iterator))
            raise
        finally:
            cancel.cancel()
        if not pump.done() or writer.ended_by_server is not None:  # a consumer's cancel, or relayd ended it
            pump.cancel()
            await asyncio.wait((pump,))
            if not pump.cancelled():
                pump.exception()  # retrieved: a send refused by the end that raced the cancel
            await close_upstream(source, iterator)
            return await writer.end("cancelled")
        error = pump.exception() if not pump.cancelled() else RuntimeError("the upstream was cancelled")
        if error is None:
            return await writer.end("completed")
        await close_upstream(source, iterator)
        failure = writer.failure
        if isinstance(error, ClientError) and (failure is error or failure is error.__cause__):
            if writer.can_end:
                with contextlib.suppress(ClientError):
                    await writer.end("error", str(error))
            raise error
        result = await writer.end("error", str(error) or type(error).__name__)
        if raise_on_error:
            raise error
        return StreamResult(result.stream, result.reason, result.cursor, result.chunks, error)

    def tee(
        self,
        stream_id: str,
        upstream: AsyncIterable[Any] | Iterable[Any],
        *,
        encoder: Encoder | None = None,
        content_type: str | None = None,
        on_cancel: OnCancel | None = None,
        buffer: int = 256,
    ) -> Tee:
        """Pipe ``upstream`` into ``stream_id`` in a background task and yield its items too.

        For an HTTP handler that streams the answer to its own client while relayd keeps a
        durable copy: if the handler stops iterating or is cancelled (the client went away),
        the background task still reads ``upstream`` to its end and ends the stream
        ``completed`` (``error`` if it raises). A consumer's cancel stops it as in
        :meth:`stream`. The Producer's exit waits for the task, at most ``close_timeout_s``, then
        cancels it (the stream ends ``cancelled``; the HTTP side gets :class:`ProducerClosed`).
        ``buffer`` bounds the items held for a slow HTTP side; while it is full, reading
        ``upstream`` waits for the HTTP side (which stops waiting once the iterator is closed or
        garbage-collected).
        """
        from relayd.client.tee import Tee

        writer = self.writer(stream_id, encoder=encoder, content_type=content_type, on_cancel=on_cancel)
        tee = Tee(self, writer, upstream, buffer)
        return tee

    def _spawn_tee(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tees.add(task)
        task.add_done_callback(self._tees.discard)
        return task

    def _cleanup(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)


def _check_content_type(content_type: str) -> None:
    if content_type not in CONTENT_TYPES:
        raise ValueError(f"content_type must be 'json' or 'text', got {content_type!r}")
