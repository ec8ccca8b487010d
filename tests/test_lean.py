"""The lean upstream client for GETs (fileproxy/lean.py): the shapes it must get right, against
aiohttp's client on the same requests (--no-lean-client)."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aiohttp
import pytest

from fileproxy.config import Config
from fileproxy.upstream.lean import UPSTREAM_MAX_FIELD_SIZE, LeanPool
from tests.conftest import free_port, raw_exchange
from tests.pattern import pattern_sha256
from tests.rawserver import RawRequest, RawServer
from tests.test_streaming import sha256_of

MIB = 1024 * 1024
# Each shape through: the fast path and the lean client (the default), aiohttp's server and the
# lean client, the fast path and aiohttp's client.
BOTH = pytest.mark.parametrize("lean", [{"lean_client": True},
                                        {"lean_client": True, "fast_path": False},
                                        {"lean_client": False}],
                               ids=["fast-lean", "aiohttp-server-lean", "aiohttp-client"])
# Both server paths, with the lean client.
FAST_PATH = pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-server"])


@FAST_PATH
async def test_early_hints_reach_the_client_before_the_final_response(origin, make_proxy,
                                                                      fast_path):
    """(The lean client's: aiohttp's drops interim responses.)"""
    proxy = await make_proxy(origin.url, lean_client=True, fast_path=fast_path)
    raw = await raw_exchange(proxy.port, b"GET /early-hints HTTP/1.1\r\nHost: t\r\n"
                                         b"Connection: close\r\n\r\n")
    hints, _, final = raw.partition(b"\r\n\r\n")
    assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"Link: </a.css>; rel=preload" in hints
    assert final.startswith(b"HTTP/1.1 200 OK") and final.endswith(b"after hints\n")


@FAST_PATH
async def test_early_hints_are_not_sent_to_an_http_1_0_client(origin, make_proxy, fast_path):
    proxy = await make_proxy(origin.url, lean_client=True, fast_path=fast_path)
    raw = await raw_exchange(proxy.port, b"GET /early-hints HTTP/1.0\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.0 200 OK") or raw.startswith(b"HTTP/1.1 200 OK")
    assert b"103" not in raw.partition(b"\r\n")[0]


@BOTH
async def test_chunked_and_length_bodies_byte_exact(origin, make_proxy, client, lean):
    proxy = await make_proxy(origin.url, **lean)
    for query, size in (("?chunked=1", 3 * MIB + 7), ("", 5 * MIB + 1), ("", 10)):
        async with client.get(f"{proxy.url}/bytes/{size}{query}") as response:
            assert response.status == 200
            assert (response.headers.get("Content-Length") is None) == bool(query)
            assert await sha256_of(response) == (pattern_sha256(size), size)


def close_delimited(request) -> bytes:
    return b"HTTP/1.1 200 OK\r\nX-Shape: close-delimited\r\nConnection: close\r\n\r\nuntil close"


@BOTH
async def test_a_body_delimited_by_close_is_relayed_whole(make_proxy, client, lean):
    async with RawServer(close_delimited) as origin:
        proxy = await make_proxy(origin.url, **lean)
        for _ in range(2):
            async with client.get(f"{proxy.url}/x") as response:
                assert response.headers["X-Shape"] == "close-delimited"
                assert await response.read() == b"until close"
        assert origin.connections == 2, "a connection that ended the body is not reused"


def garbage(request) -> bytes:
    return b"HTTP/1.1 2xx What\r\nNo colon here\r\n\r\n"


@BOTH
async def test_an_invalid_upstream_response_is_502(make_proxy, client, lean):
    async with RawServer(garbage) as origin:
        proxy = await make_proxy(origin.url, **lean)
        async with client.get(f"{proxy.url}/x") as response:
            assert response.status == 502
            assert "invalid response" in await response.text()


@BOTH
async def test_a_client_that_reads_nothing_holds_the_upstream_back(origin, make_proxy, lean):
    """Backpressure: the proxy reads the upstream no faster than the client drains, so with a
    client that reads nothing the origin cannot finish a body larger than the socket buffers."""
    proxy = await make_proxy(origin.url, **lean, socket_relay="off")
    size = 96 * MIB
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 20)
    writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(1.5)
    assert not origin.events("bytes-sent"), "the proxy read ahead of a client that reads nothing"
    received = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
        received += len(chunk)
    writer.close()
    assert received > size and origin.events("bytes-sent")


async def test_pooled_lean_connections_show_in_stats(proxy, client):
    for _ in range(5):
        async with client.get(f"{proxy.url}/status/200") as response:
            await response.read()
    async with client.get(f"{proxy.url}/_fileproxy/stats") as response:
        pool = (await response.json())["connection_pool"]
    assert pool["idle"] >= 1 and pool["open"] >= pool["idle"]


# ---------------------------------------------------------------- pool limits


class HoldingServer(RawServer):
    """An upstream that answers each request after `hold` seconds, on keep-alive connections,
    and counts the connections it accepted and the most it had open at once."""

    def __init__(self, hold: float) -> None:
        super().__init__(lambda request: None)
        self.hold = hold
        self.open = self.peak = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(self.hold)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nheld\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def fetch(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.get(url) as response:
        return response.status, await response.text()


@FAST_PATH
async def test_pool_size_caps_open_lean_connections(make_proxy, client, fast_path):
    async with HoldingServer(hold=0.2) as upstream:
        proxy = await make_proxy(upstream.url, lean_client=True, fast_path=fast_path, pool_size=2)
        answers = await asyncio.gather(*(fetch(client, f"{proxy.url}/{n}") for n in range(6)))
        assert answers == [(200, "held\n")] * 6
        assert upstream.peak == 2
        assert upstream.connections == 2, "a released connection goes to the next in line"


@FAST_PATH
async def test_pool_size_per_host_caps_each_upstream(make_proxy, client, fast_path):
    async with HoldingServer(hold=0.2) as first, HoldingServer(hold=0.2) as second:
        proxy = await make_proxy(first.url, second.url, lean_client=True, fast_path=fast_path,
                                 pool_size_per_host=1, max_retries=0)
        answers = await asyncio.gather(*(fetch(client, f"{proxy.url}/{n}") for n in range(6)))
        assert answers == [(200, "held\n")] * 6
        assert (first.peak, second.peak) == (1, 1)
        assert (first.connections, second.connections) == (1, 1)


async def test_waiting_for_a_slot_past_the_connect_timeout_is_504(make_proxy, client):
    async with HoldingServer(hold=1.5) as upstream:
        proxy = await make_proxy(upstream.url, lean_client=True, pool_size=1,
                                 connect_timeout=0.3, max_retries=0)
        holder = asyncio.create_task(fetch(client, f"{proxy.url}/held"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        status, text = await fetch(client, f"{proxy.url}/waits")
        assert status == 504 and "connecting to upstream" in text
        assert time.monotonic() - started < 1.2, "it gave up at the connect timeout"
        assert await holder == (200, "held\n")
        assert await fetch(client, f"{proxy.url}/after") == (200, "held\n")
        assert upstream.peak == 1 and upstream.connections == 1, "the timed-out wait kept no slot"


async def test_an_idle_connection_of_another_upstream_is_closed_to_make_room(make_proxy, client):
    async with HoldingServer(hold=0) as first, HoldingServer(hold=0) as second:
        proxy = await make_proxy(first.url, second.url, lean_client=True, pool_size=1,
                                 connect_timeout=0.5, max_retries=0)
        for n in range(4):  # round robin: each request finds the other upstream's idle connection
            assert await fetch(client, f"{proxy.url}/{n}") == (200, "held\n")
        assert (first.connections, second.connections) == (2, 2)
        assert first.open + second.open <= 1


async def test_a_cancelled_wait_leaves_no_waiter_and_no_slot():
    async with HoldingServer(hold=0) as upstream:
        pool = LeanPool(Config(upstream=(upstream.url,), pool_size=1))
        key = address(upstream.url)
        first = await pool.connect(key, "up")
        waiting = asyncio.create_task(pool.connect(key, "up"))
        await asyncio.sleep(0.05)
        assert len(pool.waiters) == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not pool.waiters and pool.open == 1
        first.close()
        assert pool.open == 0
        second = await asyncio.wait_for(pool.connect(key, "up"), 1)
        assert pool.open == 1
        second.close()


@pytest.mark.parametrize("release", ["close", "put_back"])
async def test_what_a_cancelled_waiter_was_just_handed_is_given_back(release):
    """Cancelled in the same turn as it was handed a slot (or an idle connection), the waiter
    frees the slot (returns the connection to the pool) instead of keeping it."""
    async with HoldingServer(hold=0) as upstream:
        pool = LeanPool(Config(upstream=(upstream.url,), pool_size=1))
        key = address(upstream.url)
        first = await pool.connect(key, "up")
        waiting = asyncio.create_task(pool.connect(key, "up"))
        await asyncio.sleep(0.05)
        if release == "close":
            first.close()
        else:
            pool.put_back(first)
        assert not pool.waiters
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        if release == "close":
            assert pool.open == 0
        else:
            assert pool.open == 1 and pool.idle[key] == [first] and not first.closed
            assert pool.take_idle(key) is first
            first.close()
        assert pool.open == 0 and not pool.in_use


async def test_a_failed_connect_frees_its_slot():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connecting is refused
    pool, key = LeanPool(Config(upstream=(url,), pool_size=1)), address(url)
    for _ in range(3):
        with pytest.raises(Exception, match="unreachable"):
            await pool.connect(key, "up")
        assert pool.open == 0 and not pool.open_per_host


# ---------------------------------------------------------------- response head limits


def header_heavy(request: RawRequest) -> bytes:
    """/fields/N: N small header fields; /long/K: one header of K KiB; /endless/K: a header of
    K KiB that never ends (the answer stops mid-line)."""
    _, kind, number = request.head.split(b" ", 2)[1].decode().split("/")
    count = int(number)
    if kind == "endless":
        return b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * count * 1024
    if kind == "fields":
        lines = "".join(f"X-Field-{n}: {n}\r\n" for n in range(count))
    else:
        lines = f"X-Long: {'v' * count * 1024}\r\n"
    return f"HTTP/1.1 200 OK\r\n{lines}Content-Length: 3\r\n\r\nok\n".encode()


@BOTH
@pytest.mark.parametrize(("path", "reason"), [("/fields/1100", "more than 1024 header fields"),
                                              ("/long/70", "a header line over 65536 bytes"),
                                              ("/endless/2048", "a header line over 65536 bytes")])
async def test_an_oversized_upstream_head_is_502(make_proxy, path, reason, lean):
    async with RawServer(header_heavy) as origin, aiohttp.ClientSession() as client:
        proxy = await make_proxy(origin.url, **lean, read_timeout=10, max_retries=0)
        started = time.monotonic()
        async with client.get(f"{proxy.url}{path}") as response:
            assert response.status == 502
            text = await response.text()
            assert "invalid response" in text
            assert reason in text or not lean["lean_client"]
        assert time.monotonic() - started < 5, "refused as it arrived, not at the read timeout"


@BOTH
@pytest.mark.parametrize("path", ["/fields/1000", "/long/60"])
async def test_a_head_within_the_limits_passes(make_proxy, path, lean):
    async with RawServer(header_heavy) as origin, \
            aiohttp.ClientSession(max_headers=2000, max_field_size=2 * UPSTREAM_MAX_FIELD_SIZE,
                                  max_line_size=2 * UPSTREAM_MAX_FIELD_SIZE) as client:
        proxy = await make_proxy(origin.url, **lean)
        async with client.get(f"{proxy.url}{path}") as response:
            assert response.status == 200 and await response.read() == b"ok\n"
            if path == "/fields/1000":
                assert response.headers["X-Field-999"] == "999"
            else:
                assert len(response.headers["X-Long"]) == 60 * 1024


async def test_a_long_status_line_is_502_through_the_lean_client(make_proxy, client):
    def long_reason(request: RawRequest) -> bytes:
        return b"HTTP/1.1 200 " + b"O" * (UPSTREAM_MAX_FIELD_SIZE + 1) + b"\r\n" \
               b"Content-Length: 0\r\n\r\n"

    async with RawServer(long_reason) as origin:
        proxy = await make_proxy(origin.url, lean_client=True, max_retries=0)
        status, text = await fetch(client, f"{proxy.url}/x")
        assert status == 502 and "status line" in text

