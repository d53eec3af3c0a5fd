"""A fake OpenAI-compatible model server, so the examples and their tests need no network or key.

    python examples/fake_openai.py --port 8099     # then point any OpenAI client at it:
    OpenAI(base_url="http://127.0.0.1:8099/v1", api_key="x")

It speaks the part of the OpenAI HTTP API the examples use, byte for byte as OpenAI does:
``POST /v1/chat/completions`` (``stream=true``: Server-Sent Events of ``chat.completion.chunk``
objects, a first chunk with the role, one chunk per token, a last chunk with ``finish_reason``,
a usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``; ``stream=false``: one
``chat.completion``) and ``GET /v1/models``.

The answer is deterministic: :func:`answer_text` derives it from the last user message, so a
test knows what a consumer must receive. Its length is ``tokens`` (capped by ``max_tokens``);
pacing (time to first token, tokens per second) imitates a real model, and ``fail_after`` makes
a stream fail midway, for error-path demos. A request can override these with an extra body
field: ``extra_body={"fake": {"tokens": 200, "tokens_per_s": 20, "fail_after": 5}}``.

The server counts streams that completed, failed on purpose, and were **aborted** (the client
disconnected mid-answer, as the relayd producer SDK does when a consumer cancels), so a test can
see that a cancel reached the model call.

In code: ``fake = await start_fake_openai(tokens_per_s=20)`` (``fake.base_url``, ``fake.stats``,
``await fake.wait_for(lambda s: s.aborted == 1)``, ``await fake.close()``), or, from synchronous
code, ``with fake_openai_in_thread() as fake: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

FailMode = Literal["error", "disconnect"]

_WORDS = (  # noqa: SIM905 - a sentence reads better than sixty quoted words
    "relay stream token chunk cursor reader browser model answer replay durable order live tail "
    "network reload resume producer consumer queue worker latency buffer socket event message "
    "history redis valkey window signal prompt context request response append acknowledge "
    "gently quickly always never every small large quiet bright careful steady patient simple "
    "the a of to and in that it with as for on is was"
).split()


def answer_tokens(prompt: str, tokens: int, max_tokens: int | None = None) -> list[str]:
    """The answer to ``prompt``, as the token strings the stream sends (same prompt, same text)."""
    rng = random.Random(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big"))
    out: list[str] = []
    sentence_start = True
    for i in range(tokens):
        word = rng.choice(_WORDS)
        if sentence_start:
            word = word.capitalize()
        sentence_start = i == tokens - 1 or rng.random() < 0.12
        if sentence_start:
            word += "."
        elif rng.random() < 0.08:
            word += ","
        out.append(word if i == 0 else " " + word)
    return out if max_tokens is None else out[:max_tokens]


def answer_text(prompt: str, tokens: int = 40, max_tokens: int | None = None) -> str:
    """The full text a stream of ``answer_tokens(prompt, tokens, max_tokens)`` adds up to."""
    return "".join(answer_tokens(prompt, tokens, max_tokens))


@dataclass
class FakeModelSettings:
    """How the fake model answers; a request's ``fake`` body field overrides any of these."""

    tokens: int = 40  # answer length, in tokens
    tokens_per_s: float = 0.0  # 0: every token at once (tests)
    ttft_s: float = 0.0  # time to first token
    fail_after: int | None = None  # fail the stream after this many content tokens
    fail_mode: FailMode = "error"  # "error": an OpenAI error event; "disconnect": drop the connection
    reject_status: int | None = None  # refuse every completion with this HTTP status (401, 429, 500...)
    model: str = "fake-gpt"


@dataclass
class FakeModelStats:
    requests: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_failed: int = 0  # failed on purpose (fail_after)
    streams_aborted: int = 0  # the client went away before the end
    prompts: list[str] = field(default_factory=list)


class RequestError(Exception):
    """A request the real API would refuse; answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


class FakeOpenAI:
    """The fake model server: ``async with FakeOpenAI(tokens_per_s=30) as fake: fake.base_url``."""

    def __init__(self, settings: FakeModelSettings | None = None, **overrides: Any) -> None:
        self.settings = dataclasses.replace(settings or FakeModelSettings(), **overrides)
        self.stats = FakeModelStats()
        self.base_url = ""
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._chat_completions)
        self.app.router.add_get("/v1/models", self._models)
        self._changed = asyncio.Event()  # set, and replaced, whenever a stat changes
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (port 0: a free one); returns the base URL for an OpenAI client, ``.../v1``."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound}/v1"
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_for(self, predicate: Callable[[FakeModelStats], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate(stats)`` holds (stats change as requests progress)."""
        async with asyncio.timeout(timeout):
            while not predicate(self.stats):
                await self._changed.wait()

    def _count(self, name: str) -> None:
        setattr(self.stats, name, getattr(self.stats, name) + 1)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # handlers ------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self.settings.model, "object": "model", "created": 1_700_000_000, "owned_by": "relayd-examples"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                raise RequestError(401, "You didn't provide an API key.")
            try:
                body = await request.json()
            except json.JSONDecodeError:
                raise RequestError(400, "We could not parse the JSON body of your request.") from None
            plan = _Plan.from_body(body, self.settings)
            if self.settings.reject_status is not None:
                raise RequestError(self.settings.reject_status, "Refused on purpose (reject_status).")
        except RequestError as exc:
            error = {"message": str(exc), "type": "invalid_request_error", "param": exc.param, "code": None}
            return web.json_response({"error": error}, status=exc.status)
        self.stats.prompts.append(plan.prompt)
        self._count("requests")
        if plan.stream:
            return await self._stream(request, plan)
        await asyncio.sleep(plan.ttft_s + (len(plan.tokens) / plan.tokens_per_s if plan.tokens_per_s else 0))
        return web.json_response(plan.completion())

    async def _stream(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "x-request-id": f"req_{uuid.uuid4().hex}",
            }
        )
        await response.prepare(request)
        self._count("streams_started")
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())

        async def pace(index: int) -> None:
            # Token i is due at start + ttft + i/rate: an absolute schedule, so pacing does not drift.
            due = started + plan.ttft_s + (index / plan.tokens_per_s if plan.tokens_per_s else 0)
            if due > loop.time():
                await asyncio.sleep(due - loop.time())

        try:
            await pace(0)
            await send(plan.chunk({"role": "assistant", "content": "", "refusal": None}))
            for index, token in enumerate(plan.tokens):
                if index == plan.fail_after:
                    await self._fail(request, response, plan, send)
                    return response
                await pace(index)
                await send(plan.chunk({"content": token}))
            await send(plan.chunk({}, finish_reason=plan.finish_reason))
            if plan.include_usage:
                await send(plan.usage_chunk())
            await send("[DONE]")
            await response.write_eof()
        except ConnectionError:
            # The client closed the connection mid-answer: with the relayd SDK, a consumer's cancel.
            self._count("streams_aborted")
            return response
        except asyncio.CancelledError:  # the server is shutting down mid-answer
            self._count("streams_aborted")
            raise
        self._count("streams_completed")
        return response

    async def _fail(
        self, request: web.Request, response: web.StreamResponse, plan: _Plan, send: Callable[[dict[str, Any]], Any]
    ) -> None:
        self._count("streams_failed")
        if plan.fail_mode == "error":
            # What OpenAI sends when a generation fails midway; the SDK raises openai.APIError.
            error = {"message": "The server had an error while processing your request.", "type": "server_error"}
            await send({"error": {**error, "param": None, "code": None}})
            await response.write_eof()
        elif request.transport is not None:
            request.transport.close()  # the body ends without its last chunk: a broken connection


@dataclass
class _Plan:
    """One request, parsed: what to answer and how fast."""

    prompt: str
    model: str
    stream: bool
    include_usage: bool
    tokens: list[str]
    finish_reason: str
    tokens_per_s: float
    ttft_s: float
    fail_after: int | None
    fail_mode: FailMode
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_body(cls, body: Any, defaults: FakeModelSettings) -> _Plan:
        if not isinstance(body, dict):
            raise RequestError(400, "The request body must be a JSON object.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages: expected a non-empty array.", "messages")
        fake = body.get("fake") or {}
        if not isinstance(fake, dict):
            raise RequestError(400, "fake: expected an object.", "fake")
        settings = dataclasses.replace(defaults, **_known(fake))
        natural = max(1, int(settings.tokens))
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise RequestError(400, "max_tokens: expected a positive integer.", "max_tokens")
        prompt = _last_user_text(messages)
        options = body.get("stream_options") or {}
        return cls(
            prompt=prompt,
            model=str(body.get("model") or settings.model),
            stream=bool(body.get("stream")),
            include_usage=bool(options.get("include_usage")) if isinstance(options, dict) else False,
            tokens=answer_tokens(prompt, natural, cap),
            finish_reason="length" if cap is not None and cap < natural else "stop",
            tokens_per_s=float(settings.tokens_per_s),
            ttft_s=float(settings.ttft_s),
            fail_after=settings.fail_after,
            fail_mode=settings.fail_mode,
        )

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = self._head("chat.completion.chunk") | {"choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # OpenAI sends usage: null on every chunk but the last
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        return self._head("chat.completion.chunk") | {"choices": [], "usage": self._usage()}

    def completion(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(self.tokens), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        return self._head("chat.completion") | {"choices": [choice], "usage": self._usage()}

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_relayd_fake",
        }

    def _usage(self) -> dict[str, int]:
        prompt_tokens = len(self.prompt.split())
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(self.tokens),
            "total_tokens": prompt_tokens + len(self.tokens),
        }


_NUMBERS = {"tokens": int, "tokens_per_s": float, "ttft_s": float, "fail_after": int, "reject_status": int}


def _known(overrides: dict[str, Any]) -> dict[str, Any]:
    """The request's ``fake`` overrides, checked: unknown keys are ignored, bad values refused."""
    if "ttft_ms" in overrides:
        overrides = {**overrides, "ttft_s": overrides["ttft_ms"] / 1000 if _is_number(overrides["ttft_ms"]) else None}
    out: dict[str, Any] = {}
    for key, kind in _NUMBERS.items():
        if key in overrides:
            value = overrides[key]
            if value is None and key in ("fail_after", "reject_status"):  # null turns them off
                out[key] = None
                continue
            if not _is_number(value) or value < 0:
                raise RequestError(400, f"fake.{key}: expected a number >= 0.", "fake")
            out[key] = kind(value)
    if "fail_mode" in overrides:
        if overrides["fail_mode"] not in ("error", "disconnect"):
            raise RequestError(400, "fake.fail_mode: expected 'error' or 'disconnect'.", "fake")
        out["fail_mode"] = overrides["fail_mode"]
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


async def start_fake_openai(host: str = "127.0.0.1", port: int = 0, **settings: Any) -> FakeOpenAI:
    """Start a fake model server in this event loop; ``.base_url`` is for the OpenAI client."""
    fake = FakeOpenAI(**settings)
    await fake.start(host, port)
    return fake


@contextmanager
def fake_openai_in_thread(host: str = "127.0.0.1", port: int = 0, **settings: Any) -> Iterator[FakeOpenAI]:
    """The fake server on its own event loop in a daemon thread, for synchronous code."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-openai", daemon=True)
    thread.start()
    try:
        fake = asyncio.run_coroutine_threadsafe(start_fake_openai(host, port, **settings), loop).result()
        try:
            yield fake
        finally:
            asyncio.run_coroutine_threadsafe(fake.close(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible model server (no network, no key).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--tokens", type=int, default=60, help="answer length in tokens (default 60)")
    parser.add_argument("--tokens-per-s", type=float, default=30.0, help="pacing; 0: all at once (default 30)")
    parser.add_argument("--ttft-ms", type=float, default=300.0, help="time to first token (default 300)")
    parser.add_argument("--fail-after", type=int, default=None, help="fail every stream after N tokens")
    parser.add_argument("--fail-mode", choices=["error", "disconnect"], default="error")
    args = parser.parse_args(argv)
    settings = FakeModelSettings(
        tokens=args.tokens,
        tokens_per_s=args.tokens_per_s,
        ttft_s=args.ttft_ms / 1000,
        fail_after=args.fail_after,
        fail_mode=args.fail_mode,
    )

    async def serve() -> None:
        fake = FakeOpenAI(settings)
        await fake.start(args.host, args.port)
        print(f"fake OpenAI-compatible model on {fake.base_url} (Ctrl-C to stop)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.close()

    with suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
