#!/usr/bin/env python3
"""The client SDK path, end to end: OpenAI answers -> Producer.stream() -> relayd -> consume().

Workload: N concurrent chat answers (``--answers``, default 200). Each one is a REAL
``openai.AsyncOpenAI`` streaming chat completion from ``examples/fake_openai.py`` (a fake model
server: ``--tokens`` 200 tokens at ``--tps`` 50 tokens/s after ``--ttft-ms`` 200 ms), piped into
relayd by the Python producer SDK, ``await producer.stream(stream_id, openai_stream)`` (the default
``json_encoder``: every chat-completion chunk is stored, so an answer is tokens + 2 chunks: the
role chunk, the tokens, the finish chunk), and read by M consumers per stream (``--consumers``,
default 1) with the Python consumer SDK, ``consume()``. Answer ``i`` starts at ``i/N`` of
``--ramp-s`` (default 1 s), so requests are spread as in a fleet, not all in one millisecond.

The fake model stamps every chunk it yields with ``"i"`` (its index in the answer) and ``"t"``
(``time.time_ns()`` just before writing it); the OpenAI SDK keeps unknown fields and the
``json_encoder`` passes them on, so a consumer computes the model -> consumer latency (one machine,
one clock) and checks every chunk once: duplicates and missing chunks by ``i``.

Processes: relayd alone on core 0 (``--relay-cpu``); Valkey, the fake model(s), the producer
processes (one ``Producer``, i.e. one websocket, each) and the consumer processes on core 1
(``--gen-cpu``). With ``--baseline`` each run first does a pass where the producers only drain the
OpenAI streams (no relayd): the SDK's own CPU per chunk = producer CPU per chunk - baseline's.

    python benchmarks/sdk.py --spawn --runs 3 --baseline
    python benchmarks/sdk.py --spawn --runs 3 --baseline --answers 1000
    python benchmarks/sdk.py --url http://127.0.0.1:8080 --api-key "$KEY" --jwt-secret "$SECRET"

Everything it starts is stopped on exit (Ctrl-C included); every phase has a deadline.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import atexit
import contextlib
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import jwt

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

import fleet  # noqa: E402 - benchmarks/fleet.py: /proc helpers and the spawned Valkey + relayd

DEFAULT_OUT = HERE / "out"
CONNECT_CONCURRENCY = 64


# --------------------------------------------------------------------------------------------
# worker processes (forked; each runs its own event loop)


def _worker(target: Any, *args: Any) -> None:
    fleet.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    conn: Connection = args[-1]
    try:
        import uvloop

        uvloop.run(target(*args))
    except Exception as exc:  # report, do not leave the parent waiting
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


async def _recv(conn: Connection) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


def _stamp_fake_model() -> None:
    """Make the fake model stamp each chunk with its index ``i`` and the time ``t`` it is yielded."""
    import fake_openai

    plain = fake_openai._Plan.chunk

    def stamped(self: Any, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk = plain(self, delta, finish_reason)
        index = self.__dict__.get("_bench_i", 0)
        self.__dict__["_bench_i"] = index + 1
        chunk["i"] = index
        chunk["t"] = time.time_ns()
        return chunk

    fake_openai._Plan.chunk = stamped  # type: ignore[method-assign]


async def model_main(cfg: dict[str, Any], conn: Connection) -> None:
    """One fake OpenAI server; answers ``close`` with its stats and CPU."""
    import fake_openai

    _stamp_fake_model()
    fake = await fake_openai.start_fake_openai(tokens=cfg["tokens"], tokens_per_s=cfg["tps"], ttft_s=cfg["ttft_s"])
    conn.send(("ready", fake.base_url))
    while True:
        msg = await _recv(conn)
        if msg[0] == "cpu":
            conn.send(("cpu", time.process_time()))
        elif msg[0] == "close":
            stats = fake.stats
            conn.send(("stats", {"completed": stats.streams_completed, "aborted": stats.streams_aborted}))
            await fake.close()
            return


async def synthetic_answer(cfg: dict[str, Any]) -> Any:
    """``--source synthetic``: the same chunks as OpenAI SDK objects, built ahead and paced here,
    so the producer process runs little but the relayd SDK (no HTTP, no OpenAI parsing)."""
    from openai.types.chat import ChatCompletionChunk

    loop = asyncio.get_running_loop()
    started = loop.time()
    head = {"id": "chatcmpl-synthetic", "object": "chat.completion.chunk", "created": int(time.time())}
    head |= {"model": "fake-gpt", "system_fingerprint": "fp_relayd_fake"}
    deltas = [{"role": "assistant", "content": "", "refusal": None}]
    deltas += [{"content": f" word{k}"} for k in range(cfg["tokens"])]
    deltas.append({})
    chunks = [
        ChatCompletionChunk.model_validate(
            {**head, "choices": [{"index": 0, "delta": d, "finish_reason": "stop" if k == len(deltas) - 1 else None}]}
        )
        for k, d in enumerate(deltas)
    ]
    for index, chunk in enumerate(chunks):
        due = started + cfg["ttft_s"] + max(0, index - 1) / cfg["tps"]
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        chunk.i = index  # type: ignore[attr-defined]  # extra fields, as the fake model's
        chunk.t = time.time_ns()  # type: ignore[attr-defined]
        yield chunk


async def producer_main(cfg: dict[str, Any], answers: list[tuple[int, str]], conn: Connection) -> None:
    """Run ``answers`` (index, stream id): one AsyncOpenAI stream each, into one Producer."""
    from openai import AsyncOpenAI, Timeout

    from relayd.client import Producer

    # connect=120 s, not the SDK's 5 s: a saturated fake model accepts late, and a request that
    # fails before its stream opens leaves that stream's consumers waiting (not what we measure).
    timeout = Timeout(600.0, connect=120.0)
    models = [AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=timeout) for url in cfg["model_urls"]]
    producer = None if cfg["baseline"] else Producer(cfg["url"], cfg["api_key"], reconnect=False)
    if producer is not None:
        await producer.connect()
    for client in (
        models if cfg["source"] == "openai" else ()
    ):  # warm up: lazy imports, the connection pool, pydantic's first validations
        warm = await client.chat.completions.create(
            model="fake-gpt",
            messages=[{"role": "user", "content": "warm up"}],
            stream=True,
            extra_body={"fake": {"tokens": 3, "tokens_per_s": 0, "ttft_s": 0}},
        )
        async for _ in warm:
            pass
    conn.send(("ready",))
    msg = await _recv(conn)
    start_ns: int = msg[1]
    n, ramp_ns = cfg["answers"], cfg["ramp_s"] * 1e9
    fake = {"tokens": cfg["tokens"], "tokens_per_s": cfg["tps"], "ttft_s": cfg["ttft_s"]}
    errors: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    chunks = 0

    async def answer(i: int, stream: str) -> None:
        nonlocal chunks
        await asyncio.sleep(max(0.0, (start_ns + i * ramp_ns / n - time.time_ns()) / 1e9))  # the schedule
        try:
            if cfg["source"] == "synthetic":
                response: Any = synthetic_answer(cfg)
            else:
                client = models[i % len(models)]
                response = await client.chat.completions.create(
                    model="fake-gpt",
                    messages=[{"role": "user", "content": f"question {i}"}],
                    stream=True,
                    extra_body={"fake": fake},
                )
            if producer is None:
                async for _ in response:
                    chunks += 1
                reasons["drained"] += 1
            else:
                result = await producer.stream(stream, response)
                chunks += result.chunks
                reasons[result.reason] += 1
        except Exception as exc:
            errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1

    await asyncio.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
    cpu0 = time.process_time()
    await asyncio.gather(*(answer(i, s) for i, s in answers))
    cpu1 = time.process_time()
    end_ns = time.time_ns()
    messages = producer.connection.messages_sent if producer is not None else 0
    if producer is not None:
        try:
            await producer.close()
        except Exception as exc:
            errors[f"close: {type(exc).__name__}: {exc}"] += 1
    for client in models:
        await client.close()
    conn.send(
        (
            "result",
            {
                "cpu_s": cpu1 - cpu0,
                "chunks": chunks,
                "messages": messages,
                "reasons": dict(reasons),
                "errors": dict(errors),
                "end_ns": end_ns,
            },
        )
    )


async def consumer_main(cfg: dict[str, Any], subs: list[tuple[int, str]], conn: Connection) -> None:
    """One ``consume()`` per (answer index, stream id): checks every chunk by ``i``, times it."""
    import aiohttp

    from relayd.client import consume

    expected = cfg["tokens"] + 2
    n, ramp_ns = cfg["answers"], cfg["ramp_s"] * 1e9
    lat: array.array[int] = array.array("q")
    ttft: array.array[int] = array.array("q")
    first: array.array[int] = array.array("q")  # the first token's model -> consumer latency
    stats = {"chunks": 0, "duplicates": 0, "missing": 0, "out_of_order": 0, "completed": 0}
    errors: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    incomplete: list[dict[str, Any]] = []
    go = asyncio.get_running_loop().create_future()
    # limit=0: aiohttp's default connector holds at most 100 connections, websockets included, so
    # the 101st consumer on a shared session would wait in ws_connect until another one closes.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30),
    )
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def read(i: int, stream: str, connected: asyncio.Future[None]) -> None:
        seen: set[int] = set()
        last = -1
        ok = False
        c = None
        try:
            async with gate:
                c = consume(cfg["url"], stream, token=cfg["token"], wait_ms=600_000, session=session, max_retries=3)
                await c.__aenter__()
            connected.set_result(None)
            async with c:
                async for data in c:
                    now = time.time_ns()
                    index = data["i"]
                    if index in seen:
                        stats["duplicates"] += 1
                        continue
                    seen.add(index)
                    if index < last:
                        stats["out_of_order"] += 1
                    last = index
                    lat.append(now - data["t"])
                    if index == 1:  # the first content token (0 is the role chunk)
                        ttft.append(now - int(go.result() + i * ramp_ns / n))
                        first.append(now - data["t"])
            ends[c.end.reason if c.end else "none"] += 1
            ok = c.end is not None and c.end.reason == "completed"
        except Exception as exc:
            errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            if not connected.done():
                connected.set_result(None)
        finally:
            stats["chunks"] += len(seen)
            stats["missing"] += len(set(range(expected)) - seen)
            stats["completed"] += ok and len(seen) == expected
            if not ok and len(incomplete) < 10:
                incomplete.append({"stream": stream, "chunks": len(seen), "last_i": last, "end": str(c and c.end)})

    connected = [asyncio.get_running_loop().create_future() for _ in subs]
    tasks = [asyncio.create_task(read(i, s, f)) for (i, s), f in zip(subs, connected, strict=True)]
    await asyncio.gather(*connected)
    conn.send(("ready",))
    msg = await _recv(conn)
    go.set_result(msg[1])
    await asyncio.sleep(max(0.0, (msg[1] - time.time_ns()) / 1e9))
    cpu0 = time.process_time()
    stop = asyncio.ensure_future(_recv(conn))  # the parent's deadline passed: report what we have
    readers = asyncio.gather(*tasks)
    await asyncio.wait([stop, readers], return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    await asyncio.wait([readers])
    cpu1 = time.process_time()
    await session.close()
    conn.send(
        (
            "result",
            {
                **stats,
                "cpu_s": cpu1 - cpu0,
                "lat": lat.tobytes(),
                "ttft": ttft.tobytes(),
                "first": first.tobytes(),
                "ends": dict(ends),
                "errors": dict(errors),
                "incomplete": incomplete,
                "timed_out": stop.done(),
                "end_ns": time.time_ns(),
            },
        )
    )


# --------------------------------------------------------------------------------------------
# one run


class Workers:
    """Forked worker processes with a pipe each; all stopped on exit."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("fork")
        self.procs: list[tuple[Any, Connection]] = []

    def start(self, name: str, target: Any, *args: Any) -> tuple[Any, Connection]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(target, *args, child), daemon=True, name=name)
        proc.start()
        self.procs.append((proc, parent))
        return proc, parent

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc, _ in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        self.procs.clear()


def expect(worker: tuple[Any, Connection], kind: str, deadline: float) -> Any:
    proc, pipe = worker
    msg = fleet.recv(pipe, proc, deadline)
    if msg[0] != kind:
        raise RuntimeError(f"{proc.name}: expected {kind}, got {msg}")
    return msg


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [chunk for chunk in (items[k::parts] for k in range(parts)) if chunk]


def produce_pass(
    args: argparse.Namespace, workers: Workers, cfg: dict[str, Any], consumers: list[Any], pids: dict[str, Any]
) -> dict[str, Any]:
    """Producers (and the given, already connected consumers) from ``go`` to the last result."""
    answers = [(i, f"sdk-{cfg['tag']}-{i}") for i in range(args.answers)]
    producers = [
        workers.start(f"sdk-producer-{k}", producer_main, cfg, part)
        for k, part in enumerate(split(answers, args.producer_procs))
    ]
    setup_deadline = time.monotonic() + 120
    for w in producers:
        expect(w, "ready", setup_deadline)
    start_ns = time.time_ns() + int(args.settle_s * 1e9)
    for _, pipe in producers + consumers:
        pipe.send(("go", start_ns))
    time.sleep(max(0.0, start_ns / 1e9 - time.time()))
    cpu0 = {k: fleet.proc_cpu_s(pids[k]) for k in ("relay", "redis")}
    models_cpu0 = model_cpu(pids["models"])
    cores0 = fleet.cpu_times()
    t0 = time.monotonic()
    # generous: a saturated load generator (the OpenAI SDK alone is ~200 us/chunk) stretches the run
    deadline = t0 + args.ramp_s + args.ttft_ms / 1000 + args.tokens / args.tps * 3 + 60
    deadline += args.answers * (args.tokens + 2) * args.consumers * 0.0005
    prod = [expect(w, "result", deadline)[1] for w in producers]
    cons = []
    for w in consumers:
        try:
            cons.append(expect(w, "result", deadline)[1])
        except TimeoutError:
            w[1].send(("stop",))
            cons.append(expect(w, "result", time.monotonic() + 30)[1])
    elapsed = time.monotonic() - t0
    cpu1 = {k: fleet.proc_cpu_s(pids[k]) for k in ("relay", "redis")}
    out = {
        "elapsed_s": round(elapsed, 2),
        "cores": fleet.core_usage(cores0, fleet.cpu_times()),
        "producers": prod,
        "consumers": cons,
        "models_cpu_s": round(model_cpu(pids["models"]) - models_cpu0, 3),
    }
    for key in ("relay", "redis"):
        out[f"{key}_cpu_s"] = fleet._sub(cpu1[key], cpu0[key])
    for proc, _ in producers:
        proc.join(10)
    return out


def model_cpu(models: list[tuple[Any, Connection]]) -> float:
    total = 0.0
    for w in models:
        w[1].send(("cpu",))
        total += expect(w, "cpu", time.monotonic() + 10)[1]
    return total


def run_once(args: argparse.Namespace, run_no: int, out: Path) -> dict[str, Any]:
    tag = f"A{args.answers}-{time.strftime('%Y%m%d-%H%M%S')}-r{run_no}"
    spawned: fleet.Spawned | None = None
    workers = Workers()
    summary: dict[str, Any] = {"tag": tag, "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    try:
        cfg: dict[str, Any] = {
            "tag": secrets.token_hex(3),
            "answers": args.answers,
            "tokens": args.tokens,
            "tps": args.tps,
            "ttft_s": args.ttft_ms / 1000,
            "ramp_s": args.ramp_s,
            "source": args.source,
        }
        models = [workers.start(f"sdk-model-{k}", model_main, cfg) for k in range(args.model_procs)]
        cfg["model_urls"] = [expect(w, "ready", time.monotonic() + 30)[1] for w in models]
        pids: dict[str, Any] = {"relay": None, "redis": None, "models": models}
        if args.baseline:
            base = produce_pass(args, workers, {**cfg, "baseline": True, "url": "", "api_key": ""}, [], pids)
            chunks = sum(p["chunks"] for p in base["producers"])
            cpu = sum(p["cpu_s"] for p in base["producers"])
            summary["baseline_chunks"] = chunks
            summary["baseline_producer_us_per_chunk"] = round(1e6 * cpu / chunks, 2) if chunks else None
            summary["baseline_model_us_per_chunk"] = round(1e6 * base["models_cpu_s"] / chunks, 2) if chunks else None
            summary["baseline_errors"] = dict(sum((Counter(p["errors"]) for p in base["producers"]), Counter()))
        if args.spawn:
            spawned = fleet.Spawned(args, out, tag)
            spawned.start()
            url, api_key, secret = spawned.url, spawned.api_key, spawned.jwt_secret
            pids["relay"] = spawned.relayd.pid if spawned.relayd else None
            pids["redis"] = spawned.valkey.pid if spawned.valkey else None
            summary["relayd_source"] = spawned.source
        else:
            url, api_key, secret = args.url, args.api_key, args.jwt_secret
            if not api_key or not secret:
                raise SystemExit("--url needs --api-key and --jwt-secret (or RELAYD_API_KEYS / RELAYD_AUTH_JWT_SECRET)")
            port = int(url.rsplit(":", 1)[1].split("/")[0]) if url.count(":") >= 2 else 80
            pids["relay"] = args.relay_pid or fleet.pid_listening_on(port)
            pids["redis"] = args.redis_pid or fleet.pid_by_name(("valkey-server", "redis-server"))
        now = int(time.time())
        claims = {"streams": ["*"], "rights": ["read"], "aud": args.jwt_audience, "iat": now, "exp": now + 3600}
        cfg.update(url=url, api_key=api_key, token=jwt.encode(claims, secret, algorithm="HS256"), baseline=False)
        subs = [(i, f"sdk-{cfg['tag']}-{i}") for i in range(args.answers) for _ in range(args.consumers)]
        consumers = [
            workers.start(f"sdk-consumer-{k}", consumer_main, cfg, part)
            for k, part in enumerate(split(subs, args.consumer_procs))
        ]
        for w in consumers:
            expect(w, "ready", time.monotonic() + 120)
        real = produce_pass(args, workers, cfg, consumers, pids)
        for w in models:
            w[1].send(("close",))
        model_stats = [expect(w, "stats", time.monotonic() + 30)[1] for w in models]
        summary.update(summarise(args, real, model_stats))
        summary["relay_alive"] = spawned is None or (spawned.relayd is not None and spawned.relayd.poll() is None)
        summary["relay_peak_rss_mib"] = round((fleet.proc_status_kib(pids["relay"], "VmHWM") or 0) / 1024, 1)
        if args.baseline and summary.get("baseline_producer_us_per_chunk") is not None:
            summary["sdk_overhead_us_per_chunk"] = round(
                summary["producer_us_per_chunk"] - summary["baseline_producer_us_per_chunk"], 2
            )
    finally:
        workers.stop()
        if spawned is not None:
            spawned.stop()
    summary["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    return summary


def summarise(args: argparse.Namespace, real: dict[str, Any], model_stats: list[dict[str, Any]]) -> dict[str, Any]:
    prod, cons = real["producers"], real["consumers"]
    lat: array.array[int] = array.array("q")
    ttft: array.array[int] = array.array("q")
    first: array.array[int] = array.array("q")
    for c in cons:
        lat.frombytes(c["lat"])
        ttft.frombytes(c["ttft"])
        first.frombytes(c["first"])
    lat_s, ttft_s, first_s = sorted(lat), sorted(ttft), sorted(first)
    stored = sum(p["chunks"] for p in prod)
    delivered = sum(c["chunks"] for c in cons)
    prod_cpu = sum(p["cpu_s"] for p in prod)
    cons_cpu = sum(c["cpu_s"] for c in cons)
    reasons = sum((Counter(p["reasons"]) for p in prod), Counter())
    ends = sum((Counter(c["ends"]) for c in cons), Counter())
    expected = args.answers * (args.tokens + 2)

    def ms(v: float | None) -> float | None:
        return round(v / 1e6, 1) if v is not None else None

    def per(cpu: float | None, n: int) -> float | None:
        return round(1e6 * cpu / n, 2) if cpu is not None and n else None

    return {
        "answers": args.answers,
        "consumers_per_stream": args.consumers,
        "tokens": args.tokens,
        "tps": args.tps,
        "ttft_ms_model": args.ttft_ms,
        "chunks_per_answer": args.tokens + 2,
        "elapsed_s": real["elapsed_s"],
        "answers_completed": reasons.get("completed", 0),
        "answers_fully_delivered": sum(c["completed"] for c in cons) // max(args.consumers, 1),
        "model_streams_completed": sum(s["completed"] for s in model_stats),
        "chunks_expected": expected,
        "chunks_stored": stored,
        "chunks_delivered": delivered,
        "duplicates": sum(c["duplicates"] for c in cons),
        "missing": sum(c["missing"] for c in cons),
        "out_of_order": sum(c["out_of_order"] for c in cons),
        "consumer_ends": dict(ends),
        "producer_errors": dict(sum((Counter(p["errors"]) for p in prod), Counter())),
        "consumer_errors": dict(sum((Counter(c["errors"]) for c in cons), Counter())),
        "consumers_timed_out": any(c["timed_out"] for c in cons),
        "incomplete_sample": [x for c in cons for x in c["incomplete"]][:10],
        "latency_p50_ms": ms(fleet.pct(lat_s, 0.5)),
        "latency_p99_ms": ms(fleet.pct(lat_s, 0.99)),
        "latency_max_ms": ms(float(lat_s[-1]) if lat_s else None),
        "ttft_p50_ms": ms(fleet.pct(ttft_s, 0.5)),
        "ttft_p99_ms": ms(fleet.pct(ttft_s, 0.99)),
        "first_token_latency_p50_ms": ms(fleet.pct(first_s, 0.5)),
        "first_token_latency_p99_ms": ms(fleet.pct(first_s, 0.99)),
        "relay_cpu_us_per_chunk": per(real["relay_cpu_s"], stored),
        "relay_cpu_pct": round(100 * real["relay_cpu_s"] / real["elapsed_s"], 1) if real["relay_cpu_s"] else None,
        "redis_cpu_pct": round(100 * real["redis_cpu_s"] / real["elapsed_s"], 1) if real["redis_cpu_s"] else None,
        "producer_messages": sum(p["messages"] for p in prod),
        "chunks_per_producer_message": round(stored / max(1, sum(p["messages"] for p in prod)), 1),
        "producer_us_per_chunk": per(prod_cpu, stored),
        "producer_cpu_pct": round(100 * prod_cpu / real["elapsed_s"], 1),
        "consumer_us_per_chunk": per(cons_cpu, delivered),
        "consumer_cpu_pct": round(100 * cons_cpu / real["elapsed_s"], 1),
        "model_us_per_chunk": per(real["models_cpu_s"], stored),
        "cores": real["cores"],
    }


# --------------------------------------------------------------------------------------------
# reporting

TABLE = [
    ("answers_completed", "answers completed"),
    ("chunks_delivered", "chunks delivered"),
    ("duplicates", "duplicates"),
    ("missing", "missing"),
    ("latency_p50_ms", "model -> consumer p50 ms"),
    ("latency_p99_ms", "model -> consumer p99 ms"),
    ("ttft_p50_ms", "TTFT at consumer p50 ms"),
    ("ttft_p99_ms", "TTFT at consumer p99 ms"),
    ("first_token_latency_p50_ms", "first token model -> consumer p50"),
    ("first_token_latency_p99_ms", "first token model -> consumer p99"),
    ("relay_cpu_us_per_chunk", "relay CPU us/chunk"),
    ("relay_cpu_pct", "relay CPU % of a core"),
    ("producer_us_per_chunk", "producer process us/chunk"),
    ("baseline_producer_us_per_chunk", "baseline (drain only) us/chunk"),
    ("sdk_overhead_us_per_chunk", "producer SDK overhead us/chunk"),
    ("consumer_us_per_chunk", "consumer process us/chunk"),
    ("chunks_per_producer_message", "chunks per producer message"),
    ("model_us_per_chunk", "fake model us/chunk"),
    ("elapsed_s", "streaming time s"),
]


def print_summary(s: dict[str, Any]) -> None:
    print(
        f"\n== sdk {s['tag']}: {s['answers']} answers x {s['chunks_per_answer']} chunks @ {s['tps']} tokens/s, "
        f"{s['consumers_per_stream']} consumer(s) each =="
    )
    print(
        f"answers completed {s['answers_completed']} (fully delivered {s['answers_fully_delivered']}); chunks "
        f"stored {s['chunks_stored']}/{s['chunks_expected']}, delivered {s['chunks_delivered']}; duplicates "
        f"{s['duplicates']}, missing {s['missing']}, out of order {s['out_of_order']}; ends {s['consumer_ends']}"
    )
    print(
        f"latency model -> consumer p50 {s['latency_p50_ms']} ms, p99 {s['latency_p99_ms']}, max "
        f"{s['latency_max_ms']}; TTFT at the consumer p50 {s['ttft_p50_ms']} ms, p99 {s['ttft_p99_ms']} "
        f"(model ttft {s['ttft_ms_model']} ms); first token model -> consumer p50 "
        f"{s['first_token_latency_p50_ms']} ms, p99 {s['first_token_latency_p99_ms']}"
    )
    print(
        f"CPU us/chunk: relay {s['relay_cpu_us_per_chunk']} ({s['relay_cpu_pct']}% of core), producer process "
        f"{s['producer_us_per_chunk']} ({s['producer_cpu_pct']}%), baseline {s.get('baseline_producer_us_per_chunk')}"
        f" -> SDK overhead {s.get('sdk_overhead_us_per_chunk')}; consumer {s['consumer_us_per_chunk']} "
        f"({s['consumer_cpu_pct']}%), fake model {s['model_us_per_chunk']}; redis {s['redis_cpu_pct']}%; "
        f"producer messages {s['producer_messages']} ({s['chunks_per_producer_message']} chunks each)"
    )
    print(
        "cores: "
        + ", ".join(f"{k} busy {v['busy_pct']}%" for k, v in s["cores"].items())
        + f"; loadavg before {s['loadavg_before']} after {s['loadavg_after']}; elapsed {s['elapsed_s']} s"
    )
    for key in ("producer_errors", "consumer_errors", "baseline_errors", "incomplete_sample"):
        if s.get(key):
            print(f"{key}: {s[key]}")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med: dict[str, Any] = {"kind": "median", "runs": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
            if values:
                med[key] = round(statistics.median(values), 2)
    med["duplicates_total"] = sum(r["duplicates"] for r in runs)
    med["missing_total"] = sum(r["missing"] for r in runs)
    return med


def pin_sdk(ref: str) -> None:
    """Import relayd (the client SDK included) in the workers from a snapshot of ``ref``, not the
    work tree, which other sessions may be editing while we measure."""
    snap = Path(tempfile.mkdtemp(prefix="relayd-sdk-bench-"))
    atexit.register(shutil.rmtree, snap, True)
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref, "relayd"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive.stdout, check=True)
    sys.path.insert(0, str(snap))
    for name in [m for m in sys.modules if m == "relayd" or m.startswith("relayd.")]:
        del sys.modules[name]
    import relayd

    assert Path(relayd.__file__).is_relative_to(snap), relayd.__file__


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=200, help="concurrent chat answers (streams)")
    ap.add_argument("--consumers", type=int, default=1, help="consumers per stream")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    ap.add_argument("--tps", type=float, default=50.0, help="tokens/s per answer")
    ap.add_argument("--ttft-ms", type=float, default=200.0, help="the fake model's time to first token")
    ap.add_argument("--ramp-s", type=float, default=1.0, help="answer i starts at i/N of this")
    ap.add_argument("--runs", type=int, default=1, help="runs (fresh servers each); medians are printed")
    ap.add_argument(
        "--source",
        choices=("openai", "synthetic"),
        default="openai",
        help="openai: AsyncOpenAI streams from the fake model; synthetic: prebuilt chunk objects (SDK cost alone)",
    )
    ap.add_argument("--baseline", action="store_true", help="also a drain-only pass per run: SDK overhead")
    ap.add_argument("--producer-procs", type=int, default=2, help="producer processes (one Producer each)")
    ap.add_argument("--consumer-procs", type=int, default=1, help="consumer processes")
    ap.add_argument("--model-procs", type=int, default=1, help="fake model server processes")
    ap.add_argument("--settle-s", type=float, default=1.0, help="pause between connecting and the first request")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spawn", action="store_true", help="start Valkey + relayd (pinned) for each run")
    mode.add_argument("--url", help="target a running relayd, e.g. http://127.0.0.1:8080")
    ap.add_argument("--api-key", default=(os.environ.get("RELAYD_API_KEYS", "").split(",") or [""])[0])
    ap.add_argument("--jwt-secret", default=os.environ.get("RELAYD_AUTH_JWT_SECRET", ""))
    ap.add_argument("--jwt-audience", default="relayd")
    ap.add_argument("--relay-pid", type=int, default=None, help="--url mode: relayd's pid (default: port owner)")
    ap.add_argument("--redis-pid", type=int, default=None, help="--url mode: Redis pid (default: by name)")
    ap.add_argument("--relay-cpu", default="0", help="--spawn: core for relayd (taskset -c)")
    ap.add_argument("--aux-cpu", default="1", help="--spawn: core for Valkey")
    ap.add_argument("--gen-cpu", default="1", help="core(s) for the fake model, producers and consumers")
    ap.add_argument("--valkey-aof", choices=("no", "everysec"), default="no")
    ap.add_argument("--relay-log-level", default="warning")
    ap.add_argument("--relay-env", action="append", default=[], help="extra NAME=VALUE for relayd (--spawn)")
    ap.add_argument(
        "--relayd-ref", default=None, help="run relayd/ (server and client SDK) as of this git commit (git archive)"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    # Consumers subscribe before their stream exists; on a saturated generator an answer may open
    # more than the default 30 s later, and relayd would answer stream_not_found.
    args.relay_env.insert(0, "RELAYD_STREAMS_WAIT_TIMEOUT_MS=600000")
    if min(args.answers, args.producer_procs, args.consumer_procs, args.model_procs, args.tokens) < 1:
        ap.error("--answers, --tokens and the process counts must be >= 1")

    fleet.stop_on_signals()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.relayd_ref:
        pin_sdk(args.relayd_ref)
    if args.gen_cpu and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {int(c) for c in args.gen_cpu.split(",")})  # inherited by the workers

    def report(med: dict[str, Any]) -> None:
        print(f"\n== medians of {args.runs} runs, {args.answers} answers ==")
        for key, label in TABLE:
            print(f"  {label:34s} {med.get(key)}")
        print(f"  {'duplicates / missing (all runs)':34s} {med['duplicates_total']} / {med['missing_total']}")

    return fleet.run_series(
        args.runs,
        lambda n: run_once(args, n, args.out),
        print_summary,
        medians,
        report,
        args.out / "sdk-results.jsonl",
    )


if __name__ == "__main__":
    sys.exit(main())
