"""Which master of a Redis/Valkey Cluster owns which slot.

The cluster URL (``redis+cluster://host:port[,host:port...]``) is parsed without I/O in
:mod:`relayd.redis_url` (re-exported here); :func:`fetch_slot_map` asks the nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis

from relayd.errors import StoreUnavailable
from relayd.redis_url import CLUSTER_SCHEMES, Addr, ClusterUrl, is_cluster_url, parse_cluster_url
from relayd.store.resp import RespConnection, encode_command
from relayd.store.slots import SLOTS

__all__ = [
    "CLUSTER_SCHEMES",
    "Addr",
    "ClusterUrl",
    "SlotMap",
    "fetch_slot_map",
    "is_cluster_url",
    "parse_cluster_slots",
    "parse_cluster_url",
]


class SlotMap:
    """Which master serves each slot. ``owners[slot]`` is None for a slot no master serves."""

    __slots__ = ("owners",)

    def __init__(self, owners: list[Addr | None] | None = None) -> None:
        self.owners: list[Addr | None] = owners if owners is not None else [None] * SLOTS

    @property
    def masters(self) -> set[Addr]:
        return {addr for addr in self.owners if addr is not None}

    @property
    def complete(self) -> bool:
        return all(addr is not None for addr in self.owners)


def parse_cluster_slots(reply: Sequence[Any], asked: Addr) -> SlotMap:
    """A SlotMap from a ``CLUSTER SLOTS`` reply given by the node at ``asked``.

    Each entry is ``[start, end, [host, port, id, ...], replicas...]``; an empty or ``?`` host
    means "the address you reached me at" (Redis's unknown-endpoint convention).
    """
    owners: list[Addr | None] = [None] * SLOTS
    for entry in reply:
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        addr = (host if host not in ("", "?") else asked[0], int(master[1]))
        owners[start : end + 1] = [addr] * (end - start + 1)
    return SlotMap(owners)


async def fetch_slot_map(url: ClusterUrl, nodes: Iterable[Addr], timeout_s: float) -> SlotMap:
    """Ask ``nodes`` in turn (``CLUSTER SLOTS``) until one answers with a map; the first map wins.

    Raises :class:`StoreUnavailable` naming the last problem if none answers within ``timeout_s``.
    """
    problem = "no node to ask"
    try:
        async with asyncio.timeout(timeout_s):
            for addr in dict.fromkeys(nodes):  # de-duplicated, order kept
                try:
                    conn = await RespConnection.connect(url.node_url(addr), timeout_s)
                except StoreUnavailable as exc:
                    problem = f"{addr[0]}:{addr[1]}: {exc}"
                    continue
                try:
                    (reply,) = await conn.execute(encode_command(["CLUSTER", "SLOTS"]), 1)
                except StoreUnavailable as exc:
                    problem = f"{addr[0]}:{addr[1]}: {exc}"
                    continue
                finally:
                    conn.close()
                if isinstance(reply, hiredis.ReplyError):
                    problem = f"{addr[0]}:{addr[1]} answered CLUSTER SLOTS with {reply}"
                    continue
                if reply:
                    return parse_cluster_slots(reply, addr)
                problem = f"{addr[0]}:{addr[1]} serves no slots yet"
    except TimeoutError:
        problem = f"timed out after {timeout_s:g}s ({problem})"
    raise StoreUnavailable(f"cannot read the cluster topology: {problem}")
