"""The broker's pub/sub connections to Redis: stream channels and cluster-wide channels.

:class:`RedisPubSub` keeps the subscriptions a relayd instance wants and the connections that
carry them; the broker tells it what it wants (:meth:`subscribe`, :meth:`unsubscribe`,
:meth:`subscribe_global`, all fire and forget) and gets ``on_message(channel, payload)`` for
each notification and ``on_reset()`` after any loss.

- Single node (``sharded=False``): one connection; ``SUBSCRIBE`` for both kinds of channel.
- Cluster (``sharded=True``, the URL a ``redis+cluster://`` one): a stream channel holds the
  stream's hash tag (``<prefix>:{<stream>}:live``), so it lives in the stream's slot; it is
  subscribed with ``SSUBSCRIBE`` on a connection to the master that owns that slot (one
  connection per master that has subscriptions). Global channels use plain ``SUBSCRIBE`` on one
  more connection (any node: a cluster forwards ``PUBLISH`` to every node).

Loss and reset. A lost connection, an error reply (``-MOVED`` to an ``SSUBSCRIBE`` sent with a
stale slot map), or a ``sunsubscribe`` the server sends on its own (the slot moved to another
master) all mean that notifications may have been missed. Then the connection is dropped, the
topology re-read, connections re-made with back-off, every channel still wanted subscribed
again, and once the servers have confirmed all of it (a ``PING`` after the subscribe commands
answers only after them), ``on_reset()`` is called: the broker re-reads every followed stream
from Redis, so a lost notification costs latency, never data. :attr:`up` is False from the loss
until then, and while a connection that is needed (a new master for a new stream channel) is
not made yet.

A subscription is effective only once the server has processed it; ``on_subscribed(channel)``
(optional) is called when the server confirms one that was asked for on a live connection, so
the broker can re-read that stream once more and close the window between its first read and
the subscription (writes in that window would otherwise be noticed only at the next one).

Races: commands go to a connection in call order, so subscribe, unsubscribe, subscribe before
any answer leaves the server subscribed; a message for a channel no longer wanted is dropped.

Verified on the bundled Valkey 9.1 (tests/test_pubsub.py): ``PUBLISH`` inside ``EVAL``/
``EVALSHA`` on a single node, and ``SPUBLISH`` inside a script on a cluster, to a channel in the
slot of the script's keys, both deliver (a channel in another slot is refused, as for keys).

Why not redis-py: its asyncio cluster pub/sub (redis 8) reconnects lazily inside
``get_message`` and has no hook for "resubscribed after a loss", which is what on_reset needs,
and it needs a reader task per connection anyway. This is ~the size of that glue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlparse

import hiredis

from relayd.errors import StoreUnavailable
from relayd.store.resp import NOT_ENOUGH_DATA, RespArg, encode_command
from relayd.store.slots import key_slot
from relayd.store.topology import Addr, ClusterUrl, SlotMap, fetch_slot_map, parse_cluster_url

log = logging.getLogger(__name__)

MessageCallback = Callable[[bytes, bytes], None]
ResetCallback = Callable[[], None]
SubscribedCallback = Callable[[bytes], None]

_GLOBAL: Final = ("", 0)  # the key of the connection for plain SUBSCRIBE
_BACKOFF_FIRST_S: Final = 0.05
_BACKOFF_MAX_S: Final = 2.0


class PubSub(Protocol):
    """What the broker needs from a pub/sub connection (single node or cluster)."""

    async def start(self) -> None:
        """Connect; raises StoreUnavailable if it cannot."""

    def subscribe(self, channel: bytes) -> None:
        """Follow a stream channel (sharded on a cluster); idempotent; fire and forget."""

    def unsubscribe(self, channel: bytes) -> None:
        """Stop following a stream channel; idempotent."""

    def subscribe_global(self, channel: bytes) -> None:
        """Follow a cluster-wide channel (plain SUBSCRIBE); idempotent."""

    @property
    def up(self) -> bool:
        """False while any needed connection is down or a reset is pending."""

    async def close(self) -> None:
        """Drop every connection; idempotent."""


class _Conn(asyncio.Protocol):
    """One pub/sub connection: replies in, events to the owner."""

    def __init__(self, owner: RedisPubSub, key: Addr, sharded: bool) -> None:
        self.owner = owner
        self.key = key
        self.sub, self.unsub = (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        self.channels: set[bytes] = set()  # asked subscribed on this connection, last word
        self.unsub_pending: dict[bytes, int] = {}  # our unsubscribes not answered yet
        self.pings: list[asyncio.Future[None]] = []
        self.ready = False  # subscriptions made and confirmed after connecting
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc or 'closed by the server'}")

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is NOT_ENOUGH_DATA:
                return
            if not self._handle(reply):
                return

    def _handle(self, reply: Any) -> bool:
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind in (b"message", b"smessage"):
                self.owner._deliver(reply[1], reply[2])
            elif kind in (b"subscribe", b"ssubscribe"):
                if self.ready:
                    self.owner._confirmed(reply[1])
            elif kind in (b"unsubscribe", b"sunsubscribe"):
                channel = reply[1]
                pending = self.unsub_pending.get(channel, 0)
                if pending > 1:
                    self.unsub_pending[channel] = pending - 1
                elif pending == 1:
                    del self.unsub_pending[channel]
                elif kind == b"sunsubscribe":  # sent by the server: the slot moved away
                    self._lost(f"the server dropped {channel!r} (slot moved)", close=True)
                    return False
            elif kind == b"pong":
                self._pong()
            return True
        if reply == b"PONG":
            self._pong()
            return True
        if reply == b"OK":  # AUTH
            return True
        # an error (-MOVED to an SSUBSCRIBE: our slot map is stale) or something unexpected
        self._lost(f"unexpected reply {reply!r}", close=True)
        return False

    def _pong(self) -> None:
        if self.pings:
            waiter = self.pings.pop(0)
            if not waiter.done():
                waiter.set_result(None)

    def _lost(self, why: str, close: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if close and self.transport is not None:
            self.transport.close()
        for waiter in self.pings:
            if not waiter.done():
                waiter.set_exception(StoreUnavailable(why))
        self.pings.clear()
        self.owner._conn_lost(self, why)

    def send(self, args: Iterable[RespArg]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(encode_command(list(args)))

    def subscribe(self, channel: bytes) -> None:
        if channel not in self.channels:
            self.channels.add(channel)
            self.send((self.sub, channel))

    def unsubscribe(self, channel: bytes) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self.unsub_pending[channel] = self.unsub_pending.get(channel, 0) + 1
            self.send((self.unsub, channel))

    async def ping(self, timeout_s: float) -> None:
        """Returns once the server has answered everything sent before it."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed:
            raise StoreUnavailable("pub/sub connection closed")
        self.pings.append(waiter)
        self.send((b"PING",))
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            self._lost("no answer to PING", close=True)
            raise StoreUnavailable("pub/sub connection did not answer PING") from None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RedisPubSub:
    """:class:`PubSub` over Redis/Valkey; see the module docstring.

    ``url`` is a ``redis://``/``rediss://``/``unix://`` URL (single node) or, with
    ``sharded=True``, a ``redis+cluster://`` URL. ``timeout_s`` bounds each connection attempt
    and confirmation; ``ping_interval_s`` is how often idle connections are checked.
    """

    def __init__(
        self,
        url: str,
        on_message: MessageCallback,
        on_reset: ResetCallback,
        *,
        sharded: bool = False,
        on_subscribed: SubscribedCallback | None = None,
        timeout_s: float = 5.0,
        ping_interval_s: float = 5.0,
    ) -> None:
        self.url = url
        self.sharded = sharded
        self._cluster: ClusterUrl | None = parse_cluster_url(url) if sharded else None
        self._on_message = on_message
        self._on_reset = on_reset
        self._on_subscribed = on_subscribed
        self.timeout_s = timeout_s
        self.ping_interval_s = ping_interval_s
        self._streams: set[bytes] = set()
        self._globals: set[bytes] = set()
        self._conns: dict[Addr, _Conn] = {}
        self._map = SlotMap()
        self._wake = asyncio.Event()
        self._lost = False  # a loss not yet followed by on_reset
        self._refresh = False
        self._healthy = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # API ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._reconcile()
        except StoreUnavailable:
            for conn in list(self._conns.values()):
                conn.close()
            self._conns.clear()
            raise
        self._lost = False
        self._healthy = True
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="relayd-pubsub")

    def subscribe(self, channel: bytes) -> None:
        if channel in self._streams:
            return
        self._streams.add(channel)
        owner = self._route(channel)
        conn = self._conns.get(owner) if owner is not None else None
        if conn is not None and not conn.closed:
            conn.subscribe(channel)
        else:
            self._healthy = False
            self._wake.set()

    def unsubscribe(self, channel: bytes) -> None:
        if channel not in self._streams:
            return
        self._streams.discard(channel)
        for conn in self._conns.values():  # a few: one per master; the map may have moved
            conn.unsubscribe(channel)

    def subscribe_global(self, channel: bytes) -> None:
        if channel in self._globals:
            return
        self._globals.add(channel)
        conn = self._conns.get(_GLOBAL)
        if conn is not None and not conn.closed:
            conn.subscribe(channel)

    @property
    def up(self) -> bool:
        return self._healthy and not self._closed

    async def close(self) -> None:
        self._closed = True
        self._healthy = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()

    # called by the connections -----------------------------------------------------------------

    def _deliver(self, channel: bytes, payload: bytes) -> None:
        if channel in self._streams or channel in self._globals:
            try:
                self._on_message(channel, payload)
            except Exception:  # one bad callback must not take the connection down
                log.exception("pub/sub message callback failed")

    def _confirmed(self, channel: bytes) -> None:
        if self._on_subscribed is not None and channel in self._streams:
            try:
                self._on_subscribed(channel)
            except Exception:
                log.exception("pub/sub subscribed callback failed")

    def _conn_lost(self, conn: _Conn, why: str) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        if self._closed:
            return
        log.warning("pub/sub connection to %s lost, resubscribing: %s", _name(conn.key), why)
        self._lost = True
        self._refresh = True
        self._healthy = False
        self._wake.set()

    # the supervisor ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = _BACKOFF_FIRST_S
        while not self._closed:
            if self._healthy:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ping_interval_s):
                        await self._wake.wait()
                self._wake.clear()
                if self._healthy:  # nothing happened: check the connections are alive
                    await self._ping_all()
                    if self._healthy:
                        continue
            try:
                await self._reconcile()
            except StoreUnavailable as exc:
                log.warning("pub/sub not up yet: %s", exc)
                self._refresh = True  # the node may be gone for good (a killed master): ask the cluster again
                await asyncio.sleep(delay)  # back-off between reconnect attempts
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            delay = _BACKOFF_FIRST_S
            if any(conn.closed for conn in self._conns.values()) or self._wake.is_set():
                self._wake.clear()
                continue  # something broke or was asked for while reconciling: once more
            self._healthy = True
            if self._lost:
                self._lost = False
                try:
                    self._on_reset()
                except Exception:
                    log.exception("pub/sub reset callback failed")

    async def _ping_all(self) -> None:
        for conn in list(self._conns.values()):
            with contextlib.suppress(StoreUnavailable):
                await conn.ping(self.timeout_s)  # a failure marks the loss itself

    async def _reconcile(self) -> None:
        """Make every needed connection, put each wanted channel on it, wait for confirmation."""
        self._wake.clear()
        if self._cluster is not None and (self._refresh or not self._map.masters):
            self._map = await fetch_slot_map(self._cluster, [*self._map.masters, *self._cluster.seeds], self.timeout_s)
            self._refresh = False
        wanted: dict[Addr, set[bytes]] = {_GLOBAL: set(self._globals)}
        for channel in self._streams:
            owner = self._route(channel)
            if owner is None:
                self._refresh = True
                raise StoreUnavailable(f"no master serves the slot of {channel!r}")
            wanted.setdefault(owner, set()).add(channel)
        for key, conn in list(self._conns.items()):
            if key not in wanted and key != _GLOBAL:
                del self._conns[key]
                conn.close()
        for key in wanted:
            if key not in self._conns:
                self._conns[key] = await self._connect(key)
        for key, channels in wanted.items():
            conn = self._conns[key]
            for channel in conn.channels - channels:
                conn.unsubscribe(channel)
            for channel in sorted(channels - conn.channels):
                conn.subscribe(channel)
        for conn in list(self._conns.values()):
            await conn.ping(self.timeout_s)
        fresh = [conn for conn in self._conns.values() if not conn.ready]
        for conn in fresh:
            conn.ready = True
        if fresh and not self._lost:
            # new connections (a first subscription on that master), no loss: confirm each one
            for channel in (ch for conn in fresh for ch in conn.channels):
                self._confirmed(channel)

    def _route(self, channel: bytes) -> Addr | None:
        """The key of the connection for a stream channel; None: no master serves its slot."""
        if self._cluster is None:
            return _GLOBAL
        return self._map.owners[key_slot(channel)]

    async def _connect(self, key: Addr) -> _Conn:
        loop = asyncio.get_running_loop()
        sharded = key != _GLOBAL
        if self._cluster is not None:
            addr = key if sharded else (sorted(self._map.masters) or list(self._cluster.seeds))[0]
            url = self._cluster.node_url(addr)
        else:
            url = self.url
        parsed = urlparse(url)
        try:
            async with asyncio.timeout(self.timeout_s):
                if parsed.scheme == "unix":
                    _, conn = await loop.create_unix_connection(lambda: _Conn(self, key, sharded), parsed.path)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self, key, sharded),
                        parsed.hostname or "127.0.0.1",
                        parsed.port or 6379,
                        ssl=(parsed.scheme == "rediss") or None,
                    )
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect pub/sub to {_name(key)}: {exc or 'timed out'}") from exc
        if parsed.password:
            user = unquote(parsed.username) if parsed.username else None
            conn.send([b"AUTH", *([user] if user else []), unquote(parsed.password)])
        return conn


def _name(key: Addr) -> str:
    return "the global channel node" if key == _GLOBAL else f"{key[0]}:{key[1]}"
