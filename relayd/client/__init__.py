"""relayd's Python client SDK: push streams in (:class:`Producer`), read them out (``consume``).

Asyncio on aiohttp; imports only relayd's core modules (protocol, auth, errors), never the
server. docs/clients.md is the guide; docs/protocol.md the wire protocol underneath.
"""

from relayd.client.consumer import Consumer, End, consume
from relayd.client.encoding import Encoder, json_encoder, text_encoder
from relayd.client.errors import (
    AckTimeout,
    ChunkTooLarge,
    ClientError,
    ConnectionFailed,
    Forbidden,
    ProducerClosed,
    ProducerFenced,
    ProducerLost,
    Refused,
    StreamAlreadyEnded,
    StreamCancelled,
    StreamEndedByServer,
    StreamErrored,
    StreamFailed,
    StreamGap,
    StreamNotFound,
    StreamReset,
    Unauthorized,
)
from relayd.client.http import http_append
from relayd.client.producer import Producer
from relayd.client.sync import SyncProducer, SyncWriter
from relayd.client.tee import Tee
from relayd.client.tokens import mint_token
from relayd.client.ui_messages import ui_message_chunks
from relayd.client.writer import StreamResult, Writer

__all__ = [
    "AckTimeout",
    "ChunkTooLarge",
    "ClientError",
    "ConnectionFailed",
    "Consumer",
    "Encoder",
    "End",
    "Forbidden",
    "Producer",
    "ProducerClosed",
    "ProducerFenced",
    "ProducerLost",
    "Refused",
    "StreamAlreadyEnded",
    "StreamCancelled",
    "StreamEndedByServer",
    "StreamErrored",
    "StreamFailed",
    "StreamGap",
    "StreamNotFound",
    "StreamReset",
    "StreamResult",
    "SyncProducer",
    "SyncWriter",
    "Tee",
    "Unauthorized",
    "Writer",
    "consume",
    "http_append",
    "json_encoder",
    "mint_token",
    "text_encoder",
    "ui_message_chunks",
]
