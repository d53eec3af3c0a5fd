"""Redis Streams storage: encodes the per-stream script calls for the batcher, and reads.

The write path goes through :class:`~relayd.store.resp.RespConnection` (one buffer per batch);
reads, script loading and health checks use redis-py. redis-py exceptions are translated into
:class:`StoreUnavailable` / :class:`StoreError` here and nowhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from relayd.config import RedisConfig, StreamsConfig
from relayd.errors import StoreError, StoreUnavailable
from relayd.protocol import Entry
from relayd.store.keys import Keys
from relayd.store.resp import RespConnection, encode_command

SCRIPTS = ("open", "append", "end", "touch")
_MAX_SEQ = 2**64 - 1  # the largest sequence part of a Redis stream entry id


@dataclass(frozen=True, slots=True)
class StreamMeta:
    stream: str
    status: str  # open | completed | error | cancelled | producer_lost
    gen: int
    epoch: int
    seq: int
    n: int  # offset of the last entry (0: empty)
    content_type: str
    created_ms: int
    updated_ms: int
    ended_ms: int | None
    message: str

    @property
    def is_open(self) -> bool:
        return self.status == "open"


@dataclass(frozen=True, slots=True)
class StreamStats:
    """What the admin API shows of a stream besides its meta."""

    meta: StreamMeta
    entries: int  # entries stored in the log (chunks, and the end once ended)
    memory_bytes: int | None  # Redis's estimate for the log and meta keys (MEMORY USAGE)
    ttl_s: int  # seconds until the stream expires; -1: no expiry set

    @property
    def chunks(self) -> int:
        return max(self.entries - (0 if self.meta.is_open else 1), 0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Store:
    """Owns the Redis connections of one relayd process."""

    def __init__(self, redis_cfg: RedisConfig, streams_cfg: StreamsConfig, url: str) -> None:
        self.keys = Keys(redis_cfg.key_prefix)
        self.url = url
        self._timeout_s = redis_cfg.timeout_ms / 1000
        self._streams = streams_cfg
        # A blocking pool: a burst of reads (thousands of consumers catching up after a restart)
        # queues for a connection, up to redis.timeout_ms, instead of failing with "Too many
        # connections" as the default pool does past its cap.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=redis_cfg.max_connections,
            timeout=self._timeout_s,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
        )
        self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)  # owns and closes the pool
        self._writer: RespConnection | None = None
        self._sha: dict[str, bytes] = {}
        # Pre-encoded constant arguments: encoded once, spliced into every command.
        self._max_chunks = str(streams_cfg.max_chunks).encode()
        self._open_ttl = str(streams_cfg.open_ttl_s).encode()
        self._end_ttl = str(streams_cfg.ttl_after_end_s).encode()
        self._append_tail = encode_command([self._max_chunks, self._open_ttl])[4:]

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.load_scripts()
        await self.reconnect()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        await self._client.aclose()

    async def load_scripts(self) -> None:
        lua = resources.files("relayd.store") / "lua"
        try:
            for name in SCRIPTS:
                sha = await self._client.script_load((lua / f"{name}.lua").read_text())
                self._sha[name] = sha.encode() if isinstance(sha, str) else sha
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc

    async def reconnect(self) -> None:
        if self._writer is not None and not self._writer.closed:
            return
        self._writer = await RespConnection.connect(self.url, self._timeout_s)

    def abort_writer(self) -> None:
        """Drop the write connection: every batch on it fails and the batcher reconnects."""
        if self._writer is not None:
            self._writer.close()

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc

    # write path (used by the batcher) --------------------------------------------------------

    def send(self, payload: bytes, count: int) -> Any:
        """Send ``count`` pre-encoded commands in one write; a future of their replies."""
        writer = self._writer
        if writer is None:
            raise StoreUnavailable("store not started")
        return writer.execute(payload, count)

    def cmd_open(
        self, stream: str, epoch: int | None, content_type: str, now: int, producer: str | None = None
    ) -> bytes:
        keys = self.keys
        return encode_command(
            [
                "EVALSHA",
                self._sha["open"],
                "2",
                keys.meta(stream),
                keys.log(stream),
                b"" if epoch is None else str(epoch),
                str(now),
                content_type,
                self._open_ttl,
                producer or b"",
            ]
        )

    def append_head(self, stream: str, epoch: int) -> bytes:
        """The fixed part of every append command for ``stream`` in ``epoch``, encoded once.

        A micro-optimisation: ``cmd_append`` is on the hot path and only its sequence number,
        clock and chunks change from one append to the next.
        """
        keys = self.keys
        return encode_command(["EVALSHA", self._sha["append"], "2", keys.meta(stream), keys.log(stream), str(epoch)])[
            4:  # without the "*6\r\n" array header: the real argument count is set per append
        ]

    def cmd_append(self, head: bytes, seq: int, chunks: list[bytes], now: int) -> bytes:
        """``head`` from :meth:`append_head`, then the per-append arguments."""
        seq_b = b"%d" % seq
        now_b = b"%d" % now
        parts = [
            b"*%d\r\n" % (10 + len(chunks)),
            head,
            b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(seq_b), seq_b, len(now_b), now_b),
            self._append_tail,
        ]
        parts.extend([b"$%d\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks])
        return b"".join(parts)

    def cmd_end(
        self,
        stream: str,
        reason: str,
        message: str,
        now: int,
        *,
        epoch: int | None = None,
        stale_before: int | None = None,
    ) -> bytes:
        keys = self.keys
        return encode_command(
            [
                "EVALSHA",
                self._sha["end"],
                "2",
                keys.meta(stream),
                keys.log(stream),
                reason,
                message,
                str(now),
                self._end_ttl,
                b"" if epoch is None else str(epoch),
                b"" if stale_before is None else str(stale_before),
            ]
        )

    def cmd_touch(self, stream: str, now: int) -> bytes:
        keys = self.keys
        return encode_command(
            ["EVALSHA", self._sha["touch"], "2", keys.meta(stream), keys.log(stream), str(now), self._open_ttl]
        )

    def cmd_index(self, scored: list[tuple[str, int]]) -> bytes:
        """ZADD the open-stream index (score: last activity, ms)."""
        args: list[bytes | str] = ["ZADD", self.keys.open_index]
        for stream, score in scored:
            args += [str(score), stream]
        return encode_command(args)

    def cmd_unindex(self, streams: list[str]) -> bytes:
        return encode_command(["ZREM", self.keys.open_index, *streams])

    # read path --------------------------------------------------------------------------------

    async def read_meta(self, stream: str) -> StreamMeta | None:
        try:
            raw: dict[bytes, bytes] = await self._client.hgetall(self.keys.meta(stream))  # type: ignore[assignment]
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return parse_meta(stream, raw) if raw else None

    async def read_entries(self, stream: str, gen: int, first: int, count: int) -> list[Entry]:
        """Up to ``count`` entries of generation ``gen`` from offset ``first`` on."""
        try:
            # One key holds one generation: a new one starts only after the key vanished. A reader
            # still on an old generation must not take the new one's entries for its own: bound it.
            rows: list[tuple[bytes, dict[bytes, bytes]]] = await self._client.xrange(  # type: ignore[assignment]
                self.keys.log(stream), f"{gen}-{first}", f"{gen}-{_MAX_SEQ}", count=count
            )
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return [parse_entry(entry_id, fields) for entry_id, fields in rows]

    async def stale_open_streams(self, before_ms: int, limit: int = 500) -> list[str]:
        try:
            rows: list[bytes] = await self._client.zrangebyscore(  # type: ignore[assignment]
                self.keys.open_index, "-inf", before_ms, start=0, num=limit
            )
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return [r.decode() for r in rows]

    async def ttl_s(self, stream: str) -> int:
        try:
            return int(await self._client.ttl(self.keys.meta(stream)))
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc

    # admin reads and removal (relayd/web/admin.py) ------------------------------------------------

    async def scan_streams(self, cursor: int, id_prefix: str, count: int) -> tuple[int, list[str]]:
        """One SCAN step over the meta keys of streams whose id starts with ``id_prefix``.

        Returns the next cursor (0: the scan is complete) and the stream ids found, open or ended.
        """
        try:
            cursor, found = await self._client.scan(cursor, match=self.keys.stream_pattern(id_prefix), count=count)
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return int(cursor), [self.keys.stream_of_meta(key) for key in found]

    async def scan_open(self, cursor: int, id_prefix: str, count: int) -> tuple[int, list[str]]:
        """One ZSCAN step over the open-stream index; cheaper than :meth:`scan_streams` for open ones."""
        try:
            cursor, found = await self._client.zscan(self.keys.open_index, cursor, match=f"{id_prefix}*", count=count)
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return int(cursor), [member.decode() if isinstance(member, bytes) else str(member) for member, _ in found]

    async def open_count(self) -> int:
        """Streams in the open index (held by a producer on any instance, or awaiting the sweep)."""
        try:
            return int(await self._client.zcard(self.keys.open_index))
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc

    async def stream_heads(self, streams: list[str]) -> list[tuple[int, bool] | None]:
        """``(created_ms, is_open)`` of each stream, one pipelined HMGET each; None if it is gone.

        What a listing sorts and filters on, without the cost of :meth:`stream_stats`.
        """
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.hmget(self.keys.meta(stream), ["created", "status"])
                replies: list[list[bytes | None]] = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return [
            None if created is None and status is None else (int(created or 0), (status or b"open") == b"open")
            for created, status in replies
        ]

    async def stream_stats(self, streams: list[str]) -> list[StreamStats | None]:
        """Meta, entry count, memory and TTL of each stream, in one round trip; None if it is gone.

        ``MEMORY USAGE`` samples the log (Redis's default), so ``memory_bytes`` is an estimate;
        None where the server refuses the command (some managed Redis services do).
        """
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for stream in streams:
                    meta_key, log_key = self.keys.meta(stream), self.keys.log(stream)
                    pipe.hgetall(meta_key)
                    pipe.xlen(log_key)
                    pipe.memory_usage(log_key)
                    pipe.memory_usage(meta_key)
                    pipe.ttl(meta_key)
                replies = await pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        out: list[StreamStats | None] = []
        for i, stream in enumerate(streams):
            raw, entries, log_mem, meta_mem, ttl = replies[5 * i : 5 * i + 5]
            if isinstance(raw, Exception) or isinstance(entries, Exception) or isinstance(ttl, Exception):
                raise StoreError(f"Redis error: {raw if isinstance(raw, Exception) else entries}")
            if not raw:
                out.append(None)
                continue
            memory = None
            if not isinstance(log_mem, Exception) and not isinstance(meta_mem, Exception):
                memory = int(log_mem or 0) + int(meta_mem or 0)
            out.append(StreamStats(parse_meta(stream, raw), int(entries), memory, int(ttl)))
        return out

    async def log_edges(self, stream: str) -> tuple[int, int] | None:
        """Offsets of the first and last entries still stored (the end counts), or None if empty."""
        log_key = self.keys.log(stream)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xrange(log_key, count=1)
                pipe.xrevrange(log_key, count=1)
                first, last = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        if not first or not last:
            return None
        return int(first[0][0].partition(b"-")[2]), int(last[0][0].partition(b"-")[2])

    async def delete_stream(self, stream: str) -> bool:
        """Delete a stream's keys and its index entry; False if it did not exist."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.delete(self.keys.meta(stream), self.keys.log(stream))
                pipe.zrem(self.keys.open_index, stream)
                deleted, _ = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return int(deleted) > 0


def parse_meta(stream: str, raw: dict[bytes, bytes]) -> StreamMeta:
    def num(name: bytes, default: int = 0) -> int:
        value = raw.get(name)
        return int(value) if value is not None and value != b"" else default

    ended = raw.get(b"ended")
    return StreamMeta(
        stream=stream,
        status=raw.get(b"status", b"open").decode(),
        gen=num(b"gen"),
        epoch=num(b"epoch"),
        seq=num(b"seq"),
        n=num(b"n"),
        content_type=raw.get(b"ct", b"json").decode(),
        created_ms=num(b"created"),
        updated_ms=num(b"updated"),
        ended_ms=int(ended) if ended else None,
        message=raw.get(b"message", b"").decode(),
    )


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    offset = int(entry_id.partition(b"-")[2])
    data = fields.get(b"d")
    if data is not None:
        return Entry(offset, data)
    return Entry(offset, None, fields.get(b"e", b"error").decode(), fields.get(b"m", b"").decode())


def _translate(exc: redis.exceptions.RedisError) -> StoreError:
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return StoreUnavailable(f"Redis unavailable: {exc}")
    return StoreError(f"Redis error: {exc}")
