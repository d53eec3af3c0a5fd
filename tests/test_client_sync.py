"""SyncProducer (the producer for threads and Celery-style tasks) and mint_token, against a real relayd."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest

from relayd.auth import TokenAuthority, hash_api_key
from relayd.client import ProducerClosed, StreamResult, SyncProducer, mint_token
from relayd.config import Config
from tests.helpers import API_KEY, JWT_SECRET, Relayd, collect_chunks


def celery_style_task(url: str, job: str) -> tuple[StreamResult, StreamResult]:
    """What a worker does: no event loop of its own, plain blocking calls."""
    with SyncProducer(url, API_KEY, content_type="text") as p:
        streamed = p.stream(f"{job}-text", (f"w{i} " for i in range(20)))
        with p.writer(f"{job}-json", content_type="json") as w:
            for i in range(5):
                w.send({"i": i})
            w.flush()
            assert w.cursor is not None and w.cursor.endswith("5")
        ended = w.end()  # idempotent: the exit already ended it
    return streamed, ended


async def test_sync_producer_from_a_plain_thread(relayd: Relayd) -> None:
    """A SyncProducer used from a worker thread streams and writes like the async one."""
    streamed, ended = await asyncio.to_thread(celery_style_task, relayd.url, "job-1")
    assert (streamed.reason, streamed.chunks, ended.reason, ended.chunks) == ("completed", 20, "completed", 5)
    async with await relayd.consumer("job-1-text") as consumer:
        chunks, end = await collect_chunks(consumer)
    assert [c["data"] for c in chunks] == [f"w{i} " for i in range(20)] and end["cursor"] == streamed.cursor
    async with await relayd.consumer("job-1-json") as consumer:
        chunks, _ = await collect_chunks(consumer)
    assert [c["data"] for c in chunks] == [{"i": i} for i in range(5)]


def test_sync_producer_is_shared_by_threads_and_ends_errors(relayd_url: str) -> None:
    """Several threads write through one SyncProducer; a failing iterator ends its stream `error`."""

    def failing() -> Iterator[str]:
        yield "a"
        raise ValueError("upstream broke")

    with SyncProducer(relayd_url, API_KEY, content_type="text") as p:
        results: list[StreamResult] = []

        def worker(n: int) -> None:
            results.append(p.stream(f"thread-{n}", [f"{n}:{i}" for i in range(10)]))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with pytest.raises(ValueError, match="upstream broke"):
            p.stream("thread-err", failing())
        returned = p.stream("thread-err-2", failing(), raise_on_error=False)
    assert sorted(r.chunks for r in results) == [10, 10, 10, 10]
    assert returned.reason == "error" and isinstance(returned.error, ValueError)


async def test_sync_stream_stops_at_a_cancel_and_closes_the_iterator(relayd: Relayd) -> None:
    """A consumer's cancel is seen between two items: the generator is closed, the stream ends `cancelled`."""
    cancel_seen = threading.Event()
    closed = threading.Event()

    def answer() -> Iterator[str]:
        try:
            yield "a"
            assert cancel_seen.wait(10)  # a blocking model call, still going when the cancel comes
            yield "b"  # not sent: the cancel is checked first
            yield "c"
        finally:
            closed.set()

    def task(url: str) -> StreamResult:
        with SyncProducer(url, API_KEY, content_type="text") as p:
            return p.stream("sync-cancel", answer(), on_cancel=cancel_seen.set)

    token = relayd.token(["sync-cancel"], ("read", "cancel"))
    async with await relayd.consumer("sync-cancel", token=token) as consumer:
        await consumer.expect("subscribed")
        running = asyncio.create_task(asyncio.to_thread(task, relayd.url))
        assert (await consumer.expect("chunk"))["data"] == "a"
        await consumer.send({"op": "cancel", "stream": "sync-cancel"})
        frames, end = await consumer.until("end")
        result = await running
    assert [f["type"] for f in frames] == ["cancel_requested"] and end["reason"] == "cancelled"
    assert result.reason == "cancelled" and result.chunks == 1 and closed.is_set()


def test_a_second_concurrent_start_returns_once_connected(relayd_url: str) -> None:
    """Two threads start the same SyncProducer: both return with the Producer connected."""
    p = SyncProducer(relayd_url, API_KEY)
    barrier = threading.Barrier(2)
    seen: list[object] = []

    def starter() -> None:
        barrier.wait()
        p.start()
        seen.append(p.producer)  # raised "not started" when the second start returned early

    threads = [threading.Thread(target=starter) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(seen) == 2 and seen[0] is seen[1]
    finally:
        p.close()


def test_calls_racing_close_raise_producer_closed_and_never_hang(relayd_url: str) -> None:
    """Threads still sending while another closes get ProducerClosed (or finish), never a hang."""
    p = SyncProducer(relayd_url, API_KEY)
    p.start()
    writers = [p.writer(f"race-{n}") for n in range(4)]
    outcomes: list[BaseException | None] = [None] * 4
    sending = [threading.Event() for _ in range(4)]

    def sender(n: int) -> None:
        try:
            for i in range(100_000):
                writers[n].send(i)
                if i == 5:
                    sending[n].set()
        except BaseException as exc:
            outcomes[n] = exc
        finally:
            sending[n].set()

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    for event in sending:
        assert event.wait(30)
    p.close(error=True)
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(o, ProducerClosed) for o in outcomes), outcomes
    with pytest.raises(ProducerClosed):
        writers[0].send("late")


async def test_close_cancels_and_awaits_a_running_on_cancel_callback(relayd: Relayd) -> None:
    """An async on_cancel still running at close is cancelled and awaited before the loop closes."""
    started, finished = threading.Event(), threading.Event()

    async def slow_cleanup() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # a cleanup that would outlive the Producer
        finally:
            finished.set()

    def task(url: str) -> None:
        with SyncProducer(url, API_KEY) as p:
            w = p.writer("sync-callback", on_cancel=slow_cleanup)
            w.send(1)
            w.flush()
            assert started.wait(10)
            w.end("cancelled")

    token = relayd.token(["sync-callback"], ("read", "cancel"))
    async with await relayd.consumer("sync-callback", token=token) as consumer:
        await consumer.expect("subscribed")
        running = asyncio.create_task(asyncio.to_thread(task, relayd.url))
        await consumer.expect("chunk")
        await consumer.send({"op": "cancel", "stream": "sync-callback"})
        await running
    assert finished.is_set()  # the callback's task ran its cancellation, not dropped with the loop


@pytest.fixture
def relayd_url(config_factory: Callable[..., Config]) -> Iterator[str]:
    """relayd in its own thread and loop, for tests that are plain (non-async) functions."""
    started = threading.Event()
    stop: list[asyncio.Event] = []
    box: list[str] = []

    async def serve() -> None:
        async with Relayd(config_factory()) as server:
            box.append(server.url)
            stop.append(asyncio.Event())
            started.set()
            await stop[0].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield box[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)
        loop.close()


def test_mint_token_is_what_relayd_verifies() -> None:
    """mint_token signs with relayd's own code: TokenAuthority verifies the claims it set."""
    token = mint_token(JWT_SECRET, ["chat-*"], rights=("read", "cancel"), ttl=60, sub="user-7")
    principal = TokenAuthority(secret=JWT_SECRET).verify(token)
    assert principal.allows("chat-42", "cancel") and not principal.allows("other", "read")
    assert principal.subject == "user-7"
    with pytest.raises(ValueError):
        mint_token(JWT_SECRET, ["chat-1"], rights=("write",))
    with pytest.raises(ValueError):
        mint_token(JWT_SECRET, ["bad id"])


async def test_minted_token_is_accepted_by_relayd(relayd: Relayd) -> None:
    """A consumer connecting with a minted token reads the stream; a token for another stream is refused."""
    await asyncio.to_thread(celery_style_task, relayd.url, "minted")
    token = mint_token(JWT_SECRET, ["minted-text"])
    async with await relayd.consumer("minted-text", token=token) as consumer:
        chunks, end = await collect_chunks(consumer)
    assert len(chunks) == 20 and end["reason"] == "completed"
    async with await relayd.consumer("minted-json", token=token) as refused:
        assert await refused.closed() == 4003


async def test_sync_stream_returns_when_an_operator_ends_it(config_factory: Callable[..., Config]) -> None:
    """SyncProducer.stream() whose stream an operator ends: on_cancel runs, iteration stops, the source is
    closed, and the result carries the operator's end (ended_by_server) instead of an exception."""
    admin_key = "rk_admin_sync_test_0123456789"
    async with Relayd(config_factory(auth={"admin_keys": [hash_api_key(admin_key)]})) as relayd:
        loop = asyncio.get_running_loop()
        noticed = threading.Event()
        closed = threading.Event()

        async def operator_end() -> None:
            assert relayd.session is not None
            async with relayd.session.post(
                f"{relayd.url}/v1/admin/streams/sync-op/end",
                json={"reason": "cancelled", "message": "ops"},
                headers={"Authorization": f"Bearer {admin_key}"},
            ) as resp:
                assert resp.status == 200

        def tokens() -> Iterator[str]:
            try:
                for i in range(3):
                    yield f"t{i} "
                asyncio.run_coroutine_threadsafe(operator_end(), loop).result()
                assert noticed.wait(10)
                yield "never sent"
            finally:
                closed.set()

        def job() -> StreamResult:
            with SyncProducer(relayd.url, API_KEY, content_type="text") as p:
                return p.stream("sync-op", tokens(), on_cancel=noticed.set)

        result = await asyncio.to_thread(job)
    assert closed.is_set()
    assert result.reason == "cancelled" and result.ended_by_server is not None
    assert result.ended_by_server.message == "ops"
