"""Exceptions of the relayd client SDK, under one root: :class:`ClientError`.

    ClientError                    anything the SDK raises on purpose
    ├── ConnectionFailed           relayd could not be reached (or reconnecting gave up)
    ├── ProducerClosed             the Producer/writer is closed; nothing more can be sent
    ├── StreamEndedByServer        relayd ended a produced stream unasked (``relayd streams end``)
    ├── ChunkTooLarge              one chunk cannot fit a websocket message (also a ValueError)
    ├── AckTimeout                 acknowledgements did not arrive within the close timeout
    ├── Refused                    relayd refused a request; ``code`` is the wire error code
    │   ├── Unauthorized           API key or token refused (``unauthorized``, ``token_expired``)
    │   ├── Forbidden              the token does not allow this stream or right
    │   ├── StreamNotFound         the stream did not appear within ``wait_ms``
    │   ├── ProducerFenced         a newer producer took the stream over (``fenced``)
    │   └── StreamAlreadyEnded     the stream had already ended (``stream_ended``)
    ├── StreamFailed               a consumed stream ended other than ``completed``
    │   ├── StreamErrored          ... with ``error`` (the producer failed)
    │   ├── StreamCancelled        ... with ``cancelled``
    │   └── ProducerLost           ... with ``producer_lost`` (relayd gave up on the producer)
    ├── StreamGap                  history between ``cursor`` and ``next`` is gone (never silent)
    └── StreamReset                the cursor belongs to an earlier generation of the stream

The root derives from :class:`relayd.errors.RelaydError`, so ``except RelaydError`` catches
everything relayd's code raises on purpose, server or client. It is a different class from
``relayd.errors.ClientError`` (the server's "a client sent something wrong"), which the SDK
never raises: import this one as ``relayd.client.ClientError``.

A failure that stays in force (a stream's refusal, the connection giving up) is raised again
on every later call as a fresh copy (:func:`again`) chained to the original, so tracebacks do
not pile up on one shared exception object.
"""

from __future__ import annotations

from typing import Any, TypeVar

from relayd.errors import RelaydError

__all__ = [
    "AckTimeout",
    "ChunkTooLarge",
    "ClientError",
    "ConnectionFailed",
    "Forbidden",
    "ProducerClosed",
    "ProducerFenced",
    "ProducerLost",
    "Refused",
    "StreamAlreadyEnded",
    "StreamCancelled",
    "StreamEndedByServer",
    "StreamErrored",
    "StreamFailed",
    "StreamGap",
    "StreamNotFound",
    "StreamReset",
    "Unauthorized",
    "again",
    "refused_from_frame",
    "stream_failed",
]


class ClientError(RelaydError):
    """Root of every exception the relayd client SDK raises on purpose."""


class ConnectionFailed(ClientError):
    """relayd could not be reached: the connection failed and reconnecting is off or gave up.

    ``attempts`` is how many connection attempts were made in a row; the last underlying error
    is chained as ``__cause__``.
    """

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


class ProducerClosed(ClientError):
    """The Producer (or one of its writers) is closed; a send or open after that is a bug."""


class StreamEndedByServer(ClientError):
    """relayd ended a stream this producer was writing without being asked to: an operator's
    ``relayd streams end`` (or ``streams rm --force``). Stop generating.

    ``reason`` and ``message`` are what the operator gave, ``cursor`` the end's cursor.
    :meth:`Producer.stream` does not raise it: it stops iterating and returns a
    :class:`StreamResult` whose ``ended_by_server`` is this. A writer's ``send`` raises it.
    """

    def __init__(self, reason: str, message: str = "", cursor: str | None = None, stream: str | None = None) -> None:
        self.reason = reason
        self.message = message
        self.cursor = cursor
        self.stream = stream
        why = f": {message}" if message else ""
        super().__init__(f"relayd ended stream {stream} {reason}{why} (an operator's `relayd streams end`)")


class ChunkTooLarge(ClientError, ValueError):
    """One chunk, encoded and framed, exceeds the Producer's ``max_message_bytes``.

    Raised by the ``send`` that tried it; the chunk is not sent, and the stream and the
    connection go on as if it had never been offered.
    """

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class AckTimeout(ClientError):
    """Chunks were sent but not acknowledged within the close timeout: they may not be stored."""

    def __init__(self, message: str, unacked_chunks: int) -> None:
        super().__init__(message)
        self.unacked_chunks = unacked_chunks


E = TypeVar("E", bound=BaseException)


def again(error: E) -> E:
    """A fresh copy of a stored ``error`` (same class, message and attributes), caused by it."""
    copy = type(error).__new__(type(error))
    copy.args = error.args
    copy.__dict__.update(error.__dict__)
    copy.__cause__ = error
    copy.__suppress_context__ = True
    return copy


class Refused(ClientError):
    """relayd refused a request with an error frame or close code; ``code`` is the wire code.

    ``stream`` (and ``seq`` for appends) name what was refused when relayd said so.
    """

    code: str = "refused"

    def __init__(
        self, message: str = "", *, code: str | None = None, stream: str | None = None, seq: int | None = None
    ) -> None:
        if code is not None:
            self.code = code  # an instance may carry a more precise code (token_expired)
        self.message = message
        self.stream = stream
        self.seq = seq
        where = f" (stream {stream})" if stream is not None else ""
        super().__init__(f"{self.code}: {message}{where}" if message else f"{self.code}{where}")


class Unauthorized(Refused):
    """The API key or token was refused (``unauthorized``), or the token expired (``token_expired``)."""

    code: str = "unauthorized"


class Forbidden(Refused):
    """The token does not allow this stream, or lacks the right asked for (``cancel``)."""

    code: str = "forbidden"


class StreamNotFound(Refused):
    """The stream did not exist and no producer opened it within ``wait_ms``."""

    code: str = "stream_not_found"


class ProducerFenced(Refused):
    """Another producer took the stream over with a newer epoch; this one must stop writing."""

    code: str = "fenced"


class StreamAlreadyEnded(Refused):
    """The stream had already ended (possibly by relayd, ``producer_lost``); appends are refused."""

    code: str = "stream_ended"


_REFUSALS: dict[str, type[Refused]] = {
    cls.code: cls for cls in (Unauthorized, Forbidden, StreamNotFound, ProducerFenced, StreamAlreadyEnded)
}
_REFUSALS["token_expired"] = Unauthorized


def refused_from_frame(frame: dict[str, Any]) -> Refused:
    """The exception for an ``{"type": "error", "code": ...}`` frame: the subclass for its code."""
    code = str(frame.get("code") or "refused")
    cls = _REFUSALS.get(code, Refused)
    seq = frame.get("seq")
    return cls(
        str(frame.get("message") or ""),
        code=code,
        stream=frame.get("stream") if isinstance(frame.get("stream"), str) else None,
        seq=seq if isinstance(seq, int) else None,
    )


class StreamFailed(ClientError):
    """A stream ended with ``error``, ``cancelled`` or ``producer_lost`` rather than ``completed``.

    Raised after the last chunk has been delivered; ``cursor`` is the end's cursor.
    """

    def __init__(self, reason: str, message: str = "", cursor: str | None = None, stream: str | None = None) -> None:
        self.reason = reason
        self.message = message
        self.cursor = cursor
        self.stream = stream
        name = f"stream {stream}" if stream is not None else "stream"
        super().__init__(f"{name} ended {reason}: {message}" if message else f"{name} ended {reason}")


class StreamErrored(StreamFailed):
    """The producer ended the stream with ``error``; ``message`` says why."""


class StreamCancelled(StreamFailed):
    """The stream was cancelled (by a consumer's request, or by the producer)."""


class ProducerLost(StreamFailed):
    """The producer vanished and relayd ended the stream ``producer_lost``."""


_FAILURES: dict[str, type[StreamFailed]] = {
    "error": StreamErrored,
    "cancelled": StreamCancelled,
    "producer_lost": ProducerLost,
}


def stream_failed(reason: str, message: str = "", cursor: str | None = None, stream: str | None = None) -> StreamFailed:
    """The :class:`StreamFailed` subclass for an end ``reason``."""
    return _FAILURES.get(reason, StreamFailed)(reason, message, cursor, stream)


class StreamGap(ClientError):
    """History between ``cursor`` (what the consumer had) and ``next`` (oldest still stored) is gone."""

    def __init__(self, cursor: str | None, next: str, stream: str | None = None) -> None:
        self.cursor = cursor
        self.next = next
        self.stream = stream
        super().__init__(f"gap in stream {stream}: history after {cursor} is gone, next is {next}")


class StreamReset(ClientError):
    """The consumer's cursor belongs to an earlier generation of the stream (``stream_replaced``)."""

    def __init__(self, reason: str, stream: str | None = None) -> None:
        self.reason = reason
        self.stream = stream
        super().__init__(f"stream {stream} was reset: {reason}")
