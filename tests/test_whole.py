"""``GET /v1/streams/{id}/whole``: the whole stream as one JSON response, waiting (bounded) for its end."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from relayd.client import Producer, json_encoder
from relayd.config import Config
from tests.helpers import API_KEY, Relayd, poll_until
from tests.test_sse import make_jwt, produce

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from fake_openai import answer_text, start_fake_openai  # noqa: E402


async def whole(relayd: Relayd, stream: str, token: str | None = None, **params: str) -> tuple[int, Any]:
    assert relayd.session is not None
    query = {"token": token if token is not None else make_jwt([stream]), **params}
    async with relayd.session.get(f"{relayd.url}/v1/streams/{stream}/whole", params=query) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_an_ended_json_stream_is_its_chunks_end_and_cursor(relayd: Relayd) -> None:
    """200 with every chunk, how the stream ended and the end's cursor."""
    chunks = [{"delta": "Hel"}, "lo", 42, [1, 2]]
    cursors = await produce(relayd, "j", chunks)
    assert await whole(relayd, "j") == (
        200,
        {"stream": "j", "status": "completed", "cursor": cursors[-1], "content_type": "json", "chunks": chunks},
    )


async def test_a_text_stream_is_its_text(relayd: Relayd) -> None:
    """A text stream's chunks are joined into one text; an error end comes with its message."""
    async with await relayd.producer() as producer:
        await producer.open("t", content_type="text")
        await producer.append("t", 1, "Hello", ", wor", "ld\n")
        end = await producer.end("t", "error", message="model failed")
    status, body = await whole(relayd, "t")
    assert status == 200 and body == {
        "stream": "t",
        "status": "error",
        "message": "model failed",
        "cursor": end["cursor"],
        "content_type": "text",
        "text": "Hello, world\n",
    }


async def test_an_open_stream_is_202_with_what_is_there_and_the_cursor_continues(relayd: Relayd) -> None:
    """wait_ms=0 on an open stream: 202, the chunks stored so far; ?cursor= then reads the rest, waiting for the end."""
    async with await relayd.producer() as producer:
        await producer.open("o")
        acks = [await producer.append("o", seq, f"c{seq}") for seq in (1, 2)]
        status, body = await whole(relayd, "o", wait_ms="0")
        assert status == 202 and body["status"] == "open"
        assert body["chunks"] == ["c1", "c2"] and body["cursor"] == acks[-1]["cursor"]

        rest = asyncio.create_task(whole(relayd, "o", cursor=body["cursor"], wait_ms="10000"))
        await poll_until(lambda: relayd.relay.subscriber_count("o") == 1, "the read is waiting")
        await producer.append("o", 3, "c3")
        end = await producer.end("o")
    assert await rest == (
        200,
        {"stream": "o", "status": "completed", "cursor": end["cursor"], "content_type": "json", "chunks": ["c3"]},
    )


async def test_refusals(config_factory: Callable[..., Config]) -> None:
    """404 for no such stream, 413 beyond consumer.whole_max_bytes, 401/403 for the token; relayd's error shape."""
    async with Relayd(config_factory(consumer={"whole_max_bytes": 1000})) as relayd:
        await produce(relayd, "small", ["x" * 100])
        await produce(relayd, "big", ["x" * 100] * 20)
        assert (await whole(relayd, "small"))[0] == 200
        status, body = await whole(relayd, "big")
        assert status == 413 and body["error"]["code"] == "stream_too_large"
        assert "consumer.whole_max_bytes" in body["error"]["message"]
        status, body = await whole(relayd, "none", wait_ms="0")
        assert status == 404 and body["error"]["code"] == "stream_not_found"
        assert (await whole(relayd, "small", token="a.b.c"))[0] == 401
        assert (await whole(relayd, "small", token=make_jwt(["other"])))[0] == 403
        status, body = await whole(relayd, "small", wait_ms="x")
        assert status == 400 and body["error"]["code"] == "bad_frame"


async def test_a_relayed_openai_stream_reads_as_the_completion_openai_would_answer(relayd: Relayd) -> None:
    """OpenAI's chunks relayed as they are read back (?format=openai, by the openai SDK) as the
    chat.completion the same model answers without streaming: content, finish_reason, usage."""
    fake = await start_fake_openai(tokens=12)
    model = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
    reader = openai.AsyncOpenAI(base_url=f"{relayd.url}/v1", api_key=make_jwt(["chat"]), max_retries=0)
    try:
        messages: Any = [{"role": "user", "content": "why relay?"}]
        upstream = await model.chat.completions.create(
            model="fake-gpt", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        async with Producer(relayd.url, API_KEY) as producer:
            await producer.stream("chat", upstream, encoder=json_encoder)
        answer = await reader.get(
            "/streams/chat/whole", cast_to=ChatCompletion, options={"params": {"format": "openai"}}
        )
        direct = await model.chat.completions.create(model="fake-gpt", messages=messages)
    finally:
        await model.close()
        await reader.close()
        await fake.close()
    assert isinstance(answer, ChatCompletion) and answer.object == "chat.completion"
    assert answer.choices[0].message.content == answer_text("why relay?", 12) == direct.choices[0].message.content
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop" and answer.usage == direct.usage
    assert answer.id.startswith("chatcmpl-") and answer.model == "fake-gpt"


async def test_openai_format_of_text_streams_and_of_failed_ends(relayd: Relayd) -> None:
    """A text stream is one choice's content; an end other than completed is an HTTP error the SDK raises."""
    await produce(relayd, "t", ["Hi", " there"], content_type="text")
    async with await relayd.producer() as producer:
        await producer.open("x", content_type="text")
        await producer.append("x", 1, "partial")
        await producer.end("x", "cancelled")
    reader = openai.AsyncOpenAI(base_url=f"{relayd.url}/v1", api_key=make_jwt(["t", "x", "t2"]), max_retries=0)
    params = {"params": {"format": "openai"}}
    try:
        answer = await reader.get("/streams/t/whole", cast_to=ChatCompletion, options=params)
        assert answer.choices[0].message.content == "Hi there" and answer.choices[0].finish_reason == "stop"
        with pytest.raises(openai.ConflictError) as cancelled:
            await reader.get("/streams/x/whole", cast_to=ChatCompletion, options=params)
        assert cancelled.value.code == "cancelled"
        with pytest.raises(openai.NotFoundError) as missing:
            await reader.get(
                "/streams/t2/whole", cast_to=ChatCompletion, options={"params": {"format": "openai", "wait_ms": "0"}}
            )
        assert missing.value.type == "not_found_error"
    finally:
        await reader.close()
