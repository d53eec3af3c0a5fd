"""relayd's /metrics: every documented series exists, moves under real traffic, and stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import Callable
from subprocess import PIPE
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.config import Config
from relayd.errors import ERROR_CODES
from relayd.metrics import (
    AUTH_REASONS,
    BACKLOG_SIDES,
    CONNECTION_LIMITS,
    END_REASONS,
    FORCED_CLOSE_REASONS,
    OTHER,
    PATHS,
    ROLES,
    Metrics,
)
from tests.helpers import Peer, Relayd, collect_chunks, poll_until

ConfigFactory = Callable[..., Config]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Every relayd series of docs/operations.md, as it appears in a scrape (histograms by _count).
DOCUMENTED = (
    "relayd_build_info",
    "relayd_connections",
    "relayd_connections_opened_total",
    "relayd_chunks_in_total",
    "relayd_bytes_in_total",
    "relayd_chunks_delivered_total",
    "relayd_bytes_delivered_total",
    "relayd_redis_batch_size_count",
    "relayd_redis_batch_bytes_total",
    "relayd_redis_batch_seconds_count",
    "relayd_redis_errors_total",
    "relayd_redis_up",
    "relayd_streams_open",
    "relayd_streams_started_total",
    "relayd_streams_ended_total",
    "relayd_stream_duration_seconds_count",
    "relayd_time_to_first_chunk_seconds_count",
    "relayd_ack_latency_seconds_count",
    "relayd_delivery_latency_seconds_count",
    "relayd_auth_failures_total",
    "relayd_bad_frames_total",
    "relayd_bad_http_requests_total",
    "relayd_auth_throttled_total",
    "relayd_consumer_catchups_total",
    "relayd_consumer_gaps_total",
    "relayd_consumer_resets_total",
    "relayd_slow_consumer_disconnects_total",
    "relayd_forced_closes_total",
    "relayd_tcp_connections",
    "relayd_connections_limit",
    "relayd_connections_refused_total",
    "relayd_header_timeouts_total",
    "relayd_subscriptions",
    "relayd_broker_up",
    "relayd_broker_notifications_received_total",
    "relayd_broker_requests_sent_total",
    "relayd_broker_resubscribes_total",
    "relayd_broker_lag_seconds_count",
    "relayd_draining",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape_text(server: Relayd) -> str:
    assert server.session is not None
    async with server.session.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def scrape(server: Relayd) -> Samples:
    return parse(await scrape_text(server))


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; with no labels given, the sum over all of the metric's samples."""
    if labels:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)
    return sum(v for (n, _), v in samples.items() if n == name)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def sse_until_end(session: aiohttp.ClientSession, url: str) -> list[str]:
    """The event names of an SSE response, up to its ``end`` event."""
    events: list[str] = []
    async with session.get(url) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                events.append(line[len("event: ") :])
                if events[-1] == "end":
                    return events
    return events


async def test_every_metric_exists_and_moves_under_real_traffic(config_factory: ConfigFactory) -> None:
    """Connections, appends, live and replayed deliveries, refusals, resets, gaps and catch-ups all show."""
    # a queue of 100 bytes holds about one chunk frame: a burst published in one tick falls back to catch-up
    config = config_factory(consumer={"max_queue_bytes": 100}, streams={"max_chunks": 10})
    async with Relayd(config) as server:
        assert server.session is not None
        before = await scrape(server)
        assert names(before) >= set(DOCUMENTED), set(DOCUMENTED) - names(before)
        assert value(before, "relayd_redis_up") == 1
        assert value(before, "relayd_draining") == 0

        stream = "metrics-live"
        live = await server.consumer(stream)
        await live.expect("subscribed")
        sse = asyncio.create_task(
            sse_until_end(server.session, f"{server.url}/v1/streams/{stream}/events?token={server.token()}")
        )
        producer = await server.producer()
        assert (await producer.open(stream))["type"] == "opened"
        for seq in range(1, 6):  # one at a time: each publication alone in its tick, all live
            ack = await producer.append(stream, seq, {"i": seq})
            assert ack["type"] == "ack", ack
        first = await live.expect("chunk")
        assert first["data"] == {"i": 1}

        during = await scrape(server)
        assert value(during, "relayd_connections", role="producer") == 1
        assert value(during, "relayd_connections", role="consumer_ws") == 1
        assert value(during, "relayd_streams_open") == 1
        assert value(during, "relayd_subscriptions") >= 1

        # a burst in one message: one batch, published in one tick, more than the queue holds
        await producer.send(*({"op": "append", "stream": stream, "seq": s, "chunks": [{"i": s}]} for s in range(6, 16)))
        for _ in range(6, 16):
            assert (await producer.next())["type"] == "ack"
        assert (await producer.end(stream))["type"] == "ended"
        chunks, _ = await collect_chunks(live, stream)
        assert [c["data"]["i"] for c in chunks] == list(range(2, 16))
        assert (await sse)[-1] == "end"

        replay = await server.consumer(stream)  # the ended stream, from Redis
        replayed, _ = await collect_chunks(replay, stream)
        assert len(replayed) == 15
        reset = await server.consumer(stream, cursor="1000-0000000001")  # another generation's cursor
        await reset.expect("subscribed")
        await reset.expect("reset", stream=stream)

        trimmed = "metrics-trimmed"  # max_chunks = 10: Redis drops whole nodes of 100 entries
        await producer.open(trimmed)
        for n in range(3):
            batch = [{"i": i} for i in range(n * 100, n * 100 + 100)]
            assert (await producer.append(trimmed, n * 100 + 1, *batch))["type"] == "ack"
        gap = await server.consumer(trimmed)
        await gap.expect("subscribed")
        await gap.expect("gap", stream=trimmed)

        await producer.send_raw('{"op": "explode"}')
        await producer.expect("error", code="unknown_op")
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await server.producer(api_key="rk_wrong_key_0123456789")

        after = await scrape(server)

        def moved(name: str, by: float | None = None, **labels: str) -> None:
            delta = value(after, name, **labels) - value(before, name, **labels)
            if by is None:
                assert delta > 0, f"{name}{labels} did not move"
            else:
                assert delta == by, f"{name}{labels} moved by {delta}, expected {by}"

        moved("relayd_connections_opened_total", 1, role="producer")  # the refused one is not counted
        moved("relayd_connections_opened_total", 4, role="consumer_ws")
        moved("relayd_connections_opened_total", 1, role="consumer_sse")
        moved("relayd_chunks_in_total", 15 + 300)
        moved("relayd_bytes_in_total")
        moved("relayd_chunks_delivered_total", path="live")
        moved("relayd_chunks_delivered_total", path="replay")
        moved("relayd_bytes_delivered_total", path="live")
        moved("relayd_bytes_delivered_total", path="replay")
        moved("relayd_redis_batch_size_count")
        moved("relayd_redis_batch_bytes_total")
        moved("relayd_redis_batch_seconds_count")
        moved("relayd_streams_started_total", 2)
        moved("relayd_streams_ended_total", 1, reason="completed")
        moved("relayd_stream_duration_seconds_count", 1, reason="completed")
        moved("relayd_time_to_first_chunk_seconds_count", 2)
        moved("relayd_ack_latency_seconds_count", 5 + 10 + 3)  # one per acknowledged append
        moved("relayd_delivery_latency_seconds_count")
        moved("relayd_auth_failures_total", 1, reason="unauthorized")
        moved("relayd_bad_frames_total", 1, code="unknown_op")
        moved("relayd_consumer_catchups_total")
        moved("relayd_consumer_gaps_total", 1)
        moved("relayd_consumer_resets_total", 1)
        assert value(after, "relayd_streams_open") == 1  # metrics-trimmed is still open
        assert value(after, "relayd_redis_errors_total") == 0
        assert value(after, "relayd_redis_up") == 1
        # the latencies are real durations: sums positive, and within the largest finite bucket
        for hist in ("relayd_ack_latency_seconds", "relayd_delivery_latency_seconds"):
            assert 0 < value(after, f"{hist}_sum") < 2.5 * value(after, f"{hist}_count")
            assert value(after, f"{hist}_bucket", le="+Inf") == value(after, f"{hist}_count")

        for peer in (live, replay, reset, gap, producer):
            await peer.ws.close()

        async def all_closed() -> bool:
            now = await scrape(server)
            return all(value(now, "relayd_connections", role=role) == 0 for role in ROLES)

        await poll_until(all_closed, "every connection gauge back to 0")
        assert value(await scrape(server), "relayd_subscriptions") == 0


async def test_labels_come_only_from_bounded_sets(relayd: Relayd) -> None:
    """No stream id reaches a label; every label value is one of a small fixed set."""
    stream = f"secret-stream-{uuid.uuid4().hex}"
    consumer = await relayd.consumer(stream)
    await consumer.expect("subscribed")
    producer = await relayd.producer()
    await producer.open(stream)
    await producer.append(stream, 1, {"i": 1})
    await producer.send_raw('{"op": "append", "stream": "has space", "seq": 1, "chunk": 1}')
    await producer.expect("error")
    await producer.end(stream, reason="error", message=f"failed in {stream}")
    await collect_chunks(consumer, stream)

    text = await scrape_text(relayd)
    assert stream not in text
    allowed = {
        "role": set(ROLES),
        "path": set(PATHS),
        "reason": set(END_REASONS) | set(AUTH_REASONS) | set(FORCED_CLOSE_REASONS),
        "code": {*ERROR_CODES, OTHER},
        "limit": set(CONNECTION_LIMITS),
        "side": set(BACKLOG_SIDES),
    }
    for name, labels in parse(text):
        if not name.startswith("relayd_"):
            continue
        for label, label_value in labels:
            if label == "le":
                float(label_value)  # a bucket bound
            elif label == "version":
                assert name == "relayd_build_info"
            else:
                assert label_value in allowed[label], f"{name}: {label}={label_value!r}"
    await producer.ws.close()
    await consumer.ws.close()


def test_an_unknown_error_code_is_counted_as_other() -> None:
    """A code outside docs/protocol.md's table cannot grow the label set: it counts as ``other``."""
    metrics = Metrics()
    metrics.bad_frame("made_up_code")
    metrics.bad_frame("bad_frame")
    samples = parse(metrics.render().decode())
    assert value(samples, "relayd_bad_frames_total", code="other") == 1
    assert value(samples, "relayd_bad_frames_total", code="bad_frame") == 1
    assert not any(dict(labels).get("code") == "made_up_code" for _, labels in samples)


def test_hot_histograms_count_values_in_the_right_buckets() -> None:
    """The lock-free latency histograms follow Prometheus' rules: ``le`` is inclusive, buckets cumulative."""
    metrics = Metrics()
    for seconds in (0.0001, 0.001, 0.0011, 0.3, 100.0):
        metrics.ack_latency(seconds)
    samples = parse(metrics.render().decode())
    bucket = "relayd_ack_latency_seconds_bucket"
    assert value(samples, bucket, le="0.0005") == 1
    assert value(samples, bucket, le="0.001") == 2
    assert value(samples, bucket, le="0.002") == 3
    assert value(samples, bucket, le="0.5") == 4
    assert value(samples, bucket, le="+Inf") == 5
    assert value(samples, "relayd_ack_latency_seconds_count") == 5
    assert value(samples, "relayd_ack_latency_seconds_sum") == pytest.approx(100.3022)


async def test_promtool_accepts_a_live_scrape(relayd: Relayd) -> None:
    """``promtool check metrics`` finds no error and no lint problem in a scrape taken after traffic."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not installed: run scripts/test.sh (it installs prometheus)"
    consumer = await relayd.consumer("lint")
    await consumer.expect("subscribed")
    producer = await relayd.producer()
    await producer.open("lint")
    await producer.append("lint", 1, {"i": 1})
    await producer.end("lint")
    await collect_chunks(consumer, "lint")
    text = await scrape_text(relayd)
    proc = await asyncio.create_subprocess_exec(promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate(text.encode())
    assert proc.returncode == 0, (out + err).decode()
    assert out == b"" and err == b"", f"promtool lint: {(out + err).decode()}"
    await producer.ws.close()
    await consumer.ws.close()


async def test_redis_outage_turns_redis_up_to_0_and_counts_errors(config_factory: ConfigFactory, tmp_path: Any) -> None:
    """When Redis dies, relayd_redis_up says so (readiness and the write path) and failed round trips count."""
    config = config_factory(redis={"url": "", "retry_ms": 100, "timeout_ms": 500}, embedded={"data_dir": str(tmp_path)})
    async with Relayd(config) as server:
        producer = await server.producer()
        await producer.open("outage")
        assert (await producer.append("outage", 1, {"i": 1}))["type"] == "ack"
        assert value(await scrape(server), "relayd_redis_up") == 1
        embedded = server.server.embedded
        assert embedded is not None
        await asyncio.to_thread(embedded.stop)

        refused = await producer.append("outage", 2, {"i": 2})
        assert refused["type"] == "error" and refused["code"] == "store_unavailable", refused
        samples = await scrape(server)
        assert value(samples, "relayd_redis_up") == 0
        assert value(samples, "relayd_redis_errors_total") >= 1

        assert server.session is not None
        async with server.session.get(f"{server.url}/readyz") as resp:
            assert resp.status == 503
        assert value(await scrape(server), "relayd_redis_up") == 0
        await producer.ws.close()


async def test_draining_is_1_while_relayd_drains(config_factory: ConfigFactory) -> None:
    """relayd_draining turns 1 when a shutdown starts, before connections are told to go."""
    async with Relayd(config_factory()) as server:
        producer: Peer = await server.producer()
        await producer.open("drain")
        runtime = server.server.runtime
        assert runtime is not None
        assert value(parse(runtime.metrics.render().decode()), "relayd_draining") == 0
        stopping = asyncio.create_task(server.server.stop())
        assert await producer.closed() == 1012
        # the listener is closed by now: read the registry the scrape would have rendered
        assert value(parse(runtime.metrics.render().decode()), "relayd_draining") == 1
        with contextlib.suppress(Exception):
            await producer.ws.close()
        await stopping
