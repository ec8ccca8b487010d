"""The upstream side: pooled connections, socket options, the keep-alive race, failures, timeouts."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import aiohttp
import pytest

from fileproxy.config import Config
from fileproxy.server.run import listen_socket
from fileproxy.upstream.sockets import SocketOptions, handshake_rtt, read_options
from tests.conftest import free_port
from tests.rawserver import RawServer

MIB = 1024 * 1024
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def other_congestion_control() -> str:
    """An available algorithm that is not the system default, so setting it is observable."""
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as handle:
        available = handle.read().split()
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as handle:
        default = handle.read().strip()
    return next(name for name in available if name != default)


async def test_upstream_connections_are_reused(proxy, origin, client):
    for _ in range(200):
        async with client.get(f"{proxy.url}/status/200") as response:
            assert response.status == 200
            await response.read()
    assert origin.connections() <= 4


def test_upstream_socket_factory_applies_the_options():
    congestion = other_congestion_control()
    options = SocketOptions(nodelay=True, sndbuf=1 << 20, rcvbuf=1 << 20, congestion=congestion)
    sock = options.upstream_socket_factory(
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 0)))
    with sock:
        applied = read_options(sock)
    assert applied["nodelay"] and applied["congestion"] == congestion
    assert applied["sndbuf"] >= 1 << 20 and applied["rcvbuf"] >= 1 << 20


def ss_lines(*filters: str) -> str:
    return subprocess.run(["ss", "-tinH", "state", "established", *filters],
                          capture_output=True, text=True, check=True).stdout


async def test_congestion_control_reaches_both_sides_of_the_proxy(origin, make_proxy, client):
    congestion = other_congestion_control()
    proxy = await make_proxy(origin.url, tcp_congestion=congestion, tcp_congestion_min_rtt=0)
    async with client.get(f"{proxy.url}/status/200") as response:
        await response.read()
    upstream_side = ss_lines("dport", f"= :{origin.port}")
    assert congestion in upstream_side.split(), upstream_side
    accepted = [handler.transport.get_extra_info("socket")
                for handler in proxy.runner.server.connections]
    assert accepted and all(read_options(sock)["nodelay"] for sock in accepted)


def neither_default_nor_cubic() -> str:
    """An available algorithm other than the system default and cubic (short paths' one)."""
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as handle:
        available = handle.read().split()
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as handle:
        default = handle.read().strip()
    others = [name for name in available if name not in (default, "cubic")]
    if not others or "cubic" not in available:
        pytest.skip(f"needs cubic and a third congestion control (available: {available})")
    return others[0]


async def test_a_short_path_keeps_cubic_whatever_is_configured(origin, make_proxy, client):
    """Loopback's handshake takes microseconds, far under the 2 ms default: both the client's
    connection and the upstream one keep cubic (bbr's pacing only costs on a short fast path)."""
    congestion = neither_default_nor_cubic()
    proxy = await make_proxy(origin.url, tcp_congestion=congestion)
    async with client.get(f"{proxy.url}/status/200") as response:
        await response.read()
    upstream_side = ss_lines("dport", f"= :{origin.port}")
    assert "cubic" in upstream_side.split(), upstream_side
    assert congestion not in upstream_side.split(), upstream_side
    accepted = [handler.transport.get_extra_info("socket")
                for handler in proxy.runner.server.connections]
    assert accepted and all(read_options(sock)["congestion"] == "cubic" for sock in accepted)


@pytest.mark.parametrize(("min_rtt", "switched"), [(10.0, False), (1e-6, True)])
def test_the_handshake_round_trip_decides_the_congestion_control(min_rtt, switched):
    """A real loopback connection's handshake RTT (some microseconds) against the threshold."""
    congestion = neither_default_nor_cubic()
    options = SocketOptions(congestion=congestion, congestion_min_rtt=min_rtt,
                            short_path_congestion="cubic")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = options.upstream_socket_factory(
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 0)))
        with sock:
            sock.connect(listener.getsockname())
            rtt = handshake_rtt(sock)
            assert rtt is not None and 0 < rtt < 0.01
            assert read_options(sock)["congestion"] == "cubic"  # until the path is known
            options.fit_congestion(sock)
            expected = congestion if switched else "cubic"
            assert read_options(sock)["congestion"] == expected


def test_dev_listener_carries_the_options_accepted_sockets_inherit():
    congestion = other_congestion_control()
    config = Config(upstream=("http://127.0.0.1:1",), bind=f"127.0.0.1:{free_port()}",
                    tcp_congestion=congestion, tcp_congestion_min_rtt=0, socket_rcvbuf=1 << 20)
    with listen_socket(config) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            with accepted:
                applied = read_options(accepted)
    assert applied["congestion"] == congestion and applied["rcvbuf"] >= 1 << 20


def closes_second_request_on_each_connection(request) -> bytes | None:
    return OK if request.number == 1 else None


async def test_keepalive_race_is_retried_for_idempotent_requests(make_proxy, client):
    async with RawServer(closes_second_request_on_each_connection) as origin:
        proxy = await make_proxy(origin.url)
        for _ in range(3):
            async with client.get(f"{proxy.url}/file") as response:
                assert response.status == 200 and await response.read() == b"ok"
    assert origin.connections == 3


async def test_keepalive_race_retries_a_post_whose_body_was_not_sent_yet(make_proxy, client):
    async with RawServer(closes_second_request_on_each_connection) as origin:
        proxy = await make_proxy(origin.url)
        async with client.delete(f"{proxy.url}/warm") as response:  # aiohttp's pool, as POST
            await response.read()
        async with client.post(f"{proxy.url}/submit", data=b"payload", expect100=True) as response:
            assert response.status == 200
    posts = [r for r in origin.requests if r.head.startswith(b"POST")]
    assert len(posts) == 2 and posts[-1].body == b"payload"


async def test_post_whose_body_was_sent_is_not_retried(make_proxy, client):
    async with RawServer(closes_second_request_on_each_connection) as origin:
        proxy = await make_proxy(origin.url)
        async with client.delete(f"{proxy.url}/warm") as response:  # aiohttp's pool, as POST
            await response.read()
        async with client.post(f"{proxy.url}/submit", data=b"payload") as response:
            assert response.status == 502
            assert "closed the connection" in await response.text()
    assert sum(r.head.startswith(b"POST") for r in origin.requests) == 1


async def test_unreachable_upstream_is_502_with_a_reason(make_proxy, client):
    proxy = await make_proxy(f"http://127.0.0.1:{free_port()}")
    async with client.get(f"{proxy.url}/x") as response:
        assert response.status == 502
        text = await response.text()
    assert "unreachable" in text and "request id:" in text
    assert response.headers["X-Request-Id"] in text


async def test_no_response_headers_within_read_timeout_is_504(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, read_timeout=0.5)
    started = time.monotonic()
    async with client.get(f"{proxy.url}/slow-headers?delay=5") as response:
        assert response.status == 504
        assert "within the read timeout" in await response.text()
    assert time.monotonic() - started < 3


async def test_read_timeout_does_not_count_time_blocked_on_a_slow_client(origin, make_proxy,
                                                                          client):
    proxy = await make_proxy(origin.url, read_timeout=1)
    size = 64 * 1024 * 1024
    async with client.get(f"{proxy.url}/bytes/{size}") as response:
        first = await response.content.readexactly(1024 * 1024)
        await asyncio.sleep(3)  # the proxy is blocked on us, not waiting on the upstream
        rest = await response.read()
    assert len(first) + len(rest) == size


async def test_upstream_silent_mid_body_aborts_the_client(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, read_timeout=0.5)
    started = time.monotonic()
    async with client.get(f"{proxy.url}/stall?send=100000&pause=5") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert time.monotonic() - started < 3


async def wait_for_event(origin, name: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if origin.events(name):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_client_leaving_mid_body_cancels_the_upstream_request(proxy, origin):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow-body?rate=20000&seconds=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    await reader.readexactly(5000)
    writer.transport.abort()
    assert await wait_for_event(origin, "peer-gone", 2.0)


async def test_client_leaving_before_headers_cancels_the_upstream_request(proxy, origin):
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow-headers?delay=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    assert await wait_for_event(origin, "cancelled", 2.0)


async def until(condition, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("socket_relay", ["copy", "splice", "off"])
async def test_a_client_that_stalls_mid_upload_is_cut_off(origin, make_proxy, socket_relay):
    """--client-timeout: no body byte for that long closes the client connection, and the
    upstream sees an incomplete body, never a complete one."""
    proxy = await make_proxy(origin.url, client_timeout=0.5, socket_relay=socket_relay)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PUT /echo/stalled HTTP/1.1\r\nHost: t\r\nContent-Length: 8000000\r\n\r\n"
                 + b"s" * 3_000_000)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b"", "the proxy closed the connection"
    assert await until(lambda: origin.events("body-incomplete"))
    assert not origin.events("body-complete")
    writer.close()


@pytest.mark.parametrize("socket_relay", ["copy", "splice", "off"])
async def test_a_client_that_takes_no_bytes_is_cut_off(origin, make_proxy, client, socket_relay):
    proxy = await make_proxy(origin.url, client_timeout=0.5, socket_relay=socket_relay)
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)
    writer.write(f"GET /bytes/{256 * MIB} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await writer.drain()  # ... and read nothing

    async def aborted() -> int:
        async with client.get(f"{proxy.url}/_fileproxy/stats") as response:
            return (await response.json())["requests"]["by_outcome"].get("client_aborted", 0)

    for _ in range(100):
        if await aborted():
            break
        await asyncio.sleep(0.1)
    assert await aborted() == 1
    writer.close()
