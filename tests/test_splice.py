"""The zero-copy path for large Content-Length bodies, against the ordinary one: same outcomes."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import raw_exchange
from tests.origin import pattern_sha256
from tests.test_streaming import sha256_of

MIB = 1024 * 1024


@pytest.mark.parametrize("splice", [True, False])
async def test_large_download_byte_exact_either_way(origin, make_proxy, client, splice):
    proxy = await make_proxy(origin.url, splice=splice)
    size = 64 * MIB + 12345
    async with client.get(f"{proxy.url}/bytes/{size}") as response:
        assert response.headers["Content-Length"] == str(size)
        assert await sha256_of(response) == (pattern_sha256(size), size)


@pytest.mark.parametrize("splice", [True, False])
async def test_upstream_connection_is_dropped_only_after_a_spliced_body(origin, make_proxy, client,
                                                                       splice):
    proxy = await make_proxy(origin.url, splice=splice)
    for _ in range(2):
        async with client.get(f"{proxy.url}/bytes/{2 * MIB}") as response:
            await response.read()
    assert origin.connections() == (2 if splice else 1)


async def test_client_connection_stays_usable_after_a_spliced_body(proxy):
    raw = await raw_exchange(proxy.port, f"GET /bytes/{3 * MIB} HTTP/1.1\r\nHost: t\r\n\r\n"
                                         "GET /status/200 HTTP/1.1\r\nHost: t\r\n"
                                         "Connection: close\r\n\r\n".encode())
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert f"Content-Length: {3 * MIB}".encode() in head
    assert rest[3 * MIB:].startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"origin says 200\n")


@pytest.mark.parametrize("splice", [True, False])
async def test_cut_large_body_aborts_the_client_either_way(origin, make_proxy, client, splice):
    proxy = await make_proxy(origin.url, splice=splice)
    async with client.get(f"{proxy.url}/truncate?size={8 * MIB}&send={3 * MIB}") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


@pytest.mark.parametrize("splice", [True, False])
async def test_stalled_large_body_aborts_the_client_either_way(origin, make_proxy, client, splice):
    proxy = await make_proxy(origin.url, splice=splice, read_timeout=0.5)
    async with client.get(f"{proxy.url}/stall?send={2 * MIB}&pause=5") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


@pytest.mark.parametrize("read_size", [16 * 1024, 64 * 1024])
async def test_take_over_with_aiohttp_paused_mid_body_stays_byte_exact(origin, make_proxy, client,
                                                                      read_size):
    """A tiny read buffer makes aiohttp pause its parser before the proxy takes the body over:
    every byte it held must still be sent, once, in order."""
    proxy = await make_proxy(origin.url, read_size=read_size)
    size = 48 * MIB + 7
    for _ in range(3):
        async with client.get(f"{proxy.url}/bytes/{size}?seed=5") as response:
            assert await sha256_of(response) == (pattern_sha256(size, seed=5), size)


async def test_slow_upload_longer_than_read_timeout_is_fine(origin, make_proxy, client):
    """The read timeout runs from the end of the request body, not from its first byte."""
    import asyncio

    async def slow_body():
        for _ in range(20):
            yield b"x" * 100_000
            await asyncio.sleep(0.15)

    proxy = await make_proxy(origin.url, read_timeout=1)
    async with client.put(f"{proxy.url}/echo/slow", data=slow_body(),
                          headers={"Content-Length": "2000000"}) as response:
        assert response.status == 200
        assert (await response.json())["body_length"] == 2_000_000
