"""The write pipeline's two wires: one connection to a single server, or a cluster writer.

:class:`~relayd.store.pipeline.Pipeline` batches writes and keeps their order, retries and
deadlines; a wire only carries a batch. Both load relayd's scripts on every connection they
open (``SCRIPT LOAD``), so a restarted server or a promoted replica has them before the first
``EVALSHA``, and both answer a batch with its replies in submission order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from relayd.errors import StoreUnavailable
from relayd.store.cluster import ClusterWriter
from relayd.store.pipeline import Write
from relayd.store.resp import RespConnection, load_scripts


class NodeWire:
    """One pipelined connection to a single Redis server (``redis://``, ``rediss://``, ``unix://``)."""

    def __init__(self, url: str, timeout_s: float, scripts: Sequence[str]) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._scripts = tuple(scripts)
        self._conn: RespConnection | None = None

    def send(self, writes: list[Write]) -> asyncio.Future[list[Any]]:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable("store not started")
        return conn.execute(b"".join([w.payload for w in writes]), len(writes))

    async def reconnect(self) -> None:
        """Connect if needed and load the scripts, also on a live connection (NOSCRIPT: the
        server restarted between two batches, or SCRIPT FLUSH)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = await RespConnection.connect(self._url, self._timeout_s)
        await load_scripts(conn, self._scripts, self._timeout_s, "Redis")

    def abort(self) -> None:
        if self._conn is not None:
            self._conn.close()

    async def close(self) -> None:
        self.abort()
        self._conn = None


class ClusterWire:
    """A :class:`ClusterWriter`: each write goes to the master that serves its slot.

    The writer follows redirects and failovers itself, resends within its deadline (the batch
    timeout) and loads the scripts on each connection it opens, so NOSCRIPT never reaches the
    pipeline. ``on_reconnect()`` is called when it made a connection anew (see ClusterWriter).
    """

    def __init__(self, url: str, timeout_s: float, scripts: Sequence[str], on_reconnect: Callable[[], None]) -> None:
        self._writer = ClusterWriter(url, timeout_s=timeout_s, scripts=scripts, on_reconnect=on_reconnect)
        self._started = False

    def send(self, writes: list[Write]) -> asyncio.Future[list[Any]]:
        return self._writer.send([(w.slot, w.payload) for w in writes], fallbacks=[w.fallback for w in writes])

    async def reconnect(self) -> None:
        """Read the topology and connect to every master, once: afterwards the writer reconnects
        by itself (a batch it cannot send within its deadline fails, and the pipeline resends it)."""
        if not self._started:
            await self._writer.start()
            self._started = True

    def abort(self) -> None:
        """Nothing: the writer fails a batch past its deadline and closes the connections that owe it."""

    async def close(self) -> None:
        await self._writer.close()
