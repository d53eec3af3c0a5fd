"""Run relayd: embedded Redis (if needed) -> store -> relay -> HTTP; drain in reverse order.

``Server`` is the in-process lifecycle (used by ``relayd serve`` and by the tests);
``run`` adds uvloop and signal handling for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from relayd.auth import ApiKeys, TokenAuthority, generate_api_key
from relayd.config import Config
from relayd.embedded import EmbeddedRedis
from relayd.errors import RelaydError
from relayd.logs import setup_logging
from relayd.metrics import Metrics
from relayd.relay import Relay
from relayd.store.redis_streams import Store
from relayd.web.app import build_app, drain_connections
from relayd.web.gate import GATE, ConnectionGate, GatedSite, fd_limit, max_connections
from relayd.web.keys import Runtime

log = logging.getLogger("relayd.server")


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.embedded: EmbeddedRedis | None = None
        self.store: Store | None = None
        self.relay: Relay | None = None
        self.runtime: Runtime | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.dev_api_key: str | None = None
        self.dev_admin_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.server.host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
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
        metrics = Metrics()
        self.store = Store(cfg.redis, cfg.streams, redis_url)
        await self.store.start()
        self.relay = Relay(cfg, self.store, metrics)
        await self.relay.start()
        api_keys, tokens = self._credentials()
        self.runtime = Runtime(
            config=cfg,
            relay=self.relay,
            metrics=metrics,
            api_keys=api_keys,
            tokens=tokens,
            admin_keys=self._admin_keys(),
        )
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
        site = GatedSite(self._runner, cfg.server.host, cfg.server.port, gate)
        try:
            await site.start()
        except OSError as exc:
            raise RelaydError(f"cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}") from None
        server = site._server
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("relayd listening on %s max_connections=%d", self.url, gate.total)

    def _credentials(self) -> tuple[ApiKeys, TokenAuthority]:
        cfg = self.config.auth
        api_keys = ApiKeys(self.config.auth.api_keys, self.config.api_key_secrets)
        secret = cfg.jwt_secret
        if not api_keys or (cfg.jwt_algorithm.startswith("HS") and not secret):
            dev_key, dev_secret = _dev_credentials(Path(self.config.embedded.data_dir))
            if not api_keys:
                api_keys = ApiKeys(secrets=[dev_key])
                self.dev_api_key = dev_key
                log.warning(
                    "no API key configured: using the development key in %s/dev-credentials",
                    self.config.embedded.data_dir,
                )
            if not secret:
                secret = dev_secret
                log.warning(
                    "no auth.jwt_secret configured: using the development secret in %s/dev-credentials",
                    self.config.embedded.data_dir,
                )
        public_key = Path(cfg.jwt_public_key_file).read_text() if cfg.jwt_public_key_file else ""
        tokens = TokenAuthority(
            algorithm=cfg.jwt_algorithm,
            secret=secret,
            public_key=public_key,
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
        if self._runner is not None:
            # Drain while still listening: /readyz answers 503 draining and /metrics stays
            # scrapeable for the whole drain; new websocket/SSE requests get 503 shutting_down.
            await drain_connections(self._runner.app)
            await self._runner.cleanup()  # closes the listener; on_shutdown finds the drain done
            self._runner = None
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None


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
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.stop()


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
