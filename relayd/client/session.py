"""The producer connection: one websocket to ``/v1/ingest`` carrying every stream of a Producer.

What this module owns (docs/protocol.md, "Producer websocket"); the per-stream side (epoch,
unacknowledged chunks, what to write next) is :class:`~relayd.client.stream_state.StreamState`:

- **Batching**: ops are not written when queued; the sender task wakes once per event-loop
  tick and writes everything queued meanwhile as one NDJSON message, one ``append`` (with
  ``chunks``) per stream. Several messages only when one would exceed ``max_message_bytes``.
- **The ack window**: the bytes of unacknowledged chunks, for all streams together, never
  exceed ``max_unacked_bytes`` (one oversized chunk at a time excepted); :meth:`reserve` waits.
  The chunks are kept until acknowledged, so they can be resent: this bounds memory too.
- **Reconnecting**: when the websocket drops, every live stream is re-opened with the epoch it
  holds (or, before its first ``opened``, with no epoch and the same producer id, which relayd
  resumes rather than takes over); its appends wait for ``opened``, whose ``seq`` says what
  relayd stored; everything after it is resent. ``store_unavailable``/``seq_gap``/``not_open``
  refusals resynchronise a stream the same way on the open connection. Nothing is lost,
  nothing stored twice. Reconnects back off (:class:`~relayd.client.retry.Retry`), and
  ``reconnect_timeout_s`` bounds an outage, which only progress (an ``ack``, an ``ended``)
  ends: a connection relayd drops right after every resend is one outage, not many.

The first open of a stream is pipelined: its appends follow the open without waiting for
``opened`` (relayd holds them until the open is answered). A re-open is not: its appends wait,
because where to resume from is only known from ``opened``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from relayd.client.errors import ClientError, ConnectionFailed, ProducerClosed, Unauthorized, again
from relayd.client.retry import Retry
from relayd.client.stream_state import StreamState
from relayd.client.urls import ws_base
from relayd.protocol import split_message

log = logging.getLogger("relayd.client")

_MESSAGE_TOO_BIG = 1009  # websocket close code: a message exceeded relayd's limits.max_frame_bytes
_MIN_MESSAGE_BYTES = 4096  # how far a 1009 may lower the message size


@dataclass(frozen=True, slots=True)
class Options:
    """Connection settings of a Producer (see :class:`relayd.client.Producer`)."""

    max_unacked_bytes: int = 1 << 20
    max_message_bytes: int = 512 * 1024
    reconnect: bool = True
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    reconnect_timeout_s: float = 60.0
    heartbeat_s: float = 20.0
    close_timeout_s: float = 10.0


def ingest_url(base_url: str) -> str:
    """``http(s)://host:port[/prefix]`` (or ``ws(s)://``) -> the producer websocket URL."""
    return ws_base(base_url) + "/v1/ingest"


class Connection:
    """One producer websocket with reconnects; see the module docstring."""

    def __init__(self, base_url: str, api_key: str, options: Options) -> None:
        self.url = ingest_url(base_url)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self.options = options
        self.streams: dict[str, StreamState] = {}
        self.unacked_bytes = 0
        self.failure: ClientError | None = None
        self.closed = False
        self.messages_sent = 0  # websocket messages written, over all connections
        self.message_limit = options.max_message_bytes  # lowered if relayd closes 1009
        self._dirty: dict[StreamState, None] = {}
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._settled = asyncio.Event()  # set while nothing awaits an ack or an ``ended``
        self._settled.set()
        self._connected = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._runner: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[Any]] = set()
        # One run of failures = one outage; bounded by time, reset only by progress.
        self._retry = Retry(
            options.backoff_initial_s, options.backoff_max_s, None, deadline_s=options.reconnect_timeout_s
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying within ``reconnect_timeout_s`` if reconnecting is on)."""
        # No total timeout (aiohttp's default is 300 s for the whole request), a bounded connect:
        # an unreachable host becomes a retry, not a five-minute hang.
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10.0))
        try:
            ws = await self._connect()
        except BaseException:
            await self._http.close()
            raise
        self._runner = asyncio.create_task(self._run(ws), name="relayd-producer-connection")

    async def settle(self, timeout: float) -> bool:
        """Wait until every chunk is acknowledged and every requested end answered."""
        try:
            async with asyncio.timeout(timeout):
                while not self._is_settled():
                    self._settled.clear()
                    await self._settled.wait()
        except TimeoutError:
            return False
        return True

    def _is_settled(self) -> bool:
        if self.failure is not None:
            return True
        return self.unacked_bytes == 0 and not any(s.end_request is not None for s in self.streams.values())

    async def close(self) -> None:
        self.closed = True
        unfinished = [s.stream for s in self.streams.values() if s.end_request is None]
        if unfinished and self.failure is None:
            log.warning(
                "relayd producer closed with %d streams not ended (%s); relayd ends them producer_lost",
                len(unfinished),
                ", ".join(unfinished[:5]),
            )
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.wait((self._runner,))
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        for task in list(self._callbacks):
            task.cancel()
        if self._http is not None:
            await self._http.close()
        self._fail_all(ProducerClosed("the Producer is closed"))

    # -- used by writers -------------------------------------------------------------------------

    def add_stream(self, stream: str, content_type: str) -> StreamState:
        self.check()
        if stream in self.streams:
            raise ValueError(f"stream {stream} is already being written by this Producer")
        state = StreamState(self, stream, content_type)
        self.streams[stream] = state
        self.mark_dirty(state)
        return state

    def check(self) -> None:
        if self.failure is not None:
            raise again(self.failure)
        if self.closed:
            raise ProducerClosed("the Producer is closed")

    async def reserve(self, nbytes: int) -> None:
        """Wait for ``nbytes`` of room in the ack window, then take it."""
        limit = self.options.max_unacked_bytes
        while self.unacked_bytes and self.unacked_bytes + nbytes > limit:
            self.check()
            self._room.clear()
            await self._room.wait()
        self.check()
        self.unacked_bytes += nbytes

    def release(self, nbytes: int) -> None:
        if not nbytes:
            return
        self.unacked_bytes -= nbytes
        self._room.set()
        if self.unacked_bytes == 0:
            self._settled.set()

    def mark_dirty(self, state: StreamState) -> None:
        self._dirty[state] = None
        self._wake.set()

    def mark_dirty_later(self, state: StreamState) -> None:
        asyncio.get_running_loop().call_later(self.options.backoff_initial_s, self.mark_dirty, state)

    def forget(self, state: StreamState) -> None:
        if self.streams.get(state.stream) is state:
            del self.streams[state.stream]
        self._dirty.pop(state, None)
        self._settled.set()

    def run_callback(self, callback: Callable[[], Any]) -> None:
        try:
            result = callback()
        except Exception:
            log.exception("relayd on_cancel callback failed")
            return
        if asyncio.iscoroutine(result):
            task = asyncio.ensure_future(result)
            self._callbacks.add(task)
            task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._callbacks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("relayd on_cancel callback failed", exc_info=task.exception())

    # -- the connection --------------------------------------------------------------------------

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """Connect, with backoff, until the outage has lasted ``reconnect_timeout_s``."""
        assert self._http is not None
        opts = self.options
        while True:
            await self._retry.wait(f"connecting to {self.url}")  # raises once the outage is too long
            attempt = self._retry.failures + 1
            try:
                return await self._http.ws_connect(
                    self.url, headers=self._headers, heartbeat=opts.heartbeat_s, autoping=True
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    raise Unauthorized("relayd refused the API key", code="unauthorized") from exc
                if exc.status < 500 and exc.status != 429:
                    raise ConnectionFailed(f"relayd refused the connection: HTTP {exc.status}", attempt) from exc
                error: Exception = exc
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                error = exc
            if not opts.reconnect:
                raise ConnectionFailed(f"cannot connect to {self.url}: {error}", attempt) from error
            self._retry.failed(error)
            log.info("relayd producer: connect attempt %d failed (%s)", attempt, error)

    async def _run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        opts = self.options
        try:
            while True:
                connected_at = time.monotonic()
                self._ws = ws
                reader = asyncio.create_task(self._read(ws), name="relayd-producer-reader")
                sender = asyncio.create_task(self._send(ws), name="relayd-producer-sender")
                try:
                    await asyncio.wait((reader, sender), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    reader.cancel()
                    sender.cancel()
                    await asyncio.wait((reader, sender))
                    with contextlib.suppress(Exception):
                        await ws.close()
                    self._ws = None
                if self.closed:
                    return
                code = ws.close_code
                if not opts.reconnect:
                    raise ConnectionFailed(f"connection to {self.url} lost (code {code}); reconnect is off")
                if code == _MESSAGE_TOO_BIG:
                    self._shrink_messages()
                log.info("relayd producer connection lost (code %s); reconnecting", code)
                # The outage is ended by progress (an ack or an ``ended``, see _dispatch), not by a
                # handshake: a connection relayd drops right after each resend is one outage, which
                # gives up after reconnect_timeout_s. Only a drop of a connection that had nothing
                # to deliver and lived a while starts a new one.
                if not self._outstanding() and time.monotonic() - connected_at >= max(opts.backoff_max_s, 1.0):
                    self._retry.succeeded()
                self._retry.failed(ConnectionFailed(f"connection to {self.url} lost (code {code})"))
                for state in self.streams.values():
                    state.disconnected()
                ws = await self._connect()
                for state in self.streams.values():
                    self._dirty[state] = None
                self._wake.set()
        except ClientError as exc:
            self._fail_all(exc)

    def _shrink_messages(self) -> None:
        """relayd closed 1009: a message exceeded its ``limits.max_frame_bytes``, which is below
        ``max_message_bytes``. Halve the message size until messages fit; a stream holding a
        chunk that no longer fits one fails with :class:`ChunkTooLarge` (as its ``send`` would
        have), so the resend cannot be refused the same way again."""
        self.message_limit = max(self.message_limit // 2, _MIN_MESSAGE_BYTES)
        log.error(
            "relayd closed the producer connection 1009 (a message over its limits.max_frame_bytes): writing"
            " messages of at most %d bytes from now on; set the Producer's max_message_bytes below that limit",
            self.message_limit,
        )
        for state in list(self.streams.values()):
            state.drop_oversized(self.message_limit)

    def _outstanding(self) -> bool:
        """Whether anything written awaits relayd's answer: a chunk's ack, an end."""
        return self.unacked_bytes > 0 or any(s.end_request is not None for s in self.streams.values())

    def _fail_all(self, error: ClientError) -> None:
        if self.failure is None and not isinstance(error, ProducerClosed):
            self.failure = error
            log.error("relayd producer gave up: %s", error)
        for state in list(self.streams.values()):
            state.fail(error, terminal=True)
        self._room.set()
        self._settled.set()

    async def _send(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        limit = self.message_limit
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, {}
            message: list[bytes] = []
            size = 0
            for state in dirty:
                for op in state.ops(limit):
                    if message and size + len(op) + 1 > limit:
                        await self._write(ws, message)
                        message, size = [], 0
                    message.append(op)
                    size += len(op) + 1
            if message:
                await self._write(ws, message)

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, frames: list[bytes]) -> None:
        self.messages_sent += 1
        await ws.send_frame(b"\n".join(frames), aiohttp.WSMsgType.TEXT)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            for line in split_message(msg.data):
                self._dispatch(orjson.loads(line))

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        state = self.streams.get(frame.get("stream") or "")
        if state is None:
            if kind == "error":
                log.warning("relayd refused a producer op: %s", frame)
            return
        if kind == "ack":
            self._retry.succeeded()  # progress: the outage, if any, is over
            state.ack(int(frame["seq"]), frame.get("cursor"))
        elif kind == "opened":
            state.on_opened(frame)
        elif kind == "ended":
            self._retry.succeeded()
            state.on_ended(frame)
        elif kind == "cancel":
            state.on_cancel()
        elif kind == "error":
            state.on_error(frame)


__all__ = ["Connection", "Options", "ingest_url"]
