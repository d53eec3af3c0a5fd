"""relayd.store.resp: the pipelined write connection, against the real server."""

from __future__ import annotations

import asyncio

from relayd.store.resp import RespConnection, encode_command


async def test_a_nil_reply_keeps_its_place(redis_server: str, key_prefix: str) -> None:
    """A nil reply (GET of a missing key) is a reply, not "wait for more data": nothing shifts."""
    conn = await RespConnection.connect(redis_server, 5.0)
    try:
        missing, present = f"{key_prefix}:missing", f"{key_prefix}:present"
        commands = [["SET", present, "v"], ["GET", missing], ["GET", present], ["GET", missing]]
        payload = b"".join(encode_command(c) for c in commands)
        async with asyncio.timeout(5):
            assert await conn.execute(payload, len(commands)) == [b"OK", None, b"v", None]
    finally:
        conn.close()
