"""Failure semantics: upstream answers passed on as they are, timeouts not multiplied, breaker probes
given back, background loops that start again, a Redis that lost its keys repaired, poisoned work
refused before it is stored."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import threading
import time

import aiohttp
import pytest

from fileproxy.core.keys import UPSTREAMS
from fileproxy.features.spoolfile import SpoolFile
from fileproxy.features.uploads import UPLOADS
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


class Flaky:
    """A raw upstream that drops the first `drops` requests without answering, then answers."""

    def __init__(self, drops: int, answer: bytes) -> None:
        self.drops, self.answer = drops, answer

    def __call__(self, _request) -> bytes | None:
        if self.drops:
            self.drops -= 1
            return None
        return self.answer


async def upload_whole(client, proxy, body: bytes, **meta: str) -> str:
    """creation-with-upload: one POST with every byte; the delivery task's status URL."""
    async with client.post(f"{proxy.url}/_fileproxy/uploads", data=body, headers={
            **TUS, "Upload-Length": str(len(body)), "Content-Type": "application/offset+octet-stream",
            "Upload-Metadata": metadata(target="/files/a", **meta)}) as response:
        assert response.status == 201, await response.text()
        return proxy.url + response.headers["Fileproxy-Delivery"]


async def final_record(client, status_url: str, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        async with client.get(status_url) as response:
            record = await response.json()
        if record["status"] in ("completed", "failed"):
            return record
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.05)


async def test_an_acknowledged_upload_is_delivered_after_upstream_failures(make_proxy, client):
    """The upstream resets the delivery twice: it is sent again (with backoff) until accepted,
    once, byte-exact, with the upload's Idempotency-Key."""
    flaky = Flaky(2, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    async with RawServer(flaky) as upstream:
        proxy = await make_proxy(upstream.url, upload_delivery_backoff=0.05,
                                 upload_delivery_wait=0, max_retries=0,
                                 circuit_breaker_threshold=100)
        body = b"payload " * 1000
        record = await final_record(client, await upload_whole(client, proxy, body))
        assert record["status"] == "completed" and record["upstream_status"] == 201
        assert record["attempts"] >= 2 and len(upstream.requests) == 3
        answered = [r for r in upstream.requests if r.body]
        assert len(answered) == 1 and answered[0].body == body
        assert b"idempotency-key: " in answered[0].head.lower()
        async with client.get(f"{proxy.url}/_fileproxy/metrics") as response:
            assert 'fileproxy_uploads_total{event="delivered"} 1.0' in await response.text()


async def test_a_delivery_the_upstream_refuses_fails_and_says_why(make_proxy, client, caplog):
    caplog.set_level(logging.WARNING, "fileproxy.features.tasks")
    refuse = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    async with RawServer(lambda _: refuse) as upstream:
        proxy = await make_proxy(upstream.url, upload_delivery_backoff=0.05,
                                 upload_delivery_wait=0)
        record = await final_record(client, await upload_whole(client, proxy, b"abc"))
        assert record["status"] == "failed" and "403" in record["error"]
        assert len(upstream.requests) == 1, "a refusal is not a reason to try again"
        async with client.get(f"{proxy.url}/_fileproxy/metrics") as response:
            assert 'fileproxy_uploads_total{event="delivery_failed"} 1.0' in await response.text()
    assert any("failed for good" in r.getMessage() for r in caplog.records)


async def test_a_delivery_stops_trying_when_the_upload_expires(make_proxy, client):
    async with RawServer(lambda _: None) as upstream:  # never answers: always reset
        proxy = await make_proxy(upstream.url, upload_delivery_backoff=0.2, upload_ttl=1,
                                 upload_delivery_wait=0, max_retries=0,
                                 circuit_breaker_threshold=100)
        record = await final_record(client, await upload_whole(client, proxy, b"abc"))
        assert record["status"] == "failed" and record["attempts"] >= 2
        assert record["finished"] - record["created"] < 2


async def test_ready_is_503_while_the_only_upstream_has_its_circuit_open(origin, make_proxy,
                                                                         client):
    proxy = await make_proxy(origin.url, circuit_breaker_threshold=1, circuit_breaker_timeout=0.2)
    breaker = proxy.app[UPSTREAMS].members[0].breaker
    async with client.get(f"{proxy.url}/truncate?size=100000&send=10") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await wait_for(lambda: breaker.state == OPEN)
    await wait_for(lambda: breaker.retry_after() == 0)  # a probe could go: still not ready
    async with client.get(f"{proxy.url}/_fileproxy/ready") as response:
        assert response.status == 503
        assert (await response.json())["upstreams"][origin.url.split("//")[1]]["circuit"] == OPEN


async def test_metrics_carry_the_prometheus_content_type(origin, make_proxy, client):
    proxy = await make_proxy(origin.url)
    async with client.get(f"{proxy.url}/_fileproxy/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")


async def test_an_async_submit_with_expect_gets_its_continue_at_once(origin, make_proxy):
    proxy = await make_proxy(origin.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /echo/task HTTP/1.1\r\nHost: t\r\nPrefer: respond-async\r\n"
                 b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 202 ")
    writer.close()


async def test_client_aborts_are_not_counted_as_failures(origin, make_proxy, client):
    proxy = await make_proxy(origin.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /bytes/50000000 HTTP/1.1\r\nHost: t\r\n\r\n")
    await reader.readexactly(100_000)
    writer.transport.abort()  # the client leaves mid-body

    async def requests() -> dict:
        async with client.get(f"{proxy.url}/_fileproxy/stats") as response:
            return (await response.json())["requests"]

    deadline = time.monotonic() + 10
    while "client_aborted" not in (counted := await requests())["by_outcome"]:
        assert time.monotonic() < deadline, counted
        await asyncio.sleep(0.05)
    assert counted["failed"] == 0


async def test_bytes_in_count_upload_and_task_bodies(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, upload_delivery_wait=0)
    await upload_whole(client, proxy, b"u" * 3000)
    async with client.post(f"{proxy.url}/echo/t", data=b"t" * 2000,
                           headers={"Prefer": "respond-async"}) as response:
        assert response.status == 202
    async with client.get(f"{proxy.url}/_fileproxy/stats") as response:
        assert (await response.json())["bytes"]["in"] >= 5000


async def test_the_task_list_needs_an_admin_token_with_the_bearer_scheme(origin, make_proxy,
                                                                         client):
    open_proxy = await make_proxy(origin.url)
    async with client.get(f"{open_proxy.url}/_fileproxy/tasks") as response:
        assert response.status == 403, "no token configured: no listing of capabilities"
    proxy = await make_proxy(origin.url, admin_token="s3cret")
    for authorization, status in (("s3cret", 401), ("Basic s3cret", 401),
                                  ("Bearer s3cret", 200), ("bearer s3cret", 200)):
        async with client.get(f"{proxy.url}/_fileproxy/tasks",
                              headers={"Authorization": authorization}) as response:
            assert response.status == status, authorization


@pytest.mark.parametrize("found_by", ["head", "sweep"])
async def test_an_upload_complete_without_its_delivery_is_handed_over(origin, make_proxy, client,
                                                                      found_by):
    """The state a worker or the store leaves when it dies between keeping the last byte and
    handing the upload to its delivery: a HEAD (the client asking where it stands) or the sweep
    hands it over, and the file reaches the upstream once."""
    proxy = await make_proxy(origin.url, upload_delivery_wait=0,
                             upload_sweep_interval=0.2 if found_by == "sweep" else 3600)
    body = b"stranded " * 1000
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers={
            **TUS, "Upload-Length": str(len(body)),
            "Upload-Metadata": metadata(target="/echo/stranded")}) as response:
        upload_url = proxy.url + response.headers["Location"]
    uploads = proxy.app[UPLOADS]
    upload = await uploads.load(upload_url.rsplit("/", 1)[1])
    uploads.path(upload.id).write_bytes(body)  # every byte kept, as the PATCH left it ...
    upload.offset = len(body)
    await uploads.save(upload)  # ... and its offset recorded, but no delivery handed over
    if found_by == "head":
        async with client.head(upload_url, headers=TUS) as response:
            assert int(response.headers["Upload-Offset"]) == len(body)
    await wait_for(lambda: len(origin.events("body-complete")) == 1)
    assert origin.events("body-complete")[0]["sha256"] == hashlib.sha256(body).hexdigest()
    await asyncio.sleep(0.5)  # (a second sweep or HEAD must not send it again)
    async with client.head(upload_url, headers=TUS) as response:
        assert response.status == 200
    await asyncio.sleep(0.3)
    assert len(origin.events("body-complete")) == 1


async def test_spool_writes_and_fsync_run_off_the_event_loop(tmp_path):
    """Every disk operation of a spool file runs in a worker thread, never the loop's."""
    loop_thread = threading.get_ident()
    seen: list[int] = []

    class Recording(io.FileIO):
        def write(self, data):  # type: ignore[override]
            seen.append(threading.get_ident())
            return super().write(data)

        def flush(self) -> None:
            seen.append(threading.get_ident())
            super().flush()

    spooled = SpoolFile(Recording(tmp_path / "part", "w+b"))  # type: ignore[arg-type]
    await spooled.write(b"x" * 1024)
    await spooled.sync()
    await spooled.close()
    assert (tmp_path / "part").read_bytes() == b"x" * 1024
    assert seen and loop_thread not in seen


async def test_an_evicting_redis_is_warned_about_at_start(origin, make_proxy, redis_server,
                                                          caplog):
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.config_set("maxmemory-policy", "allkeys-lru")
    try:
        caplog.set_level(logging.WARNING, "fileproxy.state")
        await make_proxy(origin.url, redis_url=redis_server.url)
        assert any("maxmemory-policy is allkeys-lru" in r.getMessage() for r in caplog.records)
    finally:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.aclose()
