"""Fixtures: the test origin and the proxy in process, both as real subprocesses, raw sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from fileproxy.app import build_runner
from fileproxy.config import Config
from tests.origin import EVENTS, PEERS, build_origin

ROOT = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, as fileproxy does."""
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    """A server the test started: its base URL and, in process, its aiohttp runner."""

    url: str
    runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def app(self) -> web.Application:
        assert self.runner is not None
        return self.runner.app

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.app[EVENTS] if name is None or e["event"] == name]

    def connections(self) -> int:
        return len(self.app[PEERS])


async def serve(runner: web.AppRunner) -> Served:
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Served(f"http://127.0.0.1:{port}", runner)


@pytest.fixture
async def origin() -> AsyncIterator[Served]:
    served = await serve(web.AppRunner(build_origin(), access_log=None, handler_cancellation=True))
    yield served
    await served.runner.cleanup()


ProxyFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    started: list[Served] = []

    async def start(*upstreams: str, **settings: Any) -> Served:
        config = Config(upstream=upstreams, **{"access_log": False, **settings})
        served = await serve(build_runner(config))
        started.append(served)
        return served

    yield start
    for served in started:
        await served.runner.cleanup()


# Every server path x upstream client: (fast_path, lean_client).
MATRIX = [(True, True), (True, False), (False, True), (False, False)]
MATRIX_IDS = ["fast-path+lean", "fast-path+aiohttp-client", "aiohttp-server+lean",
              "aiohttp-server+aiohttp-client"]


@pytest.fixture(params=MATRIX, ids=MATRIX_IDS)
async def proxy(origin: Served, make_proxy: ProxyFactory, request: pytest.FixtureRequest) -> Served:
    """The in-process proxy on every server path (the fast path serving plain GETs, or aiohttp's
    server taking every request) and upstream client (the lean one for GETs, or aiohttp's for
    all): every combination must behave the same."""
    fast_path, lean_client = request.param
    return await make_proxy(origin.url, fast_path=fast_path, lean_client=lean_client)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False, max_headers=1000,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 3.0) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet for read_timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), read_timeout):
            received += chunk
    except TimeoutError:
        pass
    writer.close()
    return received


# ---------------------------------------------------------------- real subprocesses

def wait_for_http(url: str, process: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_process(args: list[str], health_url: str, **popen: Any) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(args, cwd=ROOT, start_new_session=True, **popen)
    try:
        wait_for_http(health_url, process)
    except Exception:
        stop(process)
        raise
    return process


@pytest.fixture(scope="session")
def origin_process() -> Iterator[str]:
    """The test origin as its own process (for the gunicorn proxy, which runs in another)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process([sys.executable, "-m", "tests.origin", "--port", str(port)],
                            f"{url}/_origin/events")
    yield url
    stop(process)


@dataclass
class RedisServer:
    """A private redis-server on a free port, which tests may stop and start again."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@dataclass
class GunicornProxy:
    url: str
    process: subprocess.Popen[bytes]

    def worker_pids(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.process.pid).children()
                if "redis" not in child.name()]  # the private redis-server is a child too


@pytest.fixture(scope="session")
def gunicorn_proxy(origin_process: str) -> Iterator[GunicornProxy]:
    """fileproxy as deployed: `python -m fileproxy serve` (gunicorn, 2 uvloop workers)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FILEPROXY_ACCESS_LOG": "false"}
    process = start_process(
        [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process,
         "--bind", f"127.0.0.1:{port}", "--workers", "2"],
        f"{url}/_fileproxy/health", env=env)
    proxy = GunicornProxy(url, process)
    deadline = time.monotonic() + 30
    while len(proxy.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    yield proxy
    stop(process)
