"""The asyncio producer SDK (relayd.client.Producer) against a real relayd and a real Valkey.

Where a test must see or disturb the wire (count websocket messages, hold acks back, drop a
connection), the Producer talks to relayd through :class:`IngestProxy`, a real websocket proxy
on port 0; everything else connects straight to relayd. Results are checked by replaying each
stream through a consumer websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionChunk

from relayd.auth import hash_api_key
from relayd.client import (
    ChunkTooLarge,
    ConnectionFailed,
    Producer,
    ProducerClosed,
    ProducerFenced,
    Refused,
    StreamAlreadyEnded,
    StreamEndedByServer,
    Unauthorized,
    json_encoder,
    text_encoder,
)
from relayd.config import Config
from relayd.embedded import EmbeddedRedis
from relayd.protocol import split_message
from tests.helpers import API_KEY, Relayd, collect_chunks, make_config, poll_until

ConfigFactory = Callable[..., Config]
EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")  # fake_openai.py


# --- helpers ----------------------------------------------------------------------------------


class IngestProxy:
    """A websocket proxy for ``/v1/ingest``: records what the producer sends, can hold acks (or
    every frame relayd sends: ``swallow``), can drop."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.messages: list[list[dict[str, Any]]] = []  # producer -> relayd, one list of frames per message
        self.sizes: list[int] = []  # bytes of each of those messages
        self.connections = 0
        self.hold_acks = False
        self.held_ack_seq: dict[str, int] = {}
        self.swallow = False  # withhold every frame relayd sends (they are recorded in ``swallowed``)
        self.swallowed: list[dict[str, Any]] = []
        self.drop_appends = False  # close the producer's connection on any message with an append
        self.changed = asyncio.Event()
        self._client: web.WebSocketResponse | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> IngestProxy:
        app = web.Application()
        app.router.add_get("/v1/ingest", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None and self._http is not None
        await self._runner.cleanup()
        await self._http.close()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    def appends(self, messages: list[list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
        return [f for m in (self.messages if messages is None else messages) for f in m if f["op"] == "append"]

    async def drop(self) -> None:
        """Close the producer's connection from the server side, as a network failure would."""
        assert self._client is not None
        await self._client.close(code=1011)

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        assert self._http is not None
        client = web.WebSocketResponse()
        await client.prepare(request)
        self._client = client
        self.connections += 1
        headers = {"Authorization": request.headers["Authorization"]}
        async with self._http.ws_connect(f"{self.target}/v1/ingest", headers=headers) as upstream:

            async def to_relayd() -> None:
                async for msg in client:
                    self.messages.append([orjson.loads(line) for line in split_message(msg.data)])
                    self.sizes.append(len(msg.data.encode()))
                    self.changed.set()
                    if self.drop_appends and any(f["op"] == "append" for f in self.messages[-1]):
                        await client.close(code=1011)
                        return
                    await upstream.send_str(msg.data)

            async def to_producer() -> None:
                async for msg in upstream:
                    frames: list[str] = []
                    for line in split_message(msg.data):
                        frame = orjson.loads(line)
                        if self.swallow:
                            self.swallowed.append(frame)
                        elif self.hold_acks and frame["type"] == "ack":
                            self.held_ack_seq[frame["stream"]] = frame["seq"]
                        else:
                            frames.append(line if isinstance(line, str) else line.decode())
                    self.changed.set()
                    if frames:
                        await client.send_str("\n".join(frames))

            tasks = [asyncio.create_task(to_relayd()), asyncio.create_task(to_producer())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            code = upstream.close_code
        # Pass relayd's close code on (1009, 1012 ...); 1005/1006 cannot be sent in a close frame.
        await client.close(code=code if code is not None and code not in (1005, 1006) else 1000)
        self.changed.set()
        return client


async def replay(server: Relayd, stream: str) -> tuple[list[Any], dict[str, Any]]:
    """Every chunk's data of ``stream`` from the start, and its end frame."""
    async with await server.consumer(stream) as consumer:
        chunks, end = await collect_chunks(consumer, stream)
    return [c["data"] for c in chunks], end


@dataclass
class Delta:
    text: str


# --- batching, encoders, ends -----------------------------------------------------------------


async def test_many_streams_share_one_connection_and_batch_per_tick(relayd: Relayd) -> None:
    """Chunks queued in one tick, over many streams, go out in a few messages with one append per stream."""
    streams = [f"batch-{i}" for i in range(20)]
    async with IngestProxy(relayd.url) as proxy, Producer(proxy.url, API_KEY) as p:
        writers = [p.writer(s) for s in streams]
        for i in range(50):  # no await that yields in between: one event-loop tick
            for w in writers:
                await w.send({"i": i})
        results = await asyncio.gather(*(w.end() for w in writers))
    assert proxy.connections == 1
    first = proxy.messages[0]
    assert [f["op"] for f in first] == ["open", "append"] * 20
    assert all(len(f["chunks"]) == 50 and f["seq"] == 1 for f in first if f["op"] == "append")
    assert len(proxy.appends()) == 20  # 1000 chunks in 20 appends, all in the first message
    assert len(proxy.messages) <= 21  # then the ends, each once its stream is acknowledged
    assert {r.reason for r in results} == {"completed"} and {r.chunks for r in results} == {50}
    for s in streams:
        data, end = await replay(relayd, s)
        assert data == [{"i": i} for i in range(50)] and end["reason"] == "completed"


async def test_stream_from_async_generator_and_sync_iterable(relayd: Relayd) -> None:
    """stream() takes async and sync iterables, runs items through the encoder and skips empty chunks."""

    async def tokens() -> AsyncIterator[Any]:
        yield Delta("Hel")  # a dataclass: asdict
        yield ""  # skipped
        yield None  # skipped
        yield {"delta": "lo"}

    chunk = ChatCompletionChunk.model_validate(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
        }
    )
    role_only = chunk.model_copy(update={"choices": [chunk.choices[0].model_copy(update={"delta": {}})]})
    async with Producer(relayd.url, API_KEY) as p:
        first = await p.stream("gen-1", tokens())
        second = await p.stream("text-1", ["a", "", chunk, role_only, "b"], content_type="text")
        third = await p.stream("sdk-1", [chunk])
    assert (first.reason, first.chunks, second.chunks) == ("completed", 2, 3)
    assert (await replay(relayd, "gen-1"))[0] == [{"text": "Hel"}, {"delta": "lo"}]
    assert (await replay(relayd, "text-1"))[0] == ["a", "Hi", "b"]
    data, end = await replay(relayd, "sdk-1")
    assert data == [json_encoder(chunk)]
    assert data[0]["choices"][0]["finish_reason"] is None  # a null that was set is kept
    assert "system_fingerprint" not in data[0]  # a field never set is not invented
    assert end["cursor"] == third.cursor
    assert text_encoder({"type": "content_block_delta", "delta": {"text": "x"}}) == "x"


@contextlib.asynccontextmanager
async def recording_proxy(target: str) -> AsyncIterator[tuple[str, bytearray]]:
    """An HTTP proxy on port 0 in front of ``target`` (a base URL); yields its URL and the bytes of
    every response body that went through it, as they went."""
    record = bytearray()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            aiohttp.ClientSession() as http,
            http.request(request.method, target + request.path_qs, headers=headers, data=await request.read()) as up,
        ):
            response = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers["Content-Type"]})
            await response.prepare(request)
            async for part in up.content.iter_any():
                record.extend(part)
                await response.write(part)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", record
    finally:
        await runner.cleanup()


async def test_openai_chunks_are_stored_as_the_model_sent_them(relayd: Relayd, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real openai SDK streaming from the fake model: every stored chunk equals, field for
    field, the JSON the model sent for it, nulls included (finish_reason, logprobs, usage)."""
    monkeypatch.syspath_prepend(EXAMPLES)
    from fake_openai import start_fake_openai

    fake = await start_fake_openai(tokens=30)
    try:
        async with (
            recording_proxy(fake.base_url.removesuffix("/v1")) as (proxy_url, body),
            openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="x", max_retries=0) as client,
        ):
            upstream = await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            async with Producer(relayd.url, API_KEY) as p:
                await p.stream("oa-1", upstream)
    finally:
        await fake.close()
    events = bytes(body).decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    sent = [orjson.loads(event.removeprefix("data: ")) for event in events[:-2]]
    stored, _ = await replay(relayd, "oa-1")
    assert len(stored) == len(sent) == 1 + 30 + 1 + 1  # role, tokens, finish, usage
    assert stored == sent
    assert [c["choices"][0]["finish_reason"] for c in stored[:-1]] == [None] * 31 + ["stop"]
    assert all("usage" in c and "logprobs" in c["choices"][0] for c in stored[:-1])


async def test_stream_error_ends_the_stream_with_the_message_and_reraises(relayd: Relayd) -> None:
    """An upstream exception ends the stream `error` with str(exc), then is raised (or returned)."""

    async def failing() -> AsyncIterator[str]:
        yield "one"
        raise RuntimeError("model timed out")

    async with Producer(relayd.url, API_KEY, content_type="text") as p:
        with pytest.raises(RuntimeError, match="model timed out"):
            await p.stream("err-1", failing())
        result = await p.stream("err-2", failing(), raise_on_error=False)
        async with p.writer("err-3") as w:
            await w.send("x")
            with contextlib.suppress(ValueError):
                raise ValueError("bad input")  # handled: the writer still completes
        with pytest.raises(KeyError):
            async with p.writer("err-4") as w:
                await w.send("y")
                raise KeyError("boom")
    assert result.reason == "error" and isinstance(result.error, RuntimeError)
    for stream, message in (("err-1", "model timed out"), ("err-2", "model timed out"), ("err-4", "'boom'")):
        _, end = await replay(relayd, stream)
        assert end["reason"] == "error" and end["message"] == message, end
    assert (await replay(relayd, "err-3"))[1]["reason"] == "completed"


async def test_refusals_surface_as_exceptions(relayd: Relayd, config_factory: ConfigFactory) -> None:
    """A bad API key, a takeover (fenced) and an ended stream raise the matching ClientError."""
    with pytest.raises(Unauthorized):
        async with Producer(relayd.url, "rk_wrong"):
            pass
    with pytest.raises(ConnectionFailed):
        async with Producer("http://127.0.0.1:1", API_KEY, reconnect=False):
            pass
    async with Producer(relayd.url, API_KEY) as p1, Producer(relayd.url, API_KEY) as p2:
        w1 = p1.writer("fence-1")
        await w1.send(1)
        await w1.flush()
        async with p2.writer("fence-1") as w2:  # takes the stream over: epoch 2
            await w2.send(2)
            await w2.flush()
            with pytest.raises(ProducerFenced):
                await w1.send(3)
                await w1.flush()
            raised = []
            for _ in range(2):  # each raise is a fresh copy caused by the stored failure
                with pytest.raises(ProducerFenced) as fenced:
                    await w1.send(4)
                raised.append(fenced.value)
            assert raised[0] is not raised[1] and raised[0].__cause__ is raised[1].__cause__ is w1.failure
            assert str(raised[0]) == str(w1.failure) and raised[0].code == "fenced"
        with pytest.raises(StreamAlreadyEnded):
            async with p1.writer("fence-1") as again:
                await again.send(4)
                await again.flush()
        big = p1.writer("big-1")
        with pytest.raises(Refused) as refused:
            await big.send("x" * 300_000)  # over limits.max_chunk_bytes
            await big.flush()
        assert refused.value.code == "chunk_too_large"
        with pytest.raises(Refused):
            await big.end()  # a refused chunk never ends `completed`
    assert (await replay(relayd, "fence-1"))[0] == [1, 2]
    assert (await replay(relayd, "big-1"))[1]["reason"] == "error"


# --- reconnects ---------------------------------------------------------------------------------


async def test_reconnects_across_a_relayd_restart_without_loss_or_duplicates(config_factory: ConfigFactory) -> None:
    """relayd restarts on the same port mid-stream: the Producer re-opens with its epoch and resends."""
    server = Relayd(config_factory())
    await server.__aenter__()
    port = server.server.port
    try:
        producer = Producer(server.url, API_KEY, backoff_initial_s=0.02, backoff_max_s=0.2)
        async with producer as p, p.writer("restart-1") as w:
            for i in range(50):
                await w.send(i)
            await w.flush()

            async def keep_sending() -> None:
                for i in range(50, 300):
                    await w.send(i)
                    await asyncio.sleep(0)  # spread the sends over the restart

            sender = asyncio.create_task(keep_sending())
            await server.__aexit__()  # graceful stop: drains, closes the producer with 1012
            server = Relayd(config_factory(server={"port": port}))
            await server.__aenter__()
            await sender
        data, end = await replay(server, "restart-1")
        assert data == list(range(300)) and end["reason"] == "completed"
    finally:
        await server.__aexit__()


async def test_lost_acks_cause_no_duplicates(relayd: Relayd) -> None:
    """Stored but unacknowledged chunks are not resent: the re-open's `seq` says what relayd has."""
    async with IngestProxy(relayd.url) as proxy, Producer(proxy.url, API_KEY, backoff_initial_s=0.02) as p:
        w = p.writer("lost-1")
        proxy.hold_acks = True
        for i in range(10):
            await w.send(i)
        await proxy.wait_for(lambda: proxy.held_ack_seq.get("lost-1") == 10)  # stored; acks swallowed
        assert p.unacked_bytes > 0
        first_connection = len(proxy.messages)
        await proxy.drop()
        proxy.hold_acks = False
        for i in range(10, 20):
            await w.send(i)
        result = await w.end()
    assert proxy.connections == 2 and result.chunks == 20
    resent = proxy.appends(proxy.messages[first_connection:])
    assert resent and min(f["seq"] for f in resent) == 11  # nothing at or below what relayd reported
    reopen = next(f for m in proxy.messages[first_connection:] for f in m if f["op"] == "open")
    assert reopen["epoch"] == 1
    assert (await replay(relayd, "lost-1"))[0] == list(range(20))


async def test_drop_before_the_first_opened_causes_no_duplicates(relayd: Relayd) -> None:
    """The connection drops after relayd stored the first round trip but before ``opened`` came back.

    The SDK has no epoch yet; it re-opens with the same producer id, which relayd resumes (epoch
    1, the last stored seq) instead of taking over, so the stored chunks are not stored again.
    """
    async with IngestProxy(relayd.url) as proxy, Producer(proxy.url, API_KEY, backoff_initial_s=0.02) as p:
        proxy.swallow = True
        w = p.writer("first-trip-1")
        for i in range(5):
            await w.send(i)

        def stored_all() -> bool:
            return any(f["type"] == "ack" and f["seq"] == 5 for f in proxy.swallowed)

        await proxy.wait_for(stored_all)  # open and appends stored; nothing came back
        assert proxy.swallowed[0]["type"] == "opened" and p.unacked_bytes > 0
        first_connection = len(proxy.messages)
        await proxy.drop()
        proxy.swallow = False
        for i in range(5, 10):
            await w.send(i)
        result = await w.end()
    assert proxy.connections == 2 and result.chunks == 10
    assert (await replay(relayd, "first-trip-1"))[0] == list(range(10))
    meta = await relayd.relay.read_meta("first-trip-1")
    assert meta is not None and meta.epoch == 1 and meta.status == "completed", meta
    first_open = next(f for m in proxy.messages for f in m if f["op"] == "open")
    reopen = next(f for m in proxy.messages[first_connection:] for f in m if f["op"] == "open")
    assert "epoch" not in reopen and reopen["producer"] == first_open["producer"], (first_open, reopen)
    resent = proxy.appends(proxy.messages[first_connection:])
    assert resent and min(f["seq"] for f in resent) == 6  # resumed after what relayd had stored


async def test_gives_up_after_the_reconnect_timeout(config_factory: ConfigFactory) -> None:
    """With relayd gone for longer than reconnect_timeout_s, writers get ConnectionFailed."""
    server = Relayd(config_factory())
    await server.__aenter__()
    p = Producer(server.url, API_KEY, backoff_initial_s=0.02, backoff_max_s=0.05, reconnect_timeout_s=0.3)
    await p.connect()
    w = p.writer("gone-1")
    await w.send(1)
    await w.flush()
    await server.__aexit__()
    with pytest.raises(ConnectionFailed) as failed:
        await w.send(2)
        await w.end()
    assert failed.value.attempts >= 2
    with pytest.raises(ConnectionFailed):
        await p.close()


async def test_a_chunk_too_large_for_a_message_is_refused_by_that_send_only(relayd: Relayd) -> None:
    """A chunk that cannot fit max_message_bytes raises ChunkTooLarge from its send; the stream,
    the other streams and the connection go on, and batches are split below the limit."""
    limit = 4096
    async with IngestProxy(relayd.url) as proxy, Producer(proxy.url, API_KEY, max_message_bytes=limit) as p:
        big, other = p.writer("too-big-1"), p.writer("too-big-2")
        await big.send("before")
        with pytest.raises(ChunkTooLarge) as refused:
            await big.send("x" * limit)
        assert isinstance(refused.value, ValueError) and refused.value.size > limit == refused.value.limit
        for i in range(40):  # 40 x ~1 kB in one tick: more than one message's worth per stream
            await big.send(f"{i:04d}" + "y" * 1000)
            await other.send(i)
        assert big.failure is None
        results = [await big.end(), await other.end()]
    assert [r.reason for r in results] == ["completed", "completed"] and results[0].chunks == 41
    assert proxy.connections == 1
    assert max(proxy.sizes) <= limit and len(proxy.messages) > 10
    data, _ = await replay(relayd, "too-big-1")
    assert data == ["before"] + [f"{i:04d}" + "y" * 1000 for i in range(40)]
    assert (await replay(relayd, "too-big-2"))[0] == list(range(40))


async def test_a_connection_dropped_after_every_resend_gives_up_at_the_reconnect_timeout(relayd: Relayd) -> None:
    """A connection that drops right after each resend is one outage (a handshake is not progress):
    the reconnects back off, and reconnect_timeout_s after the first drop ConnectionFailed."""
    async with IngestProxy(relayd.url) as proxy:
        p = Producer(proxy.url, API_KEY, backoff_initial_s=0.05, backoff_max_s=0.2, reconnect_timeout_s=1.0)
        await p.connect()
        w = p.writer("quick-drop-1")
        await w.send(0)
        await w.flush()
        loop = asyncio.get_running_loop()
        started = loop.time()
        proxy.drop_appends = True
        await w.send(1)
        async with asyncio.timeout(15):
            with pytest.raises(ConnectionFailed):
                await w.flush()
        elapsed = loop.time() - started
        assert 0.9 <= elapsed < 5, elapsed
        assert 3 <= proxy.connections <= 30  # backed off, not a tight loop
        with pytest.raises(ConnectionFailed):
            await p.close()


async def test_relayd_closing_1009_lowers_the_message_size_and_fails_only_the_oversized_stream(
    config_factory: ConfigFactory,
) -> None:
    """max_message_bytes above relayd's max_frame_bytes: on 1009 the Producer halves its messages;
    the stream whose chunk cannot fit fails with ChunkTooLarge, the other streams go on."""
    config = config_factory(limits={"max_frame_bytes": 64 * 1024, "max_chunk_bytes": 32 * 1024})
    async with Relayd(config) as relayd, IngestProxy(relayd.url) as proxy:
        async with Producer(proxy.url, API_KEY, backoff_initial_s=0.05, backoff_max_s=0.2) as p:
            good, bad = p.writer("frame-1"), p.writer("frame-2")
            await good.send(0)
            await good.flush()
            await bad.send("z" * 100_000)  # fits the Producer's 512 kB messages, not relayd's 64 kB frames
            for _ in range(39):
                await good.send("g" * 2000)
            async with asyncio.timeout(15):
                with pytest.raises(ChunkTooLarge):
                    await bad.flush()
                result = await good.end()
            with pytest.raises(ChunkTooLarge):
                await bad.end()  # ends `error`, raising why
        assert result.reason == "completed" and result.chunks == 40
        assert proxy.connections <= 6  # 512 kB -> 256 -> 128 -> 64 -> 32: a few 1009s, no more
        assert len((await replay(relayd, "frame-1"))[0]) == 40
        assert (await replay(relayd, "frame-2"))[1]["reason"] == "error"


async def test_store_unavailable_resynchronises_the_stream(
    private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str
) -> None:
    """Appends refused during a Redis outage are resent after a re-open: in order, once each."""
    config = make_config(private_redis.url, key_prefix, str(tmp_path), redis={"retry_ms": 200, "timeout_ms": 300})
    async with Relayd(config) as relayd, IngestProxy(relayd.url) as proxy:
        async with Producer(proxy.url, API_KEY, backoff_initial_s=0.05) as p:
            w = p.writer("outage-1")
            await w.send(0)
            await w.flush()
            await asyncio.to_thread(private_redis.stop)
            for i in range(1, 6):
                await w.send(i)

            def reopened() -> bool:
                return sum(1 for m in proxy.messages for f in m if f["op"] == "open") >= 2

            await proxy.wait_for(reopened)  # refused: the SDK re-opens to resync
            await asyncio.to_thread(private_redis.start)  # same data dir: the AOF brings the stream back
            result = await w.end()
        assert proxy.connections == 1 and result.chunks == 6
        assert (await replay(relayd, "outage-1"))[0] == list(range(6))


# --- flow control -------------------------------------------------------------------------------


async def test_send_blocks_while_the_ack_window_is_full(relayd: Relayd) -> None:
    """With acks held back, send() stops once max_unacked_bytes are unacknowledged and resumes on acks."""
    window = 1000
    chunk = "x" * 98  # 100 bytes of JSON
    seen: list[int] = []
    async with IngestProxy(relayd.url) as proxy, Producer(proxy.url, API_KEY, max_unacked_bytes=window) as p:
        w = p.writer("window-1")
        proxy.hold_acks = True

        async def send_all() -> None:
            for _ in range(100):
                await w.send(chunk)
                seen.append(p.unacked_bytes)

        sender = asyncio.create_task(send_all())
        await proxy.wait_for(lambda: proxy.held_ack_seq.get("window-1") == 10)
        assert not sender.done() and len(seen) == 10 and p.unacked_bytes == window  # blocked in send()
        proxy.hold_acks = False
        await proxy.drop()  # the held acks are gone; the re-open tells what relayd stored
        await sender
        await w.end()
    assert max(seen) <= window and len(seen) == 100
    assert (await replay(relayd, "window-1"))[0] == [chunk] * 100


# --- cancel and tee -----------------------------------------------------------------------------


class SDKStream:
    """The shape of an SDK response stream (OpenAI ``AsyncStream``): iterable, closed by an async ``close()``."""

    def __init__(self, items: AsyncIterator[str]) -> None:
        self._items = items
        self.closed = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self._items

    async def close(self) -> None:
        await self._items.aclose()  # type: ignore[attr-defined]
        self.closed = True


@pytest.mark.parametrize("shape", ["async_generator", "sdk_stream"])
async def test_cancel_from_a_consumer_closes_the_upstream_and_ends_cancelled(relayd: Relayd, shape: str) -> None:
    """A consumer's cancel reaches stream(): the upstream is closed, the stream ends `cancelled`."""
    closed = asyncio.Event()
    callbacks: list[str] = []
    stream = f"cancel-{shape}"

    async def answer() -> AsyncIterator[str]:
        try:
            yield "a"
            yield "b"
            await asyncio.Event().wait()  # a model that thinks forever
            yield "never"
        finally:
            closed.set()

    source: Any = answer() if shape == "async_generator" else SDKStream(answer())
    token = relayd.token([stream], ("read", "cancel"))
    async with await relayd.consumer(stream, token=token) as consumer:
        await consumer.expect("subscribed")
        async with Producer(relayd.url, API_KEY, content_type="text") as p:
            task = asyncio.create_task(p.stream(stream, source, on_cancel=lambda: callbacks.append("x")))
            assert (await consumer.expect("chunk"))["data"] == "a"
            assert (await consumer.expect("chunk"))["data"] == "b"
            await consumer.send({"op": "cancel", "stream": stream})
            result = await task
        assert result.reason == "cancelled" and closed.is_set() and callbacks == ["x"]
        assert shape != "sdk_stream" or source.closed
        frames, end = await consumer.until("end")
        assert [f["type"] for f in frames] == ["cancel_requested"] and end["reason"] == "cancelled"


async def test_cancelling_the_streaming_task_ends_the_stream_cancelled(relayd: Relayd) -> None:
    """If the task running stream() is cancelled, the upstream is closed and the stream ends `cancelled`."""
    closed = asyncio.Event()
    started = asyncio.Event()

    async def answer() -> AsyncIterator[str]:
        try:
            yield "a"
            started.set()
            await asyncio.Event().wait()
            yield "never"
        finally:
            closed.set()

    async with Producer(relayd.url, API_KEY, content_type="text") as p:
        task = asyncio.create_task(p.stream("task-cancel", answer()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # leaving the Producer waited for the queued end and the upstream's close
    assert closed.is_set()
    data, end = await replay(relayd, "task-cancel")
    assert data == ["a"] and end["reason"] == "cancelled"


async def _serve(handler: Callable[[web.Request], Any]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/chat", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/chat"


@pytest.mark.parametrize("how", ["disconnect", "stop_iterating"])
async def test_tee_keeps_relaying_when_the_http_side_goes_away(relayd: Relayd, how: str) -> None:
    """The HTTP client disconnects (handler cancelled) or the handler stops iterating: relayd still gets it all."""
    resume = asyncio.Event()
    handler_done = asyncio.Event()
    stream = f"tee-{how}"

    async def upstream() -> AsyncIterator[str]:
        for i in range(30):
            if i == 5:
                await resume.wait()
            yield f"t{i} "

    async with Producer(relayd.url, API_KEY, content_type="text") as p:

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            try:
                async for item in p.tee(stream, upstream(), buffer=2):
                    await response.write(item.encode())
                    if how == "stop_iterating" and item == "t2 ":
                        break  # no aclose(): the iterator is just dropped
            finally:
                handler_done.set()
            return response

        runner, url = await _serve(handler)
        try:
            async with aiohttp.ClientSession() as http, http.get(url) as response:
                received = b""
                while received.count(b" ") < 3:
                    received += await response.content.readany()
                response.close()  # the browser tab went away
            await handler_done.wait()
            gc.collect()
            resume.set()
        finally:
            await runner.cleanup()
    # leaving the Producer waited for the tee task
    data, end = await replay(relayd, stream)
    assert data == [f"t{i} " for i in range(30)] and end["reason"] == "completed"


async def test_tee_yields_every_item_to_a_reader_that_stays(relayd: Relayd) -> None:
    """A reader that stays gets every item, and the result once the relay side ended."""

    async def upstream() -> AsyncIterator[dict[str, int]]:
        for i in range(20):
            yield {"i": i}

    async with Producer(relayd.url, API_KEY) as p:
        tee = p.tee("tee-full", upstream(), buffer=3)
        items = [item async for item in tee]
        await tee.task
    assert items == [{"i": i} for i in range(20)]
    assert tee.result is not None and tee.result.reason == "completed" and tee.result.chunks == 20


async def test_close_cancels_a_tee_still_running_after_close_timeout(relayd: Relayd) -> None:
    """A tee whose upstream never ends does not hold close() for ever: after close_timeout_s the
    relay side is cancelled, its stream ends cancelled, and the HTTP side gets ProducerClosed."""
    hung = asyncio.Event()

    async def upstream() -> AsyncIterator[str]:
        yield "first"
        hung.set()
        await asyncio.Event().wait()  # a model stream that stalls for good
        yield "never"

    p = Producer(relayd.url, API_KEY, close_timeout_s=0.5)
    await p.connect()
    tee = p.tee("tee-hung", upstream())
    assert await anext(tee) == "first"
    await hung.wait()
    reading = asyncio.create_task(anext(tee))
    async with asyncio.timeout(10):
        await p.close()
    with pytest.raises(ProducerClosed):
        await reading
    data, end = await replay(relayd, "tee-hung")
    assert data == ["first"] and end["reason"] == "cancelled"


async def test_consumer_peer_sees_live_chunks(relayd: Relayd) -> None:
    """Chunks reach a live consumer as they are acknowledged (not only at the end)."""
    async with await relayd.consumer("live-1") as consumer:
        await consumer.expect("subscribed")
        async with Producer(relayd.url, API_KEY) as p, p.writer("live-1") as w:
            await w.send({"n": 1})
            assert (await consumer.expect("chunk"))["data"] == {"n": 1}
            assert w.cursor is None or w.cursor.endswith("1")
        await consumer.expect("end", reason="completed")


def test_the_sdk_imports_only_relayd_core_modules() -> None:
    """relayd.client depends on protocol/auth/errors only: no engine, no server, no redis."""
    code = "import sys, relayd.client; print(' '.join(sorted(sys.modules)))"
    modules = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    relayd_modules = {m for m in modules if m.startswith("relayd.") and not m.startswith("relayd.client")}
    assert relayd_modules <= {"relayd.auth", "relayd.errors", "relayd.model", "relayd.protocol"}, relayd_modules
    assert "redis" not in modules


# --- an operator ends the stream (relayd streams end) -----------------------------------------

ADMIN_KEY = "rk_admin_producer_test_0123456789"


@pytest.fixture
async def admin_relayd(config_factory: ConfigFactory) -> AsyncIterator[Relayd]:
    """relayd with an admin key, for ending streams through the admin API as `relayd streams end` does."""
    async with Relayd(config_factory(auth={"admin_keys": [hash_api_key(ADMIN_KEY)]})) as server:
        yield server


async def operator_end(server: Relayd, stream: str, reason: str, message: str) -> None:
    assert server.session is not None
    async with server.session.post(
        f"{server.url}/v1/admin/streams/{stream}/end",
        json={"reason": reason, "message": message},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as resp:
        assert resp.status == 200, await resp.text()


async def test_operator_end_stops_stream_with_its_own_outcome(admin_relayd: Relayd) -> None:
    """`relayd streams end` mid-stream: stream() stops iterating, closes the source, calls on_cancel and
    returns the operator's reason with ended_by_server (a StreamEndedByServer with the message); nothing raises."""
    halfway, source_closed, on_cancel_called = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def thinking_model() -> AsyncIterator[str]:
        try:
            for i in range(5):
                yield f"t{i} "
            halfway.set()
            await asyncio.Event().wait()  # the model thinks until it is stopped
        finally:
            source_closed.set()

    async with Producer(admin_relayd.url, API_KEY, content_type="text") as p:
        task = asyncio.create_task(p.stream("op-1", thinking_model(), on_cancel=on_cancel_called.set))
        await halfway.wait()
        await p.flush()
        await operator_end(admin_relayd, "op-1", "error", "stopped by ops")
        result = await task
    assert source_closed.is_set() and on_cancel_called.is_set()
    assert (result.reason, result.chunks, result.error) == ("error", 5, None)
    ended = result.ended_by_server
    assert isinstance(ended, StreamEndedByServer)
    assert (ended.reason, ended.message, ended.stream, ended.cursor) == (
        "error",
        "stopped by ops",
        "op-1",
        result.cursor,
    )
    assert "relayd ended stream op-1 error: stopped by ops" in str(ended)
    data, end = await replay(admin_relayd, "op-1")
    assert data == [f"t{i} " for i in range(5)] and end["reason"] == "error"


async def test_operator_end_sets_the_writers_cancelled_event_and_sends_raise_it(admin_relayd: Relayd) -> None:
    """A writer whose stream an operator ended: `cancelled` is set, `ended_by_server` says why, a later
    send raises StreamEndedByServer (not ProducerClosed), and leaving the block ends nothing more."""
    async with Producer(admin_relayd.url, API_KEY) as p:
        async with p.writer("op-2") as w:
            await w.send({"n": 1})
            await w.flush()
            await operator_end(admin_relayd, "op-2", "cancelled", "")
            await w.cancelled.wait()
            assert w.ended_by_server is not None and w.ended_by_server.reason == "cancelled"
            with pytest.raises(StreamEndedByServer, match="relayd ended stream op-2 cancelled") as raised:
                await w.send({"n": 2})
            assert not isinstance(raised.value, ProducerClosed)
            result = await w.end()
        assert (result.reason, result.ended_by_server) == ("cancelled", w.ended_by_server)


async def test_a_writer_that_ignores_a_cancel_learns_when_relayd_ends_the_stream(
    config_factory: ConfigFactory,
) -> None:
    """A writer that goes on after a consumer's cancel: streams.cancel_grace_ms later relayd ends the
    stream, and the writer is told at once (ended_by_server, reason cancelled), not by a refusal."""
    server = Relayd(config_factory(streams={"cancel_grace_ms": 200}))
    async with server, Producer(server.url, API_KEY) as p, p.writer("cx-grace") as w:
        await w.send({"n": 1})
        await w.flush()
        consumer = await server.consumer("cx-grace", token=server.token(["cx-grace"], ("read", "cancel")))
        await consumer.expect("subscribed", stream="cx-grace")
        await consumer.send({"op": "cancel", "stream": "cx-grace"})
        await w.cancelled.wait()  # asked: this writer does nothing about it
        assert w.ended_by_server is None
        _chunks, end = await collect_chunks(consumer, "cx-grace")  # relayd ends it after the grace
        assert end["reason"] == "cancelled"
        await poll_until(lambda: w.ended_by_server is not None, "the writer to hear the end")
        assert w.ended_by_server is not None
        assert (w.ended_by_server.reason, w.ended_by_server.message) == ("cancelled", "cancelled by a consumer")
        assert w.ended_by_server.cursor == end["cursor"]
        with pytest.raises(StreamEndedByServer):
            await w.send({"n": 2})


async def test_push_example_exits_cleanly_when_an_operator_ends_its_stream(admin_relayd: Relayd) -> None:
    """examples/push.py, a plain `await producer.stream(...)` caller, exits 0 and reports the end."""
    env = {**os.environ, "RELAYD_URL": admin_relayd.url, "RELAYD_API_KEY": API_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(EXAMPLES) / "push.py"), "op-push",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        async with await admin_relayd.consumer("op-push", wait_ms="10000") as consumer:
            _, first = await consumer.until("chunk")  # the example is streaming
        assert first["data"]
        await operator_end(admin_relayd, "op-push", "cancelled", "maintenance")
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert stdout.decode().startswith("op-push: cancelled after "), stdout
    assert b"Traceback" not in stderr
