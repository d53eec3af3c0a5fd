"""Consumer websocket (``/v1/streams/{id}/ws`` and ``/v1/ws``): credentials, expiry, multiplexing, waiting, replay."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.typing import Subprotocol
from yarl import URL

from relayd.config import Config
from tests.helpers import JWT_SECRET, Peer, Relayd, collect_chunks


def make_jwt(
    streams: list[str] | None = None,
    rights: tuple[str, ...] = ("read",),
    expires_in: float = 300.0,
    secret: str = JWT_SECRET,
    **claims: Any,
) -> str:
    """A consumer JWT signed like a backend would, with a fractional ``exp`` for precise expiry."""
    now = time.time()
    payload = {
        "streams": streams or ["*"],
        "rights": list(rights),
        "iat": int(now),
        "exp": now + expires_in,
        "aud": "relayd",
        **claims,
    }
    return jwt.encode(payload, secret, algorithm="HS256")


def tamper_payload(token: str) -> str:
    """The same token with its payload rewritten (wider streams, later exp) and the old signature."""
    header, payload, signature = token.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["streams"] = ["*"]
    claims["exp"] = claims["exp"] + 10_000
    forged = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def tamper_signature(token: str) -> str:
    """The same token with one character of its signature changed."""
    head, _, signature = token.rpartition(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    return f"{head}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


async def close_of(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> tuple[int, str]:
    """Wait for the server's close frame (skipping data frames); its code and reason."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return msg.data, msg.extra
            assert msg.type is aiohttp.WSMsgType.TEXT, f"no close frame: {msg}"


async def ws_connect(relayd: Relayd, path: str, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    assert relayd.session is not None
    return await relayd.session.ws_connect(f"{relayd.url}{path}", **kwargs)


async def produce(relayd: Relayd, stream: str, chunks: list[Any], end: str | None = "completed") -> list[str]:
    """Write ``chunks`` (and the end) to ``stream``; the cursors relayd acknowledged (end last)."""
    async with await relayd.producer() as producer:
        opened = await producer.open(stream)
        assert opened["type"] == "opened", opened
        cursors = []
        for i, chunk in enumerate(chunks, start=1):
            ack = await producer.append(stream, i, chunk)
            assert ack["type"] == "ack", ack
            cursors.append(ack["cursor"])
        if end is not None:
            ended = await producer.end(stream, end, **({"message": "boom"} if end == "error" else {}))
            assert ended["type"] == "ended", ended
            cursors.append(ended["cursor"])
        return cursors


async def pong(peer: Peer, ping_id: str = "sync") -> list[dict[str, Any]]:
    """Ping and wait for the pong: the frames that came before it (the connection is still serving)."""
    await peer.send({"op": "ping", "id": ping_id})
    seen, frame = await peer.until("pong")
    assert frame == {"type": "pong", "id": ping_id}
    return seen


# -- where the token comes from -------------------------------------------------------------------


async def test_token_in_query_string(relayd: Relayd) -> None:
    """``?token=`` authenticates; the consumer then gets the stream."""
    await produce(relayd, "q", ["one"])
    consumer = await relayd.consumer("q", token=make_jwt(["q"]))
    await consumer.expect("subscribed", stream="q")
    chunks, end = await collect_chunks(consumer, "q")
    assert [c["data"] for c in chunks] == ["one"] and end["reason"] == "completed"


async def test_token_in_subprotocol_with_websockets_library(relayd: Relayd) -> None:
    """``Sec-WebSocket-Protocol: relayd.v1, bearer.<jwt>`` authenticates and relayd answers ``relayd.v1``."""
    await produce(relayd, "sp", [{"delta": "hi"}])
    token = make_jwt(["sp"])
    url = f"{relayd.ws_url}/v1/streams/sp/ws"
    async with connect(url, subprotocols=[Subprotocol("relayd.v1"), Subprotocol(f"bearer.{token}")]) as ws:
        assert ws.subprotocol == "relayd.v1"
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while not frames or frames[-1]["type"] != "end":
                message = await ws.recv()
                assert isinstance(message, str)  # relayd sends text messages only
                frames += [orjson.loads(line) for line in message.split("\n") if line.strip()]
        assert [f["type"] for f in frames] == ["subscribed", "chunk", "end"], frames
        assert frames[1]["data"] == {"delta": "hi"} and frames[2]["reason"] == "completed"
        assert ws.request is not None and token not in ws.request.path  # the token stayed out of the URL

    # a refused subprotocol token still gets relayd.v1, then the close code
    bad = tamper_signature(token)
    async with connect(url, subprotocols=[Subprotocol("relayd.v1"), Subprotocol(f"bearer.{bad}")]) as ws:
        assert ws.subprotocol == "relayd.v1"
        with pytest.raises(WsConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "unauthorized")


async def test_token_in_authorization_header(relayd: Relayd) -> None:
    """``Authorization: Bearer <jwt>`` authenticates a non-browser consumer."""
    await produce(relayd, "h", ["x", "y"])
    ws = await ws_connect(relayd, "/v1/streams/h/ws", headers={"Authorization": f"Bearer {make_jwt(['h'])}"})
    async with Peer(ws) as consumer:
        await consumer.expect("subscribed", stream="h")
        chunks, end = await collect_chunks(consumer, "h")
        assert [c["data"] for c in chunks] == ["x", "y"] and end["reason"] == "completed"


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "code", "reason"),
    [
        ("missing", 4001, "unauthorized"),
        ("malformed", 4001, "unauthorized"),
        ("garbage-segments", 4001, "unauthorized"),
        ("tampered-payload", 4001, "unauthorized"),
        ("tampered-signature", 4001, "unauthorized"),
        ("other-secret", 4001, "unauthorized"),
        ("wrong-audience", 4001, "unauthorized"),
        ("expired", 4002, "token_expired"),
        ("wrong-stream", 4003, "forbidden"),
        ("no-read-right", 4003, "forbidden"),
    ],
)
async def test_refused_token_closes_with_the_documented_code(relayd: Relayd, kind: str, code: int, reason: str) -> None:
    """A refused token opens the websocket and closes it at once with the close code and the error code as reason."""
    tokens: dict[str, str | None] = {
        "missing": None,
        "malformed": "not-a-jwt",
        "garbage-segments": "abc.def.ghi",
        "tampered-payload": tamper_payload(make_jwt(["other"])),
        "tampered-signature": tamper_signature(make_jwt(["s"])),
        "other-secret": make_jwt(["s"], secret="another-secret-0123456789abcdef-0123"),
        "wrong-audience": make_jwt(["s"], aud="somebody-else"),
        "expired": make_jwt(["s"], expires_in=-30),
        "wrong-stream": make_jwt(["other", "s-prefix/*"]),
        "no-read-right": make_jwt(["s"], rights=("cancel",)),
    }
    token = tokens[kind]
    ws = await ws_connect(relayd, "/v1/streams/s/ws", params={} if token is None else {"token": token})
    try:
        assert await close_of(ws) == (code, reason)
    finally:
        await ws.close()


async def test_subscribe_op_outside_the_token_is_forbidden_and_the_connection_stays(relayd: Relayd) -> None:
    """On ``/v1/ws`` a subscribe the token does not cover gets error forbidden; allowed streams still work."""
    await produce(relayd, "mine", ["ok"])
    consumer = await relayd.consumer(token=make_jwt(["mine"]))
    await consumer.send({"op": "subscribe", "stream": "yours"})
    await consumer.expect("error", code="forbidden", stream="yours")
    await consumer.send({"op": "subscribe", "stream": "bad id"})
    await consumer.expect("error", code="invalid_stream_id")
    await consumer.send({"op": "subscribe", "stream": "mine"})
    await consumer.expect("subscribed", stream="mine")
    chunks, end = await collect_chunks(consumer, "mine")
    assert [c["data"] for c in chunks] == ["ok"] and end["reason"] == "completed"


async def test_cancel_without_the_right_is_an_error_frame_forbidden(relayd: Relayd) -> None:
    """A read-only token asking to cancel gets error forbidden (not a close); the stream is not cancelled."""
    async with await relayd.producer() as producer:
        await producer.open("c")
        consumer = await relayd.consumer("c", token=make_jwt(["c"], rights=("read",)))
        await consumer.expect("subscribed", stream="c")
        await consumer.send({"op": "cancel", "stream": "c"})
        await consumer.expect("error", code="forbidden", stream="c")
        assert await pong(consumer) == []
        await producer.append("c", 1, "still going")
        await consumer.expect("chunk", stream="c", data="still going")
        meta = await relayd.relay._store.read_meta("c")
        assert meta is not None and meta.status == "open"


async def test_bad_cursor_is_an_error_frame_then_a_normal_close(relayd: Relayd) -> None:
    """A malformed ``cursor`` on the URL is answered with error bad_frame and a normal close."""
    ws = await ws_connect(relayd, "/v1/streams/s/ws", params={"token": make_jwt(), "cursor": "not-a-cursor"})
    try:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT
        frame = orjson.loads(msg.data)
        assert frame["type"] == "error" and frame["code"] == "bad_frame", frame
        assert await close_of(ws) == (1000, "bad_frame")
    finally:
        await ws.close()


@pytest.mark.parametrize(
    "line",
    [
        '{"op": "subscribe", "stream": "s", "cursor": "1-\u00b2"}',
        '{"op": "subscribe", "stream": "s", "cursor": "\u2460-1"}',
        '{"op": "subscribe", "stream": "s", "cursor": "1-' + "1" * 5000 + '"}',
        '{"op": "subscribe", "stream": "s", "cursor": "18446744073709551616-1"}',
        '{"op": "subscribe", "stream": "s", "wait_ms": "\u00b2"}',
        '{"op": "subscribe", "stream": "s", "wait_ms": 9007199254740992}',
        '{"op": "ping", "id": ' + "[" * 254 + "]" * 254 + "}",
        '{"op": "ping", "id": ' + "[" * 1023 + "]" * 1023 + "}",
        '{"op": {"a": 1}}',
    ],
    ids=[
        "cursor-superscript",
        "cursor-circled",
        "cursor-5000-digits",
        "cursor-2^64",
        "wait_ms-string",
        "wait_ms-2^53",
        "ping-id-254-deep",
        "ping-id-1023-deep",
        "op-object",
    ],
)
async def test_hostile_frames_get_an_error_frame_and_the_connection_stays(relayd: Relayd, line: str) -> None:
    """Non-ASCII digits, integers past 2^53-1 and deep nesting earn bad_frame/unknown_op; the socket stays up."""
    async with await relayd.consumer() as consumer:
        await consumer.send_raw(line)
        frame = await consumer.next()
        assert frame["type"] == "error" and frame["code"] in ("bad_frame", "unknown_op"), frame
        await consumer.send({"op": "ping", "id": "alive"})
        assert await consumer.next() == {"type": "pong", "id": "alive"}


@pytest.mark.parametrize("params", [{"wait_ms": "\u00b2"}, {"wait_ms": "9" * 5000}, {"cursor": "1-\u2460"}])
async def test_hostile_url_parameters_are_an_error_frame_then_a_normal_close(
    relayd: Relayd, params: dict[str, str]
) -> None:
    """A ``wait_ms`` or ``cursor`` on the URL that is not ASCII digits (or too long) is bad_frame, not a crash."""
    ws = await ws_connect(relayd, "/v1/streams/s/ws", params={"token": make_jwt(), **params})
    try:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        frame = orjson.loads(msg.data)
        assert frame["type"] == "error" and frame["code"] == "bad_frame", frame
        assert await close_of(ws) == (1000, "bad_frame")
    finally:
        await ws.close()


# -- expiry and re-authentication -------------------------------------------------------------------


async def test_token_expiring_while_connected_closes_4002(relayd: Relayd) -> None:
    """A token that expires while the consumer is connected closes the connection with 4002 token_expired."""
    expires_in = 1.2
    token = make_jwt(["live"], expires_in=expires_in)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    ws = await ws_connect(relayd, "/v1/streams/live/ws", params={"token": token, "wait_ms": "30000"})
    try:
        first = await ws.receive(timeout=10)
        assert first.type is aiohttp.WSMsgType.TEXT and orjson.loads(first.data)["type"] == "subscribed"
        assert await close_of(ws) == (4002, "token_expired")
        assert time.time() >= exp - 0.05  # not before the exp claim
    finally:
        await ws.close()


async def test_auth_op_refreshes_the_token_past_the_first_expiry(relayd: Relayd) -> None:
    """``auth`` with a fresh token before expiry keeps the connection open after the old token's expiry."""
    old = make_jwt(["r"], expires_in=1.2)
    fresh = make_jwt(["r"], expires_in=300)
    fresh_exp = jwt.decode(fresh, options={"verify_signature": False})["exp"]
    async with await relayd.producer() as producer:
        await producer.open("r")
        control = await relayd.consumer("r", token=old)  # same old token, not refreshed
        refreshed = await relayd.consumer("r", token=old)
        await control.expect("subscribed", stream="r")
        await refreshed.expect("subscribed", stream="r")
        await refreshed.send({"op": "auth", "token": fresh})
        await refreshed.expect("authed", expires_at=int(fresh_exp))
        # the old token's expiry has passed once the control connection is closed for it
        assert await control.closed() == 4002
        assert await pong(refreshed) == []
        await producer.append("r", 1, "after expiry")
        await refreshed.expect("chunk", stream="r", data="after expiry")


async def test_auth_op_with_a_bad_or_narrower_token(relayd: Relayd) -> None:
    """A refused ``auth`` token is an error frame; a narrower one ends the subscriptions it no longer covers."""
    consumer = await relayd.consumer(token=make_jwt(["a", "b"]))
    await consumer.send({"op": "auth", "token": "garbage"})
    await consumer.expect("error", code="unauthorized")
    await consumer.send({"op": "auth", "token": make_jwt(["a"], expires_in=-5)})
    await consumer.expect("error", code="token_expired")
    await consumer.send({"op": "subscribe", "stream": "a", "wait_ms": 30000})
    await consumer.send({"op": "subscribe", "stream": "b", "wait_ms": 30000})
    await consumer.expect("subscribed", stream="a")
    await consumer.expect("subscribed", stream="b")
    narrower = make_jwt(["a"])
    await consumer.send({"op": "auth", "token": narrower})
    await consumer.expect("error", code="forbidden", stream="b")
    await consumer.expect("authed")
    await produce(relayd, "b", ["not for you"])
    await produce(relayd, "a", ["for you"])
    chunks, end = await collect_chunks(consumer)
    assert [(c["stream"], c["data"]) for c in chunks] == [("a", "for you")] and end["stream"] == "a"


# -- multiplexing -------------------------------------------------------------------------------


async def test_one_connection_follows_two_streams(relayd: Relayd) -> None:
    """``/v1/ws`` with two subscribes gets each stream's chunks and end, each frame naming its stream."""
    consumer = await relayd.consumer()
    await consumer.send({"op": "subscribe", "stream": "s1"}, {"op": "subscribe", "stream": "s2"})
    await consumer.expect("subscribed", stream="s1")
    await consumer.expect("subscribed", stream="s2")
    async with await relayd.producer() as producer:
        await producer.open("s1")
        await producer.open("s2")
        for i in range(1, 6):
            await producer.append("s1", i, f"s1:{i}")
            await producer.append("s2", i, f"s2:{i}")
        await producer.end("s2")
        await producer.end("s1", "error", message="boom")
    got: dict[str, list[str]] = {"s1": [], "s2": []}
    ends: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(10):
        while len(ends) < 2:
            frame = await consumer.next()
            if frame["type"] == "chunk":
                assert frame["data"].startswith(frame["stream"] + ":"), frame
                got[frame["stream"]].append(frame["data"])
            else:
                assert frame["type"] == "end" and frame["stream"] not in ends, frame
                ends[frame["stream"]] = frame
    assert got == {"s1": [f"s1:{i}" for i in range(1, 6)], "s2": [f"s2:{i}" for i in range(1, 6)]}
    assert ends["s1"]["reason"] == "error" and ends["s1"]["message"] == "boom"
    assert ends["s2"]["reason"] == "completed"


async def test_unsubscribe_stops_delivery_of_that_stream_only(relayd: Relayd) -> None:
    """After ``unsubscribe`` no frame of that stream arrives; the other stream keeps flowing; resubscribe works."""
    consumer = await relayd.consumer()
    await consumer.send({"op": "subscribe", "stream": "keep"}, {"op": "subscribe", "stream": "drop"})
    async with await relayd.producer() as producer:
        await producer.open("keep")
        await producer.open("drop")
        await producer.append("drop", 1, "d1")
        await producer.append("keep", 1, "k1")
        _, first = await consumer.until("chunk")
        _, second = await consumer.until("chunk")
        # each stream's chunks come in order; between streams relayd promises no order
        assert {(f["stream"], f["data"]) for f in (first, second)} == {("drop", "d1"), ("keep", "k1")}
        await consumer.send({"op": "unsubscribe", "stream": "drop"})
        await pong(consumer, "after-unsubscribe")
        # producer acks come after the publication to local subscribers: a ping after them
        # proves no frame of "drop" was queued
        await producer.append("drop", 2, "d2")
        await producer.end("drop")
        await producer.append("keep", 2, "k2")
        seen = await pong(consumer, "after-writes")
        assert all(f.get("stream") != "drop" for f in seen), seen
        assert [f["data"] for f in seen if f["type"] == "chunk"] == ["k2"], seen
        # subscribing again replays it all
        await consumer.send({"op": "subscribe", "stream": "drop"})
        await consumer.expect("subscribed", stream="drop")
        chunks, end = await collect_chunks(consumer, "drop")
        assert [c["data"] for c in chunks] == ["d1", "d2"] and end["reason"] == "completed"


# -- streams that do not exist (yet) ----------------------------------------------------------------


async def test_subscribe_waits_for_a_stream_that_does_not_exist_yet(relayd: Relayd) -> None:
    """A consumer subscribed before the stream exists gets it once a producer opens and writes it."""
    by_path = await relayd.consumer("later", wait_ms="30000")
    await by_path.expect("subscribed", stream="later")
    by_op = await relayd.consumer()
    await by_op.send({"op": "subscribe", "stream": "later", "wait_ms": 30000})
    await by_op.expect("subscribed", stream="later")
    assert await pong(by_path) == [] and await pong(by_op) == []  # nothing yet, still waiting
    cursors = await produce(relayd, "later", ["first", "second"])
    for consumer in (by_path, by_op):
        chunks, end = await collect_chunks(consumer, "later")
        assert [c["data"] for c in chunks] == ["first", "second"]
        assert [c["cursor"] for c in chunks] + [end["cursor"]] == cursors


async def test_stream_not_found_after_wait_ms(config_factory: Callable[..., Config]) -> None:
    """A stream that does not appear within ``wait_ms`` (capped by streams.wait_timeout_ms) is stream_not_found."""
    async with Relayd(config_factory(streams={"wait_timeout_ms": 400})) as relayd:
        consumer = await relayd.consumer()
        started = time.monotonic()
        await consumer.send({"op": "subscribe", "stream": "never", "wait_ms": 150})
        await consumer.expect("subscribed", stream="never")
        await consumer.expect("error", code="stream_not_found", stream="never")
        assert time.monotonic() - started >= 0.1
        # a wait_ms above the cap is cut to streams.wait_timeout_ms (400 ms, not a minute)
        started = time.monotonic()
        await consumer.send({"op": "subscribe", "stream": "never", "wait_ms": 60_000})
        await consumer.expect("subscribed", stream="never")
        await consumer.expect("error", code="stream_not_found", stream="never", timeout=5)
        assert 0.3 <= time.monotonic() - started < 5
        # wait_ms 0 answers at once; the connection keeps serving
        await consumer.send({"op": "subscribe", "stream": "never", "wait_ms": 0})
        await consumer.expect("subscribed", stream="never")
        await consumer.expect("error", code="stream_not_found", stream="never")
        assert await pong(consumer) == []
        by_path = await relayd.consumer("nope", wait_ms="0")
        await by_path.expect("subscribed", stream="nope")
        await by_path.expect("error", code="stream_not_found", stream="nope")


# -- ended streams ------------------------------------------------------------------------------


async def test_subscribing_to_an_ended_stream_replays_it_then_the_end(relayd: Relayd) -> None:
    """An ended stream is replayed in full, then its end (reason and message) is sent."""
    cursors = await produce(relayd, "done", [{"n": 1}, {"n": 2}, {"n": 3}], end="error")
    consumer = await relayd.consumer("done")
    await consumer.expect("subscribed", stream="done")
    chunks, end = await collect_chunks(consumer, "done")
    assert [c["data"] for c in chunks] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert end == {"type": "end", "stream": "done", "cursor": cursors[-1], "reason": "error", "message": "boom"}
    assert await pong(consumer) == []  # nothing more for the stream after its end
    # resuming from the middle replays exactly the rest
    middle = await relayd.consumer("done", cursor=cursors[0])
    await middle.expect("subscribed", stream="done")
    chunks, end = await collect_chunks(middle, "done")
    assert [c["cursor"] for c in chunks] == cursors[1:3] and end["cursor"] == cursors[-1]


async def test_resuming_with_the_end_cursor_gets_the_end_again(relayd: Relayd) -> None:
    """A consumer resuming with the end's own cursor gets no chunk, only the end again."""
    cursors = await produce(relayd, "fin", ["a", "b"])
    end_cursor = cursors[-1]
    consumer = await relayd.consumer("fin", cursor=end_cursor)
    await consumer.expect("subscribed", stream="fin")
    end = await consumer.next()
    assert end == {"type": "end", "stream": "fin", "cursor": end_cursor, "reason": "completed"}
    # the same through the subscribe op on /v1/ws
    mux = await relayd.consumer()
    await mux.send({"op": "subscribe", "stream": "fin", "cursor": end_cursor})
    await mux.expect("subscribed", stream="fin")
    assert await mux.next() == end


async def test_a_burst_of_replays_beyond_the_read_pool_waits_for_a_connection(
    config_factory: Callable[..., Config],
) -> None:
    """More concurrent catch-ups than redis.max_connections queue for a connection: none fails."""
    async with Relayd(config_factory(redis={"max_connections": 1})) as server:
        async with await server.producer() as producer:
            await producer.open("burst")
            for seq in range(1, 201, 50):
                await producer.append("burst", seq, *range(seq, seq + 50))
            await producer.end("burst")
        consumers = await asyncio.gather(*(server.consumer("burst") for _ in range(40)))
        try:
            results = await asyncio.gather(*(collect_chunks(peer) for peer in consumers))
        finally:
            await asyncio.gather(*(peer.ws.close() for peer in consumers))
        for chunks, end in results:
            assert [frame["data"] for frame in chunks] == list(range(1, 201))
            assert end["reason"] == "completed"


@pytest.mark.parametrize("path_id", ["user-7/chat-3", "user-7%2Fchat-3"])
async def test_ids_with_a_slash_are_reachable_in_the_path_plain_or_encoded(relayd: Relayd, path_id: str) -> None:
    async with await relayd.producer() as producer:
        await producer.open("user-7/chat-3")
        await producer.append("user-7/chat-3", 1, "hi")
        await producer.end("user-7/chat-3")
    assert relayd.session is not None
    token = relayd.token(["user-7/*"])
    url = URL(f"{relayd.url}/v1/streams/{path_id}/ws", encoded=True).with_query(token=token)
    async with Peer(await relayd.session.ws_connect(url)) as consumer:
        chunks, end = await collect_chunks(consumer)
    assert [frame["data"] for frame in chunks] == ["hi"] and end["stream"] == "user-7/chat-3"
    url = URL(f"{relayd.url}/v1/streams/{path_id}/events", encoded=True).with_query(token=token)
    async with relayd.session.get(url) as resp:
        assert resp.status == 200
        assert "event: end" in await resp.text()
