"""Shared state: a small protocol (values with TTL, counters, locks, an index, a work queue) with an
in-memory backend (one process) and a Redis backend (several workers and instances)."""

from aiohttp import web

from fileproxy.state.base import Locked, LockHandle, StateStore, StateUnavailable

__all__ = ["STORE", "LockHandle", "Locked", "StateStore", "StateUnavailable", "open_store"]

STORE = web.AppKey("store", StateStore)


def open_store(redis_url: str, prefix: str) -> StateStore:
    """Redis when a URL is given (redis://, rediss://, unix://), else the in-memory store."""
    if redis_url:
        from fileproxy.state.redis import RedisStore

        return RedisStore(redis_url, prefix)
    from fileproxy.state.memory import MemoryStore

    return MemoryStore(prefix)
