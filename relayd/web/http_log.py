"""What aiohttp's request handler logs, through relayd: one rate-limited line per malformed request.

aiohttp logs every request its HTTP parser refuses at ERROR with a traceback, quoting the raw
bytes it choked on (a header holding an API key, a query string holding a token). A client can
send such requests at will, so each becomes one WARNING line without traceback or request data,
at most :data:`BAD_REQUEST_LINES_PER_S` a second (the next line says how many were held back),
and is counted in ``relayd_bad_http_requests_total``. Everything else aiohttp logs (a handler that
raised: a bug) keeps its traceback, scrubbed by :func:`relayd.logs.install_redaction`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from relayd.logs import Pairs, RateLimit
from relayd.metrics import Metrics

BAD_REQUEST_LINES_PER_S = 10
# aiohttp's messages quote what it read (b'...' or bytearray(b'...')) after a colon: cut there.
_QUOTED = re.compile(r"(?::\s*)?(?:bytearray\()?b?['\"].*", re.DOTALL)

log = logging.getLogger("relayd.http")


class RequestErrorLog:
    """The ``logger`` of aiohttp's ``RequestHandler`` (``web.Application(handler_args=...)``)."""

    def __init__(self, metrics: Metrics, per_s: int = BAD_REQUEST_LINES_PER_S) -> None:
        self._metrics = metrics
        self._limit = RateLimit(per_s)
        self._aiohttp = logging.getLogger("aiohttp.server")

    def debug(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):  # not HTTP at all (first request): counted, not logged
            self._metrics.bad_http_request()
            return
        self._aiohttp.debug(msg, *args, exc_info=exc_info, **kw)

    def exception(self, msg: str, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.bad_request(args[0] if args else None, exc_info)
            return
        self._aiohttp.error(msg, *args, exc_info=exc_info, **kw)

    def bad_request(self, remote: object, exc: HttpProcessingError) -> None:
        self._metrics.bad_http_request()
        if not log.isEnabledFor(logging.WARNING):
            return
        held = self._limit.allow(time.monotonic())
        if held is None:
            return
        reason = _QUOTED.sub("", exc.message.partition("\n")[0]).strip().rstrip(":") or type(exc).__name__
        fields = {"remote": remote, "status": exc.code, "error": type(exc).__name__, "reason": reason}
        if held:
            fields["suppressed"] = held
        log.warning("bad http request %s", Pairs(fields), extra=fields)
