"""examples/ai-chat in a real Chromium: the AI SDK's Chat with relayd's ChatTransport.

The example's Node server (examples/ai-chat/server.mjs) relays its demo model's
streamText(...).toUIMessageStream() into relayd; the page reads the answer through relayd. A
reload mid-answer resumes it (one answer, complete, no repeated words); Stop cancels the model call.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Page

from tests.helpers import API_KEY, JWT_SECRET, Relayd, poll_until
from tests.jsnode import build, require_node

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ai-chat"


class ChatApp:
    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url


@pytest_asyncio.fixture(loop_scope="session")
async def chat_app(relayd: Relayd) -> AsyncIterator[ChatApp]:
    """The example's server on a free port, against the test's relayd; its model holds after 3 words."""
    node = require_node()
    if not (EXAMPLE / "node_modules" / "ai").is_dir():
        pytest.fail("examples/ai-chat needs `npm ci` (scripts/test.sh runs it)", pytrace=False)
    build()  # the example imports @relayd/client from clients/js (its dist)
    env = {
        **os.environ,
        "RELAYD_URL": relayd.url,
        "RELAYD_API_KEY": API_KEY,
        "RELAYD_JWT_SECRET": JWT_SECRET,
        "PORT": "0",
        "WORD_MS": "5",
        "HOLD_AFTER": "3",
    }
    proc = await asyncio.create_subprocess_exec(
        node, "server.mjs", cwd=EXAMPLE, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    match = re.search(r"listening on (\S+)", line)
    assert match, f"the example did not start: {line}{(await proc.stdout.read(4000)).decode()}"
    try:
        yield ChatApp(proc, match.group(1))
    finally:
        proc.terminate()
        await proc.wait()


async def assistant_text(page: Page) -> str:
    return await page.evaluate("[...document.querySelectorAll('.assistant')].map(e => e.textContent).join('|')")


async def test_a_reload_mid_answer_resumes_the_answer_through_relayd(chat_app: ChatApp, page: Page) -> None:
    await page.goto(chat_app.url)
    await page.click("#send")
    await page.wait_for_function("document.querySelector('.assistant')?.textContent.split(' ').length >= 3")
    await page.reload()  # mid-answer: the model is held after its third word
    # The answer so far is replayed from relayd into the rebuilt page.
    await page.wait_for_function("document.querySelector('.assistant')?.textContent === 'relayd keeps this '")
    await page.request.post(f"{chat_app.url}/api/release")
    await page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    await page.wait_for_function("document.querySelector('.assistant')?.textContent.endsWith('cancelled.')")
    text = await assistant_text(page)
    assert "|" not in text, "one assistant message"
    assert text.count("relayd keeps") == 1 and text.endswith("the model call is cancelled."), text
    assert await page.locator(".user").count() == 1


async def test_stop_cancels_the_model_call(chat_app: ChatApp, page: Page) -> None:
    await page.goto(chat_app.url)
    await page.click("#send")
    await page.wait_for_function("document.querySelector('.assistant')?.textContent.split(' ').length >= 3")
    await page.click("#stop")
    await page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    await page.request.post(f"{chat_app.url}/api/release")  # the model goes on: it sees its signal aborted

    async def cancelled_and_aborted() -> bool:
        stats = await (await page.request.get(f"{chat_app.url}/api/stats")).json()
        return bool(stats.get("cancelled") == 1 and stats.get("aborted") == 1)

    await poll_until(cancelled_and_aborted, "the stream ended cancelled and the model call saw its signal aborted")
    assert (await assistant_text(page)).startswith("relayd keeps this")
