"""The state protocol every feature talks to; never redis-py directly."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol


class StateUnavailable(Exception):
    """The store cannot be reached now (Redis down); callers answer 503 and try again later."""


class Locked(Exception):
    """Someone else holds the lock."""


class LockHandle(Protocol):
    async def extend(self) -> None:
        """Another ttl from now; raises Locked once the lock has expired (someone may have taken it)."""
        ...


class StateStore(Protocol):
    """Keys are namespaced by the store's prefix; values are bytes; TTLs are seconds."""

    async def ping(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    async def delete(self, *keys: str) -> int: ...

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int: ...

    def lock(self, name: str, ttl: float) -> AbstractAsyncContextManager[LockHandle]:
        """Held for the block (at most ttl unless extended); raises Locked at once when someone
        else holds it."""
        ...

    async def index_add(self, index: str, member: str, score: float) -> None: ...

    async def index_remove(self, index: str, *members: str) -> None: ...

    async def index_range(self, index: str, limit: int, max_score: float | None = None
                          ) -> list[tuple[str, float]]:
        """Members by ascending score (up to max_score), at most `limit`."""
        ...

    async def queue_push(self, queue: str, item: dict[str, Any]) -> str: ...

    async def queue_claim(self, queue: str, consumer: str, wait: float
                          ) -> tuple[str, dict[str, Any]] | None:
        """The next unclaimed item (waiting up to `wait` s); it stays claimed until acked."""
        ...

    async def queue_ack(self, queue: str, message_id: str) -> None: ...

    async def queue_reclaim(self, queue: str, consumer: str, idle: float
                            ) -> list[tuple[str, dict[str, Any]]]:
        """Items claimed by any consumer more than `idle` s ago and not acked (a worker died):
        they move to `consumer`."""
        ...

    async def queue_touch(self, queue: str, consumer: str, message_id: str) -> None:
        """A long job is still alive: restart its idle clock so it is not reclaimed."""
        ...

    async def queue_length(self, queue: str) -> int:
        """Items not yet acked."""
        ...

    async def eviction_policy(self) -> str | None:
        """How the store drops keys under memory pressure (Redis' maxmemory-policy), None when
        it never does or cannot say."""
        ...

    async def close(self) -> None: ...
