"""Prometheus metrics: one registry per relayd, intent-named methods, children bound once.

Labels come only from bounded sets (role, reason, path); never a stream id.
"""

from __future__ import annotations

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
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from relayd import __version__

ROLES = ("producer", "consumer_ws", "consumer_sse")
END_REASONS = ("completed", "error", "cancelled", "producer_lost")
AUTH_REASONS = ("unauthorized", "token_expired", "forbidden")
PATHS = ("live", "replay")

_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _HotCounters(Collector):
    """Per-chunk counters as plain integers, turned into samples only when scraped.

    A micro-optimisation: a prometheus_client ``Counter.inc`` takes a lock; these run several
    times per chunk on the hot path, in one thread, so an ``int`` add is enough.
    """

    def __init__(self) -> None:
        self.chunks_in = 0
        self.bytes_in = 0
        self.delivered = dict.fromkeys(PATHS, 0)
        self.delivered_bytes = dict.fromkeys(PATHS, 0)

    def collect(self) -> list[CounterMetricFamily]:
        chunks_in = CounterMetricFamily("relayd_chunks_in", "Chunks stored (acknowledged appends)")
        chunks_in.add_metric([], self.chunks_in)
        bytes_in = CounterMetricFamily("relayd_bytes_in", "Chunk bytes stored")
        bytes_in.add_metric([], self.bytes_in)
        out = CounterMetricFamily(
            "relayd_chunks_delivered", "Chunks written to consumer connections, by path", labels=["path"]
        )
        bout = CounterMetricFamily(
            "relayd_bytes_delivered", "Bytes written to consumer connections, by path", labels=["path"]
        )
        for path in PATHS:
            out.add_metric([path], self.delivered[path])
            bout.add_metric([path], self.delivered_bytes[path])
        return [chunks_in, bytes_in, out, bout]


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

        self._hot = _HotCounters()
        r.register(self._hot)

        self._batch_size = Histogram(
            "relayd_redis_batch_size", "Commands per Redis pipeline", buckets=_BATCH_BUCKETS, registry=r
        )
        self._batch_bytes = Counter("relayd_redis_batch_bytes", "Bytes sent to Redis by the write path", registry=r)
        self._batch_latency = Histogram(
            "relayd_redis_batch_seconds", "Redis pipeline round-trip time", buckets=_LATENCY_BUCKETS, registry=r
        )
        self._redis_errors = Counter("relayd_redis_errors", "Failed Redis round trips", registry=r)

        self._streams_open = Gauge("relayd_streams_open", "Streams held by producers on this instance", registry=r)
        self._started = Counter("relayd_streams_started", "Streams created", registry=r)
        ended = Counter("relayd_streams_ended", "Streams ended, by reason", ["reason"], registry=r)
        self._ended = {reason: ended.labels(reason) for reason in END_REASONS}

        auth = Counter("relayd_auth_failures", "Refused credentials, by reason", ["reason"], registry=r)
        self._auth = {reason: auth.labels(reason) for reason in AUTH_REASONS}
        self._bad_frames = Counter("relayd_bad_frames", "Refused client frames, by code", ["code"], registry=r)

        self._catchups = Counter(
            "relayd_consumer_catchups", "Consumers that fell behind and were caught up from Redis", registry=r
        )
        self._gaps = Counter(
            "relayd_consumer_gaps", "Gap or reset frames sent (history no longer available)", registry=r
        )
        self._slow = Counter("relayd_slow_consumer_disconnects", "Consumers closed with 4008 slow_consumer", registry=r)
        self._subs = Gauge("relayd_subscriptions", "Active consumer subscriptions", registry=r)

    # connections ------------------------------------------------------------------------------
    def connection_opened(self, role: str) -> None:
        self._opened[role].inc()
        self._conns[role].inc()

    def connection_closed(self, role: str) -> None:
        self._conns[role].dec()

    # ingest / store ---------------------------------------------------------------------------
    def chunks_stored(self, count: int, nbytes: int) -> None:
        hot = self._hot
        hot.chunks_in += count
        hot.bytes_in += nbytes

    def batch_sent(self, commands: int, nbytes: int) -> None:
        self._batch_size.observe(commands)
        self._batch_bytes.inc(nbytes)

    def batch_done(self, seconds: float) -> None:
        self._batch_latency.observe(seconds)

    def redis_error(self) -> None:
        self._redis_errors.inc()

    def stream_started(self) -> None:
        self._started.inc()

    def stream_ended(self, reason: str) -> None:
        child = self._ended.get(reason)
        if child is not None:
            child.inc()

    def streams_held(self, delta: int) -> None:
        self._streams_open.inc(delta)

    # delivery ---------------------------------------------------------------------------------
    def delivered(self, path: str, chunks: int, nbytes: int) -> None:
        hot = self._hot
        hot.delivered[path] += chunks
        hot.delivered_bytes[path] += nbytes

    def catchup(self) -> None:
        self._catchups.inc()

    def gap(self) -> None:
        self._gaps.inc()

    def slow_consumer(self) -> None:
        self._slow.inc()

    def subscriptions(self, delta: int) -> None:
        self._subs.inc(delta)

    # refusals ---------------------------------------------------------------------------------
    def auth_failure(self, reason: str) -> None:
        self._auth.get(reason, self._auth["unauthorized"]).inc()

    def bad_frame(self, code: str) -> None:
        self._bad_frames.labels(code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
