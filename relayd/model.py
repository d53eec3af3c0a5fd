"""What the store knows and what it answers: entries, stream metadata and typed write outcomes.

Pure data, no I/O. The store (relayd/store/) turns Redis replies into these; the engine
(relay, subscription) decides on them; only web/ turns them into wire frames. An outcome is
either the success type of its operation or :class:`Refused` with a code:

==============  =========================================  ==========================================
operation       success                                     refusal codes
==============  =========================================  ==========================================
open            :class:`Opened` (created, opened, resumed,   ``fenced``, ``store_unavailable``
                or ``ended``: the stream had already ended)
append          :class:`Appended`                            ``seq_gap``, ``fenced``, ``ended``,
                                                            ``not_found``, ``store_unavailable``
end             :class:`Ended` (``ok`` or ``already``)       ``fenced``, ``not_found``, ``alive``,
                                                            ``store_unavailable``
write           :class:`Written` (a connectionless           ``fenced``, ``seq_gap``, ``stream_ended``,
(relay.write)   producer's append and/or end)                ``content_type``, ``store_unavailable``,
                                                            ``overloaded``
==============  =========================================  ==========================================
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, NamedTuple


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Entry(NamedTuple):
    """One stored entry of a stream: a chunk (``data`` is its JSON) or the end.

    The objects made per chunk on the hot path (this, :class:`Appended`, ``protocol.AppendOp``)
    are named tuples: immutable like a frozen dataclass, created in a third of its time.
    """

    offset: int
    data: bytes | None = None
    reason: str | None = None
    message: str = ""

    @property
    def is_end(self) -> bool:
        return self.reason is not None


class FramedPage(NamedTuple):
    """A page of history whose chunks the store framed itself, from a codec's template
    (:meth:`relayd.protocol.FrameCodec.chunk_template`): a replay makes no :class:`Entry` per chunk."""

    frames: list[bytes]  # one per chunk, in order
    first: int  # the offset of the page's first entry
    last: Entry | None  # its last entry, a chunk or the end (None: the page is empty)
    n: int  # entries read (the chunks and the end)
    end: Entry | None  # the stream's end when the page holds it (then ``last``; not in ``frames``)


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


# -- write outcomes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """A write the store did not make. ``value``: the current epoch (``fenced``) or the last stored
    seq (``seq_gap``); ``status``: how the stream ended (``ended``); ``message``: for humans."""

    code: str
    message: str = ""
    value: int = 0
    status: str = ""


OpenCode = Literal["created", "opened", "resumed", "ended"]


@dataclass(frozen=True, slots=True)
class Opened:
    """The stream as an open found it. ``code`` ``ended``: it had ended; the producer holds nothing."""

    code: OpenCode
    gen: int
    epoch: int
    seq: int  # the last seq stored in this epoch
    n: int  # offset of the last entry
    status: str
    content_type: str


class Appended(NamedTuple):
    """Chunks ``first..last`` are durable (``first > last``: all were stored before: a resend)."""

    gen: int
    first: int
    last: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class Ended:
    """``result`` ``ok``: this call wrote the end at ``offset``; ``already``: it had ended ``status``."""

    result: Literal["ok", "already"]
    gen: int
    offset: int
    status: str


@dataclass(frozen=True, slots=True)
class Written:
    """A connectionless producer's write took effect, or had before (a resend is answered the same).

    ``seq`` and ``offset``: the seq and offset of the write's last chunk; for a write without chunks,
    the last seq stored in ``epoch`` and the offset of the stream's last chunk (0: none yet).
    ``stored``: chunks this call stored (0 when all had been stored: a resend). ``ended``: the
    offset of the end entry when the write ended the stream (also when a resend finds it ended
    so), else 0. ``cancel_requested``: a consumer asked to stop the stream.
    """

    gen: int
    epoch: int
    seq: int
    offset: int
    stored: int = 0
    created: bool = False
    ended: int = 0
    reason: str = ""
    cancel_requested: bool = False


OpenOutcome = Opened | Refused
AppendOutcome = Appended | Refused
EndOutcome = Ended | Refused
WriteOutcome = Written | Refused


# -- the Durable Streams mount (relayd/durable/) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class DsSpec:
    """A Durable Streams stream's configuration, as a PUT asks for it.

    ``media`` is the content type's media type, lowercased, without parameters: what appends are
    matched against. ``kind`` is how its entries are stored (relayd's ``ct``): ``json`` (one JSON
    message per entry) or ``text`` (one JSON string per append: the text, or the bytes base64).
    """

    content_type: str
    media: str
    kind: str
    ttl_s: int | None = None
    expires_at: str = ""  # as given (RFC 3339)
    expires_ms: int | None = None
    closed: bool = False


@dataclass(frozen=True, slots=True)
class DsState:
    """A stream as the Durable Streams mount sees it. ``tail``: offset of its last data entry."""

    gen: int
    tail: int
    closed: bool
    content_type: str
    media: str
    ttl_s: int | None
    expires_at: str


@dataclass(frozen=True, slots=True)
class DsRead:
    """Entries after ``after`` (data entries, and the end entry when the read reaches it)."""

    state: DsState
    after: int
    entries: list[Entry]


@dataclass(frozen=True, slots=True)
class DsWrite:
    """The outcome of a Durable Streams create or append.

    ``code``: create: ``created``, ``exists`` (same config), ``conflict``; append: ``ok``,
    ``closed`` (refused: the stream is closed), ``duplicate`` (a producer's retry: nothing
    written), ``content_type``, ``stale_epoch`` (``value``: the current epoch), ``epoch_seq`` (a
    new epoch must start at seq 0), ``seq_gap`` (``value``: expected, ``received``),
    ``stream_seq`` (Stream-Seq not above the last one); both: ``not_found``,
    ``store_unavailable``. ``first..last``: the data entries written; ``tail``: the stream's last
    data offset after the call; ``closed``: whether it is closed now.
    """

    code: str
    gen: int = 0
    first: int = 0
    last: int = 0
    tail: int = 0
    closed: bool = False
    value: int = 0
    received: int = 0
    message: str = ""
