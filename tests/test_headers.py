"""Transparency and refusals: raw target, header order, hop-by-hop, forwarding headers, bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import raw_exchange


def echoed(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def header_values(echo: dict, name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


async def test_request_target_goes_upstream_byte_for_byte(proxy):
    target = b"/echo/a%2Fb//c/./d/%7euser?q=%20x&q=y+z&e=%zz#"[:-1]
    echo = echoed(await raw_exchange(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n"
                                                  b"Connection: close\r\n\r\n"))
    assert echo["raw_path"] == target.decode()


async def test_header_order_and_repeats_are_kept(proxy):
    echo = echoed(await raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nHost: t\r\nX-B: 1\r\n"
                                                  b"X-A: first\r\nX-B: 2\r\nX-A: second\r\n"
                                                  b"Connection: close\r\n\r\n"))
    names = [name for name, _ in echo["headers"] if name.startswith("X-") and len(name) == 3]
    assert names == ["X-B", "X-A", "X-B", "X-A"]
    assert header_values(echo, "X-A") == ["first", "second"]


async def test_hop_by_hop_request_headers_are_removed(proxy):
    echo = echoed(await raw_exchange(
        proxy.port, b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n"
                    b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\n"
                    b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n"
                    b"Upgrade: websocket\r\nX-Kept: yes\r\n\r\n"))
    sent = {name.lower() for name, _ in echo["headers"]}
    for hop in ("x-hop", "keep-alive", "te", "trailer", "proxy-authorization",
                "proxy-connection", "upgrade"):
        assert hop not in sent
    assert header_values(echo, "X-Kept") == ["yes"]


async def test_hop_by_hop_response_headers_are_removed(make_proxy):
    from tests.rawserver import RawServer

    response = (b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\n"
                b"Upgrade: h2c\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok")
    async with RawServer(lambda _request: response) as origin:
        proxy = await make_proxy(origin.url)
        raw = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head = raw.partition(b"\r\n\r\n")[0].lower()
    for hop in (b"x-secret", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert hop not in head
    assert b"x-kept: yes" in head


async def test_forwarding_headers_append_and_do_not_trust_by_default(proxy):
    echo = echoed(await raw_exchange(
        proxy.port, b"GET /echo HTTP/1.1\r\nHost: files.example\r\nX-Forwarded-For: 6.6.6.6\r\n"
                    b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
                    b"Via: 1.0 edge\r\nConnection: close\r\n\r\n"))
    assert header_values(echo, "X-Forwarded-For") == ["6.6.6.6, 127.0.0.1"]
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "X-Forwarded-Host") == ["files.example"]
    assert header_values(echo, "Via") == ["1.0 edge, 1.1 fileproxy"]
    assert header_values(echo, "Host") == ["files.example"]
    assert len(header_values(echo, "X-Request-Id")[0]) == 16


async def test_trusted_forwarding_headers_and_upstream_host(origin, make_proxy):
    proxy = await make_proxy(origin.url, trust_forwarded=True, host_header="upstream")
    echo = echoed(await raw_exchange(
        proxy.port, b"GET /echo HTTP/1.1\r\nHost: files.example\r\nX-Forwarded-Proto: https\r\n"
                    b"X-Forwarded-Host: cdn.example\r\nConnection: close\r\n\r\n"))
    assert header_values(echo, "X-Forwarded-Proto") == ["https"]
    assert header_values(echo, "X-Forwarded-Host") == ["cdn.example"]
    assert header_values(echo, "Host") == [origin.url.removeprefix("http://")]


async def test_origin_server_and_date_pass_and_none_is_added(make_proxy, proxy):
    raw = await raw_exchange(proxy.port, b"GET /status/200 HTTP/1.1\r\nHost: t\r\n"
                                         b"Connection: close\r\n\r\n")
    assert b"\r\nServer: test-origin/1.0\r\n" in raw
    from tests.rawserver import RawServer

    bare = b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(lambda _request: bare) as origin:
        bare_proxy = await make_proxy(origin.url)
        raw = await raw_exchange(bare_proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n"
                                                  b"Connection: close\r\n\r\n")
    head = raw.partition(b"\r\n\r\n")[0]
    assert b"server:" not in head.lower()
    assert b"content-type:" not in head.lower()
    assert b"Date: Mon, 01 Jan 2024 00:00:00 GMT" in head


@pytest.mark.parametrize("method", ["PURGE", "PROPFIND", "MKCOL"])
async def test_extension_methods_pass_with_their_bodies(proxy, client, method):
    async with client.request(method, f"{proxy.url}/echo/dav", data=b"<xml/>") as response:
        echo = await response.json()
    assert echo["method"] == method and echo["body_length"] == 6


async def test_large_header_blocks_get_through(proxy, client):
    cookie = "c=" + "x" * 6 * 1024
    async with client.get(f"{proxy.url}/echo", headers={"Cookie": cookie}) as response:
        assert header_values(await response.json(), "Cookie") == [cookie]
    async with client.get(f"{proxy.url}/many-headers?count=130") as response:
        assert response.status == 200
        assert sum(1 for name in response.headers if name.startswith("X-Header-")) == 130
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]


async def test_103_early_hints_leave_the_final_response_and_connection_intact(proxy):
    raw = await raw_exchange(proxy.port, b"GET /early-hints HTTP/1.1\r\nHost: t\r\n\r\n"
                                         b"GET /status/200 HTTP/1.1\r\nHost: t\r\n"
                                         b"Connection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert b"after hints\n" in raw and raw.endswith(b"origin says 200\n")


REFUSED = [
    (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", b"405"),
    (b"GET http://evil.example/echo HTTP/1.1\r\nHost: t\r\n\r\n", b"400"),
    (b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", b"400"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", b"400"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
     b"400"),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\nabcdef", b"400"),
    (b"GET /echo HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n", b"400"),
    (b"GET /echo HTTP/1.1 extra\r\nHost: t\r\n\r\n", b"400"),
    (b"GET /echo HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60))
     + b"\r\n", b"431"),
    (b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", b"431"),
]


@pytest.mark.parametrize(("request_bytes", "status"), REFUSED)
async def test_bad_requests_are_refused_and_never_reach_the_upstream(
        origin, make_proxy, request_bytes, status):
    proxy = await make_proxy(origin.url, max_headers=50, max_header_size=4096)
    raw = await raw_exchange(proxy.port, request_bytes, read_timeout=1)
    assert raw.split(b" ", 2)[1] == status, raw[:200]
    assert origin.connections() == 0 and not origin.events()


async def test_absolute_form_for_this_host_is_forwarded_as_origin_form(proxy):
    host = proxy.url.removeprefix("http://").encode()
    echo = echoed(await raw_exchange(proxy.port, b"GET " + proxy.url.encode() + b"/echo/abs?x=1"
                                     b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"))
    assert echo["raw_path"] == "/echo/abs?x=1"


async def test_error_responses_explain_and_carry_a_request_id(proxy):
    raw = await raw_exchange(proxy.port, b"GET http://evil.example/ HTTP/1.1\r\nHost: t\r\n"
                                         b"X-Request-Id: trace-42\r\n\r\n", read_timeout=1)
    assert b"X-Request-Id: trace-42" in raw
    assert b"not an open proxy" in raw and b"request id: trace-42" in raw


async def test_admin_prefix_is_reserved(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, admin_prefix="/_ops")
    async with client.get(f"{proxy.url}/_ops/health") as response:
        assert response.status == 200 and (await response.json())["status"] == "ok"
    async with client.get(f"{proxy.url}/_ops/anything") as response:
        assert response.status == 404
    async with client.get(f"{proxy.url}/_fileproxy/health") as response:
        assert response.status == 404, "another prefix is forwarded (the origin has no such path)"
    assert origin.connections() == 1
