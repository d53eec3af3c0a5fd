"""``relayd serve --workers N``: N relayd processes on one machine, one port, one Redis.

The parent does not serve. It starts the embedded Redis-compatible server when ``redis.url`` is
not set (one for all workers: they are instances of one deployment, see docs/operations.md,
"Scaling out"), makes the development credentials once so every worker shares them, picks the
port when it is 0, and starts N workers (``relayd serve`` processes with ``RELAYD_WORKER``
set). Each worker listens on the same port with SO_REUSEPORT, so the kernel spreads connections
across them; across workers, streams are served through the broker exactly as across machines.

It restarts a worker that dies (after a short back-off; if workers keep dying — more than
``_MAX_RESTARTS`` within ``_RESTART_WINDOW_S`` — it stops them all and exits 1 so the service
manager acts), and on SIGTERM/SIGINT forwards SIGTERM to every worker for a graceful drain,
waits for them (``server.drain_timeout_s`` plus a margin, then SIGKILL), and exits 0.

Metrics: every worker answers ``/metrics`` with the samples of all workers, each labelled
``worker="<i>"`` (relayd/web/ops.py gathers them over a private unix socket per worker), so a
scrape through the shared port sees the whole process group whichever worker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from relayd.config import Config
from relayd.embedded import EmbeddedRedis, supervise
from relayd.errors import EXIT_EMBEDDED_LOST
from relayd.logs import setup_logging

log = logging.getLogger("relayd.supervisor")

WORKER_ENV = "RELAYD_WORKER"  # "<index>/<count>/<run dir>" in a worker's environment
_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 60.0
_RESTART_DELAY_S = 0.5


def worker_identity() -> tuple[int, int, Path] | None:
    """In a worker: (index, count, run dir); None in a plain ``relayd serve``."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, count, run_dir = value.split("/", 2)
    return int(index), int(count), Path(run_dir)


def metrics_socket(run_dir: Path, index: int) -> Path:
    """Where worker ``index`` answers for its own metrics."""
    return run_dir / f"worker-{index}.sock"


def run_workers(config: Config, config_path: Path | None, workers: int) -> int:
    """Supervise ``workers`` relayd processes until SIGTERM/SIGINT. Returns the exit code."""
    setup_logging(config.log)
    return asyncio.run(_Supervisor(config, config_path, workers).run())


class _Supervisor:
    def __init__(self, config: Config, config_path: Path | None, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.count = workers
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()
        self.restarts: list[float] = []
        self.exit_code = 0

    async def run(self) -> int:
        cfg = self.config
        embedded: EmbeddedRedis | None = None
        env = dict(os.environ)
        run_dir = Path(tempfile.mkdtemp(prefix="relayd-workers-"))
        holder: socket.socket | None = None
        watch: asyncio.Task[None] | None = None
        try:
            if not cfg.redis.url:
                embedded = EmbeddedRedis(
                    Path(cfg.embedded.data_dir),
                    appendfsync=cfg.embedded.appendfsync,
                    maxmemory=cfg.embedded.maxmemory,
                    start_timeout_s=cfg.embedded.start_timeout_s,
                )
                env["RELAYD_REDIS_URL"] = await asyncio.to_thread(embedded.start)
                log.info("embedded Redis-compatible server started for %d workers", self.count)
                watch = asyncio.create_task(self._watch(embedded), name="relayd-embedded-supervisor")
            self._shared_credentials()
            port = cfg.server.port
            if port == 0:  # one port for all: pick it here, held (not listening) until the workers bind
                holder = _reuse_port_socket(cfg.server.host, 0)
                port = holder.getsockname()[1]
            self.argv = [sys.executable, "-m", "relayd.cli", "serve", "--host", cfg.server.host, "--port", str(port)]
            if self.config_path is not None:
                self.argv += ["--config", str(self.config_path)]
            self.env, self.run_dir = env, run_dir
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
            print(f"relayd: {self.count} workers on {cfg.server.host}:{port}", file=sys.stderr, flush=True)
            watchers = [asyncio.create_task(self._keep(i)) for i in range(self.count)]
            await self.stopping.wait()
            await self._stop_all()
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            if holder is not None:
                holder.close()
            if watch is not None:
                watch.cancel()  # before the stop, which it would take for a crash
                await asyncio.wait((watch,))
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
            shutil.rmtree(run_dir, ignore_errors=True)
        return self.exit_code

    async def _watch(self, embedded: EmbeddedRedis) -> None:
        """Restart the shared embedded server as a single relayd would; if it cannot be, stop all."""
        try:
            await supervise(embedded)
        except Exception as exc:  # EmbeddedServerLost: logged by supervise
            log.critical("stopping relayd: %s", exc)
            self.exit_code = EXIT_EMBEDDED_LOST
            self.stopping.set()

    def _shared_credentials(self) -> None:
        """Development credentials made once, here: N workers racing to create them would disagree."""
        from relayd.server import Server

        Server(self.config).prepare_credentials()

    async def _keep(self, index: int) -> None:
        """Run worker ``index``; restart it when it dies, until stopping."""
        while not self.stopping.is_set():
            env = {**self.env, WORKER_ENV: f"{index}/{self.count}/{self.run_dir}"}
            proc = await asyncio.create_subprocess_exec(*self.argv, env=env)
            self.procs[index] = proc
            log.info("worker %d started pid=%d", index, proc.pid)
            if self.stopping.is_set():  # the stop came while this worker was starting: it drains too
                proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            if self.stopping.is_set():
                return
            log.error("worker %d (pid %d) exited with status %d; restarting", index, proc.pid, code)
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < _RESTART_WINDOW_S] + [now]
            if len(self.restarts) > _MAX_RESTARTS:
                log.error("workers died %d times within %.0f s: stopping relayd", len(self.restarts), _RESTART_WINDOW_S)
                self.exit_code = 1
                self.stopping.set()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RESTART_DELAY_S):
                    await self.stopping.wait()  # a back-off that a stop request cuts short

    async def _stop_all(self) -> None:
        """SIGTERM to every worker (each drains), then wait; SIGKILL what outlives the drain."""
        live = [p for p in self.procs.values() if p.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.config.server.drain_timeout_s + 5):
                await asyncio.gather(*(p.wait() for p in live))
        except TimeoutError:
            for proc in live:
                if proc.returncode is None:
                    log.error("worker pid=%d did not stop in time: killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in live))


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
