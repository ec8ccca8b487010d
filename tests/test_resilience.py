"""Load and faults: admission control, retries, circuit breakers, several upstreams, health checks."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from fileproxy.policy.retry import RetryBudget
from tests.conftest import free_port
from tests.rawserver import RawServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"


async def timed_get(client: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, float, dict]:
    started = time.monotonic()
    async with client.get(url, **kwargs) as response:
        await response.read()
        return response.status, time.monotonic() - started, dict(response.headers)


async def test_full_queue_is_refused_at_once_with_retry_after(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, max_concurrent=2, max_queue_size=1, queue_timeout=10)
    url = f"{proxy.url}/slow-headers?delay=1.5"
    results = await asyncio.gather(*(timed_get(client, url) for _ in range(6)))
    refused = [r for r in results if r[0] == 503]
    assert sorted(r[0] for r in results) == [200, 200, 200, 503, 503, 503]
    assert all(elapsed < 0.5 and headers["Retry-After"].isdigit()
               for _, elapsed, headers in refused), refused


async def test_queue_wait_is_bounded(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, max_concurrent=1, max_queue_size=5, queue_timeout=0.3)
    slow = asyncio.create_task(timed_get(client, f"{proxy.url}/slow-headers?delay=1.5"))
    await asyncio.sleep(0.1)
    status, elapsed, headers = await timed_get(client, f"{proxy.url}/status/200")
    assert status == 503 and 0.25 < elapsed < 1.0 and "Retry-After" in headers
    assert (await slow)[0] == 200


async def test_per_client_limit_answers_429(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, max_per_client=1)
    slow = asyncio.create_task(timed_get(client, f"{proxy.url}/slow-headers?delay=1"))
    await asyncio.sleep(0.1)
    status, _, headers = await timed_get(client, f"{proxy.url}/status/200")
    assert status == 429 and headers["Retry-After"] == "1"
    assert (await slow)[0] == 200


async def test_admin_endpoints_bypass_admission(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, max_concurrent=1, max_queue_size=0)
    slow = asyncio.create_task(timed_get(client, f"{proxy.url}/slow-headers?delay=1"))
    await asyncio.sleep(0.1)
    assert (await timed_get(client, f"{proxy.url}/_fileproxy/health"))[0] == 200
    assert (await timed_get(client, f"{proxy.url}/status/200"))[0] == 503
    await slow


async def test_connect_error_is_retried_on_the_other_upstream(origin, make_proxy, client):
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await make_proxy(dead, origin.url, retry_backoff_factor=0.01)
    for _ in range(4):
        status, _, _ = await timed_get(client, f"{proxy.url}/status/200")
        assert status == 200
    async with client.get(f"{proxy.url}/_fileproxy/stats") as response:
        stats = await response.json()
    assert stats["retries"] >= 2 and stats["upstream_errors"]["connect"] >= 2


async def test_retry_status_goes_to_another_upstream_for_idempotent_requests(origin, make_proxy,
                                                                             client):
    async with RawServer(lambda _request: UNAVAILABLE) as busy:
        proxy = await make_proxy(busy.url, origin.url, retry_statuses=(503,),
                                 retry_backoff_factor=0.01)
        for _ in range(4):
            assert (await timed_get(client, f"{proxy.url}/status/200"))[0] == 200


async def test_post_whose_body_was_sent_is_not_retried(origin, make_proxy, client):
    async with RawServer(lambda _request: UNAVAILABLE) as busy:
        proxy = await make_proxy(busy.url, origin.url, retry_statuses=(503,),
                                 retry_backoff_factor=0.01, balance="least_in_flight")
        async with client.post(f"{proxy.url}/echo/order", data=b"pay once") as response:
            assert response.status == 503 and await response.read() == b"busy"
    assert len(busy.requests) == 1 and busy.requests[0].body == b"pay once"
    assert origin.events() == []


async def test_breaker_opens_fails_fast_and_closes_again(make_proxy, client):
    failing = {"on": True}
    async with RawServer(lambda _r: UNAVAILABLE if failing["on"] else OK) as flaky:
        proxy = await make_proxy(flaky.url, circuit_breaker_threshold=3, retry_statuses=(503,),
                                 circuit_breaker_timeout=0.5, max_retries=0)
        for _ in range(3):
            assert (await timed_get(client, f"{proxy.url}/x"))[0] == 503
        seen = len(flaky.requests)
        status, elapsed, headers = await timed_get(client, f"{proxy.url}/x")
        assert status == 503 and elapsed < 0.1 and "Retry-After" in headers
        assert len(flaky.requests) == seen, "while open, the upstream is not contacted"
        failing["on"] = False
        await asyncio.sleep(0.6)
        assert (await timed_get(client, f"{proxy.url}/x"))[0] == 200  # the half-open probe
        assert (await timed_get(client, f"{proxy.url}/x"))[0] == 200
        async with client.get(f"{proxy.url}/_fileproxy/metrics") as response:
            text = await response.text()
    assert 'fileproxy_circuit_transitions_total{from="closed",to="open"' in text
    assert 'from="half_open",to="closed"' in text


async def test_active_health_checks_eject_and_restore(origin, make_proxy, client):
    healthy = {"on": True}

    def answer(request):
        if request.head.startswith(b"GET /healthz"):
            return OK if healthy["on"] else UNAVAILABLE
        return OK

    async with RawServer(answer) as upstream:
        proxy = await make_proxy(upstream.url, health_check_path="/healthz",
                                 health_check_interval=0.05, unhealthy_threshold=2,
                                 healthy_threshold=2)
        assert await ready_becomes(client, proxy.url, 200)
        healthy["on"] = False
        assert await ready_becomes(client, proxy.url, 503)
        assert (await timed_get(client, f"{proxy.url}/file"))[0] == 503
        healthy["on"] = True
        assert await ready_becomes(client, proxy.url, 200)
        assert (await timed_get(client, f"{proxy.url}/file"))[0] == 200


async def ready_becomes(client: aiohttp.ClientSession, url: str, status: int) -> bool:
    for _ in range(60):
        if (await timed_get(client, f"{url}/_fileproxy/ready"))[0] == status:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_weighted_round_robin_and_least_in_flight(make_proxy, client):
    async with RawServer(lambda _r: OK) as a, RawServer(lambda _r: OK) as b:
        proxy = await make_proxy(f"{a.url} weight=3", b.url)
        for _ in range(40):
            await timed_get(client, f"{proxy.url}/x")
        assert (len(a.requests), len(b.requests)) == (30, 10)

    async with RawServer(lambda _r: OK) as fast, RawServer(lambda _r: OK) as other:
        proxy = await make_proxy(fast.url, other.url,
                                 balance="least_in_flight")
        for _ in range(10):
            await timed_get(client, f"{proxy.url}/x")
        assert len(fast.requests) == 10, "sequential requests: the first stays least loaded"


def test_retry_budget_caps_retries_to_a_share_of_requests():
    now = [1000.0]
    budget = RetryBudget(ratio=0.1, window=10, floor_per_second=0.5, clock=lambda: now[0])
    for _ in range(100):
        budget.record_request()
    spent = sum(budget.try_spend() for _ in range(50))
    assert spent == 15  # 10% of 100, plus a floor of 0.5/s over 10 s
    now[0] += 11
    assert budget.try_spend(), "the window moved on"


async def test_total_timeout_bounds_the_whole_exchange(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, total_timeout=0.5)
    status, elapsed, _ = await timed_get(client, f"{proxy.url}/slow-headers?delay=5")
    assert status == 504 and elapsed < 2
    async with client.get(f"{proxy.url}/slow-body?rate=10000&seconds=5") as response:
        try:
            await response.read()
            raise AssertionError("a body cut by the total timeout must not end cleanly")
        except aiohttp.ClientPayloadError:
            pass


async def test_stats_metrics_and_admin_token(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, admin_token="s3cret", legacy_endpoints=True)
    for path in ("/status/200", "/status/404", f"/bytes/{2 * 1024 * 1024}"):
        await timed_get(client, f"{proxy.url}{path}")
    assert (await timed_get(client, f"{proxy.url}/_fileproxy/stats"))[0] == 401
    auth = {"Authorization": "Bearer s3cret"}
    async with client.get(f"{proxy.url}/_fileproxy/stats", headers=auth) as response:
        stats = await response.json()
    assert stats["requests"]["total"] == 3
    assert stats["bytes"]["out"] >= 2 * 1024 * 1024
    assert stats["latency_seconds"]["p99"] is not None and stats["ttfb_seconds"]["avg"] > 0
    assert stats["admission"]["available_slots"] == 1000
    assert set(stats["upstreams"]) == {origin.url.removeprefix("http://")}
    async with client.get(f"{proxy.url}/_fileproxy/metrics", headers=auth) as response:
        text = await response.text()
    assert 'fileproxy_requests_total{outcome="ok",status="404"} 1.0' in text
    async with client.get(f"{proxy.url}/stats", headers=auth) as response:
        assert (await response.json())["requests"]["total"] >= 3
    async with client.get(f"{proxy.url}/proxy-health", headers=auth) as response:
        assert (await response.json())["ready"] is True


async def test_connect_timeout_is_504_and_retried_elsewhere(origin, make_proxy, client):
    """A listener whose accept queue is full drops SYNs: a real connect timeout on loopback."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the queue; later SYNs get no answer
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        fillers.append(sock)
    await asyncio.sleep(0.2)
    try:
        stuck = f"http://127.0.0.1:{port}"
        alone = await make_proxy(stuck, connect_timeout=0.3, max_retries=0)
        status, elapsed, _ = await timed_get(client, f"{alone.url}/x")
        assert status == 504 and elapsed < 2
        paired = await make_proxy(stuck, origin.url, connect_timeout=0.3,
                                  retry_backoff_factor=0.01)
        assert (await timed_get(client, f"{paired.url}/status/200"))[0] == 200
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


async def test_reset_before_headers_is_retried_on_another_upstream(origin, make_proxy, client):
    async with RawServer(lambda _request: None) as resetting:
        proxy = await make_proxy(resetting.url, origin.url, retry_backoff_factor=0.01)
        for _ in range(4):
            assert (await timed_get(client, f"{proxy.url}/status/200"))[0] == 200
    assert resetting.requests, "the resetting upstream was tried"


def test_breaker_opens_on_a_failure_ratio_too():
    from fileproxy.policy.breaker import CLOSED, OPEN, BreakerSettings, CircuitBreaker

    breaker = CircuitBreaker("u", BreakerSettings(threshold=0, failure_ratio=0.5, window=4))
    for failed in (False, True, False):
        breaker.record(failed)
        assert breaker.state == CLOSED, "fewer outcomes than the window: no verdict yet"
    breaker.record(True)  # 2 of the last 4 failed
    assert breaker.state == OPEN and not breaker.allow()


async def test_load_tool_counts_statuses_and_latencies(origin):
    from benchmarks.load import run_load

    result = await run_load(f"{origin.url}/status/204", concurrency=5, requests=50,
                            progress=False)
    summary = result.summary()
    assert summary["statuses"] == {"204": 50} and summary["errors"] == {}
    assert summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0


async def test_load_tool_warm_up_requests_are_not_measured(origin, client):
    from benchmarks.load import run_load

    result = await run_load(f"{origin.url}/echo/warm", concurrency=4, requests=20,
                            progress=False, warm_up=True)
    assert result.summary()["statuses"] == {"200": 20}
    async with client.get(f"{origin.url}/_origin/events") as response:
        events = (await response.json())["events"]
    assert sum(1 for event in events if event["path"] == "/echo/warm"
               and event["event"] == "body-complete") == 24  # 4 unmeasured + 20
