"""``relayd streams …`` and ``relayd status``: operate a running relayd through its admin API.

Each command parses its options, finds relayd (``--url``/``RELAYD_URL``, else the config's
``server.host``/``server.port``) and the admin key (``--admin-key``/``RELAYD_ADMIN_KEY``, else
the development key in ``<embedded.data_dir>/dev-credentials``), makes one call through
:class:`~relayd.admin_client.AdminClient`, and prints a human summary, or the API's JSON with
``--json``. ``ls``, ``show`` and ``export`` can also read Redis directly (``--redis-url``,
``--direct``: :class:`~relayd.admin_direct.DirectClient`) when relayd is down. A failure is one
line on stderr and the exit code of its kind (relayd/admin_errors.py). How values print:
relayd/cli_format.py.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias, TypeVar

import click
import orjson

from relayd.admin_client import AdminClient
from relayd.admin_errors import EXIT_UNREACHABLE, AdminError, BadConfig, HistoryMissing, NotFound, Unauthorized
from relayd.cli_format import (
    escape_controls,
    gap_line,
    human_bytes,
    human_duration,
    print_json,
    table,
    when,
    write_chunk,
    write_json_line,
)
from relayd.config import Config, load_config
from relayd.errors import ConfigError

if TYPE_CHECKING:
    from relayd.admin_direct import DirectClient  # imported when used: it loads the Redis client

F = TypeVar("F", bound=Callable[..., Any])
Client: TypeAlias = "AdminClient | DirectClient"

_CONNECTION_OPTIONS = (
    click.option("--url", envvar="RELAYD_URL", help="relayd's base URL [env RELAYD_URL; default: from the config]."),
    click.option(
        "--admin-key",
        envvar="RELAYD_ADMIN_KEY",
        help="An admin key [env RELAYD_ADMIN_KEY; default: the development key in dev-credentials].",
    ),
    click.option(
        "--config",
        "-c",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="RELAYD_CONFIG",
        help="relayd's config file: where it listens, its dev-credentials, its Redis.",
    ),
)
_DIRECT_OPTIONS = (
    click.option(
        "--redis-url",
        help="Read straight from this Redis (relayd may be down), under the config's redis.key_prefix.",
    ),
    click.option("--direct", is_flag=True, help="Read the streams straight from the config's redis.url."),
)
_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer instead.")


def admin_command(*, direct: bool = False, json: bool = True) -> Callable[[F], F]:
    """Options to find relayd (and, with ``direct``, its Redis) -> a ``client`` argument.

    An :class:`AdminError` raised while connecting or running becomes one line on stderr and
    the exit code of its kind.
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def run(
            *args: Any,
            url: str | None,
            admin_key: str | None,
            config_path: Path | None,
            redis_url: str | None = None,
            direct: bool = False,
            **kwargs: Any,
        ) -> Any:
            try:
                client = connect(url, admin_key, config_path, redis_url, direct)
                return command(*args, client=client, **kwargs)
            except AdminError as exc:  # its message may quote a producer's (end message, error)
                click.echo(f"relayd: {_for_terminal(str(exc), sys.stderr)}", err=True)
                sys.exit(exc.exit_code)

        wrapped: Any = run
        options = [*_CONNECTION_OPTIONS, *(_DIRECT_OPTIONS if direct else ()), *((_JSON_OPTION,) if json else ())]
        for option in reversed(options):
            wrapped = option(wrapped)
        return wrapped  # type: ignore[no-any-return]

    return decorate


def connect(
    url: str | None, admin_key: str | None, config_path: Path | None, redis_url: str | None = None, direct: bool = False
) -> Client:
    """The client for the relayd (or, direct, the Redis) these options name (module docstring)."""
    if redis_url is not None or direct:
        config = _load(config_path)
        redis_url = redis_url or config.redis.url
        if not redis_url:
            raise AdminError(
                "--direct needs redis.url in the config (an embedded server stops with relayd): pass --redis-url"
            )
        from relayd.admin_direct import DirectClient

        return DirectClient(config, redis_url)
    if url is None or admin_key is None:
        config = _load(config_path)
        if url is None:
            url = _listen_url(config)
        if admin_key is None:
            admin_key = _dev_admin_key(config)
    if not admin_key:
        raise Unauthorized(
            "no admin key: pass --admin-key or set RELAYD_ADMIN_KEY "
            "(relayd serve in development mode writes one to <data_dir>/dev-credentials)"
        )
    return AdminClient(url, admin_key)


def _load(config_path: Path | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise BadConfig(f"bad config: {exc}") from None


def _listen_url(config: Config) -> str:
    host = config.server.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}"


def _dev_admin_key(config: Config) -> str | None:
    path = Path(config.embedded.data_dir) / "dev-credentials"
    try:
        lines = path.read_text().split()
    except OSError:
        return None
    return lines[2] if len(lines) >= 3 else None


def _admin(client: Client) -> AdminClient:
    assert isinstance(client, AdminClient)  # commands without --direct get an AdminClient
    return client


# -- relayd status --------------------------------------------------------------------------------


@click.command()
@admin_command()
def status(client: Client, as_json: bool) -> None:
    """A one-screen summary of a running relayd; exits 4 if relayd or its Redis is down."""
    st = _admin(client).status()
    if as_json:
        print_json(st)
        _exit_if_redis_down(st)
        return
    conns, chunks, redis, streams = st["connections"], st["chunks"], st["redis"], st["streams"]
    state = "DRAINING" if st["draining"] else "serving"
    click.echo(f"relayd {st['version']} at {client.url}: {state}, up {human_duration(st['uptime_s'])}")
    click.echo("connections  " + ", ".join(f"{role} {n}" for role, n in conns.items()))
    opened = "?" if streams["open"] is None else streams["open"]
    click.echo(f"streams      {opened} open ({streams['held_here']} held here), {st['subscriptions']} subscriptions")
    click.echo(
        f"chunks       {chunks['stored']} stored ({chunks['stored_per_s']}/s), "
        f"{chunks['delivered']} delivered ({chunks['delivered_per_s']}/s), rates over {chunks['window_s']:.0f}s"
    )
    health = f"ok, PING {redis['latency_ms']} ms" if redis.get("ok") else f"DOWN: {redis.get('error')}"
    click.echo(f"redis        {redis['mode']}, {health}")
    _exit_if_redis_down(st)


def _exit_if_redis_down(st: dict[str, Any]) -> None:
    # A monitoring script or health check must see a relayd that cannot store anything as down.
    if not st["redis"].get("ok"):
        sys.exit(EXIT_UNREACHABLE)


# -- relayd streams -------------------------------------------------------------------------------


@click.group()
def streams() -> None:
    """Inspect and operate streams on a running relayd (admin API), or read them from its Redis."""


@streams.command("ls")
@click.option("--status", "which", type=click.Choice(["open", "ended", "all"]), default="all", show_default=True)
@click.option("--prefix", default="", help="Only streams whose id starts with this.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@admin_command(direct=True)
def ls(which: str, prefix: str, limit: int, client: Client, as_json: bool) -> None:
    """List streams, newest first: id, status, chunks, bytes, age, consumers (on this relayd)."""
    answer = client.list_streams(which, prefix, limit)
    if as_json:
        print_json(answer)
        return
    rows = [["ID", "STATUS", "CHUNKS", "BYTES", "AGE", "CONSUMERS"]]
    rows += [
        [s["id"], s["status"], str(s["chunks"]), human_bytes(s["bytes"]), human_duration(s["age_s"]), _count(s)]
        for s in answer["streams"]
    ]
    if len(rows) == 1:
        click.echo("no streams", err=True)
    else:
        table(rows)
    if answer["truncated"]:
        click.echo("(more streams not shown: raise --limit or narrow --prefix)", err=True)


def _count(stream: dict[str, Any]) -> str:
    return "-" if stream["consumers"] is None else str(stream["consumers"])


@streams.command()
@click.argument("stream")
@admin_command(direct=True)
def show(stream: str, client: Client, as_json: bool) -> None:
    """One stream's metadata, cursors, size, TTL and consumers."""
    s = client.show(stream)
    if as_json:
        print_json(s)
        return
    status_line = s["status"] if s["reason"] is None else f"ended: {s['reason']}"
    if s["message"]:
        status_line += f" ({s['message']})"
    ttl = "none" if s["ttl_s"] < 0 else human_duration(s["ttl_s"])
    consumers = "unknown (read from Redis)" if s["consumers"] is None else f"{s['consumers']} on this relayd"
    fields = [
        ("stream", s["id"]),
        ("status", status_line),
        ("content type", s["content_type"]),
        ("epoch", f"{s['epoch']} (producer seq {s['seq']})"),
        ("created", f"{when(s['created_ms'])} ({human_duration(s['age_s'])} ago)"),
        ("updated", when(s["updated_ms"])),
        ("ended", when(s["ended_ms"])),
        ("first cursor", s["first_cursor"] or "-"),
        ("last cursor", s["last_cursor"] or "-"),
        ("size", f"{s['chunks']} chunks, {human_bytes(s['bytes'])} in Redis"),
        ("expires in", ttl),
        ("consumers", consumers),
    ]
    for name, value in fields:
        click.echo(_for_terminal(f"{name + ':':<14}{value}", sys.stdout))  # the message is the producer's


@streams.command()
@click.argument("stream")
@click.option("--from-start", is_flag=True, help="Replay the stream from its first chunk, then follow it.")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, 3600),  # the admin API's bound (wait_ms, relayd/web/admin.py)
    default=30.0,
    show_default=True,
    help="Seconds to wait for a stream that does not exist yet to be opened (0: exit 5 at once).",
)
@admin_command()
def tail(stream: str, from_start: bool, wait_s: float, client: Client, as_json: bool) -> None:
    """Print a stream's chunks as they come, until it ends.

    Strings are printed as they are, other chunks one JSON per line; gaps and the end go to
    stderr. With --json, every frame (chunk, gap, reset, end) is one JSON line on stdout. A
    stream that does not exist yet is waited for (--wait), then followed from its start, as a
    consumer would. On a terminal, control characters (escape sequences) are shown escaped.
    """
    out = sys.stdout  # click.get_text_stream is deprecated (Click 8.5) and warns
    escape = out.isatty()  # decided once: the producer's text must not drive the terminal
    for f in _admin(client).tail(stream, from_start, round(wait_s * 1000)):
        kind = f.get("type")
        if as_json and kind != "error":
            write_json_line(f, out, escape)
            out.flush()
        if kind == "chunk":
            if not as_json:
                write_chunk(f["data"], out, escape)
                out.flush()
        elif kind == "end":
            if not as_json:
                message = f" ({f['message']})" if f.get("message") else ""
                end_line = f"\n-- end: {f['reason']}{message} at {f['cursor']}"
                click.echo(_for_terminal(end_line, sys.stderr), err=True)
            return
        elif kind == "error":
            if f.get("code") == "stream_not_found":  # still not there after --wait
                raise NotFound(str(f.get("message")), "stream_not_found")
            raise AdminError(f"{f.get('code')}: {f.get('message')}", str(f.get("code")))
        elif kind == "gap" and not as_json:
            click.echo("\n" + gap_line(f), err=True)
        elif not as_json:
            click.echo(f"\n-- {kind}: {orjson.dumps(f).decode()}", err=True)
    raise AdminError("relayd closed the tail before the stream ended")


def _for_terminal(text: str, out: TextIO) -> str:
    """``text`` with control characters escaped if ``out`` is a terminal (relayd/cli_format.py)."""
    return escape_controls(text) if out.isatty() else text


@streams.command()
@click.argument("stream")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "text"]), default="jsonl", show_default=True)
@admin_command(direct=True, json=False)
def export(stream: str, fmt: str, client: Client) -> None:
    """Write the whole stream to stdout: jsonl (consumer websocket frames) or text.

    jsonl: one frame per line, chunks then the end (if ended), as a websocket consumer gets
    them; text: strings as they are, other chunks one JSON per line. A progress bar goes to
    stderr when it is a terminal. Each gap (history trimmed or expired) is also a line on
    stderr, and the exit code is then 6: everything stored was written, but not the whole
    stream.
    """
    out = sys.stdout  # click.get_text_stream is deprecated (Click 8.5) and warns
    if sys.stderr.isatty():
        total = client.show(stream)["chunks"]
        with click.progressbar(length=total, label=f"exporting {stream}", file=sys.stderr, update_min_steps=100) as bar:
            gaps = _export(client.export(stream), fmt, out, bar.update)
    else:
        gaps = _export(client.export(stream), fmt, out, lambda n: None)
    if gaps:
        raise HistoryMissing(f"exported {stream} with {gaps} gap{'s' if gaps > 1 else ''}: part of its history is gone")


def _export(frames: Iterator[dict[str, Any]], fmt: str, out: TextIO, advance: Callable[[int], None]) -> int:
    """Write the frames out up to the ``exported`` trailer; the number of gaps met."""
    gaps = 0
    escape = out.isatty()  # a terminal shows control characters escaped
    for f in frames:
        kind = f.get("type")
        if kind == "exported":
            out.flush()
            return gaps
        if kind == "error":
            raise AdminError(f"export incomplete: {f.get('code')}: {f.get('message')}", str(f.get("code")))
        if fmt == "jsonl":
            write_json_line(f, out, escape)
        elif kind == "chunk":
            write_chunk(f["data"], out, escape)
        if kind == "chunk":
            advance(1)
        elif kind == "gap":
            gaps += 1
            out.flush()
            click.echo(gap_line(f), err=True)
    raise AdminError("export incomplete: the response ended early")


@streams.command()
@click.argument("stream")
@click.option("--reason", type=click.Choice(["completed", "error", "cancelled"]), required=True, help="The end reason.")
@click.option("--message", default="", help="Why (shown to consumers; at most 1000 characters).")
@admin_command()
def end(stream: str, reason: str, message: str, client: Client, as_json: bool) -> None:
    """End an open stream as relayd would: consumers get the end, its producer is told."""
    answer = _admin(client).end(stream, reason, message)
    if as_json:
        print_json(answer)
    elif answer["result"] == "ended":
        click.echo(f"ended {stream}: {reason} at {answer['cursor']}")
    else:
        click.echo(f"{stream} had already ended: {reason}")


@streams.command()
@click.argument("stream")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Also an open stream: end it (cancelled) first, then delete it.")
@admin_command()
def rm(stream: str, yes: bool, force: bool, client: Client, as_json: bool) -> None:
    """Delete a stream and its history. An open stream only with --force."""
    if not yes and not click.confirm(f"Delete stream {stream} and its history?", err=True):
        raise AdminError("not deleted")
    try:
        answer = _admin(client).remove(stream, force)
    except AdminError as exc:
        if exc.code == "stream_open":
            raise AdminError(f"{exc} (--force)", exc.code) from None
        raise
    if as_json:
        print_json(answer)
    else:
        note = " (ended cancelled first)" if answer["ended_first"] else ""
        click.echo(f"deleted {stream}{note}")
