"""The append write path: plain XADDs from the holding instance, the script when in doubt.

An append used to be one ``EVALSHA`` of append.lua (epoch fence, dedupe by seq, XADD, meta
update): about 12-15 us of Redis CPU per chunk, four times a plain ``XADD``'s. Now the instance
holding a stream keeps what that script looked up in an :class:`AppendHandle` and writes each
chunk with ::

    XADD <log> NOMKSTREAM MAXLEN ~ <max_chunks> <gen>-<lane * 2^32 + offset> d <chunk>

and, when other instances may follow the stream (``redis.notify``), now and then (at most every
``PROBE_INTERVAL_S``) ``SRANDMEMBER <fol> 2`` to learn whether one does. Every guarantee still
holds, by Redis's own rule that an entry id must be above the log's last one:

- **fencing**: a takeover or an end moves the log to the next *lane* (open.lua, end.lua), so
  every XADD the old holder still has on the wire is below the last id and refused;
- **dedupe**: a chunk sent twice has the same id, refused the second time;
- **no hole**: the handle sends seq ``n`` plainly only when it expects ``n`` next (its own
  count, everything on the wire included); any other seq goes to the script;
- **a removed stream** is not created again: ``NOMKSTREAM``.

An XADD that has to be sent again (its connection was lost, or it waited while one was made
again) goes as the script for its chunk instead: the server may be a replica that lacks
acknowledged writes, past which a plain XADD would write (a hole) where the script says
``seq_gap`` and the producer resends. A refused XADD (or a missing log) makes the handle
*unsure*: that append runs again as the script, whose answer is exact (stored before: a
duplicate; fenced; ended; gone), and every append goes through the script until the last one on
the wire answered ``ok``. A handle starts unsure (its first append is a script: it learns the
lane, the base offset of its epoch and the content type), and all handles become unsure when the
write connection was made again (Redis may have restarted or failed over). Chunks reach other
instances by a ``PUBLISH`` sent once the XADDs are answered; a follower that reads Redis after
joining and again ``FOLLOWER_REREAD_S`` later, and sees holes by offset, misses nothing
(store/broker.py).
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import Any

from relayd.model import Appended, AppendOutcome, Refused, now_ms
from relayd.store.keys import Keys
from relayd.store.pipeline import Write
from relayd.store.replies import LANE, append_outcome
from relayd.store.resp import encode_command

Submit = Callable[[Write], None]

PROBE_INTERVAL_S = 0.1
"""How often, at most, a holder's plain appends ask whether another instance follows the stream
(``SRANDMEMBER`` of its followers Set). A follower joining in between misses the notifications
of at most this long: it reads the stream again ``FOLLOWER_REREAD_S`` after joining
(store/broker.py), and any later notification shows it the hole."""

FOLLOWER_REREAD_S = 3 * PROBE_INTERVAL_S


class AppendHandle:
    """What the holder of ``stream`` in ``epoch`` knows of its log (mutable; one per open)."""

    __slots__ = (
        "base",
        "ct",
        "doubt",
        "epoch",
        "followed",
        "gen",
        "id_prefix",
        "lane_base",
        "next",
        "probe",
        "probe_due",
        "publish_head",
        "ready",
        "script_head",
        "slot",
        "stream",
        "wire",
        "xadd_head",
    )

    def __init__(self, stream: str, epoch: int, gen: int, slot: int) -> None:
        self.stream = stream
        self.epoch = epoch
        self.gen = gen
        self.slot = slot
        self.ready = False  # plain XADDs allowed (see the module doc)
        self.doubt = 0  # failures and seqs out of order so far: a script's ok counts if none came since
        self.wire = -1  # the write connection's incarnation this handle was sure on
        self.next = 0  # the seq expected next, counting appends on the wire (0: not known)
        self.base = 0  # offset before the epoch's seq 1
        self.id_prefix = b""  # b"<gen>-"
        self.lane_base = 0  # lane * LANE: the entry id's sequence part is lane_base + offset
        self.ct = b"json"
        self.followed = False
        self.script_head = b""
        self.xadd_head = b""
        self.probe = b""
        self.probe_due = 0.0  # when (monotonic) the next plain append asks who follows
        self.publish_head = b""

    def broken(self) -> None:
        """A write failed: plain XADDs wait for a script's ok, and the seq expected next is not known."""
        self.ready = False
        self.doubt += 1
        self.next = 0


class Appender:
    """Encodes appends for the write pipeline and turns their replies into outcomes."""

    def __init__(
        self,
        submit: Submit,
        keys: Keys,
        sha: bytes,
        slot_of: Callable[[str], int],
        *,
        max_chunks: bytes,
        open_ttl: bytes,
        publish: bytes,
        instance: bytes,
    ) -> None:
        self._submit = submit
        self._keys = keys
        self._sha = sha
        self._slot_of = slot_of
        self._max_chunks = max_chunks
        self._publish = publish
        self.instance = instance
        self._script_tail = encode_command([max_chunks, open_ttl, publish, instance])[4:]
        self.wire = 0  # the write connection's incarnation; bumped by reconnected()

    def reconnected(self) -> None:
        """Redis may have lost writes (restart, failover): every handle checks with the script."""
        self.wire += 1

    def handle(self, stream: str, epoch: int, gen: int = 0) -> AppendHandle:
        keys = self._keys
        meta, log = keys.meta(stream), keys.log(stream)
        h = AppendHandle(stream, epoch, gen, self._slot_of(meta))
        h.script_head = encode_command(
            ["EVALSHA", self._sha, "4", meta, log, keys.channel(stream), keys.followers(stream), str(epoch), str(gen)]
        )[4:]  # without the array header: the argument count is set per append
        h.xadd_head = b"*9\r\n" + encode_command(["XADD", log, "NOMKSTREAM", "MAXLEN", "~", self._max_chunks])[4:]
        if self._publish:
            h.probe = encode_command(["SRANDMEMBER", keys.followers(stream), "2"])
            h.publish_head = b"*3\r\n" + encode_command([self._publish, keys.channel(stream)])[4:]
        return h

    def append(self, h: AppendHandle, seq: int, chunks: list[bytes], done: Callable[[AppendOutcome], None]) -> None:
        if h.ready and seq == h.next and h.wire == self.wire:
            self._plain(h, seq, chunks, done)
        else:
            self.script(h, seq, chunks, done)

    # the plain path ----------------------------------------------------------------------------

    def _plain(self, h: AppendHandle, seq: int, chunks: list[bytes], done: Callable[[AppendOutcome], None]) -> None:
        first = h.base + seq
        count = len(chunks)
        h.next = seq + count
        head, prefix, at = h.xadd_head, h.id_prefix, h.lane_base + first
        probe = False
        if h.probe:
            now = monotonic()
            if now >= h.probe_due:
                h.probe_due, probe = now + PROBE_INTERVAL_S, True
        submit = self._submit
        op = _Plain(
            _xadd(head, b"%s%d" % (prefix, at + count - 1), chunks[-1]),
            h.slot,
            self,
            h,
            seq,
            chunks,
            done,
            probe,
        )
        for i in range(count - 1):  # the chunks before the last: writes that report to the op
            submit(_Chunk(_xadd(head, b"%s%d" % (prefix, at + i), chunks[i]), op, i))
        submit(op)
        if probe:
            submit(Write(h.probe, op.probed, h.slot))

    def publish(self, h: AppendHandle, first: int, chunks: list[bytes]) -> None:
        """Tell other instances (store/broker.py parses this) of chunks just stored."""
        parts = [
            b"a|%s|%d|%d|%d|%s|%d" % (self.instance, now_ms(), h.gen, first, h.ct, len(chunks)),
            *[b"%d:%s" % (len(chunk), chunk) for chunk in chunks],
        ]
        message = b"|".join(parts)
        self._submit(Write(b"%s$%d\r\n%s\r\n" % (h.publish_head, len(message), message), _ignore, h.slot))

    # the script ----------------------------------------------------------------------------------

    def script(self, h: AppendHandle, seq: int, chunks: list[bytes], done: Callable[[AppendOutcome], None]) -> None:
        """append.lua: exact whatever the handle knows. Its ``ok`` makes the handle sure again if
        nothing since its submission broke the chain of seqs on the wire (a failure, a seq out of
        order): the appends after it are then the next seqs, and plain XADDs may follow them."""
        end = seq + len(chunks)
        if h.next == 0 or seq == h.next:
            h.next = end  # the chain of seqs on the wire starts or goes on
        else:
            h.ready = False
            h.doubt += 1  # a resend or a gap: what it finds tells
            if seq < h.next < end:
                h.next = end
        doubt, wire = h.doubt, self.wire

        def answered(reply: Any, exc: BaseException | None) -> None:
            outcome = append_outcome(reply, exc)
            if type(outcome) is Appended and exc is None:
                _, gen, _, _, _, lane, base, stored, ct, followed = reply
                h.gen, h.base, h.ct, h.followed = int(gen), int(base), bytes(ct), followed == 1
                h.id_prefix, h.lane_base = b"%d-" % h.gen, int(lane) * LANE
                h.next = max(h.next, int(stored) + 1)
                h.probe_due = monotonic() + PROBE_INTERVAL_S  # the script told who follows
                if doubt == h.doubt and wire == self.wire:
                    h.ready, h.wire = True, wire
            else:
                h.broken()
            done(outcome)

        self._submit(Write(self.encode_script(h.script_head, seq, chunks, now_ms()), answered, h.slot))

    def encode_script(self, head: bytes, seq: int, chunks: list[bytes], now: int) -> bytes:
        seq_b = b"%d" % seq
        now_b = b"%d" % now
        parts = [
            b"*%d\r\n" % (15 + len(chunks)),
            head,
            b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(seq_b), seq_b, len(now_b), now_b),
            self._script_tail,
        ]
        parts.extend([b"$%d\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks])
        return b"".join(parts)


class _Plain(Write):
    """One append sent as plain XADDs, and the write of its last chunk: answers the append once
    that write (or the followers probe after it) is answered.

    Sent again after a lost connection, a chunk's XADD becomes the script for that chunk (see
    :meth:`Write.fallback`): the server may have lost acknowledged writes (a failover), which an
    XADD would write past."""

    __slots__ = ("appender", "chunks", "failed", "h", "probe", "seq", "then")

    def __init__(
        self,
        payload: bytes,
        slot: int,
        appender: Appender,
        h: AppendHandle,
        seq: int,
        chunks: list[bytes],
        then: Callable[[AppendOutcome], None],
        probe: bool,
    ) -> None:
        self.payload = payload
        self.slot = slot
        self.appender = appender
        self.h = h
        self.seq = seq
        self.chunks = chunks
        self.then = then
        self.probe = probe
        self.failed: BaseException | bool = False

    def fallback(self) -> bytes | None:
        return self.script_for(len(self.chunks) - 1)

    def script_for(self, index: int) -> bytes:
        h = self.h
        return self.appender.encode_script(h.script_head, self.seq + index, [self.chunks[index]], now_ms())

    def chunk_written(self, reply: Any, exc: BaseException | None) -> None:
        # the entry id; or, sent again as its script (fallback), 'ok': stored now or before.
        # Else a nil (no log), an error reply (id too small, OOM...) or the script's refusal.
        if type(reply) is not bytes and not (type(reply) is list and reply[0] == b"ok") and not self.failed:
            self.failed = exc or True

    def done(self, reply: Any, exc: BaseException | None) -> None:
        """The last chunk's XADD answered. (A method, not the base class's attribute: a bound
        method of this object kept on it would be a reference cycle, freed only by the cyclic
        GC; at tens of thousands of appends a second that held hundreds of MiB.)"""
        if type(reply) is not bytes:  # not an entry id: see chunk_written (the usual case inlined)
            self.chunk_written(reply, exc)
        if not self.probe:
            self.finish(self.h.followed)

    def probed(self, reply: Any, exc: BaseException | None) -> None:
        followed = False
        if type(reply) is list and reply:
            followed = len(reply) > 1 or reply[0] != self.appender.instance
        self.h.followed = followed
        self.finish(followed)

    def finish(self, followed: bool) -> None:
        failed, h = self.failed, self.h
        if not failed:
            n = len(self.chunks)
            first = h.base + self.seq
            if followed:
                self.appender.publish(h, first, self.chunks)
            # tuple.__new__: a named tuple's own __new__ is a Python function (one per append)
            self.then(_new_tuple(Appended, (h.gen, first, first + n - 1, self.seq + n - 1)))
            return
        h.broken()
        if isinstance(failed, BaseException):  # the pipeline gave up (Redis unreachable past retry_ms)
            self.then(Refused("store_unavailable", f"append not stored: {failed}"))
            return
        self.appender.script(h, self.seq, self.chunks, self.then)  # the exact answer


class _Chunk(Write):
    """The XADD of a chunk before an append's last one: reports to the append's :class:`_Plain`."""

    __slots__ = ("index", "op")

    def __init__(self, payload: bytes, op: _Plain, index: int) -> None:
        self.payload = payload
        self.slot = op.slot
        self.op = op
        self.index = index

    def done(self, reply: Any, exc: BaseException | None) -> None:
        self.op.chunk_written(reply, exc)

    def fallback(self) -> bytes | None:
        return self.op.script_for(self.index)


_new_tuple = tuple.__new__


def _xadd(head: bytes, entry: bytes, chunk: bytes) -> bytes:
    """``head`` (XADD <log> NOMKSTREAM MAXLEN ~ <max>, encoded) with the entry id and the chunk."""
    return b"%s$%d\r\n%s\r\n$1\r\nd\r\n$%d\r\n%s\r\n" % (head, len(entry), entry, len(chunk), chunk)


def _ignore(reply: Any, exc: BaseException | None) -> None:
    """A lost notification costs latency only: followers notice the hole (store/broker.py)."""
