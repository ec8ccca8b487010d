"""The access log: one line per request with real byte counts (socket-relayed ones too), plain or JSON."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import raw_exchange

MIB = 1024 * 1024


async def test_plain_line_counts_socket_relayed_bytes_both_ways(origin, make_proxy, client, caplog):
    proxy = await make_proxy(origin.url, access_log=True)
    with caplog.at_level(logging.INFO, logger="fileproxy.access"):
        async with client.get(f"{proxy.url}/bytes/{3 * MIB}") as response:
            await response.read()
        async with client.put(f"{proxy.url}/echo/up", data=b"u" * (2 * MIB)) as response:
            await response.read()
    lines = [r.getMessage() for r in caplog.records if r.name == "fileproxy.access"]
    assert f'"GET /bytes/{3 * MIB} HTTP/1.1" 200 out={3 * MIB}' in lines[0]
    assert f"bytes_in={2 * MIB}" in lines[1] and "outcome=ok" in lines[1]
    assert all("request_id=" in line and "ttfb=" in line for line in lines)


@pytest.mark.parametrize("path", ["/truncate?size=4000000&send=1000000", "/status/503"])
async def test_json_lines_say_what_went_wrong(origin, make_proxy, client, caplog, path):
    proxy = await make_proxy(origin.url, access_log=True, access_log_format="json")
    with caplog.at_level(logging.INFO, logger="fileproxy.access"):
        async with client.get(f"{proxy.url}{path}") as response:
            try:
                await response.read()
            except Exception:
                pass
    entry = json.loads(next(r.getMessage() for r in caplog.records if r.name == "fileproxy.access"))
    assert entry["upstream"] == origin.url.removeprefix("http://")
    if "truncate" in path:
        assert entry["outcome"] == "aborted" and "cut short" in entry["detail"]
    else:
        assert entry["status"] == 503 and entry["outcome"] == "ok"


async def test_refused_requests_are_logged_with_their_reason(origin, make_proxy, caplog):
    proxy = await make_proxy(origin.url, access_log=True)
    with caplog.at_level(logging.INFO, logger="fileproxy.access"):
        await raw_exchange(proxy.port, b"GET http://evil.example/ HTTP/1.1\r\nHost: t\r\n"
                                       b"Connection: close\r\n\r\n")
    line = next(r.getMessage() for r in caplog.records if r.name == "fileproxy.access")
    assert " 400 " in line and "outcome=refused" in line and "not an open proxy" in line
