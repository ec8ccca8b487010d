"""Running fileproxy: under gunicorn (serve, the deployment) or as one process (dev)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web
from gunicorn.app.base import Application
from gunicorn.arbiter import Arbiter

from fileproxy.app import build_runner, configure_logging, gunicorn_app
from fileproxy.config import Config, activate
from fileproxy.loops import loop_factory
from fileproxy.server.listeners import LISTEN_BACKLOG, tcp_address
from fileproxy.server.tls import reload_certificate, server_context
from fileproxy.upstream.sockets import SocketOptions

# gunicorn's settings and hooks: a module of the package, so an installed `fileproxy serve` needs
# no file (the checkout's gunicorn.conf.py star-imports it for a plain `gunicorn -c`).
GUNICORN_SETTINGS = "python:fileproxy.server.gunicorn_settings"


class GunicornServer(Application):
    """gunicorn with fileproxy.server.gunicorn_settings, which reads the activated Config (not
    gunicorn's argv); it is imported once, when gunicorn first loads its settings (after activate)."""

    def load_config(self) -> None:
        self.load_config_from_module_name_or_filename(GUNICORN_SETTINGS)

    def init(self, parser: object, opts: object, args: object) -> None:
        """Unused: settings come from GUNICORN_SETTINGS, never from gunicorn's own argv."""

    # gunicorn's stubs know WSGI and ASGI apps only; aiohttp's gunicorn worker takes this factory.
    def load(self) -> Callable[[], Awaitable[web.AppRunner]]:  # type: ignore[override]
        return gunicorn_app

    def run(self) -> None:
        """As gunicorn's BaseApplication.run, with fileproxy's master."""
        try:
            CertificateArbiter(self).run()
        except RuntimeError as error:
            print(f"fileproxy: error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)


class CertificateArbiter(Arbiter):
    """gunicorn's master, but with HTTPS a SIGHUP makes each worker read its certificate again
    in place, so no running transfer is cut (gunicorn's own SIGHUP replaces the workers, which
    end their transfers within the graceful timeout). Without HTTPS, gunicorn's SIGHUP."""

    def handle_usr2(self) -> None:
        """gunicorn's binary upgrade hands the master's sockets to a new master; with a socket
        per worker the master holds none, and gunicorn's new master would fail on it."""
        if self.cfg.reuse_port:
            if self.log is not None:
                self.log.warning("USR2 ignored: with a socket per worker (--reuse-port) there "
                                 "are no master sockets to hand over; restart instead")
            return
        super().handle_usr2()

    def handle_hup(self) -> None:
        if not self.cfg.is_ssl:
            super().handle_hup()
            return
        if self.log is not None:
            self.log.info("Hang up: the workers read their certificate again")
        self.kill_workers(signal.SIGHUP)


def run_gunicorn(config: Config) -> int:
    with shared_state(config) as config:
        activate(config)
        GunicornServer().run()
    return 0


@contextlib.contextmanager
def shared_state(config: Config) -> Iterator[Config]:
    """Several workers must share state: without --redis-url, start a private redis-server on a
    unix socket for this run (PrivateRedis); without redis-server, run one worker and say so.
    Never several workers whose state disagrees."""
    if config.workers == 1 or config.redis_url:
        yield config
        return
    if shutil.which("redis-server") is None:
        print(f"fileproxy: no --redis-url and no redis-server installed: running 1 worker "
              f"(not {config.workers}) with the in-memory store", file=sys.stderr, flush=True)
        yield config.replace(workers=1)
        return
    run_dir = Path(tempfile.mkdtemp(prefix="fileproxy-run-"))
    keeper = PrivateRedis(run_dir)
    owner = os.getpid()
    try:
        keeper.start()
        print(f"fileproxy: {config.workers} workers share a private redis-server at "
              f"{keeper.socket} (append-only file in {run_dir})", file=sys.stderr, flush=True)
        yield config.replace(redis_url=f"unix://{keeper.socket}")
    finally:
        # gunicorn's workers are forked inside this block and unwind through it when they
        # exit: only the master stops the shared redis-server.
        if os.getpid() == owner:
            keeper.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


class PrivateRedis:
    """The run's redis-server on a unix socket, with an append-only file (fsync every second) in
    the run directory; the master starts it again if it dies, and it reloads what it kept."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.socket = run_dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self.keep_running, name="private-redis",
                                        daemon=True)

    def start(self) -> None:
        self.process = self.spawn()
        wait_for_socket(self.socket, self.process)
        self.watcher.start()

    def spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
             "--dir", str(self.run_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # our process group

    def keep_running(self) -> None:
        delay = 0.2
        while True:
            assert self.process is not None
            code = self.process.wait()
            if self.stopping.is_set():
                return
            print(f"fileproxy: the private redis-server exited ({code}); starting it again",
                  file=sys.stderr, flush=True)
            if self.stopping.wait(delay):
                return
            delay = min(delay * 2, 10.0)
            self.process = self.spawn()
            if self.stopping.is_set():  # (stop() may have missed this one)
                self.process.terminate()
                return

    def stop(self) -> None:
        self.stopping.set()
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        if self.watcher.is_alive():
            self.watcher.join(5)


def wait_for_socket(path: Path, process: subprocess.Popen[bytes], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"fileproxy: error: the private redis-server did not start ({path})")
        time.sleep(0.05)


def listen_socket(config: Config) -> socket.socket:
    family, address = tcp_address(config.bind)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    SocketOptions.from_config(config).apply_to_listener(sock)
    sock.bind(address)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def start_site(runner: web.AppRunner, config: Config,
                     tls: ssl.SSLContext | None = None) -> web.BaseSite:
    if config.bind.startswith("unix:"):
        site: web.BaseSite = web.UnixSite(runner, config.bind[5:], ssl_context=tls,
                                          backlog=LISTEN_BACKLOG)
    else:
        site = web.SockSite(runner, listen_socket(config), ssl_context=tls,
                            backlog=LISTEN_BACKLOG)
    await site.start()
    return site


async def serve_until_signalled(config: Config) -> None:
    tls = server_context(config)
    runner = build_runner(config)
    await runner.setup()
    await start_site(runner, config, tls)
    print(f"fileproxy dev: listening on {config.bind}{' (TLS)' if tls else ''}, forwarding to "
          f"{', '.join(config.upstream)}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_certificate, tls, config)
    await stop.wait()
    await runner.cleanup()


def run_dev(config: Config) -> int:
    configure_logging(config)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve_until_signalled(config))
    return 0
