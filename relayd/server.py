"""Run relayd: embedded Redis (if needed) -> store -> relay -> HTTP; drain in reverse order.

``Server`` is the in-process lifecycle (used by ``relayd serve`` and by the tests);
``run`` adds uvloop and signal handling for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import secrets
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from relayd.auth import ApiKeys, TokenAuthority, generate_api_key
from relayd.broker import Broker, LocalBroker
from relayd.config import Config, check_jwt_key
from relayd.embedded import EmbeddedRedis, supervise
from relayd.errors import ConfigError, PortInUse, RelaydError
from relayd.logs import setup_logging
from relayd.metrics import Metrics
from relayd.relay import Relay
from relayd.store.broker import RedisBroker
from relayd.store.redis_streams import RedisStore
from relayd.supervisor import metrics_socket, worker_identity
from relayd.web.app import build_app, drain_connections
from relayd.web.gate import GATE, ConnectionGate, GatedSite, fd_limit, max_connections
from relayd.web.keys import Runtime

log = logging.getLogger("relayd.server")


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.embedded: EmbeddedRedis | None = None
        self.store: RedisStore | None = None
        self.relay: Relay | None = None
        self.runtime: Runtime | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.dev_api_key: str | None = None
        self.dev_admin_key: str | None = None
        self._metrics_runner: web.AppRunner | None = None
        # Watches the embedded server; fails with EmbeddedServerLost when it cannot be restarted.
        self.supervisor: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []  # bound and listening, not yet handed to aiohttp

    @property
    def url(self) -> str:
        return f"http://{self.config.server.host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        # The port first: a port in use is reported before anything is started or written.
        # A worker of `serve --workers N` shares the port with its siblings (the kernel spreads connections).
        self._sockets = _listen_sockets(cfg.server.host, cfg.server.port, reuse_port=worker_identity() is not None)
        api_keys, tokens = self._credentials()
        admin_keys = self._admin_keys()
        redis_url = cfg.redis.url
        if not redis_url:
            self.embedded = EmbeddedRedis(
                Path(cfg.embedded.data_dir),
                appendfsync=cfg.embedded.appendfsync,
                maxmemory=cfg.embedded.maxmemory,
                start_timeout_s=cfg.embedded.start_timeout_s,
            )
            redis_url = await asyncio.to_thread(self.embedded.start)
            log.info("embedded Redis-compatible server started data_dir=%s", cfg.embedded.data_dir)
            self.supervisor = asyncio.create_task(supervise(self.embedded), name="relayd-embedded-supervisor")
        metrics = Metrics()
        instance = secrets.token_hex(6)  # this process in the notifications its writes publish
        self.store = RedisStore(cfg, redis_url, metrics, instance=instance)
        await self.store.start()
        broker: Broker = LocalBroker()
        if cfg.redis.notify:
            broker = RedisBroker(
                self.store.keys,
                redis_url,
                instance,
                self.store.publish,
                metrics,
                follow=self.store.follow,
                peek=self.store.peek,
                sharded=self.store.cluster,  # on a cluster: SSUBSCRIBE on the master of each stream's slot
                timeout_s=cfg.redis.timeout_ms / 1000,
            )
        self.relay = Relay(cfg, self.store, metrics, broker)
        await self.relay.start()
        self.runtime = Runtime(
            config=cfg,
            relay=self.relay,
            metrics=metrics,
            api_keys=api_keys,
            tokens=tokens,
            admin_keys=admin_keys,
        )
        worker = worker_identity()
        if worker is not None:
            self.runtime.worker = worker
            await self._serve_own_metrics(metrics, metrics_socket(worker[2], worker[0]))
        app = build_app(self.runtime)
        gate = ConnectionGate(cfg, metrics, max_connections(cfg, fd_limit()))
        app[GATE] = gate
        app.middlewares.append(gate.middleware)
        metrics.connection_limits(gate.total, gate.tcp_connections)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=cfg.server.drain_timeout_s,
            keepalive_timeout=cfg.server.keepalive_timeout_s,
        )
        await self._runner.setup()
        sockets, self._sockets = self._sockets, []
        for sock in sockets:  # bound first thing in start(): a port in use stops relayd before anything runs
            await GatedSite(self._runner, sock, gate).start()
        self.port = sockets[0].getsockname()[1]
        log.info("relayd listening on %s max_connections=%d", self.url, gate.total)

    async def _serve_own_metrics(self, metrics: Metrics, path: Path) -> None:
        """A worker's own samples, on a private unix socket: its siblings merge them into /metrics."""

        async def own(request: web.Request) -> web.Response:
            return web.Response(body=metrics.render())

        app = web.Application()
        app.router.add_get("/metrics", own)
        self._metrics_runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._metrics_runner.setup()
        await asyncio.to_thread(path.unlink, missing_ok=True)  # left by a previous run of this worker index
        await web.UnixSite(self._metrics_runner, str(path)).start()

    def prepare_credentials(self) -> None:
        """Make the development credentials now if relayd would use them (``serve --workers``)."""
        self._credentials()
        self._admin_keys()

    def _credentials(self) -> tuple[ApiKeys, TokenAuthority]:
        """API keys and the token authority; development credentials only with no API key configured."""
        cfg = self.config.auth
        api_keys = ApiKeys(self.config.auth.api_keys, self.config.api_key_secrets, self.config.auth.api_key_streams)
        check_jwt_key(cfg, has_api_keys=bool(api_keys))  # load_config checked; a Config built by hand too
        secret = cfg.jwt_secret
        if not api_keys:
            dev_key, dev_secret = _dev_credentials(Path(self.config.embedded.data_dir))
            api_keys = ApiKeys(secrets=[dev_key])
            self.dev_api_key = dev_key
            log.warning(
                "no API key configured: using the development key in %s/dev-credentials",
                self.config.embedded.data_dir,
            )
            if not secret and cfg.jwt_algorithm.startswith("HS"):
                secret = dev_secret
                log.warning(
                    "no auth.jwt_secret configured: using the development secret in %s/dev-credentials",
                    self.config.embedded.data_dir,
                )
        tokens = TokenAuthority(
            algorithm=cfg.jwt_algorithm,
            secret=secret,
            public_key=_public_key(cfg.jwt_public_key_file),
            audience=cfg.jwt_audience,
            issuer=cfg.jwt_issuer,
            default_ttl_s=cfg.token_ttl_s,
            max_ttl_s=cfg.token_max_ttl_s,
        )
        return api_keys, tokens

    def _admin_keys(self) -> ApiKeys:
        """Configured admin keys; else, when relayd runs on development credentials, the dev admin key."""
        admin_keys = ApiKeys(self.config.auth.admin_keys, self.config.admin_key_secrets)
        if not admin_keys and self.dev_api_key is not None:
            self.dev_admin_key = dev_admin_key(Path(self.config.embedded.data_dir))
            admin_keys = ApiKeys(secrets=[self.dev_admin_key])
        return admin_keys

    async def stop(self) -> None:
        """Ordered drain: stop accepting, flush producers, tell clients to reconnect, release."""
        for sock in self._sockets:  # start() failed before listening
            sock.close()
        self._sockets = []
        if self.supervisor is not None:
            # First: the embedded server's shutdown below must not be taken for a crash.
            self.supervisor.cancel()
            await asyncio.wait((self.supervisor,))
        if self._runner is not None:
            # Drain while still listening: /readyz answers 503 draining and /metrics stays
            # scrapeable for the whole drain; new websocket/SSE requests get 503 shutting_down.
            await drain_connections(self._runner.app)
            await self._runner.cleanup()  # closes the listener; on_shutdown finds the drain done
            self._runner = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None


def _listen_sockets(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bind and listen on ``host:port`` (every address it resolves to), as aiohttp would.

    Done first thing at start, so a port in use stops relayd before it starts the embedded server
    or writes credentials, and nothing can take the port between the check and the use.
    """
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RelaydError(f"cannot listen on {where}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            if port == 0 and sockets:  # every address on the one port the first got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp: rebind during TIME_WAIT
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # "::" and "0.0.0.0" both bound
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"cannot listen on {where}: address already in use (another process listens there; "
                "stop it, or set another server.port or --port)"
            ) from None
        raise RelaydError(f"cannot listen on {where}: {exc.strerror}") from None
    return sockets


def _public_key(path: str) -> str:
    """The PEM text of ``auth.jwt_public_key_file`` ("" when not set); unreadable or empty is an error."""
    if not path:
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("auth.jwt_public_key_file", f"cannot read {path}: {exc.strerror}") from None
    if not text.strip():
        raise ConfigError("auth.jwt_public_key_file", f"{path} is empty")
    return text


def _dev_credentials(data_dir: Path) -> tuple[str, str]:
    """A development API key and JWT secret, made once and kept in the data dir (mode 0600)."""
    path = data_dir / "dev-credentials"
    if path.exists():
        lines = path.read_text().split()
        if len(lines) >= 2:  # a third line is the development admin key (dev_admin_key)
            return lines[0], lines[1]
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, secret = generate_api_key(), generate_api_key() + generate_api_key()
    path.touch(mode=0o600)
    path.write_text(f"{key}\n{secret}\n")
    return key, secret


def dev_admin_key(data_dir: Path) -> str:
    """The development admin key: the third line of dev-credentials, added if the file has two."""
    path = data_dir / "dev-credentials"
    lines = path.read_text().split()
    if len(lines) >= 3:
        return lines[2]
    key = generate_api_key()
    path.write_text("".join(f"{line}\n" for line in (*lines[:2], key)))
    return key


def dev_credentials_path(config: Config) -> Path:
    return Path(config.embedded.data_dir) / "dev-credentials"


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running server.

    Everything allocated at startup (modules, config, app) is moved out of the collector's sight
    with ``gc.freeze``, and the young-generation threshold is raised: the relay allocates a few
    short-lived objects per chunk, and at the default threshold (700) the collector ran every
    few hundred chunks and cost up to a fifth of the CPU under load (benchmarks/RESULTS.md).
    Reference cycles are still collected, just less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def serve(config: Config, stop: asyncio.Event) -> None:
    server = Server(config)
    try:
        await server.start()
        tune_gc()
        if server.dev_api_key is not None:
            print(f"relayd: development API key: {server.dev_api_key}", file=sys.stderr, flush=True)
        print(f"relayd: listening on {server.url}", file=sys.stderr, flush=True)
        await _until_stopped(stop, server.supervisor)
        log.info("shutting down")
    finally:
        await server.stop()


async def _until_stopped(stop: asyncio.Event, supervisor: asyncio.Task[None] | None) -> None:
    """Wait for ``stop``; raise EmbeddedServerLost (after a log line) if the embedded server is lost first."""
    if supervisor is None:
        await stop.wait()
        return
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((stopping, supervisor), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if supervisor.done() and not supervisor.cancelled():
        error = supervisor.exception()
        if error is not None:
            log.critical("%s: shutting down with exit status %s", error, getattr(error, "exit_code", 1))
            raise error


def run(config: Config) -> int:
    """Serve until SIGTERM/SIGINT, then drain. Returns the process exit code."""
    setup_logging(config.log)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0
