"""The runnable examples work: the fake model through the real OpenAI SDK, and each example
against a real relayd and Valkey.

The examples import each other the way they run (``python examples/chat_app.py`` puts
``examples/`` first on ``sys.path``), so this module does the same.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from relayd.client import StreamCancelled, consume
from tests.helpers import API_KEY, JWT_SECRET, Relayd, collect_chunks

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import chat_app  # noqa: E402
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


# chat_app ------------------------------------------------------------------------------------


@asynccontextmanager
async def chat_app_for(relayd: Relayd, fake: FakeOpenAI) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """examples/chat_app.py on a free port, producing into the test relayd from ``fake``."""
    settings = chat_app.ChatSettings(
        relayd_url=relayd.url, api_key=API_KEY, jwt_secret=JWT_SECRET, openai_base_url=fake.base_url
    )
    async with TestClient(TestServer(chat_app.build_app(settings), host="127.0.0.1", port=0)) as client:
        yield client


def openai_text(chunk: dict[str, Any]) -> str:
    """The text delta of one OpenAI chat-completion chunk dict ("" for role and usage chunks)."""
    return str(chunk["choices"][0]["delta"].get("content", "")) if chunk["choices"] else ""


def delta_text(frames: list[dict[str, Any]]) -> str:
    """The text of relayd chunk frames holding OpenAI chunk dicts."""
    return "".join(openai_text(frame["data"]) for frame in frames)


async def test_chat_app_streams_the_answer_through_relayd(relayd: Relayd) -> None:
    """POST /chat returns at once; a consumer gets the model's chunks as OpenAI dicts, then completed."""
    async with FakeOpenAI(tokens=30, tokens_per_s=100) as fake, chat_app_for(relayd, fake) as app:
        response = await app.post("/chat", json={"prompt": PROMPT})
        assert response.status == 200
        body = await response.json()
        assert fake.stats.streams_completed == 0  # answered before the model did
        assert body["stream_id"].startswith("chat-") and body["relayd_url"] == relayd.url

        async with consume(body["relayd_url"], body["stream_id"], token=body["token"]) as consumer:
            chunks = [chunk async for chunk in consumer]

    assert consumer.end is not None and consumer.end.reason == "completed"
    assert "".join(map(openai_text, chunks)) == answer_text(PROMPT, 30)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 30  # stream_options.include_usage


async def test_chat_app_stop_aborts_the_model_call(relayd: Relayd) -> None:
    """A consumer's cancel reaches the producer SDK, which closes the OpenAI stream: the model sees the abort."""
    async with FakeOpenAI(tokens=2000, tokens_per_s=50) as fake, chat_app_for(relayd, fake) as app:
        body = await (await app.post("/chat", json={"prompt": PROMPT})).json()
        text, stopped = "", False
        async with consume(relayd.url, body["stream_id"], token=body["token"]) as consumer:
            with pytest.raises(StreamCancelled):
                async for chunk in consumer:
                    text += openai_text(chunk)
                    if text and not stopped:  # the answer has started: Stop
                        stopped = True
                        await consumer.cancel()
        await fake.wait_for(lambda stats: stats.streams_aborted == 1)

    assert fake.stats.streams_completed == 0
    assert answer_text(PROMPT, 2000).startswith(text)
    assert len(text.split()) < 100  # stopped long before the 2000 tokens


async def test_chat_app_ends_the_stream_error_when_the_model_fails_midway(relayd: Relayd) -> None:
    """A model stream failing midway ends the relayd stream `error`, after the text received before it."""
    async with FakeOpenAI(tokens=30, fail_after=5) as fake, chat_app_for(relayd, fake) as app:
        body = await (await app.post("/chat", json={"prompt": PROMPT})).json()
        async with await relayd.consumer(body["stream_id"], token=body["token"]) as peer:
            chunks, end = await collect_chunks(peer)

    assert end["reason"] == "error"
    assert end.get("message")
    assert delta_text(chunks) == answer_text(PROMPT, 30, max_tokens=5)


async def test_chat_app_ends_the_stream_error_when_the_model_call_fails(relayd: Relayd) -> None:
    """A model call refused before any chunk still ends the stream, `error` with the reason, for the page to show."""
    async with FakeOpenAI(reject_status=401) as fake, chat_app_for(relayd, fake) as app:
        body = await (await app.post("/chat", json={"prompt": PROMPT})).json()
        async with await relayd.consumer(body["stream_id"], token=body["token"]) as peer:
            chunks, end = await collect_chunks(peer)

    assert chunks == []
    assert end["reason"] == "error"
    assert "model call failed" in end["message"]


async def test_chat_app_token_is_for_that_stream_only(relayd: Relayd) -> None:
    """The page's token reads its own stream, not another one; a fresh one comes from /chat/{id}/token."""
    async with FakeOpenAI(tokens=3) as fake, chat_app_for(relayd, fake) as app:
        first = await (await app.post("/chat", json={"prompt": "one"})).json()
        second = await (await app.post("/chat", json={"prompt": "two"})).json()
        fresh = await (await app.post(f"/chat/{first['stream_id']}/token")).json()
        async with await relayd.consumer(second["stream_id"], token=first["token"]) as peer:
            assert await peer.closed() == 4003
        async with await relayd.consumer(first["stream_id"], token=fresh["token"]) as peer:
            _, end = await collect_chunks(peer)
        assert end["reason"] == "completed"
        assert (await app.post("/chat", json={"prompt": " "})).status == 400
        assert (await app.post("/chat/not-a-chat/token")).status == 404
        page = await (await app.get("/")).text()
        assert f'"relaydUrl": "{relayd.url}"' in page


# worker and celery_task: their one command, as a subprocess ------------------------------------


async def run_example(script: str, *args: str, cwd: Path, env: dict[str, str]) -> str:
    """Run ``python examples/<script> args`` to its end; returns its stdout (fails on a non-zero exit)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / script),
        *args,
        cwd=cwd,  # no relayd-data/ here: the credentials come from the environment
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def credentials_env(relayd: Relayd) -> dict[str, str]:
    return {"RELAYD_URL": relayd.url, "RELAYD_API_KEY": API_KEY, "RELAYD_JWT_SECRET": JWT_SECRET}


async def test_worker_answers_every_job_on_one_connection(relayd: Relayd, fake: FakeOpenAI, tmp_path: Path) -> None:
    """worker.py answers each prompt into its own text stream, all completed with the model's text."""
    prompts = ["alpha", "beta", "gamma", "delta", "epsilon"]
    out = await run_example(
        "worker.py",
        *prompts,
        "--relayd-url",
        relayd.url,
        "--openai-base-url",
        fake.base_url,
        "--concurrency",
        "3",
        cwd=tmp_path,
        env=credentials_env(relayd),
    )

    jobs = dict(re.findall(r"^(job-[0-9a-f]+): (\w+)$", out, re.MULTILINE))
    assert sorted(jobs.values()) == sorted(prompts)
    assert len(re.findall(r"^(job-[0-9a-f]+): completed \(\d+ chunks\)$", out, re.MULTILINE)) == len(prompts)
    async with aiohttp.ClientSession() as http, http.get(f"{relayd.url}/metrics") as response:
        metrics = await response.text()
    assert 'relayd_connections_opened_total{role="producer"} 1.0' in metrics  # one websocket for all jobs
    for stream, prompt in jobs.items():
        async with await relayd.consumer(stream) as peer:
            chunks, end = await collect_chunks(peer)
        assert end["reason"] == "completed"
        assert "".join(chunk["data"] for chunk in chunks) == answer_text(prompt, 30)


async def test_celery_task_streams_into_relayd(relayd: Relayd, fake: FakeOpenAI, tmp_path: Path) -> None:
    """celery_task.py runs the task once; the curl command it prints replays the whole answer."""
    env = {**credentials_env(relayd), "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "x"}
    out = await run_example("celery_task.py", PROMPT, cwd=tmp_path, env=env)

    url = re.search(r'curl -N "(\S+)"', out)
    assert url is not None, out
    assert "'reason': 'completed'" in out
    async with aiohttp.ClientSession() as http, http.get(url.group(1)) as response:
        assert response.status == 200
        events = (await response.text()).split("\n\n")
    chunks = [e for e in events if "event: chunk" in e]
    text = "".join("\n".join(line[6:] for line in e.split("\n") if line.startswith("data: ")) for e in chunks)
    assert text == answer_text(PROMPT, 30)
    assert "event: end" in events[-2] and '"reason":"completed"' in events[-2]


# push.py and every example's arguments ---------------------------------------------------------


async def test_push_streams_forty_words_into_relayd(relayd: Relayd, tmp_path: Path) -> None:
    """push.py (the README walkthrough) opens the stream, appends forty words and ends it completed."""
    out = await run_example("push.py", "push-1", "--pause", "0", cwd=tmp_path, env=credentials_env(relayd))
    assert re.fullmatch(r"push-1: completed after 40 chunks, end cursor \S+-0000000041\n", out), out
    async with await relayd.consumer("push-1") as peer:
        chunks, end = await collect_chunks(peer)
    assert end["reason"] == "completed" and len(chunks) == 40
    assert "".join(chunk["data"] for chunk in chunks).startswith("relayd stores every chunk in Redis ")


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "credentials.py"))
async def test_every_example_parses_its_arguments(script: str, tmp_path: Path) -> None:
    """``--help`` prints the example's usage and exits 0, without running it (push.py once made a stream --help)."""
    out = await run_example(script, "--help", cwd=tmp_path, env={"RELAYD_URL": "http://127.0.0.1:9"})
    assert out.startswith(f"usage: {script} "), out
