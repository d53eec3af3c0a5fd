"""A chat web app whose answers stream through relayd: reload, Stop, and the model call keeps going.

    relayd serve                          # terminal 1
    python examples/chat_app.py           # terminal 2; open http://127.0.0.1:8000

``POST /chat {"prompt": ...}`` starts the answer in a background task and returns at once with
the stream id, a consumer token (read + cancel, for that one stream) and relayd's URL. The
task calls the model with the OpenAI SDK and pipes its stream into relayd with the producer SDK
(``producer.stream(stream_id, openai_stream)``): no HTTP request waits on the model, so the
browser can drop, reload or open a second tab and pick the answer up from relayd.

``GET /`` is the page (examples/static/chat.html): it renders the answer live with relayd's
browser client, keeps its place in ``sessionStorage`` so a reload mid-answer resumes without
repeating text, and its Stop button sends a cancel through relayd; the producer SDK then
closes the OpenAI stream, which aborts the model call. ``POST /chat/{id}/token`` gives the page
a fresh token when its token expires.

Without ``--openai-base-url`` the app starts the fake model (examples/fake_openai.py) in the
same process, paced like a real one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import credentials
import openai
from aiohttp import web
from fake_openai import FakeOpenAI, start_fake_openai

from relayd.client import Producer, StreamResult, mint_token

log = logging.getLogger("chat_app")
PAGE = Path(__file__).parent / "static" / "chat.html"
STREAM_ID = re.compile(r"chat-[0-9a-f]{32}")


@dataclass(frozen=True)
class ChatSettings:
    relayd_url: str
    api_key: str
    jwt_secret: str
    openai_base_url: str | None = None  # None: start the fake model in this process
    openai_api_key: str = "not-needed-for-the-fake-model"
    model: str = "gpt-4o-mini"
    token_ttl_s: int = 600


@dataclass
class ChatState:
    producer: Producer
    model: openai.AsyncOpenAI
    answers: set[asyncio.Task[StreamResult | None]] = field(default_factory=set)


SETTINGS = web.AppKey("settings", ChatSettings)
STATE = web.AppKey("state", ChatState)


def build_app(settings: ChatSettings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_clients)
    app.router.add_get("/", page)
    app.router.add_post("/chat", chat)
    app.router.add_post("/chat/{stream_id}/token", token)
    return app


async def _clients(app: web.Application) -> AsyncIterator[None]:
    """One relayd producer connection and one OpenAI client for the whole app."""
    settings = app[SETTINGS]
    fake: FakeOpenAI | None = None
    base_url = settings.openai_base_url
    if base_url is None:
        fake = await start_fake_openai(tokens=120, tokens_per_s=25, ttft_s=0.4)
        base_url = fake.base_url
        log.info("no --openai-base-url: using the fake model at %s", base_url)
    try:
        async with (
            Producer(settings.relayd_url, settings.api_key) as producer,
            openai.AsyncOpenAI(base_url=base_url, api_key=settings.openai_api_key) as model,
        ):
            state = app[STATE] = ChatState(producer, model)
            yield
            # Shutting down: answers still running end when their task is cancelled.
            for task in state.answers:
                task.cancel()
            await asyncio.gather(*state.answers, return_exceptions=True)
    finally:
        if fake is not None:
            await fake.close()


async def page(request: web.Request) -> web.Response:
    config = json.dumps({"relaydUrl": request.app[SETTINGS].relayd_url}).replace("</", "<\\/")
    return web.Response(text=PAGE.read_text().replace("{{config}}", config), content_type="text/html")


async def chat(request: web.Request) -> web.Response:
    """Start an answer in the background; the browser follows it through relayd."""
    try:
        body = await request.json()
        prompt = str(body["prompt"]).strip()
    except (ValueError, KeyError, TypeError):
        raise web.HTTPBadRequest(text='expected a JSON body {"prompt": "..."}') from None
    if not prompt:
        raise web.HTTPBadRequest(text="the prompt is empty")
    settings, state = request.app[SETTINGS], request.app[STATE]
    # An unguessable id: in this demo, knowing the id is what lets a page get a token for it.
    stream_id = f"chat-{uuid.uuid4().hex}"
    task = asyncio.create_task(answer(state, settings.model, stream_id, prompt))
    state.answers.add(task)
    task.add_done_callback(state.answers.discard)
    return web.json_response(
        {"stream_id": stream_id, "token": _token(settings, stream_id), "relayd_url": settings.relayd_url}
    )


async def token(request: web.Request) -> web.Response:
    """A fresh token for a stream the page already follows (its first one expired)."""
    stream_id = request.match_info["stream_id"]
    if not STREAM_ID.fullmatch(stream_id):
        raise web.HTTPNotFound()
    return web.json_response({"token": _token(request.app[SETTINGS], stream_id)})


def _token(settings: ChatSettings, stream_id: str) -> str:
    return mint_token(settings.jwt_secret, streams=[stream_id], rights=("read", "cancel"), ttl=settings.token_ttl_s)


async def answer(state: ChatState, model: str, stream_id: str, prompt: str) -> StreamResult | None:
    """Call the model and pipe its chunks into relayd; a consumer's cancel closes the model stream."""
    try:
        completion = await state.model.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
    except openai.OpenAIError as exc:
        async with state.producer.writer(stream_id) as writer:  # tell the reader why: the end is durable
            await writer.end("error", message=f"model call failed: {exc}")
        log.warning("%s: model call failed: %s", stream_id, exc)
        return None
    # Each ChatCompletionChunk goes to relayd as its JSON dict (model_dump); a browser reads
    # choices[0].delta.content from it.
    try:
        result = await state.producer.stream(stream_id, completion)
    except openai.OpenAIError as exc:  # failed midway: the stream has already ended `error`
        log.warning("%s: the model failed midway: %s", stream_id, exc)
        return None
    log.info("%s: %s after %d chunks", stream_id, result.reason, result.chunks)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A chat web app streaming model answers through relayd.")
    parser.add_argument("--relayd-url", default=os.environ.get("RELAYD_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--api-key", help="producer API key (default: $RELAYD_API_KEY or relayd-data/dev-credentials)")
    parser.add_argument("--jwt-secret", help="to sign consumer tokens (default: $RELAYD_JWT_SECRET or dev-credentials)")
    parser.add_argument("--openai-base-url", help="an OpenAI-compatible API (default: the fake model, in-process)")
    parser.add_argument("--openai-api-key", default="not-needed-for-the-fake-model")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per model call otherwise
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    settings = ChatSettings(
        relayd_url=args.relayd_url.rstrip("/"),
        api_key=credentials.api_key(args.api_key),
        jwt_secret=credentials.jwt_secret(args.jwt_secret),
        openai_base_url=args.openai_base_url,
        openai_api_key=args.openai_api_key,
        model=args.model,
    )
    web.run_app(build_app(settings), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
