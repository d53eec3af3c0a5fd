"""The hub's end-of-tick fan-out (relayd/hub.py, ``Fan``) to real outboxes over real sockets.

Subscribers over the in-memory store (tests/test_subscription.py's World), each writing through a
real :class:`~relayd.outbox.Outbox` to a real TCP connection whose client parses the websocket
messages: a live subscriber whose connection has nothing queued gets the tick's message written
directly; one with something queued, or whose peer stops reading, gets it queued, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from relayd.metrics import Metrics
from relayd.outbox import Outbox
from relayd.protocol import WS_CODEC
from relayd.subscription import State, Subscriber
from relayd.web.transport import ws_text_frame
from tests.doubles import until
from tests.test_subscription import S, World, make_world


class CountingOutbox(Outbox):
    """An outbox that counts what went through its queue (``offer``) rather than the direct path."""

    offers = 0

    def offer(self, data: bytes, chunks: int = 0) -> bool:
        self.offers += 1
        return super().offer(data, chunks)


class Backlog:
    """The outbox's probe over a plain transport: its user-space buffer."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self.size = transport.get_write_buffer_size

    def __call__(self) -> int:
        return self.size()

    def progress(self, written: int) -> tuple[int, int]:
        return written - self.size(), self.size()

    def abort(self) -> None:
        self._transport.abort()


class Peer:
    """One consumer connection: relayd's end (an outbox and its writer task) and the client's."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        end: asyncio.StreamWriter,
        metrics: Metrics,
        max_bytes: int,
    ) -> None:
        self.reader = reader
        self.client = client
        self.end = end

        async def send(batch: list[bytes]) -> None:  # the slow path: write, then wait for the drain
            end.write(ws_text_frame(batch))
            await end.drain()

        self.outbox = CountingOutbox(
            send,
            max_bytes,
            30.0,
            Backlog(end.transport),  # type: ignore[arg-type]
            on_written=metrics.delivery_latency,
            on_delivered=metrics.written,  # as relayd/web/consume.py makes a consumer's outbox
            framer=ws_text_frame,
            write_frame=end.transport.write,
        )
        self.writer = asyncio.create_task(self.outbox.run())

    async def message(self) -> list[dict[str, Any]]:
        """The next websocket message's frames."""
        b0, b1 = await self.reader.readexactly(2)
        assert b0 == 0x81 and not b1 & 0x80  # one unmasked, unfragmented text frame
        n = b1 & 0x7F
        if n >= 126:
            n = int.from_bytes(await self.reader.readexactly(2 if n == 126 else 8), "big")
        return [orjson.loads(line) for line in (await self.reader.readexactly(n)).split(b"\n")]

    async def until_end(self) -> list[Any]:
        """Every frame up to the stream's end: chunk data, ``("end", reason)``, other frames' types."""
        got: list[Any] = []
        while not got or got[-1] != ("end", "completed"):
            got.extend(
                f["data"] if f["type"] == "chunk" else ("end", f["reason"]) if f["type"] == "end" else f
                for f in await self.message()
            )
        return got


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    """Connections made by :func:`connect`, closed afterwards."""
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.outbox.close()
        peer.writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await peer.writer
        for writer in (peer.end, peer.client):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def connect(
    peers: list[Peer], world: World, n: int, *, rcvbuf: int = 0, sndbuf: int = 0, max_bytes: int = 1 << 20
) -> None:
    """``n`` connections to a local server; small buffers make a peer that stops reading congested soon."""
    ends: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def accepted(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ends.put(writer)

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # (a small limit: the client's reader stops taking bytes from its socket soon when not read)
        reader, client = await asyncio.open_connection(sock=sock, limit=4096)
        end = await ends.get()
        if sndbuf:
            end.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        peers.append(Peer(reader, client, end, world.hub.metrics, max_bytes))
    server.close()


async def subscribe(world: World, peer: Peer) -> Subscriber:
    sub = Subscriber(world.hub, S, peer.outbox, WS_CODEC, cursor=None, wait_s=10.0, owner=world.owner)
    sub.start()
    world.subs.append(sub)
    await until(lambda: sub.state is State.LIVE)
    return sub


async def test_order_holds_when_a_subscriber_switches_between_the_direct_and_the_queued_path(
    peers: list[Peer],
) -> None:
    """A publication goes straight to an idle connection; in a tick where the connection has a
    frame queued it is queued behind that frame; the next one goes straight again; in order."""
    world = make_world()
    await world.open()
    await connect(peers, world, 1)
    (peer,) = peers
    await subscribe(world, peer)
    await world.append(1)  # direct
    assert await peer.message() == [{"type": "chunk", "stream": S, "cursor": f"{world.gen}-0000000001", "data": 1}]
    assert peer.outbox.offers == 0
    pub = await world.append(2, publish=False)
    peer.outbox.control(b'{"type":"pong"}')  # queued in the same tick as the publication: it goes first
    world.hub.publish(pub)
    await world.append(3)  # direct again, after them
    await world.end()
    assert await peer.until_end() == [{"type": "pong"}, 2, 3, ("end", "completed")]
    assert peer.outbox.offers == 1
    assert world.hub.metrics.chunk_totals()[1] == 3  # every chunk counted once, whichever path


async def test_a_consumer_that_stops_reading_mid_fan_out_is_queued_then_caught_up_and_loses_nothing(
    peers: list[Peer],
) -> None:
    """Three consumers take one publication per tick; one stops reading: once its socket is
    congested its publications are queued, then (its queue full) read again from the store; the
    others keep the direct path. When it reads again it gets every chunk once, in order."""
    world = make_world()
    await world.open()
    await connect(peers, world, 2)
    await connect(peers, world, 1, rcvbuf=4096, sndbuf=4096, max_bytes=64 * 1024)
    subs = [await subscribe(world, peer) for peer in peers]
    *readers, stalled = peers
    reading = [asyncio.create_task(peer.until_end()) for peer in readers]
    values = [{"i": i, "pad": "x" * 20_000} for i in range(1, 16)]
    for value in values:
        await world.append(value)
        await asyncio.sleep(0)  # one publication per tick: a fan each
    await until(lambda: subs[-1].state is State.CATCHUP)  # fell behind: its queue is full
    assert stalled.outbox.offers >= 1 and world.catchups() == 1
    await world.end()
    expected = [*values, ("end", "completed")]
    assert await asyncio.gather(*reading) == [expected, expected]
    assert all(peer.outbox.offers == 0 for peer in readers)
    assert await stalled.until_end() == expected  # it reads again: everything, once, in order
    assert world.hub.metrics.chunk_totals()[1] == 3 * len(values)


def test_a_fan_says_its_lines_bytes_chunks_and_oldest_read_time() -> None:
    """``Fan``'s fields, of one publication (nearly every tick) and of several: the message's
    lines, their bytes, the chunks (an end is not one), the first known read time, the next offset."""
    from relayd.hub import Fan, Publication
    from relayd.model import Entry

    one = Publication(S, 3, [Entry(1, b'{"a":1}'), Entry(2, b"2")], text=False, received=5.0)
    fan = Fan([one], WS_CODEC)
    assert (fan.items, fan.nbytes, fan.chunks, fan.received) == ([one.encoded(WS_CODEC)], len(fan.items[0]), 2, 5.0)
    assert (fan.gen, fan.first, fan.next, fan.end, fan.last_entry) == (3, 1, 3, False, Entry(2, b"2"))
    unknown = Publication(S, 3, [Entry(3, b"3")], text=False)  # read time unknown: 0
    end = Publication(S, 3, [Entry(4, b"4"), Entry(5, reason="completed")], text=False, received=7.0)
    both = Fan([unknown, end], WS_CODEC)
    assert (both.nbytes, both.chunks, both.received, both.next) == (sum(map(len, both.items)), 2, 7.0, 6)
    assert Fan([unknown], WS_CODEC).received == 0.0 and both.end
