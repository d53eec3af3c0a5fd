"""relayd's base URL (``http(s)://host:port[/prefix]`` or ``ws(s)://``) -> its websocket URLs.

Both the producer (``/v1/ingest``) and the consumer (``/v1/streams/{id}/ws``) connect with a
websocket; callers give the base URL they give every other client, in either scheme.
"""

from __future__ import annotations

__all__ = ["ws_base"]

_SCHEMES = (("https://", "wss://"), ("http://", "ws://"))


def ws_base(url: str) -> str:
    """The ``ws(s)://`` form of relayd's base ``url``, without a trailing slash."""
    base = url.rstrip("/")
    for scheme, ws_scheme in _SCHEMES:
        if base.startswith(scheme):
            return ws_scheme + base[len(scheme) :]
    if base.startswith(("ws://", "wss://")):
        return base
    raise ValueError(f"relayd url must start with http://, https://, ws:// or wss://, got {url!r}")
