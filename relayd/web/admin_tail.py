"""``GET /v1/admin/streams/{stream}/tail``: follow a stream as NDJSON, for ``relayd streams tail``.

A hub subscription exactly like a consumer's (the same :class:`~relayd.subscription.Subscription` and
:class:`~relayd.outbox.Outbox`, so the history->live handoff, slow-reader catch-up and the end
behave the same), framed as the consumer websocket's frames, one per line, on a streamed HTTP
response. A blank line every ``consumer.sse_keepalive_s`` keeps proxies from closing an idle one
and lets relayd notice a reader that went away.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from relayd.model import StreamMeta
from relayd.outbox import Outbox
from relayd.protocol import WS_CODEC
from relayd.relay import Subscription
from relayd.web.keys import RUNTIME
from relayd.web.transport import backlog_of, deliver

NDJSON = "application/x-ndjson"


class _Done:
    """Owner of the tail's single subscription: wakes the handler when it ends."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def subscription_done(self, sub: Subscription) -> None:
        self.event.set()


async def follow(
    request: web.Request, stream: str, meta: StreamMeta | None, *, from_start: bool, wait_s: float = 0
) -> web.StreamResponse:
    """Chunks from the start (``from_start``) or from now, then live, until the end.

    No ``meta`` (not created yet): wait up to ``wait_s`` for it, then follow it from its start.
    """
    rt = request.app[RUNTIME]
    cfg = rt.config
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(batch: list[bytes]) -> None:
        await response.write(b"\n".join(batch) + b"\n")

    outbox = Outbox(send, cfg.consumer.max_queue_bytes, cfg.consumer.send_timeout_ms / 1000, backlog_of(request))
    done = _Done()
    cursor = None if from_start or meta is None else (meta.gen, meta.n)  # "now": after the last entry stored
    sub = rt.relay.subscribe(stream, outbox, WS_CODEC, cursor=cursor, wait_s=wait_s, owner=done)

    async def drain_close() -> None:
        outbox.control(WS_CODEC.error(stream, "shutting_down", "relayd is restarting"))
        done.event.set()

    async def stop() -> None:
        rt.consumers.discard(drain_close)
        await sub.stop()

    rt.consumers.add(drain_close)
    sub.start()
    every_s = cfg.consumer.sse_keepalive_s
    await deliver(outbox, done.event, stop, keepalive=b"", every_s=every_s, name="relayd-admin-tail-writer")
    return response
