"""``relayd serve`` as a real process: the startup checks, the embedded server's supervision, exit codes.

relayd runs as ``python -m relayd.cli serve`` with its embedded Valkey; the test reads its stderr
line by line and waits for the lines it expects, never for a time.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType

import pytest

from relayd.auth import TokenAuthority
from relayd.client import Producer, consume
from relayd.embedded import PIDFILE_NAME
from relayd.errors import EXIT_EMBEDDED_LOST, EXIT_PORT_IN_USE

START_TIMEOUT_S = 30.0


class Serve:
    """``relayd serve --config <file> [args]`` as a subprocess; its stderr is collected as it comes."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "relayd.cli", "serve", "--config", str(config), *args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
        self.env = {**base, **(env or {})}
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Serve:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.proc is not None and self._reader is not None
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode().rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def line(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        """The first stderr line (from the start) that matches ``pattern``; waits for it to come."""
        assert self._reader is not None
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for text in self.lines[seen:]:
                    if match := re.search(pattern, text):
                        return match
                seen = len(self.lines)
                assert not self._reader.done(), f"relayd exited without printing {pattern!r}:\n{self.output}"
                self._new_line.clear()
                await self._new_line.wait()

    async def url(self) -> str:
        return (await self.line(r"relayd: listening on (http://\S+)")).group(1)

    async def exit_code(self, timeout: float = START_TIMEOUT_S) -> int:
        assert self.proc is not None and self._reader is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code


def write_config(tmp_path: Path, port: int = 0) -> tuple[Path, Path]:
    """A development config (no API keys) with the embedded server in ``tmp_path/d``; returns (file, data dir)."""
    data_dir = tmp_path / "d"
    path = tmp_path / "relayd.toml"
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\ndrain_timeout_s = 5.0\n\n[embedded]\ndata_dir = "{data_dir}"\n'
    )
    return path, data_dir


def valkey_pid(data_dir: Path) -> int:
    return int((data_dir / PIDFILE_NAME).read_text())


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process (this test) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- startup checks ----------------------------------------------------------------------------------


async def test_port_in_use_is_one_line_and_its_own_exit_code_before_anything_starts(
    tmp_path: Path, held_port: int
) -> None:
    """A taken port: one line on stderr naming it, exit 75, and no embedded server or credentials made."""
    config, data_dir = write_config(tmp_path, port=held_port)
    async with Serve(config) as serve:
        code = await serve.exit_code()
    assert code == EXIT_PORT_IN_USE, serve.output
    assert serve.lines == [
        f"Error: cannot listen on 127.0.0.1:{held_port}: address already in use (another process listens there; "
        "stop it, or set another server.port or --port)"
    ]
    assert not data_dir.exists()  # no valkey started, no dev-credentials written
    troubleshooting = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    assert serve.lines[0].replace(f":{held_port}:", ":8080:") in troubleshooting


async def test_api_keys_without_a_jwt_secret_stop_serve_before_anything_starts(tmp_path: Path) -> None:
    """RELAYD_API_KEYS without a JWT secret: serve refuses, naming auth.jwt_secret, and writes nothing."""
    config, data_dir = write_config(tmp_path)
    async with Serve(config, env={"RELAYD_API_KEYS": "rk_production_key_0123456789"}) as serve:
        code = await serve.exit_code()
    assert code != 0
    assert len(serve.lines) == 1 and "auth.jwt_secret" in serve.lines[0], serve.output
    assert not data_dir.exists()


# -- supervision of the embedded server ------------------------------------------------------------------


async def test_killed_embedded_server_is_restarted_and_the_stream_goes_on(tmp_path: Path) -> None:
    """kill -9 of the embedded Valkey mid-stream: relayd logs it, restarts it on the same data dir,
    the producer's stream continues, and every acknowledged chunk is stored once, in order."""
    config, data_dir = write_config(tmp_path)
    total, kill_at, resume_at = 600, 200, 300
    async with Serve(config) as serve:
        url = await serve.url()
        api_key, secret = (data_dir / "dev-credentials").read_text().split()[:2]
        first_pid = valkey_pid(data_dir)

        async def chunks() -> AsyncIterator[dict[str, int]]:
            for i in range(total):
                if i == kill_at:
                    os.kill(first_pid, signal.SIGKILL)
                if i == resume_at:  # some chunks sent into the outage; the rest after the restart
                    await serve.line(r"embedded server restarted")
                yield {"i": i}

        async with Producer(url, api_key, backoff_max_s=0.5) as producer:
            result = await producer.stream("sup-1", chunks())
        assert (result.reason, result.chunks) == ("completed", total)

        died = await serve.line(r"embedded server pid (\d+) exited \((.+?)\)")
        assert (int(died.group(1)), died.group(2)) == (first_pid, "killed by SIGKILL")
        assert valkey_pid(data_dir) != first_pid

        token = TokenAuthority(secret=secret).mint(["sup-1"])[0]
        async with consume(url, "sup-1", token=token) as consumer:
            received = [chunk async for chunk in consumer]
        assert received == [{"i": i} for i in range(total)]

        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        assert await serve.exit_code() == 0, serve.output


async def test_embedded_server_that_cannot_restart_makes_relayd_exit_non_zero(tmp_path: Path) -> None:
    """A server that no longer starts (its AOF manifest is damaged): after the bounded restarts relayd
    logs why and exits 69, so that its service manager acts."""
    config, data_dir = write_config(tmp_path)
    async with Serve(config) as serve:
        await serve.url()
        (manifest,) = (data_dir / "appendonlydir").glob("*.manifest")
        manifest.write_text("not a manifest\n")  # read only when the server starts
        os.kill(valkey_pid(data_dir), signal.SIGKILL)
        code = await serve.exit_code(timeout=50)
    assert code == EXIT_EMBEDDED_LOST, serve.output
    assert "exited (killed by SIGKILL)" in serve.output
    assert "embedded server restart 5/5 failed" in serve.output and "Invalid AOF manifest" in serve.output
    critical = [line for line in serve.lines if "could not be restarted" in line and "exit status 69" in line]
    assert critical, serve.output
    assert serve.lines[-1].startswith("Error: the embedded server for ")
