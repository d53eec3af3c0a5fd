"""One exception root for relayd, and the table of websocket close codes.

    RelaydError
    ├── ConfigError          a config key is missing or invalid (names the dotted key)
    ├── EmbeddedServerError  the bundled Redis-compatible server failed to start or stop
    │   └── EmbeddedServerLost   it died while relayd ran and could not be restarted
    ├── PortInUse            relayd's listen address is taken by another process
    ├── StoreError           Redis said no (a script error, a bad reply)
    │   └── StoreUnavailable Redis did not answer: connection lost or timed out
    └── ClientError          a client's input was refused; carries a wire error ``code``
        ├── ProtocolError    a malformed or refused frame (``bad_frame``, ``seq_gap``, ...)
        └── AuthError        a credential was refused (``unauthorized``, ``forbidden``, ...)

``ClientError.code`` is the code written in error frames and HTTP error bodies; the full list
is in docs/protocol.md. An error that ends ``relayd serve`` with an exit code of its own carries
it as ``exit_code`` (the table in docs/operations.md, "Exit codes of relayd serve").
"""

from __future__ import annotations

from enum import IntEnum


class RelaydError(Exception):
    """Root of every error relayd raises on purpose."""


class ConfigError(RelaydError):
    """A configuration value is invalid; ``key`` is its dotted name (``batch.linger_ms``)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class EmbeddedServerError(RelaydError):
    """The bundled Redis-compatible server could not be started or stopped."""


# Exit codes of `relayd serve` for failures a service manager or script may want to tell apart
# (sysexits.h values); any other failure exits 1.
EXIT_EMBEDDED_LOST = 69  # EX_UNAVAILABLE: the embedded server died and could not be restarted
EXIT_PORT_IN_USE = 75  # EX_TEMPFAIL: the listen port is taken (often the old instance, still draining)


class EmbeddedServerLost(EmbeddedServerError):
    """The embedded server exited while relayd ran and every restart attempt failed."""

    exit_code = EXIT_EMBEDDED_LOST


class PortInUse(RelaydError):
    """Another process listens on relayd's ``server.host``/``server.port``."""

    exit_code = EXIT_PORT_IN_USE


class StoreError(RelaydError):
    """Redis refused a command or answered something unexpected."""


class StoreUnavailable(StoreError):
    """Redis could not be reached or did not answer in time."""


class ClientError(RelaydError):
    """Input from a client was refused. ``code`` is the wire error code."""

    code: str = "bad_frame"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ProtocolError(ClientError):
    """A frame was malformed or refused by the protocol rules."""


class AuthError(ClientError):
    """A credential was missing, malformed, expired, or does not grant what was asked."""

    @property
    def http_status(self) -> int:
        return 403 if self.code == "forbidden" else 401

    @property
    def close_code(self) -> int:
        return AUTH_CLOSE_CODES.get(self.code, CloseCode.UNAUTHORIZED)


class CloseCode(IntEnum):
    """Websocket close codes relayd uses; documented in docs/protocol.md."""

    NORMAL = 1000
    MESSAGE_TOO_BIG = 1009
    SERVICE_RESTART = 1012
    UNAUTHORIZED = 4001
    TOKEN_EXPIRED = 4002
    FORBIDDEN = 4003
    SLOW_CONSUMER = 4008


# Every wire error ``code`` (the table in docs/protocol.md): the bounded label set of metrics.
ERROR_CODES = (
    "bad_frame",
    "unknown_op",
    "invalid_stream_id",
    "chunk_too_large",
    "not_open",
    "content_type",
    "seq_gap",
    "fenced",
    "stream_ended",
    "too_many_streams",
    "store_unavailable",
    "stream_not_found",
    "unauthorized",
    "token_expired",
    "forbidden",
    "shutting_down",
    "not_configured",
    "internal",
)

AUTH_CLOSE_CODES: dict[str, CloseCode] = {
    "unauthorized": CloseCode.UNAUTHORIZED,
    "token_expired": CloseCode.TOKEN_EXPIRED,
    "forbidden": CloseCode.FORBIDDEN,
}
