"""Credentials: producer API keys and consumer JWTs (docs/protocol.md, "Tokens").

Pure functions and classes, no I/O: the web layer reads the header or query string, calls
:func:`parse_bearer`, then :meth:`ApiKeys.verify` or :meth:`TokenAuthority.verify`, and turns
the :class:`~relayd.errors.AuthError` it may raise into a 401/403 or a close code.

Every pyjwt exception is translated into an ``AuthError`` here; none escapes this module.
No message ever contains a presented key, a token, or a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from secrets import token_urlsafe
from typing import Any

import jwt

from relayd.errors import AuthError, ConfigError, ProtocolError
from relayd.protocol import is_valid_stream_id

__all__ = [
    "ALGORITHMS",
    "RIGHTS",
    "ApiKeys",
    "FailureLimiter",
    "Principal",
    "TokenAuthority",
    "generate_api_key",
    "hash_api_key",
    "is_valid_stream_pattern",
    "parse_bearer",
]

RIGHTS = frozenset({"read", "cancel"})
DEFAULT_RIGHTS: tuple[str, ...] = ("read",)
# The algorithms auth.jwt_algorithm accepts (relayd/config.py). Never "none".
ALGORITHMS = frozenset({"HS256", "HS384", "HS512", "RS256", "ES256"})

_HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_STREAM_ID = 200


# --- API keys ---------------------------------------------------------------------------------


def hash_api_key(key: str) -> str:
    """Return ``"sha256:<64 lowercase hex>"`` of the UTF-8 bytes of ``key``."""
    return _HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    """Return a new random API key: ``"rk_"`` and 43 URL-safe characters (256 bits)."""
    return "rk_" + token_urlsafe(32)


def parse_bearer(header: str | None) -> str | None:
    """Return the credential of an ``Authorization: Bearer <credential>`` header, else None.

    The scheme is case-insensitive; surrounding whitespace is ignored. A header with another
    scheme, no credential, or a credential containing whitespace gives None.
    """
    if header is None:
        return None
    parts = header.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    credential = parts[1].strip()
    if not credential or any(c.isspace() for c in credential):
        return None
    return credential


def _normalise_hash(value: str, key: str, index: int) -> str:
    candidate = value.strip().lower()
    if _HASH_RE.fullmatch(candidate) is None:
        raise ConfigError(f"{key}[{index}]", "must be a hash 'sha256:<64 hex>'")
    return candidate


class ApiKeys:
    """The configured producer API keys. Only their SHA-256 hashes are kept in memory.

    ``hashes`` are ``"sha256:<hex>"`` strings (``auth.api_keys``); ``secrets`` are plain keys
    or such hashes (``RELAYD_API_KEYS``, ``auth.api_keys_file``). A malformed hash raises
    :class:`~relayd.errors.ConfigError`.

    ``streams`` (``auth.api_key_streams``) scopes some keys: each entry is a key's hash and the
    stream ids or prefixes (``tenant-a/*``) it may write and mint tokens for, separated by
    spaces. A key without an entry may use every stream.
    """

    __slots__ = ("_hashes", "_scopes")

    def __init__(self, hashes: Iterable[str] = (), secrets: Iterable[str] = (), streams: Iterable[str] = ()) -> None:
        stored: dict[bytes, None] = {}
        for i, value in enumerate(hashes):
            stored[_normalise_hash(value, "auth.api_keys", i).encode("ascii")] = None
        for i, secret in enumerate(secrets):
            if secret.startswith(_HASH_PREFIX):
                digest = _normalise_hash(secret, "auth.api_key_secrets", i)
            elif not secret:
                raise ConfigError(f"auth.api_key_secrets[{i}]", "an API key must not be empty")
            else:
                digest = hash_api_key(secret)
            stored[digest.encode("ascii")] = None
        self._hashes: tuple[bytes, ...] = tuple(stored)
        self._scopes = _parse_scopes(streams, stored)

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._hashes)} keys>)"

    def verify(self, presented: str | None) -> StreamScope | None:
        """The scope of ``presented`` (None: every stream); ``AuthError("unauthorized")`` if it is no key.

        The presented key's hash is compared with every stored hash (``hmac.compare_digest``,
        no early exit), so the time taken does not depend on which key matched.
        """
        if not presented:
            raise AuthError("unauthorized", "missing API key")
        digest = hash_api_key(presented).encode("ascii")
        matched = False
        for stored in self._hashes:
            matched |= hmac.compare_digest(digest, stored)
        if not matched:
            raise AuthError("unauthorized", "invalid API key")
        return self._scopes.get(digest)


@dataclass(frozen=True, slots=True)
class StreamScope:
    """The streams one API key may use: exact ids and prefixes ending in ``*``."""

    patterns: tuple[str, ...]

    def allows(self, stream_id: str) -> bool:
        return any(_stream_matches(pattern, stream_id) for pattern in self.patterns)

    def covers(self, pattern: str) -> bool:
        """True if every stream ``pattern`` (an id, ``prefix*`` or ``*``) matches is in this scope."""
        if pattern.endswith("*"):
            prefix = pattern[:-1]
            return any(p.endswith("*") and prefix.startswith(p[:-1]) for p in self.patterns)
        return self.allows(pattern)

    def require(self, stream_id: str) -> None:
        if not self.allows(stream_id):
            raise AuthError("forbidden", f"this API key may not use stream {stream_id}")


def _parse_scopes(entries: Iterable[str], keys: dict[bytes, None]) -> dict[bytes, StreamScope]:
    scopes: dict[bytes, StreamScope] = {}
    for i, entry in enumerate(entries):
        key = f"auth.api_key_streams[{i}]"
        digest, *patterns = entry.split()
        if not patterns:
            raise ConfigError(key, "must be a key's hash and the stream ids or prefixes it may use ('sha256:… a/*')")
        stored = _normalise_hash(digest, "auth.api_key_streams", i).encode("ascii")
        if stored not in keys:
            raise ConfigError(key, "names no configured API key (make the hash with `relayd hash-key`)")
        for pattern in patterns:
            if pattern == "*" or not is_valid_stream_pattern(pattern):
                raise ConfigError(key, f"{pattern[:40]!r} is not a stream id or a prefix ending in '*'")
        scopes[stored] = StreamScope(tuple(patterns))
    return scopes


class FailureLimiter:
    """Failed credential attempts per client address: a token bucket each, bounded in memory.

    An address may fail ``max_failures`` times in a burst, and then once per
    ``window_s / max_failures`` seconds; while its bucket is empty its requests are refused
    (429) before any credential is checked. Pure: the caller passes the clock. At most
    ``max_addresses`` buckets are kept; the least recently failed goes first.
    """

    __slots__ = ("_buckets", "_rate", "max_addresses", "max_failures")

    def __init__(self, max_failures: int, window_s: float, max_addresses: int = 10_000) -> None:
        self.max_failures = max_failures
        self.max_addresses = max_addresses
        self._rate = max_failures / window_s if max_failures else 0.0  # failures forgiven per second
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, as of)

    def _tokens(self, address: str, now: float) -> float:
        tokens, since = self._buckets.get(address, (self.max_failures, now))
        return min(self.max_failures, tokens + (now - since) * self._rate)

    def retry_after(self, address: str | None, now: float) -> float:
        """Seconds until ``address`` may try again; 0 if it may now."""
        if not self.max_failures or address is None or address not in self._buckets:
            return 0.0
        tokens = self._tokens(address, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self._rate

    def failed(self, address: str | None, now: float) -> None:
        if not self.max_failures or address is None:
            return
        tokens = self._tokens(address, now) - 1
        self._buckets.pop(address, None)  # re-inserted last: the dict's order is recency
        self._buckets[address] = (max(tokens, 0.0), now)
        if len(self._buckets) > self.max_addresses:
            del self._buckets[next(iter(self._buckets))]


# --- Principals -------------------------------------------------------------------------------


def is_valid_stream_pattern(pattern: object) -> bool:
    """True for a stream id, a valid id prefix followed by ``*``, or ``*`` alone."""
    if not isinstance(pattern, str):
        return False
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return prefix == "" or (len(pattern) <= _MAX_STREAM_ID and is_valid_stream_id(prefix))
    return is_valid_stream_id(pattern)


def _stream_matches(pattern: str, stream_id: str) -> bool:
    if pattern.endswith("*"):
        return stream_id.startswith(pattern[:-1])
    return pattern == stream_id


@dataclass(frozen=True, slots=True)
class Principal:
    """What a verified consumer token allows.

    ``streams`` holds exact stream ids and prefixes ending in ``*`` (``"user-7/*"``); ``"*"``
    alone allows every stream. ``*`` matches any tail, including an empty one. Callers check
    the stream id itself (``invalid_stream_id``) before asking.
    """

    streams: tuple[str, ...]
    rights: frozenset[str]
    expires_at: float  # unix seconds
    subject: str | None = None

    def allows(self, stream_id: str, right: str = "read") -> bool:
        """True if the token grants ``right`` on ``stream_id``."""
        if right not in self.rights:
            return False
        return any(_stream_matches(pattern, stream_id) for pattern in self.streams)

    def require(self, stream_id: str, right: str = "read") -> None:
        """Raise ``AuthError("forbidden")`` unless the token grants ``right`` on ``stream_id``."""
        if not self.allows(stream_id, right):
            raise AuthError("forbidden", f"token does not allow {right} on stream {stream_id}")


# --- Tokens -----------------------------------------------------------------------------------


def _prepare_key(algorithm: str, material: str, config_key: str, what: str) -> Any:
    """Parse key material for ``algorithm`` with pyjwt; refuse keys below RFC 7518 sizes."""
    alg = jwt.get_algorithm_by_name(algorithm)
    try:
        key = alg.prepare_key(material)
    except jwt.PyJWTError as exc:
        raise ConfigError(config_key, f"is not a usable {algorithm} {what}: {exc}") from exc
    except Exception as exc:  # cryptography: unparsable PEM, encrypted key, unknown type
        raise ConfigError(config_key, f"is not a usable {algorithm} {what} (expected an unencrypted PEM key)") from exc
    too_short = alg.check_key_length(key)
    if too_short:
        raise ConfigError(config_key, too_short)
    return key


def _number(value: object) -> float | None:
    """``value`` as a finite float if it is a JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _translate(exc: jwt.PyJWTError, algorithm: str) -> AuthError:
    """Map a pyjwt exception to an ``AuthError`` with a message safe to show the client."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError("unauthorized", f"token has no {exc.claim} claim")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return AuthError("unauthorized", f"token algorithm not allowed (expected {algorithm})")
    if isinstance(exc, jwt.InvalidSignatureError):
        return AuthError("unauthorized", "token signature is invalid")
    if isinstance(exc, jwt.InvalidAudienceError):
        return AuthError("unauthorized", "token audience is not accepted")
    if isinstance(exc, jwt.InvalidIssuerError):
        return AuthError("unauthorized", "token issuer is not accepted")
    if isinstance(exc, jwt.exceptions.InvalidSubjectError):
        return AuthError("unauthorized", "token sub claim must be a string")
    if isinstance(exc, jwt.exceptions.InvalidJTIError):
        return AuthError("unauthorized", "token jti claim must be a string")
    if isinstance(exc, jwt.DecodeError):
        return AuthError("unauthorized", "malformed token")
    if isinstance(exc, jwt.InvalidKeyError):
        return AuthError("unauthorized", "token cannot be verified with the configured key")
    return AuthError("unauthorized", "invalid token")


class TokenAuthority:
    """Mints and verifies consumer JWTs.

    HS* algorithms sign and verify with ``secret``. RS256/ES256 verify with ``public_key``
    and sign with ``private_key`` (PEM text); without ``public_key`` the public half of
    ``private_key`` verifies. Verification pins ``algorithms=[algorithm]``, requires ``exp``
    and ``aud == audience``, and ``iss == issuer`` when ``issuer`` is set. ``leeway_s`` widens
    the ``exp``, ``nbf`` and ``iat`` checks for clock skew.

    A bad configuration raises :class:`~relayd.errors.ConfigError`. An authority without a
    key may be built; ``mint`` and ``verify`` then raise ``AuthError("unauthorized")``.
    """

    __slots__ = (
        "_audience",
        "_default_ttl_s",
        "_issuer",
        "_leeway_s",
        "_max_ttl_s",
        "_signing_key",
        "_verify_key",
        "algorithm",
    )

    def __init__(
        self,
        *,
        algorithm: str = "HS256",
        secret: str = "",
        public_key: str = "",
        private_key: str = "",
        audience: str = "relayd",
        issuer: str = "",
        default_ttl_s: int = 300,
        max_ttl_s: int = 3600,
        leeway_s: float = 0.0,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError("auth.jwt_algorithm", f"must be one of {', '.join(sorted(ALGORITHMS))}")
        if not audience:
            raise ConfigError("auth.jwt_audience", "must not be empty")
        for key, value in (
            ("auth.token_ttl_s", default_ttl_s),
            ("auth.token_max_ttl_s", max_ttl_s),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(key, "must be a positive integer")
        if default_ttl_s > max_ttl_s:
            raise ConfigError("auth.token_ttl_s", "must not exceed auth.token_max_ttl_s")
        leeway = _number(leeway_s)
        if leeway is None or leeway < 0:
            raise ConfigError("auth.jwt_leeway_s", "must be a number >= 0")

        self.algorithm = algorithm
        self._audience = audience
        self._issuer = issuer
        self._default_ttl_s = default_ttl_s
        self._max_ttl_s = max_ttl_s
        self._leeway_s = leeway
        self._signing_key: Any = None
        self._verify_key: Any = None

        if algorithm.startswith("HS"):
            if secret:
                key = _prepare_key(algorithm, secret, "auth.jwt_secret", "secret")
                self._signing_key = self._verify_key = key
            return
        if private_key:
            key = _prepare_key(algorithm, private_key, "auth.jwt_private_key", "private key")
            if not callable(getattr(key, "public_key", None)):
                raise ConfigError("auth.jwt_private_key", f"is not a {algorithm} private key")
            self._signing_key = key
            self._verify_key = key.public_key()
        if public_key:
            key = _prepare_key(algorithm, public_key, "auth.jwt_public_key_file", "public key")
            derive = getattr(key, "public_key", None)  # a private key given: use its public half
            self._verify_key = derive() if callable(derive) else key

    @property
    def can_mint(self) -> bool:
        return self._signing_key is not None

    @property
    def can_verify(self) -> bool:
        return self._verify_key is not None

    def __repr__(self) -> str:
        return (
            f"TokenAuthority(algorithm={self.algorithm!r}, audience={self._audience!r}, "
            f"issuer={self._issuer!r}, can_mint={self.can_mint}, can_verify={self.can_verify})"
        )

    def mint(
        self,
        streams: Sequence[str],
        rights: Sequence[str] = DEFAULT_RIGHTS,
        ttl_s: int | None = None,
        subject: str | None = None,
        now: float | None = None,
    ) -> tuple[str, int]:
        """Return ``(token, expires_at)``; ``ttl_s`` defaults to ``default_ttl_s``, capped.

        Bad input (from ``POST /v1/tokens``) raises ``ProtocolError("bad_frame")``.
        """
        if self._signing_key is None:
            raise AuthError("unauthorized", f"{self.algorithm}: cannot mint without a signing key")
        stream_list = _check_streams(streams)
        right_list = _check_rights(rights)
        if ttl_s is None:
            ttl_s = self._default_ttl_s
        elif isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
            raise ProtocolError("bad_frame", "ttl_s must be a positive integer")
        if subject is not None and (not isinstance(subject, str) or not subject):
            raise ProtocolError("bad_frame", "subject must be a non-empty string")
        issued_at = int(time.time() if now is None else now)
        expires_at = issued_at + min(ttl_s, self._max_ttl_s)
        claims: dict[str, Any] = {
            "streams": stream_list,
            "rights": right_list,
            "iat": issued_at,
            "exp": expires_at,
            "aud": self._audience,
        }
        if self._issuer:
            claims["iss"] = self._issuer
        if subject is not None:
            claims["sub"] = subject
        try:
            token = jwt.encode(claims, self._signing_key, algorithm=self.algorithm)
        except jwt.PyJWTError as exc:
            raise AuthError("unauthorized", "token could not be signed") from exc
        return token, expires_at

    def verify(self, token: str | None, now: float | None = None) -> Principal:
        """Return the :class:`Principal` of a valid token; else raise ``AuthError``.

        ``token_expired`` when ``exp`` has passed (checked after the signature), otherwise
        ``unauthorized`` with a message saying what is wrong.
        """
        if not token:
            raise AuthError("unauthorized", "missing token")
        if self._verify_key is None:
            raise AuthError("unauthorized", "token verification is not configured")
        try:
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=[self.algorithm],
                audience=self._audience,
                issuer=self._issuer or None,
                options={
                    "require": ["exp"],
                    # Time claims are checked below against ``now``, not pyjwt's clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": True,
                    "verify_iss": bool(self._issuer),
                    "verify_sub": True,
                    "verify_jti": True,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.PyJWTError as exc:
            raise _translate(exc, self.algorithm) from exc
        except (ValueError, TypeError, RecursionError, OverflowError) as exc:
            # Input pyjwt did not anticipate (deeply nested JSON, odd encodings).
            raise AuthError("unauthorized", "malformed token") from exc
        return self._principal(claims, time.time() if now is None else now)

    def _principal(self, claims: dict[str, Any], now: float) -> Principal:
        leeway = self._leeway_s
        expires_at = _number(claims["exp"])
        if expires_at is None:
            raise AuthError("unauthorized", "token exp claim must be a number")
        if expires_at <= now - leeway:
            raise AuthError("token_expired", "token has expired")
        if "nbf" in claims:
            not_before = _number(claims["nbf"])
            if not_before is None:
                raise AuthError("unauthorized", "token nbf claim must be a number")
            if not_before > now + leeway:
                raise AuthError("unauthorized", "token is not valid yet (nbf)")
        if "iat" in claims:
            issued_at = _number(claims["iat"])
            if issued_at is None:
                raise AuthError("unauthorized", "token iat claim must be a number")
            if issued_at > now + leeway:
                raise AuthError("unauthorized", "token was issued in the future (iat)")

        if "streams" not in claims:
            raise AuthError("unauthorized", "token has no streams claim")
        streams = claims["streams"]
        if not isinstance(streams, list) or not streams:
            raise AuthError("unauthorized", "token streams claim must be a non-empty list")
        for i, pattern in enumerate(streams):
            if not is_valid_stream_pattern(pattern):
                raise AuthError("unauthorized", f"token streams[{i}] is not a valid stream id or prefix")
        rights = claims.get("rights", list(DEFAULT_RIGHTS))
        if not isinstance(rights, list) or not rights:
            raise AuthError("unauthorized", "token rights claim must be a non-empty list")
        for i, right in enumerate(rights):
            if not isinstance(right, str) or right not in RIGHTS:
                raise AuthError(
                    "unauthorized",
                    f"token rights[{i}] is not a known right ({', '.join(sorted(RIGHTS))})",
                )
        subject = claims.get("sub")  # pyjwt checked it is a string when present
        return Principal(
            streams=tuple(dict.fromkeys(streams)),
            rights=frozenset(rights),
            expires_at=expires_at,
            subject=subject if isinstance(subject, str) else None,
        )


def _check_streams(streams: Sequence[str]) -> list[str]:
    if isinstance(streams, str | bytes) or not isinstance(streams, Sequence) or not streams:
        raise ProtocolError("bad_frame", "streams must be a non-empty list of stream ids")
    for i, pattern in enumerate(streams):
        if not is_valid_stream_pattern(pattern):
            raise ProtocolError(
                "bad_frame",
                f"streams[{i}] must be a stream id (1-200 characters of A-Z a-z 0-9 _ - . : / @ =),"
                " a prefix ending in '*', or '*'",
            )
    return list(dict.fromkeys(streams))


def _check_rights(rights: Sequence[str]) -> list[str]:
    known = ", ".join(sorted(RIGHTS))
    if isinstance(rights, str | bytes) or not isinstance(rights, Sequence) or not rights:
        raise ProtocolError("bad_frame", f"rights must be a non-empty list of: {known}")
    for i, right in enumerate(rights):
        if not isinstance(right, str) or right not in RIGHTS:
            raise ProtocolError("bad_frame", f"rights[{i}] must be one of: {known}")
    return list(dict.fromkeys(rights))
