"""``relayd streams …`` and ``relayd status`` against a real relayd (in this test's loop) and Valkey.

The commands block (synchronous HTTP), so CliRunner runs them in a thread while the loop serves
relayd; ``tail`` runs as a real process whose output is read line by line as it comes.
"""

from __future__ import annotations

import asyncio
import os
import pty
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from click.testing import CliRunner, Result

from relayd.admin_errors import EXIT_HISTORY_MISSING, EXIT_NOT_FOUND, EXIT_UNAUTHORIZED, EXIT_UNREACHABLE
from relayd.auth import hash_api_key
from relayd.cli import main
from relayd.config import Config
from relayd.embedded import EmbeddedRedis, free_port
from relayd.store.keys import Keys
from tests.helpers import Peer, Relayd, collect_chunks, make_config, poll_until

ADMIN_KEY = "rk_admin_cli_key_0123456789abcdef"


@pytest.fixture(autouse=True)
def no_relayd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The commands read RELAYD_* from the environment: start every test without any."""
    for name in list(os.environ):
        if name.startswith("RELAYD_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
async def admin(config_factory: Callable[..., Config]) -> AsyncIterator[Relayd]:
    async with Relayd(config_factory(auth={"admin_keys": [hash_api_key(ADMIN_KEY)]})) as server:
        yield server


async def cli(relayd: Relayd | None, *args: str, key: str = ADMIN_KEY, stdin: str | None = None) -> Result:
    """Run ``relayd ARGS`` in a thread, pointed at ``relayd`` through RELAYD_URL/RELAYD_ADMIN_KEY."""
    env = {"RELAYD_ADMIN_KEY": key}
    if relayd is not None:
        env["RELAYD_URL"] = relayd.url
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), input=stdin, env=env)


async def produce(producer: Peer, stream: str, chunks: list[Any], end: str | None = None, **fields: Any) -> None:
    assert (await producer.open(stream, **fields))["type"] == "opened"
    for seq, chunk in enumerate(chunks, start=1):
        assert (await producer.append(stream, seq, chunk))["type"] == "ack"
    if end is not None:
        assert (await producer.end(stream, end))["type"] == "ended"


async def test_ls_human_and_json_with_filters(admin: Relayd) -> None:
    """ls prints a table (id, status, chunks, bytes, age, consumers); --json the API's answer; filters apply."""
    async with await admin.producer() as producer:
        await produce(producer, "job-1", ["a", "b", "c"], end="completed")
        await produce(producer, "job-2", ["a"])
        await produce(producer, "other-1", [])

        result = await cli(admin, "streams", "ls")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["ID", "STATUS", "CHUNKS", "BYTES", "AGE", "CONSUMERS"]
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert set(rows) == {"job-1", "job-2", "other-1"}
        assert rows["job-1"][1:3] == ["completed", "3"] and rows["job-2"][1:3] == ["open", "1"]
        assert rows["job-2"][-1] == "0"

        result = await cli(admin, "streams", "ls", "--status", "open", "--prefix", "job-", "--json")
        assert result.exit_code == 0, result.output
        body = orjson.loads(result.stdout)
        assert [s["id"] for s in body["streams"]] == ["job-2"] and body["truncated"] is False

        result = await cli(admin, "streams", "ls", "--status", "ended", "--json")
        assert [s["id"] for s in orjson.loads(result.stdout)["streams"]] == ["job-1"]

        result = await cli(admin, "streams", "ls", "--limit", "1")
        assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2
        assert "more streams not shown" in result.stderr


async def test_show_human_and_json(admin: Relayd) -> None:
    """show prints the metadata as 'name: value' lines; --json gives every field."""
    async with await admin.producer() as producer:
        await produce(producer, "sh-1", ["x", "y"], content_type="text")
        await producer.end("sh-1", "error", message="model timed out")
    result = await cli(admin, "streams", "show", "sh-1")
    assert result.exit_code == 0, result.output
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["status"].strip() == "ended: error (model timed out)"
    assert fields["content type"].strip() == "text"
    assert fields["size"].strip().startswith("2 chunks, ")
    assert fields["last cursor"].strip().endswith("-0000000003")
    assert fields["consumers"].strip() == "0 on this relayd"
    result = await cli(admin, "streams", "show", "sh-1", "--json")
    body = orjson.loads(result.stdout)
    assert body["reason"] == "error" and body["chunks"] == 2 and 0 < body["ttl_s"] <= 3600


async def test_tail_prints_live_chunks_until_the_end(admin: Relayd) -> None:
    """tail (a real process): replayed and live chunks as they come, one JSON per line, then the end; exit 0."""
    async with await admin.producer() as producer:
        await produce(producer, "tl-1", [{"n": 1}])
        env = {**os.environ, "RELAYD_URL": admin.url, "RELAYD_ADMIN_KEY": ADMIN_KEY}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd.cli", "streams", "tail", "tl-1", "--from-start",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stderr is not None
            async with asyncio.timeout(20):
                assert orjson.loads(await proc.stdout.readline()) == {"n": 1}  # tail is following now
                await producer.append("tl-1", 2, {"n": 2})
                assert orjson.loads(await proc.stdout.readline()) == {"n": 2}  # live, while open
                await producer.append("tl-1", 3, "text chunk\n")
                await producer.end("tl-1", "completed")
                rest, err = await proc.communicate()
            assert proc.returncode == 0, err
            assert rest.decode() == "text chunk\n"
            assert "-- end: completed at " in err.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_tail_waits_for_a_stream_that_does_not_exist_yet(admin: Relayd) -> None:
    """tail of a stream not opened yet waits for it (--wait), as a consumer does, then follows it from its start."""
    tailing = asyncio.create_task(cli(admin, "streams", "tail", "tw-1", "--wait", "30"))

    async def waiting() -> bool:
        assert not tailing.done(), tailing.result().output
        return bool(admin.relay.subscriber_count("tw-1") == 1)

    await poll_until(waiting, "the tail's subscription")
    async with await admin.producer() as producer:
        await produce(producer, "tw-1", ["first ", "second"], end="completed")
    result = await tailing
    assert result.exit_code == 0, result.output
    assert result.stdout == "first second"
    assert "-- end: completed at " in result.stderr


async def test_tail_gives_up_after_wait_with_exit_5(admin: Relayd) -> None:
    """A stream still not there after --wait: one line on stderr, exit 5; --wait 0 fails at once."""
    for wait in ("0.2", "0"):
        result = await cli(admin, "streams", "tail", "tw-never", "--wait", wait)
        assert result.exit_code == EXIT_NOT_FOUND, result.output
        assert result.stderr == "relayd: stream tw-never does not exist\n"


async def test_tail_escapes_control_characters_on_a_terminal(admin: Relayd) -> None:
    """On a terminal (a pty), tail shows a chunk's escape sequences escaped; into a pipe they pass as they are."""
    hostile = "\x1b]0;owned\x07title \x1b[2J\x1b]52;c;Y2xpcA==\x07clip \u009b31m\u202eevil\r\n"
    async with await admin.producer() as producer:
        await produce(producer, "te-1", [hostile], content_type="text")
        await producer.end("te-1", "error", message="bad \x1b[31mred")
    env = {**os.environ, "RELAYD_URL": admin.url, "RELAYD_ADMIN_KEY": ADMIN_KEY}
    primary, secondary = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", "streams", "tail", "te-1", "--from-start",
            stdin=asyncio.subprocess.DEVNULL, stdout=secondary, stderr=secondary, env=env,
        )  # fmt: skip
        os.close(secondary)
        secondary = -1
        shown = await asyncio.wait_for(asyncio.to_thread(_read_until_closed, primary), 20)
        assert await proc.wait() == 0, shown
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert b"\x1b" not in shown and b"\x07" not in shown and "\u009b".encode() not in shown, shown
    text = shown.decode()
    assert "\\x1b]0;owned\\x07title \\x1b[2J\\x1b]52;c;Y2xpcA==\\x07clip \\x9b31m\\u202eevil\\x0d" in text
    assert "-- end: error (bad \\x1b[31mred) at " in text

    result = await cli(admin, "streams", "tail", "te-1", "--from-start")  # a pipe: the data as stored
    assert result.exit_code == 0 and result.stdout_bytes == hostile.encode()


def _read_until_closed(fd: int) -> bytes:
    """All a pty shows until its last writer closes it (Linux then answers EIO)."""
    data = b""
    while True:
        try:
            block = os.read(fd, 65536)
        except OSError:
            return data
        if not block:
            return data
        data += block


async def test_tail_json_prints_frames(admin: Relayd) -> None:
    """tail --json of an ended stream from the start: every frame as a JSON line, the end last."""
    async with await admin.producer() as producer:
        await produce(producer, "tl-2", ["a", "b"], end="cancelled", content_type="text")
    result = await cli(admin, "streams", "tail", "tl-2", "--from-start", "--json")
    assert result.exit_code == 0, result.output
    frames = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [(f["type"], f.get("data", f.get("reason"))) for f in frames] == [
        ("chunk", "a"),
        ("chunk", "b"),
        ("end", "cancelled"),
    ]


async def test_export_jsonl_and_text_complete_and_in_order(config_factory: Callable[..., Config]) -> None:
    """export (paged on the server): jsonl = every chunk frame in order then the end; text = the chunks' text."""
    config = config_factory(auth={"admin_keys": [hash_api_key(ADMIN_KEY)]}, consumer={"catchup_page": 16})
    async with Relayd(config) as server, await server.producer() as producer:
        words = [f"w{i} " for i in range(100)]
        await produce(producer, "ex-1", words, end="completed", content_type="text")
        await produce(producer, "ex-2", [{"a": 1}, "s", [2]])

        result = await cli(server, "streams", "export", "ex-1")
        assert result.exit_code == 0, result.output
        frames = [orjson.loads(line) for line in result.stdout.splitlines()]
        assert [f["data"] for f in frames[:-1]] == words
        assert frames[-1]["type"] == "end" and frames[-1]["reason"] == "completed"
        cursors = [f["cursor"] for f in frames]
        assert cursors == sorted(cursors) and len(set(cursors)) == 101

        result = await cli(server, "streams", "export", "ex-1", "--format", "text")
        assert result.exit_code == 0 and result.stdout == "".join(words)
        result = await cli(server, "streams", "export", "ex-2", "--format", "text")
        assert result.stdout == '{"a":1}\ns[2]\n'


async def test_export_reports_each_gap_on_stderr_and_exits_6(admin: Relayd, redis_server: str, key_prefix: str) -> None:
    """History gone from the log (trimmed, expired): both formats write what is stored, name each gap, exit 6."""
    async with await admin.producer() as producer:
        await produce(producer, "gap-1", ["a", "b", "c", "d", "e"], end="completed", content_type="text")
    gen = orjson.loads((await cli(admin, "streams", "show", "gap-1", "--json")).stdout)["first_cursor"][:-11]
    rds = aioredis.Redis.from_url(redis_server)
    try:
        assert (
            await rds.xtrim(Keys(key_prefix).log("gap-1"), minid=f"{gen}-3", approximate=False) == 2
        )  # as the cap trims
    finally:
        await rds.aclose()
    gap = f"-- gap: the history between {gen}-0000000000 and {gen}-0000000003 is gone (trimmed or expired)"
    exit_line = "relayd: exported gap-1 with 1 gap: part of its history is gone"

    result = await cli(admin, "streams", "export", "gap-1", "--format", "text")
    assert result.exit_code == EXIT_HISTORY_MISSING
    assert result.stdout == "cde" and result.stderr.splitlines() == [gap, exit_line]
    result = await cli(admin, "streams", "export", "gap-1")
    assert result.exit_code == EXIT_HISTORY_MISSING and result.stderr.splitlines() == [gap, exit_line]
    frames = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [f["type"] for f in frames] == ["gap", "chunk", "chunk", "chunk", "end"]


async def test_a_redirect_is_an_error_and_the_key_goes_nowhere_else(admin: Relayd) -> None:
    """A URL that redirects (to relayd itself here): not followed, so the admin key is sent only where it was aimed."""
    seen: list[str | None] = []

    async def redirect(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        raise web.HTTPTemporaryRedirect(admin.url + request.path)

    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["status", "--url", f"http://127.0.0.1:{port}", "--admin-key", ADMIN_KEY]
        )
    finally:
        await runner.cleanup()
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"relayd: relayd answered HTTP 307, a redirect to {admin.url}/v1/admin/status: not followed, "
        "so the admin key goes nowhere else; pass relayd's own URL (--url)\n"
    )
    assert seen == [f"Bearer {ADMIN_KEY}"]


async def test_end_reaches_a_live_consumer(admin: Relayd) -> None:
    """end: the live consumer gets the end frame with the reason and message; ending it again is idempotent."""
    async with await admin.producer() as producer:
        await produce(producer, "en-1", ["a"])
        consumer = await admin.consumer("en-1")
        await consumer.expect("subscribed")
        await consumer.expect("chunk")
        result = await cli(admin, "streams", "end", "en-1", "--reason", "cancelled", "--message", "ops")
        assert result.exit_code == 0, result.output
        chunks, end = await collect_chunks(consumer, "en-1")
        assert chunks == [] and end["reason"] == "cancelled" and end["message"] == "ops"
        assert result.stdout == f"ended en-1: cancelled at {end['cursor']}\n"
        assert (await producer.next())["type"] == "ended"  # the producer was told too

        result = await cli(admin, "streams", "end", "en-1", "--reason", "cancelled")
        assert result.exit_code == 0 and "already ended" in result.stdout
        result = await cli(admin, "streams", "end", "en-1", "--reason", "completed")
        assert result.exit_code == 1 and result.stderr == "relayd: stream en-1 already ended (cancelled)\n"
        await consumer.ws.close()


async def test_rm_asks_refuses_open_streams_and_forces(admin: Relayd) -> None:
    """rm asks first (--yes does not), refuses an open stream without --force, and deletes."""
    async with await admin.producer() as producer:
        await produce(producer, "rm-1", ["a"], end="completed")
        await produce(producer, "rm-2", ["a"])

        result = await cli(admin, "streams", "rm", "rm-1", stdin="n\n")
        assert result.exit_code == 1 and "not deleted" in result.stderr
        result = await cli(admin, "streams", "rm", "rm-1", stdin="y\n")
        assert result.exit_code == 0 and result.stdout == "deleted rm-1\n"
        assert (await cli(admin, "streams", "show", "rm-1")).exit_code == EXIT_NOT_FOUND

        result = await cli(admin, "streams", "rm", "rm-2", "--yes")
        assert result.exit_code == 1
        assert result.stderr == "relayd: stream rm-2 is open: end it first, or force its removal (--force)\n"
        result = await cli(admin, "streams", "rm", "rm-2", "--yes", "--force")
        assert result.exit_code == 0 and result.stdout == "deleted rm-2 (ended cancelled first)\n"


async def test_status_one_screen(admin: Relayd) -> None:
    """status: version and state, connections by role, streams, chunk totals and rates, Redis health."""
    from relayd import __version__

    async with await admin.producer() as producer:
        await produce(producer, "st-1", ["a"])
        result = await cli(admin, "status")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"relayd {__version__} at {admin.url}: serving, up ")
        assert lines[1] == "connections  producer 1, consumer_ws 0, consumer_sse 0"
        assert lines[2] == "streams      1 open (1 held here), 0 subscriptions"
        assert lines[3].startswith("chunks       1 stored (")
        assert lines[4].startswith("redis        external, ok, PING ")
        body = orjson.loads((await cli(admin, "status", "--json")).stdout)
        assert body["streams"]["open"] == 1 and body["redis"]["ok"] is True


async def test_status_exits_4_when_redis_is_down(private_redis: EmbeddedRedis, tmp_path: Path, key_prefix: str) -> None:
    """status with relayd up but its Redis down prints the summary with `DOWN` and exits 4, also with --json."""
    config = make_config(private_redis.url, key_prefix, str(tmp_path), auth={"admin_keys": [hash_api_key(ADMIN_KEY)]})
    async with Relayd(config) as server:
        assert (await cli(server, "status")).exit_code == 0
        await asyncio.to_thread(private_redis.stop)
        result = await cli(server, "status")
        assert result.exit_code == EXIT_UNREACHABLE, result.output
        assert result.stdout.splitlines()[-1].startswith("redis        external, DOWN: ")
        result = await cli(server, "status", "--json")
        assert result.exit_code == EXIT_UNREACHABLE
        assert orjson.loads(result.stdout)["redis"]["ok"] is False


@pytest.mark.parametrize(
    "args",
    [("status",), ("streams", "ls"), ("streams", "show", "s"), ("streams", "tail", "s"), ("streams", "export", "s")],
)
async def test_relayd_down_is_one_line_and_exit_4(args: tuple[str, ...]) -> None:
    """Nothing listens at the URL: one line on stderr naming it, exit code 4."""
    url = f"http://127.0.0.1:{free_port()}"
    result = await asyncio.to_thread(CliRunner().invoke, main, [*args, "--url", url, "--admin-key", ADMIN_KEY])
    assert result.exit_code == EXIT_UNREACHABLE
    assert result.stdout == ""
    assert result.stderr == f"relayd: cannot reach relayd at {url}: connection refused\n"


async def test_wrong_key_and_unknown_stream(admin: Relayd) -> None:
    """A wrong admin key exits 3, an unknown stream 5, each with one line on stderr."""
    result = await cli(admin, "status", key="rk_wrong_admin_key_0123456789")
    assert result.exit_code == EXIT_UNAUTHORIZED
    assert result.stderr == "relayd: unauthorized: invalid admin key\n"
    for args in (("show",), ("tail", "--wait", "0"), ("export",), ("end", "--reason", "completed"), ("rm", "--yes")):
        result = await cli(admin, "streams", args[0], "nope-1", *args[1:])
        assert result.exit_code == EXIT_NOT_FOUND, (args, result.output)
        assert result.stderr == "relayd: stream nope-1 does not exist\n"


async def test_finds_relayd_and_the_dev_admin_key_from_the_config(
    config_factory: Callable[..., Config], tmp_path: Path
) -> None:
    """Without --url and --admin-key: server.host/port from --config, the key from its dev-credentials."""
    async with Relayd(config_factory(auth={"api_keys": []})) as server:
        toml = tmp_path / "relay.toml"
        toml.write_text(
            f'[server]\nhost = "0.0.0.0"\nport = {server.server.port}\n\n[embedded]\ndata_dir = "{tmp_path}"\n'
        )
        result = await asyncio.to_thread(CliRunner().invoke, main, ["status", "--config", str(toml)])
        assert result.exit_code == 0, result.output
        assert f"at http://127.0.0.1:{server.server.port}: serving" in result.stdout

        (tmp_path / "empty").mkdir()
        toml.write_text(f'[server]\nport = {server.server.port}\n\n[embedded]\ndata_dir = "{tmp_path / "empty"}"\n')
        result = await asyncio.to_thread(CliRunner().invoke, main, ["status", "--config", str(toml)])
        assert result.exit_code == EXIT_UNAUTHORIZED and result.stderr.startswith("relayd: no admin key: ")


async def test_direct_mode_reads_redis_while_relayd_is_down(
    config_factory: Callable[..., Config], redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    """ls, show and export with --redis-url read the stored streams with relayd stopped; the rest need relayd."""
    async with Relayd(config_factory()) as server, await server.producer() as producer:
        await produce(producer, "d-1", ["a", "b"], end="completed", content_type="text")
        await produce(producer, "d-2", [{"x": 1}])
    toml = tmp_path / "relay.toml"
    toml.write_text(f'[redis]\nkey_prefix = "{key_prefix}"\n')
    direct = ("--config", str(toml), "--redis-url", redis_server)

    async def run(*args: str) -> Result:
        return await asyncio.to_thread(CliRunner().invoke, main, list(args))

    result = await run("streams", "ls", *direct, "--json")
    assert result.exit_code == 0, result.output
    listed = {s["id"]: s for s in orjson.loads(result.stdout)["streams"]}
    assert set(listed) == {"d-1", "d-2"} and listed["d-1"]["chunks"] == 2 and listed["d-1"]["consumers"] is None
    result = await run("streams", "ls", *direct, "--status", "open")
    assert result.exit_code == 0 and [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["d-2"]
    assert result.stdout.splitlines()[1].split()[-1] == "-"  # no relayd: consumers unknown

    result = await run("streams", "show", "d-1", *direct)
    assert result.exit_code == 0, result.output
    assert "ended: completed" in result.stdout and "unknown (read from Redis)" in result.stdout
    result = await run("streams", "export", "d-1", *direct, "--format", "text")
    assert result.exit_code == 0 and result.stdout == "ab"
    result = await run("streams", "export", "d-1", *direct)
    assert [orjson.loads(line)["type"] for line in result.stdout.splitlines()] == ["chunk", "chunk", "end"]

    result = await run("streams", "show", "nope-1", *direct)
    assert result.exit_code == EXIT_NOT_FOUND and result.stderr == "relayd: stream nope-1 does not exist\n"
    dead = f"redis://127.0.0.1:{free_port()}"
    result = await run("streams", "ls", "--config", str(toml), "--redis-url", dead)
    assert result.exit_code == EXIT_UNREACHABLE and result.stderr.startswith(f"relayd: cannot reach Redis at {dead}: ")
    assert len(result.stderr.splitlines()) == 1
    result = await run("streams", "ls", "--config", str(toml), "--direct")  # no redis.url: embedded
    assert result.exit_code == 1 and "pass --redis-url" in result.stderr
