"""``GET /v1/streams/{id}/events?format=openai`` read by the real ``openai`` package's stream reader, unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionChunk

from relayd.config import Config
from tests.helpers import Relayd, poll_until
from tests.test_sse import SseReader, make_jwt, open_sse, produce

ChunkStream = openai.AsyncStream[ChatCompletionChunk]


def openai_chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    """A chat.completion.chunk as OpenAI sends it (what json_encoder stores for one)."""
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-x",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def client_for(relayd: Relayd, streams: list[str], **kwargs: Any) -> openai.AsyncOpenAI:
    """An OpenAI client pointed at relayd, the consumer JWT as its API key (sent as ``Bearer``)."""
    return openai.AsyncOpenAI(base_url=f"{relayd.url}/v1", api_key=make_jwt(streams), max_retries=0, **kwargs)


async def read(
    client: openai.AsyncOpenAI, stream: str, headers: dict[str, str] | None = None, **params: str
) -> ChunkStream:
    """The stream through the SDK's own machinery: ``client.get(..., stream=True)`` and ``AsyncStream``."""
    return await client.get(
        f"/streams/{stream}/events",
        cast_to=ChatCompletionChunk,
        stream=True,
        stream_cls=ChunkStream,
        options={"params": {"format": "openai", **params}, "headers": headers or {}},
    )


async def collect(chunks: ChunkStream) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in chunks]


@pytest.fixture
async def oai(relayd: Relayd) -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    clients: list[openai.AsyncOpenAI] = []

    def make(streams: list[str]) -> openai.AsyncOpenAI:
        clients.append(client_for(relayd, streams))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


async def test_openai_chunks_read_back_as_the_sdk_parsed_them(relayd: Relayd, oai: Callable[..., Any]) -> None:
    """A json stream of OpenAI chunks reads, through AsyncStream, as the same chunks, and stops at [DONE]."""
    chunks = [openai_chunk("Hel"), openai_chunk("lo"), openai_chunk(None, "stop")]
    await produce(relayd, "oa", chunks)
    got = await collect(await read(oai(["oa"]), "oa"))
    assert [c.model_dump(mode="json", exclude_unset=True) for c in got] == chunks


async def test_a_text_stream_reads_as_chat_completion_chunks(relayd: Relayd, oai: Callable[..., Any]) -> None:
    """Each text chunk is a chat.completion.chunk delta (the first with the role); the end adds finish_reason stop."""
    texts = ["Hel", "lo\nthere", ""]
    await produce(relayd, "txt", texts, content_type="text")
    got = await collect(await read(oai(["txt"]), "txt"))
    assert [c.object for c in got] == ["chat.completion.chunk"] * 4
    assert {c.id for c in got} == {"txt"} and {c.model for c in got} == {"relayd"}
    assert [c.choices[0].delta.content for c in got] == [*texts, None]
    assert [c.choices[0].delta.role for c in got] == ["assistant", None, None, None]
    assert [c.choices[0].finish_reason for c in got] == [None, None, None, "stop"]


async def test_events_carry_cursors_and_last_event_id_resumes(relayd: Relayd, oai: Callable[..., Any]) -> None:
    """Chunk events carry their cursor as id; Last-Event-ID (or ?cursor=) resumes with exactly the rest."""
    chunks = [openai_chunk(f"c{i}") for i in range(5)]
    cursors = await produce(relayd, "r", chunks)
    async with await open_sse(relayd, "r", format="openai") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = await SseReader(resp).events()
    assert [e.id for e in events] == cursors  # the [DONE] event has the end's cursor
    assert [e.event for e in events] == [None] * 6 and events[-1].data == "[DONE]"
    assert all(e.retry is None for e in events)  # no retry-only block: the SDK would parse it as data
    client = oai(["r"])
    rest = await collect(await read(client, "r", headers={"Last-Event-ID": cursors[1]}))
    assert [c.choices[0].delta.content for c in rest] == ["c2", "c3", "c4"]
    rest = await collect(await read(client, "r", cursor=cursors[3]))
    assert [c.choices[0].delta.content for c in rest] == ["c4"]
    async with await open_sse(relayd, "r", format="openai", headers={"Last-Event-ID": cursors[-1]}) as resp:
        assert resp.status == 204  # after the end: EventSource stops reconnecting


@pytest.mark.parametrize(
    ("reason", "message", "kind"),
    [("error", "the model failed", "server_error"), ("cancelled", "", "cancelled")],
)
async def test_an_end_other_than_completed_is_an_openai_error(
    relayd: Relayd, oai: Callable[..., Any], reason: str, message: str, kind: str
) -> None:
    """The SDK raises APIError at an end other than completed, after the chunks, with relayd's reason as code."""
    async with await relayd.producer() as producer:
        await producer.open("e", content_type="text")
        await producer.append("e", 1, "partial")
        end = await producer.end("e", reason, **({"message": message} if message else {}))
    got: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in await read(oai(["e"]), "e"):
            got.append(chunk)  # noqa: PERF401 - the chunks before the error, which raises
    assert [c.choices[0].delta.content for c in got] == ["partial"]
    assert raised.value.body == {
        "message": message or "the stream was cancelled",
        "type": kind,
        "param": None,
        "code": reason,
    }
    async with await open_sse(relayd, "e", format="openai") as resp:
        events = await SseReader(resp).events()
    assert events[-1].id == end["cursor"]  # a reconnect after it gets 204


async def test_refusals_come_as_http_status_with_an_openai_error_body(relayd: Relayd, oai: Callable[..., Any]) -> None:
    """No stream within wait_ms: 404 before anything is streamed; a bad token 401; another stream 403."""
    with pytest.raises(openai.NotFoundError) as missing:
        await read(oai(["never"]), "never", wait_ms="50")
    assert missing.value.body == {
        "message": "stream never does not exist",
        "type": "not_found_error",
        "param": None,
        "code": "stream_not_found",
    }
    bad = openai.AsyncOpenAI(base_url=f"{relayd.url}/v1", api_key="a.b.c", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        await read(bad, "x")
    await bad.close()
    assert unauthorized.value.code == "unauthorized" and unauthorized.value.type == "authentication_error"
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        await read(oai(["other"]), "x")
    assert forbidden.value.code == "forbidden"
    with pytest.raises(openai.BadRequestError) as bad_format:
        await oai(["x"]).get("/streams/x/events", cast_to=object, options={"params": {"format": "anthropic"}})
    assert bad_format.value.code == "bad_frame"


async def test_a_stream_that_appears_later_is_followed_live(relayd: Relayd, oai: Callable[..., Any]) -> None:
    """The response waits (wait_ms) for a stream that does not exist yet, then streams it with status 200."""

    async def follow() -> list[ChatCompletionChunk]:
        return await collect(await read(oai(["later"]), "later", wait_ms="10000"))

    reader = asyncio.create_task(follow())
    await poll_until(lambda: relayd.relay.subscriber_count("later") == 1, "the reader is waiting")
    await produce(relayd, "later", [openai_chunk("late")])
    assert [c.choices[0].delta.content for c in await reader] == ["late"]


async def test_keepalives_do_not_break_the_sdk_reader(config_factory: Callable[..., Config]) -> None:
    """Keepalive comments between id'd events reach the SDK's reader as nothing (a blank-line one would not)."""
    config = config_factory(consumer={"sse_keepalive_s": 0.05})
    async with Relayd(config) as relayd, await relayd.producer() as producer:
        await producer.open("ka")
        await producer.append("ka", 1, openai_chunk("one"))
        async with await open_sse(relayd, "ka", format="openai") as resp:
            body = b""
            while body.count(b": keepalive\n") < 2:  # a keepalive after the first (id'd) event
                body += await resp.content.readany()
            await producer.append("ka", 2, openai_chunk("two"))
            await producer.end("ka")
            body += await resp.read()
    assert body.startswith(b"id: ") and b"\n\n: keepalive\n" in body
    client = client_for(relayd, ["ka"])
    assert [c.choices[0].delta.content for c in await collect(replay(client, body))] == ["one", "two"]
    with pytest.raises(ValueError):  # what relayd's own keepalive (a comment and a blank line) would do
        await collect(replay(client, body.replace(b": keepalive\n", b": keepalive\n\n")))
    await client.close()


def replay(client: openai.AsyncOpenAI, body: bytes) -> ChunkStream:
    """The SDK's AsyncStream over a response holding ``body``: exactly the bytes relayd sent."""
    request = httpx2.Request("GET", "http://relayd/v1/streams/x/events")
    return ChunkStream(
        cast_to=ChatCompletionChunk, response=httpx2.Response(200, content=body, request=request), client=client
    )


async def test_a_gap_is_an_error_whose_id_resumes_after_it(config_factory: Callable[..., Config]) -> None:
    """Trimmed history: an error with code gap, whose id lets a reconnect continue after the gap."""
    async with Relayd(config_factory(streams={"max_chunks": 10})) as relayd, await relayd.producer() as producer:
        await producer.open("g")
        await producer.append("g", 1, *range(1, 1001))  # MAXLEN ~ trims whole nodes: enough to trim some
        await producer.end("g")
        async with await open_sse(relayd, "g", format="openai") as resp:
            events = await SseReader(resp).events()
        assert len(events) == 1, events
        error = orjson.loads(events[0].data)["error"]
        assert error["code"] == "gap" and error["type"] == "stream_gap" and error["cursor"] < error["next"]
        headers = {"Last-Event-ID": events[0].id or ""}
        async with await open_sse(relayd, "g", format="openai", headers=headers) as resp:
            rest = await SseReader(resp).events()
        assert rest[0].id == error["next"] and rest[-1].data == "[DONE]"
        oldest = int(error["next"].split("-")[1])
        assert [orjson.loads(e.data) for e in rest[:-1]] == list(range(oldest, 1001))


async def test_a_stale_cursor_is_a_reset_error_that_clears_the_last_event_id(relayd: Relayd) -> None:
    """A cursor of an older generation: an error with code reset and an empty id (a reconnect starts over)."""
    await produce(relayd, "re", [openai_chunk("x")])
    async with await open_sse(relayd, "re", format="openai", cursor="1-0000000001") as resp:
        assert resp.status == 200
        events = await SseReader(resp).events()
    assert len(events) == 1 and events[0].id == ""
    error = orjson.loads(events[0].data)["error"]
    assert error["code"] == "reset" and error["reason"] == "stream_replaced"
