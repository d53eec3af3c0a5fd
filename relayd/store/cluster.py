"""The write path on a Redis/Valkey Cluster: batches of commands, one write per master.

:class:`ClusterWriter` is :class:`~relayd.store.resp.RespConnection` for a cluster. A batch is a
list of ``(slot, encoded command)``; the writer groups it by the master that serves each slot,
writes each group with one ``transport.write`` on that master's connection (one connection per
master), and resolves one future with every reply in *submission* order. Error replies come
back as ``hiredis.ReplyError`` in the list, as with RespConnection, except the ones that say
"ask another node" or "try again", which the writer handles itself:

- ``MOVED slot host:port``: the slot map is updated, the whole topology re-read
  (``CLUSTER SLOTS``), and the command resent to the new owner;
- ``ASK slot host:port``: resent once to that node, preceded by ``ASKING`` (a slot being
  migrated; the map does not change);
- ``TRYAGAIN``, ``CLUSTERDOWN``, ``MASTERDOWN``, ``LOADING``, ``READONLY``, and a lost
  connection: topology re-read and resent after a short back-off. ``NOSCRIPT`` too when the
  writer was given the scripts (it loads them on every connection it opens, so a replica
  promoted by a failover, whose script cache is empty, gets them before the first EVALSHA).

Order. Commands for one slot are executed in submission order, also across redirects and
resends: the scripts are idempotent, so executing one twice is harmless, but running a later
append before an earlier one is not. The rule that keeps it: once any command of a slot has to
be resent, the slot is *held* — later commands for it queue behind it instead of going to the
wire — and a resend round starts only after every write that was on the wire when it began has
answered (a write that was in flight can still bounce). The round then sends the held commands
in submission order, and releases the slots it could send. Slots that are not held keep their
fast path during a failover elsewhere in the cluster.

Deadline. Every batch has one (``timeout_s``); a batch not answered by then fails with
:class:`StoreUnavailable` (its commands may or may not have run: the caller resends), and the
connections that still owe it replies are closed, as a node that does not answer for that long
is treated as down. The caller (the batcher) retries within ``redis.retry_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

import hiredis

from relayd.errors import StoreUnavailable
from relayd.store.resp import RespConnection, encode_command, load_scripts
from relayd.store.topology import Addr, ClusterUrl, SlotMap, fetch_slot_map, parse_cluster_url

log = logging.getLogger(__name__)

_ASKING: Final = encode_command(["ASKING"])
_RETRY_PREFIXES: Final = ("TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "LOADING", "READONLY")
_BACKOFF_FIRST_S: Final = 0.01
_BACKOFF_MAX_S: Final = 0.25


class _Batch:
    __slots__ = ("conns", "future", "remaining", "replies", "timer")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future = future
        self.replies: list[Any] = [None] * count
        self.remaining = count
        self.conns: set[_Node] = set()
        self.timer: asyncio.TimerHandle | None = None

    def set(self, index: int, reply: Any) -> None:
        self.replies[index] = reply
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.replies)
            if self.timer is not None:
                self.timer.cancel()


Fallback = Callable[[], bytes | None]


def _no_fallback() -> bytes | None:
    return None


class _Cmd:
    __slots__ = ("ask", "batch", "fallback", "index", "payload", "seq", "slot")

    def __init__(self, seq: int, slot: int, payload: bytes, batch: _Batch, index: int, fallback: Fallback) -> None:
        self.seq = seq
        self.slot = slot
        self.payload = payload
        self.batch = batch
        self.index = index
        self.fallback = fallback
        self.ask: Addr | None = None  # send once to this node, after ASKING

    def use_fallback(self) -> None:
        """To be sent later than planned, maybe to a node made again: its fallback command instead."""
        alt = self.fallback()
        if alt is not None:
            self.payload = alt


class _Node:
    """One master's connection and how many writes on it are unanswered."""

    __slots__ = ("addr", "conn", "outstanding")

    def __init__(self, addr: Addr, conn: RespConnection) -> None:
        self.addr = addr
        self.conn = conn
        self.outstanding = 0


class ClusterWriter:
    """Pipelined writes to a cluster; see the module docstring for the rules.

    ``url`` is a ``redis+cluster://`` URL or a parsed :class:`ClusterUrl`. ``timeout_s`` is the
    default deadline of a batch and bounds each connection attempt and topology read.
    ``scripts`` are Lua script bodies loaded (``SCRIPT LOAD``) on every connection opened.
    ``on_reconnect()`` is called once the writes held by a recovery have been sent again, if that
    recovery connected to a node anew (a restarted master, a promoted replica): the node may not
    hold every write it had acknowledged before.
    """

    def __init__(
        self,
        url: str | ClusterUrl,
        *,
        timeout_s: float = 5.0,
        scripts: Sequence[str | bytes] = (),
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.url = parse_cluster_url(url) if isinstance(url, str) else url
        self.timeout_s = timeout_s
        self._scripts = tuple(scripts)
        self._on_reconnect = on_reconnect
        self._started = False
        self._reconnected = False  # a connection was made again since the last on_reconnect
        self._map = SlotMap()
        self._nodes: dict[Addr, _Node] = {}
        self._seq = 0
        self._write_id = 0
        self._outstanding: dict[int, None] = {}  # write ids on the wire, oldest first
        self._drained = asyncio.Event()
        self._barrier = -1  # the recovery round waits until no write id <= this is on the wire
        self._queue: list[_Cmd] = []  # commands to resend or held behind them
        self._held: set[int] = set()  # slots with commands in the queue
        self._refresh = False
        self._hints: list[Addr] = []  # nodes that sent MOVED: asked first for the topology
        self._recovery: asyncio.Task[None] | None = None
        self._closed = False

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the topology and connect to every master; StoreUnavailable if it cannot."""
        self._map = await fetch_slot_map(self.url, self.url.seeds, self.timeout_s)
        for addr in sorted(self._map.masters):
            await self._connect(addr)
        self._started = True

    async def close(self) -> None:
        self._closed = True
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        for node in list(self._nodes.values()):
            node.conn.close()
        self._nodes.clear()
        for cmd in self._queue:
            self._fail(cmd.batch, StoreUnavailable("cluster writer closed"))
        self._queue.clear()

    @property
    def masters(self) -> list[Addr]:
        """The masters of the current slot map (sorted)."""
        return sorted(self._map.masters)

    def node_for_slot(self, slot: int) -> Addr | None:
        return self._map.owners[slot]

    # the write path ----------------------------------------------------------------------------

    def send(
        self,
        commands: Sequence[tuple[int, bytes]],
        timeout_s: float | None = None,
        fallbacks: Sequence[Fallback] | None = None,
    ) -> asyncio.Future[list[Any]]:
        """Send ``(slot, encoded command)`` pairs; the future gets their replies in this order.

        Fails with StoreUnavailable if they are not all answered within ``timeout_s`` (default:
        the writer's), or at once if the writer is closed. ``fallbacks``: per command, what to
        send instead if it has to wait for a resend or a connection made again (see
        relayd.store.pipeline.Write.fallback).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if self._closed:
            future.set_exception(StoreUnavailable("cluster writer closed"))
            return future
        batch = _Batch(future, len(commands))
        if not commands:
            future.set_result([])
            return future
        batch.timer = loop.call_later(self.timeout_s if timeout_s is None else timeout_s, self._expire, batch)
        owners = self._map.owners
        nodes = self._nodes
        held = self._held
        groups: dict[_Node, list[_Cmd | None]] = {}
        seq = self._seq
        reconnected = self._reconnected  # a node was made again and the caller does not know yet
        for index, (slot, payload) in enumerate(commands):
            seq += 1
            cmd = _Cmd(seq, slot, payload, batch, index, fallbacks[index] if fallbacks else _no_fallback)
            if reconnected:
                cmd.use_fallback()
            if held and slot in held:
                cmd.use_fallback()
                self._queue.append(cmd)
                continue
            addr = owners[slot]
            node = nodes.get(addr) if addr is not None else None
            if node is None or node.conn.closed:
                self._hold(cmd)
                continue
            group = groups.get(node)
            if group is None:
                groups[node] = [cmd]
            else:
                group.append(cmd)
        self._seq = seq
        for node, cmds in groups.items():
            self._write(node, cmds)
        if self._queue:
            self._kick()
        return future

    def _write(self, node: _Node, cmds: list[_Cmd | None]) -> None:
        """One write of ``cmds`` to ``node``; a None stands for an ASKING before the next one."""
        payload = b"".join([_ASKING if cmd is None else cmd.payload for cmd in cmds])
        self._write_id += 1
        write_id = self._write_id
        self._outstanding[write_id] = None
        node.outstanding += 1
        future = node.conn.execute(payload, len(cmds))
        for cmd in cmds:
            if cmd is not None:
                cmd.batch.conns.add(node)
        future.add_done_callback(lambda f: self._on_reply(write_id, node, cmds, f))

    def _on_reply(self, write_id: int, node: _Node, cmds: list[_Cmd | None], future: asyncio.Future[list[Any]]) -> None:
        del self._outstanding[write_id]
        node.outstanding -= 1
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            self._refresh = True
            for cmd in cmds:
                if cmd is not None:
                    self._hold(cmd)
        else:
            for cmd, reply in zip(cmds, future.result(), strict=True):
                if cmd is None:
                    continue
                if type(reply) is hiredis.ReplyError and self._redirected(node, cmd, str(reply)):
                    self._hold(cmd)
                    continue
                cmd.batch.set(cmd.index, reply)
        if not self._outstanding or next(iter(self._outstanding)) > self._barrier:
            self._drained.set()
        if self._queue:
            self._kick()

    def _redirected(self, node: _Node, cmd: _Cmd, error: str) -> bool:
        """True if ``error`` means "send it again" (and note where)."""
        kind, _, rest = error.partition(" ")
        if kind == "MOVED" or kind == "ASK":
            _, _, target = rest.partition(" ")
            host, _, port = target.rpartition(":")
            if not port.isdigit():
                return False
            addr = (host.strip("[]") or node.addr[0], int(port))  # no host: the replying one's
            if kind == "MOVED":
                self._map.owners[cmd.slot] = addr
                self._hints.append(addr)
                self._refresh = True
            else:
                cmd.ask = addr
            return True
        if kind in _RETRY_PREFIXES:
            self._refresh = True
            return True
        if kind == "NOSCRIPT" and self._scripts:
            if self._nodes.get(node.addr) is node:  # reconnecting loads the scripts again
                del self._nodes[node.addr]
                node.conn.close()
            return True
        return False

    def _hold(self, cmd: _Cmd) -> None:
        if not cmd.batch.future.done():
            cmd.use_fallback()
            self._queue.append(cmd)
            self._held.add(cmd.slot)

    def _kick(self) -> None:
        if self._recovery is None and not self._closed:
            self._recovery = asyncio.get_running_loop().create_task(self._recover(), name="relayd-cluster-recovery")

    def _expire(self, batch: _Batch) -> None:
        if batch.future.done():
            return
        self._fail(batch, StoreUnavailable("the cluster did not answer in time"))
        for node in batch.conns:
            if node.outstanding and not node.conn.closed:
                log.warning("cluster node %s:%d did not answer in time; reconnecting", *node.addr)
                node.conn.close()  # its writes bounce back into the queue; recovery reconnects

    @staticmethod
    def _fail(batch: _Batch, exc: Exception) -> None:
        if not batch.future.done():
            batch.future.set_exception(exc)
        if batch.timer is not None:
            batch.timer.cancel()

    # recovery ----------------------------------------------------------------------------------

    async def _recover(self) -> None:
        delay = _BACKOFF_FIRST_S
        try:
            while self._queue and not self._closed:
                await self._drain()
                if not self._queue:
                    break
                if self._refresh:
                    await self._refresh_map()
                targets = {cmd.ask or self._map.owners[cmd.slot] for cmd in self._queue}
                missing = {addr for addr in targets if addr is not None and not self._live(addr)}
                if missing:
                    await self._connect_all(sorted(missing))
                    await self._drain()  # time passed: more may have bounced meanwhile
                sent = self._send_queue()
                if not self._queue:
                    break
                if sent:
                    delay = _BACKOFF_FIRST_S
                    continue  # wait for what went out before sending what is left
                await asyncio.sleep(delay)  # a back-off between rounds that could send nothing
                delay = min(delay * 2, _BACKOFF_MAX_S)
                self._refresh = True
        finally:
            self._recovery = None
            self._held = {cmd.slot for cmd in self._queue}
            if self._queue and not self._closed:
                self._kick()
            elif self._reconnected and self._on_reconnect is not None and not self._closed:
                self._reconnected = False
                self._on_reconnect()

    async def _drain(self) -> None:
        """Wait until every write on the wire now has answered; drop commands of failed batches.

        A write in flight may bounce too, and its commands come before the ones queued after it.
        Bounded: a batch past its deadline closes the connections that owe it replies.
        """
        self._barrier = self._write_id
        if self._outstanding and next(iter(self._outstanding)) <= self._barrier:
            self._drained.clear()
            await self._drained.wait()
        self._queue = [cmd for cmd in self._queue if not cmd.batch.future.done()]

    async def _refresh_map(self) -> None:
        candidates = [*reversed(self._hints), *self._map.masters, *self.url.seeds]
        try:
            fresh = await fetch_slot_map(self.url, candidates, self.timeout_s)
        except StoreUnavailable as exc:
            log.warning("cluster topology refresh failed: %s", exc)
            return
        self._hints.clear()
        self._map = fresh
        self._refresh = False
        for addr in list(self._nodes):  # a demoted or removed master
            if addr not in fresh.masters and not self._nodes[addr].outstanding:
                self._nodes.pop(addr).conn.close()

    def _send_queue(self) -> bool:
        """Send what can be sent of the queue in submission order; True if anything went.

        A slot whose node is not connected stays held, with every later command for it.
        """
        stuck: set[int] = set()
        keep: list[_Cmd] = []
        groups: dict[_Node, list[_Cmd | None]] = {}
        for cmd in sorted(self._queue, key=lambda cmd: cmd.seq):
            addr = cmd.ask or self._map.owners[cmd.slot]
            node = self._nodes.get(addr) if addr is not None else None
            if cmd.slot in stuck or node is None or node.conn.closed:
                stuck.add(cmd.slot)
                keep.append(cmd)
                continue
            group = groups.setdefault(node, [])
            if cmd.ask is not None:
                group.append(None)
                cmd.ask = None
            group.append(cmd)
        self._queue = keep
        self._held = stuck
        for node, cmds in groups.items():
            self._write(node, cmds)
        return bool(groups)

    def _live(self, addr: Addr) -> bool:
        node = self._nodes.get(addr)
        return node is not None and not node.conn.closed

    async def _connect_all(self, addrs: Sequence[Addr]) -> None:
        results = await asyncio.gather(*(self._connect(addr) for addr in addrs), return_exceptions=True)
        for addr, result in zip(addrs, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("cannot connect to cluster node %s:%d: %s", addr[0], addr[1], result)
                self._refresh = True

    async def _connect(self, addr: Addr) -> None:
        old = self._nodes.get(addr)
        if old is not None and not old.conn.closed:
            return
        conn = await RespConnection.connect(self.url.node_url(addr), self.timeout_s)
        if self._scripts:
            await load_scripts(conn, self._scripts, self.timeout_s, f"{addr[0]}:{addr[1]}")
        self._nodes[addr] = _Node(addr, conn)
        if self._started:
            self._reconnected = True  # a node restarted or a replica took over: it may lack writes
