"""Push a demo stream into relayd with the producer SDK: python examples/push.py chat-1"""

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from relayd.client import Producer

URL = os.environ.get("RELAYD_URL", "http://127.0.0.1:8080")
# The development key `relayd serve` wrote (first line), unless RELAYD_API_KEY is set.
API_KEY = os.environ.get("RELAYD_API_KEY") or Path("relayd-data/dev-credentials").read_text().split()[0]
TEXT = (
    "relayd stores every chunk in Redis before any consumer sees it, so a reload, a second tab or "
    "a dropped connection picks the answer up at its last cursor: nothing lost, nothing twice. "
    "This demo sends forty words with pauses."
)


async def words() -> AsyncIterator[str]:
    for word in TEXT.split():
        yield word + " "
        await asyncio.sleep(0.15)  # a slow model


async def push(stream: str) -> None:
    # One websocket for any number of streams; appends are batched and acknowledged in order,
    # resent after a reconnect without duplicates; a consumer's cancel stops the iteration.
    async with Producer(URL, API_KEY, content_type="text") as producer:
        result = await producer.stream(stream, words())
    print(f"{result.stream}: {result.reason} after {result.chunks} chunks, end cursor {result.cursor}")


if __name__ == "__main__":
    asyncio.run(push(sys.argv[1]))
