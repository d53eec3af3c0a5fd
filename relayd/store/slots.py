"""Redis Cluster hash slots: which of the 16384 slots a key (or a shard channel) belongs to.

The slot is CRC16 (the XMODEM variant: polynomial 0x1021, initial value 0, no reflection) of
the key modulo 16384. If the key holds a ``{`` followed later by a ``}`` with at least one byte
between them, only the bytes between the *first* ``{`` and the first ``}`` after it are hashed:
the hash tag. relayd's per-stream keys and channels all carry ``{<stream id>}``, so they share a
slot. Pure: no I/O; checked against the server's own ``CLUSTER KEYSLOT`` in the tests.
"""

from __future__ import annotations

from typing import Final

SLOTS: Final = 16384


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16_TABLE: Final = _table()


def crc16(data: bytes) -> int:
    """CRC16/XMODEM of ``data``."""
    crc = 0
    table = _CRC16_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that is hashed: the hash tag if there is a non-empty one, else all."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: bytes | str) -> int:
    """The cluster hash slot (0..16383) of a key or shard channel name."""
    if isinstance(key, str):
        key = key.encode()
    return crc16(hash_tag(key)) & (SLOTS - 1)
