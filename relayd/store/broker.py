"""RedisBroker: other instances' writes and cancel requests, through Redis pub/sub.

The Lua scripts publish a notification on the stream's channel in the same script as the write
(relayd/store/lua/*.lua document the formats), so notifications are ordered with the writes:

    a|<instance>|<written ms>|<gen>|<first>|<content type>|<count>|<len>:<chunk>|...   chunks appended
    e|<instance>|<gen>|<offset>|<reason>|<message>                        the end
    c|<instance>|<gen>                                                     the stream was created

An instance subscribes to a stream's channel when the stream gains its first local subscriber
(the hub's interest hook) and unsubscribes when the last one leaves. It also adds itself to the
stream's Set of followers (``<prefix>:{<stream>}:fol``): the append script publishes chunks only
when an instance other than the writer follows, so a lone instance, or the one that holds both
the producer and the consumers, costs Redis no publish and gets no echo of its own writes. Its
own notifications (ends, creations) are dropped by instance id: local subscribers already had
those publications straight from the relay. A follower re-reads the stream once Redis has its
membership and its subscription (each answer triggers a resync: the later one covers every
write the channel did not bring), adds itself again after any pub/sub reconnect (Redis may have
lost the Set) and every ``_REFOLLOW_S``.
Requests travel on the deployment's control channel: ``x|<instance>|<stream>`` asks whichever
instance holds ``stream`` to send its producer a ``cancel``.

Nothing here has to be reliable: deliveries are keyed by offset in the subscription, so a
notification that arrives twice, late or out of order changes nothing, and one that never
arrives is noticed at the next one (a hole) or by the resync after a subscribe or a reconnect,
which makes every subscriber of the stream read Redis again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from relayd.broker import CancelHandler
from relayd.hub import Hub, Publication
from relayd.metrics import Metrics
from relayd.model import Entry, now_ms
from relayd.store.appends import FOLLOWER_REREAD_S
from relayd.store.keys import Keys
from relayd.store.pubsub import PubSub, RedisPubSub

log = logging.getLogger("relayd.broker")

Publisher = Callable[[str, bytes], None]
Follow = Callable[[str, bool, Callable[[], None]], None]  # RedisStore.follow
Peek = Callable[[str, Callable[[int, int], None]], None]  # RedisStore.peek: (gen, last offset)

_REFOLLOW_S = 60.0  # followed streams are added to their Set again this often (heals a lost one)


class RedisBroker:
    def __init__(
        self,
        keys: Keys,
        url: str,
        instance: str,
        publish: Publisher,
        metrics: Metrics,
        *,
        follow: Follow | None = None,
        peek: Peek | None = None,
        sharded: bool = False,
        timeout_s: float = 5.0,
    ) -> None:
        """``publish(channel, message)``: how a control request leaves (the store's write pipeline)."""
        self._keys = keys
        self._instance = instance.encode()
        self._own = (b"|" + self._instance + b"|", len(self._instance) + 3)
        self._control = keys.control.encode()
        self._publish = publish
        self._follow = follow or _no_follow
        self._peek = peek
        self._refollow: asyncio.TimerHandle | None = None
        self._rereads: dict[str, asyncio.TimerHandle] = {}  # the second read after following a stream
        self._metrics = metrics
        self._hub: Hub | None = None
        self._on_cancel: CancelHandler | None = None
        self._pubsub: PubSub = RedisPubSub(
            url,
            self._on_message,
            self._on_reset,
            sharded=sharded,
            on_subscribed=self._on_subscribed,
            timeout_s=timeout_s,
        )

    async def start(self, hub: Hub, on_cancel: CancelHandler) -> None:
        self._hub = hub
        self._on_cancel = on_cancel
        hub.on_interest = self._interest
        await self._pubsub.start()
        self._pubsub.subscribe_global(self._control)
        self._metrics.broker_up_from(lambda: self._pubsub.up)  # read at each scrape: 0 during an outage
        self._refollow = asyncio.get_running_loop().call_later(_REFOLLOW_S, self._follow_all)

    async def close(self) -> None:
        if self._refollow is not None:
            self._refollow.cancel()
        for timer in self._rereads.values():
            timer.cancel()
        await self._pubsub.close()

    @property
    def up(self) -> bool:
        return self._pubsub.up

    @property
    def remote(self) -> bool:
        return True

    def request_cancel(self, stream: str) -> None:
        self._metrics.broker_sent()
        self._publish(self._keys.control, b"x|%s|%s" % (self._instance, stream.encode()))

    # the hub's interest ------------------------------------------------------------------------

    def _interest(self, stream: str, followed: bool) -> None:
        channel = self._keys.channel(stream).encode()
        if followed:
            self._follow(stream, True, lambda: self._followed(stream))
            self._pubsub.subscribe(channel)
        else:
            self._follow(stream, False, _nothing)
            self._pubsub.unsubscribe(channel)

    def _followed(self, stream: str) -> None:
        """Redis has this instance among the stream's followers: the holder's appends publish
        once it has asked who follows (at most PROBE_INTERVAL_S from now, store/appends.py), so
        the subscribers read Redis now, and look once more after that: the stream's last offset,
        and only the subscribers short of it read (usually none: one small read per stream)."""
        if self._hub is not None:
            self._hub.resync(stream)
            previous = self._rereads.pop(stream, None)
            if previous is not None:
                previous.cancel()
            self._rereads[stream] = asyncio.get_running_loop().call_later(FOLLOWER_REREAD_S, self._reread, stream)

    def _reread(self, stream: str) -> None:
        self._rereads.pop(stream, None)
        hub = self._hub
        if hub is None or not hub.subscriber_count(stream):
            return
        if self._peek is None:
            hub.resync(stream)
        else:
            self._peek(stream, lambda gen, last: hub.poke(stream, gen, last))

    def _follow_all(self) -> None:
        self._refollow = asyncio.get_running_loop().call_later(_REFOLLOW_S, self._follow_all)
        if self._hub is not None:
            for stream in self._hub.followed():
                self._follow(stream, True, _nothing)

    # from Redis ----------------------------------------------------------------------------------

    def _on_subscribed(self, channel: bytes) -> None:
        """The subscription is effective: writes between the subscribers' first read and now were
        not notified to this instance, so they read once more."""
        if channel != self._control and self._hub is not None:
            self._hub.resync(self._keys.stream_of_channel(channel))

    def _on_reset(self) -> None:
        """Notifications may have been lost: every followed stream is read again."""
        self._metrics.broker_resubscribed()
        hub = self._hub
        if hub is not None:
            for stream in hub.followed():
                self._follow(stream, True, functools.partial(self._followed, stream))
                hub.resync(stream)

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        own, start = self._own
        if payload[1:start] == own:
            return  # this instance's own write: its subscribers had it from the relay
        self._metrics.broker_received()
        hub = self._hub
        if hub is None:
            return
        try:
            if channel == self._control:
                self._control_message(payload)
                return
            stream = self._keys.stream_of_channel(channel)
            kind = payload[:1]
            if kind == b"a":
                pub, written_ms = _appended(stream, payload)
                self._metrics.broker_lag((now_ms() - written_ms) / 1000)
                hub.publish(pub)
            elif kind == b"e":
                _, _, gen, offset, reason, message = payload.split(b"|", 5)
                end = Entry(int(offset), None, reason.decode(), message.decode())
                hub.publish(Publication(stream, int(gen), [end], False))
            elif kind == b"c":
                hub.created(stream)
        except (ValueError, UnicodeDecodeError):
            log.warning("unreadable notification on %r: %r", channel, payload[:80])

    def _control_message(self, payload: bytes) -> None:
        kind, _, rest = payload.split(b"|", 2)
        if kind == b"x" and self._on_cancel is not None:
            self._on_cancel(rest.decode())


def _nothing() -> None:
    pass


def _no_follow(stream: str, followed: bool, done: Callable[[], None]) -> None:
    done()  # no follower Sets (tests of the pub/sub alone): as if Redis had the membership


def _appended(stream: str, payload: bytes) -> tuple[Publication, int]:
    """``a|<instance>|<written>|<gen>|<first>|<ct>|<count>|<len>:<chunk>|...`` -> a publication."""
    _, _, written, gen, first, ct, count, rest = payload.split(b"|", 7)
    offset = int(first)
    entries: list[Entry] = []
    pos, nbytes = 0, 0
    for _ in range(int(count)):
        colon = rest.index(b":", pos)
        size = int(rest[pos:colon])
        chunk = rest[colon + 1 : colon + 1 + size]
        entries.append(Entry(offset, chunk))
        offset += 1
        nbytes += size
        pos = colon + 1 + size + 1  # past the chunk and the '|' before the next length
    return Publication(stream, int(gen), entries, ct == b"text", 0.0, nbytes), int(written)
