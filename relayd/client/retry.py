"""When to reconnect: exponential backoff with jitter, bounded by attempts in a row or by time.

One policy for both sides of the SDK: the consumer bounds a run of failures by count
(``max_retries``), the producer by how long an outage lasts (``reconnect_timeout_s``). Kept
apart from the connections so the policy reads (and is tested) on its own.
"""

from __future__ import annotations

import asyncio
import random
import time

from relayd.client.errors import ConnectionFailed

__all__ = ["Retry"]


class Retry:
    """Counts failures since the last success and waits before the next attempt.

    The n-th delay is ``initial_s * 2**(n-1)`` capped at ``max_s``, then drawn between half and
    all of it (jitter: the clients of a restarted relayd do not all come back at once).
    :meth:`wait` raises :class:`ConnectionFailed`, chained to the last failure, after
    ``max_retries`` failures in a row (None: no bound) or once ``deadline_s`` have passed since
    the first failure of the run (None: no bound). What counts as a success is the caller's
    call: only real progress should end a run, or a connection that opens and is dropped at
    once would retry forever.
    """

    def __init__(
        self, initial_s: float, max_s: float, max_retries: int | None, *, deadline_s: float | None = None
    ) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError("backoff: need 0 < backoff_initial_s <= backoff_max_s")
        if max_retries is not None and max_retries < 0:
            raise ValueError("max_retries must be >= 0 or None")
        if deadline_s is not None and deadline_s < 0:
            raise ValueError("the reconnect timeout must be >= 0 or None")
        self.initial_s = initial_s
        self.max_s = max_s
        self.max_retries = max_retries
        self.deadline_s = deadline_s
        self.failures = 0
        self.first_failure_at = 0.0  # time.monotonic() of the run's first failure
        self.last_error: BaseException | None = None

    def failed(self, error: BaseException) -> None:
        if not self.failures:
            self.first_failure_at = time.monotonic()
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

    def remaining(self) -> float:
        """Seconds left before the deadline of the current run (inf without one, or no failure)."""
        if self.deadline_s is None or not self.failures:
            return float("inf")
        return self.first_failure_at + self.deadline_s - time.monotonic()

    def check(self, what: str) -> None:
        """Raise :class:`ConnectionFailed` if the run of failures is over its bound."""
        if not self.failures:
            return
        if self.max_retries is not None and self.failures > self.max_retries:
            reason = f"after {self.failures} failed attempts"
        elif self.remaining() <= 0:
            reason = f"after {self.deadline_s}s of failures ({self.failures} attempts)"
        else:
            return
        raise ConnectionFailed(f"gave up on {what} {reason}: {self.last_error}", attempts=self.failures) from (
            self.last_error
        )

    async def wait(self, what: str) -> None:
        """Return at once after a success; else sleep the backoff delay, or give up.

        The sleep is never cut to zero by the deadline: past it, this raises instead.
        """
        self.check(what)
        if not self.failures:
            return
        await asyncio.sleep(min(self.delay(), self.remaining()))  # backoff, not a synchronisation
