"""The CLI's direct mode: read streams straight from relayd's Redis, for when relayd is down.

``relayd streams ls|show|export --redis-url URL`` (or ``--direct`` with the config's
``redis.url``) read the same keys the admin API reads, through the same code
(relayd/catalog.py), and answer the same JSON. Only these reads: ending and removing
streams, tails and the status need the running relayd (its hub, its producers' connections).
There are no consumers to count (``consumers`` is None).

Redis failures become the CLI's errors here: not reachable -> :class:`Unreachable` (exit 4).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import orjson

from relayd import catalog
from relayd.admin_errors import AdminError, NotFound, Unreachable
from relayd.config import Config
from relayd.errors import StoreError, StoreUnavailable
from relayd.store.redis_streams import RedisStore

T = TypeVar("T")


def _no_consumers(stream: str) -> None:
    return None


class DirectClient:
    """Reads of one relayd deployment's keys (``redis.key_prefix``) in the Redis at ``redis_url``."""

    def __init__(self, config: Config, redis_url: str) -> None:
        self._config = config
        self._redis_url = redis_url
        self.url = _redact(redis_url)

    def __repr__(self) -> str:
        return f"DirectClient({self.url!r})"

    def _store(self) -> RedisStore:
        return RedisStore(self._config, self._redis_url)

    def _fail(self, exc: StoreError) -> AdminError:
        if isinstance(exc, StoreUnavailable):
            return Unreachable(f"cannot reach Redis at {self.url}: {exc}")
        return AdminError(str(exc))

    def _run(self, call: Callable[[RedisStore], Awaitable[T]]) -> T:
        async def with_store() -> T:
            store = self._store()
            try:
                return await call(store)
            finally:
                await store.close()

        try:
            return asyncio.run(with_store())
        except StoreError as exc:
            raise self._fail(exc) from None

    # what the commands call ---------------------------------------------------------------------

    def list_streams(self, which: str, prefix: str, limit: int) -> dict[str, Any]:
        return self._run(lambda store: catalog.list_streams(store, which, prefix, limit, _no_consumers))

    def show(self, stream: str) -> dict[str, Any]:
        body = self._run(lambda store: catalog.describe(store, stream, _no_consumers))
        if body is None:
            raise NotFound(f"stream {stream} does not exist")
        return body

    def export(self, stream: str) -> Iterator[dict[str, Any]]:
        """The stream page by page, each page read when the previous one was written out."""
        with asyncio.Runner() as runner:
            store = self._store()
            try:
                meta = runner.run(store.read_meta(stream))
                if meta is None:
                    raise NotFound(f"stream {stream} does not exist")
                pages = catalog.export(store, meta, self._config.consumer.catchup_page)

                async def next_page() -> bytes | None:
                    return await anext(pages, None)

                while (lines := runner.run(next_page())) is not None:
                    for line in lines.splitlines():
                        yield orjson.loads(line)
            except StoreError as exc:
                raise self._fail(exc) from None
            finally:
                runner.run(store.close())


def _redact(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
