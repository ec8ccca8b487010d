"""The lean upstream client for GETs (fileproxy/lean.py): the shapes it must get right, against
aiohttp's client on the same requests (--no-lean-client)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import raw_exchange
from tests.origin import pattern_sha256
from tests.rawserver import RawServer
from tests.test_streaming import sha256_of

MIB = 1024 * 1024
# Each shape through: the fast path and the lean client (the default), aiohttp's server and the
# lean client, the fast path and aiohttp's client.
BOTH = pytest.mark.parametrize("lean", [{"lean_client": True},
                                        {"lean_client": True, "fast_path": False},
                                        {"lean_client": False}],
                               ids=["fast-lean", "aiohttp-server-lean", "aiohttp-client"])


async def test_early_hints_reach_the_client_before_the_final_response(proxy):
    raw = await raw_exchange(proxy.port, b"GET /early-hints HTTP/1.1\r\nHost: t\r\n"
                                         b"Connection: close\r\n\r\n")
    hints, _, final = raw.partition(b"\r\n\r\n")
    assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"Link: </a.css>; rel=preload" in hints
    assert final.startswith(b"HTTP/1.1 200 OK") and final.endswith(b"after hints\n")


async def test_early_hints_are_not_sent_to_an_http_1_0_client(proxy):
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
    proxy = await make_proxy(origin.url, **lean, splice=False)
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
