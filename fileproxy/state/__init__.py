"""Shared state: a small protocol (values with TTL, counters, locks, an index, a work queue) with an
in-memory backend (one process) and a Redis backend (several workers and instances)."""

import logging

from aiohttp import web

from fileproxy.state.base import Locked, LockHandle, StateStore, StateUnavailable

__all__ = ["STORE", "LockHandle", "Locked", "StateStore", "StateUnavailable", "open_store",
           "warn_if_evicting"]

STORE = web.AppKey("store", StateStore)
log = logging.getLogger("fileproxy.state")


async def warn_if_evicting(store: StateStore) -> None:
    """A Redis that evicts keys under memory pressure can drop task and upload records: say so
    once at start-up (maxmemory-policy noeviction is what fileproxy needs)."""
    try:
        policy = await store.eviction_policy()
    except StateUnavailable:
        return
    if policy not in (None, "noeviction"):
        log.warning("Redis maxmemory-policy is %s: under memory pressure Redis may drop task and "
                    "upload records; set maxmemory-policy noeviction (and persistence on)", policy)


def open_store(redis_url: str, prefix: str) -> StateStore:
    """Redis when a URL is given (redis://, rediss://, unix://, or redis+sentinel:// for the
    master Redis Sentinel names), else the in-memory store."""
    if redis_url:
        from fileproxy.state.redis import RedisStore

        return RedisStore(redis_url, prefix)
    from fileproxy.state.memory import MemoryStore

    return MemoryStore(prefix)
