"""Read a consumer JWT's claims without verifying it: the client only plans with them.

relayd verifies every token; the client reads ``exp`` to refresh before relayd closes the
connection with 4002, and ``streams``/``rights`` to refuse a ``cancel`` the token cannot make.
A token that cannot be read is not an error here: the answer is just "unknown" (None).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import orjson

from relayd.auth import Principal

__all__ = ["token_allows", "token_claims", "token_expiry"]


def token_claims(token: str) -> dict[str, Any] | None:
    """The payload of a compact JWT (``header.payload.signature``), unverified; None if unreadable."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def token_expiry(token: str) -> float | None:
    """The token's ``exp`` (unix seconds), or None when it has none we can read."""
    claims = token_claims(token)
    exp = None if claims is None else claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


def token_allows(token: str, stream: str, right: str) -> bool | None:
    """Whether the token's claims grant ``right`` on ``stream``; None when they cannot be read."""
    claims = token_claims(token)
    if claims is None:
        return None
    streams, rights = claims.get("streams"), claims.get("rights", ["read"])
    if not isinstance(streams, list) or not isinstance(rights, list):
        return None
    principal = Principal(
        streams=tuple(s for s in streams if isinstance(s, str)),
        rights=frozenset(r for r in rights if isinstance(r, str)),
        expires_at=token_expiry(token) or math.inf,
    )
    return principal.allows(stream, right)
