"""Configuration: defaults, validation errors naming the dotted key, RELAYD_* overrides, secret files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from relayd.auth import hash_api_key
from relayd.config import (
    AuthConfig,
    BatchConfig,
    Config,
    ConsumerConfig,
    DurableConfig,
    EmbeddedConfig,
    LimitsConfig,
    LogConfig,
    RedisConfig,
    ServerConfig,
    StreamsConfig,
    build_config,
    env_var_names,
    load_config,
)
from relayd.errors import ConfigError

SECRET = "a-jwt-secret-that-is-long-enough-0123456789"
WITH_SECRET = {"RELAYD_AUTH_JWT_SECRET": SECRET}  # API keys need a configured JWT secret


def refused(raw: dict[str, Any], env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        build_config(raw, env or {})
    return exc.value


def test_defaults() -> None:
    """An empty config gives the documented defaults: embedded Redis, port 8080, every table at its defaults."""
    config = build_config({}, {})
    assert config == Config()
    assert config.embedded_redis and config.redis.url == ""
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.allowed_origins == ("*",)
    assert config.redis.key_prefix == "relayd"
    assert config.auth.api_keys == () and config.api_key_secrets == ()
    assert config.auth.jwt_algorithm == "HS256" and config.auth.jwt_audience == "relayd"
    assert (config.auth.token_ttl_s, config.auth.token_max_ttl_s) == (300, 3600)
    assert config.limits.max_frame_bytes == 1024 * 1024 and config.limits.max_chunk_bytes == 256 * 1024
    assert config.streams.producer_timeout_ms == 30_000 and config.streams.cancel_grace_ms == 5000
    assert config.consumer.sse_keepalive_s == 15.0
    assert config.log == LogConfig()
    assert not config.durable.enabled and config.durable.auth == "keys" and config.durable.base_path == "/ds"
    for table in (
        ServerConfig(),
        RedisConfig(),
        EmbeddedConfig(),
        AuthConfig(),
        BatchConfig(),
        LimitsConfig(),
        StreamsConfig(),
        ConsumerConfig(),
        LogConfig(),
        DurableConfig(),
    ):
        table.check()  # the defaults are valid


def test_values_are_read_and_ints_widen_to_floats() -> None:
    """Values from the raw tables land in the typed config; an integer is accepted for a float key."""
    config = build_config(
        {
            "server": {"port": 9000, "heartbeat_s": 5, "allowed_origins": ["https://a.example"]},
            "redis": {"url": "redis://localhost:6379/0", "key_prefix": "app:relay"},
            "batch": {"linger_ms": 2.5},
        },
        {},
    )
    assert config.server.port == 9000
    assert config.server.heartbeat_s == 5.0 and isinstance(config.server.heartbeat_s, float)
    assert config.server.allowed_origins == ("https://a.example",)
    assert not config.embedded_redis and config.redis.key_prefix == "app:relay"
    assert config.batch.linger_ms == 2.5


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"server": {"port": "8080"}}, "server.port"),
        ({"server": {"port": True}}, "server.port"),
        ({"server": {"port": 8080.0}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"port": -1}}, "server.port"),
        ({"server": {"heartbeat_s": 0}}, "server.heartbeat_s"),
        ({"server": {"heartbeat_s": "20"}}, "server.heartbeat_s"),
        ({"server": {"drain_timeout_s": -1.0}}, "server.drain_timeout_s"),
        ({"server": {"host": 127}}, "server.host"),
        ({"server": {"allowed_origins": "*"}}, "server.allowed_origins"),
        ({"server": {"allowed_origins": [1]}}, "server.allowed_origins"),
        ({"redis": {"url": "http://localhost:6379"}}, "redis.url"),
        ({"redis": {"url": "redis+cluster://a:7000,b:port"}}, "redis.url"),
        ({"redis": {"url": "redis+cluster://a:7000/2"}}, "redis.url"),
        ({"redis": {"key_prefix": "has space"}}, "redis.key_prefix"),
        ({"redis": {"key_prefix": ""}}, "redis.key_prefix"),
        ({"redis": {"timeout_ms": 0}}, "redis.timeout_ms"),
        ({"redis": {"retry_ms": 600_001}}, "redis.retry_ms"),
        ({"embedded": {"appendfsync": "sometimes"}}, "embedded.appendfsync"),
        ({"embedded": {"start_timeout_s": 0}}, "embedded.start_timeout_s"),
        ({"auth": {"jwt_algorithm": "none"}}, "auth.jwt_algorithm"),
        ({"auth": {"jwt_algorithm": "RS256"}}, "auth.jwt_public_key_file"),
        ({"auth": {"token_ttl_s": 0}}, "auth.token_ttl_s"),
        ({"auth": {"token_ttl_s": 7200}}, "auth.token_ttl_s"),
        ({"auth": {"token_max_ttl_s": -1}}, "auth.token_max_ttl_s"),
        ({"auth": {"jwt_secret": "short"}}, "auth.jwt_secret"),
        ({"auth": {"api_keys": "sha256:abc"}}, "auth.api_keys"),
        ({"batch": {"linger_ms": 1001}}, "batch.linger_ms"),
        ({"batch": {"max_ops": 0}}, "batch.max_ops"),
        ({"batch": {"max_bytes": 0}}, "batch.max_bytes"),
        ({"batch": {"max_inflight": 65}}, "batch.max_inflight"),
        ({"limits": {"max_frame_bytes": 0}}, "limits.max_frame_bytes"),
        ({"limits": {"max_frame_bytes": 1000, "max_chunk_bytes": 2000}}, "limits.max_chunk_bytes"),
        ({"limits": {"max_unacked_bytes": 0}}, "limits.max_unacked_bytes"),
        ({"limits": {"max_streams_per_connection": 0}}, "limits.max_streams_per_connection"),
        ({"streams": {"max_chunks": 0}}, "streams.max_chunks"),
        ({"streams": {"ttl_after_end_s": 0}}, "streams.ttl_after_end_s"),
        ({"streams": {"open_ttl_s": -1}}, "streams.open_ttl_s"),
        ({"streams": {"producer_timeout_ms": 0}}, "streams.producer_timeout_ms"),
        ({"streams": {"wait_timeout_ms": -1}}, "streams.wait_timeout_ms"),
        ({"streams": {"cancel_grace_ms": 600_001}}, "streams.cancel_grace_ms"),
        ({"consumer": {"max_queue_bytes": 0}}, "consumer.max_queue_bytes"),
        ({"consumer": {"send_timeout_ms": 0}}, "consumer.send_timeout_ms"),
        ({"consumer": {"catchup_page": 10_001}}, "consumer.catchup_page"),
        ({"consumer": {"sse_keepalive_s": 0}}, "consumer.sse_keepalive_s"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"log": {"format": "xml"}}, "log.format"),
        ({"durable": {"base_path": "ds"}}, "durable.base_path"),
        ({"durable": {"base_path": "/ds/"}}, "durable.base_path"),
        ({"durable": {"auth": "open"}}, "durable.auth"),
        ({"durable": {"long_poll_timeout_ms": 0}}, "durable.long_poll_timeout_ms"),
        ({"durable": {"sse_max_s": 0}}, "durable.sse_max_s"),
        ({"durable": {"enabled": "yes"}}, "durable.enabled"),
        ({"bogus": {}}, "bogus"),
        ({"server": {"prot": 80}}, "server.prot"),
        ({"server": 8080}, "server"),
    ],
)
def test_every_validation_error_names_the_dotted_key(raw: dict[str, Any], key: str) -> None:
    """A bad type, an out-of-range value or an unknown table/key raises ConfigError naming that key."""
    error = refused(raw)
    assert error.key == key
    assert str(error).startswith(f"{key}: ") and error.problem


def test_unknown_key_lists_the_known_ones() -> None:
    """An unknown key's message lists the table's real keys (a typo is easy to spot)."""
    error = refused({"streams": {"producer_timeout": 5}})
    assert error.key == "streams.producer_timeout"
    assert "producer_timeout_ms" in error.problem


def test_plain_api_key_in_the_config_is_refused() -> None:
    """``auth.api_keys`` takes hashes only; a plain key is refused, naming its index and where plain keys go."""
    good = hash_api_key("a-good-key-0123456789")
    error = refused({"auth": {"api_keys": [good, "rk_plain_key_0123456789abcdef"]}})
    assert error.key == "auth.api_keys[1]"
    assert "RELAYD_API_KEYS" in error.problem and "rk_plain_key" not in str(error)
    assert build_config({"auth": {"api_keys": [good]}}, WITH_SECRET).auth.api_keys == (good,)


def test_env_overrides_toml_values() -> None:
    """``RELAYD_<TABLE>_<KEY>`` overrides the file, converted to the key's type."""
    env = {
        "RELAYD_SERVER_PORT": "9100",
        "RELAYD_SERVER_HEARTBEAT_S": "2.5",
        "RELAYD_REDIS_URL": "redis://cache:6379/1",
        "RELAYD_BATCH_LINGER_MS": "1",
        "RELAYD_LOG_LEVEL": "debug",
    }
    config = build_config({"server": {"port": 8000}, "log": {"level": "info"}}, env)
    assert config.server.port == 9100
    assert config.server.heartbeat_s == 2.5
    assert config.redis.url == "redis://cache:6379/1" and not config.embedded_redis
    assert config.batch.linger_ms == 1.0
    assert config.log.level == "debug"


def test_a_cluster_url_names_seed_nodes() -> None:
    """``redis+cluster://`` (and ``rediss+cluster://``) with seed nodes: a cluster, not embedded."""
    for url in ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", "rediss+cluster://:secret@db:7000"):
        config = build_config({"redis": {"url": url}}, env={})
        assert config.redis.cluster and not config.embedded_redis
    assert not build_config({"redis": {"url": "redis://db:6379"}}, env={}).redis.cluster


def test_env_override_of_a_list_splits_on_commas() -> None:
    """A list key from the environment is comma-separated; blanks are dropped."""
    env = {"RELAYD_SERVER_ALLOWED_ORIGINS": " https://a.example, https://b.example ,,"}
    config = build_config({"server": {"allowed_origins": ["https://c.example"]}}, env)
    assert config.server.allowed_origins == ("https://a.example", "https://b.example")
    hashes = [hash_api_key("k1-0123456789abcdef"), hash_api_key("k2-0123456789abcdef")]
    config = build_config({}, {"RELAYD_AUTH_API_KEYS": ",".join(hashes), **WITH_SECRET})
    assert config.auth.api_keys == tuple(hashes)


@pytest.mark.parametrize(
    ("name", "value", "key", "names_variable"),
    [
        ("RELAYD_SERVER_PORT", "eighty", "server.port", True),
        ("RELAYD_SERVER_PORT", "80.5", "server.port", True),
        ("RELAYD_SERVER_PORT", "", "server.port", True),
        ("RELAYD_BATCH_LINGER_MS", "fast", "batch.linger_ms", True),
        ("RELAYD_SERVER_PORT", "70000", "server.port", False),
        ("RELAYD_BATCH_LINGER_MS", "nan", "batch.linger_ms", False),
        ("RELAYD_LOG_LEVEL", "loud", "log.level", False),
        ("RELAYD_AUTH_API_KEYS", "plain-key-0123456789", "auth.api_keys[0]", False),
    ],
)
def test_bad_env_values_name_the_key(name: str, value: str, key: str, names_variable: bool) -> None:
    """A bad RELAYD_* value raises ConfigError naming the dotted key; an unparsable number also names the variable."""
    error = refused({}, {name: value})
    assert error.key == key
    if names_variable:
        assert name in error.problem


def test_an_unknown_relayd_variable_is_a_warning_naming_the_closest_key() -> None:
    """A RELAYD_* variable nothing reads is ignored with a warning that names the closest known variable."""
    config = build_config({}, {"RELAYD_SERVER_PROT": "9000", "RELAYD_BATCH_LINGER": "1", "RELAYD_NOTHING_LIKE_IT": "x"})
    assert config.server.port == 8080
    assert config.warnings == (
        "RELAYD_BATCH_LINGER is not a relayd setting and is ignored: did you mean RELAYD_BATCH_LINGER_MS?",
        "RELAYD_NOTHING_LIKE_IT is not a relayd setting and is ignored: "
        "settings are RELAYD_<TABLE>_<KEY> (config/relay.example.toml)",
        "RELAYD_SERVER_PROT is not a relayd setting and is ignored: did you mean RELAYD_SERVER_PORT?",
    )


def test_every_variable_relayd_reads_is_known() -> None:
    """Every config key's variable, and the ones the commands and examples read, give no warning."""
    env = dict.fromkeys(env_var_names(), "")
    assert {"RELAYD_SERVER_PORT", "RELAYD_AUTH_JWT_SECRET", "RELAYD_API_KEYS", "RELAYD_CONFIG"} <= env.keys()
    assert {"RELAYD_URL", "RELAYD_ADMIN_KEY", "RELAYD_API_KEY", "RELAYD_JWT_SECRET"} <= env.keys()
    assert build_config({}, {"RELAYD_SERVER_PORT": "1", "RELAYD_API_KEY": "x", "OTHER": "y"}).warnings == ()


def test_every_variable_the_docs_name_is_known() -> None:
    """A RELAYD_* variable named in the docs, examples or deploy files is one relayd reads (no doc typos)."""
    root = Path(__file__).parent.parent
    files = [root / "README.md", *root.glob("docs/*.md"), *root.glob("examples/*.py"), *root.glob("deploy/**/*")]
    named = {m for f in files if f.is_file() for m in re.findall(r"RELAYD_[A-Z0-9_]*[A-Z0-9]", f.read_text())}
    typo = {"RELAYD_SERVER_PROT"}  # the docs' example of a mistyped variable
    assert named and named - typo <= env_var_names(), named - typo - env_var_names()


def test_jwt_secret_from_env_and_its_length_check() -> None:
    """``RELAYD_AUTH_JWT_SECRET`` sets the secret; a short one is refused naming auth.jwt_secret."""
    assert build_config({}, {"RELAYD_AUTH_JWT_SECRET": SECRET}).auth.jwt_secret == SECRET
    assert refused({}, {"RELAYD_AUTH_JWT_SECRET": "tiny"}).key == "auth.jwt_secret"


def test_jwt_secret_file_is_read(tmp_path: Path) -> None:
    """``auth.jwt_secret_file`` is read (trailing newline stripped); a missing file names the key."""
    path = tmp_path / "jwt-secret"
    path.write_text(SECRET + "\n")
    config = build_config({"auth": {"jwt_secret_file": str(path)}}, {})
    assert config.auth.jwt_secret == SECRET
    assert SECRET not in repr(config)  # secrets never show in a repr (logs)
    error = refused({"auth": {"jwt_secret_file": str(tmp_path / "missing")}})
    assert error.key == "auth.jwt_secret_file" and "missing" in error.problem


@pytest.mark.parametrize("content", ["", "\n", "too-short-secret\n"], ids=["empty", "blank", "short"])
def test_jwt_secret_file_with_a_short_secret_is_refused(tmp_path: Path, content: str) -> None:
    """A secret file holding an empty or short secret is refused like a short auth.jwt_secret, naming the file key."""
    path = tmp_path / "jwt-secret"
    path.write_text(content)
    error = refused({"auth": {"jwt_secret_file": str(path)}})
    assert error.key == "auth.jwt_secret_file"


def test_api_keys_file_is_read(tmp_path: Path) -> None:
    """``auth.api_keys_file`` holds plain keys or hashes, one a line; comments and blanks are skipped."""
    hashed = hash_api_key("hashed-key-0123456789")
    path = tmp_path / "keys"
    path.write_text(f"# producer keys\nplain-key-one-0123456789\n\n  plain-key-two-0123456789  \n{hashed}\n")
    config = build_config({"auth": {"api_keys_file": str(path)}}, WITH_SECRET)
    assert config.api_key_secrets == ("plain-key-one-0123456789", "plain-key-two-0123456789", hashed)
    assert "plain-key-one" not in repr(config)
    path.write_text("short\n")
    assert refused({"auth": {"api_keys_file": str(path)}}).key == "auth.api_keys"
    assert refused({"auth": {"api_keys_file": str(tmp_path / "nope")}}).key == "auth.api_keys_file"


def test_relayd_api_keys_env(tmp_path: Path) -> None:
    """``RELAYD_API_KEYS`` adds comma-separated plain keys, before those of the file; short keys are refused."""
    path = tmp_path / "keys"
    path.write_text("from-file-key-0123456789\n")
    env = {"RELAYD_API_KEYS": "env-key-one-0123456789, env-key-two-0123456789", **WITH_SECRET}
    config = build_config({"auth": {"api_keys_file": str(path)}}, env)
    assert config.api_key_secrets == ("env-key-one-0123456789", "env-key-two-0123456789", "from-file-key-0123456789")
    error = refused({}, {"RELAYD_API_KEYS": "ok-key-0123456789abc,short"})
    assert error.key == "auth.api_keys" and "short" not in error.problem


def test_load_config_reads_toml_and_applies_env(tmp_path: Path) -> None:
    """``load_config`` reads a TOML file, applies the given environment, and names --config for file problems."""
    path = tmp_path / "relayd.toml"
    path.write_text('[server]\nport = 8181\n\n[redis]\nurl = "redis://db:6379"\n')
    config = load_config(path, env={"RELAYD_SERVER_HOST": "0.0.0.0"})
    assert (config.server.host, config.server.port, config.redis.url) == ("0.0.0.0", 8181, "redis://db:6379")
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "absent.toml", env={})
    assert missing.value.key == "--config"
    path.write_text("[server\nport = ")
    with pytest.raises(ConfigError) as invalid:
        load_config(path, env={})
    assert invalid.value.key == "--config" and "TOML" in invalid.value.problem
    path.write_text('[server]\nport = "80"\n')
    with pytest.raises(ConfigError) as bad:
        load_config(path, env={})
    assert bad.value.key == "server.port"


@pytest.mark.parametrize(
    ("raw", "env"),
    [
        ({"auth": {"api_keys": [hash_api_key("a-good-key-0123456789")]}}, {}),
        ({}, {"RELAYD_API_KEYS": "env-key-one-0123456789"}),
    ],
    ids=["hashes-in-file", "plain-keys-in-env"],
)
def test_api_keys_without_a_jwt_secret_are_refused(raw: dict[str, Any], env: dict[str, str]) -> None:
    """Configured API keys with no JWT secret are an error naming auth.jwt_secret, not the development secret."""
    error = refused(raw, env)
    assert error.key == "auth.jwt_secret"
    assert "RELAYD_AUTH_JWT_SECRET" in error.problem and "API keys" in error.problem
    assert build_config(raw, {**env, **WITH_SECRET}).auth.jwt_secret == SECRET


def test_no_api_key_and_no_jwt_secret_is_the_development_start() -> None:
    """Without API keys a missing secret is fine: relayd starts on its development credentials."""
    assert build_config({}, {}).auth.jwt_secret == ""
