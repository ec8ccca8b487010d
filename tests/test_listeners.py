"""How the gunicorn workers listen (--reuse-port): a socket each or one shared, and what happens to
the connections waiting on a worker's socket when that worker is SIGKILLed.

The scenarios run `fileproxy serve` in a network namespace of their own, where
net.ipv4.tcp_migrate_req (a per-namespace setting) is what the case needs; the test reaches it
over a veth pair (198.19.0.0/16). Needs root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fileproxy.config import Config, ConfigError
from fileproxy.server.listeners import (
    MIGRATE_REQ,
    kernel_migrates_waiting_connections,
    socket_per_worker,
)
from tests.conftest import free_port, start_process, stop

ROOT = Path(__file__).resolve().parent.parent
IN_NAMESPACE = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not MIGRATE_REQ.exists(),
    reason="needs root, iproute2 and a kernel with net.ipv4.tcp_migrate_req (5.14+)")
ORIGIN_PORT, PROXY_PORT = 8000, 8080  # (the namespace is empty: any port is free there)
BODY = 1000
REQUEST = b"GET /bytes/%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % BODY


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@dataclass
class Listener:
    waiting: int  # connections in its accept queue
    backlog: int
    pids: set[int]  # the processes holding it


@dataclass
class Namespace:
    name: str
    address: str  # fileproxy's side of the veth pair

    def exec_args(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def listeners(self, port: int) -> list[Listener]:
        """Each listening socket on `port` (ss: Recv-Q is the accept queue, Send-Q the backlog)."""
        out = run(*self.exec_args("ss", "-tlnpH", f"sport = :{port}"))
        return [Listener(int(line.split()[1]), int(line.split()[2]),
                         {int(pid) for pid in re.findall(r"pid=(\d+)", line)})
                for line in out.splitlines()]


@contextmanager
def namespace(migrate_req: int) -> Iterator[Namespace]:
    """A namespace with loopback up, the setting, and a veth pair to this one."""
    tag = secrets.token_hex(3)
    name, host_side, subnet = f"fp-listen-{tag}", f"fpl{tag}", secrets.randbelow(64) * 4
    third = secrets.randbelow(256)
    mine, theirs = f"198.19.{third}.{subnet + 1}", f"198.19.{third}.{subnet + 2}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "netns", "exec", name, "sysctl", "-qw",
            f"net.ipv4.tcp_migrate_req={migrate_req}")
        run("ip", "link", "add", host_side, "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "addr", "add", f"{mine}/30", "dev", host_side)
        run("ip", "link", "set", host_side, "up")
        run("ip", "-n", name, "addr", "add", f"{theirs}/30", "dev", "eth0")
        run("ip", "-n", name, "link", "set", "eth0", "up")
        yield Namespace(name, theirs)
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                  text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)  # (what this test started there, if left)
        subprocess.run(["ip", "link", "del", host_side], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Served:
    namespace: Namespace
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def said(self, text: str) -> bool:
        return text in self.log.read_text()

    def workers(self) -> list[int]:
        return sorted(child.pid for child in psutil.Process(self.process.pid).children()
                      if "redis" not in child.name())


@contextmanager
def fileproxy_in(space: Namespace, reuse_port: str, log: Path) -> Iterator[Served]:
    """The origin and `fileproxy serve` (2 workers, its output in `log`) in the namespace."""
    port, origin_url = PROXY_PORT, f"http://{space.address}:{ORIGIN_PORT}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    origin = start_process(space.exec_args(sys.executable, "-m", "tests.origin", "--host",
                                           space.address, "--port", str(ORIGIN_PORT)),
                           f"{origin_url}/_origin/events", env=env)
    try:
        with open(log, "wb") as out:
            proxy = start_process(
                space.exec_args(sys.executable, "-m", "fileproxy", "serve", "--upstream",
                                origin_url, "--bind", f"{space.address}:{port}", "--workers",
                                "2", "--reuse-port", reuse_port, "--no-access-log"),
                f"http://{space.address}:{port}/_fileproxy/health", env=env, stderr=out)
        served = Served(space, port, proxy, log)
        try:
            expected = expected_listeners(space, reuse_port)
            wait_until(lambda: len(served.workers()) == 2
                       and len(space.listeners(port)) == expected)
            yield served
        finally:
            stop(proxy)
    finally:
        stop(origin)


def expected_listeners(space: Namespace, reuse_port: str) -> int:
    """2 sockets (one per worker) or 1 (shared), as --reuse-port and the setting decide."""
    migrating = run(*space.exec_args("sysctl", "-n", "net.ipv4.tcp_migrate_req")).strip() == "1"
    return 2 if reuse_port == "yes" or (reuse_port == "auto" and migrating) else 1


def wait_until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def send_requests(address: str, port: int, count: int) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        connection = socket.create_connection((address, port), timeout=15)
        connection.sendall(REQUEST)
        connections.append(connection)
    return connections


def answered(connection: socket.socket) -> bool:
    """Did the whole answer come (200 and the body), rather than a reset or an early end?"""
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except OSError:
        return False
    finally:
        connection.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and len(body) == BODY


def holders(space: Namespace, port: int) -> dict[int, int]:
    """How many established connections on `port` each process holds."""
    out = run(*space.exec_args("ss", "-tnpH", "state", "established", f"sport = :{port}"))
    pids = re.findall(r"pid=(\d+)", out)
    return {int(pid): pids.count(pid) for pid in set(pids)}


@IN_NAMESPACE
@pytest.mark.parametrize(("reuse_port", "migrate_req", "listening"), [
    ("auto", 1, 2), ("auto", 0, 1), ("no", 1, 1)], ids=["auto-migrating", "auto-not", "no"])
def test_auto_takes_a_socket_per_worker_only_where_the_kernel_migrates(
        reuse_port, migrate_req, listening, tmp_path):
    with namespace(migrate_req) as space, \
            fileproxy_in(space, reuse_port, tmp_path / "serve.log") as served:
        sockets = space.listeners(served.port)
        assert len(sockets) == listening
        if listening == 2:  # one each: a worker holds its own socket, the master none
            assert sorted(pid for listener in sockets for pid in listener.pids) \
                == served.workers()
            assert served.said("each worker listens on a socket of its own")
        elif reuse_port == "auto":
            assert served.said("the workers share one listening socket (--reuse-port auto: "
                               "net.ipv4.tcp_migrate_req is not 1)")
        connections = until_every_worker_serves(served)  # both past their sites' listen(128)
        for connection in connections:
            connection.close()
        # gunicorn's backlog, not the 128 aiohttp's site listens with
        assert {listener.backlog for listener in space.listeners(served.port)} == {2048}


def until_every_worker_serves(served: Served, most: int = 200) -> list[socket.socket]:
    """Connections (left open) until each worker holds one it answered on."""
    connections: list[socket.socket] = []
    while set(holders(served.namespace, served.port)) != set(served.workers()):
        assert len(connections) < most, "a worker never took a connection"
        connection = socket.create_connection((served.namespace.address, served.port),
                                              timeout=15)
        connection.sendall(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        connections.append(connection)
    return connections


@IN_NAMESPACE
def test_a_socket_per_worker_spreads_connections_over_the_workers(tmp_path):
    """32 connections at once (h2load's burst): both workers take some (on one shared socket,
    the first worker awake could take all of them)."""
    with namespace(1) as space, fileproxy_in(space, "yes", tmp_path / "serve.log") as served:
        connections = [socket.create_connection((space.address, served.port), timeout=15)
                       for _ in range(32)]
        try:
            for connection in connections:  # each answered: the connection has been accepted
                connection.sendall(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\n\r\n")
                assert connection.recv(65536).startswith(b"HTTP/1.1 200")
            counts = holders(space, served.port)
            assert set(counts) == set(served.workers())
            assert sum(counts.values()) == 32
        finally:
            for connection in connections:
                connection.close()


@IN_NAMESPACE
@pytest.mark.parametrize(("reuse_port", "migrate_req", "all_answered"), [
    ("auto", 1, True), ("auto", 0, True), ("yes", 0, False)],
    ids=["own-sockets-migrating", "shared-socket", "own-sockets-not-migrating"])
def test_connections_waiting_for_a_killed_worker(reuse_port, migrate_req, all_answered,
                                                 tmp_path):
    """A worker stops (SIGSTOP) while 24 clients connect and send their request, then dies
    (SIGKILL). On a shared socket the other worker takes them; on a socket of its own they move
    to another worker's when the kernel migrates them (auto), and are reset when it does not
    (the cost --reuse-port yes accepts without tcp_migrate_req)."""
    with namespace(migrate_req) as space, \
            fileproxy_in(space, reuse_port, tmp_path / "serve.log") as served:
        victim = served.workers()[0]
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: psutil.Process(victim).status() == psutil.STATUS_STOPPED)
        connections = send_requests(space.address, served.port, 24)
        if expected_listeners(space, reuse_port) == 2:
            wait_until(lambda: any(listener.waiting for listener in space.listeners(served.port)
                                   if listener.pids == {victim}))  # some wait on its socket
        os.kill(victim, signal.SIGKILL)
        results = [answered(connection) for connection in connections]
        if all_answered:
            assert all(results), f"{results.count(False)} of 24 not answered"
        else:
            assert not all(results) and any(results)


def test_reading_the_kernel_setting(tmp_path):
    setting = tmp_path / "tcp_migrate_req"
    setting.write_text("1\n")
    assert kernel_migrates_waiting_connections(setting)
    setting.write_text("0\n")
    assert not kernel_migrates_waiting_connections(setting)
    assert not kernel_migrates_waiting_connections(tmp_path / "missing")  # an older kernel


def test_which_binds_get_a_socket_per_worker():
    def per_worker(**settings) -> bool:
        return socket_per_worker(Config(upstream=("http://127.0.0.1:1",), **settings))

    assert per_worker(bind="127.0.0.1:8080", workers=2, reuse_port="yes")
    assert per_worker(bind="[::1]:8080", workers=2, reuse_port="yes")
    assert not per_worker(bind="127.0.0.1:8080", workers=2, reuse_port="no")
    assert not per_worker(bind="127.0.0.1:8080", workers=1, reuse_port="yes")  # nothing to spread
    assert not per_worker(bind="127.0.0.1:0", workers=2, reuse_port="yes")  # a port each
    assert not per_worker(bind="unix:/tmp/fp.sock", workers=2, reuse_port="auto")


def test_a_unix_socket_cannot_take_reuse_port_yes():
    with pytest.raises(ConfigError, match="--reuse-port yes: a unix socket"):
        Config(upstream=("http://127.0.0.1:1",), bind="unix:/tmp/fp.sock", reuse_port="yes")


def test_an_address_in_use_stops_serve_with_one_line(origin_process: str):
    """Each worker binds its own socket: serve checks the address first, so another server on
    it is one line, not a group of sockets sharing the port."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process, "--bind",
             f"127.0.0.1:{port}", "--workers", "2", "--reuse-port", "yes"],
            capture_output=True, text=True, timeout=30)
    finally:
        taken.close()
    assert result.returncode != 0  # (after gunicorn's "Starting" line: the probe is its hook's)
    assert result.stderr.strip().splitlines()[-1] \
        == f"fileproxy: error: --bind 127.0.0.1:{port}: in use"


def test_dev_listens_with_the_same_backlog(origin_process: str):
    """`fileproxy dev` (one process, its own socket) keeps 2,048 waiting connections too."""
    port = free_port()
    process = start_process(
        [sys.executable, "-m", "fileproxy", "dev", "--upstream", origin_process, "--bind",
         f"127.0.0.1:{port}", "--no-access-log"], f"http://127.0.0.1:{port}/_fileproxy/health",
        stderr=subprocess.DEVNULL)
    try:
        out = run("ss", "-tlnH", f"sport = :{port}")
        assert [int(line.split()[2]) for line in out.splitlines()] == [2048]
    finally:
        stop(process)


def test_usr2_is_ignored_with_a_socket_per_worker(origin_process: str, tmp_path):
    """gunicorn's binary upgrade hands the master's sockets over; with a socket per worker it
    has none (gunicorn's new master would fail on it), so the master says so and serves on."""
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = start_process(
            [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process, "--bind",
             f"127.0.0.1:{port}", "--workers", "2", "--reuse-port", "yes", "--no-access-log"],
            f"{url}/_fileproxy/health", stderr=out)
    try:
        workers = {child.pid for child in psutil.Process(process.pid).children()}
        os.kill(process.pid, signal.SIGUSR2)
        wait_until(lambda: "USR2 ignored" in log.read_text())
        with urllib.request.urlopen(f"{url}/bytes/{BODY}") as response:
            assert len(response.read()) == BODY
        assert {child.pid for child in psutil.Process(process.pid).children()} == workers
    finally:
        stop(process)
