"""The runnable examples work: the fake model through the real OpenAI SDK, and each example
against a real relayd and Valkey.

The examples import each other the way they run (``python examples/chat_app.py`` puts
``examples/`` first on ``sys.path``), so this module does the same.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from fake_openai import FakeOpenAI, answer_text, start_fake_openai  # noqa: E402

PROMPT = "Why does a relay need a cursor?"
USER = [{"role": "user", "content": PROMPT}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await start_fake_openai(tokens=30)
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as c:
        yield c


# fake_openai ---------------------------------------------------------------------------------


async def test_fake_model_streams_real_chat_completion_chunks(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    """stream=True: ChatCompletionChunks (role first, then the deterministic text, stop, usage), [DONE] ends it."""
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_text(PROMPT, 30)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30
    assert fake.stats.streams_completed == 1
    assert fake.stats.prompts == [PROMPT]


async def test_fake_model_answers_are_deterministic_per_prompt(client: openai.AsyncOpenAI) -> None:
    """The same prompt gives the same text, another prompt another text."""

    async def ask(prompt: str) -> str:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    first, again, other = await ask("one"), await ask("one"), await ask("two")
    assert first == again == answer_text("one", 30)
    assert other == answer_text("two", 30) != first


async def test_fake_model_answers_without_streaming(client: openai.AsyncOpenAI) -> None:
    """stream=False: one chat.completion; max_tokens cuts the answer with finish_reason length."""
    full = await client.chat.completions.create(model="m", messages=USER)
    short = await client.chat.completions.create(model="m", messages=USER, max_tokens=4)

    assert isinstance(full, ChatCompletion)
    assert full.choices[0].message.content == answer_text(PROMPT, 30)
    assert full.choices[0].finish_reason == "stop"
    assert full.usage is not None and full.usage.completion_tokens == 30
    assert short.choices[0].message.content == answer_text(PROMPT, 30, max_tokens=4)
    assert short.choices[0].finish_reason == "length"


async def test_fake_model_wire_format_is_openai_sse(fake: FakeOpenAI) -> None:
    """On the wire: `data: {json}` events separated by blank lines, ending with `data: [DONE]`."""
    body = {"model": "m", "messages": USER, "stream": True, "fake": {"tokens": 3}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{fake.base_url}/chat/completions", json=body, headers={"Authorization": "Bearer x"}) as resp,
    ):
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.text()

    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith('data: {"id":"chatcmpl-') for event in events[:-2])
    assert len(events[:-2]) == 1 + 3 + 1  # role, three tokens, finish


async def test_fake_model_fails_mid_stream_on_request(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    """fail_after: an OpenAI error event (APIError) or a broken connection (APIConnectionError) midway."""
    for mode, error in (("error", openai.APIError), ("disconnect", openai.APIConnectionError)):
        stream = await client.chat.completions.create(
            model="m", messages=USER, stream=True, extra_body={"fake": {"fail_after": 5, "fail_mode": mode}}
        )
        text: list[str] = []
        with pytest.raises(error):
            async for chunk in stream:  # a loop keeps the text received before the error
                text.append(chunk.choices[0].delta.content or "")  # noqa: PERF401
        assert "".join(text) == answer_text(PROMPT, 30, max_tokens=5)
    assert fake.stats.streams_failed == 2


async def test_fake_model_counts_a_client_that_goes_away(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    """Closing the OpenAI stream mid-answer is seen by the server as an aborted stream."""
    stream = await client.chat.completions.create(
        model="m", messages=USER, stream=True, extra_body={"fake": {"tokens": 500, "tokens_per_s": 100}}
    )
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    await stream.close()

    await fake.wait_for(lambda stats: stats.streams_aborted == 1)
    assert fake.stats.streams_completed == 0


async def test_fake_model_lists_its_model(client: openai.AsyncOpenAI) -> None:
    """GET /v1/models answers a model list."""
    models = [model.id async for model in client.models.list()]
    assert models == ["fake-gpt"]
