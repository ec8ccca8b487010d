"""Failure semantics: upstream answers passed on as they are, timeouts not multiplied, breaker probes
given back, background loops that start again, a Redis that lost its keys repaired, poisoned work
refused before it is stored."""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import aiohttp
import pytest

from fileproxy.core.keys import UPSTREAMS
from fileproxy.loops import supervised
from fileproxy.policy.breaker import CLOSED, HALF_OPEN, OPEN
from tests.conftest import MATRIX, MATRIX_IDS
from tests.rawserver import RawServer

TUS = {"Tus-Resumable": "1.0.0"}


def answer_503(_request) -> bytes:
    return b"HTTP/1.1 503 Service Unavailable\r\nServer: raw-origin\r\nContent-Length: 4\r\n\r\nbusy"


async def wait_for(condition, seconds: float = 10.0) -> None:
    """Until `condition()` holds (checked every 20 ms), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_an_upstream_503_is_passed_on_and_never_opens_the_circuit(make_proxy, client):
    async with RawServer(answer_503) as upstream:
        proxy = await make_proxy(upstream.url, circuit_breaker_threshold=3)
        for _ in range(10):
            async with client.get(f"{proxy.url}/busy") as response:
                assert response.status == 503
                assert response.headers["Server"] == "raw-origin"
                assert await response.read() == b"busy"
        assert len(upstream.requests) == 10, "an upstream's own answer is not retried"
        assert proxy.app[UPSTREAMS].members[0].breaker.state == CLOSED


async def test_listed_statuses_are_still_retried_and_counted(make_proxy, client):
    async with RawServer(answer_503) as upstream:
        proxy = await make_proxy(upstream.url, retry_statuses=(503,), max_retries=2,
                                 retry_backoff_factor=0.01, circuit_breaker_threshold=100)
        async with client.get(f"{proxy.url}/busy") as response:
            assert response.status == 503
        assert len(upstream.requests) == 3


async def test_a_read_timeout_is_not_multiplied_by_retries(origin, make_proxy, client):
    """One upstream: the GET that timed out is not sent to it again (504 after one timeout)."""
    proxy = await make_proxy(origin.url, read_timeout=1, max_retries=2)
    started = time.monotonic()
    async with client.get(f"{proxy.url}/slow-headers?delay=5") as response:
        assert response.status == 504
    assert time.monotonic() - started < 1.9
    assert len(origin.events("cancelled")) <= 1


async def test_a_read_timeout_is_retried_on_another_upstream(make_proxy, client):
    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    silent = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    silent_url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    try:
        async with RawServer(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as fast:
            proxy = await make_proxy(silent_url, fast.url, read_timeout=1, max_retries=2,
                                     retry_backoff_factor=0.01, circuit_breaker_threshold=100)
            for _ in range(2):  # round robin: one of the two starts on the silent upstream
                async with client.get(f"{proxy.url}/") as response:
                    assert response.status == 200
                    assert await response.read() == b"ok"
    finally:
        silent.close()


@pytest.mark.parametrize("paths", MATRIX, ids=MATRIX_IDS)
async def test_a_probe_whose_client_leaves_gives_its_slot_back(origin, make_proxy, client, paths):
    fast_path, lean_client = paths
    proxy = await make_proxy(origin.url, fast_path=fast_path, lean_client=lean_client,
                             circuit_breaker_threshold=1, circuit_breaker_timeout=0.3,
                             max_retries=0)
    breaker = proxy.app[UPSTREAMS].members[0].breaker
    async with client.get(f"{proxy.url}/truncate?size=100000&send=10") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await wait_for(lambda: breaker.state == OPEN)
    await wait_for(lambda: breaker.retry_after() == 0)
    with pytest.raises(TimeoutError):  # the probe's client leaves before the upstream answers
        async with client.get(f"{proxy.url}/slow-headers?delay=3",
                              timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    await wait_for(lambda: breaker.state == HALF_OPEN and breaker.probes_in_flight == 0)
    async with client.get(f"{proxy.url}/status/200") as response:
        assert response.status == 200
    assert breaker.state == CLOSED


async def test_a_background_loop_that_fails_starts_again_and_says_why(caplog):
    runs: list[float] = []
    again = asyncio.Event()

    async def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("first run breaks")
        again.set()
        await asyncio.sleep(3600)

    caplog.set_level(logging.ERROR, "fileproxy.loops")
    loop = asyncio.create_task(supervised("flaky loop", flaky, first_delay=0.01))
    await asyncio.wait_for(again.wait(), 5)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    failure = next(r for r in caplog.records if "flaky loop" in r.getMessage())
    assert failure.exc_info is not None and "first run breaks" in str(failure.exc_info[1])


async def test_tasks_run_again_after_redis_restarts_empty(origin, make_proxy, client,
                                                          redis_server):
    """A Redis that restarted without its keys (NOGROUP) is repaired by the worker that sees it."""
    proxy = await make_proxy(origin.url, redis_url=redis_server.url, task_concurrency=2)

    async def run_one() -> dict:
        async with client.get(f"{proxy.url}/status/201",
                              headers={"Prefer": "respond-async"}) as response:
            assert response.status == 202, await response.text()
            status_url = proxy.url + (await response.json())["status_url"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            async with client.get(status_url) as response:
                record = await response.json()
            if record["status"] in ("completed", "failed"):
                return record
            await asyncio.sleep(0.05)
        raise AssertionError(f"task still {record['status']}")

    assert (await run_one())["upstream_status"] == 201
    redis_server.stop()
    redis_server.start()  # no persistence in the test's redis: it comes back empty
    records = await asyncio.gather(*(run_one() for _ in range(4)))
    assert [r["status"] for r in records] == ["completed"] * 4


def metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in values.items())


@pytest.mark.parametrize("meta", [
    {"target": "/x", "method": "CONNECT"},
    {"target": "/x", "method": "GET http://x/"},
    {"target": "/x", "method": "PUT\r\nX-Injected: 1"},
    {"target": "/x", "filetype": "text/plain\r\nX-Injected: 1"},
    {"target": "/x", "filename": "a\x00b"},
    {"target": "/x\r\nHost: elsewhere"},
], ids=["connect", "absolute-form-in-method", "crlf-in-method", "crlf-in-filetype", "nul",
        "crlf-in-target"])
async def test_poisoned_upload_metadata_is_refused_at_creation(origin, make_proxy, client, meta):
    proxy = await make_proxy(origin.url)
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers={
            **TUS, "Upload-Length": "3", "Upload-Metadata": metadata(**meta)}) as response:
        assert response.status == 400, await response.text()
    assert origin.connections() == 0


async def test_upload_metadata_over_the_header_limit_is_refused(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, max_header_size=4096)
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers={
            **TUS, "Upload-Length": "3",
            "Upload-Metadata": metadata(target="/x", note="n" * 5000)}) as response:
        assert response.status == 431
