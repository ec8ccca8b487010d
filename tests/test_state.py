"""The state protocol: the same tests for the in-memory store and for a real redis-server."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from fileproxy.state import Locked, StateUnavailable, open_store


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_server):
    prefix = f"t{secrets.token_hex(4)}"
    url = redis_server.url if request.param == "redis" else ""
    opened = open_store(url, prefix)
    yield opened
    await opened.close()


async def test_values_expire_and_are_namespaced(store, redis_server):
    await store.set("a", b"1", ttl=0.2)
    await store.set("b", b"2")
    assert await store.get("a") == b"1"
    await asyncio.sleep(0.3)
    assert await store.get("a") is None and await store.get("b") == b"2"
    assert await store.delete("b", "missing") == 1
    other = open_store(redis_server.url if type(store).__name__ == "RedisStore" else "", "other")
    assert await other.get("b") is None
    await other.close()


async def test_counters_are_atomic(store):
    results = await asyncio.gather(*(store.incr("n", ttl=10) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))


async def test_lock_is_exclusive_and_released(store):
    async with store.lock("upload-1", ttl=5):
        with pytest.raises(Locked):
            async with store.lock("upload-1", ttl=5):
                pass
    async with store.lock("upload-1", ttl=5):
        pass


async def test_index_orders_by_score(store):
    for member, score in (("c", 3.0), ("a", 1.0), ("b", 2.0)):
        await store.index_add("tasks", member, score)
    assert [m for m, _ in await store.index_range("tasks", 10)] == ["a", "b", "c"]
    assert [m for m, _ in await store.index_range("tasks", 10, max_score=2.0)] == ["a", "b"]
    await store.index_remove("tasks", "a")
    assert [m for m, _ in await store.index_range("tasks", 1)] == ["b"]


async def test_queue_delivers_once_and_redelivers_what_a_dead_consumer_held(store):
    await store.queue_push("work", {"task": 1})
    await store.queue_push("work", {"task": 2})
    first = await store.queue_claim("work", "worker-a", wait=1)
    second = await store.queue_claim("work", "worker-b", wait=1)
    assert first is not None and second is not None
    assert {first[1]["task"], second[1]["task"]} == {1, 2}
    assert await store.queue_claim("work", "worker-b", wait=0.1) is None
    await store.queue_ack("work", second[0])
    assert await store.queue_length("work") == 1
    await asyncio.sleep(0.3)  # worker-a "died" holding the first item
    reclaimed = await store.queue_reclaim("work", "worker-c", idle=0.2)
    assert [item for _, item in reclaimed] == [first[1]]
    await store.queue_ack("work", reclaimed[0][0])
    assert await store.queue_length("work") == 0


async def test_claim_wakes_up_when_an_item_arrives(store):
    waiter = asyncio.create_task(store.queue_claim("later", "w", wait=5))
    await asyncio.sleep(0.1)
    await store.queue_push("later", {"x": 1})
    claimed = await asyncio.wait_for(waiter, 3)
    assert claimed is not None and claimed[1] == {"x": 1}


async def test_redis_outage_is_reported_and_recovered_from(redis_server):
    store = open_store(redis_server.url, f"t{secrets.token_hex(4)}")
    await store.set("k", b"v")
    redis_server.stop()
    try:
        with pytest.raises(StateUnavailable):
            await store.get("k")
    finally:
        redis_server.start()
    await store.set("k", b"again")  # a new connection, by itself
    assert await store.get("k") == b"again"
    await store.close()


async def test_a_lock_is_extended_and_an_expired_one_can_be_taken(store):
    async with store.lock("u", ttl=0.3) as held:
        await asyncio.sleep(0.2)
        await held.extend()
        await asyncio.sleep(0.2)
        with pytest.raises(Locked):  # still held thanks to the extension
            async with store.lock("u", ttl=0.3):
                pass
        await asyncio.sleep(0.4)  # now it lapsed: someone else takes it
        async with store.lock("u", ttl=5):
            with pytest.raises(Locked):
                await held.extend()
