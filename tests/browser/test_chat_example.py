"""examples/chat_app.py in a real Chromium: the page renders the answer live from relayd, resumes
after a reload with no text twice, and its Stop button aborts the model call.

The app runs on its own port (an origin other than relayd's, as in production), produces into
the test relayd, and calls the fake model through the real OpenAI SDK; the page imports the
browser client from relayd's /v1/client.js.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from playwright.async_api import Page

from tests.helpers import API_KEY, JWT_SECRET, Relayd

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import chat_app  # noqa: E402
from fake_openai import FakeOpenAI, answer_text  # noqa: E402

PROMPT = "Tell me how a reload resumes"
STATUS = "document.querySelector('#status').textContent"
ANSWER = "document.querySelector('#answer').textContent"


@asynccontextmanager
async def chat_page(relayd: Relayd, page: Page, **model: Any) -> AsyncIterator[FakeOpenAI]:
    """The chat app against ``relayd`` and a fake model paced by ``model``, opened in ``page``."""
    async with FakeOpenAI(**model) as fake:
        settings = chat_app.ChatSettings(
            relayd_url=relayd.url, api_key=API_KEY, jwt_secret=JWT_SECRET, openai_base_url=fake.base_url
        )
        server = TestServer(chat_app.build_app(settings), host="127.0.0.1", port=0)
        await server.start_server()
        try:
            await page.goto(str(server.make_url("/")))
            await page.wait_for_selector("body[data-ready=true]")
            yield fake
        finally:
            await server.close()


async def ask(page: Page, prompt: str) -> None:
    await page.fill("#prompt", prompt)
    await page.click("#send")


async def words_shown(page: Page, count: int) -> str:
    """Wait until the answer shows at least ``count`` words while still streaming; returns that text."""
    shown = await page.wait_for_function(
        f"{ANSWER}.split(' ').length >= {count} && {STATUS} === 'streaming' && {ANSWER}"
    )
    return str(await shown.json_value())


async def test_chat_page_renders_the_answer_live(relayd: Relayd, page: Page) -> None:
    """The answer appears word by word while the model writes, then the page shows `completed`."""
    async with chat_page(relayd, page, tokens=40, tokens_per_s=20):
        await ask(page, PROMPT)
        partial = await words_shown(page, 3)  # part of the answer, live
        await page.wait_for_function(f"{STATUS} === 'completed'")

        assert answer_text(PROMPT, 40).startswith(partial)
        assert await page.text_content("#answer") == answer_text(PROMPT, 40)
        assert await page.text_content("#question") == PROMPT
        assert await page.is_disabled("#stop")


async def test_chat_page_reload_mid_answer_resumes_without_duplicates(relayd: Relayd, page: Page) -> None:
    """A reload mid-answer shows the text so far and continues after it: the full answer, nothing twice."""
    # 12 s of answer: the reload, right after the 10th word, has over 10 s to land mid-answer even
    # on a loaded machine (the test then checks that it did: new words arrive live after it).
    async with chat_page(relayd, page, tokens=240, tokens_per_s=20):
        await ask(page, PROMPT)
        await words_shown(page, 10)
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]")
        after_reload = await page.text_content("#answer")
        assert after_reload is not None and len(after_reload.split(" ")) >= 10  # kept, not started over
        await page.wait_for_function(f"{STATUS} === 'streaming' && {ANSWER}.length > {len(after_reload)}")
        await page.wait_for_function(f"{STATUS} === 'completed'", timeout=30_000)

        expected = answer_text(PROMPT, 240)
        assert expected.startswith(after_reload) and len(after_reload) < len(expected)  # mid-answer
        assert await page.text_content("#answer") == expected


async def test_chat_page_stop_cancels_the_model_call(relayd: Relayd, page: Page) -> None:
    """Stop: relayd passes the cancel to the producer SDK, which aborts the model call; the page shows `cancelled`."""
    async with chat_page(relayd, page, tokens=2000, tokens_per_s=30) as fake:
        await ask(page, PROMPT)
        await words_shown(page, 3)
        await page.click("#stop")
        await page.wait_for_function(f"{STATUS} === 'cancelled'")
        await fake.wait_for(lambda stats: stats.streams_aborted == 1)

        shown = await page.text_content("#answer")
        assert shown is not None and answer_text(PROMPT, 2000).startswith(shown)
        assert fake.stats.streams_completed == 0
        assert await page.is_disabled("#stop")
