"""The load generator's consumer check (benchmarks/fleet.py, ``Consumer``): what the benchmarks'
"delivered once, in order" rests on. Frames are fed as relayd writes them, without sockets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def fleet() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleet_under_test", BENCHMARKS / "fleet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _frame(offset: int, t: int = 0) -> bytes:
    return b'{"type":"chunk","stream":"s","cursor":"1-%010d","data":{"i":%d,"t":%d}}' % (offset, offset, t)


async def test_duplicates_and_out_of_order_chunks_are_counted_whichever_way_they_come(fleet: ModuleType) -> None:
    """New chunks one per message and several per message are taken on the fast paths; a repeat
    (of either) is a duplicate, an older unseen cursor is out of order, and counted once."""
    consumer = fleet.Consumer(fleet.ConsumerStats("s", True), None)
    consumer.on_message(_frame(1), 0)
    consumer.on_message(_frame(2), 0)
    consumer.on_message(b"\n".join([_frame(5), _frame(6)]), 0)
    consumer.on_message(_frame(2), 0)  # a duplicate of a one-chunk message
    consumer.on_message(b"\n".join([_frame(6), _frame(7)]), 0)  # one duplicate, one new
    consumer.on_message(_frame(4), 0)  # older than the last, never seen: out of order
    consumer.on_message(_frame(4), 0)  # and its repeat: a duplicate
    consumer.on_message(_frame(3), 0)
    st = consumer.st
    assert (st.chunks, st.dups, st.ooo) == (7, 3, 2)
