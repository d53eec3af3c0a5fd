"""Per-stream producer state: what is unacknowledged, what to write next, how the stream ended.

A :class:`StreamState` is a small state machine driven by its :class:`~relayd.client.session.Connection`
(frames from relayd, reconnects) and its writer (chunks, the end). It never does I/O itself:
:meth:`StreamState.ops` says what to write; the connection writes it.

Sequence numbers are the protocol's: contiguous from 1 in an epoch. ``acked`` is the last one
relayd confirmed (an ``ack``, or the ``seq`` of an ``opened`` after a re-open); ``sent`` the
last one written on the current connection; the chunks in ``unacked`` are kept until their
ack, which is what makes a resend after a reconnect possible.

Every open carries ``producer``, an id drawn at random for this stream state and kept across
reconnects. A re-open that has no epoch yet (the connection dropped before the first
``opened``) is then recognised by relayd as the same producer and resumes the epoch the lost
open started, instead of taking the stream over and storing the first round trip's chunks twice.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from relayd.client.errors import (
    ChunkTooLarge,
    ClientError,
    StreamAlreadyEnded,
    StreamEndedByServer,
    refused_from_frame,
)
from relayd.protocol import APPEND_OP_OVERHEAD, MAX_END_MESSAGE, append_op, append_op_head, end_op, open_op

if TYPE_CHECKING:
    from relayd.client.session import Connection

__all__ = ["Ended", "StreamState"]

log = logging.getLogger("relayd.client")

_TERMINAL_CODES = frozenset({"fenced", "stream_ended"})
_RESYNC_CODES = frozenset({"store_unavailable", "seq_gap", "not_open"})


@dataclass(frozen=True, slots=True)
class Ended:
    """How a stream ended, as relayd confirmed it."""

    reason: str
    cursor: str | None


class StreamState:
    """One stream of a connection. Changed only on the event loop, by the connection and its writer."""

    def __init__(self, conn: Connection, stream: str, content_type: str) -> None:
        self.conn = conn
        self.stream = stream
        self.stream_json = orjson.dumps(stream)
        self.append_head = append_op_head(self.stream_json)
        # The bytes an append frame adds around its chunks: head, seq (<= 20 digits), brackets.
        self.append_overhead = len(self.append_head) + APPEND_OP_OVERHEAD
        self.content_type = content_type
        self.producer = secrets.token_hex(16)  # this writer's id, the same in every open
        self.epoch: int | None = None
        self.next_seq = 1
        self.unacked: deque[tuple[int, bytes]] = deque()  # (seq, chunk JSON), seq-contiguous
        self.acked = 0  # last seq relayd acknowledged (or reported stored) in this epoch
        self.sent = 0  # last seq written on the current connection
        self.cursor: str | None = None
        self.open_pending = True  # an open must be written
        self.open_inflight = False  # an open was written; its answer has not arrived
        self.resuming = False  # appends wait for ``opened`` (a re-open)
        self.end_request: tuple[str, str] | None = None
        self.end_sent = False
        self.ended: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self.ended.add_done_callback(_consume_exception)
        self.failure: ClientError | None = None  # raised by send(); the stream takes no more chunks
        self.ended_by_server: StreamEndedByServer | None = None  # relayd ended it unasked
        self.terminal = False  # nothing at all can be written any more (fenced, ended, gave up)
        self.cancelled = asyncio.Event()
        self.cancel_callbacks: list[Callable[[], Any]] = []
        self.idle = asyncio.Event()  # set while no chunk awaits its ack
        self.idle.set()

    @property
    def done(self) -> bool:
        return self.ended.done()

    def enqueue(self, data: bytes) -> None:
        self.unacked.append((self.next_seq, data))
        self.next_seq += 1
        self.idle.clear()
        self.conn.mark_dirty(self)

    def request_end(self, reason: str, message: str) -> None:
        if self.end_request is None and not self.done:
            self.end_request = (reason, message[:MAX_END_MESSAGE])
            self.conn.mark_dirty(self)

    # -- answers from relayd ---------------------------------------------------------------------

    def on_opened(self, frame: dict[str, Any]) -> None:
        self.open_inflight = False
        status = frame.get("status")
        if status != "open":
            if self.end_request is not None and status == self.end_request[0]:
                self.finish(Ended(status, frame.get("cursor")))  # our end was stored; its answer lost
            else:
                self.fail(StreamAlreadyEnded(f"the stream already ended ({status})", stream=self.stream), terminal=True)
            return
        epoch, seq = int(frame["epoch"]), int(frame["seq"])
        if self.resuming and self.epoch is not None and epoch == self.epoch and seq < self.acked:
            self.fail(
                ClientError(
                    f"stream {self.stream}: relayd lost acknowledged chunks (stored {seq}, acked {self.acked})"
                ),
                terminal=True,
            )
            return
        self.epoch = epoch
        if self.resuming:
            self.resuming = False
            self.ack(seq, frame.get("cursor"))
            self.sent = max(seq, self.acked)
        self.conn.mark_dirty(self)

    def ack(self, seq: int, cursor: Any) -> None:
        if seq <= self.acked:
            return
        self.acked = seq
        if isinstance(cursor, str):
            self.cursor = cursor
        freed = 0
        unacked = self.unacked
        while unacked and unacked[0][0] <= seq:
            freed += len(unacked.popleft()[1])
        self.conn.release(freed)
        if not unacked:
            self.idle.set()
            if self.end_request is not None:
                self.conn.mark_dirty(self)

    def on_ended(self, frame: dict[str, Any]) -> None:
        reason, cursor = str(frame.get("reason")), frame.get("cursor")
        if self.end_request is None and not self.done:
            # Not the answer to our end: an operator ended the stream. Tell the writer as a
            # cancel is told (its event, on_cancel), and make later sends say what happened.
            message = frame.get("message")
            ended = StreamEndedByServer(reason, message if isinstance(message, str) else "", cursor, self.stream)
            log.warning("relayd stream %s: %s", self.stream, ended)
            self.ended_by_server = ended
            self.failure = self.failure or ended
            self.on_cancel()
        self.finish(Ended(reason, cursor))

    def on_cancel(self) -> None:
        if self.cancelled.is_set() or self.done:
            return
        self.cancelled.set()
        for callback in self.cancel_callbacks:
            self.conn.run_callback(callback)

    def on_error(self, frame: dict[str, Any]) -> None:
        code = frame.get("code")
        seq = frame.get("seq")
        if code == "stream_ended" and seq is not None and self.epoch is not None:
            # An append refused because someone else ended the stream (an operator, the cancel
            # grace, the sweep). relayd may send its unsolicited ``ended`` after this refusal, or
            # never (the end was made on another instance): re-open rather than fail now. The
            # ``opened`` comes after any such ``ended``, which settles the stream as ended by
            # relayd; if none came, ``opened`` reports the end and the stream fails as before.
            if not self.open_inflight and not self.open_pending:
                self.resync()
        elif code in _TERMINAL_CODES:
            self.fail(refused_from_frame(frame), terminal=True)
        elif code in _RESYNC_CODES:
            if seq is None and self.end_sent and code == "store_unavailable":
                self.end_sent = False  # the end was not stored: write it again, a little later
                self.conn.mark_dirty_later(self)
            elif seq is None and self.open_inflight:
                self.open_inflight = False  # the open failed: open again, a little later
                self.open_pending = True
                self.resuming = True
                self.conn.mark_dirty_later(self)
            elif self.failure is None and not self.open_inflight and not self.open_pending:
                self.resync()
            # else: a refusal of an op written before the resync; the re-open settles it
        elif self.failure is None:
            self.fail(refused_from_frame(frame), terminal=code == "too_many_streams")

    # -- transitions -----------------------------------------------------------------------------

    def resync(self) -> None:
        """Re-open with our epoch; resend from what relayd reports as stored."""
        self.open_pending = True
        self.resuming = True
        self.end_sent = False
        self.conn.mark_dirty(self)

    def disconnected(self) -> None:
        self.open_pending = True
        self.open_inflight = False
        self.resuming = True
        self.end_sent = False
        self.sent = self.acked

    def drop_unacked(self) -> None:
        freed = sum(len(data) for _, data in self.unacked)
        self.unacked.clear()
        self.conn.release(freed)
        self.idle.set()

    def drop_oversized(self, limit: int) -> None:
        """Fail the stream if an unacknowledged chunk cannot fit a message of ``limit`` bytes."""
        if self.terminal or self.failure is not None:
            return
        size = max((len(data) for _, data in self.unacked), default=0)
        if size and size + self.append_overhead > limit:
            self.fail(
                ChunkTooLarge(
                    f"stream {self.stream}: a chunk of {size} bytes does not fit the {limit}-byte messages"
                    " relayd accepts (it closed the connection 1009)",
                    size,
                    limit,
                ),
                terminal=False,
            )

    def fail(self, error: ClientError, *, terminal: bool) -> None:
        """The stream takes no more chunks; if ``terminal``, not even an end."""
        if self.done:
            return
        if self.failure is None:
            self.failure = error
            log.warning("relayd stream %s: %s", self.stream, error)
        self.drop_unacked()
        if terminal:
            self.terminal = True
            self.ended.set_exception(error)
            self.conn.forget(self)
        elif self.end_request is not None:
            self.conn.mark_dirty(self)

    def finish(self, ended: Ended) -> None:
        if not self.done:
            self.ended.set_result(ended)
        self.terminal = True
        self.drop_unacked()
        self.conn.forget(self)

    # -- what to write ---------------------------------------------------------------------------

    def ops(self, limit: int) -> list[bytes]:
        """The frames to write now for this stream: open, then appends, then end, as due."""
        out: list[bytes] = []
        if self.terminal:
            return out
        if self.open_pending:
            self.open_pending = False
            self.open_inflight = True
            # Without an epoch (none received yet), the producer id makes the open idempotent: a
            # repeat after a lost ``opened`` resumes the epoch the first one started.
            out.append(
                open_op(self.stream_json, content_type=self.content_type, epoch=self.epoch, producer=self.producer)
            )
        if self.resuming:
            return out
        if self.failure is None and self.unacked and self.unacked[-1][0] > self.sent:
            out.extend(self._appends(limit))
        if self.end_request is not None and not self.end_sent and not self.unacked and not self.open_inflight:
            reason, message = self.end_request
            out.append(end_op(self.stream, reason, message))
            self.end_sent = True
        return out

    def _appends(self, limit: int) -> list[bytes]:
        """``append`` frames for the chunks after ``sent``, each frame at most ``limit`` bytes."""
        start = self.sent + 1 - self.unacked[0][0]
        frames: list[bytes] = []
        head = self.append_head
        batch: list[bytes] = []
        first = size = 0
        for i in range(start, len(self.unacked)):
            seq, data = self.unacked[i]
            if batch and size + len(data) + 1 > limit:
                frames.append(append_op(head, first, batch))
                batch = []
            if not batch:
                first, size = seq, self.append_overhead
            batch.append(data)
            size += len(data) + 1
        if batch:
            frames.append(append_op(head, first, batch))
        self.sent = self.unacked[-1][0]
        return frames


def _consume_exception(future: asyncio.Future[Ended]) -> None:
    # A stream nobody awaits (its writer went away) must not log "exception never retrieved".
    if not future.cancelled():
        future.exception()
