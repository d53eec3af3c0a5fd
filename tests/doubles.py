"""Test doubles of the engine's small Protocols: real classes that record, no mock library.

- :class:`RecordingSink`: a subscriber's Sink (bounded like relayd.outbox.Outbox), recording frames.
- :class:`Owner`: a SubscriptionOwner that says when its subscription finished.
- :class:`RecordingPeer`: a ProducerPeer recording what the relay told the producer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson

from relayd.model import Opened
from relayd.subscription import Subscriber


async def until(predicate: Callable[[], bool], ticks: int = 200) -> None:
    """Let the loop run (no time passes) until ``predicate`` holds: the task under test got there."""
    for _ in range(ticks):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


class RecordingSink:
    """A connection's bounded outbox, as relayd.outbox.Outbox behaves, that records every frame.

    ``offer`` refuses once ``max_bytes`` are queued; ``put`` waits for room; ``control`` always
    queues. Nothing is written anywhere: :meth:`take` plays the peer reading what is queued.
    """

    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self.oldest = 0.0
        self._max_bytes = max_bytes
        self.queued = 0
        self.frames: list[dict[str, Any]] = []
        self._room = asyncio.Event()
        self._room.set()
        self.changed = asyncio.Event()

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def offer(self, data: bytes, chunks: int = 0) -> bool:
        if self.queued >= self._max_bytes:
            return False
        self.control(data)
        return True

    def control(self, data: bytes) -> None:
        self.frames += [orjson.loads(line) for line in data.split(b"\n")]
        self.queued += len(data)
        self.changed.set()

    async def put(self, data: bytes, chunks: int = 0) -> None:
        while self.queued and self.queued + len(data) > self._max_bytes:
            self._room.clear()
            await self._room.wait()
        self.control(data)

    def take(self) -> None:
        self.queued = 0
        self._room.set()

    def chunks(self) -> list[Any]:
        """The data of every chunk frame, and ``("end", reason)`` for an end, in order."""
        return [
            f["data"] if f["type"] == "chunk" else ("end", f["reason"])
            for f in self.frames
            if f["type"] in ("chunk", "end")
        ]

    def offsets(self) -> list[int]:
        return [int(f["cursor"].partition("-")[2]) for f in self.frames if f["type"] in ("chunk", "end")]


class Owner:
    def __init__(self) -> None:
        self.done: list[Subscriber] = []
        self.finished = asyncio.Event()

    def subscription_done(self, sub: Subscriber) -> None:
        self.done.append(sub)
        self.finished.set()


class RecordingPeer:
    """What the relay told one producer connection, as tuples, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def opened(self, stream: str, outcome: Opened, producer: str | None) -> None:
        self.calls.append(("opened", stream, outcome.code, outcome.epoch))

    def acked(self, stream: str, seq: int, gen: int, offset: int) -> None:
        self.calls.append(("acked", stream, seq, offset))

    def ended(self, stream: str, reason: str, gen: int, offset: int, message: str = "") -> None:
        self.calls.append(("ended", stream, reason, offset, message))

    def refused(self, stream: str | None, code: str, message: str, seq: int | None = None) -> None:
        self.calls.append(("refused", stream, code, seq))

    def cancel(self, stream: str) -> None:
        self.calls.append(("cancel", stream))

    def take(self) -> list[tuple[Any, ...]]:
        calls, self.calls = self.calls, []
        return calls
