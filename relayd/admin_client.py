"""The admin API's client, for ``relayd streams`` and ``relayd status``.

Synchronous and standard library only (``urllib``): a command makes one request, or reads one
streamed NDJSON response line by line, and a plain blocking client keeps the CLI free of an
event loop. Every failure is translated here into an :class:`~relayd.admin_errors.AdminError`
whose ``exit_code`` says what kind of failure it was (the tree: relayd/admin_errors.py).
Redirects are not followed: urllib would resend the admin key to wherever one points.
"""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson

from relayd.admin_errors import AdminError, NotFound, Unauthorized, Unreachable


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect answer becomes an error (HTTPError) instead of a second request with the key."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def stream_path(stream: str, action: str = "") -> str:
    """``/v1/admin/streams/<id>[/<action>]``, the id percent-encoded (ids may contain ``/``)."""
    path = "/v1/admin/streams/" + urllib.parse.quote(stream, safe="")
    return f"{path}/{action}" if action else path


class AdminClient:
    def __init__(self, url: str, admin_key: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._key = admin_key
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirects())

    def __repr__(self) -> str:
        return f"AdminClient({self.url!r})"

    # what the commands call ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.get("/v1/admin/status")

    def list_streams(self, which: str, prefix: str, limit: int) -> dict[str, Any]:
        query = {"status": which, "limit": str(limit)}
        if prefix:
            query["prefix"] = prefix
        return self.get("/v1/admin/streams", **query)

    def show(self, stream: str) -> dict[str, Any]:
        return self.get(stream_path(stream))

    def tail(self, stream: str, from_start: bool, wait_ms: int = 0) -> Iterator[dict[str, Any]]:
        """The stream's frames as they come; one that does not exist yet is waited for up to ``wait_ms``."""
        query = {"from": "start"} if from_start else {}
        if wait_ms:
            query["wait_ms"] = str(wait_ms)
        return self.lines(stream_path(stream, "tail"), timeout_s=None, **query)

    def export(self, stream: str) -> Iterator[dict[str, Any]]:
        return self.lines(stream_path(stream, "export"), timeout_s=self.timeout_s)

    def end(self, stream: str, reason: str, message: str) -> dict[str, Any]:
        return self.post(stream_path(stream, "end"), {"reason": reason, "message": message})

    def remove(self, stream: str, force: bool) -> dict[str, Any]:
        return self.delete(stream_path(stream), **({"force": "1"} if force else {}))

    # HTTP ---------------------------------------------------------------------------------------

    def get(self, path: str, **query: str) -> dict[str, Any]:
        return self._json("GET", path, query)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", path, {}, orjson.dumps(body))

    def delete(self, path: str, **query: str) -> dict[str, Any]:
        return self._json("DELETE", path, query)

    def lines(self, path: str, *, timeout_s: float | None, **query: str) -> Iterator[dict[str, Any]]:
        """The objects of a streamed NDJSON response, as they arrive (blank keepalive lines skipped).

        ``timeout_s`` bounds each wait for data; None waits as long as relayd keeps the response
        open (``tail`` of a quiet stream).
        """
        response = self._open("GET", path, query, None, timeout_s)
        with response:
            try:
                for line in response:
                    if line.strip():
                        yield orjson.loads(line)
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(f"connection to relayd at {self.url} lost: {_reason(exc)}") from None
            except orjson.JSONDecodeError:
                raise AdminError(f"relayd at {self.url} sent a line that is not JSON") from None

    def _json(self, method: str, path: str, query: dict[str, str], body: bytes | None = None) -> dict[str, Any]:
        with self._open(method, path, query, body, self.timeout_s) as response:
            try:
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(f"connection to relayd at {self.url} lost: {_reason(exc)}") from None
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise AdminError(f"relayd at {self.url} did not answer JSON") from None
        if not isinstance(answer, dict):
            raise AdminError(f"relayd at {self.url} answered {type(answer).__name__}, not an object")
        return answer

    def _open(
        self, method: str, path: str, query: dict[str, str], body: bytes | None, timeout_s: float | None
    ) -> http.client.HTTPResponse:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            response: http.client.HTTPResponse = self._opener.open(request, timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            raise _http_error(exc) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot reach relayd at {self.url}: {_reason(exc)}") from None
        return response


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _http_error(exc: urllib.error.HTTPError) -> AdminError:
    """An error answer -> the AdminError for its status, with relayd's own message."""
    with exc:
        raw = exc.read()
    try:
        error = orjson.loads(raw)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code, message = "http_error", f"HTTP {exc.code} {exc.reason}"
    if 300 <= exc.code < 400:
        where = exc.headers.get("Location") or "elsewhere"
        return AdminError(
            f"relayd answered HTTP {exc.code}, a redirect to {where}: not followed, so the admin key "
            "goes nowhere else; pass relayd's own URL (--url)",
            "redirect",
        )
    if exc.code == 401:
        return Unauthorized(f"unauthorized: {message}", code)
    if exc.code == 404:
        return NotFound(message if code == "stream_not_found" else f"not found: {message}", code)
    if exc.code == 503:
        return AdminError(f"relayd cannot serve this now: {message}", code)
    return AdminError(message, code)
