"""Mint consumer tokens in your backend, with no call to relayd.

A thin front on :class:`relayd.auth.TokenAuthority`, the code relayd itself verifies with, so
what this signs is exactly what relayd accepts (docs/protocol.md, "Tokens").
"""

from __future__ import annotations

from collections.abc import Sequence

from relayd.auth import TokenAuthority
from relayd.errors import RelaydError

__all__ = ["mint_token"]


def mint_token(
    secret: str,
    streams: Sequence[str],
    rights: Sequence[str] = ("read",),
    ttl: int = 300,
    *,
    sub: str | None = None,
    audience: str = "relayd",
    issuer: str | None = None,
    algorithm: str = "HS256",
) -> str:
    """A JWT letting its holder read (``"read"``) or cancel (``"cancel"``) ``streams``.

    ``secret`` is relayd's ``auth.jwt_secret`` for HS256/384/512, or the PEM private key whose
    public half relayd is configured with for RS256/ES256. ``streams`` are stream ids, prefixes
    ending in ``*`` (``"user-7/*"``) or ``"*"``. The token expires ``ttl`` seconds from now;
    ``audience`` and ``issuer`` must match relayd's ``auth.jwt_audience`` / ``auth.jwt_issuer``.

    Bad arguments (an unknown right, an invalid stream id, a short secret) raise ``ValueError``.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    try:
        symmetric = algorithm.startswith("HS")
        authority = TokenAuthority(
            algorithm=algorithm,
            secret=secret if symmetric else "",
            private_key="" if symmetric else secret,
            audience=audience,
            issuer=issuer or "",
            default_ttl_s=ttl,
            max_ttl_s=ttl,
        )
        token, _expires_at = authority.mint(list(streams), list(rights), ttl_s=ttl, subject=sub)
    except RelaydError as exc:
        raise ValueError(str(exc)) from exc
    return token
