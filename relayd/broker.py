"""The broker seam: how instances of relayd learn of each other's writes and requests.

The relay publishes to its own hub directly (no round trip for local subscribers). What another
instance wrote reaches this one through a broker, which feeds the hub; a cancel request for a
stream held elsewhere leaves through it. Two implementations:

- :class:`LocalBroker`: one instance; nothing crosses.
- :class:`relayd.store.broker.RedisBroker`: Redis pub/sub. The scripts that append, end and
  create a stream publish a notification on the stream's channel in the same script as the
  write, so notifications are ordered with the writes by construction; an instance subscribes
  to a stream's channel while it has local subscribers, and after any reconnect re-reads every
  followed stream (a lost notification costs latency, never a chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from relayd.hub import Hub

CancelHandler = Callable[[str], None]
"""``(stream)``: a consumer on another instance asked to cancel ``stream``."""


class Broker(Protocol):
    async def start(self, hub: Hub, on_cancel: CancelHandler) -> None:
        """Feed ``hub`` with other instances' publications; call ``on_cancel`` for their cancels."""
        ...

    async def close(self) -> None: ...

    def request_cancel(self, stream: str) -> None:
        """Ask whichever instance holds ``stream`` to send its producer a ``cancel``."""
        ...

    @property
    def up(self) -> bool:
        """Connected (a local broker always is)."""
        ...

    @property
    def remote(self) -> bool:
        """Other instances may exist: a stream not held here may be held elsewhere."""
        ...


class LocalBroker:
    """A single instance: every publication is local; nothing to follow, nobody to tell."""

    async def start(self, hub: Hub, on_cancel: CancelHandler) -> None:
        return None

    async def close(self) -> None:
        return None

    def request_cancel(self, stream: str) -> None:
        return None

    @property
    def up(self) -> bool:
        return True

    @property
    def remote(self) -> bool:
        return False
