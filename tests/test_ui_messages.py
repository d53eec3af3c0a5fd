"""``relayd.client.ui_message_chunks``: an OpenAI stream relayed as AI SDK UI message chunks, through a real relayd."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from relayd.client import Producer, StreamResult, ui_message_chunks
from tests.helpers import API_KEY, Relayd
from tests.test_sse import make_jwt

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from fake_openai import FakeOpenAI, answer_tokens, start_fake_openai  # noqa: E402

PROMPT = "what is a cursor?"


async def read_back(relayd: Relayd, stream: str) -> dict[str, Any]:
    """The stream as relayd stored it (GET .../whole)."""
    assert relayd.session is not None
    params = {"token": make_jwt([stream])}
    async with relayd.session.get(f"{relayd.url}/v1/streams/{stream}/whole", params=params) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def relay(relayd: Relayd, fake: FakeOpenAI, stream: str, **fake_settings: Any) -> StreamResult:
    model = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
    try:
        upstream = await model.chat.completions.create(
            model="fake-gpt",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            extra_body={"fake": fake_settings},
        )
        async with Producer(relayd.url, API_KEY) as producer:
            return await producer.stream(stream, ui_message_chunks(upstream), raise_on_error=False)
    finally:
        await model.close()


async def test_an_openai_stream_becomes_ui_message_chunks(relayd: Relayd) -> None:
    """start, start-step, one text part of the model's tokens, finish-step, finish with the finish reason."""
    fake = await start_fake_openai(tokens=8)
    try:
        result = await relay(relayd, fake, "ui")
    finally:
        await fake.close()
    assert result.reason == "completed"
    chunks = (await read_back(relayd, "ui"))["chunks"]
    assert chunks[0]["type"] == "start" and chunks[0]["messageId"].startswith("chatcmpl-")
    deltas = [{"type": "text-delta", "id": "text-1", "delta": token} for token in answer_tokens(PROMPT, 8)]
    assert chunks[1:] == [
        {"type": "start-step"},
        {"type": "text-start", "id": "text-1"},
        *deltas,
        {"type": "text-end", "id": "text-1"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]


async def test_a_failing_upstream_ends_with_an_error_chunk(relayd: Relayd) -> None:
    """The model fails midway: the chunks so far, then an error chunk; the stream ends error."""
    fake = await start_fake_openai(tokens=8, fail_after=3)
    try:
        result = await relay(relayd, fake, "bad")
    finally:
        await fake.close()
    assert result.reason == "error"
    body = await read_back(relayd, "bad")
    assert body["status"] == "error"
    types = [c["type"] for c in body["chunks"]]
    assert types == ["start", "start-step", "text-start", "text-delta", "text-delta", "text-delta", "error"]
    assert "server had an error" in body["chunks"][-1]["errorText"]


async def test_a_cancel_stops_the_generation(relayd: Relayd) -> None:
    """A consumer's cancel closes the OpenAI response under the adapter: the model sees the abort."""
    fake = await start_fake_openai(tokens=500, tokens_per_s=50)
    try:
        relaying = asyncio.create_task(relay(relayd, fake, "stop"))
        token = relayd.token(["stop"], rights=("read", "cancel"))
        async with await relayd.consumer("stop", token=token) as consumer:
            await consumer.expect("subscribed")
            await consumer.expect("chunk")
            await consumer.send({"op": "cancel", "stream": "stop"})
            await fake.wait_for(lambda stats: stats.streams_aborted == 1)
        assert (await relaying).reason == "cancelled"
    finally:
        await fake.close()


async def test_reasoning_and_tool_calls() -> None:
    """Reasoning deltas and tool-call deltas (dict chunks) become reasoning and tool-input chunks."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "c1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    upstream = [
        chunk({"role": "assistant", "reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing"}),
        chunk({"content": "Let me check."}),
        chunk({"tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({}, "tool_calls"),
    ]
    got = [c async for c in ui_message_chunks(upstream, message_id="m1")]
    assert got == [
        {"type": "start", "messageId": "m1"},
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "Think"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "ing"},
        {"type": "reasoning-end", "id": "reasoning-1"},
        {"type": "text-start", "id": "text-2"},
        {"type": "text-delta", "id": "text-2", "delta": "Let me check."},
        {"type": "text-end", "id": "text-2"},
        {"type": "tool-input-start", "toolCallId": "call_1", "toolName": "weather"},
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '{"city":'},
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '"Paris"}'},
        {"type": "tool-input-available", "toolCallId": "call_1", "toolName": "weather", "input": {"city": "Paris"}},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "tool-calls"},
    ]
    with pytest.raises(RuntimeError, match="overloaded"):
        async for c in ui_message_chunks([{"error": {"message": "overloaded"}}]):
            assert c == {"type": "error", "errorText": "overloaded"}
