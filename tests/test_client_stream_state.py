"""StreamState, the SDK's per-stream state machine, driven by relayd's frames without a socket.

The Connection is real but never started: frames go in through its dispatch, as its reader would
hand them over, and what the stream would write comes out of ``ops``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relayd.client.session import Connection, Options
from relayd.client.stream_state import Ended, StreamState

S = "job-1"

OPENED = {"type": "opened", "stream": S, "epoch": 1, "seq": 0, "status": "open"}
REFUSED = {"type": "error", "stream": S, "code": "stream_ended", "message": "stream ended (cancelled)", "seq": 1}
ENDED = {"type": "ended", "stream": S, "reason": "cancelled", "cursor": "1-1", "message": "by ops"}


async def sending() -> tuple[Connection, StreamState, list[str]]:
    """A stream opened, with one chunk written and not yet acknowledged; records its on_cancel calls."""
    conn = Connection("http://127.0.0.1:1", "key", Options())
    state = conn.add_stream(S, "text")
    calls: list[str] = []
    state.cancel_callbacks.append(lambda: calls.append("on_cancel"))
    await conn.reserve(3)  # as Writer.send does
    state.enqueue(b'"a"')
    assert [orjson.loads(op)["op"] for op in state.ops(1 << 20)] == ["open", "append"]
    conn._dispatch(OPENED)
    return conn, state, calls


@pytest.mark.parametrize(
    "frames", [[REFUSED, ENDED], [ENDED, REFUSED]], ids=["refusal-then-ended", "ended-then-refusal"]
)
async def test_an_operator_end_with_an_append_in_flight_is_ended_by_server_in_either_order(
    frames: list[dict[str, Any]],
) -> None:
    """relayd refuses the in-flight append ``stream_ended`` and sends the operator's ``ended``: in
    either order, on_cancel runs once and the stream ends with the operator's end, not a failure."""
    conn, state, calls = await sending()
    for frame in frames:
        conn._dispatch(frame)
    assert calls == ["on_cancel"] and state.cancelled.is_set()
    assert state.ended.result() == Ended("cancelled", "1-1")
    assert state.ended_by_server is not None and state.ended_by_server.message == "by ops"
    assert S not in conn.streams and conn.unacked_bytes == 0


async def test_a_refused_append_without_an_ended_asks_relayd_and_fails_already_ended() -> None:
    """A ``stream_ended`` refusal that no ``ended`` follows (the end was made elsewhere): the stream
    re-opens to learn how it ended, writes nothing else meanwhile, and fails StreamAlreadyEnded."""
    conn, state, calls = await sending()
    conn._dispatch(REFUSED)
    assert not state.done and [orjson.loads(op) for op in state.ops(1 << 20)] == [
        {"op": "open", "stream": S, "epoch": 1, "producer": state.producer}
    ]
    conn._dispatch({**REFUSED, "seq": 2})  # a later append written before the re-open: no second re-open
    assert state.ops(1 << 20) == []
    conn._dispatch({"type": "opened", "stream": S, "epoch": 1, "seq": 0, "status": "cancelled", "cursor": "1-1"})
    assert state.ended.exception() is not None and state.ended.exception().code == "stream_ended"  # type: ignore[union-attr]
    assert calls == [] and S not in conn.streams
