"""pytest plugin: a real Valkey Cluster from the embedded default's own binary.

Listed in tests/conftest.py through ``pytest_plugins``. ``redis_cluster`` is one 3-master
cluster for the whole session (tests isolate themselves by key prefix, as on the single
server); ``redis_cluster_replicas`` is a 3-master + 3-replica cluster of the test's own, for
tests that fail over or kill a master.

The cluster is made from Python, with nothing but the server binary: every node gets its own
config epoch (no epoch collision to resolve), its share of the slots (CLUSTER ADDSLOTSRANGE),
meets node 0 (CLUSTER MEET), replicas follow their master (CLUSTER REPLICATE), and the fixture
polls CLUSTER INFO on every node until each says ``cluster_state:ok`` and knows every node.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from relayd.embedded import _TRAMPOLINE, find_server_binary, free_port
from relayd.store.slots import SLOTS

NODE_TIMEOUT_MS = 1000  # failure detection: a killed master is replaced in about 2 s
START_TIMEOUT_S = 20.0
_POLL_S = 0.02


@dataclass
class ClusterNode:
    port: int
    bus_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]
    node_id: str = ""

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self) -> redis.Redis:
        """A plain (not cluster-aware) redis-py client to this node; close it after use."""
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=False)

    def command(self, *args: Any) -> Any:
        with self.client() as client:
            return client.execute_command(*args)


@dataclass
class Cluster:
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def seed_url(self) -> str:
        """``redis+cluster://`` URL naming every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes if n.alive)

    @property
    def alive(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive]

    def masters(self) -> list[ClusterNode]:
        """The nodes that are masters now (as the first live node sees it), by port."""
        roles = self._roles(self.alive[0])
        return sorted((n for n in self.alive if roles.get(n.node_id) == "master"), key=lambda n: n.port)

    def replicas_of(self, master: ClusterNode, *, online: bool = False) -> list[ClusterNode]:
        """The replicas ``master`` has (``online``: only those done with their initial sync)."""
        with master.client() as client:
            info = client.info("replication")
        ports = {
            int(v["port"])
            for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict) and (not online or v.get("state") == "online")
        }
        return [n for n in self.alive if n.port in ports]

    def owner_of(self, slot: int) -> ClusterNode:
        for start, end, master, *_ in self.alive[0].command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return self.by_port(int(master[1]))
        raise LookupError(f"no node serves slot {slot}")

    def by_port(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def failover(self, replica: ClusterNode, timeout_s: float = 15.0) -> None:
        """Promote ``replica`` with a manual CLUSTER FAILOVER; return once every node agrees."""
        replica.command("CLUSTER", "FAILOVER")
        self._wait(lambda: all(self._roles(n).get(replica.node_id) == "master" for n in self.alive), timeout_s)
        self.wait_ok(timeout_s)

    def kill(self, master: ClusterNode, timeout_s: float = 15.0) -> ClusterNode:
        """SIGKILL ``master``; return its replica once that one is the master everywhere."""
        replicas = self.replicas_of(master)
        master.proc.kill()
        master.proc.wait()
        self._wait(
            lambda: any(all(self._roles(n).get(r.node_id) == "master" for n in self.alive) for r in replicas),
            timeout_s,
        )
        self.wait_ok(timeout_s)
        roles = self._roles(self.alive[0])
        return next(r for r in replicas if roles.get(r.node_id) == "master")

    def wait_ok(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll every live node until it reports ``cluster_state:ok`` and knows every live node."""
        count = len(self.alive)

        def ok(node: ClusterNode) -> bool:
            info = node.command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.nodes)}" in text

        self._wait(lambda: len(self.alive) == count and all(ok(n) for n in self.alive), timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.proc.terminate()
        for node in self.nodes:
            try:
                node.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()

    @staticmethod
    def _roles(node: ClusterNode) -> dict[str, str]:
        """node id -> "master" | "slave" | "fail", as ``node`` sees the cluster."""
        text = node.command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else str(text)
        roles: dict[str, str] = {}
        for line in text.splitlines():
            parts = line.split()
            flags = parts[2].split(",")
            roles[parts[0]] = "fail" if "fail" in flags else ("master" if "master" in flags else "slave")
        return roles

    def _wait(self, condition: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                if condition():
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"cluster did not reach the wanted state within {timeout_s:g}s")
            time.sleep(_POLL_S)  # polling the servers' state, not synchronising on time


def start_cluster(base_dir: Path, masters: int = 3, replicas: int = 0) -> Cluster:
    """Start ``masters`` masters, each with ``replicas`` replicas; return once the cluster is ok."""
    binary = find_server_binary()
    cluster = Cluster()
    try:
        for i in range(masters * (1 + replicas)):
            cluster.nodes.append(_spawn(binary, base_dir / f"n{i}"))
        for node in cluster.nodes:
            _wait_ping(node)
            node.node_id = node.command("CLUSTER", "MYID").decode()
        share = SLOTS // masters
        for i, node in enumerate(cluster.nodes):
            node.command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            if i < masters:
                end = SLOTS - 1 if i == masters - 1 else (i + 1) * share - 1
                node.command("CLUSTER", "ADDSLOTSRANGE", i * share, end)
        first = cluster.nodes[0]
        for node in cluster.nodes[1:]:
            first.command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        for i, node in enumerate(cluster.nodes[masters:]):
            master = cluster.nodes[i % masters]
            # a replica must know its master's id before it can follow it
            cluster._wait(lambda n=node, m=master: m.node_id.encode() in n.command("CLUSTER", "NODES"), START_TIMEOUT_S)
            node.command("CLUSTER", "REPLICATE", master.node_id)
        cluster.wait_ok()
        if replicas:
            # a replica that has not finished its initial sync would take over with no data at all
            cluster._wait(
                lambda: all(len(cluster.replicas_of(m, online=True)) == replicas for m in cluster.nodes[:masters]), 10
            )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _spawn(binary: Path, data_dir: Path) -> ClusterNode:
    data_dir.mkdir(parents=True)
    port, bus_port = free_port(), free_port()
    argv = [
        str(binary),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--cluster-enabled", "yes",
        "--cluster-port", str(bus_port),  # port + 10000 could be past 65535
        "--cluster-config-file", str(data_dir / "nodes.conf"),
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        "--cluster-replica-validity-factor", "0",  # a replica may always take over (tests)
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "no",
        "--repl-diskless-sync-delay", "0",  # a replica syncs at once (the default waits 5 s for others)
        "--logfile", str(data_dir / "valkey.log"),
        "--daemonize", "no",
    ]  # fmt: skip
    if sys.platform.startswith("linux"):  # the node dies with the test process (PR_SET_PDEATHSIG)
        argv = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *argv]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=data_dir, start_new_session=True)
    return ClusterNode(port, bus_port, data_dir, proc)


def _wait_ping(node: ClusterNode) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if not node.alive:
            log = (node.data_dir / "valkey.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"cluster node on port {node.port} exited: {log}")
        with contextlib.suppress(redis.RedisError), node.client() as client:
            if client.ping():
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"cluster node on port {node.port} did not answer PING")
        time.sleep(_POLL_S)  # polling the server's state


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-master cluster shared by the session; isolate by key prefix, never fail it over."""
    cluster = _start_retrying(tmp_path_factory.mktemp("cluster"), masters=3, replicas=0)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_replicas(tmp_path: Path) -> Iterator[Cluster]:
    """A 3-master, 3-replica cluster of this test's own: fail it over, kill its masters."""
    cluster = _start_retrying(tmp_path / "cluster", masters=3, replicas=1)
    try:
        yield cluster
    finally:
        cluster.stop()


def _start_retrying(base: Path, masters: int, replicas: int, attempts: int = 3) -> Cluster:
    # Another process may take a free port before a node binds it: start over on new ports.
    for attempt in range(1, attempts + 1):
        try:
            return start_cluster(base / f"try{attempt}", masters, replicas)
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")
