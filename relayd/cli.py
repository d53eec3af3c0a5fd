"""The ``relayd`` command: parse, load config, call one function, map the result to an exit code.

Exit codes (docs/operations.md, "Exit codes"): 0 done (``serve``: drained after SIGTERM), 1 a
failure at run time, 2 a usage error (click), 78 a bad config (``EX_CONFIG``: the file, a
``RELAYD_*`` variable, or a setting refused at start), and 3-6 for the admin commands
(relayd/admin_errors.py).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import click

from relayd import __version__
from relayd.admin_errors import EXIT_CONFIG
from relayd.cli_admin import status, streams
from relayd.config import Config, load_config
from relayd.errors import ConfigError, RelaydError

CONFIG_OPTION = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="RELAYD_CONFIG",
    help="TOML config file (see config/relay.example.toml).",
)


class BadConfig(click.ClickException):
    """``Error: bad config: <dotted key>: <problem>``, exit 78."""

    exit_code = EXIT_CONFIG

    def __init__(self, problem: ConfigError | str) -> None:
        super().__init__(f"bad config: {problem}")


def _load(config_path: Path | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise BadConfig(exc) from None


@click.group()
@click.version_option(__version__, prog_name="relayd")
def main() -> None:
    """relayd: durable, resumable streaming of LLM output over websockets and SSE."""


main.add_command(streams)
main.add_command(status)


@main.command()
@CONFIG_OPTION
@click.option("--host", default=None, help="Listen address (overrides server.host).")
@click.option("--port", type=int, default=None, help="Listen port (overrides server.port).")
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Processes sharing the port (overrides server.workers).",
)
def serve(config_path: Path | None, host: str | None, port: int | None, workers: int | None) -> None:
    """Run relayd (with an embedded Redis-compatible server unless redis.url is set)."""
    from relayd.logs import setup_logging
    from relayd.server import run
    from relayd.supervisor import run_workers, worker_identity

    config = _load(config_path)
    server_cfg = config.server
    if host is not None:
        server_cfg = replace(server_cfg, host=host)
    if port is not None:
        server_cfg = replace(server_cfg, port=port)
    if workers is not None:
        server_cfg = replace(server_cfg, workers=workers)
    config = config.replace(server=server_cfg)
    setup_logging(config.log)  # the warnings below in the configured log format
    for warning in config.warnings:
        logging.getLogger("relayd.config").warning("%s", warning)
    try:
        if server_cfg.workers > 1 and worker_identity() is None:
            code = run_workers(config, config_path, server_cfg.workers)
        else:
            code = run(config)
    except ConfigError as exc:  # refused at start (a key file, a secret too short for its algorithm)
        raise BadConfig(exc) from None
    except RelaydError as exc:
        error = click.ClickException(str(exc))
        error.exit_code = getattr(exc, "exit_code", 1)  # PortInUse, EmbeddedServerLost: relayd/errors.py
        raise error from None
    sys.exit(code)


@main.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--strict", is_flag=True, help="Fail (exit 78) on a warning too, e.g. an unknown RELAYD_ variable.")
def check_config(config_path: Path | None, strict: bool) -> None:
    """Validate a config file (and the RELAYD_* environment) without starting relayd."""
    config = _load(config_path)
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    if strict and config.warnings:
        raise BadConfig(f"{len(config.warnings)} warning(s), and --strict")
    mode = (
        f"external Redis at {_redact(config.redis.url)}"
        if config.redis.url
        else (f"embedded server in {config.embedded.data_dir}")
    )
    click.echo(f"config OK: listen {config.server.host}:{config.server.port}, {mode}")


@main.command("hash-key")
@click.argument("key", required=False)
def hash_key(key: str | None) -> None:
    """Print the sha256 hash of an API key for auth.api_keys (generates a key if none given)."""
    from relayd.auth import generate_api_key, hash_api_key

    if key is None:
        key = generate_api_key()
        click.echo(f"key:  {key}", err=True)
    click.echo(hash_api_key(key))


@main.group()
def token() -> None:
    """Consumer tokens (JWT)."""


@token.command("mint")
@CONFIG_OPTION
@click.option(
    "--stream",
    "streams",
    multiple=True,
    required=True,
    help="Stream id, or a prefix ending in '*'. Repeat for several.",
)
@click.option(
    "--right",
    "rights",
    multiple=True,
    type=click.Choice(["read", "cancel"]),
    default=("read",),
    show_default=True,
    help="Right to grant. Repeat for several.",
)
@click.option("--ttl", "ttl_s", type=int, default=None, help="Lifetime in seconds (default auth.token_ttl_s).")
@click.option("--sub", "subject", default=None, help="Subject claim (your user id).")
def token_mint(
    config_path: Path | None, streams: tuple[str, ...], rights: tuple[str, ...], ttl_s: int | None, subject: str | None
) -> None:
    """Mint a consumer token with the configured secret (no running relayd needed)."""
    from relayd.auth import TokenAuthority
    from relayd.server import dev_credentials_path

    config = _load(config_path)
    cfg = config.auth
    secret = cfg.jwt_secret
    if not secret and cfg.jwt_algorithm.startswith("HS"):
        path = dev_credentials_path(config)
        if not path.exists():
            raise click.ClickException(
                "no auth.jwt_secret configured and no development credentials yet: "
                "start `relayd serve` once, or set RELAYD_AUTH_JWT_SECRET"
            )
        secret = path.read_text().split()[1]
    try:
        authority = TokenAuthority(
            algorithm=cfg.jwt_algorithm,
            secret=secret,
            audience=cfg.jwt_audience,
            issuer=cfg.jwt_issuer,
            default_ttl_s=cfg.token_ttl_s,
            max_ttl_s=cfg.token_max_ttl_s,
        )
        jwt, _ = authority.mint(list(streams), list(rights), ttl_s=ttl_s, subject=subject)
    except RelaydError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(jwt)


def _redact(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


if __name__ == "__main__":  # python -m relayd.cli, same as the relayd entry point
    main()
