"""Bodies through the in-process proxy: byte-exact both ways, framing, ranges, truncation, 100-continue."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from tests.conftest import Served, raw_exchange
from tests.pattern import pattern, pattern_sha256

BIG = 256 * 1024 * 1024


async def sha256_of(response: aiohttp.ClientResponse) -> tuple[str, int]:
    digest, length = hashlib.sha256(), 0
    async for chunk in response.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return digest.hexdigest(), length


async def generated_body(length: int):
    for piece in pattern(0, length, seed=7):
        yield piece


async def test_256mib_download_is_byte_exact_and_keeps_content_length(proxy, client):
    async with client.get(f"{proxy.url}/bytes/{BIG}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(BIG)
        assert "Transfer-Encoding" not in response.headers
        assert await sha256_of(response) == (pattern_sha256(BIG), BIG)


async def test_256mib_upload_with_content_length_is_byte_exact(proxy, client):
    headers = {"Content-Length": str(BIG)}
    async with client.put(f"{proxy.url}/echo/up", data=generated_body(BIG),
                          headers=headers) as response:
        echoed = await response.json()
    assert echoed["body_length"] == BIG
    assert echoed["body_sha256"] == pattern_sha256(BIG, seed=7)
    assert not echoed["chunked"]
    assert ["Content-Length", str(BIG)] in echoed["headers"]


async def test_chunked_upload_stays_chunked_and_byte_exact(proxy, client):
    size = 8 * 1024 * 1024 + 17
    async with client.post(f"{proxy.url}/echo/chunked", data=generated_body(size)) as response:
        echoed = await response.json()
    assert echoed["chunked"]
    assert (echoed["body_sha256"], echoed["body_length"]) == (pattern_sha256(size, seed=7), size)


async def test_chunked_response_is_streamed_chunked(proxy, client):
    size = 5 * 1024 * 1024 + 3
    async with client.get(f"{proxy.url}/bytes/{size}?chunked=1") as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in response.headers
        assert await sha256_of(response) == (pattern_sha256(size), size)


async def test_head_keeps_length_and_sends_no_body(proxy):
    raw = await raw_exchange(proxy.port, b"HEAD /bytes/12345 HTTP/1.1\r\nHost: t\r\n\r\n"
                                         b"GET /status/200 HTTP/1.1\r\nHost: t\r\n"
                                         b"Connection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 12345" in head
    assert rest.startswith(b"HTTP/1.1 200 OK"), "HEAD must carry no body; the next response follows"
    assert rest.endswith(b"origin says 200\n")


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_keep_the_connection_usable(proxy, status):
    raw = await raw_exchange(proxy.port, f"GET /status/{status} HTTP/1.1\r\nHost: t\r\n\r\n"
                                         "GET /status/200 HTTP/1.1\r\nHost: t\r\n"
                                         "Connection: close\r\n\r\n".encode())
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(f"HTTP/1.1 {status}".encode())
    assert b"Transfer-Encoding" not in first
    assert rest.startswith(b"HTTP/1.1 200 OK")


async def test_range_if_range_and_416_pass_through(proxy, client):
    size = 3 * 1024 * 1024
    url = f"{proxy.url}/bytes/{size}"
    async with client.get(url, headers={"Range": "bytes=1000000-1999999"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000000-1999999/{size}"
        body = await response.read()
    assert body == b"".join(pattern(0, size))[1000000:2000000]
    stale = {"Range": "bytes=0-9", "If-Range": '"stale-etag"'}
    async with client.get(url, headers=stale) as response:
        assert response.status == 200 and len(await response.read()) == size
    async with client.get(url, headers={"Range": f"bytes={size}-"}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{size}"


async def test_compressed_body_etag_and_location_pass_untouched(proxy, origin, client):
    async with client.get(f"{origin.url}/gzip") as direct:
        direct_body, direct_headers = await direct.read(), direct.headers
    async with client.get(f"{proxy.url}/gzip", headers={"Accept-Encoding": "gzip"}) as response:
        assert await response.read() == direct_body
        for name in ("Content-Encoding", "ETag", "Content-Length", "Content-Type"):
            assert response.headers[name] == direct_headers[name]
    async with client.get(f"{proxy.url}/status/302?location=/a%252Fb//c",
                          allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/a%2Fb//c"


@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_upstream_cut_mid_body_is_never_passed_off_as_complete(proxy, client, chunked):
    url = f"{proxy.url}/truncate?size=4000000&send=1000000&chunked={chunked}"
    async with client.get(url) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_expect_100_continue_waits_for_the_upstream(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PUT /echo/e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert final.startswith(b"HTTP/1.1 200 OK")
    assert hashlib.sha256(b"hello").hexdigest().encode() in final


async def test_expect_100_continue_gets_the_upstreams_early_rejection(proxy):
    raw = await raw_exchange(proxy.port, b"PUT /expect-reject HTTP/1.1\r\nHost: t\r\n"
                                         b"Content-Length: 1000000000\r\n"
                                         b"Expect: 100-continue\r\n\r\n", read_timeout=2)
    assert raw.startswith(b"HTTP/1.1 413"), "no 100 Continue: the client keeps its 1 GB"
    assert b"too large for me" in raw


async def test_client_upload_cut_short_never_completes_upstream(proxy, origin):
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PUT /echo/cut HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
    writer.write(b"x" * 3_000_000)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    for _ in range(40):
        if origin.events("body-incomplete"):
            break
        await asyncio.sleep(0.05)
    assert origin.events("body-incomplete")
    assert not origin.events("body-complete")


async def test_served_in_process_is_on_uvloop(proxy: Served):
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
