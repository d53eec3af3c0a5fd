"""Redis Streams storage: the typed write path (through the group-commit pipeline) and reads.

Writes are per-stream Lua scripts (relayd/store/lua/), encoded here, queued on the
:class:`~relayd.store.pipeline.Pipeline` and sent on its wire (store/wire.py): one
:class:`~relayd.store.resp.RespConnection` to a single server, one buffer per batch, or a
:class:`~relayd.store.cluster.ClusterWriter` on a Redis/Valkey Cluster (``redis+cluster://``),
one buffer per master. Their positional replies are parsed here, and only here, into the typed
outcomes of :mod:`relayd.model`; callbacks run in submission order. Reads and health checks use
redis-py (its cluster client on a cluster). redis-py and hiredis exceptions are translated into
:class:`StoreUnavailable` / :class:`StoreError` here and nowhere else.

On a cluster every write goes to the master of its key's hash slot: a stream's keys and its
notification channel share the stream's slot (``{<stream id>}``), so each script runs on one
node and publishes with SPUBLISH (sharded pub/sub) in that slot; the open index is one key in a
slot of its own, and a control request is published (PUBLISH reaches every node) from the slot
of the control channel. Reads that span streams (listing, stats) group their commands by node.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from importlib import resources
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from mypy_extensions import mypyc_attr
from redis.asyncio.cluster import ClusterNode

from relayd.config import Config
from relayd.errors import StoreError, StoreUnavailable
from relayd.metrics import Metrics
from relayd.model import (
    AppendOutcome,
    DsRead,
    DsSpec,
    DsWrite,
    EndOutcome,
    Entry,
    FramedPage,
    OpenOutcome,
    Refused,
    StreamMeta,
    StreamStats,
    now_ms,
)
from relayd.store.appends import Appender, AppendHandle
from relayd.store.keys import Keys
from relayd.store.pages import PageReader
from relayd.store.pipeline import Pipeline, Write
from relayd.store.replies import (
    LANE,
    ds_write_outcome,
    end_outcome,
    failed_write,
    open_outcome,
    parse_ds_read,
    parse_entry,
    parse_meta,
    text_of,
)
from relayd.store.resp import RespArg, encode_command
from relayd.store.slots import key_slot
from relayd.store.topology import is_cluster_url, parse_cluster_url
from relayd.store.wire import ClusterWire, NodeWire

SCRIPTS = ("open", "append", "end", "touch", "ds_create", "ds_append", "ds_read", "ds_delete")
_MAX_SEQ = 2**64 - 1  # the largest sequence part of a Redis stream entry id
_new_entry = tuple.__new__  # an Entry without its named tuple's Python __new__ (see replies.parse_entry)
_MASTER_BITS = 10  # scan_streams on a cluster: the low bits of its cursor say which master
_MASTER_MASK = (1 << _MASTER_BITS) - 1


@mypyc_attr(allow_interpreted_subclasses=True)  # (mypyc: tests record its reads in a subclass)
class RedisStore:
    """Owns the Redis connections of one relayd process: the write pipeline and the read pool."""

    def __init__(self, config: Config, url: str, metrics: Metrics | None = None, *, instance: str = "") -> None:
        """``instance``: this process's id in the notifications its writes publish (see broker.py)."""
        redis_cfg, streams_cfg = config.redis, config.streams
        self.keys = Keys(redis_cfg.key_prefix)
        self.url = url
        self._config = config
        self._metrics = metrics
        self._timeout_s = redis_cfg.timeout_ms / 1000
        self._streams = streams_cfg
        self.cluster = is_cluster_url(url)
        lua = resources.files("relayd.store") / "lua"
        lib = (lua / "lib.lua").read_text()  # shared helpers, in front of every script
        scripts = {name: lib + (lua / f"{name}.lua").read_text() for name in SCRIPTS}
        # The SHA1 of a script's body is its EVALSHA name; the wire loads the scripts on each connection.
        self._sha = {name: hashlib.sha1(body.encode()).hexdigest().encode() for name, body in scripts.items()}
        self._ds_read_body = scripts["ds_read"]
        self._wire: NodeWire | ClusterWire
        self._client: aioredis.Redis | aioredis.RedisCluster
        self._reads: asyncio.Semaphore | _Unbounded = _Unbounded()
        self._pages: PageReader | None = None
        if self.cluster:
            cluster = parse_cluster_url(url)
            self._wire = ClusterWire(url, self._timeout_s, list(scripts.values()), self.recovered)
            # redis-py's cluster client has no blocking pool: past max_connections on a node it
            # fails. The semaphore makes a burst of reads queue instead, as the pool below does.
            self._reads = asyncio.Semaphore(redis_cfg.max_connections)
            self._client = aioredis.RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in cluster.seeds],
                username=cluster.username,
                password=cluster.password,
                ssl=cluster.tls,
                max_connections=redis_cfg.max_connections,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
            )
            self._slot_of: Callable[[str], int] = key_slot
        else:
            self._wire = NodeWire(url, self._timeout_s, list(scripts.values()))
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
            self._client = aioredis.Redis.from_pool(pool)  # owns and closes the pool
            self._slot_of = _no_slot
            # History pages (catch-ups, replays) on connections of relayd's own (store/pages.py).
            self._pages = PageReader(url, self._timeout_s, redis_cfg.max_connections)
        # XRANGE answers as hiredis parsed it: redis-py's callback turns every entry into a tuple
        # and a dict in Python first (half the CPU of a replay), then parse_entry built an Entry.
        self._client.set_response_callback("XRANGE", _as_is)
        self._index_slot = self._slot_of(self.keys.open_index)
        self._pipeline: Pipeline | None = None
        self.on_reconnect: Callable[[], None] = _nothing
        # Pre-encoded constant arguments: encoded once, spliced into every command.
        self._max_chunks = str(streams_cfg.max_chunks).encode()
        self._open_ttl = str(streams_cfg.open_ttl_s).encode()
        self._end_ttl = str(streams_cfg.ttl_after_end_s).encode()
        # Notifications for other instances: published by the scripts, in the stream's slot.
        self.instance = instance
        self._publish = (b"SPUBLISH" if self.cluster else b"PUBLISH") if redis_cfg.notify else b""
        self._notify_args = [self._publish, instance.encode()]
        self._appender = Appender(
            self._submit_write,
            self.keys,
            self._sha["append"],
            self._slot_of,
            max_chunks=self._max_chunks,
            open_ttl=self._open_ttl,
            publish=self._publish,
            instance=instance.encode(),
        )

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the write connection(s) and load the scripts (and a first connection for history pages);
        a store for reads only needs none of them."""
        try:
            await self._wire.reconnect()
            if self._pages is not None:
                await self._pages.warm()
        except StoreUnavailable:
            await self._wire.close()
            raise
        cfg = self._config
        self._pipeline = Pipeline(
            self._wire, cfg.batch, cfg.redis.retry_ms, cfg.redis.timeout_ms, self._metrics or Metrics(), self.recovered
        )

    async def drain(self) -> None:
        """Wait until every write queued so far has been answered (or failed)."""
        if self._pipeline is not None:
            await self._pipeline.drain()

    async def close(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.close()
        await self._wire.close()
        if self._pages is not None:
            self._pages.close()
        await self._client.aclose()

    def recovered(self) -> None:
        """Writes flow again after a lost connection: Redis may have restarted or failed over."""
        self._appender.reconnected()
        self.on_reconnect()

    async def ping(self) -> None:
        try:
            async with self._reads:
                await self._client.ping()
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc

    def _submit(self, payload: bytes, done: Callable[[Any, BaseException | None], None], slot: int) -> None:
        self._submit_write(Write(payload, done, slot))

    def _submit_write(self, write: Write) -> None:
        pipeline = self._pipeline
        if pipeline is None:
            write.done(None, StoreUnavailable("store not started"))
            return
        pipeline.submit(write)

    # typed writes ----------------------------------------------------------------------------

    def open(
        self,
        stream: str,
        epoch: int | None,
        content_type: str,
        producer: str | None,
        done: Callable[[OpenOutcome], None],
    ) -> None:
        """Take over, resume or create ``stream`` for a producer (open.lua)."""
        keys = self.keys
        meta = keys.meta(stream)
        payload = encode_command(
            [
                "EVALSHA",
                self._sha["open"],
                "3",
                meta,
                keys.log(stream),
                keys.channel(stream),
                b"" if epoch is None else str(epoch),
                str(now_ms()),
                content_type,
                self._open_ttl,
                producer or b"",
                *self._notify_args,
            ]
        )
        self._submit(payload, lambda reply, exc: done(open_outcome(reply, exc)), self._slot_of(meta))

    def append_handle(self, stream: str, epoch: int, gen: int = 0) -> AppendHandle:
        """What :meth:`append` needs of ``stream`` in ``epoch``: an :class:`AppendHandle`, which
        keeps what the holder knows of the log between appends (store/appends.py)."""
        return self._appender.handle(stream, epoch, gen)

    def append(
        self, handle: AppendHandle, seq: int, chunks: list[bytes], done: Callable[[AppendOutcome], None]
    ) -> None:
        """Append ``chunks`` (seq ``seq`` on): plain XADDs, or append.lua when in doubt (store/appends.py)."""
        self._appender.append(handle, seq, chunks, done)

    def end(
        self,
        stream: str,
        reason: str,
        message: str,
        done: Callable[[EndOutcome], None],
        *,
        epoch: int | None = None,
        stale_before: int | None = None,
    ) -> None:
        """Write the end (end.lua); ``epoch`` None: not a producer; ``stale_before``: the sweep's test."""
        keys = self.keys
        meta = keys.meta(stream)
        payload = encode_command(
            [
                "EVALSHA",
                self._sha["end"],
                "3",
                meta,
                keys.log(stream),
                keys.channel(stream),
                reason,
                message,
                str(now_ms()),
                self._end_ttl,
                b"" if epoch is None else str(epoch),
                b"" if stale_before is None else str(stale_before),
                *self._notify_args,
            ]
        )
        self._submit(payload, lambda reply, exc: done(end_outcome(reply, exc, reason)), self._slot_of(meta))

    def touch(self, streams: list[str]) -> None:
        """Record producer activity on open streams (touch.lua) and in the open index."""
        if not streams:
            return
        keys, now = self.keys, now_ms()
        for stream in streams:
            meta = keys.meta(stream)
            self._submit(
                encode_command(["EVALSHA", self._sha["touch"], "2", meta, keys.log(stream), str(now), self._open_ttl]),
                _ignore,
                self._slot_of(meta),
            )
        self.index(streams, now)

    def index(self, streams: list[str], now: int | None = None) -> None:
        """ZADD the open-stream index (score: last activity, ms)."""
        score = str(now_ms() if now is None else now)
        args: list[bytes | str] = ["ZADD", self.keys.open_index]
        for stream in streams:
            args += [score, stream]
        self._submit(encode_command(args), _ignore, self._index_slot)

    def unindex(self, streams: list[str]) -> None:
        self._submit(encode_command(["ZREM", self.keys.open_index, *streams]), _ignore, self._index_slot)

    def follow(self, stream: str, followed: bool, done: Callable[[], None]) -> None:
        """Add this instance to (or remove it from) the instances following ``stream``'s channel;
        ``done()`` once Redis has it: from then on the append script publishes for this instance.
        The Set expires with an open stream's TTL; the broker adds itself again well before."""
        key = self.keys.followers(stream)
        slot = self._slot_of(key)
        if not followed:
            self._submit(encode_command(["SREM", key, self.instance]), _ignore, slot)
            return

        def added(_: Any, exc: BaseException | None) -> None:
            if exc is None:
                done()

        self._submit(encode_command(["SADD", key, self.instance]), added, slot)
        self._submit(encode_command(["EXPIRE", key, self._open_ttl]), _ignore, slot)

    def peek(self, stream: str, done: Callable[[int, int], None]) -> None:
        """``done(gen, offset)`` of the log's newest entry, read through the write pipeline (in
        order with the writes); nothing if the log is empty or gone."""
        log = self.keys.log(stream)

        def answered(reply: Any, exc: BaseException | None) -> None:
            if exc is None and type(reply) is list and reply:
                gen, _, seq = reply[0][0].partition(b"-")
                done(int(gen), int(seq) % LANE)

        self._submit(encode_command(["XREVRANGE", log, "+", "-", "COUNT", "1"]), answered, self._slot_of(log))

    def publish(self, channel: str, message: bytes) -> None:
        """PUBLISH through the write pipeline (control requests between instances; not per chunk).

        On a cluster it goes to the master of the channel's slot, and the cluster forwards it to
        every node."""
        self._submit(encode_command(["PUBLISH", channel, message]), _ignore, self._slot_of(channel))

    # read path --------------------------------------------------------------------------------

    async def read_meta(self, stream: str) -> StreamMeta | None:
        """The meta, with the last offset taken from the log (appends do not move the meta's)."""
        keys = self.keys
        try:
            async with self._reads, self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.meta(stream))
                pipe.xinfo_stream(keys.log(stream))
                raw, info = await pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        if isinstance(raw, Exception):
            raise _translate(raw) if isinstance(raw, redis.exceptions.RedisError) else StoreError(str(raw))
        return parse_meta(stream, raw, _last_id(info)) if raw else None

    async def read_entries(self, stream: str, gen: int, first: int, count: int) -> list[Entry]:
        """Up to ``count`` entries of generation ``gen`` from offset ``first`` on."""
        rows, pos = await self._read_rows(stream, gen, first, count)
        if not rows:
            return []
        end = _end_of(rows)
        if end is not None:
            rows = rows[:-1]
        if rows and int(rows[-1][0][pos:]) >= LANE:  # past a takeover
            entries = [parse_entry(entry_id, fields) for entry_id, fields in rows]
        else:
            # Chunks of lane 0 (the ids grow: the last one's lane is the highest): the offset is the
            # id's sequence part. One comprehension instead of a call per row (a micro-optimisation:
            # a replay reads every chunk here); only a takeover moves appends to lane > 0.
            entries = [_new_entry(Entry, (int(entry_id[pos:]), fields[1], None, "")) for entry_id, fields in rows]
        if end is not None:
            entries.append(end)
        return entries

    async def read_frames(self, stream: str, gen: int, first: int, count: int, template: bytes) -> FramedPage | None:
        """As :meth:`read_entries`, each chunk framed as ``template % (offset, data)`` straight from
        its XRANGE row (relayd.ports.FramedHistory); None for a page past a takeover (lane > 0).

        The replay's path: in lane 0 an entry id is ``<gen>-<offset>``, so the offset's 10 digits
        are the id's sequence part, zero-padded: no ``int()``, no :class:`Entry` per chunk (a
        micro-optimisation, ~x0.3 of parsing and framing a chunk the other way).
        """
        rows, pos = await self._read_rows(stream, gen, first, count)
        if not rows:
            return FramedPage([], first, None, 0, None)
        end = _end_of(rows)
        if end is not None:
            rows = rows[:-1]
            if not rows:
                return FramedPage([], end.offset, end, 1, end)
        if int(rows[-1][0][pos:]) >= LANE:
            return None
        zero = b"0"
        frames = [template % (entry_id[pos:].rjust(10, zero), fields[1]) for entry_id, fields in rows]
        last = end if end is not None else _new_entry(Entry, (int(rows[-1][0][pos:]), rows[-1][1][1], None, ""))
        return FramedPage(frames, int(rows[0][0][pos:]), last, len(rows) + (end is not None), end)

    async def _read_rows(self, stream: str, gen: int, first: int, count: int) -> tuple[list[list[Any]], int]:
        """XRANGE rows of up to ``count`` entries from offset ``first`` on, and where an id's
        sequence part starts (every id of them is ``<gen>-<seq>``).

        The lane of ``first`` (store/lua/lib.lua) is not known here: a read starts in lane 0, and
        a row of a later lane below ``first`` moves the start to that lane (a takeover's worth of
        round trips, and only for readers past a takeover).
        """
        log = self.keys.log(stream)
        lane = 0
        pages = self._pages
        while True:
            # One key holds one generation: a new one starts only after the key vanished. A reader
            # still on an old generation must not take the new one's entries for its own: bound it.
            start, end = f"{gen}-{lane * LANE + first}", f"{gen}-{_MAX_SEQ}"
            if pages is not None:
                rows = await pages.xrange(log, start, end, count)
            else:
                try:
                    async with self._reads:
                        rows = await self._client.xrange(log, start, end, count=count)  # type: ignore[assignment]
                except redis.exceptions.RedisError as exc:
                    raise _translate(exc) from exc
            if not rows:
                return rows, 0
            head = rows[0][0]
            pos = head.index(b"-") + 1
            seq = int(head[pos:])
            if seq % LANE >= first:
                return rows, pos
            lane = seq // LANE

    async def stale_open_streams(self, before_ms: int, limit: int = 500, skip: int = 0) -> list[str]:
        try:
            async with self._reads:
                rows: list[bytes] = await self._client.zrangebyscore(  # type: ignore[assignment]
                    self.keys.open_index, "-inf", before_ms, start=skip, num=limit
                )
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return [r.decode() for r in rows]

    async def ttl_s(self, stream: str) -> int:
        try:
            async with self._reads:
                return int(await self._client.ttl(self.keys.meta(stream)))
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc

    # admin reads and removal (relayd/web/admin.py) ------------------------------------------------

    async def scan_streams(self, cursor: int, id_prefix: str, count: int) -> tuple[int, list[str]]:
        """One SCAN step over the meta keys of streams whose id starts with ``id_prefix``.

        Returns the next cursor (0: the scan is complete) and the stream ids found, open or ended.
        On a cluster the scan walks the masters in turn (see :meth:`_scan_masters`).
        """
        match = self.keys.stream_pattern(id_prefix)
        try:
            async with self._reads:
                if isinstance(self._client, aioredis.RedisCluster):
                    cursor, found = await self._scan_masters(self._client, cursor, match, count)
                else:
                    cursor, found = await self._client.scan(cursor, match=match, count=count)
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return int(cursor), [self.keys.stream_of_meta(key) for key in found]

    @staticmethod
    async def _scan_masters(
        client: aioredis.RedisCluster, cursor: int, match: str, count: int
    ) -> tuple[int, list[Any]]:
        """One SCAN step on one master. The cursor holds which master (its index among the masters
        sorted by address, in the low bits) and that master's own SCAN cursor (the high bits); 0
        is the start and the end, as for SCAN. A failover during a listing does not change the
        order of the addresses that remain, so it can repeat or skip keys: SCAN's own promise
        (every key present throughout is returned) holds only on a stable topology."""
        await client.initialize()
        masters = sorted(client.get_primaries(), key=lambda node: (node.host, node.port))
        index, node_cursor = cursor & _MASTER_MASK, cursor >> _MASTER_BITS
        if index >= len(masters):
            return 0, []
        # (through Any: redis-py's stub says the cluster client answers a tuple, and code compiled by
        # mypyc checks that; it answers {node name: cursor} and the keys)
        scan: Any = client.scan
        cursors, found = await scan(node_cursor, match=match, count=count, target_nodes=masters[index])
        # redis-py's cluster client answers the cursor as {node name: cursor}
        (node_cursor,) = cursors.values() if isinstance(cursors, dict) else (cursors,)
        if node_cursor == 0:
            index += 1
            if index == len(masters):
                return 0, found
        return (int(node_cursor) << _MASTER_BITS) | index, found

    async def scan_open(self, cursor: int, id_prefix: str, count: int) -> tuple[int, list[str]]:
        """One ZSCAN step over the open-stream index; cheaper than :meth:`scan_streams` for open ones."""
        try:
            async with self._reads:
                cursor, found = await self._client.zscan(
                    self.keys.open_index, cursor, match=f"{id_prefix}*", count=count
                )
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return int(cursor), [member.decode() if isinstance(member, bytes) else str(member) for member, _ in found]

    async def open_count(self) -> int:
        """Streams in the open index (held by a producer on any instance, or awaiting the sweep)."""
        try:
            async with self._reads:
                return int(await self._client.zcard(self.keys.open_index))
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc

    async def stream_heads(self, streams: list[str]) -> list[tuple[int, bool] | None]:
        """``(created_ms, is_open)`` of each stream, one pipelined HMGET each; None if it is gone.

        What a listing sorts and filters on, without the cost of :meth:`stream_stats`. On a
        cluster, redis-py's pipeline sends one batch per master.
        """
        try:
            async with self._reads, self._client.pipeline(transaction=False) as pipe:
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
        """Meta, entry count, memory and TTL of each stream, in one round trip (per master on a
        cluster); None if it is gone.

        ``MEMORY USAGE`` samples the log (Redis's default), so ``memory_bytes`` is an estimate;
        None where the server refuses the command (some managed Redis services do).
        """
        try:
            async with self._reads, self._client.pipeline(transaction=False) as pipe:
                for stream in streams:
                    meta_key, log_key = self.keys.meta(stream), self.keys.log(stream)
                    pipe.hgetall(meta_key)
                    pipe.xinfo_stream(log_key)
                    pipe.xlen(log_key)
                    pipe.memory_usage(log_key)
                    pipe.memory_usage(meta_key)
                    pipe.ttl(meta_key)
                replies = await pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        out: list[StreamStats | None] = []
        for i, stream in enumerate(streams):
            raw, last, entries, log_mem, meta_mem, ttl = replies[6 * i : 6 * i + 6]
            if isinstance(raw, Exception) or isinstance(entries, Exception) or isinstance(ttl, Exception):
                raise StoreError(f"Redis error: {raw if isinstance(raw, Exception) else entries}")
            if not raw:
                out.append(None)
                continue
            memory = None
            if not isinstance(log_mem, Exception) and not isinstance(meta_mem, Exception):
                memory = int(log_mem or 0) + int(meta_mem or 0)
            out.append(StreamStats(parse_meta(stream, raw, _last_id(last)), int(entries), memory, int(ttl)))
        return out

    async def log_edges(self, stream: str) -> tuple[int, int] | None:
        """Offsets of the first and last entries still stored (the end counts), or None if empty."""
        log_key = self.keys.log(stream)
        try:
            async with self._reads, self._client.pipeline(transaction=False) as pipe:
                pipe.xrange(log_key, count=1)
                pipe.xrevrange(log_key, count=1)
                first, last = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        if not first or not last:
            return None
        return int(first[0][0].partition(b"-")[2]) % LANE, int(last[0][0].partition(b"-")[2]) % LANE

    async def delete_stream(self, stream: str) -> bool:
        """Delete a stream's keys and its index entry; False if it did not exist.

        The two keys share a slot (one DEL); the index is another key, in another slot on a cluster.
        """
        try:
            async with self._reads, self._client.pipeline(transaction=False) as pipe:
                pipe.execute_command("DEL", self.keys.meta(stream), self.keys.log(stream), self.keys.followers(stream))
                pipe.zrem(self.keys.open_index, stream)
                deleted, _ = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return int(deleted) > 0

    # the Durable Streams mount (relayd/durable/) ------------------------------------------------

    def _ds_keys(self, stream: str) -> list[RespArg]:
        keys = self.keys
        return [keys.meta(stream), keys.log(stream), keys.ds_producers(stream)]

    async def _ds_write(self, stream: str, script: str, args: list[RespArg]) -> Any:
        """Run a ds_* script through the write pipeline (group commit); its reply."""
        keys = self._ds_keys(stream)
        nkeys = len(keys) + (script != "ds_delete")
        if script != "ds_delete":
            keys.append(self.keys.channel(stream))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(reply: Any, exc: BaseException | None) -> None:
            if not future.done():
                future.set_result(failed_write(reply, exc, "not written") or reply)

        self._submit(
            encode_command(["EVALSHA", self._sha[script], str(nkeys), *keys, *args]),
            done,
            self._slot_of(self.keys.meta(stream)),
        )
        return await future

    async def ds_create(self, stream: str, spec: DsSpec, chunks: list[bytes], now: int) -> DsWrite:
        reply = await self._ds_write(
            stream,
            "ds_create",
            [
                str(now),
                spec.content_type,
                spec.media,
                spec.kind,
                "" if spec.ttl_s is None else str(spec.ttl_s),
                spec.expires_at,
                _deadline(spec, now),
                "1" if spec.closed else "0",
                *self._notify_args,
                *chunks,
            ],
        )
        if isinstance(reply, Refused):
            return DsWrite("store_unavailable", message=reply.message)
        return DsWrite(text_of(reply[0]), gen=int(reply[1]), tail=int(reply[2]), closed=bool(int(reply[3])))

    async def ds_append(
        self,
        stream: str,
        media: str,
        chunks: list[bytes],
        now: int,
        *,
        close: bool = False,
        stream_seq: str = "",
        producer: tuple[str, int, int] | None = None,
    ) -> DsWrite:
        pid, epoch, seq = producer or ("", 0, 0)
        reply = await self._ds_write(
            stream,
            "ds_append",
            [
                str(now),
                media,
                "1" if close else "0",
                stream_seq,
                pid,
                str(epoch),
                str(seq),
                *self._notify_args,
                *chunks,
            ],
        )
        if isinstance(reply, Refused):
            return DsWrite("store_unavailable", message=reply.message)
        return ds_write_outcome([text_of(v) if isinstance(v, bytes) else v for v in reply])

    async def ds_read(
        self, stream: str, gen: int | None, after: int, count: int, now: int, *, touch: bool = True
    ) -> DsRead | None:
        keys = self._ds_keys(stream)
        args = [str(now), "" if gen is None else str(gen), str(after), str(count), "1" if touch else "0"]
        try:
            async with self._reads:
                try:
                    reply = await self._client.evalsha(self._sha["ds_read"].decode(), 3, *keys, *args)
                except redis.exceptions.NoScriptError:
                    reply = await self._client.eval(self._ds_read_body, 3, *keys, *args)
        except redis.exceptions.RedisError as exc:
            raise _translate(exc) from exc
        return parse_ds_read(reply)

    async def ds_delete(self, stream: str, now: int) -> bool:
        reply = await self._ds_write(stream, "ds_delete", [str(now)])
        if isinstance(reply, Refused):
            raise StoreUnavailable(reply.message)
        return bool(int(reply))


def _end_of(rows: list[list[Any]]) -> Entry | None:
    """The stream's end when it is the last of ``rows`` (only a stream's last entry can be its end;
    end.lua writes it in the next lane, so its offset is parsed the long way)."""
    last_id, fields = rows[-1]
    return parse_entry(last_id, fields) if fields[0] != b"d" else None


def _as_is(response: Any, **options: Any) -> Any:
    return response


def _last_id(info: Any) -> bytes | None:
    """The log's last-generated-id from redis-py's XINFO STREAM answer (an error: no log)."""
    return info.get("last-generated-id") if isinstance(info, dict) else None


def _translate(exc: redis.exceptions.RedisError) -> StoreError:
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return StoreUnavailable(f"Redis unavailable: {exc}")
    return StoreError(f"Redis error: {exc}")


def _nothing() -> None:
    return None


def _no_slot(key: str) -> int:
    """A single server: the slot is not read."""
    return 0


class _Unbounded:
    """``async with`` that does not wait: reads on a single server (its pool is the bound)."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


def _ignore(reply: Any, exc: BaseException | None) -> None:
    """Background writes (touch, index): a failure shows in the pipeline's metrics and log."""


def _deadline(spec: DsSpec, now: int) -> str:
    if spec.ttl_s is not None:
        return str(now + spec.ttl_s * 1000)
    return "" if spec.expires_ms is None else str(spec.expires_ms)
