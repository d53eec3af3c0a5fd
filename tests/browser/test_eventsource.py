"""relayd's SSE endpoint under a plain browser ``EventSource`` (Chromium), no client library (issue 9, item 13).

relayd's error event is ``relayd-error``: it never reaches a page's ``error`` listener (which
``EventSource`` fires itself when the connection drops), the page written as docs/protocol.md shows
stops on it, and a page that ignores it reconnects only after the ``retry`` relayd sent with it.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from playwright.async_api import Page

from tests.browser.conftest import PageServer
from tests.helpers import Relayd

PAGE = """<!doctype html>
<script>
  const url = new URL(location.href).searchParams.get("sse");
  window.seen = {opens: [], relaydErrors: [], errorEvents: [], closed: false};
  const es = new EventSource(url);
  es.onopen = () => window.seen.opens.push(performance.now());
  es.addEventListener("relayd-error", (e) => {
    window.seen.relaydErrors.push(JSON.parse(e.data));
    if (new URL(location.href).searchParams.get("stop") === "1") { es.close(); window.seen.closed = true; }
  });
  // EventSource's own "error": a dropped or ended connection. It must never carry relayd's data.
  es.addEventListener("error", (e) => window.seen.errorEvents.push(
    {at: performance.now(), data: e.data === undefined ? null : e.data, state: es.readyState}));
</script>
"""


async def open_page(page: Page, page_server: PageServer, relayd: Relayd, stop: bool, **params: str) -> None:
    """A page with a plain EventSource on a stream that never appears (``stream_not_found`` after 100 ms)."""
    query = urlencode({"token": relayd.token(["never"]), "wait_ms": "100", **params})
    sse = f"{relayd.url}/v1/streams/never/events?{query}"
    page_url = page_server.serve("eventsource.html", PAGE)
    await page.goto(f"{page_url}?{urlencode({'stop': int(stop), 'sse': sse})}")


async def test_a_page_following_the_docs_stops_on_relayd_error(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    """stream_not_found arrives as relayd-error; the page closes its EventSource; no error event carries data."""
    await open_page(page, page_server, relayd, stop=True)
    await page.wait_for_function("window.seen.closed")
    seen = await page.evaluate("window.seen")
    assert [e["code"] for e in seen["relaydErrors"]] == ["stream_not_found"]
    assert len(seen["opens"]) == 1
    assert all(e["data"] is None for e in seen["errorEvents"]), seen


async def test_a_plain_eventsource_that_ignores_relayd_error_backs_off(
    page: Page, page_server: PageServer, relayd: Relayd
) -> None:
    """A page listening only for ``error`` sees no relayd data in it and reconnects after ~10 s, not 1 s."""
    await open_page(page, page_server, relayd, stop=False)
    await page.wait_for_function("window.seen.opens.length >= 2", timeout=30_000)
    seen = await page.evaluate("window.seen")
    assert all(e["data"] is None for e in seen["errorEvents"]), seen
    dropped = seen["errorEvents"][0]
    assert dropped["state"] == 0  # CONNECTING: EventSource reconnects by itself
    assert seen["opens"][1] - dropped["at"] >= 9_000, seen  # retry: 10000 came with the relayd-error


async def test_the_legacy_event_name_is_kept_on_request(page: Page, page_server: PageServer, relayd: Relayd) -> None:
    """``?error_event=error``: the relayd 0.1 name, for pages not yet moved to relayd-error."""
    await open_page(page, page_server, relayd, stop=False, error_event="error")
    await page.wait_for_function("window.seen.errorEvents.some((e) => e.data !== null)")
    seen = await page.evaluate("window.seen")
    assert seen["relaydErrors"] == []
    legacy = next(e for e in seen["errorEvents"] if e["data"] is not None)
    assert json.loads(legacy["data"])["code"] == "stream_not_found"
