"""Every Redis key name relayd uses, in one place.

Per relayd stream there are two keys sharing a Redis Cluster hash tag (the stream id in braces),
so the per-stream Lua scripts touch one slot:

    <prefix>:{<stream id>}:log    Redis Stream; entry ids "<generation>-<lane * 2^32 + offset>"
                                  (the lane goes up at each takeover and end: store/appends.py);
                                  fields d=<chunk JSON> for a chunk, e=<reason> m=<message> for
                                  the end
    <prefix>:{<stream id>}:meta   Hash: status, gen, epoch, base, seq, n, k (the lane), ct,
                                  created, updated, ended, message; n and seq as of the last
                                  open or end (appends do not write the meta)

and, for a stream written through the Durable Streams mount, its producers' state (hash: producer
id -> "<epoch> <seq>"), in the same slot:

    <prefix>:{<stream id>}:dsp

plus one index of open streams (a sorted set scored by last producer activity, ms), read by the
producer-lost sweeper:

    <prefix>:open

and two pub/sub channels (relayd/store/broker.py): per stream, in the stream's hash slot, the
notifications its scripts publish; for the deployment, control requests between instances:

    <prefix>:{<stream id>}:live   (SPUBLISH on a cluster, PUBLISH otherwise)
    <prefix>:ctl

and, per stream, the instances that follow its channel (a Set of instance ids): the holder
publishes appended chunks only when an instance other than itself is in it.

    <prefix>:{<stream id>}:fol

Stream ids cannot contain braces (protocol rule), so the hash tag is always the whole id.
"""

from __future__ import annotations


class Keys:
    __slots__ = ("control", "open_index", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.open_index = f"{prefix}:open"
        self.control = f"{prefix}:ctl"

    def log(self, stream: str) -> str:
        return f"{self.prefix}:{{{stream}}}:log"

    def meta(self, stream: str) -> str:
        return f"{self.prefix}:{{{stream}}}:meta"

    def ds_producers(self, stream: str) -> str:
        return f"{self.prefix}:{{{stream}}}:dsp"

    def channel(self, stream: str) -> str:
        return f"{self.prefix}:{{{stream}}}:live"

    def followers(self, stream: str) -> str:
        return f"{self.prefix}:{{{stream}}}:fol"

    def stream_of_channel(self, channel: bytes) -> str:
        """The stream id of a notification channel."""
        return channel.decode()[len(self.prefix) + 2 : -len("}:live")]

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
