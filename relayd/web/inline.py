"""Producer messages taken as aiohttp's parser completes them, inside the transport's read.

aiohttp's private reader classes: if they are missing or changed, producers fall back to the
handler task's ordinary ``receive()`` (tests/test_ingest_inline.py says which path runs). Kept
apart from relayd/web/transport.py so that module can be compiled (the compiled build); this
one subclasses whatever aiohttp's reader is and stays interpreted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

try:
    from aiohttp._websocket.reader import WebSocketDataQueue as _DataQueue
    from aiohttp._websocket.reader import WebSocketReader as _Parser
except ImportError:  # pragma: no cover - another aiohttp
    _DataQueue = None  # type: ignore[assignment,misc]
    _Parser = None  # type: ignore[assignment,misc]

Take = Callable[[bytes | str], bool]


if _DataQueue is not None:

    class _InlineQueue(_DataQueue):
        """aiohttp's message queue, except that a data message its parser completes is first offered
        to ``take``, synchronously, inside the transport's ``data_received``.

        ``take(data)`` handles the message and returns True, or returns False and the message is
        queued for ``receive()`` as aiohttp would queue it. Control messages (ping, pong, close,
        the close handshake's own) are always queued. Once a data message is queued, every later
        message is too until the handler task has handled it (:meth:`handled`), so the task sees
        them in the order the peer sent them. (Not only until it has *read* it: aiohttp's parser
        stalls while its queue is over its limit and resumes inside the read that brings it under,
        so the next message is parsed while the one just read is not handled yet.)
        """

        __slots__ = ("pending", "take")
        take: Take | None
        pending: int  # data messages queued and not yet handled

        def feed_data(self, data: Any, size: int) -> None:
            kind = data[0]
            if kind is _TEXT or kind is _BINARY:
                take = self.take
                if take is not None and not self.pending and not self._buffer and take(data[1]):
                    return
                self.pending += 1
            super().feed_data(data, size)

    _TEXT, _BINARY = WSMsgType.TEXT, WSMsgType.BINARY


class InlineWebSocketResponse(web.WebSocketResponse):
    """A websocket whose data messages can be handled as aiohttp's parser completes them.

    A micro-optimisation for producers that send one message at a time: aiohttp queues each message
    and wakes the handler task for it (a future, a task step through the whole middleware chain).
    Here the message goes to :meth:`take_inline`'s callback from the transport's ``data_received``
    instead; only what the callback refuses (and every control message) takes the ordinary path,
    and the handler task says when it is done with such a message (:meth:`handled`).
    The frames are parsed by aiohttp's own reader (RFC 6455: masking, fragmentation, control frames
    between fragments, ``max_msg_size``, UTF-8 of text, close codes), so nothing of the websocket
    protocol is reimplemented: only the queue its messages go to is relayd's.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._inline: _InlineQueue | None = None

    def _post_start(self, request: Any, protocol: str | None, writer: Any) -> None:
        handler = request.protocol
        # Bytes that came with the handshake went to aiohttp's parser: keep it then (a client must
        # wait for the 101 before it sends, so this is never the case for a conforming one).
        early = getattr(handler, "_message_tail", b"")
        super()._post_start(request, protocol, writer)
        if _DataQueue is None or early or not hasattr(handler, "_payload_parser"):
            return
        try:
            assert self._reader is not None and self._loop is not None
            queue = _InlineQueue(handler, self._reader._limit // 2, loop=self._loop)
            queue.take, queue.pending = None, 0
            parser = _Parser(queue, self._max_msg_size, compress=bool(self._compress), decode_text=self._decode_text)
        except (AttributeError, TypeError):  # pragma: no cover - another aiohttp: its own reader stays
            return
        handler._payload_parser = parser  # nothing can have reached aiohttp's: no await since it was set
        self._reader, self._parser, self._inline = queue, parser, queue

    @property
    def inline(self) -> bool:
        """Whether data messages can be taken inline on this connection."""
        return self._inline is not None

    def take_inline(self, take: Take | None) -> None:
        """Offer every data message to ``take`` first (None: no more)."""
        if self._inline is not None:
            self._inline.take = take

    def handled(self) -> None:
        """The handler task is done with the data message it read: the next one may be taken inline."""
        if self._inline is not None:
            self._inline.pending -= 1
