"""The socket relay for large Content-Length bodies (copy and splice movers), against the ordinary
streams: same outcomes."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import raw_exchange
from tests.pattern import pattern, pattern_sha256
from tests.test_streaming import sha256_of

MIB = 1024 * 1024
RELAYS = ["copy", "splice", "off"]


@pytest.mark.parametrize("socket_relay", RELAYS)
async def test_large_download_byte_exact_either_way(origin, make_proxy, client, socket_relay):
    proxy = await make_proxy(origin.url, socket_relay=socket_relay)
    size = 64 * MIB + 12345
    async with client.get(f"{proxy.url}/bytes/{size}") as response:
        assert response.headers["Content-Length"] == str(size)
        assert await sha256_of(response) == (pattern_sha256(size), size)


@pytest.mark.parametrize(("settings", "connections"), [
    ({"socket_relay": "copy"}, 1),  # the lean client's connection takes a fresh parser
    ({"socket_relay": "splice"}, 1),
    ({"socket_relay": "copy", "lean_client": False}, 2),  # aiohttp's parser cannot be reset
    ({"socket_relay": "splice", "lean_client": False}, 2),
    ({"socket_relay": "off"}, 1),
], ids=["copy-lean", "splice-lean", "copy-aiohttp-client", "splice-aiohttp-client", "off"])
async def test_upstream_connection_is_dropped_only_where_its_parser_missed_a_relayed_body(
        origin, make_proxy, client, settings, connections):
    proxy = await make_proxy(origin.url, **settings)
    for _ in range(2):
        async with client.get(f"{proxy.url}/bytes/{2 * MIB}") as response:
            await response.read()
    assert origin.connections() == connections


async def test_client_connection_stays_usable_after_a_relayed_body(proxy):
    raw = await raw_exchange(proxy.port, f"GET /bytes/{3 * MIB} HTTP/1.1\r\nHost: t\r\n\r\n"
                                         "GET /status/200 HTTP/1.1\r\nHost: t\r\n"
                                         "Connection: close\r\n\r\n".encode())
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert f"Content-Length: {3 * MIB}".encode() in head
    assert rest[3 * MIB:].startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"origin says 200\n")


@pytest.mark.parametrize("socket_relay", RELAYS)
async def test_cut_large_body_aborts_the_client_either_way(origin, make_proxy, client, socket_relay):
    proxy = await make_proxy(origin.url, socket_relay=socket_relay)
    async with client.get(f"{proxy.url}/truncate?size={8 * MIB}&send={3 * MIB}") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


@pytest.mark.parametrize("socket_relay", RELAYS)
async def test_stalled_large_body_aborts_the_client_either_way(origin, make_proxy, client, socket_relay):
    proxy = await make_proxy(origin.url, socket_relay=socket_relay, read_timeout=0.5)
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


@pytest.mark.parametrize("socket_relay", RELAYS)
async def test_upload_whose_body_comes_late_is_byte_exact(origin, make_proxy, socket_relay):
    """Nothing of the body is buffered when the proxy takes it over: the request headers must
    still reach the upstream before the body does."""
    import asyncio

    proxy = await make_proxy(origin.url, socket_relay=socket_relay)
    size = 8 * MIB + 3
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"PUT /echo/late HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.2)
    for piece in pattern(0, size, seed=9):
        writer.write(piece)
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    assert head.startswith(b"HTTP/1.1 200")
    assert pattern_sha256(size, seed=9).encode() in body
    # After an upload relayed socket to socket the connection is closed (and says so); else kept.
    taken_over = socket_relay != "off"
    assert (b"Connection: close" in head) == taken_over
    if taken_over:
        assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


async def test_upstream_gone_mid_relayed_upload_ends_the_exchange(make_proxy, client):
    from tests.rawserver import RawServer

    async with RawServer(lambda _request: None) as origin:
        proxy = await make_proxy(origin.url)

        async def body():
            for piece in pattern(0, 8 * MIB):
                yield piece

        try:
            async with client.put(f"{proxy.url}/x", data=body(),
                                  headers={"Content-Length": str(8 * MIB)}) as response:
                assert response.status == 502
        except aiohttp.ClientError:
            pass  # the proxy may close while the client is still sending: also an honest end
    assert sum(r.head.startswith(b"PUT") for r in origin.requests) == 1


async def test_an_upstream_connection_is_reused_after_a_relayed_download(origin, make_proxy,
                                                                         client):
    """The relayed bytes bypass the lean connection's parser; a body that went through to its
    end leaves the connection at a message boundary, so the next request reuses it (on a long
    upstream link that saves a handshake per download)."""
    proxy = await make_proxy(origin.url)
    for size in (3 * MIB, 2 * MIB + 5, 10):
        async with client.get(f"{proxy.url}/bytes/{size}") as response:
            assert await sha256_of(response) == (pattern_sha256(size), size)
    assert origin.connections() == 1
