"""``SyncProducer``: the Producer for code without an event loop (Celery/RQ tasks, threads).

It runs one asyncio event loop in a daemon thread and forwards every call to a
:class:`~relayd.client.Producer` living there, so batching, the ack window and reconnects work
exactly as in async code. Every method may be called from any thread (not from the loop thread
itself); calls block until the loop has done them.

Iterating a source (:meth:`SyncProducer.stream`) happens in the caller's thread, so a blocking
iterator (a sync OpenAI stream) blocks only its caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

from relayd.client.encoding import Encoder
from relayd.client.errors import ClientError, ProducerClosed, StreamEndedByServer
from relayd.client.producer import Producer
from relayd.client.writer import EndReason, StreamResult, Writer

__all__ = ["SyncProducer", "SyncWriter"]

T = TypeVar("T")

# How long stopping the loop waits for the tasks it cancels (callbacks that ignore a cancel).
_DRAIN_TIMEOUT_S = 5.0


class SyncProducer:
    """``with SyncProducer(url, api_key, **options) as p:``; options as :class:`Producer`.

    Thread safety: ``_lock`` guards the loop, the Producer and ``_closing``, and every call is
    scheduled on the loop while holding it, so a call either runs before the loop stops (and
    gets its answer) or raises :class:`ProducerClosed`; it never waits on a stopped loop.
    ``_lifecycle`` serialises :meth:`start` and :meth:`close`: a second ``start`` returns only
    once the first has connected.
    """

    def __init__(self, url: str, api_key: str, **options: Any) -> None:
        self._args = (url, api_key)
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._producer: Producer | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._lifecycle = threading.Lock()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it; ProducerClosed once closing has begun."""
        return self._submit(coro, closing_ok=False)

    def _submit(self, coro: Coroutine[Any, Any, T], *, closing_ok: bool) -> T:
        with self._lock:
            loop = self._loop
            if loop is None or (self._closing and not closing_ok):
                coro.close()
                if self._closing:
                    raise ProducerClosed("the SyncProducer is closed")
                raise ProducerClosed("the SyncProducer is not started: use `with SyncProducer(...) as p`")
            if threading.current_thread() is self._thread:
                coro.close()
                raise RuntimeError("SyncProducer methods block; do not call them from its own loop thread")
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise ProducerClosed("the SyncProducer was closed while the call was running") from None

    def _schedule(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the loop without waiting; dropped once closing has begun."""
        with self._lock:
            if self._loop is not None and not self._closing:
                self._loop.call_soon_threadsafe(callback)

    @property
    def producer(self) -> Producer:
        producer = self._producer
        if producer is None:
            raise ProducerClosed("the SyncProducer is not started: use `with SyncProducer(...) as p`")
        return producer

    @property
    def unacked_bytes(self) -> int:
        producer = self._producer
        return producer.unacked_bytes if producer is not None else 0

    def start(self) -> None:
        """Start the loop thread and connect (``with`` does this)."""
        with self._lifecycle:
            with self._lock:
                if self._loop is not None:
                    return
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="relayd-sync-producer", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread

            async def connect() -> Producer:
                producer = Producer(*self._args, **self._options)
                await producer.connect()
                return producer

            try:
                producer = self._submit(connect(), closing_ok=False)
            except BaseException:
                self._stop_loop()
                raise
            with self._lock:
                self._producer = producer

    def close(self, *, error: bool = False) -> None:
        """Flush, close the connection and stop the loop thread (``with`` does this).

        Calls from other threads made after this began raise :class:`ProducerClosed`; calls
        still running when the loop stops are cancelled and raise it too.
        """
        with self._lifecycle:
            with self._lock:
                if self._loop is None:
                    return
                self._closing = True
                producer, self._producer = self._producer, None
            try:
                if producer is not None:
                    self._submit(producer.close(cancel_tees=error), closing_ok=True)
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        """Cancel what still runs on the loop (on_cancel callbacks, stray calls), then stop it."""
        with self._lock:
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_remaining(), loop).result(timeout=_DRAIN_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        with self._lock:
            self._loop = self._thread = None
            self._closing = False
        loop.close()

    def __enter__(self) -> SyncProducer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            with contextlib.suppress(ClientError):
                self.close(error=True)

    def flush(self) -> None:
        """Block until every chunk sent so far is acknowledged."""
        self._call(self.producer.flush())

    def writer(
        self,
        stream_id: str,
        *,
        encoder: Encoder | None = None,
        content_type: str | None = None,
        on_cancel: Callable[[], Any] | None = None,
    ) -> SyncWriter:
        """Open ``stream_id``; as :meth:`Producer.writer`. ``on_cancel`` runs in the loop thread."""
        producer = self.producer

        cancelled = threading.Event()

        async def make() -> Writer:
            writer = producer.writer(stream_id, encoder=encoder, content_type=content_type)
            # Set the event before on_cancel runs, so code woken by on_cancel sees it set.
            writer.on_cancel(cancelled.set)
            if on_cancel is not None:
                writer.on_cancel(on_cancel)
            return writer

        return SyncWriter(self, self._call(make()), cancelled)

    def stream(
        self,
        stream_id: str,
        source: Iterable[Any],
        *,
        on_cancel: Callable[[], Any] | None = None,
        encoder: Encoder | None = None,
        content_type: str | None = None,
        raise_on_error: bool = True,
    ) -> StreamResult:
        """As :meth:`Producer.stream`, iterating ``source`` in the calling thread.

        A cancel request is noticed between two items (a blocking ``next()`` cannot be
        interrupted); ``source`` is then closed (``close()``) and the stream ends ``cancelled``.
        """
        w = self.writer(stream_id, encoder=encoder, content_type=content_type, on_cancel=on_cancel)
        iterator = iter(source)
        try:
            for item in iterator:
                if w.cancelled.is_set():
                    break
                w.send(item)
        except StreamEndedByServer:
            _close(iterator, source)  # relayd ended the stream: stop as for a cancel
            return w.end("cancelled")
        except ClientError as exc:
            _close(iterator, source)
            failure = w._writer.failure
            if failure is not None and (exc is failure or exc.__cause__ is failure) and w._writer.can_end:
                with contextlib.suppress(ClientError):
                    w.end("error", str(exc))
            raise
        except Exception as exc:
            _close(iterator, source)
            result = w.end("error", str(exc) or type(exc).__name__)
            if raise_on_error:
                raise
            return StreamResult(result.stream, result.reason, result.cursor, result.chunks, exc)
        except BaseException as exc:
            _close(iterator, source)
            w._call_nowait_end(f"producer stopped: {type(exc).__name__}")
            raise
        if w.cancelled.is_set():
            _close(iterator, source)
            return w.end("cancelled")
        return w.end("completed")


class SyncWriter:
    """A :class:`Writer` driven from another thread; ``with p.writer(id) as w:``."""

    def __init__(self, owner: SyncProducer, writer: Writer, cancelled: threading.Event) -> None:
        self._owner = owner
        self._writer = writer
        self.stream = writer.stream
        self.cancelled = cancelled  # set when a consumer asked to cancel, or relayd ended the stream

    @property
    def cursor(self) -> str | None:
        return self._writer.cursor

    @property
    def chunks(self) -> int:
        return self._writer.chunks

    def send(self, item: Any) -> bool:
        """As :meth:`Writer.send`: blocks while the ack window is full."""
        return self._owner._call(self._writer.send(item))

    def flush(self) -> None:
        self._owner._call(self._writer.flush())

    def end(self, reason: EndReason = "completed", message: str | None = None) -> StreamResult:
        return self._owner._call(self._writer.end(reason, message))

    def _call_nowait_end(self, message: str) -> None:
        writer = self._writer
        self._owner._schedule(lambda: writer.end_nowait("cancelled", message))

    def __enter__(self) -> SyncWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            self._call_nowait_end(f"producer stopped: {type(exc).__name__}")
            return
        self._owner._call(self._writer.__aexit__(exc_type, exc, tb))


async def _cancel_remaining() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _close(iterator: object, source: object) -> None:
    for obj in (iterator, source) if iterator is not source else (iterator,):
        closer = getattr(obj, "close", None)
        if callable(closer):
            with contextlib.suppress(Exception):
                closer()
