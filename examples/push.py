"""Push a demo stream into relayd: RELAYD_API_KEY=rk_... python examples/push.py chat-1"""

import asyncio
import json
import os
import sys

import aiohttp

URL = os.environ.get("RELAYD_URL", "http://127.0.0.1:8080")
TEXT = (
    "relayd stores every chunk in Redis before any consumer sees it, so a reload, a second tab or "
    "a dropped connection picks the answer up at its last cursor: nothing lost, nothing twice. "
    "This demo sends forty words with pauses."
)
WORDS = TEXT.split()


async def push(stream: str) -> None:
    auth = {"Authorization": f"Bearer {os.environ['RELAYD_API_KEY']}"}
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{URL}/v1/ingest", headers=auth) as ws:

        async def append_words() -> None:
            for seq, word in enumerate(WORDS, start=1):  # seq numbers chunks: 1, 2, 3, ...
                await ws.send_json({"op": "append", "stream": stream, "seq": seq, "chunk": word + " "})
                await asyncio.sleep(0.15)

        await ws.send_json({"op": "open", "stream": stream, "content_type": "text"})
        opened = await ws.receive_json()  # append only once relayd has opened the stream
        if opened.get("status") != "open":
            sys.exit(f"cannot open {stream}: {opened}")
        sender = asyncio.create_task(append_words())
        async for msg in ws:
            for frame in map(json.loads, msg.data.split("\n")):  # a message may hold several frames
                kind = frame["type"]
                if kind == "ack" and frame["seq"] == len(WORDS):  # all stored in Redis: end it
                    print(f"last ack: seq={frame['seq']} cursor={frame['cursor']}")
                    await ws.send_json({"op": "end", "stream": stream, "reason": "completed"})
                elif kind == "cancel":  # a consumer asked to stop
                    sender.cancel()
                    await ws.send_json({"op": "end", "stream": stream, "reason": "cancelled"})
                elif kind == "ended":
                    print(f"ended: {frame['reason']} cursor={frame['cursor']}")
                    return
                elif kind == "error":
                    sys.exit(f"relayd refused: {frame}")
    sys.exit("connection closed before the stream ended")


if __name__ == "__main__":
    asyncio.run(push(sys.argv[1]))
