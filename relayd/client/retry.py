"""When to reconnect: exponential backoff with jitter, and a bound on attempts in a row.

Kept apart from the consumer's connection so the policy reads (and is tested) on its own.
"""

from __future__ import annotations

import asyncio
import random

from relayd.client.errors import ConnectionFailed

__all__ = ["Retry"]


class Retry:
    """Counts failed connection attempts in a row and waits before the next one.

    The n-th delay is ``initial_s * 2**(n-1)`` capped at ``max_s``, then drawn between half and
    all of it (jitter: the clients of a restarted relayd do not all come back at once). After
    ``max_retries`` failures in a row (None: no bound) :meth:`wait` raises
    :class:`ConnectionFailed`, chained to the last failure.
    """

    def __init__(self, initial_s: float, max_s: float, max_retries: int | None) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError("backoff: need 0 < backoff_initial_s <= backoff_max_s")
        if max_retries is not None and max_retries < 0:
            raise ValueError("max_retries must be >= 0 or None")
        self.initial_s = initial_s
        self.max_s = max_s
        self.max_retries = max_retries
        self.failures = 0
        self.last_error: BaseException | None = None

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        self.last_error = error

    def succeeded(self) -> None:
        self.failures = 0
        self.last_error = None

    def delay(self) -> float:
        if not self.failures:
            return 0.0
        delay = min(self.max_s, self.initial_s * 2.0 ** min(self.failures - 1, 30))
        return delay / 2 + random.random() * delay / 2

    async def wait(self, what: str) -> None:
        """Return at once after a success; else sleep the backoff delay, or give up."""
        if not self.failures:
            return
        if self.max_retries is not None and self.failures > self.max_retries:
            raise ConnectionFailed(
                f"gave up on {what} after {self.failures} failed attempts: {self.last_error}",
                attempts=self.failures,
            ) from self.last_error
        await asyncio.sleep(self.delay())
