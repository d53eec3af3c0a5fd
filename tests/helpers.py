"""Test helpers: start relayd in-process, and thin real clients for producers and consumers.

The clients are plain aiohttp websockets that speak docs/protocol.md; they add nothing but
NDJSON splitting and waiting for a frame of a given type.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from relayd.auth import TokenAuthority, hash_api_key
from relayd.config import Config, build_config
from relayd.server import Server

API_KEY = "rk_test_key_0123456789abcdef"
JWT_SECRET = "test-secret-0123456789abcdef0123456789"
FRAME_TIMEOUT_S = 10.0


def make_config(redis_url: str, key_prefix: str, data_dir: str, **tables: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout_s": 5.0},
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "embedded": {"data_dir": data_dir},
        "auth": {"api_keys": [hash_api_key(API_KEY)], "jwt_secret": JWT_SECRET},
    }
    for name, values in tables.items():
        raw.setdefault(name, {}).update(values)
    return build_config(raw, env={})


class Client:
    """The client side of the helpers, for a relayd at ``url`` (one started here, or a process)."""

    def __init__(self, url: str = "") -> None:
        self._url = url
        self.session: aiohttp.ClientSession | None = None
        self.tokens = TokenAuthority(secret=JWT_SECRET, max_ttl_s=86_400)

    async def __aenter__(self) -> Client:
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    @property
    def url(self) -> str:
        return self._url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    def token(self, streams: list[str] | None = None, rights: tuple[str, ...] = ("read",), ttl_s: int = 300) -> str:
        return self.tokens.mint(streams or ["*"], list(rights), ttl_s=ttl_s)[0]

    async def producer(self, api_key: str = API_KEY) -> Peer:
        assert self.session is not None
        ws = await self.session.ws_connect(f"{self.url}/v1/ingest", headers={"Authorization": f"Bearer {api_key}"})
        return Peer(ws)

    async def consumer(
        self, stream: str | None = None, *, token: str | None = None, cursor: str | None = None, **params: str
    ) -> Peer:
        assert self.session is not None
        query = dict(params)
        query["token"] = token if token is not None else self.token()
        if cursor is not None:
            query["cursor"] = cursor
        path = f"/v1/streams/{stream}/ws" if stream is not None else "/v1/ws"
        ws = await self.session.ws_connect(f"{self.url}{path}", params=query)
        return Peer(ws)


class Relayd(Client):
    """relayd in the current event loop: ``async with Relayd(config) as server``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.server = Server(config)

    async def __aenter__(self) -> Relayd:
        await self.server.start()
        await super().__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        await self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def relay(self) -> Any:
        return self.server.relay


class Peer:
    """One websocket peer: send ops, read frames (split from NDJSON messages) in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._frames: deque[dict[str, Any]] = deque()

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.ws.close()

    async def send(self, *ops: dict[str, Any]) -> None:
        await self.ws.send_str("\n".join(orjson.dumps(op).decode() for op in ops))

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)

    async def next(self, timeout: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
        """The next frame; raises ConnectionClosed (with the close code) when the socket closes."""
        while not self._frames:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                for line in (msg.data if isinstance(msg.data, str) else msg.data.decode()).split("\n"):
                    if line.strip():
                        self._frames.append(orjson.loads(line))
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                raise ConnectionClosed(self.ws.close_code, msg.extra)
            elif msg.type is aiohttp.WSMsgType.ERROR:
                raise ConnectionClosed(self.ws.close_code, str(msg.data))
        return self._frames.popleft()

    async def expect(self, type_: str, timeout: float = FRAME_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        """The next frame, asserting its type (and fields)."""
        frame = await self.next(timeout)
        assert frame.get("type") == type_, f"expected {type_}, got {frame}"
        for key, value in fields.items():
            assert frame.get(key) == value, f"{key}: expected {value!r}, got {frame}"
        return frame

    async def until(self, type_: str, timeout: float = FRAME_TIMEOUT_S) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Frames up to (not including) the first of ``type_``, and that frame."""
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next(timeout)
                if frame.get("type") == type_:
                    return seen, frame
                seen.append(frame)

    async def closed(self, timeout: float = FRAME_TIMEOUT_S) -> int | None:
        """Wait for the close; return its code (frames before it are discarded)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.next(timeout)
        except ConnectionClosed as exc:
            return exc.code

    # producer conveniences -----------------------------------------------------------------

    async def open(self, stream: str, **fields: Any) -> dict[str, Any]:
        await self.send({"op": "open", "stream": stream, **fields})
        return await self.next()

    async def append(self, stream: str, seq: int, *chunks: Any) -> dict[str, Any]:
        await self.send({"op": "append", "stream": stream, "seq": seq, "chunks": list(chunks)})
        return await self.next()

    async def end(self, stream: str, reason: str = "completed", **fields: Any) -> dict[str, Any]:
        await self.send({"op": "end", "stream": stream, "reason": reason, **fields})
        return await self.next()


class ConnectionClosed(Exception):
    def __init__(self, code: int | None, reason: object) -> None:
        super().__init__(f"closed: {code} {reason}")
        self.code = code
        self.reason = reason


async def collect_chunks(
    peer: Peer, stream: str | None = None, timeout: float = FRAME_TIMEOUT_S
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Chunk frames (of ``stream``) until its end frame; returns (chunks, end)."""
    chunks: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await peer.next(timeout)
            if stream is not None and frame.get("stream") != stream:
                continue
            if frame["type"] == "chunk":
                chunks.append(frame)
            elif frame["type"] == "end":
                return chunks, frame


async def poll_until(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 10.0) -> None:
    """Poll a condition that has no event to wait on (server-side state, a close), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# -- relayd as a real process ------------------------------------------------------------------


def relayd_executable() -> str:
    beside = Path(sys.executable).with_name("relayd")
    found = str(beside) if beside.exists() else shutil.which("relayd")
    assert found is not None, "the relayd console script is not installed"
    return found


@contextlib.asynccontextmanager
async def relayd_serve(
    *args: str, ready: Callable[[list[str]], bool], env: dict[str, str] | None = None, timeout: float = 30.0
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """``relayd serve ARGS`` as a process (no RELAYD_* from this environment, plus ``env``), once
    ``ready(stderr lines so far)`` holds; its stderr keeps being collected into the yielded list.
    Killed on exit if still running."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")} | (env or {})
    proc = await asyncio.create_subprocess_exec(
        relayd_executable(), "serve", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=environ,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(timeout):
            while not ready(lines):
                line = (await proc.stderr.readline()).decode()
                assert line, f"relayd exited early ({await proc.wait()}): {''.join(lines)}"
                lines.append(line)
        drain = asyncio.create_task(read_rest(proc.stderr, lines))
        yield proc, lines
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


async def read_rest(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode())


def listening_port(lines: list[str]) -> int | None:
    """The port of the first ``relayd: listening on http://127.0.0.1:PORT`` line, if any."""
    for line in lines:
        match = re.match(r"relayd: listening on http://127\.0\.0\.1:(\d+)$", line.strip())
        if match:
            return int(match.group(1))
    return None


def pure_wheel_files(source: Path, wheels: Path) -> list[str]:
    """Build relayd's wheel from the checkout (or a part of one) at ``source`` as ``pip wheel .``
    does, pure (no RELAYD_MYPYC), into ``wheels``; the names of the files it holds. Needs
    setuptools>=77 from the package index (pip's isolated build)."""
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_MYPYC"}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("relayd-*.whl")
    return zipfile.ZipFile(wheel).namelist()
