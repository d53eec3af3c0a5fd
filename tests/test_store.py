"""The store's command encoding and its framed reads: each fast path says exactly what the generic one says."""

from __future__ import annotations

import pytest

from relayd.config import Config, RedisConfig, StreamsConfig
from relayd.metrics import Metrics
from relayd.model import Appended
from relayd.protocol import SSE_CODEC, WS_CODEC
from relayd.store.appends import Appender
from relayd.store.keys import Keys
from relayd.store.pipeline import Write
from relayd.store.redis_streams import RedisStore
from relayd.store.resp import encode_command
from relayd.store.slots import key_slot
from relayd.web.openai_sse import OPENAI_SSE_CODEC
from tests.test_store_contract import append, created, end, open_


def _appender(url: str) -> tuple[Appender, list[Write]]:
    config = Config(redis=RedisConfig(key_prefix="p"), streams=StreamsConfig(max_chunks=50, open_ttl_s=60))
    store = RedisStore(config, url, instance="i1")
    sent: list[Write] = []
    appender = Appender(
        sent.append,
        store.keys,
        b"a" * 40,
        store._slot_of,
        max_chunks=b"50",
        open_ttl=b"60",
        publish=store._publish,
        instance=b"i1",
    )
    return appender, sent


@pytest.mark.parametrize(
    ("url", "publish", "slot"),
    [("redis://127.0.0.1:1", "PUBLISH", 0), ("redis+cluster://127.0.0.1:1", "SPUBLISH", key_slot("chat-1"))],
)
def test_cached_append_commands_equal_the_generic_encoding(url: str, publish: str, slot: int) -> None:
    """The script and the plain XADDs built from a handle's cached heads are byte-for-byte the
    plain RESP commands; on a cluster they publish with SPUBLISH and go to the stream's slot."""
    appender, sent = _appender(url)
    h = appender.handle("chat-1", 3, 1700000000000)
    assert h.slot == slot
    for chunks in ([b'{"x":1}'], [b'"y"', b"1", b"[" + b"9" * 300 + b"]"]):
        expected = encode_command(
            [
                "EVALSHA",
                b"a" * 40,
                "4",
                "p:{chat-1}:meta",
                "p:{chat-1}:log",
                "p:{chat-1}:live",
                "p:{chat-1}:fol",
                "3",
                "1700000000000",
                "17",
                "123",
                "50",
                "60",
                publish,
                "i1",
                *chunks,
            ]
        )
        assert appender.encode_script(h.script_head, 17, chunks, 123) == expected
    # a sure handle in lane 2, epoch base 40, expecting seq 5: plain XADDs and the followers probe
    h.ready, h.wire, h.next, h.base, h.id_prefix, h.lane_base = True, appender.wire, 5, 40, b"1700000000000-", 2 << 32
    chunks = [b'"y"', b"[" + b"9" * 300 + b"]"]
    appender.append(h, 5, chunks, lambda outcome: None)
    assert [w.payload for w in sent] == [
        *[
            encode_command(
                [
                    *("XADD", "p:{chat-1}:log", "NOMKSTREAM", "MAXLEN", "~", "50"),
                    *(f"1700000000000-{(2 << 32) + 45 + i}", "d", c),
                ]
            )
            for i, c in enumerate(chunks)
        ],
        encode_command(["SRANDMEMBER", "p:{chat-1}:fol", "2"]),
    ]
    assert {w.slot for w in sent} == {slot} and h.next == 7
    sent.clear()
    h.ct = b"text"
    appender.publish(h, 45, chunks)
    (message,) = sent
    body = message.payload.split(b"\r\n")[-2]
    assert message.payload == encode_command([publish, "p:{chat-1}:live", body])
    _, _, _, gen, first, ct, count, rest = body.split(b"|", 7)
    assert (gen, first, ct, count) == (b"1700000000000", b"45", b"text", b"2")
    assert rest == b'3:"y"|302:' + chunks[1]


def test_every_key_of_a_stream_shares_one_cluster_hash_tag() -> None:
    """Both keys of a stream carry the stream id as their hash tag, so scripts touch one slot."""
    keys = Keys("relayd")
    assert keys.log("a/b") == "relayd:{a/b}:log" and keys.meta("a/b") == "relayd:{a/b}:meta"
    assert keys.followers("a/b") == "relayd:{a/b}:fol" and keys.channel("a/b") == "relayd:{a/b}:live"


async def test_a_framed_page_is_byte_for_byte_what_the_codec_makes_of_the_same_entries(
    redis_server: str, key_prefix: str
) -> None:
    """read_frames (the replay's path) frames a page of chunks, an end, or nothing exactly as the
    websocket, SSE and OpenAI-format codecs frame read_entries' page; past a takeover (lane > 0) it declines (None)."""
    config = Config(redis=RedisConfig(key_prefix=key_prefix), streams=StreamsConfig(max_chunks=1000))
    store = RedisStore(config, redis_server, Metrics())
    await store.start()
    try:
        chunks = [b'{"i":%d,"s":"100%%"}' % i for i in range(1, 13)]
        opened = await created(store, "s", *chunks)
        await end(store, "s", "error", "it broke")
        gen = opened.gen
        for codec in (WS_CODEC, SSE_CODEC, OPENAI_SSE_CODEC):
            template = codec.chunk_template("s", gen, False)
            assert template is not None
            for first, count in [(1, 5), (6, 7), (6, 8), (13, 5), (14, 5)]:  # chunks; chunks, end; the end; none
                page = await store.read_frames("s", gen, first, count, template)
                entries = await store.read_entries("s", gen, first, count)
                assert page is not None and page.n == len(entries)
                assert codec.framed("s", gen, page.frames, page.end, False) == (
                    codec.entries("s", gen, entries, False) if entries else b""
                ), codec.kind
                assert page.last == (entries[-1] if entries else None)
                assert page.first == (entries[0].offset if entries else first)
        assert SSE_CODEC.chunk_template("s", gen, True) is None  # a text stream's events decode its strings
        assert OPENAI_SSE_CODEC.chunk_template("s", gen, True) is None
        template = WS_CODEC.chunk_template("s", gen, False)
        assert template is not None
        taken = await created(store, "t", b"1", b"2")
        await open_(store, "t")  # a takeover: its appends go to the next lane
        assert isinstance(await append(store, "t", 2, 1, b"3"), Appended)
        assert await store.read_frames("t", taken.gen, 1, 10, template) is None
        assert [e.offset for e in await store.read_entries("t", taken.gen, 1, 10)] == [1, 2, 3]
    finally:
        await store.close()
