"""Redis state (redis.asyncio with hiredis): shared by every worker of every fileproxy instance."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fileproxy.config import SENTINEL_SCHEME, SentinelURL, parse_sentinel_url
from fileproxy.state.base import Locked, StateUnavailable

T = TypeVar("T")
# A command whose connection failed is sent again on a new one, with backoff (0.05 s doubling to
# 1 s): about 4.5 s in all, so a Redis that restarts (a crash, a failover) is ridden through
# instead of failing the requests and tasks that needed it in those seconds.
RESTART_RETRIES = 8
log = logging.getLogger("fileproxy.state.redis")
DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

# redis-py types a reply for every protocol and decoding at once (bytes or str; RESP2 or RESP3
# shapes). This client keeps redis-py's defaults (RESP2, no decode_responses): its replies are
# bytes, in the shapes below (a pair may come as a list or a tuple; only its two items are read).
ScoredMembers = list[tuple[bytes, float]]  # ZRANGEBYSCORE ... WITHSCORES: (member, score) each
StreamMessage = tuple[bytes, dict[bytes, bytes]]  # a stream entry: (message id, fields)
StreamRead = list[tuple[bytes, list[StreamMessage]]]  # XREADGROUP: (stream, its entries) each


class RedisLock:
    def __init__(self, store: RedisStore, lock: Any) -> None:
        self.store, self.lock = store, lock

    async def extend(self) -> None:
        try:
            await self.store._call(self.lock.reacquire)
        except LockError:
            raise Locked(self.lock.name) from None


class MasterConnection(SentinelManagedConnection):
    """redis-py's connection to the master the sentinels name, which asks them again whenever it
    connects. redis-py's own asks only in connect(): a command's retry reconnects (in
    send_packed_command) with connect_check_health, to the address it had, so a command that
    failed on a demoted or dead master failed on every retry (redis/redis-py#3874)."""

    _addressed = False  # inside connect_to: the sentinels were just asked

    async def connect_to(self, address: tuple[str, int]) -> None:
        self._addressed = True
        try:
            await super().connect_to(address)
        finally:
            self._addressed = False

    async def connect_check_health(self, check_health: bool = True,
                                   retry_socket_connect: bool = True) -> None:
        if self.is_connected or self._addressed:
            await super().connect_check_health(check_health, retry_socket_connect)
        else:
            await self.connect()  # the sentinels' master now, then connect_to


class RedisStore:
    """Keys live under `prefix:`. Connection loss raises StateUnavailable; redis-py's pool opens a
    new connection on the next command, so the store recovers by itself when Redis returns.
    A redis+sentinel:// URL reaches the master through Redis Sentinel, and the new master after
    a failover (see sentinel_client)."""

    def __init__(self, url: str, prefix: str = "fileproxy") -> None:
        self.prefix = prefix
        # A command on a pooled connection that a Redis restart closed is sent again on a new one
        # (RESTART_RETRIES), so the requests and tasks of a restart's seconds do not fail.
        options: dict[str, Any] = dict(
            socket_connect_timeout=2, socket_timeout=None, health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RESTART_RETRIES),
            retry_on_error=[RedisConnectionError])
        self.sentinel: Sentinel | None = None
        self.client: aioredis.Redis
        if url.startswith(f"{SENTINEL_SCHEME}://"):
            self.sentinel, self.client = sentinel_client(parse_sentinel_url(url), options)
        else:
            self.client = aioredis.Redis.from_url(url, **options)
        self._groups: set[str] = set()

    def k(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except DOWN as error:
            raise StateUnavailable(f"Redis unavailable: {error}") from error

    async def ping(self) -> None:
        await self._call(self.client.ping)

    async def get(self, key: str) -> bytes | None:
        return cast(bytes | None, await self._call(lambda: self.client.get(self.k(key))))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        px = int(ttl * 1000) if ttl else None
        await self._call(lambda: self.client.set(self.k(key), value, px=px))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        return await self._call(lambda: self.client.delete(*(self.k(key) for key in keys)))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        async def increment() -> int:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incrby(self.k(key), amount)
                if ttl:
                    pipe.pexpire(self.k(key), int(ttl * 1000), nx=True)
                results = await pipe.execute()
            return int(results[0])

        return await self._call(increment)

    @contextlib.asynccontextmanager
    async def lock(self, name: str, ttl: float) -> AsyncIterator[RedisLock]:
        lock = self.client.lock(self.k(f"lock:{name}"), timeout=ttl, blocking=False)
        if not await self._call(lock.acquire):
            raise Locked(name)
        try:
            yield RedisLock(self, lock)
        finally:
            with contextlib.suppress(LockError, *DOWN):
                await lock.release()

    async def index_add(self, index: str, member: str, score: float) -> None:
        await self._call(lambda: self.client.zadd(self.k(index), {member: score}))

    async def index_remove(self, index: str, *members: str) -> None:
        if members:
            await self._call(lambda: self.client.zrem(self.k(index), *members))

    async def index_range(self, index: str, limit: int, max_score: float | None = None
                          ) -> list[tuple[str, float]]:
        top = "+inf" if max_score is None else max_score
        rows = await self._call(lambda: self.client.zrangebyscore(
            self.k(index), "-inf", top, start=0, num=limit, withscores=True))
        return [(member.decode(), float(score)) for member, score in cast(ScoredMembers, rows)]

    async def _group(self, queue: str) -> str:
        stream = self.k(f"queue:{queue}")
        if stream not in self._groups:
            try:
                await self._call(lambda: self.client.xgroup_create(stream, "workers", id="0",
                                                                   mkstream=True))
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
            self._groups.add(stream)
        return stream

    async def queue_push(self, queue: str, item: dict[str, Any]) -> str:
        stream = await self._group(queue)
        message_id = await self._call(lambda: self.client.xadd(
            stream, {"item": json.dumps(item)}))
        return cast(bytes, message_id).decode()

    async def _on_stream(self, queue: str, operation: Callable[[str], Awaitable[T]]) -> T:
        """`operation` on the queue's stream. A Redis that lost the stream or its group
        (restarted empty, flushed: NOGROUP) gets them created again by whichever worker sees it
        first, and the operation runs once more."""
        stream = await self._group(queue)
        try:
            return await self._call(lambda: operation(stream))
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            log.warning("Redis lost the queue %s (restarted empty?): creating it again", stream)
            self._groups.discard(stream)
            stream = await self._group(queue)
            return await self._call(lambda: operation(stream))

    async def queue_claim(self, queue: str, consumer: str, wait: float
                          ) -> tuple[str, dict[str, Any]] | None:
        reply = await self._on_stream(queue, lambda stream: self.client.xreadgroup(
            "workers", consumer, {stream: ">"}, count=1, block=max(1, int(wait * 1000))))
        if not reply:
            return None
        message_id, fields = cast(StreamRead, reply)[0][1][0]
        return message_id.decode(), json.loads(fields[b"item"])

    async def queue_ack(self, queue: str, message_id: str) -> None:
        async def ack(stream: str) -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xack(stream, "workers", message_id)
                pipe.xdel(stream, message_id)
                await pipe.execute()

        await self._on_stream(queue, ack)

    async def queue_reclaim(self, queue: str, consumer: str, idle: float
                            ) -> list[tuple[str, dict[str, Any]]]:
        reply = await self._on_stream(queue, lambda stream: self.client.xautoclaim(
            stream, "workers", consumer, min_idle_time=int(idle * 1000), count=100))
        return [(mid.decode(), json.loads(fields[b"item"])) for mid, fields in reply[1] if fields]

    async def queue_touch(self, queue: str, consumer: str, message_id: str) -> None:
        await self._on_stream(queue, lambda stream: self.client.xclaim(
            stream, "workers", consumer, 0, [message_id], justid=True))

    async def queue_length(self, queue: str) -> int:
        stream = await self._group(queue)
        return int(await self._call(lambda: self.client.xlen(stream)))

    async def eviction_policy(self) -> str | None:
        """maxmemory-policy, or None where CONFIG is not allowed (managed Redis services)."""
        try:
            reply = await self._call(lambda: self.client.config_get("maxmemory-policy"))
        except ResponseError:
            return None
        # (redis-py decodes CONFIG GET's pairs to str; bytes are accepted too)
        pairs = cast(dict[str | bytes, str | bytes], reply)
        value = pairs.get("maxmemory-policy", pairs.get(b"maxmemory-policy"))
        return value.decode() if isinstance(value, bytes) else value

    async def close(self) -> None:
        await self.client.aclose()
        if self.sentinel is not None:
            for sentinel in self.sentinel.sentinels:
                await sentinel.aclose()


def sentinel_client(url: SentinelURL, options: dict[str, Any]) -> tuple[Sentinel, aioredis.Redis]:
    """The master of `url.service`, found through the sentinels, with the plain client's options.

    redis-py's SentinelConnectionPool asks the sentinels for the master's address each time it
    opens a connection (and drops idle ones to a master that moved). A connection to a master
    that died fails (ConnectionError) and one to a master demoted to replica gets READONLY, which
    SentinelManagedConnection turns into a ConnectionError after disconnecting; either way the
    store's Retry sends the command again on a new connection, which (MasterConnection) asks
    the sentinels first: it reaches whichever master they name then. While they name none (a
    failover takes down-after-milliseconds and a second or two), commands fail as with a plain
    Redis that is down: StateUnavailable."""
    sentinels = Sentinel(
        list(url.sentinels),
        # Sentinels are asked with short timeouts and one quick retry (a pooled connection a
        # sentinel restart closed), so one that is down does not hold up asking the next.
        sentinel_kwargs=dict(socket_connect_timeout=1, socket_timeout=1,
                             retry=Retry(NoBackoff(), 1)))
    client = sentinels.master_for(url.service, connection_class=MasterConnection, db=url.db,
                                  username=url.username, password=url.password, **options)
    return sentinels, client
