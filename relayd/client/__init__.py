"""relayd's Python client SDK: push streams in (:class:`Producer`), read them out (``consume``).

Asyncio on aiohttp; imports only relayd's core modules (protocol, auth, errors), never the
server. docs/clients.md is the guide; docs/protocol.md the wire protocol underneath.
"""

from relayd.client.errors import (
    AckTimeout,
    ClientError,
    ConnectionFailed,
    Forbidden,
    ProducerClosed,
    ProducerFenced,
    ProducerLost,
    Refused,
    StreamAlreadyEnded,
    StreamCancelled,
    StreamErrored,
    StreamFailed,
    StreamGap,
    StreamNotFound,
    StreamReset,
    Unauthorized,
)

__all__ = [
    "AckTimeout",
    "ClientError",
    "ConnectionFailed",
    "Forbidden",
    "ProducerClosed",
    "ProducerFenced",
    "ProducerLost",
    "Refused",
    "StreamAlreadyEnded",
    "StreamCancelled",
    "StreamErrored",
    "StreamFailed",
    "StreamGap",
    "StreamNotFound",
    "StreamReset",
    "Unauthorized",
]
