"""Write deploy/grafana/relayd.json, the Grafana dashboard for relayd's Prometheus metrics.

The dashboard is generated so that its many similar panels stay consistent (the same instance
filter, rate window and units everywhere); edit this file, then run it:

    python deploy/grafana/build_dashboard.py

tests/test_deploy.py checks that relayd.json is what this script writes, that every expression
parses (promtool) and that every metric it names is one a running relayd exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("relayd.json")
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
INST = 'instance=~"$instance"'
JOB = 'job="relayd"'
RATE = "$__rate_interval"
WIDTH = 24


def sel(metric: str, *matchers: str) -> str:
    """``metric{instance=~"$instance", ...}``: every expression is filtered by the instance variable."""
    return f"{metric}{{{', '.join((INST, *matchers))}}}"


def rate(metric: str, *matchers: str, by: str = "") -> str:
    inner = f"rate({sel(metric, *matchers)}[{RATE}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantiles(hist: str, *, by: str = "") -> list[tuple[str, str]]:
    """p50/p90/p99 of a histogram over all selected instances (and ``by`` labels)."""
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({sel(hist + '_bucket')}[{RATE}])))",
            f"p{round(q * 100)}{suffix}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


class Builder:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def _place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > WIDTH:
            self._newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def timeseries(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        description: str = "",
        w: int = 8,
        h: int = 8,
        stack: bool = False,
    ) -> None:
        self.panels.append(
            {
                "type": "timeseries",
                "id": self._id(),
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": self._place(w, h),
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        "min": 0,
                        "custom": {
                            "drawStyle": "line",
                            "lineWidth": 1,
                            "fillOpacity": 10,
                            "showPoints": "never",
                            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                        },
                    },
                    "overrides": [],
                },
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
                "targets": self._targets(targets),
            }
        )

    def stat(self, title: str, expr: str, *, unit: str = "short", description: str = "", w: int = 4) -> None:
        self.panels.append(
            {
                "type": "stat",
                "id": self._id(),
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": self._place(w, 4),
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value",
                    "graphMode": "none",
                    "textMode": "auto",
                },
                "targets": self._targets([(expr, "")]),
            }
        )

    def _targets(self, targets: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [
            {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(targets)
        ]


def build() -> dict[str, Any]:
    b = Builder()

    b.row("Overview")
    b.stat("Instances up", f"sum({sel('up', JOB)})", description="Scrape targets answering /metrics.")
    b.stat("Redis up", f"min({sel('relayd_redis_up')})", description="1: every instance reaches Redis.")
    b.stat("Draining", f"max({sel('relayd_draining')})", description="1: an instance is shutting down.")
    b.stat("Connections", f"sum({sel('relayd_connections')})")
    b.stat("Streams open", f"sum({sel('relayd_streams_open')})")
    b.stat("Subscriptions", f"sum({sel('relayd_subscriptions')})")

    b.row("Throughput")
    b.timeseries(
        "Chunks in and delivered",
        [(rate("relayd_chunks_in_total"), "in"), (rate("relayd_chunks_delivered_total", by="path"), "out {{path}}")],
        unit="cps",
        description="Chunks acknowledged to producers, and chunks queued to consumers (live fan-out or replay).",
    )
    b.timeseries(
        "Bytes in and delivered",
        [(rate("relayd_bytes_in_total"), "in"), (rate("relayd_bytes_delivered_total", by="path"), "out {{path}}")],
        unit="Bps",
    )
    b.timeseries(
        "Redis write path",
        [
            (rate("relayd_redis_batch_bytes_total"), "bytes/s to Redis"),
            (rate("relayd_redis_batch_size_count"), "pipelines/s"),
        ],
        unit="short",
    )

    b.row("Latency")
    b.timeseries(
        "Ack latency",
        quantiles("relayd_ack_latency_seconds"),
        unit="s",
        description="From an append's arrival to its ack to the producer (includes the Redis round trip).",
    )
    b.timeseries(
        "Delivery latency",
        quantiles("relayd_delivery_latency_seconds"),
        unit="s",
        description="From a chunk's arrival to its hand-off to consumers.",
    )
    b.timeseries("Redis batch round trip", quantiles("relayd_redis_batch_seconds"), unit="s")
    b.timeseries(
        "Time to first chunk",
        quantiles("relayd_time_to_first_chunk_seconds"),
        unit="s",
        description="From a stream's open to its first stored chunk: the model's time to first token, seen by relayd.",
    )
    b.timeseries(
        "Stream duration",
        [*quantiles("relayd_stream_duration_seconds"), *quantiles("relayd_stream_duration_seconds", by="reason")[2:]],
        unit="s",
        description="From open to end; the p99 per end reason too.",
    )

    b.row("Connections and streams")
    b.timeseries("Connections by role", [(f"sum by (role) ({sel('relayd_connections')})", "{{role}}")], stack=True)
    b.timeseries(
        "Connections opened",
        [(rate("relayd_connections_opened_total", by="role"), "{{role}}")],
        unit="ops",
    )
    b.timeseries(
        "Streams open and subscriptions",
        [
            (f"sum({sel('relayd_streams_open')})", "streams open"),
            (f"sum({sel('relayd_subscriptions')})", "subscriptions"),
        ],
    )
    b.timeseries(
        "Streams started and ended",
        [
            (rate("relayd_streams_started_total"), "started"),
            (rate("relayd_streams_ended_total", by="reason"), "ended {{reason}}"),
        ],
        unit="ops",
        w=24,
    )

    b.row("Redis")
    b.timeseries("Redis up", [(f"min by (instance) ({sel('relayd_redis_up')})", "{{instance}}")])
    b.timeseries("Redis errors", [(rate("relayd_redis_errors_total"), "errors")], unit="ops")
    b.timeseries(
        "Batch size (commands per pipeline)",
        [
            *quantiles("relayd_redis_batch_size")[::2],
            (f"{rate('relayd_redis_batch_size_sum')} / {rate('relayd_redis_batch_size_count')}", "mean"),
        ],
    )

    b.row("Errors")
    b.timeseries("Refused frames by code", [(rate("relayd_bad_frames_total", by="code"), "{{code}}")], unit="ops")
    b.timeseries(
        "Auth failures by reason", [(rate("relayd_auth_failures_total", by="reason"), "{{reason}}")], unit="ops"
    )
    b.timeseries(
        "Streams ended in error or producer_lost",
        [
            (rate("relayd_streams_ended_total", 'reason="error"'), "error"),
            (rate("relayd_streams_ended_total", 'reason="producer_lost"'), "producer_lost"),
        ],
        unit="ops",
    )

    b.row("Slow consumers and lost history")
    b.timeseries(
        "Slow consumers",
        [
            (rate("relayd_slow_consumer_disconnects_total"), "closed 4008"),
            (rate("relayd_consumer_catchups_total"), "caught up from Redis"),
        ],
        unit="ops",
        w=12,
    )
    b.timeseries(
        "Gaps and resets",
        [(rate("relayd_consumer_gaps_total"), "gap"), (rate("relayd_consumer_resets_total"), "reset")],
        unit="ops",
        w=12,
        description="Consumers told that history they asked for is gone (trimmed, expired, recreated).",
    )

    b.row("Process")
    b.timeseries("Resident memory", [(sel("process_resident_memory_bytes", JOB), "{{instance}}")], unit="bytes")
    b.timeseries(
        "CPU",
        [(f"rate({sel('process_cpu_seconds_total', JOB)}[{RATE}])", "{{instance}}")],
        unit="percentunit",
    )
    b.timeseries(
        "File descriptors",
        [
            (sel("process_open_fds", JOB), "open {{instance}}"),
            (sel("process_max_fds", JOB), "max {{instance}}"),
        ],
    )

    return {
        "title": "relayd",
        "uid": "relayd-overview",
        "description": "relayd: throughput, latency, connections, streams, Redis, errors, slow consumers, process.",
        "tags": ["relayd"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "",
        "links": [],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "DS_PROMETHEUS",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "options": [],
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": 'label_values(relayd_build_info{job="relayd"}, instance)', "refId": "instance"},
                    "definition": 'label_values(relayd_build_info{job="relayd"}, instance)',
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                    "options": [],
                },
            ]
        },
        "panels": b.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
