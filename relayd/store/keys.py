"""Every Redis key name relayd uses, in one place.

Per relayd stream there are two keys sharing a Redis Cluster hash tag (the stream id in braces),
so the per-stream Lua scripts touch one slot:

    <prefix>:{<stream id>}:log    Redis Stream; entry ids "<generation>-<offset>"; fields
                                  d=<chunk JSON> for a chunk, e=<reason> m=<message> for the end
    <prefix>:{<stream id>}:meta   Hash: status, gen, epoch, base, seq, n, ct, created, updated,
                                  ended, message

plus one index of open streams (a sorted set scored by last producer activity, ms), read by the
producer-lost sweeper:

    <prefix>:open

Stream ids cannot contain braces (protocol rule), so the hash tag is always the whole id.
"""

from __future__ import annotations


class Keys:
    __slots__ = ("open_index", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.open_index = f"{prefix}:open"

    def log(self, stream: str) -> str:
        return f"{self.prefix}:{{{stream}}}:log"

    def meta(self, stream: str) -> str:
        return f"{self.prefix}:{{{stream}}}:meta"

    def stream_pattern(self, id_prefix: str = "") -> str:
        """SCAN pattern matching the meta key of every stream whose id starts with ``id_prefix``.

        Neither key prefixes nor stream ids can hold a glob character (``* ? [ ] \\``), so both
        go into the pattern as they are.
        """
        return f"{self.prefix}:{{{id_prefix}*}}:meta"

    def stream_of_meta(self, key: bytes | str) -> str:
        """The stream id of a meta key found by SCAN."""
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.prefix) + 2 : -len("}:meta")]
