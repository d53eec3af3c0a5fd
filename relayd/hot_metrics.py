"""The metrics that move per chunk or per write, as plain numbers (relayd/metrics.py registers them).

A micro-optimisation: a prometheus_client ``Counter.inc`` takes a lock and ``Histogram.observe``
runs a Python loop over the buckets; these run several times per chunk, on the event loop's one
thread, so an ``int`` add and one C ``bisect`` are enough. They are turned into samples only when
scraped. A module of its own so that the compiled build compiles it (setup.py's ``HOT_MODULES``)
while relayd/metrics.py, the rest of the registry, stays interpreted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

PATHS = ("live", "replay")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class HotHistogram:
    """A histogram for the hot path: a list of bucket counts and a sum, no lock."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """``times`` observations of ``value`` (a fan-out's writes of one publication)."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        family = HistogramMetricFamily(name, documentation, unit="seconds")
        family.add_metric([], buckets, self.total)
        return family


class HotPath(Collector):
    """Per-chunk and per-write series as plain numbers, turned into samples only when scraped."""

    def __init__(self) -> None:
        self.chunks_in = 0
        self.bytes_in = 0
        self.delivered = dict.fromkeys(PATHS, 0)
        self.delivered_bytes = dict.fromkeys(PATHS, 0)
        self.ack_latency = HotHistogram(LATENCY_BUCKETS)
        self.delivery_latency = HotHistogram(LATENCY_BUCKETS)
        self.redis_up = 1
        self.draining = 0

    def chunks_stored(self, count: int, nbytes: int) -> None:
        self.chunks_in += count
        self.bytes_in += nbytes

    def written(self, path: str, chunks: int, nbytes: int) -> None:
        """Chunks (and their frames' bytes) written to a consumer's socket."""
        self.delivered[path] += chunks
        self.delivered_bytes[path] += nbytes

    def collect(self) -> Iterable[Metric]:
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
        up = GaugeMetricFamily(
            "relayd_redis_up", "1 if the last Redis round trip (write batch, readiness or sweep) succeeded"
        )
        up.add_metric([], self.redis_up)
        draining = GaugeMetricFamily("relayd_draining", "1 while relayd drains connections for a shutdown")
        draining.add_metric([], self.draining)
        return [
            chunks_in,
            bytes_in,
            out,
            bout,
            self.ack_latency.family(
                "relayd_ack_latency_seconds", "Producer append frame read -> its ack queued to the producer"
            ),
            self.delivery_latency.family(
                "relayd_delivery_latency_seconds",
                "Live path: append frame read -> written to a consumer socket (oldest chunk of each write)",
            ),
            up,
            draining,
        ]
