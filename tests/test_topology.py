"""relayd.store.topology: the cluster URL form and the CLUSTER SLOTS reply, parsed without I/O."""

from __future__ import annotations

import pytest

from relayd.store.topology import ClusterUrl, is_cluster_url, parse_cluster_slots, parse_cluster_url


def test_seeds_credentials_and_default_port() -> None:
    url = parse_cluster_url("redis+cluster://app:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert url == ClusterUrl((("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)), "app", "p@ss", tls=False)
    assert url.node_url(("::1", 7002)) == "redis://app:p%40ss@[::1]:7002"


def test_tls_scheme_and_password_alone() -> None:
    url = parse_cluster_url("rediss+cluster://secret@host:7000/")
    assert url == ClusterUrl((("host", 7000),), None, "secret", tls=True)
    assert url.node_url(("h", 1)) == "rediss://:secret@h:1"


def test_is_cluster_url() -> None:
    assert is_cluster_url("redis+cluster://h:1")
    assert is_cluster_url("REDISS+CLUSTER://h:1")
    assert not is_cluster_url("redis://h:1")
    assert not is_cluster_url("unix:///tmp/x.sock")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://h:1", r"starts with redis\+cluster://"),
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://h:1?cluster=true", "no query"),
        ("redis+cluster://h:1,,h:2", "empty host"),
        ("redis+cluster://h:port", "bad port"),
        ("redis+cluster://h:70000", "bad port"),
        ("redis+cluster://:7000", "bad host"),
        ("redis+cluster://[::1", "bad host"),
    ],
)
def test_refused_urls_say_why(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_cluster_url(url)


def test_cluster_slots_reply() -> None:
    """Ranges map to their master; an empty host is the address the node was reached at."""
    reply = [
        [0, 5460, [b"127.0.0.1", 7000, b"id0"], [b"127.0.0.1", 7003, b"id3"]],
        [5461, 16383, [b"", 7001, b"id1"]],
    ]
    slot_map = parse_cluster_slots(reply, ("10.1.1.1", 7000))
    assert slot_map.owners[0] == slot_map.owners[5460] == ("127.0.0.1", 7000)
    assert slot_map.owners[5461] == slot_map.owners[16383] == ("10.1.1.1", 7001)
    assert slot_map.masters == {("127.0.0.1", 7000), ("10.1.1.1", 7001)}
    assert slot_map.complete
    assert not parse_cluster_slots(reply[:1], ("h", 1)).complete
