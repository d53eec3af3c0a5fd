"""The ``redis.url`` forms relayd accepts, parsed without I/O (config.py checks them at load).

A single server: ``redis://``, ``rediss://`` (TLS) or ``unix://``, read by redis-py. A Redis or
Valkey Cluster, one string so it fits ``redis.url``::

    redis+cluster://[user:password@]host:port[,host:port...]
    rediss+cluster://...                         (TLS to every node)

The hosts are *seed* nodes: any reachable one is enough to learn the whole topology (masters,
slots) with ``CLUSTER SLOTS``; listing a few lets relayd start while one of them is down. A
port defaults to 6379. A database number or path is refused: a cluster has only database 0.
The credentials are used for every node the topology names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

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
