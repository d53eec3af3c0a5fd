"""Prometheus metrics: one registry per relayd, intent-named methods, children bound once.

Labels come only from bounded sets (role, reason, path, error code); never a stream id. What
runs per chunk or per write (counters, the ack and delivery latency histograms) is kept as plain
integers and lists and turned into samples only when scraped. Every metric, and what to alert
on, is listed in docs/operations.md ("Metrics reference").
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client import (
    ProcessCollector as _ProcessCollector,
)

from relayd import __version__
from relayd.budget import Budget
from relayd.errors import ERROR_CODES
from relayd.hot_metrics import LATENCY_BUCKETS, HotPath
from relayd.hot_metrics import PATHS as PATHS  # the `path` label values, named here with the others

ROLES = ("producer", "consumer_ws", "consumer_sse")
END_REASONS = ("completed", "error", "cancelled", "producer_lost")
AUTH_REASONS = ("unauthorized", "token_expired", "forbidden")
BACKLOG_SIDES = ("producer", "consumer")  # relayd_backlog_* label values
# slow_consumer: data waited and the peer took none for consumer.send_timeout_ms; queue_full: its
# unread replies outgrew their bound; heartbeat_timeout: no pong (nor anything) from an idle peer
FORCED_CLOSE_REASONS = ("slow_consumer", "queue_full", "heartbeat_timeout")
CONNECTION_LIMITS = ("max_connections", *ROLES)  # limits.max_connections, then the per-role caps
OTHER = "other"  # the label of an error code outside docs/protocol.md's table

_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
# open -> first chunk: a model's time to first token, seconds rather than milliseconds
_FIRST_CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        _ProcessCollector(registry=r)
        Info("relayd_build", "relayd build information", registry=r).info({"version": __version__})

        conns = Gauge("relayd_connections", "Open connections, by role", ["role"], registry=r)
        opened = Counter("relayd_connections_opened", "Connections accepted, by role", ["role"], registry=r)
        self._conns = {role: conns.labels(role) for role in ROLES}
        self._opened = {role: opened.labels(role) for role in ROLES}

        self._hot = HotPath()
        r.register(self._hot)
        # the per-chunk series: bound methods of relayd/hot_metrics.py's objects, handed out once
        self.ack_latency = self._hot.ack_latency.observe
        self.delivery_latency = self._hot.delivery_latency.observe
        self.chunks_stored: Callable[[int, int], None] = self._hot.chunks_stored  # (count, nbytes)
        # chunks (and their frames' bytes) written to a consumer's socket: (path, chunks, nbytes)
        self.written: Callable[[str, int, int], None] = self._hot.written

        self._batch_size = Histogram(
            "relayd_redis_batch_size", "Commands per Redis pipeline", buckets=_BATCH_BUCKETS, registry=r
        )
        self._batch_bytes = Counter("relayd_redis_batch_bytes", "Bytes sent to Redis by the write path", registry=r)
        self._batch_latency = Histogram(
            "relayd_redis_batch_seconds", "Redis pipeline round-trip time", buckets=LATENCY_BUCKETS, registry=r
        )
        self._redis_errors = Counter("relayd_redis_errors", "Failed Redis round trips", registry=r)

        self._streams_open = Gauge("relayd_streams_open", "Streams held by producers on this instance", registry=r)
        self._started = Counter("relayd_streams_started", "Streams created", registry=r)
        ended = Counter("relayd_streams_ended", "Streams ended, by reason", ["reason"], registry=r)
        self._ended = {reason: ended.labels(reason) for reason in END_REASONS}
        self._first_chunk = Histogram(
            "relayd_time_to_first_chunk_seconds",
            "Stream created -> its first chunk stored",
            buckets=_FIRST_CHUNK_BUCKETS,
            registry=r,
        )
        duration = Histogram(
            "relayd_stream_duration_seconds",
            "Stream created -> ended, by end reason",
            ["reason"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self._duration = {reason: duration.labels(reason) for reason in END_REASONS}

        auth = Counter("relayd_auth_failures", "Refused credentials, by reason", ["reason"], registry=r)
        self._auth = {reason: auth.labels(reason) for reason in AUTH_REASONS}
        bad = Counter("relayd_bad_frames", "Refused client frames, by error code", ["code"], registry=r)
        self._bad_frames = {code: bad.labels(code) for code in (*ERROR_CODES, OTHER)}
        self._bad_http = Counter(
            "relayd_bad_http_requests", "Requests aiohttp's HTTP parser refused (400) before any handler", registry=r
        )
        self._auth_throttled = Counter(
            "relayd_auth_throttled",
            "Requests refused with 429: their address failed authentication too often (auth.max_failures)",
            registry=r,
        )

        self._catchups = Counter(
            "relayd_consumer_catchups", "Consumers that fell behind and were caught up from Redis", registry=r
        )
        self._gaps = Counter("relayd_consumer_gaps", "Gap frames sent (history trimmed away)", registry=r)
        self._resets = Counter("relayd_consumer_resets", "Reset frames sent (the stream was created again)", registry=r)
        self._slow = Counter("relayd_slow_consumer_disconnects", "Consumers closed as slow", registry=r)
        forced = Counter(
            "relayd_forced_closes",
            "Connections relayd closed because of the peer, by role and reason",
            ["role", "reason"],
            registry=r,
        )
        self._forced = {
            (role, reason): forced.labels(role, reason) for role in ROLES for reason in FORCED_CLOSE_REASONS
        }
        self._subs = Gauge("relayd_subscriptions", "Active consumer subscriptions", registry=r)

        # the broker (scale-out): other instances' writes and requests through Redis pub/sub
        self._broker_up = Gauge("relayd_broker_up", "1 while the broker's pub/sub connections are up", registry=r)
        self._broker_up.set(1)
        self._broker_in = Counter(
            "relayd_broker_notifications_received", "Notifications of other instances' writes and requests", registry=r
        )
        self._broker_out = Counter(
            "relayd_broker_requests_sent", "Requests sent to other instances (cancel)", registry=r
        )
        self._broker_resubscribes = Counter(
            "relayd_broker_resubscribes", "Pub/sub reconnects after which every followed stream was re-read", registry=r
        )
        self._broker_lag = Histogram(
            "relayd_broker_lag_seconds",
            "Another instance's write -> its notification here (clock skew between hosts included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._tcp = Gauge("relayd_tcp_connections", "Open TCP connections, of every kind", registry=r)
        self._conn_limit = Gauge(
            "relayd_connections_limit", "limits.max_connections as resolved at startup", registry=r
        )
        refused = Counter(
            "relayd_connections_refused",
            "Connections refused with 503 too_many_connections, by the limit reached",
            ["limit"],
            registry=r,
        )
        self._refused = {limit: refused.labels(limit) for limit in CONNECTION_LIMITS}
        self._header_timeouts = Counter(
            "relayd_header_timeouts",
            "Connections closed for not sending a complete request head within server.header_timeout_s",
            registry=r,
        )

    # connections ------------------------------------------------------------------------------
    def connection_opened(self, role: str) -> None:
        self._opened[role].inc()
        self._conns[role].inc()

    def connection_closed(self, role: str) -> None:
        self._conns[role].dec()

    def draining(self) -> None:
        self._hot.draining = 1

    # ingest / store ---------------------------------------------------------------------------
    def batch_sent(self, commands: int, nbytes: int) -> None:
        self._batch_size.observe(commands)
        self._batch_bytes.inc(nbytes)

    def batch_done(self, seconds: float) -> None:
        self._batch_latency.observe(seconds)
        self._hot.redis_up = 1

    def redis_error(self) -> None:
        self._redis_errors.inc()
        self._hot.redis_up = 0

    def redis_health(self, up: bool) -> None:
        """The outcome of a Redis round trip outside the write path (readiness, sweep, recovery)."""
        self._hot.redis_up = 1 if up else 0

    def stream_started(self) -> None:
        self._started.inc()

    def first_chunk(self, seconds: float) -> None:
        self._first_chunk.observe(seconds)

    def stream_ended(self, reason: str, seconds: float) -> None:
        child = self._ended.get(reason)
        if child is not None:
            child.inc()
            self._duration[reason].observe(max(seconds, 0.0))  # created on another clock: clamp

    def streams_held(self, delta: int) -> None:
        self._streams_open.inc(delta)

    # delivery ---------------------------------------------------------------------------------
    def chunk_totals(self) -> tuple[int, int]:
        """Chunks stored and delivered since start: the status sampler's two counters, read directly."""
        hot = self._hot
        return hot.chunks_in, sum(hot.delivered.values())

    def catchup(self) -> None:
        self._catchups.inc()

    def gap(self) -> None:
        self._gaps.inc()

    def reset(self) -> None:
        self._resets.inc()

    def slow_consumer(self) -> None:
        self._slow.inc()

    def forced_close(self, role: str, reason: str) -> None:
        """relayd closed a connection because of its peer (``FORCED_CLOSE_REASONS``)."""
        self._forced[role, reason].inc()

    def subscriptions(self, delta: int) -> None:
        self._subs.inc(delta)

    # broker -------------------------------------------------------------------------------------
    def broker_up_from(self, up: Callable[[], bool]) -> None:
        """How to read whether the broker is connected, at each scrape."""
        self._broker_up.set_function(lambda: 1.0 if up() else 0.0)

    def broker_received(self) -> None:
        self._broker_in.inc()

    def broker_sent(self) -> None:
        self._broker_out.inc()

    def broker_resubscribed(self) -> None:
        self._broker_resubscribes.inc()

    def broker_lag(self, seconds: float) -> None:
        self._broker_lag.observe(max(seconds, 0.0))

    # global memory bounds (relayd/budget.py) --------------------------------------------------
    def track_budgets(self, producers: Budget, consumers: Budget) -> None:
        """Read the bytes held for producers and consumers, all connections together, at each scrape."""
        held = Gauge(
            "relayd_backlog_bytes",
            "Bytes held for peers, all connections together: producers' unacknowledged appends, "
            "frames queued for consumers",
            ["side"],
            registry=self.registry,
        )
        limit = Gauge(
            "relayd_backlog_limit_bytes",
            "limits.max_producer_backlog_bytes / limits.max_consumer_backlog_bytes",
            ["side"],
            registry=self.registry,
        )
        spent = Gauge(
            "relayd_backlog_full",
            "1 while that role's global backlog bound is reached (producers: reading paused; "
            "consumers: live chunks read back from Redis)",
            ["side"],
            registry=self.registry,
        )
        for side, budget in zip(BACKLOG_SIDES, (producers, consumers), strict=True):
            held.labels(side).set_function(_used_of(budget))
            limit.labels(side).set(budget.limit)
            spent.labels(side).set_function(_spent_of(budget))

    # connection limits (relayd/web/gate.py) ---------------------------------------------------
    def connection_limits(self, total: int, tcp_connections: Callable[[], int]) -> None:
        """The resolved limits.max_connections, and how to count open TCP connections when scraped."""
        self._conn_limit.set(total)
        self._tcp.set_function(tcp_connections)

    def connection_refused(self, limit: str) -> None:
        self._refused[limit].inc()

    def header_timeout(self) -> None:
        self._header_timeouts.inc()

    # refusals ---------------------------------------------------------------------------------
    def auth_failure(self, reason: str) -> None:
        self._auth.get(reason, self._auth["unauthorized"]).inc()

    def bad_frame(self, code: str) -> None:
        self._bad_frames.get(code, self._bad_frames[OTHER]).inc()

    def bad_http_request(self) -> None:
        self._bad_http.inc()

    def auth_throttled(self) -> None:
        self._auth_throttled.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge_workers(expositions: list[tuple[int, bytes]]) -> bytes:
    """The text expositions of several workers as one, each sample labelled ``worker="<i>"``.

    Prometheus wants all samples of a family together under one HELP/TYPE: families keep the
    order of their first appearance, and each worker's samples follow in worker order.
    """
    families: dict[str, tuple[list[bytes], list[bytes]]] = {}  # name -> (HELP/TYPE lines, samples)
    for worker, text in expositions:
        label = b'worker="%d"' % worker
        current: list[bytes] | None = None
        for line in text.splitlines():
            if line.startswith(b"# "):
                name = line.split(b" ", 3)[2].decode()
                head, current = families.setdefault(name, ([], []))
                if line not in head:
                    head.append(line)
            elif line and current is not None:
                name_end = line.find(b"{")
                space = line.find(b" ")
                if name_end != -1 and name_end < space:
                    current.append(line[: name_end + 1] + label + b"," + line[name_end + 1 :])
                else:
                    current.append(line[:space] + b"{" + label + b"}" + line[space:])
    out = [line for head, samples in families.values() for line in (*head, *samples)]
    return b"\n".join(out) + b"\n"


def _used_of(budget: Budget) -> Callable[[], float]:
    return lambda: float(budget.used)


def _spent_of(budget: Budget) -> Callable[[], float]:
    return lambda: 1.0 if budget.spent else 0.0
