"""Browser fixtures: one real headless Chromium for the session, a fresh context and page per test.

Every test under tests/browser/ runs in the session's event loop (Playwright's objects belong to
the loop that made them, and starting Chromium once saves ~3 s per test). The hook below marks
them so; async fixtures they use must be ``loop_scope="session"`` too, which is why ``relayd`` is
redefined here with that loop scope (still one relayd per test).

Fixtures:

- ``browser``: the session's Chromium (Debian's /usr/bin/chromium, never a downloaded one).
- ``context``: a fresh browser context per test (own cookies, storage, cache).
- ``page``: a page in it. Its console, page errors and websocket opens/closes are logged; when
  the test fails, a screenshot and that log are written to ``test-artifacts/<test>.png`` and
  ``.log`` and both paths are printed in the failure report (section "browser artifacts").
- ``page_server``: an aiohttp app on 127.0.0.1 port 0 serving tests/browser/pages/ (and any
  page a test adds with ``serve``), plus ``POST /token`` minting consumer tokens with the test
  JWT secret (``?streams=a,b&rights=read,cancel&ttl_s=2``); ``minted`` lists what it minted.
- ``relayd``: as in tests/conftest.py, in the session loop.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright, WebSocket, async_playwright

from relayd.auth import TokenAuthority
from relayd.config import Config
from tests.helpers import JWT_SECRET, Relayd

CHROMIUM = os.environ.get("RELAYD_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
PAGES = Path(__file__).parent / "pages"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
_HERE = Path(__file__).parent.resolve()
_SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if pytest_asyncio.is_async_test(item) and _HERE in Path(item.path).resolve().parents:
            item.add_marker(_SESSION_LOOP, append=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item; name the artifacts in a failed call's report."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    artifacts = item.stash.get(_ARTIFACTS, None)
    if report.when == "call" and report.failed and artifacts is not None:
        png, log = artifacts
        report.sections.append(("browser artifacts", f"screenshot:  {png}\nconsole log: {log}"))
    return report


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_ARTIFACTS = pytest.StashKey[tuple[Path, Path]]()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the browser tests need Debian's chromium package. "
            "Run the suite with scripts/test.sh, which installs it (apt-get) when missing.",
            pytrace=False,
        )
    pw: Playwright = await async_playwright().start()
    try:
        # launch() gives the browser a fresh temporary user-data dir and removes it on close.
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()
    finally:
        await pw.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context()
    ctx.set_default_timeout(15_000)
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest_asyncio.fixture(loop_scope="session")
async def page(context: BrowserContext, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    page = await context.new_page()
    log: list[str] = []
    started = time.monotonic()

    def note(line: str) -> None:
        log.append(f"{time.monotonic() - started:8.3f}s {line}")

    def on_console(msg: ConsoleMessage) -> None:
        note(f"[console.{msg.type}] {msg.text}")

    def on_websocket(ws: WebSocket) -> None:
        note(f"[websocket] open {ws.url}")
        ws.on("close", lambda _: note(f"[websocket] closed {ws.url}"))

    page.on("console", on_console)
    page.on("pageerror", lambda exc: note(f"[pageerror] {exc}"))
    page.on("websocket", on_websocket)
    page.on("requestfailed", lambda req: note(f"[requestfailed] {req.method} {req.url}: {req.failure}"))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    png, log_path = ARTIFACTS / f"{name}.png", ARTIFACTS / f"{name}.log"
    request.node.stash[_ARTIFACTS] = (png, log_path)
    yield page
    report = request.node.stash.get(_REPORTS, {}).get("call")
    if report is not None and report.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            await page.screenshot(path=str(png), full_page=True, timeout=5_000)
        except Exception as exc:  # the page may have crashed: keep the log anyway
            note(f"[artifacts] screenshot failed: {exc}")
        log_path.write_text("\n".join(log) + "\n")


class PageServer:
    """The test web app: static pages for the browser, and a token endpoint like a backend's."""

    def __init__(self) -> None:
        self.tokens = TokenAuthority(secret=JWT_SECRET, max_ttl_s=86_400)
        self.minted: list[dict[str, Any]] = []
        self.extra: dict[str, tuple[bytes, str]] = {}
        self.port = 0
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_get("/{path:.*}", self._static)
        self.runner = web.AppRunner(app, access_log=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, path: str, body: str | bytes, content_type: str = "text/html") -> str:
        """Serve ``body`` at ``/path``; returns its URL."""
        self.extra[path.lstrip("/")] = (body.encode() if isinstance(body, str) else body, content_type)
        return f"{self.url}/{path.lstrip('/')}"

    async def _static(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if path in self.extra:
            body, content_type = self.extra[path]
            return web.Response(body=body, content_type=content_type)
        file = (PAGES / path).resolve()
        if PAGES.resolve() not in file.parents or not file.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(file, headers={"Cache-Control": "no-store"})

    async def _token(self, request: web.Request) -> web.Response:
        streams = request.query.get("streams", "*").split(",")
        rights = request.query.get("rights", "read").split(",")
        ttl_s = int(request.query.get("ttl_s", "300"))
        token, expires_at = self.tokens.mint(streams, rights, ttl_s=ttl_s)
        self.minted.append({"streams": streams, "rights": rights, "expires_at": expires_at, "at": time.time()})
        return web.json_response({"token": token, "expires_at": expires_at})


@pytest_asyncio.fixture(loop_scope="session")
async def page_server() -> AsyncIterator[PageServer]:
    server = PageServer()
    await server.runner.setup()
    site = web.TCPSite(server.runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await server.runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def relayd(config_factory: Callable[..., Config]) -> AsyncIterator[Relayd]:
    """A relayd in the session loop (the browser's), on a free port, with default test config."""
    async with Relayd(config_factory()) as server:
        yield server
