"""Mid-body resume: an upstream body cut by a reset, a FIN or a stall is continued with Range +
If-Range into the same client response, on every server path x upstream client and both relay
modes; where it cannot be continued safely, the client is cut as before."""

from __future__ import annotations

import itertools
import re

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MATRIX, MATRIX_IDS, serve
from tests.origin import build_origin
from tests.pattern import pattern, pattern_sha256
from tests.test_streaming import sha256_of

MIB = 1024 * 1024
RELAYS = ["copy", "splice", "off"]  # socket to socket (two movers), or aiohttp's streams
COMBOS = list(itertools.product(MATRIX, RELAYS))
COMBO_IDS = [f"{path}+{relay}" for path, relay in itertools.product(MATRIX_IDS, RELAYS)]
keys = itertools.count()


async def start(make_proxy, origin, combo, **settings):
    (fast_path, lean_client), relay = combo
    return await make_proxy(origin.url, fast_path=fast_path, lean_client=lean_client,
                            socket_relay=relay, **settings)


def flaky(size: int, **query: object) -> str:
    query.setdefault("key", f"k{next(keys)}")
    return f"/flaky/{size}?" + "&".join(f"{name}={value}" for name, value in query.items())


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_a_cut_body_is_continued_byte_exact_in_the_same_response(
        origin, make_proxy, client, combo, how):
    proxy = await start(make_proxy, origin, combo)
    size = 6 * MIB + 11
    async with client.get(proxy.url + flaky(size, cuts=2, how=how)) as response:
        assert response.status == 200 and response.headers["Content-Length"] == str(size)
        assert await sha256_of(response) == (pattern_sha256(size), size)
    requests = origin.events("flaky")
    assert requests[0]["range"] is None
    assert all(event["if_range"] == f'"{size}-1"' for event in requests[1:])
    assert len(requests) == 3  # the first answer, two resumes (the second one completes)


@pytest.mark.parametrize("combo", COMBOS[:3], ids=COMBO_IDS[:3])
async def test_a_stalled_body_is_continued_after_the_read_timeout(origin, make_proxy, client,
                                                                  combo):
    proxy = await start(make_proxy, origin, combo, read_timeout=0.5)
    size = 3 * MIB
    async with client.get(proxy.url + flaky(size, cuts=1, how="stall")) as response:
        assert await sha256_of(response) == (pattern_sha256(size), size)
    assert len(origin.events("flaky")) == 2


@pytest.mark.parametrize("combo", COMBOS[::3], ids=COMBO_IDS[::3])
async def test_resume_inside_the_clients_own_range(origin, make_proxy, client, combo):
    proxy = await start(make_proxy, origin, combo)
    size, first, last = 8 * MIB, MIB + 3, 7 * MIB
    async with client.get(proxy.url + flaky(size, cuts=1),
                          headers={"Range": f"bytes={first}-{last}"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
        body = await response.read()
    whole = b"".join(pattern(0, size))
    assert body == whole[first:last + 1]
    resumed = origin.events("flaky")[1]["range"]
    assert resumed.startswith("bytes=") and resumed.endswith(f"-{last}")
    assert int(resumed[6:].split("-")[0]) > first


@pytest.mark.parametrize("combo", COMBOS[::3], ids=COMBO_IDS[::3])
async def test_an_object_replaced_between_attempts_cuts_the_client(origin, make_proxy, client,
                                                                   combo):
    """The rest would be another version's (If-Range fails: a 200 of the new object): the
    client is cut, never handed bytes of two versions as one body."""
    proxy = await start(make_proxy, origin, combo)
    async with client.get(proxy.url + flaky(4 * MIB, cuts=1, seed=2)) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


@pytest.mark.parametrize("query", [{"norange": 1}, {"weak": 1}], ids=["no-ranges", "weak-etag"])
async def test_without_ranges_or_a_strong_validator_the_client_is_cut(origin, proxy, client,
                                                                      query):
    async with client.get(proxy.url + flaky(4 * MIB, cuts=1, **query)) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert len(origin.events("flaky")) == 1  # no resume was tried


async def test_attempts_that_bring_nothing_end_in_a_cut(origin, make_proxy, client):
    """Every answer breaks off before its first body byte: after --upstream-resume-attempts
    such attempts in a row the client is cut."""
    proxy = await make_proxy(origin.url, upstream_resume_attempts=3)
    async with client.get(proxy.url + flaky(2 * MIB, cuts=100, at=0)) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert len(origin.events("flaky")) == 1 + 3


async def test_resume_off_cuts_at_once_as_nginx(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, upstream_resume_attempts=0)
    async with client.get(proxy.url + flaky(2 * MIB, cuts=1)) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert len(origin.events("flaky")) == 1


async def test_head_is_untouched(origin, proxy, client):
    async with client.head(proxy.url + flaky(2 * MIB, cuts=1)) as response:
        assert response.status == 200 and response.headers["Content-Length"] == str(2 * MIB)
    events = origin.events("flaky")  # (the origin's cut HEAD sent nothing: retried once)
    assert {event["method"] for event in events} == {"HEAD"}
    assert all(event["range"] is None for event in events)  # never resumed


async def test_resumes_are_counted(origin, make_proxy, client):
    proxy = await make_proxy(origin.url)
    async with client.get(proxy.url + flaky(2 * MIB, cuts=1)) as response:
        await response.read()
    async with client.get(f"{proxy.url}/_fileproxy/metrics") as response:
        text = await response.text()
    assert 'fileproxy_upstream_resumes_total{outcome="resumed"} 1.0' in text



async def in_flight(client, proxy) -> dict[str, float]:
    async with client.get(f"{proxy.url}/_fileproxy/metrics") as response:
        text = await response.text()
    return {upstream: float(value) for upstream, value in re.findall(
        r'^fileproxy_upstream_in_flight\{upstream="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


@pytest.mark.parametrize("combo", COMBOS[:2], ids=COMBO_IDS[:2])
async def test_a_resumed_body_counts_in_flight_on_the_upstream_that_sends_it(
        origin, make_proxy, client, combo):
    """Two upstreams, the first chosen cutting its answer: the rest comes from the other. While
    the client reads it, balancing sees the upstream that sends it as busy (not the one that
    failed), and neither once the response ended."""
    other = await serve(web.AppRunner(build_origin(), access_log=None))
    try:
        (fast_path, lean_client), relay = combo
        proxy = await make_proxy(origin.url, other.url, fast_path=fast_path,
                                 lean_client=lean_client, socket_relay=relay)
        size, target = 64 * MIB, flaky(64 * MIB, cuts=1, at=0.1)
        async with client.get(other.url + target) as response:  # (its one cut, spent)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        async with client.get(proxy.url + target) as response:
            read = 0
            while read < size // 2:  # (well past the cut)
                read += len(await response.content.readany())
            failed, sending = (served.url.split("//")[1] for served in (origin, other))
            assert [len(origin.events("flaky")), len(other.events("flaky"))] == [1, 2]
            assert await in_flight(client, proxy) == {sending: 1.0, failed: 0.0}
            await response.read()
        assert await in_flight(client, proxy) == {sending: 0.0, failed: 0.0}
    finally:
        await other.runner.cleanup()
