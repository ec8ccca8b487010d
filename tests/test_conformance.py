"""Conformance over raw sockets, on every server path x upstream client: request validation, target
policy, framing, legacy endpoints, request ids and fileproxy's own error answers mean the same
whichever path serves the request. The upstream is a raw server that records every byte it got."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.conftest import MATRIX, MATRIX_IDS, ProxyFactory, Served, raw_exchange
from tests.rawserver import RawRequest, RawServer


def echo_head(request: RawRequest) -> bytes:
    """200 whose body is the request head exactly as the upstream received it."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(request.head), request.head)


@dataclass
class Path:
    proxy: Served
    upstream: RawServer

    async def send(self, raw: bytes, read_timeout: float = 3.0) -> tuple[int, bytes, bytes]:
        """(status, head, body) of the first answer to `raw`."""
        answer = await raw_exchange(self.proxy.port, raw, read_timeout=read_timeout)
        head, _, body = answer.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
        assert match, f"no HTTP/1.x status line in {answer[:200]!r}"
        return int(match.group(1)), head, body


@pytest.fixture(params=MATRIX, ids=MATRIX_IDS)
async def path(request: pytest.FixtureRequest, make_proxy: ProxyFactory) -> AsyncIterator[Path]:
    fast_path, lean_client = request.param
    async with RawServer(echo_head) as upstream:
        proxy = await make_proxy(upstream.url, fast_path=fast_path, lean_client=lean_client,
                                 legacy_endpoints=True, max_headers=50, max_header_size=8192)
        yield Path(proxy, upstream)


HOST = b"Host: t\r\n"
CLOSE = b"Connection: close\r\n\r\n"
REFUSED = {
    "no Host on HTTP/1.1": (b"GET /x HTTP/1.1\r\n" + CLOSE, 400),
    "two Host headers": (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + CLOSE, 400),
    "two spaces after the method": (b"GET  /x HTTP/1.1\r\n" + HOST + CLOSE, 400),
    "two spaces before the version": (b"GET /x  HTTP/1.1\r\n" + HOST + CLOSE, 400),
    "non-ASCII header name": (b"GET /x HTTP/1.1\r\n" + HOST + b"X\xc3\xa9: 1\r\n" + CLOSE, 400),
    "space before the colon": (b"GET /x HTTP/1.1\r\n" + HOST + b"X-A : 1\r\n" + CLOSE, 400),
    "dot-segments above the root": (b"GET /../../etc/passwd HTTP/1.1\r\n" + HOST + CLOSE, 400),
    "encoded dot-segments": (b"GET /%2e%2e/%2E%2e/x HTTP/1.1\r\n" + HOST + CLOSE, 400),
    "dot-segments after a segment": (b"GET /a/../../x?q=1 HTTP/1.1\r\n" + HOST + CLOSE, 400),
    "mixed dot-segment": (b"GET /.%2e/x HTTP/1.1\r\n" + HOST + CLOSE, 400),
    "HTTP/2.0 over HTTP/1 framing": (b"GET /x HTTP/2.0\r\n" + HOST + CLOSE, 505),
    "Content-Length of 2^63": (b"POST /x HTTP/1.1\r\n" + HOST
                               + b"Content-Length: 9223372036854775808\r\n" + CLOSE, 400),
    "Content-Length and Transfer-Encoding": (b"POST /x HTTP/1.1\r\n" + HOST
                                             + b"Content-Length: 3\r\nTransfer-Encoding: "
                                               b"chunked\r\n" + CLOSE + b"0\r\n\r\n", 400),
    "conflicting Content-Lengths": (b"POST /x HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\n"
                                    b"Content-Length: 2\r\n" + CLOSE + b"ab", 400),
    "a coding other than chunked last": (b"POST /x HTTP/1.1\r\n" + HOST
                                         + b"Transfer-Encoding: chunked, gzip\r\n" + CLOSE, 400),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    "absolute-form to another host": (b"GET http://example.com/x HTTP/1.1\r\n" + HOST + CLOSE,
                                      400),
    "a non-UTF-8 Authorization": (b"GET /x HTTP/1.1\r\n" + HOST + b"Authorization: Basic \xff\xfe"
                                  b"\r\n" + CLOSE, 400),
    "more header fields than allowed": (b"GET /x HTTP/1.1\r\n" + HOST
                                        + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + CLOSE,
                                        431),
    "a header block over the size limit": (b"GET /x HTTP/1.1\r\n" + HOST + b"X-Big: "
                                           + b"a" * 9000 + b"\r\n" + CLOSE, 431),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
async def test_a_refused_request_never_reaches_the_upstream(path, case):
    raw, expected = REFUSED[case]
    status, head, body = await path.send(raw)
    assert status == expected, (head, body)
    assert path.upstream.connections == 0
    assert_own_answer(head, body)


def assert_own_answer(head: bytes, body: bytes) -> None:
    """fileproxy's own answer: its text and request id, no Server header of aiohttp's."""
    assert b"\r\nserver:" not in head.lower(), head
    assert b"request id: " in body, body
    assert re.search(rb"(?i)\r\nx-request-id: \S+", head), head


async def test_a_request_line_without_a_version_is_not_forwarded(path):
    answer = await raw_exchange(path.proxy.port, b"GET /x\r\n\r\n")
    assert re.match(rb"HTTP/1\.1 (400|505) ", answer), answer[:100]
    assert path.upstream.connections == 0


async def test_dot_segments_within_the_tree_go_upstream_as_sent(path):
    status, _, body = await path.send(b"GET /a/./b/../c HTTP/1.1\r\n" + HOST + CLOSE)
    assert status == 200
    assert body.startswith(b"GET /a/./b/../c HTTP/1.1\r\n")


@pytest.mark.parametrize("method", ["DELETE", "OPTIONS", "POST", "PURGE"])
async def test_a_request_without_a_body_gets_no_framing_invented(path, method):
    status, _, body = await path.send(method.encode() + b" /x HTTP/1.1\r\n" + HOST + CLOSE)
    assert status == 200
    assert body.startswith(method.encode() + b" /x HTTP/1.1\r\n")
    assert b"content-length" not in body.lower() and b"transfer-encoding" not in body.lower()


async def test_an_explicit_empty_body_keeps_its_content_length(path):
    status, _, body = await path.send(b"POST /x HTTP/1.1\r\n" + HOST + b"Content-Length: 0\r\n"
                                      + CLOSE)
    assert status == 200
    assert re.search(rb"(?i)\r\ncontent-length: 0\r\n", body)


@pytest.mark.parametrize("legacy", ["/stats", "/proxy-metrics", "/proxy-health"])
async def test_legacy_endpoints_are_answered_on_every_path(path, legacy):
    for version in (b"1.1", b"1.0"):
        status, _, body = await path.send(b"GET " + legacy.encode() + b" HTTP/" + version
                                          + b"\r\n" + HOST + CLOSE)
        assert status == 200, body
        assert isinstance(json.loads(body), dict)
    assert path.upstream.connections == 0


async def test_other_methods_on_legacy_names_are_forwarded(path):
    status, _, body = await path.send(b"POST /stats HTTP/1.1\r\n" + HOST
                                      + b"Content-Length: 0\r\n" + CLOSE)
    assert status == 200 and body.startswith(b"POST /stats HTTP/1.1")


async def test_request_ids_are_unique_and_reach_the_upstream(path):
    ids = set()
    for _ in range(20):
        status, _, body = await path.send(b"GET /x HTTP/1.1\r\n" + HOST + CLOSE)
        assert status == 200
        sent = re.search(rb"(?i)\r\nx-request-id: (\S+)", body)
        assert sent
        ids.add(sent.group(1))
    assert len(ids) == 20


async def test_a_head_that_stops_half_way_is_cut_off(make_proxy, origin):
    """A client that sends half a head and then one byte a second is closed after the header
    timeout (nginx's client_header_timeout), on both server paths."""
    for fast_path in (True, False):
        proxy = await make_proxy(origin.url, fast_path=fast_path, client_header_timeout=1)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /bytes/1 HTTP/1.1\r\nHost: t\r\n")
        started = asyncio.get_running_loop().time()
        closed_after = None
        for byte in b"X-Slow: " + b"a" * 20:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
                if await asyncio.wait_for(reader.read(1024), 0.5) == b"":
                    closed_after = asyncio.get_running_loop().time() - started
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                closed_after = asyncio.get_running_loop().time() - started
                break
        writer.close()
        assert closed_after is not None and closed_after < 3, (fast_path, closed_after)
        assert origin.connections() == 0


async def test_errors_of_the_aiohttp_parser_are_answered_quietly(path, caplog):
    """A head aiohttp's parser refuses: fileproxy's text, no Server, one log line, no traceback."""
    caplog.set_level("INFO")
    status, head, body = await path.send(b"GET /x HTTP/1.1\r\n" + HOST + b"Bad Header\r\n"
                                         + CLOSE)
    assert status == 400
    assert_own_answer(head, body)
    assert not [r for r in caplog.records if r.exc_info], "a refusal logged a traceback"
    assert path.upstream.connections == 0
