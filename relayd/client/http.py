"""Produce over plain HTTP: one request per write, for code that cannot hold the ingest websocket.

``POST /v1/streams/{id}/append`` (docs/protocol.md, "HTTP ingest"): a serverless function or a
script appends a few chunks, and ends the stream, without a :class:`~relayd.client.Producer`'s
connection. Each call is answered once relayd has the chunks in Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from relayd.client.errors import ConnectionFailed, refused_from_frame

__all__ = ["http_append"]


async def http_append(
    url: str,
    api_key: str,
    stream: str,
    *,
    epoch: int,
    seq: int = 0,
    chunks: Sequence[Any] = (),
    end: str | None = None,
    message: str = "",
    content_type: str | None = None,
    producer: str | None = None,
    session: aiohttp.ClientSession | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Append ``chunks`` (JSON values; the first has sequence number ``seq``) to ``stream`` as its
    producer of ``epoch``, then end it with ``end`` (``"completed"``, ``"error"``, ``"cancelled"``)
    if given. Without chunks nor ``end``: a heartbeat.

    Returns relayd's answer: ``seq``, ``cursor``, ``stored`` (0 for a resend), ``cancel_requested``
    (stop generating, end with ``"cancelled"``) and ``ended`` when the call ended the stream. A
    call whose answer was lost can be repeated as is. Raises the :class:`~relayd.client.Refused`
    subclass of relayd's refusal (``ProducerFenced``, ``StreamAlreadyEnded``, ``Unauthorized``, …;
    ``code`` ``seq_gap`` with ``seq``, the last stored; ``overloaded`` or ``store_unavailable``:
    retry later) or :class:`~relayd.client.ConnectionFailed`.
    """
    body: dict[str, Any] = {"epoch": epoch}
    if chunks:
        body["seq"] = seq
        body["chunks"] = list(chunks)
    if end is not None:
        body["end"] = {"reason": end, "message": message}
    if content_type is not None:
        body["content_type"] = content_type
    if producer is not None:
        body["producer"] = producer
    target = f"{url.rstrip('/')}/v1/streams/{quote(stream, safe='/:@=')}/append"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    own = session is None
    http = aiohttp.ClientSession() if session is None else session
    try:
        async with http.post(
            target, data=orjson.dumps(body), headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            answer = await response.json(loads=orjson.loads, content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ConnectionFailed(f"append to {target} failed: {exc}") from exc
    finally:
        if own:
            await http.close()
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(error, dict):
            raise ConnectionFailed(f"append to {target}: HTTP {status}")
        raise refused_from_frame({**error, "stream": stream})
    if not isinstance(answer, dict):
        raise ConnectionFailed(f"append to {target}: not a JSON object")
    return answer
