"""The browser client (relayd/web/static/relayd-client.js) in a real headless Chromium.

relayd runs in the test's event loop against the session's Valkey; the producer is a raw
protocol peer; the page (tests/browser/pages/client.html) imports the client from relayd's
/v1/client.js and renders what it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis.asyncio as aioredis
from playwright.async_api import Page, WebSocket

from relayd.auth import TokenAuthority
from relayd.config import Config
from relayd.store.keys import Keys
from tests.browser.conftest import PageServer
from tests.helpers import JWT_SECRET, Peer, Relayd


async def open_page(page: Page, page_server: PageServer, relayd_url: str, stream: str, **params: str) -> None:
    """Load the test page following ``stream`` and wait until it is subscribed (or already over)."""
    query = urlencode({"relayd": relayd_url, "stream": stream, **params})
    await page.goto(f"{page_server.url}/client.html?{query}")
    await page.wait_for_function("window.sub && ['live', 'ended', 'closed'].includes(window.sub.status)")


async def wait_text(page: Page, text: str) -> None:
    await page.wait_for_function("expected => window.relaydTest.text === expected", arg=text)


async def wait_failure(page: Page) -> tuple[str, str]:
    """Wait until the iterator threw; the codes it threw and ``ended`` rejected with."""
    await page.wait_for_function("window.relaydTest.iterError !== null && window.relaydTest.error !== null")
    thrown, rejected = await page.evaluate("[window.relaydTest.iterError, window.relaydTest.error.code]")
    assert await page.evaluate("window.sub.status") == "closed"
    return thrown, rejected


async def wait_end(page: Page) -> dict[str, Any]:
    await page.wait_for_function("window.relaydTest.end !== null && window.relaydTest.done")
    end: dict[str, Any] = await page.evaluate("window.relaydTest.end")
    return end


async def producer_for(relayd: Relayd, stream: str) -> Peer:
    peer = await relayd.producer()
    opened = await peer.open(stream)
    assert opened["type"] == "opened", opened
    return peer


async def append(peer: Peer, stream: str, seq: int, *chunks: Any) -> None:
    ack = await peer.append(stream, seq, *chunks)
    assert ack["type"] == "ack", ack


async def test_chunks_appended_while_the_page_is_open_render_in_order_then_the_end(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    sockets: list[WebSocket] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    async with await producer_for(relayd, "live") as producer:
        await append(producer, "live", 1, "Hel")  # before the page: replayed
        await open_page(page, page_server, relayd.url, "live")
        await wait_text(page, "Hel")
        await append(producer, "live", 2, {"t": "lo"})
        await wait_text(page, "Hello")
        await append(producer, "live", 3, ",", " wor", "ld")  # several frames in one message
        await wait_text(page, "Hello, world")
        ended = await producer.end("live", "completed")
    end = await wait_end(page)
    assert end == {"reason": "completed", "cursor": ended["cursor"]}
    assert await page.text_content("#end") == "completed"
    assert await page.evaluate("[window.sub.status, window.sub.cursor]") == ["ended", ended["cursor"]]
    assert await page.evaluate("window.relaydTest.chunks") == ["Hel", {"t": "lo"}, ",", " wor", "ld"]
    # The token went in the subprotocol, not the URL; the client closed the socket after the end.
    assert len(sockets) == 1 and "token" not in sockets[0].url
    if not sockets[0].is_closed():
        await sockets[0].wait_for_event("close")


async def test_a_reload_mid_stream_resumes_from_the_stored_cursor(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    stream = "reload"
    async with await producer_for(relayd, stream) as producer:
        await append(producer, stream, 1, "a", "b")
        await open_page(page, page_server, relayd.url, stream, persist="session")
        await wait_text(page, "ab")
        await append(producer, stream, 3, "c")
        await wait_text(page, "abc")
        stored = await page.evaluate(f"sessionStorage.getItem('relayd:cursor:{stream}')")
        assert stored == await page.evaluate("window.sub.cursor")

        reload = asyncio.create_task(page.reload())
        await append(producer, stream, 4, "d", "e")  # while the page reloads
        await reload
        await page.wait_for_function("window.sub && window.sub.status === 'live'")
        await append(producer, stream, 6, "f")
        await wait_text(page, "abcdef")
        ended = await producer.end(stream, "completed")
    await wait_end(page)
    # Every chunk exactly once: the reloaded page got only what came after the stored cursor
    # ("d" and "e" may have reached the old page before it unloaded).
    assert await page.evaluate("window.relaydTest.text") == "abcdef"
    assert await page.evaluate("window.relaydTest.chunks") in (["d", "e", "f"], ["f"])
    # After the end the stored cursor is the end's: another reload replays nothing, gets the end.
    assert await page.evaluate(f"sessionStorage.getItem('relayd:cursor:{stream}')") == ended["cursor"]
    await page.reload()
    end = await wait_end(page)
    assert end["reason"] == "completed"
    assert await page.evaluate("[window.relaydTest.chunks, window.relaydTest.text]") == [[], "abcdef"]


class DropProxy:
    """A TCP proxy (in front of relayd, or of Redis) whose connections can be cut without a close
    frame, blackholed, or refused."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.muted: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.refusing = False  # new connections are closed at once (the target is down)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> DropProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.drop()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    def drop(self) -> None:
        """What a dead network does: both sides' sockets vanish (RST), no websocket close."""
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def blackhole(self) -> None:
        """What a half-open connection does (a sleeping laptop, an expired NAT entry, a host gone):
        the open connections stay open at both ends but carry nothing more, either way. New
        connections go through."""
        self.muted.update(self.writers)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if dst in self.muted:
                    continue  # lost on the way
                dst.write(data)
                await dst.drain()
        if dst not in self.muted:  # a blackholed peer never hears of the other end closing
            dst.transport.abort()


async def test_after_a_network_drop_and_a_server_side_close_the_page_resumes_without_duplicates(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    stream = "drop"
    runtime = relayd.server.runtime
    assert runtime is not None
    async with DropProxy(relayd.server.port) as proxy, await producer_for(relayd, stream) as producer:
        # The module comes through the proxy too, so its default url is the proxy's origin.
        await open_page(page, page_server, proxy.url, stream)
        await append(producer, stream, 1, "1,", "2,")
        await wait_text(page, "1,2,")

        async with page.expect_websocket() as reconnected:
            proxy.drop()
            await append(producer, stream, 3, "3,", "4,")  # while the page is cut off
        await reconnected.value
        await append(producer, stream, 5, "5,")
        await wait_text(page, "1,2,3,4,5,")

        async with page.expect_websocket() as reconnected:
            for close in list(runtime.consumers):  # relayd tells the page to go away (1012)
                await close()
            await append(producer, stream, 6, "6,")
        await reconnected.value
        await append(producer, stream, 7, "7,", "8")
        await producer.end(stream, "completed")
        await wait_end(page)
    assert await page.evaluate("window.relaydTest.text") == "1,2,3,4,5,6,7,8"
    assert len(await page.evaluate("window.relaydTest.chunks")) == 8


async def test_a_silently_dead_connection_is_detected_by_the_heartbeat_and_resumed(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    """A half-open connection delivers nothing and never closes: the page's pings go unanswered,
    so after twice heartbeatMs of silence it reconnects by itself and resumes from its cursor."""
    stream = "blackhole"
    pings = 0
    three_pings = asyncio.Event()

    def on_frame_sent(payload: str | bytes) -> None:
        nonlocal pings
        if json.loads(payload) == {"op": "ping"}:
            pings += 1
            if pings == 3:
                three_pings.set()

    def on_websocket(ws: WebSocket) -> None:
        ws.on("framesent", on_frame_sent)

    page.on("websocket", on_websocket)
    async with DropProxy(relayd.server.port) as proxy, await producer_for(relayd, stream) as producer:
        await open_page(page, page_server, proxy.url, stream, heartbeat_ms="1500")
        await append(producer, stream, 1, "1,", "2,")
        await wait_text(page, "1,2,")
        # Idle but answered: the third ping goes out after a check that found the pongs (silence
        # alone would have ended the connection by then), on the first socket still.
        await asyncio.wait_for(three_pings.wait(), timeout=20)
        assert await page.evaluate("[window.relaydTest.sockets.length, window.sub.status]") == [1, "live"]

        async with page.expect_websocket(timeout=20_000) as reconnected:
            proxy.blackhole()
            await append(producer, stream, 3, "3,", "4,")  # relayd sends them into the void
        await reconnected.value
        await wait_text(page, "1,2,3,4,")
        await append(producer, stream, 5, "5")
        await producer.end(stream, "completed")
        await wait_end(page)
    assert await page.evaluate("window.relaydTest.chunks") == ["1,", "2,", "3,", "4,", "5"]
    assert await page.evaluate("window.relaydTest.sockets.length") == 2


async def test_during_a_redis_outage_the_reconnects_back_off_then_resume(
    page: Page, page_server: PageServer, config_factory: Callable[..., Config], redis_server: str
) -> None:
    """relayd answers `subscribed` before its catch-up read, which fails while Redis is down: that
    `subscribed` must not reset the backoff, or the page would retry every 25-50 ms throughout."""
    stream = "outage"
    redis_port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    async with DropProxy(redis_port) as redis_proxy:
        redis = {"url": f"redis://127.0.0.1:{redis_proxy.url.rsplit(':', 1)[1]}", "timeout_ms": 500, "retry_ms": 100}
        async with Relayd(config_factory(redis=redis)) as server:
            async with await producer_for(server, stream) as producer:
                await append(producer, stream, 1, "a", "b")
                await producer.end(stream, "completed")
            redis_proxy.refusing = True
            redis_proxy.drop()
            await open_page(page, page_server, server.url, stream)  # backoff 50 ms .. 1 s
            await page.wait_for_function("window.relaydTest.sockets.length >= 6", timeout=20_000)
            opened = await page.evaluate("window.relaydTest.sockets")
            assert await page.evaluate("window.relaydTest.chunks") == []
            # The 6th connect waits for the 5th delay: drawn between half and all of 50 ms * 2^4.
            assert opened[5] - opened[4] >= 400, opened

            redis_proxy.refusing = False
            await wait_end(page)
    assert await page.evaluate("window.relaydTest.chunks") == ["a", "b"]


async def test_stop_sends_cancel_to_the_producer_and_the_page_shows_cancelled(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    stream = "stop"
    async with await producer_for(relayd, stream) as producer:
        await append(producer, stream, 1, "thinking")
        await open_page(page, page_server, relayd.url, stream, rights="read,cancel")
        await wait_text(page, "thinking")
        await page.click("#stop")
        assert await producer.next() == {"type": "cancel", "stream": stream}
        ended = await producer.end(stream, "cancelled")
        assert ended["type"] == "ended"
    end = await wait_end(page)
    assert end["reason"] == "cancelled"
    assert await page.text_content("#end") == "cancelled"
    assert await page.evaluate("window.relaydTest.cancel") == "requested"


async def test_stop_without_the_cancel_right_is_refused_and_the_stream_goes_on(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    stream = "stop-refused"
    async with await producer_for(relayd, stream) as producer:
        await open_page(page, page_server, relayd.url, stream, rights="read")
        await page.click("#stop")
        await page.wait_for_function("window.relaydTest.cancel !== null")
        assert await page.evaluate("window.relaydTest.cancel") == "refused:forbidden"
        await append(producer, stream, 1, "still here")
        await wait_text(page, "still here")
        await producer.end(stream, "completed")
    assert (await wait_end(page))["reason"] == "completed"


async def test_a_short_lived_token_is_refreshed_on_the_open_connection(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    stream = "refresh"
    sockets: list[WebSocket] = []
    received: list[str] = []

    def on_websocket(ws: WebSocket) -> None:
        sockets.append(ws)
        ws.on("framereceived", lambda payload: received.append(str(payload)))

    page.on("websocket", on_websocket)
    async with await producer_for(relayd, stream) as producer:
        await append(producer, stream, 1, "before ")
        # The refresh is due a third of the lifetime before `exp`: 7 s leaves over 2 s for the fetch
        # and the `auth` op even on a loaded machine, for each of the two refreshes waited for below.
        await open_page(page, page_server, relayd.url, stream, ttl_s="7")
        await wait_text(page, "before ")
        first_expiry = page_server.minted[0]["expires_at"]
        # Wait (on the page's clock) until the first token is well past its expiry.
        await page.wait_for_function(
            "exp => Date.now() / 1000 > exp + 0.5 && window.relaydTest.tokens >= 3", arg=first_expiry, timeout=25_000
        )
        assert time.time() > first_expiry
        await append(producer, stream, 2, "after")
        await wait_text(page, "before after")
        await producer.end(stream, "completed")
    assert (await wait_end(page))["reason"] == "completed"
    # One connection throughout: each new token went as an `auth` op, relayd never closed it.
    assert len(sockets) == 1
    authed = [json.loads(line) for msg in received for line in msg.split("\n") if '"authed"' in line]
    assert len(authed) >= 2 and all(frame["expires_at"] > first_expiry for frame in authed)


async def test_aborting_the_signal_closes_the_connection(page: Page, page_server: PageServer, relayd: Relayd) -> None:
    stream = "abort"
    async with await producer_for(relayd, stream) as producer:
        await append(producer, stream, 1, "x")
        sockets: list[WebSocket] = []
        page.on("websocket", lambda ws: sockets.append(ws))
        await open_page(page, page_server, relayd.url, stream)
        await wait_text(page, "x")
        async with sockets[0].expect_event("close"):
            await page.click("#abort")
        await page.wait_for_function("window.relaydTest.done && window.relaydTest.error !== null")
        assert await page.evaluate("[window.sub.status, window.relaydTest.error.code]") == ["closed", "closed"]
        assert await page.evaluate("window.relaydTest.iterError") is None  # the loop just ended
        await producer.end(stream, "completed")


def openai_chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "choices": choices, **extra}


OPENAI_CHUNKS = [
    openai_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
    openai_chunk([{"index": 0, "delta": {"content": "Bonjour"}}]),
    openai_chunk([{"index": 0, "delta": {"content": " le monde"}}]),
    openai_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    openai_chunk([], usage={"total_tokens": 9}),
]


async def test_text_deltas_of_openai_chunks(page: Page, page_server: PageServer, relayd: Relayd) -> None:
    stream = "openai"
    async with await producer_for(relayd, stream) as producer:
        await append(producer, stream, 1, *OPENAI_CHUNKS)
        await producer.end(stream, "completed")
    await open_page(page, page_server, relayd.url, stream, mode="openai")
    await wait_end(page)
    assert await page.evaluate("window.relaydTest.chunks") == ["Bonjour", " le monde"]
    shapes = await page.evaluate(
        """async (base) => {
            const { openaiText } = await import(`${base}/v1/client.js`);
            return [
                openaiText({ choices: [{ delta: { content: "chat" } }] }),
                openaiText({ choices: [{ text: "legacy" }] }),
                openaiText({ type: "response.output_text.delta", delta: "responses" }),
                openaiText("plain"),
                openaiText({ choices: [{ delta: { tool_calls: [] } }] }),
                openaiText(null),
            ];
        }""",
        relayd.url,
    )
    assert shapes == ["chat", "legacy", "responses", "plain", "", ""]


async def test_the_decoder_maps_each_chunk(page: Page, page_server: PageServer, relayd: Relayd) -> None:
    async with await producer_for(relayd, "decoded") as producer:
        await append(producer, "decoded", 1, "abc", "def")
        await producer.end("decoded", "completed")
    await open_page(page, page_server, relayd.url, "decoded", decoder="upper")
    await wait_end(page)
    assert await page.evaluate("window.relaydTest.chunks") == ["ABC", "DEF"]


async def test_a_refused_token_is_replaced_through_fetch_token(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    """Close 4001 (a token relayd cannot verify): the page asks for a new one and reconnects."""
    sockets: list[WebSocket] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    async with await producer_for(relayd, "bad-token") as producer:
        await append(producer, "bad-token", 1, "ok")
        await producer.end("bad-token", "completed")
    await open_page(page, page_server, relayd.url, "bad-token", token="bad")
    assert (await wait_end(page))["reason"] == "completed"
    assert await page.evaluate("[window.relaydTest.text, window.relaydTest.tokens]") == ["ok", 1]
    assert len(sockets) == 2


async def test_a_fetched_token_that_is_refused_too_ends_the_subscription(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    """Asking the backend again cannot help when its fresh token is refused: no endless loop."""
    page_server.tokens = TokenAuthority(secret="not-relayds-secret-0123456789abcdef", max_ttl_s=600)
    await open_page(page, page_server, relayd.url, "wrong-secret")
    assert await wait_failure(page) == ("unauthorized", "unauthorized")
    assert await page.evaluate("window.relaydTest.tokens") == 1


async def test_without_fetch_token_an_expired_token_ends_the_subscription(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    async with await producer_for(relayd, "expiring") as producer:
        await append(producer, "expiring", 1, "a")
        await open_page(page, page_server, relayd.url, "expiring", token="static", ttl_s="1")
        assert await wait_failure(page) == ("token_expired", "token_expired")
        assert await page.evaluate("window.relaydTest.text") in ("", "a")


async def test_a_failing_fetch_token_is_retried_with_a_growing_backoff_up_to_max_retries(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    await open_page(page, page_server, relayd.url, "no-token", token="failing", max_retries="3")
    thrown, rejected = await wait_failure(page)
    assert (thrown, rejected) == ("retries_exhausted", "retries_exhausted")
    assert "the token backend is down" in await page.evaluate("window.relaydTest.error.message")
    assert await page.evaluate("[window.relaydTest.tokens, window.relaydTest.sockets.length]") == [4, 0]

    # Without maxRetries it keeps trying, each wait drawn between half and all of a doubling delay.
    query = urlencode({"relayd": relayd.url, "stream": "no-token", "token": "failing"})
    await page.goto(f"{page_server.url}/client.html?{query}")
    await page.wait_for_function("window.relaydTest?.tokens >= 6", timeout=20_000)
    times = await page.evaluate("window.relaydTest.tokenTimes")
    assert times[5] - times[4] >= 400, times  # 50 ms * 2^4 / 2
    assert await page.evaluate("window.sub.status") == "reconnecting"


async def test_a_token_valid_for_longer_than_the_timer_range_is_not_refreshed_at_once(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    """A refresh due in more than 2^31-1 ms (~24.8 days) must not overflow setTimeout and fire at once."""
    page_server.tokens = TokenAuthority(secret=JWT_SECRET, max_ttl_s=40 * 86_400)
    async with await producer_for(relayd, "long-token") as producer:
        await append(producer, "long-token", 1, "a")
        await open_page(page, page_server, relayd.url, "long-token", ttl_s=str(30 * 86_400))
        await wait_text(page, "a")
        await append(producer, "long-token", 2, "b")
        await wait_text(page, "ab")
        await producer.end("long-token", "completed")
    await wait_end(page)
    assert await page.evaluate("window.relaydTest.tokens") == 1


async def test_a_stream_that_never_appears_ends_with_stream_not_found(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    await open_page(page, page_server, relayd.url, "nobody", wait_ms="0")
    assert await wait_failure(page) == ("stream_not_found", "stream_not_found")


async def test_trimmed_history_is_a_gap_error_unless_the_page_accepts_the_loss(
    page: Page, page_server: PageServer, config_factory: Callable[..., Config]
) -> None:
    stream = "trimmed"
    async with Relayd(config_factory(streams={"max_chunks": 10})) as server:
        async with await producer_for(server, stream) as producer:
            first = await producer.append(stream, 1, "1,")
            for seq in range(2, 1001, 100):
                await append(producer, stream, seq, *(f"{i}," for i in range(seq, seq + 100)))
            await producer.end(stream, "completed")

        await open_page(page, page_server, server.url, stream, cursor=first["cursor"])
        assert await wait_failure(page) == ("gap", "gap")
        assert await page.evaluate("window.relaydTest.chunks") == []

        await open_page(page, page_server, server.url, stream, cursor=first["cursor"], onloss="1")
        await wait_end(page)
        losses = await page.evaluate("window.relaydTest.losses")
        assert len(losses) == 1 and losses[0]["code"] == "gap" and losses[0]["cursor"] == first["cursor"]
        chunks = await page.evaluate("window.relaydTest.chunks")
        oldest = int(chunks[0].rstrip(","))
        assert oldest > 2 and chunks == [f"{i}," for i in range(oldest, 1002)]


async def test_a_replaced_stream_is_a_reset_error_unless_the_page_accepts_the_loss(
    page: Page, page_server: PageServer, relayd: Relayd, redis_server: str, key_prefix: str
) -> None:
    stream = "replaced"
    keys = Keys(key_prefix)
    async with await producer_for(relayd, stream) as producer:
        old = await producer.append(stream, 1, "old1", "old2")
        rds = aioredis.Redis.from_url(redis_server)
        try:
            assert await rds.delete(keys.log(stream), keys.meta(stream)) == 2  # lost: expired, flushed
        finally:
            await rds.aclose()
        await producer.open(stream)
        await append(producer, stream, 1, "new1", "new2")
        await producer.end(stream, "completed")

    await open_page(page, page_server, relayd.url, stream, cursor=old["cursor"])
    assert await wait_failure(page) == ("reset", "reset")

    await open_page(page, page_server, relayd.url, stream, cursor=old["cursor"], onloss="1")
    await wait_end(page)
    assert [loss["code"] for loss in await page.evaluate("window.relaydTest.losses")] == ["reset"]
    assert await page.evaluate("window.relaydTest.chunks") == ["new1", "new2"]


def docs_example_html() -> str:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "clients.md").read_text()
    browser_section = doc[doc.index("## Browser client") :]
    html = browser_section[browser_section.index("```html\n") + 8 :]
    return html[: html.index("```\n")]


async def test_the_example_page_in_the_docs_works(page: Page, page_server: PageServer, relayd: Relayd) -> None:
    """docs/clients.md's complete page, as written, with relayd's URL and the test token route."""
    html = docs_example_html()
    route = "/api/relayd-token?stream=${encodeURIComponent(streamId)}"
    assert "http://127.0.0.1:8080/v1/client.js" in html and route in html
    html = html.replace("http://127.0.0.1:8080", relayd.url)
    html = html.replace(route, "/token?rights=read,cancel&streams=${encodeURIComponent(streamId)}")
    url = page_server.serve("example.html", html)

    stream = "docs-example"
    async with await producer_for(relayd, stream) as producer:
        await append(producer, stream, 1, *OPENAI_CHUNKS[:2])
        await page.goto(f"{url}?stream={stream}")
        await page.wait_for_function("document.getElementById('answer').textContent === 'Bonjour'")
        await append(producer, stream, 3, OPENAI_CHUNKS[2])
        await page.wait_for_function("document.getElementById('answer').textContent === 'Bonjour le monde'")
        await page.click("#stop")
        assert await producer.next() == {"type": "cancel", "stream": stream}
        await producer.end(stream, "cancelled")
    await page.wait_for_function("document.getElementById('state').textContent.startsWith('cancelled')")
    await page.reload()  # resumes after the end: the saved text, nothing twice
    await page.wait_for_function("document.getElementById('state').textContent.startsWith('cancelled')")
    assert await page.text_content("#answer") == "Bonjour le monde"
