"""Async task mode over real sockets, with the in-memory store and with a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import secrets

import pytest

from fileproxy.features.tasks import TASKS
from tests.pattern import pattern_sha256

ADMIN = {"Authorization": "Bearer s3cret"}
ASYNC = {"Prefer": "respond-async"}


async def wait_status(client, url: str, wanted: set[str], seconds: float = 10) -> dict:
    for _ in range(int(seconds / 0.05)):
        async with client.get(url) as response:
            record = await response.json()
        if record["status"] in wanted:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"task never reached {wanted}: {record}")


def redis_settings(redis_server) -> dict:
    return {"redis_url": redis_server.url, "state_prefix": f"t{secrets.token_hex(4)}"}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_submit_poll_and_replay_the_result(origin, make_proxy, client, redis_server,
                                                 backend):
    settings = redis_settings(redis_server) if backend == "redis" else {}
    proxy = await make_proxy(origin.url, **settings)
    body = b"work order " * 1000
    async with client.post(f"{proxy.url}/echo/job?x=1", data=body, headers=ASYNC) as response:
        assert response.status == 202
        assert response.headers["Preference-Applied"] == "respond-async"
        accepted = await response.json()
    assert response.headers["Location"] == accepted["status_url"]
    assert len(accepted["task_id"]) >= 32  # the id is the capability: unguessable
    record = await wait_status(client, proxy.url + accepted["status_url"], {"completed"})
    assert record["upstream_status"] == 200 and record["attempts"] == 1
    async with client.get(proxy.url + accepted["status_url"] + "/result") as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["raw_path"] == "/echo/job?x=1" and echoed["method"] == "POST"
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_submit_on_one_instance_collect_on_another(origin, make_proxy, client,
                                                         redis_server):
    settings = redis_settings(redis_server)
    first = await make_proxy(origin.url, task_concurrency=1, **settings)
    second = await make_proxy(origin.url, **settings)
    async with client.get(f"{first.url}/status/201", headers=ASYNC) as response:
        status_url = (await response.json())["status_url"]
    record = await wait_status(client, second.url + status_url, {"completed"})
    assert record["upstream_status"] == 201


async def test_large_result_streams_from_the_spool_byte_exact(origin, make_proxy, client,
                                                              tmp_path, redis_server):
    size = 3 * 1024 * 1024 + 5
    proxy = await make_proxy(origin.url, task_inline_max=64 * 1024, spool_dir=str(tmp_path),
                             **redis_settings(redis_server))
    async with client.get(f"{proxy.url}/bytes/{size}", headers=ASYNC) as response:
        status_url = (await response.json())["status_url"]
    await wait_status(client, proxy.url + status_url, {"completed"})
    assert list(tmp_path.glob("tasks/*.result")), "the result went to the spool"
    async with client.get(proxy.url + status_url + "/result") as response:
        assert response.headers["Content-Length"] == str(size)
        assert hashlib.sha256(await response.read()).hexdigest() == pattern_sha256(size)


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_result_cut_mid_body_is_continued_byte_exact(origin, make_proxy, client,
                                                             tmp_path, how):
    """Fetching a task's result resumes like relaying does: Range + If-Range from the byte the
    kept result ends at, one complete result, one attempt."""
    size = 3 * 1024 * 1024 + 5
    proxy = await make_proxy(origin.url, task_inline_max=64 * 1024, spool_dir=str(tmp_path))
    async with client.get(f"{proxy.url}/flaky/{size}?cuts=2&key=task-{how}&how={how}",
                          headers=ASYNC) as response:
        status_url = (await response.json())["status_url"]
    record = await wait_status(client, proxy.url + status_url, {"completed", "failed"})
    assert (record["status"], record["attempts"], record["bytes_received"]) == (
        "completed", 1, size)
    async with client.get(proxy.url + status_url + "/result") as response:
        assert hashlib.sha256(await response.read()).hexdigest() == pattern_sha256(size)
    ranges = [event["range"] for event in origin.events("flaky")]
    assert ranges[0] is None and len(ranges) == 3 and ranges[2].endswith(f"-{size - 1}")


async def test_a_changed_result_is_not_stitched(origin, make_proxy, client):
    proxy = await make_proxy(origin.url)
    async with client.get(f"{proxy.url}/flaky/{1024 * 1024}?cuts=1&key=task-changed&seed=2",
                          headers=ASYNC) as response:
        status_url = (await response.json())["status_url"]
    record = await wait_status(client, proxy.url + status_url, {"completed", "failed"})
    assert record["status"] == "failed" and "not resumed" in record["error"]


async def test_cancel_stops_the_upstream_call(origin, make_proxy, client):
    proxy = await make_proxy(origin.url)
    async with client.get(f"{proxy.url}/slow-headers?delay=30", headers=ASYNC) as response:
        status_url = (await response.json())["status_url"]
    await wait_status(client, proxy.url + status_url, {"processing"})
    for _ in range(100):  # until the upstream has the request in hand
        if origin.connections():
            break
        await asyncio.sleep(0.02)
    async with client.delete(proxy.url + status_url) as response:
        assert (await response.json())["status"] == "cancelled"
    for _ in range(60):
        if origin.events("cancelled"):
            break
        await asyncio.sleep(0.05)
    assert origin.events("cancelled"), "the upstream request was really stopped"
    assert (await wait_status(client, proxy.url + status_url, {"cancelled"}))["error"]


async def test_async_route_for_clients_without_the_header(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, async_route=("POST /api/*",))
    async with client.post(f"{proxy.url}/api/render", data=b"x") as response:
        assert response.status == 202
    async with client.post(f"{proxy.url}/echo/render", data=b"x") as response:
        assert response.status == 200, "other routes are proxied as usual"


async def test_redis_down_tasks_503_plain_proxying_works(origin, make_proxy, client,
                                                         redis_server):
    proxy = await make_proxy(origin.url, **redis_settings(redis_server))
    async with client.get(f"{proxy.url}/_fileproxy/ready") as response:
        assert (await response.json())["state_store"] == "redis"
    redis_server.stop()
    try:
        async with client.get(f"{proxy.url}/status/200", headers=ASYNC) as response:
            assert response.status == 503 and "task store is unavailable" in await response.text()
        async with client.get(f"{proxy.url}/_fileproxy/ready") as response:
            assert response.status == 503, "not ready while Redis is unreachable"
        async with client.get(f"{proxy.url}/status/200") as response:
            assert response.status == 200
    finally:
        redis_server.start()
    async with client.get(f"{proxy.url}/status/200", headers=ASYNC) as response:
        assert response.status == 202, "the store reconnected by itself"


async def test_tasks_expire_and_can_be_cleaned_up(origin, make_proxy, client, redis_server):
    proxy = await make_proxy(origin.url, task_ttl=0.5, admin_token="s3cret",
                             **redis_settings(redis_server))
    async with client.get(f"{proxy.url}/status/200", headers=ASYNC) as response:
        status_url = (await response.json())["status_url"]
    await wait_status(client, proxy.url + status_url, {"completed"})
    await asyncio.sleep(0.7)
    async with client.get(proxy.url + status_url) as response:
        assert response.status == 404
    async with client.get(f"{proxy.url}/status/200", headers=ASYNC) as response:
        assert response.status == 202
    async with client.delete(f"{proxy.url}/_fileproxy/tasks?older_than=0s",
                             headers=ADMIN) as response:
        assert (await response.json())["removed"] >= 1


async def test_a_task_whose_worker_stopped_runs_again_elsewhere(origin, make_proxy, client,
                                                                redis_server):
    settings = {**redis_settings(redis_server), "task_visibility_timeout": 0.5,
                "task_concurrency": 1}
    first = await make_proxy(origin.url, **settings)
    # The upstream takes long enough that the first instance cannot finish before it stops.
    async with client.get(f"{first.url}/slow-headers?delay=4", headers=ASYNC) as response:
        status_url = (await response.json())["status_url"]
    await wait_status(client, first.url + status_url, {"processing"})
    assert first.app[TASKS].running, "the first instance runs it"
    await first.runner.cleanup()  # the worker goes away mid-task, its claim unacked
    second = await make_proxy(origin.url, **settings)
    record = await wait_status(client, second.url + status_url, {"completed"}, seconds=15)
    assert record["attempts"] == 2 and record["upstream_status"] == 200


async def test_listing_metrics_full_queue_and_a_spooled_body(origin, make_proxy, client, tmp_path):
    proxy = await make_proxy(origin.url, task_inline_max=64 * 1024, spool_dir=str(tmp_path),
                             task_queue_size=2, task_concurrency=1, admin_token="s3cret")
    big = b"B" * (2 * 1024 * 1024 + 1)
    async with client.put(f"{proxy.url}/echo/big", data=big, headers=ASYNC) as response:
        big_url = (await response.json())["status_url"]
    await wait_status(client, proxy.url + big_url, {"completed"})
    async with client.get(proxy.url + big_url + "/result") as response:
        assert (await response.json())["body_sha256"] == hashlib.sha256(big).hexdigest()
    # one task running, one queued: the queue is full
    for _ in range(2):
        async with client.get(f"{proxy.url}/slow-headers?delay=2", headers=ASYNC) as response:
            assert response.status == 202
    async with client.get(f"{proxy.url}/status/200", headers=ASYNC) as response:
        assert response.status == 503 and response.headers["Retry-After"]
    async with client.get(f"{proxy.url}/_fileproxy/tasks?status=completed&limit=10",
                          headers=ADMIN) as response:
        listed = (await response.json())["tasks"]
    assert [t["status_url"] for t in listed] == [big_url]
    async with client.get(f"{proxy.url}/_fileproxy/stats", headers=ADMIN) as response:
        tasks = (await response.json())["tasks"]
    assert tasks["submitted"] == 3 and tasks["completed"] == 1 and tasks["running"] == 1
