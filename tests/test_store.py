"""The store's command encoding: the cached fast path says exactly what the generic encoder says."""

from __future__ import annotations

import pytest

from relayd.config import Config, RedisConfig, StreamsConfig
from relayd.store.keys import Keys
from relayd.store.redis_streams import RedisStore
from relayd.store.resp import encode_command
from relayd.store.slots import key_slot


@pytest.mark.parametrize(
    ("url", "publish", "slot"),
    [("redis://127.0.0.1:1", "PUBLISH", 0), ("redis+cluster://127.0.0.1:1", "SPUBLISH", key_slot("chat-1"))],
)
def test_cached_append_command_equals_the_generic_encoding(url: str, publish: str, slot: int) -> None:
    """An append built from the per-stream cached head is byte-for-byte the plain RESP command;
    on a cluster it publishes with SPUBLISH and goes to the stream's slot."""
    config = Config(redis=RedisConfig(key_prefix="p"), streams=StreamsConfig(max_chunks=50, open_ttl_s=60))
    store = RedisStore(config, url, instance="i1")
    store._sha = {"append": b"a" * 40}
    head, head_slot = store.append_handle("chat-1", 3, 1700000000000)
    assert head_slot == slot
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
        assert store.encode_append(head, 17, chunks, 123) == expected


def test_every_key_of_a_stream_shares_one_cluster_hash_tag() -> None:
    """Both keys of a stream carry the stream id as their hash tag, so scripts touch one slot."""
    keys = Keys("relayd")
    assert keys.log("a/b") == "relayd:{a/b}:log" and keys.meta("a/b") == "relayd:{a/b}:meta"
    assert keys.followers("a/b") == "relayd:{a/b}:fol" and keys.channel("a/b") == "relayd:{a/b}:live"
