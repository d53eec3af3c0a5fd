"""relayd.store.slots: the hash slot of a key, as the cluster computes it."""

from __future__ import annotations

import random

import pytest

from relayd.store.keys import Keys
from relayd.store.slots import crc16, hash_tag, key_slot
from tests.conftest_cluster import Cluster


def test_crc16_is_xmodem() -> None:
    """The check value of CRC16/XMODEM, as in the Redis Cluster spec."""
    assert crc16(b"123456789") == 0x31C3
    assert key_slot("123456789") == 0x31C3 % 16384


@pytest.mark.parametrize(
    ("key", "hashed"),
    [
        (b"{user1000}.following", b"user1000"),
        (b"foo{}{bar}", b"foo{}{bar}"),  # an empty tag hashes the whole key
        (b"foo{{bar}}zap", b"{bar"),  # the first "{" and the first "}" after it
        (b"foo{bar}{zap}", b"bar"),
        (b"no-tag", b"no-tag"),
        (b"open{only", b"open{only"),
        (b"}{x}", b"x"),
    ],
)
def test_hash_tag_rules(key: bytes, hashed: bytes) -> None:
    assert hash_tag(key) == hashed


def test_a_streams_keys_share_one_slot() -> None:
    keys = Keys("relay")
    assert key_slot(keys.log("s-1")) == key_slot(keys.meta("s-1")) == key_slot("relay:{s-1}:live")


def test_slots_match_the_servers_cluster_keyslot(redis_cluster: Cluster) -> None:
    """Many keys, tagged, untagged, odd braces and raw bytes: the same slot as CLUSTER KEYSLOT."""
    rng = random.Random(8)
    keys = [f"k{i}".encode() for i in range(200)]
    keys += [f"p:{{s-{i}}}:log".encode() for i in range(200)]
    keys += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24))) for _ in range(300)]
    keys += [b"{", b"}", b"{}", b"{a", b"a}", b"{{}}", b"\xff{\x00}\xff", "ключ{流}".encode()]
    with redis_cluster.nodes[0].client() as client:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", key)
        expected = pipe.execute()
    assert [key_slot(key) for key in keys] == expected
