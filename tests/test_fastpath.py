"""The fast path (fileproxy/fastpath.py): plain GETs on the lean protocol, every other request and
its connection handed to aiohttp in order, keep-alive, pipelining and shutdown."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.conftest import raw_exchange
from tests.rawserver import RawServer


def responses(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, body) of each response in a raw stream with Content-Length framing."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines
                      if line.lower().startswith(b"content-length:"))
        found.append((lines[0], rest[:length]))
        raw = rest[length:]
    return found


async def test_pipelined_gets_are_answered_in_order(proxy):
    raw = await raw_exchange(proxy.port, b"GET /bytes/5 HTTP/1.1\r\nHost: t\r\n\r\n"
                                         b"GET /status/201 HTTP/1.1\r\nHost: t\r\n\r\n"
                                         b"GET /bytes/3 HTTP/1.1\r\nHost: t\r\n"
                                         b"Connection: close\r\n\r\n")
    got = responses(raw)
    assert [status for status, _ in got] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 201 Created",
                                             b"HTTP/1.1 200 OK"]
    assert len(got[0][1]) == 5 and len(got[2][1]) == 3


async def test_a_connection_goes_to_aiohttp_at_its_first_request_that_is_not_a_plain_get(
        proxy, origin, client):
    """GET, PUT with a body, GET, all in one write on one connection: each answered, in order,
    the PUT's body intact at the origin."""
    body = b"x" * 70_000
    raw = await raw_exchange(proxy.port, b"GET /bytes/7 HTTP/1.1\r\nHost: t\r\n\r\n"
                                         b"PUT /echo/put HTTP/1.1\r\nHost: t\r\n"
                                         b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
                             + b"GET /bytes/4 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    got = responses(raw)
    assert [status for status, _ in got] == [b"HTTP/1.1 200 OK"] * 3
    assert len(got[0][1]) == 7 and len(got[2][1]) == 4
    echo = json.loads(got[1][1])
    assert echo["method"] == "PUT" and echo["body_length"] == len(body)


async def test_a_head_that_arrives_byte_by_byte_is_served(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for byte in b"GET /bytes/9 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n":
        writer.write(bytes([byte]))
        await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert responses(raw) == [(b"HTTP/1.1 200 OK", responses(raw)[0][1])]
    assert len(responses(raw)[0][1]) == 9


@pytest.mark.parametrize("target", [b"/_fileproxy/health", b"/%5Ffileproxy/health",
                                    b"/x/../_fileproxy/health"])
async def test_admin_paths_are_never_forwarded(proxy, origin, client, target):
    raw = await raw_exchange(proxy.port, b"GET %b HTTP/1.1\r\nHost: t\r\n"
                                         b"Connection: close\r\n\r\n" % target)
    assert b"origin" not in raw.lower().partition(b"\r\n\r\n")[2]
    async with client.get(f"{origin.url}/_origin/events") as response:
        events = (await response.json())["events"]
    assert not any("fileproxy" in str(event) for event in events)


async def test_a_malformed_request_after_a_get_gets_400_and_the_get_its_answer(origin,
                                                                              make_proxy):
    """(aiohttp's server alone refuses the whole pipelined batch with one 400.)"""
    proxy = await make_proxy(origin.url)
    raw = await raw_exchange(proxy.port, b"GET /bytes/2 HTTP/1.1\r\nHost: t\r\n\r\n"
                                         b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n")
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert rest[2:].startswith(b"HTTP/1.1 400 Bad Request\r\n"), rest


async def test_an_idle_connection_closes_after_the_keepalive_time(origin, make_proxy):
    proxy = await make_proxy(origin.url, client_keepalive=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /bytes/1 HTTP/1.1\r\nHost: t\r\n\r\n")
    started = time.monotonic()
    raw = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200 OK") and 0.4 < time.monotonic() - started < 3


async def test_errors_on_the_fast_path_keep_the_connection_usable(make_proxy):
    async with RawServer(lambda _request: None) as dead:
        proxy = await make_proxy(dead.url, max_retries=0)
        raw = await raw_exchange(proxy.port, b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
                                             b"GET /b HTTP/1.1\r\nHost: t\r\n"
                                             b"Connection: close\r\n\r\n")
    got = responses(raw)
    assert [status for status, _ in got] == [b"HTTP/1.1 502 Bad Gateway"] * 2
    assert b"request id: " in got[0][1]
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert b"x-request-id:" in head and b"date:" in head and b"server:" not in head


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-server"])
async def test_a_date_is_added_when_the_upstream_sent_none(make_proxy, fast_path):
    bare = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(lambda _request: bare) as origin:
        proxy = await make_proxy(origin.url, fast_path=fast_path)
        raw = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n"
                                             b"Connection: close\r\n\r\n")
    head = raw.partition(b"\r\n\r\n")[0]
    assert b"\r\nDate: " in head and b" GMT" in head


async def test_shutdown_lets_a_running_get_finish_and_closes_idle_connections(origin, make_proxy,
                                                                              client):
    proxy = await make_proxy(origin.url)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    idle_writer.write(b"GET /bytes/1 HTTP/1.1\r\nHost: t\r\n\r\n")
    await idle_reader.readuntil(b"\r\n\r\n")
    async with client.get(f"{proxy.url}/slow-body?rate=10000&seconds=1") as response:
        cleanup = asyncio.create_task(proxy.runner.cleanup())
        body = await response.read()
        assert response.status == 200 and len(body) == 10000
    await asyncio.wait_for(cleanup, 10)
    await asyncio.wait_for(idle_reader.read(), 5)  # the rest of the first body, then the end
    assert idle_reader.at_eof()
    idle_writer.close()


async def test_a_request_sent_as_the_worker_stops_gets_its_answer_and_connection_close(
        origin, make_proxy):
    """Closing idle keep-alive connections at once would race a request already on its way:
    the client would see a reset. It gets its answer, marked Connection: close."""
    proxy = await make_proxy(origin.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /bytes/1 HTTP/1.1\r\nHost: t\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1)
    cleanup = asyncio.create_task(proxy.runner.cleanup())
    await asyncio.sleep(0.2)  # the listener is closed and the worker is stopping
    writer.write(b"GET /bytes/3 HTTP/1.1\r\nHost: t\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await asyncio.wait_for(cleanup, 10)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"\r\nConnection: close" in head
    assert len(body) == 3


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-server"])
async def test_a_request_line_over_the_parser_limit_is_refused_and_never_forwarded(make_proxy,
                                                                                  fast_path):
    async with RawServer(lambda _request: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") \
            as origin:
        proxy = await make_proxy(origin.url, max_header_size=4096, fast_path=fast_path)
        target = b"/long-" + b"a" * 9000
        raw = await raw_exchange(proxy.port, b"GET %b HTTP/1.1\r\nHost: t\r\n"
                                             b"Connection: close\r\n\r\n" % target)
    assert raw.split(b" ", 2)[1].startswith(b"4"), raw[:100]
    assert origin.requests == []
