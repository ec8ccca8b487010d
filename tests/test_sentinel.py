"""Redis Sentinel (--redis-url redis+sentinel://...): the store finds the master through a sentinel
and, after a failover, talks to the new one by itself. Real processes on loopback ports: a master
redis-server, one replica and one sentinel, new for each test and stopped (by pid) after it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from fileproxy.config import ConfigError, SentinelURL, load_config, parse_sentinel_url
from fileproxy.state import StateUnavailable
from fileproxy.state.redis import RedisStore
from tests.conftest import free_port, stop

SERVICE = "mymaster"
FAILOVER_BOUND = 30.0  # seconds a failover may take before the test gives up


def answer_of(check: Callable[[], Any]) -> Any:
    """`check`'s answer, or None while it is falsy or Redis errs (not yet)."""
    try:
        return check() or None
    except redis.RedisError:
        return None


def until(check: Callable[[], Any], seconds: float, what: str) -> Any:
    """Poll `check` until it answers, or fail."""
    deadline = time.monotonic() + seconds
    while (answer := answer_of(check)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.05)
    return answer


async def until_async(check: Callable[[], Any], seconds: float, what: str) -> Any:
    """As until(), without holding up the event loop (an in-process proxy runs on it)."""
    deadline = time.monotonic() + seconds
    while (answer := answer_of(check)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.05)
    return answer


@dataclass
class SentinelCluster:
    """A master, its replica and a sentinel monitoring them as SERVICE (quorum 1)."""

    directory: Path
    master_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    sentinel_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    clients: dict[int, redis.Redis] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}"

    def admin(self, port: int) -> redis.Redis:
        """A plain (synchronous) client of one process, for the test's own look and commands."""
        if port not in self.clients:
            self.clients[port] = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)
        return self.clients[port]

    def spawn(self, name: str, args: list[str]) -> None:
        with (self.directory / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                ["redis-server", *args], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.directory)

    def server_args(self, port: int) -> list[str]:
        return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--dbfilename", f"dump-{port}.rdb",
                "--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not after 5 s

    def start(self) -> None:
        self.spawn("master", self.server_args(self.master_port))
        until(self.admin(self.master_port).ping, 10, "the master answers")
        self.spawn("replica", [*self.server_args(self.replica_port),
                               "--replicaof", "127.0.0.1", str(self.master_port)])
        until(lambda: self.admin(self.replica_port).info("replication")
              .get("master_link_status") == "up", 10, "the replica is in sync")
        config = self.directory / "sentinel.conf"  # the sentinel rewrites it: a file of its own
        config.write_text(f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.directory}\n"
                          f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1\n"
                          f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                          f"sentinel failover-timeout {SERVICE} 5000\n")
        self.spawn("sentinel", [str(config), "--sentinel"])
        until(self.replica_known, 10, "the sentinel knows the replica")

    def replica_known(self) -> bool:
        """The sentinel has the replica's own INFO: it may promote it."""
        replicas = self.admin(self.sentinel_port).sentinel_slaves(SERVICE)
        return any(r["port"] == self.replica_port and not r["is_disconnected"]
                   and r["master-link-status"] == "ok" for r in replicas)

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        for process in self.processes.values():
            stop(process)

    def kill_master(self) -> None:
        process = self.processes["master"]
        process.kill()  # SIGKILL, by pid: no goodbye to anyone
        process.wait()

    def wait_replicated(self) -> None:
        """Everything written to the master so far has reached the replica: WAIT for one replica
        after a write of this connection, whose offset covers every write before it."""
        master = self.admin(self.master_port)
        master.set("sentinel-test:marker", b"1")
        assert master.wait(1, 5000) == 1

    def master_named(self) -> int | None:
        """The port the sentinel names as the master, as redis-py asks (SENTINEL MASTERS: a master
        neither subjectively nor objectively down); None while there is none."""
        sentinel = self.admin(self.sentinel_port)
        state = sentinel.sentinel_masters().get(SERVICE)
        if not state or not state["is_master"] or state["is_sdown"] or state["is_odown"]:
            return None
        _host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        return int(port) if int(port) == state["port"] else None

    def failed_over(self) -> bool:
        return self.master_named() == self.replica_port


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    cluster = SentinelCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------- the URL

@pytest.mark.parametrize(("url", "expected"), [
    ("redis+sentinel://127.0.0.1:26380/mymaster",
     SentinelURL((("127.0.0.1", 26380),), "mymaster")),
    ("redis+sentinel://:p%40ss@h1:26379,h2,[::1]:26381/cache/2",
     SentinelURL((("h1", 26379), ("h2", 26379), ("::1", 26381)), "cache", 2, None, "p@ss")),
    ("redis+sentinel://app:pw@h1:26379/mymaster/",
     SentinelURL((("h1", 26379),), "mymaster", 0, "app", "pw")),
])
def test_sentinel_url_is_taken_apart(url, expected):
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize("url", [
    "redis+sentinel://h1:26379", "redis+sentinel://h1:26379/", "redis+sentinel:///mymaster",
    "redis+sentinel://h1:0/mymaster", "redis+sentinel://h1:x/mymaster",
    "redis+sentinel://h1,,h2/mymaster", "redis+sentinel://h1/mymaster/zero",
    "redis+sentinel://h1/mymaster/0/1", "redis+sentinel://h1/mymaster?db=1",
    "sentinel://h1/mymaster",
])
def test_bad_redis_url_stops_start_up_naming_the_setting(url):
    with pytest.raises(ConfigError) as error:
        load_config({"upstream": ["http://127.0.0.1:8000"], "redis_url": url}, environ={})
    assert str(error.value).startswith("--redis-url (from command line): ")
    assert "\n" not in str(error.value)


def test_redis_urls_of_every_kind_are_accepted():
    for url in ("redis://127.0.0.1:6379/0", "rediss://h:6380", "unix:///run/redis.sock", "",
                "redis+sentinel://:pw@h1:26379,h2:26379/mymaster/0"):
        config = load_config({"upstream": ["http://127.0.0.1:8000"], "redis_url": url}, environ={})
        assert config.redis_url == url


# ---------------------------------------------------------------- failover, the store alone

async def test_store_follows_the_master_through_a_failover(sentinel_cluster):
    cluster = sentinel_cluster
    store = RedisStore(cluster.url, prefix="sentinel-test")
    try:
        await store.set("before", b"kept")
        assert await store.get("before") == b"kept"
        assert await store.incr("counter", ttl=60) == 1
        await store.queue_push("work", {"n": 1})
        message_id, item = await store.queue_claim("work", "c1", wait=0.5) or ("", {})
        assert item == {"n": 1}
        await store.queue_ack("work", message_id)
        await store.queue_push("work", {"n": 2})  # still queued when the master dies
        assert store.client.connection_pool.master_address == ("127.0.0.1", cluster.master_port)

        cluster.wait_replicated()
        cluster.kill_master()
        # Meanwhile a command rides the failover through (retried for a few seconds) or says
        # StateUnavailable: it never hangs.
        with contextlib.suppress(StateUnavailable):
            await asyncio.wait_for(store.set("during", b"x"), 10)
        started = time.monotonic()
        await until_async(cluster.failed_over, FAILOVER_BOUND, "the sentinel promotes the replica")
        print(f"failover took {time.monotonic() - started:.1f} s after the first failed command")

        # The same store, with no help: the first command after the failover works.
        assert await store.get("before") == b"kept"
        assert store.client.connection_pool.master_address == ("127.0.0.1", cluster.replica_port)
        assert await store.incr("counter", ttl=60) == 2
        await store.set("after", b"new", ttl=60)
        assert await store.get("after") == b"new"
        assert cluster.admin(cluster.replica_port).get("sentinel-test:after") == b"new"
        message_id, item = await store.queue_claim("work", "c2", wait=0.5) or ("", {})
        assert item == {"n": 2}
        await store.queue_ack("work", message_id)
        await store.queue_push("work", {"n": 3})
        message_id, item = await store.queue_claim("work", "c2", wait=0.5) or ("", {})
        assert item == {"n": 3}
        await store.queue_ack("work", message_id)
        assert await store.queue_length("work") == 0
        async with store.lock("after-failover", ttl=5) as lock:
            await lock.extend()
    finally:
        await store.close()


async def test_store_leaves_a_master_demoted_to_replica(sentinel_cluster):
    """A failover that leaves the old master running: once demoted, it answers the store's
    pooled connection with READONLY; redis-py drops that connection and asks the sentinel."""
    cluster = sentinel_cluster
    store = RedisStore(cluster.url, prefix="sentinel-test")
    try:
        await store.set("before", b"kept")
        await store.queue_push("work", {"n": 1})
        cluster.wait_replicated()
        cluster.admin(cluster.sentinel_port).execute_command("SENTINEL", "FAILOVER", SERVICE)
        await until_async(cluster.failed_over, FAILOVER_BOUND, "the sentinel promotes the replica")
        # The sentinel demotes the old master some 10 s later; do now what it will do then.
        old_master = cluster.admin(cluster.master_port)
        old_master.replicaof("127.0.0.1", cluster.replica_port)
        await until_async(lambda: old_master.info("replication")["role"] == "slave", 5,
                          "the old master is a replica")

        await store.set("after", b"new")  # on the pooled connection to the old master first
        assert old_master.info("errorstats").get("errorstat_READONLY", {}).get("count", 0) >= 1
        assert store.client.connection_pool.master_address == ("127.0.0.1", cluster.replica_port)
        assert cluster.admin(cluster.replica_port).get("sentinel-test:after") == b"new"
        assert await store.get("before") == b"kept"
        message_id, item = await store.queue_claim("work", "c1", wait=0.5) or ("", {})
        assert item == {"n": 1}
        await store.queue_ack("work", message_id)
    finally:
        await store.close()


# ---------------------------------------------------------------- failover, through the proxy

async def test_tasks_complete_across_a_failover(sentinel_cluster, origin, make_proxy, client):
    """Tasks queued or running when the master dies, and tasks submitted after the failover, all
    complete. One that finished while there was no master could not say so: its claim, never
    acknowledged, is taken again after the visibility timeout (short here) and it runs again."""
    cluster = sentinel_cluster
    proxy = await make_proxy(origin.url, redis_url=cluster.url, task_concurrency=2,
                             task_visibility_timeout=2)

    async def submit(path: str) -> str:
        async with client.get(f"{proxy.url}{path}",
                              headers={"Prefer": "respond-async"}) as response:
            assert response.status == 202, await response.text()
            return proxy.url + (await response.json())["status_url"]

    async def final(status_url: str, seconds: float = 25) -> dict:
        deadline = time.monotonic() + seconds
        record: dict = {"status": "unknown"}
        while time.monotonic() < deadline:
            async with client.get(status_url) as response:
                if response.status == 200:  # 503 while there is no master
                    record = await response.json()
                    if record["status"] in ("completed", "failed", "cancelled"):
                        return record
            await asyncio.sleep(0.05)
        raise AssertionError(f"task still {record['status']} after {seconds} s")

    first = [await submit("/status/201") for _ in range(2)]
    assert [(await final(url))["status"] for url in first] == ["completed"] * 2

    # Two slow tasks run (task_concurrency=2) and three wait behind them when the master dies.
    before = [await submit("/slow-headers?delay=1") for _ in range(2)]
    before += [await submit("/status/201") for _ in range(3)]
    cluster.wait_replicated()
    cluster.kill_master()
    await until_async(cluster.failed_over, FAILOVER_BOUND, "the sentinel promotes the replica")

    after = [await submit("/status/201") for _ in range(4)]  # 202 at once: no 503
    records = await asyncio.gather(*(final(url) for url in before + after))
    assert [r["status"] for r in records] == ["completed"] * len(records), records
    assert [r["upstream_status"] for r in records] == [200] * 2 + [201] * 7
