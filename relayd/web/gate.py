"""Connection limits: a deadline for the request head, caps in total and per role, room for probes.

- **Header timeout**: a new connection must deliver a complete request head (for a websocket,
  its handshake) within ``server.header_timeout_s``, or it is closed. Idle keep-alive
  connections are closed after ``server.keepalive_timeout_s`` (aiohttp's own timer).
- **Total cap**: ``limits.max_connections`` TCP connections (0: derived from the file
  descriptor limit). ``RESERVE`` more are accepted for ``/healthz``, ``/readyz`` and ``/metrics``
  only, one request each; anything else there gets 503 ``too_many_connections``. Beyond that a
  connection gets the 503 at once, before its request is read.
- **Per role**: ``limits.max_producer_connections``, ``max_consumer_ws_connections`` and
  ``max_sse_connections`` (0: only the total applies), checked by the handlers (:meth:`admit`).

Each refusal is counted (``relayd_connections_refused_total{limit}``) and logged, at most one
line per ``_LOG_EVERY_S`` with the number refused since the last one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import socket
from collections.abc import Awaitable, Callable
from time import monotonic

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from relayd.config import Config
from relayd.metrics import Metrics

log = logging.getLogger("relayd.web")

OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RESERVE = 32  # connections beyond limits.max_connections, for the probes and the scrape
# descriptors relayd needs besides client connections: Redis pools and pub/sub, the listener,
# the log, the embedded server's pipes, Python itself
_OWN_FDS = 64
_LOG_EVERY_S = 10.0
_BODY = orjson.dumps(
    {"error": {"code": "too_many_connections", "message": "relayd is at its connection limit; retry later"}}
)
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fd_limit() -> int:
    """The process's file descriptor limit, raised to its hard limit if the soft one is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft


def max_connections(config: Config, fds: int) -> int:
    """``limits.max_connections``, or what ``fds`` descriptors leave room for when it is 0."""
    configured = config.limits.max_connections
    # Reads: redis-py's pool, and on a single server as many more for history pages (store/pages.py).
    needed = RESERVE + _OWN_FDS + 2 * config.redis.max_connections
    if not configured:
        return max(fds - needed, 16)
    if configured + needed > fds:
        log.warning(
            "limits.max_connections=%d needs about %d file descriptors; the limit is %d: raise it "
            "(LimitNOFILE= in the systemd unit, ulimit -n) or lower limits.max_connections",
            configured,
            configured + needed,
            fds,
        )
    return configured


class ConnectionGate:
    def __init__(self, config: Config, metrics: Metrics, total: int) -> None:
        limits = config.limits
        self.total = total
        self._caps = {
            "producer": limits.max_producer_connections,
            "consumer_ws": limits.max_consumer_ws_connections,
            "consumer_sse": limits.max_sse_connections,
        }
        self._open = dict.fromkeys(self._caps, 0)
        self._header_timeout = config.server.header_timeout_s
        self._metrics = metrics
        # connections waiting for their first request head, with their deadline
        self._heads: dict[RequestHandler, asyncio.TimerHandle] = {}
        self._reserve: set[RequestHandler] = set()  # accepted beyond the cap: probes only
        self._refused = 0
        self._logged_at = 0.0
        self._server: web.Server | None = None

    # the listener -----------------------------------------------------------------------------

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for the listening socket, in front of aiohttp's."""
        self._server = server
        loop = asyncio.get_running_loop()

        def accept() -> asyncio.Protocol:
            open_now = len(server.connections) + 1
            if open_now > self.total + RESERVE:
                self._refuse("max_connections", open_now)
                return _Refusal()
            handler = server()
            self._heads[handler] = loop.call_later(self._header_timeout, self._head_timeout, handler)
            if open_now > self.total:
                self._reserve.add(handler)
            return handler

        return accept

    def tcp_connections(self) -> int:
        return len(self._server.connections) if self._server is not None else 0

    def _head_timeout(self, handler: RequestHandler) -> None:
        self._heads.pop(handler, None)
        self._reserve.discard(handler)
        if handler.transport is not None:
            self._metrics.header_timeout()
            handler.force_close()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A request head arrived: cancel the deadline; on a reserve connection serve probes only."""
        protocol = request.protocol
        deadline = self._heads.pop(protocol, None)
        if deadline is not None:
            deadline.cancel()
        if protocol not in self._reserve:
            return await handler(request)
        self._reserve.discard(protocol)
        if request.path not in OPS_PATHS:
            self._refuse("max_connections", self.tcp_connections())
            return _refusal_response()
        response = await handler(request)
        response.force_close()  # one request: the reserve stays free for the next probe
        return response

    # roles ------------------------------------------------------------------------------------

    def admit(self, role: str) -> web.Response | None:
        """Count a connection of ``role`` in (then :meth:`release` it), or the 503 that refuses it."""
        cap = self._caps[role]
        if cap and self._open[role] >= cap:
            self._refuse(role, self._open[role])
            return _refusal_response()
        self._open[role] += 1
        return None

    def release(self, role: str) -> None:
        self._open[role] -= 1

    def _refuse(self, limit: str, open_now: int) -> None:
        self._metrics.connection_refused(limit)
        self._refused += 1
        now = monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            cap = self.total if limit == "max_connections" else self._caps[limit]
            key = "limits.max_connections" if limit == "max_connections" else _ROLE_KEYS[limit]
            log.warning(
                "connection limit reached: %s=%d open=%d refused=%d (since the last such line)",
                key,
                cap,
                open_now,
                self._refused,
                extra={"limit": key, "open": open_now, "refused": self._refused},
            )
            self._logged_at, self._refused = now, 0


_ROLE_KEYS = {
    "producer": "limits.max_producer_connections",
    "consumer_ws": "limits.max_consumer_ws_connections",
    "consumer_sse": "limits.max_sse_connections",
}


def _refusal_response() -> web.Response:
    response = web.Response(status=503, body=_BODY, content_type="application/json", headers={"Retry-After": "1"})
    response.force_close()
    return response


class _Refusal(asyncio.Protocol):
    """A connection beyond the reserve: a 503 before its request is even read, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSAL)
        transport.close()


GATE = web.AppKey("gate", ConnectionGate)


class GatedSite(web.BaseSite):
    """A site on a bound, listening socket whose connections pass through a :class:`ConnectionGate`."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, gate: ConnectionGate) -> None:
        super().__init__(runner)
        self._sock = sock
        self._gate = gate

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._gate.factory(server), sock=self._sock, backlog=self._backlog
        )


def limited(role: str) -> Callable[[Handler], Handler]:
    """Decorate the handler of ``role``'s connections: refused with 503 once its cap is reached."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)  # its name in tracebacks and task dumps; __wrapped__ to find it
        async def guarded(request: web.Request) -> web.StreamResponse:
            gate = request.app.get(GATE)
            if gate is None:  # an app built without a server (relayd.server wires the gate)
                return await handler(request)
            refusal = gate.admit(role)
            if refusal is not None:
                return refusal
            try:
                return await handler(request)
            finally:
                gate.release(role)

        return guarded

    return wrap
