"""The store's Durable Streams operations (relayd/ports.py DurableStore), one suite against
MemoryStore and RedisStore (real Valkey): the ds_*.lua scripts and their in-memory twin.

Time is the ``now`` each call passes, so expiry is tested without waiting. The ``store``
fixture (both stores) is the store contract's.
"""

from __future__ import annotations

from dataclasses import replace

from relayd.model import DsSpec, Entry
from relayd.ports import Store
from tests import test_store_contract

store = test_store_contract.store  # the fixture: MemoryStore and RedisStore

T0 = 1_900_000_000_000
TEXT = DsSpec("text/plain; charset=utf-8", "text/plain", "text")
JSON = DsSpec("application/json", "application/json", "json")


async def test_create_is_idempotent_with_the_same_config_and_a_conflict_otherwise(store: Store) -> None:
    created = await store.ds_create("s", TEXT, [b'"a"'], T0)
    assert (created.code, created.gen, created.tail, created.closed) == ("created", T0, 1, False)
    assert (await store.ds_create("s", TEXT, [], T0 + 1)).code == "exists"
    assert (await store.ds_create("s", JSON, [], T0 + 1)).code == "conflict"
    assert (await store.ds_create("s", replace(TEXT, ttl_s=5), [], T0 + 1)).code == "conflict"
    assert (await store.ds_create("s", replace(TEXT, closed=True), [], T0 + 1)).code == "conflict"


async def test_appends_get_consecutive_offsets_and_reads_return_what_follows_an_offset(store: Store) -> None:
    await store.ds_create("s", JSON, [b"1"], T0)
    ok = await store.ds_append("s", "application/json", [b"2", b"3"], T0 + 1)
    assert (ok.code, ok.first, ok.last, ok.tail) == ("ok", 2, 3, 3)
    read = await store.ds_read("s", T0, 1, 10, T0 + 2)
    assert read is not None and read.after == 1 and read.state.tail == 3
    assert read.entries == [Entry(2, b"2"), Entry(3, b"3")]
    assert (await store.ds_read("s", None, 0, 1, T0 + 2)).entries == [Entry(1, b"1")]  # type: ignore[union-attr]
    older = await store.ds_read("s", T0 - 5, 3, 10, T0 + 2)  # a deleted generation's offset: from the start
    assert older is not None and older.after == 0 and len(older.entries) == 3
    for gen, after in ((T0 + 1, 0), (T0, 4)):  # offsets the stream never issued
        never = await store.ds_read("s", gen, after, 10, T0 + 2)
        assert never is not None and never.after == -1 and never.entries == []
    assert await store.ds_read("nope", None, 0, 10, T0) is None


async def test_the_checks_come_in_the_protocols_order_and_refusals_write_nothing(store: Store) -> None:
    await store.ds_create("s", TEXT, [], T0)
    assert (await store.ds_append("s", "application/json", [b"1"], T0)).code == "content_type"
    assert (await store.ds_append("s", "text/plain", [b'"a"'], T0, stream_seq="2")).code == "ok"
    assert (await store.ds_append("s", "text/plain", [b'"b"'], T0, stream_seq="10")).code == "stream_seq"  # bytes
    assert (await store.ds_append("s", "text/plain", [b'"b"'], T0, stream_seq="3")).code == "ok"
    closing = await store.ds_append("s", "text/plain", [b'"c"'], T0, close=True, producer=("p", 0, 0))
    assert (closing.code, closing.last, closing.closed) == ("ok", 3, True)
    refused = await store.ds_append("s", "application/json", [b"1"], T0)  # closed comes before the type
    assert (refused.code, refused.tail, refused.closed) == ("closed", 3, True)
    retry = await store.ds_append("s", "text/plain", [b'"other"'], T0, close=True, producer=("p", 0, 0))
    assert (retry.code, retry.value, retry.closed) == ("duplicate", 0, True)
    read = await store.ds_read("s", None, 0, 10, T0)
    assert read is not None and read.state.closed and read.state.tail == 3
    assert read.entries[-1] == Entry(4, None, "completed", "")


async def test_producers_are_deduplicated_and_fenced_each_on_their_own(store: Store) -> None:
    await store.ds_create("s", TEXT, [], T0)

    async def send(pid: str, epoch: int, seq: int) -> tuple[str, int, int]:
        out = await store.ds_append("s", "text/plain", [b'"x"'], T0, producer=(pid, epoch, seq))
        return out.code, out.value, out.received

    assert await send("a", 0, 1) == ("seq_gap", 0, 1)
    assert await send("a", 0, 0) == ("ok", 0, 0)
    assert await send("b", 3, 0) == ("ok", 0, 0)
    assert await send("a", 0, 1) == ("ok", 0, 0)
    assert await send("a", 0, 0) == ("duplicate", 1, 0)  # the highest seq accepted, not the request's
    assert await send("a", 0, 3) == ("seq_gap", 2, 3)
    assert await send("a", 1, 1) == ("epoch_seq", 0, 0)
    assert await send("a", 1, 0) == ("ok", 0, 0)
    assert await send("a", 0, 2) == ("stale_epoch", 1, 0)
    assert await send("b", 3, 1) == ("ok", 0, 0)
    read = await store.ds_read("s", None, 0, 10, T0)
    assert read is not None and read.state.tail == 5


async def test_a_sliding_ttl_restarts_on_reads_and_writes_but_not_on_head(store: Store) -> None:
    await store.ds_create("s", replace(TEXT, ttl_s=10), [], T0)
    assert await store.ds_read("s", None, 0, 0, T0 + 9_000, touch=False) is not None  # HEAD: no restart
    assert (await store.ds_append("s", "text/plain", [b'"a"'], T0 + 9_500)).code == "ok"  # restarts: T0 + 19.5 s
    assert await store.ds_read("s", None, 0, 10, T0 + 19_000) is not None  # restarts: T0 + 29 s
    assert await store.ds_read("s", None, 0, 0, T0 + 28_999, touch=False) is not None
    assert await store.ds_read("s", None, 0, 0, T0 + 29_000, touch=False) is None
    again = await store.ds_create("s", TEXT, [], T0 + 29_001)  # gone: created anew, nothing of the old
    assert (again.code, again.tail) == ("created", 0)


async def test_expires_at_does_not_move_and_an_expired_stream_is_gone_for_every_operation(store: Store) -> None:
    spec = replace(TEXT, expires_at="x", expires_ms=T0 + 1_000)
    await store.ds_create("s", spec, [], T0)
    assert (await store.ds_append("s", "text/plain", [b'"a"'], T0 + 999)).code == "ok"
    assert (await store.ds_append("s", "text/plain", [b'"a"'], T0 + 1_000)).code == "not_found"
    assert not await store.ds_delete("s", T0 + 1_000)


async def test_delete_removes_the_stream_and_its_producer_state(store: Store) -> None:
    await store.ds_create("s", TEXT, [], T0)
    await store.ds_append("s", "text/plain", [b'"a"'], T0, producer=("p", 0, 0))
    assert await store.ds_delete("s", T0)
    assert not await store.ds_delete("s", T0)
    await store.ds_create("s", TEXT, [], T0 + 1)
    assert (await store.ds_append("s", "text/plain", [b'"a"'], T0 + 1, producer=("p", 0, 0))).code == "ok"
