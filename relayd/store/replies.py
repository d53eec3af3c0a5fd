"""Lua and Redis replies -> relayd's typed outcomes and entries.

The scripts answer positional arrays (documented at the top of each .lua file in
relayd/store/lua/); this is the one place that knows their layout, and how hiredis hands over a
meta hash and an XRANGE row. Pure functions: no I/O.
"""

from __future__ import annotations

from typing import Any

import hiredis

from relayd.model import (
    Appended,
    AppendOutcome,
    DsRead,
    DsState,
    DsWrite,
    Ended,
    EndOutcome,
    Entry,
    Opened,
    OpenOutcome,
    Refused,
    StreamMeta,
)

LANE = 1 << 32  # entry ids are "<gen>-<lane * LANE + offset>" (store/lua/lib.lua, store/appends.py)


def parse_meta(stream: str, raw: dict[bytes, bytes], last_id: bytes | None = None) -> StreamMeta:
    """A meta hash; ``last_id``: the log's last-generated-id (XINFO STREAM), None if no log.

    Appends are plain XADDs (store/appends.py): while a stream is open its meta's ``n`` and
    ``seq`` are those of its last open or takeover, and the log's last id says where it is.
    """

    def num(name: bytes, default: int = 0) -> int:
        value = raw.get(name)
        return int(value) if value is not None and value != b"" else default

    ended = raw.get(b"ended")
    status = raw.get(b"status", b"open").decode()
    n, seq = num(b"n"), num(b"seq")
    if status == "open" and last_id:
        n = max(n, int(last_id.partition(b"-")[2]) % LANE)
        seq = max(n - num(b"base"), 0)
    return StreamMeta(
        stream=stream,
        status=status,
        gen=num(b"gen"),
        epoch=num(b"epoch"),
        seq=seq,
        n=n,
        content_type=raw.get(b"ct", b"json").decode(),
        created_ms=num(b"created"),
        updated_ms=num(b"updated"),
        ended_ms=int(ended) if ended else None,
        message=raw.get(b"message", b"").decode(),
    )


_new_tuple = tuple.__new__


def parse_entry(entry_id: bytes, fields: list[bytes]) -> Entry:
    """An XRANGE row as hiredis gives it: ``[id, [field, value, ...]]``."""
    offset = int(entry_id.partition(b"-")[2]) % LANE  # the sequence part is lane * LANE + offset
    if fields[0] == b"d":  # a chunk: its only field
        # tuple.__new__ directly: a named tuple's own __new__ is a Python function, and a replay
        # builds one Entry per chunk (a micro-optimisation, ~40% of this function's time)
        return _new_tuple(Entry, (offset, fields[1], None, ""))
    named = dict(zip(fields[::2], fields[1::2], strict=True))
    return Entry(offset, None, named.get(b"e", b"error").decode(), named.get(b"m", b"").decode())


def text_of(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def failed_write(reply: Any, exc: BaseException | None, what: str) -> Refused | None:
    if exc is not None:
        return Refused("store_unavailable", f"{what}: {exc}")
    if isinstance(reply, hiredis.ReplyError):
        return Refused("store_unavailable", f"{what}: {reply}")
    return None


def open_outcome(reply: Any, exc: BaseException | None) -> OpenOutcome:
    failed = failed_write(reply, exc, "open failed")
    if failed is not None:
        return failed
    code, gen, epoch, seq, n, status, content_type = (text_of(v) for v in reply)
    if code == "fenced":
        return Refused("fenced", f"stream is held by a newer producer (epoch {epoch})", int(epoch))
    return Opened(code, int(gen), int(epoch), int(seq), int(n), status, content_type)  # type: ignore[arg-type]


def append_outcome(reply: Any, exc: BaseException | None) -> AppendOutcome:
    if exc is None and type(reply) is list and reply[0] == b"ok":  # the hot path: stored
        return Appended(int(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]))
    failed = failed_write(reply, exc, "append not stored")
    if failed is not None:
        return failed
    code = text_of(reply[0])
    if code == "ok":
        return Appended(int(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]))
    if code == "seq_gap":
        return Refused("seq_gap", f"expected seq {int(reply[1]) + 1}", int(reply[1]))
    if code == "fenced":
        return Refused("fenced", "a newer producer took the stream over", int(reply[1]))
    if code == "ended":
        return Refused("ended", f"stream ended ({text_of(reply[1])})", status=text_of(reply[1]))
    if code == "lost":
        return Refused(
            "store_unavailable",
            f"Redis lost chunks of this resend that it had stored before later ones (stored up to seq "
            f"{int(reply[1])}); consumers are told of the gap",
        )
    return Refused("not_found", "stream expired or was removed")


def end_outcome(reply: Any, exc: BaseException | None, reason: str) -> EndOutcome:
    failed = failed_write(reply, exc, "end failed")
    if failed is not None:
        return failed
    result = text_of(reply[0])
    if result == "ok":
        return Ended("ok", int(reply[1]), int(reply[2]), reason)
    if result == "already":
        return Ended("already", int(reply[1]), int(reply[2]), text_of(reply[3]))
    if result == "fenced":
        return Refused("fenced", "a newer producer took the stream over", int(reply[1]))
    return Refused(result, f"end failed: {result}")  # not_found | alive


def ds_write_outcome(reply: list[Any]) -> DsWrite:
    """ds_append.lua's answer (strings and integers) as a :class:`DsWrite`."""
    code = reply[0]
    if code == "not_found":
        return DsWrite("not_found")
    gen, n = int(reply[1]), int(reply[2])
    if code == "ok":
        closed = bool(int(reply[4]))
        return DsWrite("ok", gen, int(reply[2]), int(reply[3]), int(reply[3]), closed)
    if code == "closed":
        return DsWrite("closed", gen, tail=n, closed=True)
    if code == "duplicate":
        closed = bool(int(reply[3]))
        return DsWrite("duplicate", gen, tail=n, closed=closed, value=int(reply[4]))
    if code == "stale_epoch":
        return DsWrite("stale_epoch", gen, tail=n, value=int(reply[3]))
    if code == "seq_gap":
        return DsWrite("seq_gap", gen, tail=n, value=int(reply[3]) + 1, received=int(reply[4]))
    return DsWrite(code, gen, tail=n)  # content_type | epoch_seq | stream_seq


def parse_ds_read(reply: list[Any]) -> DsRead | None:
    """ds_read.lua's answer as a :class:`DsRead`; None for no stream."""
    if not reply:
        return None
    gen, n, status, dct, dmt, ct, ttl, exp, after = (text_of(v) for v in reply[:9])
    closed = status != "open"
    media = dmt or ("text/plain" if ct == "text" else "application/json")
    state = DsState(int(gen), int(n) - closed, closed, dct or media, media, int(ttl) if ttl else None, exp)
    rows = reply[9:]
    entries = [parse_entry(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]
    return DsRead(state, int(after), entries)
