"""Logging: text, JSON lines or logfmt, decided once; one line per connection open and close.

Every line has ``ts``, ``level``, ``logger`` and ``msg``; event fields are passed with
``extra={...}`` and become fields of their own (``role=producer duration_s=12.5``). Secrets are
never passed as fields, and as a second line of defence the formatters blank whatever follows
``token=`` (percent-encoded too: aiohttp decodes ``%74oken=``), ``Bearer`` and whitespace (or an
escaped tab, as parse errors quote raw bytes) or ``bearer.``, and anything shaped like a JWT or a
relayd API key (a query string, header or subprotocol that reached an exception message).
:func:`install_redaction` puts the same scrubbing on aiohttp's and asyncio's own loggers, whose
records may reach handlers relayd did not set up.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import time
from typing import Any

import orjson

from relayd.config import LogConfig

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_SECRET_RE = re.compile(
    r"((?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)(?:=|%3d)|Bearer(?:\s|\\t|%20|%09|\+)+|bearer\.)"
    r"[^\s&\"',;\\]+",
    re.IGNORECASE,
)
# A JWT (base64url of '{"' starts every header) or a key from ``relayd keys``, wherever it appears.
_TOKEN_SHAPED_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*|(rk_)[A-Za-z0-9_-]{16,}")
_LOGFMT_BARE = re.compile(r"[^\s=\"\\]+")
# Loggers of the libraries relayd runs on, whose lines may quote a request (install_redaction).
LIBRARY_LOGGERS = (
    "aiohttp.access",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
    "aiohttp.internal",
    "asyncio",
)


def redact(text: str) -> str:
    """Blank credentials in ``text`` (``token=…``, ``Bearer …``, ``bearer.<jwt>``, JWTs, API keys)."""
    lowered = text.lower()
    # cheap tests first: most lines have none of these
    if "token" in lowered or "bearer" in lowered or "%74" in lowered:
        text = _SECRET_RE.sub(r"\1[redacted]", text)
    if "eyj" in lowered or "rk_" in lowered:
        text = _TOKEN_SHAPED_RE.sub(lambda m: (m.group(1) or "") + "[redacted]", text)
    return text


class RedactFilter(logging.Filter):
    """Scrubs a record's message and traceback (:func:`redact`) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            # Formatters print a cached exc_text instead of formatting the exception again.
            record.exc_text = redact(_PLAIN.formatException(record.exc_info))
        return True


_PLAIN = logging.Formatter()


def install_redaction(names: tuple[str, ...] = LIBRARY_LOGGERS) -> None:
    """Put a :class:`RedactFilter` on each logger in ``names`` (once; it holds no state)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactFilter) for f in logger.filters):
            logger.addFilter(RedactFilter())


class RateLimit:
    """At most ``per_s`` lines a second; counts what it held back, for the next line to report.

    For lines a client can cause at will (a malformed request): a flood of them costs one line
    per ``1/per_s`` seconds, not one per request.
    """

    __slots__ = ("_count", "_window", "per_s", "suppressed")

    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        self._window = -1.0
        self._count = 0
        self.suppressed = 0

    def allow(self, now: float) -> int | None:
        """None: hold this line back. Otherwise write it: the lines held back since the last one."""
        if now - self._window >= 1.0:
            self._window = now
            self._count = 0
        if self._count >= self.per_s:
            self.suppressed += 1
            return None
        self._count += 1
        held, self.suppressed = self.suppressed, 0
        return held


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record, in the order given; None values are left out."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and v is not None}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, event fields, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in event_fields(record).items():
            entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def logfmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = redact(str(value))
    if _LOGFMT_BARE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _logfmt_pairs(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())


class LogfmtFormatter(logging.Formatter):
    """``ts=… level=info logger=relayd.ingest msg="connection closed" role=producer …``"""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **event_fields(record),
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return _logfmt_pairs(fields)


class TextFormatter(logging.Formatter):
    """For people: ``<time> <LEVEL> <logger>: <msg>``. Event messages already read ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class Pairs:
    """``key=value …`` (logfmt) of some fields, formatted only if the line is emitted.

    Event messages carry their facts twice: as ``key=value`` text in ``msg`` (what the text
    format shows), and as fields of their own (what json and logfmt add, for machines).
    """

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return _logfmt_pairs({k: v for k, v in self.fields.items() if v is not None})


FORMATTERS: dict[str, type[logging.Formatter]] = {
    "text": TextFormatter,
    "json": JsonFormatter,
    "logfmt": LogfmtFormatter,
}


def setup_logging(cfg: LogConfig) -> None:
    """relayd's loggers at ``log.level``; other libraries' warnings through the same format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[cfg.format]())
    root = logging.getLogger()
    if not root.handlers:  # leave a host application's (or a test runner's) setup alone
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    relayd_logger = logging.getLogger("relayd")
    relayd_logger.handlers[:] = [handler]
    relayd_logger.setLevel(cfg.level.upper())
    relayd_logger.propagate = False


class ConnectionLog:
    """The two log lines of one connection: ``<role> opened …`` and ``<role> closed …``.

    The open line names the role and remote address; the close line adds the duration, the
    counts the handler passes, the close code and why it closed. Whoever closes the connection
    on relayd's side says why first (:meth:`closing`); otherwise the handler's own guess stands.
    ``conn`` (8 hex digits) ties the two lines, and the refusals in between, together.
    """

    __slots__ = ("_log", "_started", "fields", "reason", "role")

    def __init__(self, log: logging.Logger, role: str, remote: str | None, **fields: Any) -> None:
        self._log = log
        self._started = time.monotonic()
        self.role = role
        self.fields: dict[str, Any] = {"role": role, "remote": remote, "conn": secrets.token_hex(4), **fields}
        self.reason = ""
        log.info("%s opened %s", role, Pairs({**self.fields, "role": None}), extra=self.fields)

    def closing(self, reason: str) -> None:
        """relayd is closing the connection because of ``reason`` (the first one given wins)."""
        if not self.reason:
            self.reason = reason

    def event(self, level: int, what: str, **fields: Any) -> None:
        """Another line about this connection (``refused frame``), with its fields."""
        if self._log.isEnabledFor(level):
            self._log.log(
                level,
                "%s %s %s",
                self.role,
                what,
                Pairs({**self.fields, "role": None, **fields}),
                extra={**self.fields, **fields},
            )

    def closed(self, code: int | None, reason: str, **counts: Any) -> None:
        """Log the close line; ``reason`` applies unless :meth:`closing` gave one."""
        fields = {
            **self.fields,
            "duration_s": round(time.monotonic() - self._started, 3),
            **counts,
            "close_code": code,
            "close_reason": self.reason or reason,
        }
        self._log.info("%s closed %s", self.role, Pairs({**fields, "role": None}), extra=fields)
