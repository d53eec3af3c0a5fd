"""Where a Redis/Valkey Cluster is and which master owns which slot.

The URL form, one string so it fits ``redis.url``::

    redis+cluster://[user:password@]host:port[,host:port...]
    rediss+cluster://...                         (TLS to every node)

The hosts are *seed* nodes: any reachable one is enough to learn the whole topology (masters,
slots) with ``CLUSTER SLOTS``; listing a few lets relayd start while one of them is down. A
port defaults to 6379. A database number or path is refused: a cluster has only database 0.
The credentials are used for every node the topology names.

Parsing is pure (:func:`parse_cluster_url`); :func:`fetch_slot_map` asks the nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote

import hiredis

from relayd.errors import StoreUnavailable
from relayd.store.resp import RespConnection, encode_command
from relayd.store.slots import SLOTS

CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")

Addr = tuple[str, int]  # (host, port) of one node


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    seeds: tuple[Addr, ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def node_url(self, addr: Addr) -> str:
        """A ``redis://`` URL for one node, with the cluster's credentials (for RespConnection)."""
        auth = ""
        if self.password is not None:
            user = quote(self.username, safe="") if self.username else ""
            auth = f"{user}:{quote(self.password, safe='')}@"
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{addr[1]}"


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """Parse ``redis+cluster://[user:pass@]host:port[,host:port...]``; ValueError says why not."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"a cluster URL starts with redis+cluster:// or rediss+cluster://, not {url!r}")
    if "?" in rest or "#" in rest:
        raise ValueError("a cluster URL takes no query or fragment")
    userinfo, at, hosts = rest.rpartition("@")
    if not at:
        hosts = rest
    if "/" in hosts:
        path = hosts[hosts.index("/") :]
        if path.strip("/"):
            raise ValueError(f"a cluster has only database 0; remove {path!r} from the URL")
        hosts = hosts[: hosts.index("/")]
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if colon:
            username, password = (unquote(user) or None), unquote(secret)
        else:
            password = unquote(user)  # redis://secret@host: a password alone, as redis-py reads it
    seeds = tuple(_parse_host(part) for part in hosts.split(","))
    return ClusterUrl(seeds, username, password, tls=scheme.lower() == "rediss+cluster")


def _parse_host(text: str) -> Addr:
    text = text.strip()
    if not text:
        raise ValueError("empty host in the cluster URL")
    if text.startswith("["):  # [ipv6]:port
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"bad host {text!r} in the cluster URL")
        port_text = tail[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"bad host {text!r} in the cluster URL")
    if not port_text:
        return host, 6379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r} in the cluster URL")
    return host, int(port_text)


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
