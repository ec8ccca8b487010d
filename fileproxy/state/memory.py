"""In-memory state: the embedded default for a single process (nothing to install)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fileproxy.state.base import Locked


@dataclass
class MemoryQueue:
    waiting: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)
    claimed: dict[str, tuple[str, float, dict[str, Any]]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class MemoryLock:
    store: MemoryStore
    key: str
    token: bytes
    ttl: float

    async def extend(self) -> None:
        if self.store._live(self.key) != self.token:
            raise Locked(self.key)
        self.store._values[self.key] = (self.token, self.store._expiry(self.ttl))


class MemoryStore:
    def __init__(self, prefix: str = "fileproxy") -> None:
        self.prefix = prefix
        self._values: dict[str, tuple[bytes, float | None]] = {}
        self._indexes: dict[str, dict[str, float]] = {}
        self._queues: dict[str, MemoryQueue] = {}
        self._ids = itertools.count(1)

    def _live(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= time.monotonic():
            del self._values[key]
            return None
        return value

    @staticmethod
    def _expiry(ttl: float | None) -> float | None:
        return time.monotonic() + ttl if ttl else None

    async def ping(self) -> None:
        return None

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._values[key] = (value, self._expiry(ttl))

    async def delete(self, *keys: str) -> int:
        return sum(self._values.pop(key, None) is not None for key in keys)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        current = int(self._live(key) or 0) + amount
        expires = self._values[key][1] if key in self._values else self._expiry(ttl)
        self._values[key] = (str(current).encode(), expires)
        return current

    @contextlib.asynccontextmanager
    async def lock(self, name: str, ttl: float) -> AsyncIterator[MemoryLock]:
        key = f"lock:{name}"
        if self._live(key) is not None:
            raise Locked(name)
        handle = MemoryLock(self, key, str(next(self._ids)).encode(), ttl)
        self._values[key] = (handle.token, self._expiry(ttl))
        try:
            yield handle
        finally:
            if self._live(key) == handle.token:
                del self._values[key]

    async def index_add(self, index: str, member: str, score: float) -> None:
        self._indexes.setdefault(index, {})[member] = score

    async def index_remove(self, index: str, *members: str) -> None:
        for member in members:
            self._indexes.get(index, {}).pop(member, None)

    async def index_range(self, index: str, limit: int, max_score: float | None = None
                          ) -> list[tuple[str, float]]:
        entries = sorted(self._indexes.get(index, {}).items(), key=lambda item: item[1])
        if max_score is not None:
            entries = [entry for entry in entries if entry[1] <= max_score]
        return entries[:limit]

    def _queue(self, queue: str) -> MemoryQueue:
        return self._queues.setdefault(queue, MemoryQueue())

    async def queue_push(self, queue: str, item: dict[str, Any]) -> str:
        target = self._queue(queue)
        message_id = f"{next(self._ids)}-0"
        target.waiting.append((message_id, item))
        target.arrived.set()
        return message_id

    async def queue_claim(self, queue: str, consumer: str, wait: float
                          ) -> tuple[str, dict[str, Any]] | None:
        target = self._queue(queue)
        if not target.waiting:
            target.arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await target.arrived.wait()
        if not target.waiting:
            return None
        message_id, item = target.waiting.popleft()
        target.claimed[message_id] = (consumer, time.monotonic(), item)
        return message_id, item

    async def queue_ack(self, queue: str, message_id: str) -> None:
        self._queue(queue).claimed.pop(message_id, None)

    async def queue_reclaim(self, queue: str, consumer: str, idle: float
                            ) -> list[tuple[str, dict[str, Any]]]:
        target, now = self._queue(queue), time.monotonic()
        stale = [(mid, item) for mid, (_, since, item) in target.claimed.items()
                 if now - since >= idle]
        for message_id, item in stale:
            target.claimed[message_id] = (consumer, now, item)
        return stale

    async def queue_touch(self, queue: str, consumer: str, message_id: str) -> None:
        target = self._queue(queue)
        if message_id in target.claimed:
            target.claimed[message_id] = (consumer, time.monotonic(),
                                          target.claimed[message_id][2])

    async def queue_length(self, queue: str) -> int:
        target = self._queue(queue)
        return len(target.waiting) + len(target.claimed)

    async def eviction_policy(self) -> str | None:
        return None

    async def close(self) -> None:
        return None
