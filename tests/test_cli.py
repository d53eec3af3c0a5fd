"""The ``relayd`` command: check-config, hash-key and token mint through click's CliRunner; serve as a real process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from click.testing import CliRunner, Result

from relayd.admin_errors import EXIT_CONFIG
from relayd.auth import TokenAuthority, hash_api_key
from relayd.cli import main
from relayd.embedded import PIDFILE_NAME, SOCKET_NAME
from tests.helpers import read_rest, relayd_executable

SECRET = "cli-test-secret-0123456789abcdef-0123456789"
DRAIN_TIMEOUT_S = 5.0


@pytest.fixture(autouse=True)
def no_relayd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The commands read RELAYD_* from the environment: start every test without any."""
    for name in list(os.environ):
        if name.startswith("RELAYD_"):
            monkeypatch.delenv(name)
    yield


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- check-config ---------------------------------------------------------------------------------


def test_check_config_ok_external_redis_redacts_the_password(tmp_path: Path) -> None:
    """A valid file with redis.url: exit 0 and one line naming the listen address, the password redacted."""
    config = write_toml(
        tmp_path / "relayd.toml",
        '[server]\nhost = "0.0.0.0"\nport = 9999\n\n[redis]\nurl = "redis://user:hunter2@db.internal:6379/0"\n',
    )
    result = run("check-config", str(config))
    assert result.exit_code == 0, result.output
    assert result.stdout == "config OK: listen 0.0.0.0:9999, external Redis at redis://***@db.internal:6379/0\n"
    assert "hunter2" not in result.output


def test_check_config_ok_embedded_and_defaults(tmp_path: Path) -> None:
    """Without redis.url the embedded server and its data dir are reported; no file at all means the defaults."""
    config = write_toml(tmp_path / "relayd.toml", f'[embedded]\ndata_dir = "{tmp_path / "data"}"\n')
    result = run("check-config", str(config))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"config OK: listen 127.0.0.1:8080, embedded server in {tmp_path / 'data'}\n"
    result = run("check-config")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("config OK: listen 127.0.0.1:8080, embedded server in ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = "eighty"\n', "server.port"),
        ("[limits]\nmax_chunk_bytes = 2048\nmax_frame_bytes = 1024\n", "limits.max_chunk_bytes"),
        ("[streams]\nproducer_timeout = 5\n", "streams.producer_timeout"),
        ("[nope]\nx = 1\n", "nope"),
        ('[auth]\napi_keys = ["rk_plain_key_0123456789abcdef"]\n', "auth.api_keys[0]"),
        ("[server\nport = 1\n", "--config"),
    ],
)
def test_check_config_bad_file_fails_with_one_line_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    """An invalid file: non-zero exit, nothing on stdout, one line on stderr naming the key."""
    config = write_toml(tmp_path / "relayd.toml", text)
    result = run("check-config", str(config))
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and "bad config" in lines[0]
    assert "rk_plain_key" not in result.stderr


def test_check_config_missing_file_and_env_override(tmp_path: Path) -> None:
    """A missing file names --config; RELAYD_* variables are applied (and validated) like the file's values."""
    result = run("check-config", str(tmp_path / "absent.toml"))
    assert result.exit_code != 0 and "--config" in result.stderr and "absent.toml" in result.stderr
    result = run("check-config", env={"RELAYD_SERVER_PORT": "7777"})
    assert result.exit_code == 0 and "listen 127.0.0.1:7777" in result.stdout
    result = run("check-config", env={"RELAYD_SERVER_PORT": "seven"})
    assert result.exit_code != 0 and "server.port" in result.stderr and "RELAYD_SERVER_PORT" in result.stderr


def test_check_config_reports_an_unknown_relayd_variable(tmp_path: Path) -> None:
    """A mistyped RELAYD_* variable is a warning naming the closest key; with --strict it fails (exit 78)."""
    env = {"RELAYD_SERVER_PROT": "9000"}
    result = run("check-config", env=env)
    assert result.exit_code == 0
    assert result.stdout == "config OK: listen 127.0.0.1:8080, embedded server in relayd-data\n"
    assert result.stderr == (
        "warning: RELAYD_SERVER_PROT is not a relayd setting and is ignored: did you mean RELAYD_SERVER_PORT?\n"
    )
    result = run("check-config", "--strict", env=env)
    assert result.exit_code == EXIT_CONFIG
    assert result.stderr.endswith("Error: bad config: 1 warning(s), and --strict\n")
    assert run("check-config", "--strict", env={"RELAYD_SERVER_PORT": "9000"}).exit_code == 0


@pytest.mark.parametrize(
    "args",
    [("check-config",), ("serve",), ("token", "mint", "--stream", "s"), ("status",), ("streams", "ls")],
)
def test_a_bad_config_exits_78_apart_from_failures_at_run_time(args: tuple[str, ...]) -> None:
    """Every command refuses a bad config with exit code 78 (EX_CONFIG), not 1 like a failure at run time."""
    result = run(*args, env={"RELAYD_SERVER_PORT": "eighty"})
    assert result.exit_code == EXIT_CONFIG, result.output
    assert result.stderr.strip().endswith("bad config: server.port: RELAYD_SERVER_PORT must be a number, got 'eighty'")


def test_a_setting_refused_at_start_exits_78(tmp_path: Path) -> None:
    """A config that loads but is refused when relayd starts (an HS512 secret under 64 bytes) is a config error too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    env |= {"RELAYD_AUTH_JWT_ALGORITHM": "HS512", "RELAYD_AUTH_JWT_SECRET": "s" * 40}
    env |= {"RELAYD_API_KEYS": "rk_0123456789abcdef", "RELAYD_EMBEDDED_APPENDFSYNC": "no"}
    done = subprocess.run(
        [sys.executable, "-m", "relayd", "serve", "--port", "0"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "Error: bad config: auth.jwt_secret: " in done.stderr


def test_python_dash_m_relayd_is_the_relayd_command(tmp_path: Path) -> None:
    """``python -m relayd`` runs the same command as the relayd console script, named relayd in its help."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    env["PYTHONPATH"] = str(Path(__file__).parent.parent)
    done = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "config OK: listen 127.0.0.1:8080, embedded server in relayd-data\n"
    done = subprocess.run([sys.executable, "-m", "relayd", "--help"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("Usage: relayd [OPTIONS] COMMAND [ARGS]...")


# -- hash-key -----------------------------------------------------------------------------------


def test_hash_key_of_a_given_key() -> None:
    """``hash-key KEY`` prints exactly the sha256 hash auth.api_keys takes."""
    result = run("hash-key", "rk_my_producer_key_0123456789")
    assert result.exit_code == 0
    assert result.stdout == hash_api_key("rk_my_producer_key_0123456789") + "\n"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", result.stdout)


def test_hash_key_generates_a_key_when_none_is_given() -> None:
    """Without a key, a new one is shown on stderr and its hash printed on stdout."""
    result = run("hash-key")
    assert result.exit_code == 0
    match = re.fullmatch(r"key:\s+(rk_\S+)\n", result.stderr)
    assert match is not None, result.stderr
    assert result.stdout == hash_api_key(match.group(1)) + "\n"
    assert run("hash-key").stderr != result.stderr  # a fresh key every time


# -- token mint ----------------------------------------------------------------------------------


def mint_config(tmp_path: Path, extra: str = "") -> Path:
    return write_toml(
        tmp_path / "relayd.toml",
        f'[embedded]\ndata_dir = "{tmp_path / "data"}"\n\n[auth]\njwt_secret = "{SECRET}"\n'
        f"token_ttl_s = 120\ntoken_max_ttl_s = 600\n{extra}",
    )


def test_token_mint_claims(tmp_path: Path) -> None:
    """``token mint`` signs with auth.jwt_secret; the claims are the streams, rights, sub and ttl asked for."""
    config = mint_config(tmp_path)
    result = run(
        "token", "mint", "--config", str(config), "--stream", "chat-42", "--stream", "user-7/*",
        "--right", "read", "--right", "cancel", "--ttl", "90", "--sub", "user-7",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="relayd")
    assert claims["streams"] == ["chat-42", "user-7/*"]
    assert claims["rights"] == ["read", "cancel"]
    assert claims["sub"] == "user-7" and claims["aud"] == "relayd"
    assert claims["exp"] - claims["iat"] == 90
    principal = TokenAuthority(secret=SECRET).verify(token)  # what relayd checks
    assert principal.allows("user-7/chat-1", "cancel") and not principal.allows("chat-43")


def test_token_mint_defaults_and_ttl_cap(tmp_path: Path) -> None:
    """Rights default to read and ttl to auth.token_ttl_s; a ttl above auth.token_max_ttl_s is capped."""
    config = mint_config(tmp_path)
    result = run("token", "mint", "--config", str(config), "--stream", "s")
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"], audience="relayd")
    assert claims["rights"] == ["read"] and claims["exp"] - claims["iat"] == 120 and "sub" not in claims
    result = run("token", "mint", "--config", str(config), "--stream", "s", "--ttl", "99999")
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"], audience="relayd")
    assert claims["exp"] - claims["iat"] == 600


def test_token_mint_refusals(tmp_path: Path) -> None:
    """Bad input or no secret: non-zero exit with a message, and no token on stdout."""
    config = mint_config(tmp_path)
    result = run("token", "mint", "--config", str(config), "--stream", "bad id")
    assert result.exit_code != 0 and result.stdout == "" and "streams[0]" in result.stderr
    result = run("token", "mint", "--config", str(config), "--stream", "s", "--right", "write")
    assert result.exit_code != 0 and result.stdout == ""
    result = run("token", "mint", "--config", str(config))  # --stream is required
    assert result.exit_code != 0 and "--stream" in result.stderr
    bare = write_toml(tmp_path / "bare.toml", f'[embedded]\ndata_dir = "{tmp_path / "empty"}"\n')
    result = run("token", "mint", "--config", str(bare), "--stream", "s")
    assert result.exit_code != 0 and result.stdout == "" and "RELAYD_AUTH_JWT_SECRET" in result.stderr
    # the secret may come from the environment instead
    result = run("token", "mint", "--config", str(bare), "--stream", "s", env={"RELAYD_AUTH_JWT_SECRET": SECRET})
    assert result.exit_code == 0, result.output
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"], audience="relayd")["streams"] == ["s"]


# -- serve, as a real process ------------------------------------------------------------------------


async def test_serve_on_port_0_with_embedded_redis_then_sigterm(tmp_path: Path) -> None:
    """``relayd serve --port 0`` prints its port, is ready with its embedded server, and exits 0 on SIGTERM."""
    data_dir = tmp_path / "data"
    config = write_toml(
        tmp_path / "relayd.toml",
        f'[server]\nhost = "127.0.0.1"\ndrain_timeout_s = {DRAIN_TIMEOUT_S}\n\n'
        f'[embedded]\ndata_dir = "{data_dir}"\nappendfsync = "no"\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    env["RELAYD_SERVER_PROT"] = "9000"  # a typo: warned about, and the port stays --port's
    proc = await asyncio.create_subprocess_exec(
        relayd_executable(), "serve", "--config", str(config), "--port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr: list[str] = []
    try:
        url = None
        async with asyncio.timeout(30):
            while url is None:
                line = (await proc.stderr.readline()).decode()
                assert line, f"relayd exited early ({await proc.wait()}): {''.join(stderr)}"
                stderr.append(line)
                match = re.match(r"relayd: listening on (http://127\.0\.0\.1:(\d+))$", line.strip())
                if match:
                    url = match.group(1)
                    assert int(match.group(2)) != 0
        # keep reading stderr so the process never blocks on a full pipe
        drain = asyncio.create_task(read_rest(proc.stderr, stderr))
        assert any(line.startswith("relayd: development API key: rk_") for line in stderr), stderr
        typo = "WARNING relayd.config: RELAYD_SERVER_PROT is not a relayd setting and is ignored: did you mean"
        assert typo in stderr[0], stderr
        async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"status": "ready"}
        assert (data_dir / PIDFILE_NAME).exists()  # the embedded server runs in the data dir

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), DRAIN_TIMEOUT_S + 5)
        await drain
        assert code == 0, "".join(stderr)
        assert not (data_dir / PIDFILE_NAME).exists() and not (data_dir / SOCKET_NAME).exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
