"""Server-Sent Events (``GET /v1/streams/{id}/events``) read with a real HTTP client, line by line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from relayd.config import Config
from tests.helpers import JWT_SECRET, Relayd


def make_jwt(streams: list[str] | None = None, rights: tuple[str, ...] = ("read",), expires_in: float = 300.0) -> str:
    """A consumer JWT with a fractional ``exp`` (precise expiry)."""
    now = time.time()
    claims = {
        "streams": streams or ["*"],
        "rights": list(rights),
        "iat": int(now),
        "exp": now + expires_in,
        "aud": "relayd",
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@dataclass
class Event:
    """One block of the event stream (up to a blank line)."""

    event: str | None = None
    id: str | None = None
    retry: int | None = None
    data_lines: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def data(self) -> str:
        return "\n".join(self.data_lines)

    def json(self) -> Any:
        return orjson.loads(self.data)


class SseReader:
    """Parses an ``text/event-stream`` body as it arrives (the EventSource rules, minus reconnecting)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 10.0) -> Event | None:
        """The next block, or None when the response ended."""
        block = Event()
        started = False
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    assert not started, f"response ended inside a block: {block}"
                    return None
                assert raw.endswith(b"\n"), raw
                line = raw[:-1].decode()
                if line == "":
                    if started:
                        return block
                    continue
                started = True
                if line.startswith(":"):
                    block.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    block.data_lines.append(value)
                elif name == "event":
                    block.event = value
                elif name == "id":
                    block.id = value
                elif name == "retry":
                    block.retry = int(value)
                else:
                    raise AssertionError(f"unexpected field {line!r}")

    async def events(self, timeout: float = 10.0) -> list[Event]:
        """Every block until the response ends."""
        out: list[Event] = []
        while (block := await self.next(timeout)) is not None:
            out.append(block)
        return out


async def open_sse(
    relayd: Relayd, stream: str, token: str | None = None, headers: dict[str, str] | None = None, **params: str
) -> aiohttp.ClientResponse:
    assert relayd.session is not None
    query = dict(params)
    query["token"] = token if token is not None else make_jwt([stream])
    return await relayd.session.get(f"{relayd.url}/v1/streams/{stream}/events", params=query, headers=headers or {})


async def start_events(resp: aiohttp.ClientResponse) -> SseReader:
    """Check the response head and the leading ``retry``; the reader for the rest."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert "no-cache" in resp.headers["Cache-Control"]
    reader = SseReader(resp)
    first = await reader.next()
    assert first is not None and first.retry == 1000 and first.event is None and not first.data_lines
    return reader


async def produce(relayd: Relayd, stream: str, chunks: list[Any], **open_fields: Any) -> list[str]:
    """Write ``chunks`` and end ``stream`` completed; the acknowledged cursors, the end's last."""
    async with await relayd.producer() as producer:
        assert (await producer.open(stream, **open_fields))["type"] == "opened"
        cursors = [(await producer.append(stream, i, chunk))["cursor"] for i, chunk in enumerate(chunks, start=1)]
        cursors.append((await producer.end(stream))["cursor"])
        return cursors


async def test_full_stream_then_end_and_the_response_closes(relayd: Relayd) -> None:
    """A live SSE consumer gets every chunk as ``event: chunk`` with its cursor as id, then ``event: end``, then EOF."""
    async with await open_sse(relayd, "live", wait_ms="30000") as resp:
        reader = await start_events(resp)
        chunks = [{"delta": "Hel"}, {"delta": "lo"}, "plain string", 42, [1, 2]]
        cursors = await produce(relayd, "live", chunks)
        events = await reader.events()
    assert [e.event for e in events] == ["chunk"] * 5 + ["end"]
    assert [e.id for e in events] == cursors
    assert [e.json() for e in events[:-1]] == chunks
    assert events[-1].json() == {"reason": "completed"}


async def test_last_event_id_resumes_with_exactly_the_rest(relayd: Relayd) -> None:
    """A reconnect with ``Last-Event-ID`` gets exactly the chunks after it, then the end."""
    cursors = await produce(relayd, "r", [f"c{i}" for i in range(1, 6)])
    async with await open_sse(relayd, "r", headers={"Last-Event-ID": cursors[1]}) as resp:
        events = await (await start_events(resp)).events()
    assert [e.id for e in events] == cursors[2:]
    assert [e.json() for e in events[:-1]] == ["c3", "c4", "c5"]
    assert events[-1].event == "end"


async def test_cursor_query_resumes_with_exactly_the_rest(relayd: Relayd) -> None:
    """``?cursor=`` resumes like ``Last-Event-ID``; the empty cursor means from the start."""
    cursors = await produce(relayd, "q", ["a", "b", "c"])
    async with await open_sse(relayd, "q", cursor=cursors[0]) as resp:
        events = await (await start_events(resp)).events()
    assert [e.id for e in events] == cursors[1:]
    assert [e.json() for e in events[:-1]] == ["b", "c"]
    async with await open_sse(relayd, "q", cursor="") as resp:
        events = await (await start_events(resp)).events()
    assert [e.id for e in events] == cursors


async def test_reconnect_with_the_end_id_gets_204(relayd: Relayd) -> None:
    """A reconnect whose ``Last-Event-ID`` (or ``?cursor=``) is the end's cursor gets 204 No Content."""
    cursors = await produce(relayd, "e", ["only"])
    async with await open_sse(relayd, "e", headers={"Last-Event-ID": cursors[-1]}) as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    async with await open_sse(relayd, "e", cursor=cursors[-1]) as resp:
        assert resp.status == 204
    # the last chunk's cursor is not the end: the end is sent again
    async with await open_sse(relayd, "e", headers={"Last-Event-ID": cursors[0]}) as resp:
        events = await (await start_events(resp)).events()
    assert [(e.event, e.id) for e in events] == [("end", cursors[-1])]


async def test_text_stream_sends_raw_text_and_multiline_as_several_data_lines(relayd: Relayd) -> None:
    """A ``text`` stream's chunks are sent raw (not JSON); a chunk with newlines becomes several data lines."""
    texts = ["Hello", "line one\nline two\nline three", 'tab\tand "quotes" and {braces}', "crlf\r\nend"]
    await produce(relayd, "txt", texts, content_type="text")
    async with await open_sse(relayd, "txt") as resp:
        reader = await start_events(resp)
        events = await reader.events()
    chunks = events[:-1]
    assert [e.event for e in chunks] == ["chunk"] * 4 and events[-1].event == "end"
    assert chunks[0].data_lines == ["Hello"]
    assert chunks[1].data_lines == ["line one", "line two", "line three"]
    assert chunks[1].data == texts[1]  # what EventSource hands the page
    assert chunks[2].data_lines == ['tab\tand "quotes" and {braces}']
    assert chunks[3].data_lines == ["crlf", "end"]
    # a json stream holding the same string sends it as JSON on one line
    await produce(relayd, "js", [texts[1]])
    async with await open_sse(relayd, "js") as resp:
        events = await (await start_events(resp)).events()
    assert events[0].data_lines == [orjson.dumps(texts[1]).decode()]


async def test_a_stored_non_string_entry_in_a_text_stream_is_sent_as_its_json_text(
    relayd: Relayd, redis_server: str, key_prefix: str
) -> None:
    """A text stream's entry that is not a string (a raw producer could store one before its open was
    answered) reaches SSE readers as its JSON text, between the others; never ``internal`` (issue 9, item 7)."""
    await produce(relayd, "mixed", ["before", 42, {"a": [1]}, "after"])
    client = aioredis.Redis.from_url(redis_server)
    try:  # the stream becomes the text stream such a producer would have left behind
        await client.hset(f"{key_prefix}:{{mixed}}:meta", "ct", "text")
    finally:
        await client.aclose()
    async with await open_sse(relayd, "mixed") as resp:
        events = await (await start_events(resp)).events()
    assert [e.event for e in events] == ["chunk"] * 4 + ["end"], events
    assert [e.data for e in events[:4]] == ["before", "42", '{"a":[1]}', "after"]


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("missing", 401, "unauthorized"),
        ("malformed", 401, "unauthorized"),
        ("expired", 401, "token_expired"),
        ("wrong-stream", 403, "forbidden"),
        ("no-read-right", 403, "forbidden"),
    ],
)
async def test_refusals_are_http_errors_with_a_json_body(relayd: Relayd, kind: str, status: int, code: str) -> None:
    """Refused credentials get 401 (unauthorized, token_expired) or 403 (forbidden) with the JSON error body."""
    tokens = {
        "missing": "",
        "malformed": "a.b.c",
        "expired": make_jwt(["s"], expires_in=-10),
        "wrong-stream": make_jwt(["other"]),
        "no-read-right": make_jwt(["s"], rights=("cancel",)),
    }
    assert relayd.session is not None
    params = {"token": tokens[kind]} if tokens[kind] else {}
    async with relayd.session.get(f"{relayd.url}/v1/streams/s/events", params=params) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"]["code"] == code and isinstance(body["error"]["message"], str)
    # the same refusal through the Authorization header
    headers = {"Authorization": f"Bearer {tokens[kind]}"} if tokens[kind] else {}
    async with relayd.session.get(f"{relayd.url}/v1/streams/s/events", headers=headers) as resp:
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"cursor": "1-\u00b2"}, {}),
        ({"cursor": "\u2460-1"}, {}),
        ({"cursor": "18446744073709551616-1"}, {}),
        ({"cursor": "1-" + "1" * 5000}, {}),
        ({"wait_ms": "\u00b2"}, {}),
        ({"wait_ms": "9" * 5000}, {}),
        ({"wait_ms": "-1"}, {}),
        ({}, {"Last-Event-ID": "1-" + "9" * 5000}),
        ({}, {"Last-Event-ID": "99999999999999999999-1"}),
        ({"error_event": "message"}, {}),
    ],
    ids=[
        "cursor-superscript",
        "cursor-circled",
        "cursor-2^64",
        "cursor-5000-digits",
        "wait_ms-superscript",
        "wait_ms-5000-digits",
        "wait_ms-negative",
        "last-event-id-5000-digits",
        "last-event-id-2^64",
        "unknown-error-event",
    ],
)
async def test_hostile_parameters_are_http_400_bad_frame(
    relayd: Relayd, params: dict[str, str], headers: dict[str, str]
) -> None:
    """A cursor, Last-Event-ID or wait_ms that is not ASCII digits within 2^53-1 is 400 bad_frame, never 500."""
    async with await open_sse(relayd, "s", headers=headers, **params) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]["code"] == "bad_frame"


async def test_authorization_header_token_is_accepted(relayd: Relayd) -> None:
    """``Authorization: Bearer <jwt>`` is accepted instead of ``?token=``."""
    cursors = await produce(relayd, "hdr", ["x"])
    assert relayd.session is not None
    headers = {"Authorization": f"Bearer {make_jwt(['hdr'])}"}
    async with relayd.session.get(f"{relayd.url}/v1/streams/hdr/events", headers=headers) as resp:
        events = await (await start_events(resp)).events()
    assert [e.id for e in events] == cursors


async def test_cors_preflight_and_origin_checks(config_factory: Callable[..., Config]) -> None:
    """An allowed origin gets CORS headers (preflight and stream); a disallowed one gets 403."""
    allowed, evil = "https://app.example", "https://evil.example"
    async with Relayd(config_factory(server={"allowed_origins": [allowed]})) as relayd:
        assert relayd.session is not None
        url = f"{relayd.url}/v1/streams/s/events"
        preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "last-event-id"}
        async with relayd.session.options(url, headers={"Origin": allowed, **preflight}) as resp:
            assert resp.status in (200, 204)
            assert resp.headers["Access-Control-Allow-Origin"] == allowed
            assert "GET" in resp.headers["Access-Control-Allow-Methods"]
            allow_headers = resp.headers["Access-Control-Allow-Headers"].lower()
            assert "last-event-id" in allow_headers and "authorization" in allow_headers
            assert "Origin" in resp.headers.get("Vary", "")
        async with relayd.session.options(url, headers={"Origin": evil, **preflight}) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
            assert (await resp.json())["error"]["code"] == "forbidden"

        cursors = await produce(relayd, "s", ["x"])
        token = make_jwt(["s"])
        async with relayd.session.get(url, params={"token": token}, headers={"Origin": allowed}) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == allowed
            events = await (await start_events(resp)).events()
        assert [e.id for e in events] == cursors
        async with relayd.session.get(url, params={"token": token}, headers={"Origin": evil}) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        # refusals for an allowed origin carry the headers, so the page can read the error
        async with relayd.session.get(url, headers={"Origin": allowed}) as resp:
            assert resp.status == 401
            assert resp.headers["Access-Control-Allow-Origin"] == allowed
        # browsers do not apply CORS to websockets: the origin is checked before the upgrade
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await relayd.session.ws_connect(
                f"{relayd.url}/v1/streams/s/ws", params={"token": token}, headers={"Origin": evil}
            )
        assert refused.value.status == 403


async def test_token_expiry_while_streaming_sends_error_then_closes(relayd: Relayd) -> None:
    """When the token expires mid-stream, relayd sends ``event: relayd-error`` with token_expired and closes."""
    async with await relayd.producer() as producer:
        await producer.open("open")
        await producer.append("open", 1, "first")
        token = make_jwt(["open"], expires_in=1.2)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        async with await open_sse(relayd, "open", token=token) as resp:
            reader = await start_events(resp)
            chunk = await reader.next()
            assert chunk is not None and chunk.event == "chunk" and chunk.json() == "first"
            events = await reader.events()
        assert time.time() >= exp - 0.05
        assert [e.event for e in events] == ["relayd-error"], events
        assert events[0].json()["code"] == "token_expired" and events[0].id is None
        meta = await relayd.relay._store.read_meta("open")
        assert meta is not None and meta.status == "open"  # only the consumer went away


async def test_keepalive_comment_is_sent(config_factory: Callable[..., Config]) -> None:
    """A quiet stream gets a ``: keepalive`` comment every consumer.sse_keepalive_s."""
    async with Relayd(config_factory(consumer={"sse_keepalive_s": 0.2})) as relayd, await relayd.producer() as producer:
        await producer.open("quiet")
        async with await open_sse(relayd, "quiet") as resp:
            reader = await start_events(resp)
            for _ in range(2):
                block = await reader.next(timeout=5)
                assert block is not None and block.comments == ["keepalive"], block
                assert block.event is None and not block.data_lines
            # data still flows between keepalives
            await producer.append("quiet", 1, "late")
            while True:
                block = await reader.next(timeout=5)
                assert block is not None
                if block.event is not None:
                    break
            assert block.event == "chunk" and block.json() == "late"
