"""Typed configuration, parsed once.

A TOML file (every key documented in ``config/relay.example.toml``) plus environment overrides
``RELAYD_<TABLE>_<KEY>`` (``RELAYD_REDIS_URL``, ``RELAYD_BATCH_LINGER_MS``). API keys are
configured as hashes; plain keys and the JWT secret belong in the environment or in files
(``auth.jwt_secret`` in the TOML is accepted for development; ``RELAYD_AUTH_JWT_SECRET`` or
``auth.jwt_secret_file`` are meant for production).
Every problem raises :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from relayd.errors import ConfigError
from relayd.redis_url import is_cluster_url, parse_cluster_url

_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_LEVELS = ("debug", "info", "warning", "error")
# RELAYD_* variables read besides RELAYD_<TABLE>_<KEY>: plain keys (here), the config file (the
# CLI), where relayd is and its admin key (the admin commands), a producer key and the JWT secret
# (the examples), the compiled build's switch. Anything else starting with RELAYD_ is a typo: a
# warning names the closest.
OTHER_ENV_VARS = frozenset(
    {
        "RELAYD_API_KEYS",
        "RELAYD_ADMIN_KEYS",
        "RELAYD_CONFIG",
        "RELAYD_URL",
        "RELAYD_ADMIN_KEY",
        "RELAYD_API_KEY",
        "RELAYD_JWT_SECRET",
        "RELAYD_MYPYC",  # the build's, not relayd's: `RELAYD_MYPYC=1 pip install .` (setup.py)
    }
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    heartbeat_s: float = 20.0
    drain_timeout_s: float = 10.0
    allowed_origins: tuple[str, ...] = ("*",)
    workers: int = 1  # relayd processes sharing the port (`serve --workers N`); 1: this process serves
    header_timeout_s: float = 10.0  # a new connection's request head (a websocket's handshake)
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection, between requests

    def check(self) -> None:
        _range("server.port", self.port, 0, 65535)
        _range("server.workers", self.workers, 1, 256)
        _positive("server.heartbeat_s", self.heartbeat_s)
        _positive("server.drain_timeout_s", self.drain_timeout_s)
        _positive("server.header_timeout_s", self.header_timeout_s)
        _positive("server.keepalive_timeout_s", self.keepalive_timeout_s)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = ""  # empty: start the embedded server
    key_prefix: str = "relayd"
    timeout_ms: int = 5000
    retry_ms: int = 5000
    max_connections: int = 64  # read connections (catch-ups, replays, admin); more requests wait
    # Publish every write on the stream's pub/sub channel so other relayd instances on this Redis
    # deliver it live. Off only when exactly one relayd process ever uses this Redis.
    notify: bool = True

    @property
    def cluster(self) -> bool:
        """``url`` names a Redis/Valkey Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
        return is_cluster_url(self.url)

    def check(self) -> None:
        if is_cluster_url(self.url):
            try:
                parse_cluster_url(self.url)
            except ValueError as exc:
                raise ConfigError("redis.url", str(exc)) from None
        elif self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                "redis.url",
                "must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://, "
                f"got {self.url!r}",
            )
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", self.key_prefix):
            raise ConfigError("redis.key_prefix", "must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        _positive("redis.timeout_ms", self.timeout_ms)
        _range("redis.retry_ms", self.retry_ms, 0, 600_000)
        _range("redis.max_connections", self.max_connections, 1, 10_000)


@dataclass(frozen=True, slots=True)
class EmbeddedConfig:
    data_dir: str = "relayd-data"
    appendfsync: str = "everysec"
    maxmemory: str = ""
    start_timeout_s: float = 10.0

    def check(self) -> None:
        if self.appendfsync not in ("always", "everysec", "no"):
            raise ConfigError("embedded.appendfsync", f"must be always, everysec or no, got {self.appendfsync!r}")
        _positive("embedded.start_timeout_s", self.start_timeout_s)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    api_keys: tuple[str, ...] = ()  # sha256:<hex> hashes only
    api_keys_file: str = ""
    jwt_secret: str = field(default="", repr=False)
    jwt_secret_file: str = ""
    jwt_algorithm: str = "HS256"
    jwt_public_key_file: str = ""
    jwt_audience: str = "relayd"
    jwt_issuer: str = ""
    token_ttl_s: int = 300
    token_max_ttl_s: int = 3600
    admin_keys: tuple[str, ...] = ()  # sha256:<hex> hashes of keys for /v1/admin (relayd streams, status)
    api_key_streams: tuple[str, ...] = ()  # "sha256:<hex> tenant-a/* other": the streams that key may use
    max_failures: int = 30  # failed credential attempts per client address in a burst (0: no limit)
    failure_window_s: float = 60.0  # ... and max_failures more per this many seconds

    def check(self) -> None:
        _check_hashes("auth.admin_keys", self.admin_keys, "RELAYD_ADMIN_KEYS")
        _check_hashes("auth.api_keys", self.api_keys, "RELAYD_API_KEYS or auth.api_keys_file")
        if self.jwt_algorithm not in ("HS256", "HS384", "HS512", "RS256", "ES256"):
            raise ConfigError(
                "auth.jwt_algorithm", f"must be HS256, HS384, HS512, RS256 or ES256, got {self.jwt_algorithm!r}"
            )
        if self.jwt_algorithm[:2] != "HS" and not self.jwt_public_key_file:
            raise ConfigError("auth.jwt_public_key_file", f"is required with {self.jwt_algorithm}")
        _positive("auth.token_ttl_s", self.token_ttl_s)
        _positive("auth.token_max_ttl_s", self.token_max_ttl_s)
        if self.token_ttl_s > self.token_max_ttl_s:
            raise ConfigError("auth.token_ttl_s", "must not exceed auth.token_max_ttl_s")
        _range("auth.max_failures", self.max_failures, 0, 1_000_000)
        _positive("auth.failure_window_s", self.failure_window_s)


@dataclass(frozen=True, slots=True)
class BatchConfig:
    linger_ms: float = 0.0
    max_ops: int = 2000
    max_bytes: int = 4 * 1024 * 1024
    max_inflight: int = 2

    def check(self) -> None:
        _range("batch.linger_ms", self.linger_ms, 0, 1000)
        _positive("batch.max_ops", self.max_ops)
        _positive("batch.max_bytes", self.max_bytes)
        _range("batch.max_inflight", self.max_inflight, 1, 64)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_frame_bytes: int = 1024 * 1024
    max_chunk_bytes: int = 256 * 1024
    max_unacked_bytes: int = 1024 * 1024
    max_producer_backlog_bytes: int = 16 * 1024 * 1024  # all producer connections together
    max_consumer_backlog_bytes: int = 64 * 1024 * 1024  # all consumer queues together
    max_streams_per_connection: int = 1000
    max_connections: int = 0  # TCP connections in total; 0: what the file descriptor limit allows
    max_producer_connections: int = 0  # 0: only max_connections applies
    max_consumer_ws_connections: int = 0
    max_sse_connections: int = 0

    def check(self) -> None:
        for key in ("max_connections", "max_producer_connections", "max_consumer_ws_connections"):
            _range(f"limits.{key}", getattr(self, key), 0, 10_000_000)
        _range("limits.max_sse_connections", self.max_sse_connections, 0, 10_000_000)
        _positive("limits.max_frame_bytes", self.max_frame_bytes)
        _positive("limits.max_chunk_bytes", self.max_chunk_bytes)
        if self.max_chunk_bytes > self.max_frame_bytes:
            raise ConfigError("limits.max_chunk_bytes", "must not exceed limits.max_frame_bytes")
        _positive("limits.max_unacked_bytes", self.max_unacked_bytes)
        _positive("limits.max_producer_backlog_bytes", self.max_producer_backlog_bytes)
        _positive("limits.max_consumer_backlog_bytes", self.max_consumer_backlog_bytes)
        _positive("limits.max_streams_per_connection", self.max_streams_per_connection)


@dataclass(frozen=True, slots=True)
class StreamsConfig:
    max_chunks: int = 100_000
    ttl_after_end_s: int = 3600
    open_ttl_s: int = 86_400
    producer_timeout_ms: int = 30_000
    wait_timeout_ms: int = 30_000
    cancel_grace_ms: int = 5000

    def check(self) -> None:
        _positive("streams.max_chunks", self.max_chunks)
        _positive("streams.ttl_after_end_s", self.ttl_after_end_s)
        _positive("streams.open_ttl_s", self.open_ttl_s)
        _positive("streams.producer_timeout_ms", self.producer_timeout_ms)
        if self.open_ttl_s * 1000 < self.producer_timeout_ms:
            # a held stream's retention is refreshed every producer_timeout_ms / 3, not per append
            raise ConfigError("streams.open_ttl_s", "must be at least streams.producer_timeout_ms (in seconds)")
        _range("streams.wait_timeout_ms", self.wait_timeout_ms, 0, 3_600_000)
        _range("streams.cancel_grace_ms", self.cancel_grace_ms, 0, 600_000)


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    max_queue_bytes: int = 256 * 1024
    send_timeout_ms: int = 10_000
    catchup_page: int = 500
    sse_keepalive_s: float = 15.0
    # GET /v1/streams/{id}/whole: the largest stream it answers (413 beyond), and the default and
    # cap of its wait_ms (how long it waits for the stream's end).
    whole_max_bytes: int = 8 * 1024 * 1024
    whole_wait_ms: int = 60_000

    def check(self) -> None:
        _positive("consumer.whole_max_bytes", self.whole_max_bytes)
        _range("consumer.whole_wait_ms", self.whole_wait_ms, 0, 3_600_000)
        _positive("consumer.max_queue_bytes", self.max_queue_bytes)
        _positive("consumer.send_timeout_ms", self.send_timeout_ms)
        _range("consumer.catchup_page", self.catchup_page, 1, 10_000)
        _positive("consumer.sse_keepalive_s", self.sse_keepalive_s)


@dataclass(frozen=True, slots=True)
class DurableConfig:
    """The Durable Streams HTTP protocol, mounted at ``base_path`` (docs/protocol.md)."""

    enabled: bool = False
    base_path: str = "/ds"  # streams at <base_path>/v1/stream/<stream id>
    auth: str = "keys"  # keys: writes take an API key, reads an API key or a read token; none: open
    long_poll_timeout_ms: int = 20_000  # a long-poll at the tail answers 204 after this
    sse_max_s: float = 60.0  # an SSE response ends after this (clients resume from their offset)
    read_max_bytes: int = 1024 * 1024  # data in one catch-up or long-poll response (one entry at least)
    # Stream-TTL of a stream created without Stream-TTL or Stream-Expires-At (0: none, kept until DELETE)
    default_ttl_s: int = 0

    def check(self) -> None:
        path = self.base_path
        if path and (not path.startswith("/") or path.endswith("/") or "{" in path or "}" in path):
            raise ConfigError("durable.base_path", f"must start with '/' and not end with one, got {path!r}")
        if self.auth not in ("keys", "none"):
            raise ConfigError("durable.auth", f"must be keys or none, got {self.auth!r}")
        _range("durable.long_poll_timeout_ms", self.long_poll_timeout_ms, 1, 3_600_000)
        _positive("durable.sse_max_s", self.sse_max_s)
        _positive("durable.read_max_bytes", self.read_max_bytes)
        _range("durable.default_ttl_s", self.default_ttl_s, 0, 10 * 365 * 86_400)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "text"

    def check(self) -> None:
        if self.level not in _LEVELS:
            raise ConfigError("log.level", f"must be one of {', '.join(_LEVELS)}, got {self.level!r}")
        if self.format not in ("text", "json", "logfmt"):
            raise ConfigError("log.format", f"must be text, json or logfmt, got {self.format!r}")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    consumer: ConsumerConfig = field(default_factory=ConsumerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    durable: DurableConfig = field(default_factory=DurableConfig)
    # Plain API keys from RELAYD_API_KEYS or auth.api_keys_file; resolved once, never logged.
    api_key_secrets: tuple[str, ...] = field(default=(), repr=False)
    # Plain admin keys from RELAYD_ADMIN_KEYS; resolved once, never logged.
    admin_key_secrets: tuple[str, ...] = field(default=(), repr=False)
    # What was accepted but is probably a mistake (an unknown RELAYD_ variable): serve logs
    # each line as a warning, check-config prints them.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def embedded_redis(self) -> bool:
        return not self.redis.url

    def replace(self, **tables: Any) -> Config:
        """Return a copy with some tables replaced (``cfg.replace(server=...)``)."""
        return dataclasses.replace(self, **tables)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (optional), apply ``RELAYD_*`` overrides from ``env``, validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    return build_config(raw, env)


def build_config(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    tables: dict[str, Any] = {}
    known = _tables()
    for name in raw:
        if name not in known:
            raise ConfigError(name, f"unknown table (known: {', '.join(known)})")
    for name, cls in known.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(name, "must be a table")
        tables[name] = _build_table(name, cls, section, env)
    secrets = _key_secrets("auth.api_keys", "API", env, "RELAYD_API_KEYS", tables["auth"].api_keys_file)
    if tables["auth"].api_key_streams:
        # Its entries name keys by hash: checked here, against every key source, so check-config
        # reports a typo. Imported here: the rest of config needs nothing from auth (or pyjwt).
        from relayd.auth import ApiKeys

        ApiKeys(tables["auth"].api_keys, secrets, tables["auth"].api_key_streams)
    jwt_secret = _jwt_secret(tables["auth"], env)
    tables["auth"] = dataclasses.replace(tables["auth"], jwt_secret=jwt_secret)
    for table in tables.values():
        table.check()
    check_jwt_key(tables["auth"], has_api_keys=bool(tables["auth"].api_keys or secrets))
    admin_secrets = _key_secrets("auth.admin_keys", "admin", env, "RELAYD_ADMIN_KEYS")
    return Config(**tables, api_key_secrets=secrets, admin_key_secrets=admin_secrets, warnings=_unknown_env(env))


def _tables() -> dict[str, Any]:
    """The TOML tables: Config's fields that hold a table dataclass, by name -> that class."""
    fields = dataclasses.fields(Config)
    return {f.name: f.default_factory for f in fields if f.default_factory is not dataclasses.MISSING}


def env_var_names() -> frozenset[str]:
    """Every RELAYD_* variable relayd or its commands read: one per config key, and the others."""
    names = {
        f"RELAYD_{table.upper()}_{fld.name.upper()}"
        for table, cls in _tables().items()
        for fld in dataclasses.fields(cls)
    }
    return frozenset(names) | OTHER_ENV_VARS


def _unknown_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """A warning per RELAYD_* variable nothing reads (``RELAYD_SERVER_PROT``), naming the closest known one."""
    known = env_var_names()
    warnings = []
    for name in sorted(n for n in env if n.startswith("RELAYD_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}?" if close else "settings are RELAYD_<TABLE>_<KEY> (config/relay.example.toml)"
        warnings.append(f"{name} is not a relayd setting and is ignored: {hint}")
    return tuple(warnings)


def _build_table(name: str, cls: Any, section: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in section:
        if key not in names:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for key in names:
        dotted = f"{name}.{key}"
        env_name = f"RELAYD_{name.upper()}_{key.upper()}"
        if env_name in env:
            values[key] = _from_env(dotted, env_name, env[env_name], hints[key])
        elif key in section:
            values[key] = _coerce(dotted, section[key], hints[key])
    return cls(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, got {value!r}")
        return tuple(value)
    if origin in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    return value


def _from_env(key: str, env_name: str, text: str, hint: Any) -> Any:
    if get_origin(hint) is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        raise ConfigError(key, f"{env_name} must be a number, got {text!r}") from None
    if hint is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(key, f"{env_name} must be true or false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    return text


def _check_hashes(key: str, hashes: tuple[str, ...], plain_keys_go: str) -> None:
    """Keys in the config file are hashes only: a plain key there would sit in a file as is."""
    for i, value in enumerate(hashes):
        if not _HASH_RE.match(value):
            raise ConfigError(
                f"{key}[{i}]",
                "must be a hash 'sha256:<64 hex>' (make one with `relayd hash-key`); "
                f"put plain keys in {plain_keys_go}",
            )


def _key_secrets(key: str, kind: str, env: Mapping[str, str], env_var: str, path: str = "") -> tuple[str, ...]:
    """Plain keys (or hashes) from the env (comma-separated) and a file ``<key>_file`` (one a line)."""
    keys = [k.strip() for k in env.get(env_var, "").split(",") if k.strip()]
    if path:
        text = _read_secret_file(f"{key}_file", path)
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for value in keys:
        if len(value) < 16 and not value.startswith("sha256:"):
            raise ConfigError(key, f"plain {kind} keys must be at least 16 characters")
    return tuple(keys)


def _jwt_secret(auth: AuthConfig, env: Mapping[str, str]) -> str:
    if auth.jwt_secret_file:
        secret = _read_secret_file("auth.jwt_secret_file", auth.jwt_secret_file).strip()
        if len(secret) < 32:  # empty would silently fall back to the development secret
            raise ConfigError("auth.jwt_secret_file", "must hold a secret of at least 32 characters")
        return secret
    secret = auth.jwt_secret
    if secret and len(secret) < 32:
        raise ConfigError("auth.jwt_secret", "must be at least 32 characters")
    return secret


def check_jwt_key(auth: AuthConfig, *, has_api_keys: bool) -> None:
    """Configured API keys mean a real deployment: its tokens need a configured key to check.

    Without one relayd would sign and verify with the random development secret of its data dir,
    so each instance would have its own and tokens minted by the app's backend would all fail.
    """
    if has_api_keys and auth.jwt_algorithm.startswith("HS") and not auth.jwt_secret:
        raise ConfigError(
            "auth.jwt_secret",
            "is required once API keys are configured: set RELAYD_AUTH_JWT_SECRET or auth.jwt_secret_file "
            "to the secret your backend signs tokens with (the development secret in "
            "<embedded.data_dir>/dev-credentials is used only when no API key is configured)",
        )


def _read_secret_file(key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value}")
