"""Push a demo stream into relayd with the producer SDK: python examples/push.py chat-1"""

import argparse
import asyncio
import os
from collections.abc import AsyncIterator

from credentials import api_key  # RELAYD_API_KEY, else the development key `relayd serve` wrote

from relayd.client import Producer

TEXT = (
    "relayd stores every chunk in Redis before any consumer sees it, so a reload, a second tab or "
    "a dropped connection picks the answer up at its last cursor: nothing lost, nothing twice. "
    "This demo sends forty words with pauses."
)


async def words(pause_s: float) -> AsyncIterator[str]:
    for word in TEXT.split():
        yield word + " "
        await asyncio.sleep(pause_s)  # a slow model


async def push(url: str, key: str, stream: str, pause_s: float) -> None:
    # One websocket for any number of streams; appends are batched and acknowledged in order,
    # resent after a reconnect without duplicates; a consumer's cancel stops the iteration.
    async with Producer(url, key, content_type="text") as producer:
        result = await producer.stream(stream, words(pause_s))
    print(f"{result.stream}: {result.reason} after {result.chunks} chunks, end cursor {result.cursor}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Push forty words into a relayd stream, one chunk each.")
    parser.add_argument("stream", help="the stream id to open, e.g. chat-1")
    parser.add_argument("--relayd-url", default=os.environ.get("RELAYD_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--api-key", help="producer API key (default: $RELAYD_API_KEY or relayd-data/dev-credentials)")
    parser.add_argument("--pause", type=float, default=0.15, help="seconds between words (default 0.15)")
    args = parser.parse_args()
    asyncio.run(push(args.relayd_url, api_key(args.api_key), args.stream, args.pause))
