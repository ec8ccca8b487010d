"""--upstream-segments auto: one upstream connection on a short path; on a long one, more ranged
connections while each raises the goodput (up to --upstream-segments-max), relayed in order."""

from __future__ import annotations

import asyncio
import hashlib
import re

from tests.pattern import pattern_sha256
from tests.test_streaming import sha256_of

MIB = 1024 * 1024


def connections_reached(metrics: str) -> dict[str, float]:
    """The per-transfer connection histogram's cumulative buckets."""
    return {bucket: float(count) for bucket, count in re.findall(
        r'fileproxy_upstream_connections_per_transfer_bucket\{le="([^"]+)"\} (\S+)', metrics)}


async def ranges_sent(origin, count: int) -> list[str | None]:
    """The Range of each /bytes response the origin finished, once `count` have (it records a
    response after its last byte left, which the proxy may pass on first)."""
    for _ in range(500):
        if len(events := origin.events("bytes-sent")) >= count:
            return [event["range"] for event in events]
        await asyncio.sleep(0.01)
    raise AssertionError(f"the origin finished fewer than {count} responses")


async def metrics_of(client, proxy) -> str:
    async with client.get(f"{proxy.url}/_fileproxy/metrics") as response:
        return await response.text()


async def test_one_connection_on_a_short_path(origin, proxy, client):
    """Loopback answers its handshake in microseconds: one connection already fills it."""
    size = 20 * MIB
    async with client.get(f"{proxy.url}/bytes/{size}?seed=3") as response:
        assert await sha256_of(response) == (pattern_sha256(size, seed=3), size)
    assert await ranges_sent(origin, 1) == [None]
    assert connections_reached(await metrics_of(client, proxy)).get("+Inf", 0.0) == 0.0


async def test_connections_are_added_while_they_raise_the_goodput(origin, make_proxy, client):
    """A long path (a threshold of 0 makes loopback one) and an origin that sends each response
    at 2 MiB/s, as a lossy link holds each flow: every added connection raises the total, so
    the fetch grows to the maximum, and the body arrives whole and in order."""
    proxy = await make_proxy(origin.url, tcp_congestion_min_rtt=0, upstream_segments_max=4)
    size = 24 * MIB + 7
    async with client.get(f"{proxy.url}/bytes/{size}?seed=4&rate={2 * MIB}") as response:
        assert response.headers["Content-Length"] == str(size)
        assert await sha256_of(response) == (pattern_sha256(size, seed=4), size)
    ranges = await ranges_sent(origin, 5)
    # (the original response was left once ranges took over: it never finished sending)
    assert len(ranges) > 4 and all(r.startswith("bytes=") for r in ranges)
    reached = connections_reached(await metrics_of(client, proxy))
    assert (reached["3.0"], reached["4.0"]) == (0.0, 1.0)  # grew to 4, never past


async def test_no_growth_when_a_connection_does_not_pay(origin, make_proxy, client):
    """Unlimited loopback: a second connection adds nothing, so the fetch goes back to one."""
    proxy = await make_proxy(origin.url, tcp_congestion_min_rtt=0)
    size = 64 * MIB
    async with client.get(f"{proxy.url}/bytes/{size}?seed=5") as response:
        assert await sha256_of(response) == (pattern_sha256(size, seed=5), size)
    reached = connections_reached(await metrics_of(client, proxy))
    assert reached["+Inf"] == 1.0 and reached["2.0"] == 1.0  # at most the one probe


async def test_fixed_count_and_off_still_mean_what_they_say(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, tcp_congestion_min_rtt=0, upstream_segments=1)
    size = 20 * MIB
    async with client.get(f"{proxy.url}/bytes/{size}?rate={8 * MIB}") as response:
        assert await sha256_of(response) == (pattern_sha256(size), size)
    assert await ranges_sent(origin, 1) == [None]


async def test_segments_far_ahead_of_a_slow_client_wait_in_the_spool(origin, make_proxy, client,
                                                                    tmp_path):
    """A client that stops reading: finished segments beyond the in-memory window (segments of
    256 KiB here) go to the spool, and come back in order once it reads on; the body is
    byte-exact and no spool file is left."""
    proxy = await make_proxy(origin.url, tcp_congestion_min_rtt=0, upstream_segments_max=4,
                             segment_size=256 << 10, spool_dir=str(tmp_path))
    size, spool = 20 * MIB + 3, tmp_path / "segments"
    digest, received = hashlib.sha256(), 0
    async with client.get(f"{proxy.url}/bytes/{size}?seed=6&rate={8 * MIB}") as response:
        async for chunk in response.content.iter_chunked(MIB):
            digest.update(chunk)
            received += len(chunk)
            if received == MIB:  # (then nothing, until segments wait in the spool)
                for _ in range(1000):
                    if spool.is_dir() and any(spool.iterdir()):
                        break
                    await asyncio.sleep(0.01)
                assert spool.is_dir() and any(spool.iterdir()), "nothing was spilled"
    assert (digest.hexdigest(), received) == (pattern_sha256(size, seed=6), size)
    for _ in range(500):  # (the last file goes once the relay has read it back to its end,
        if not any(spool.iterdir()):  # which may be just after the client had the last byte)
            break
        await asyncio.sleep(0.01)
    assert list(spool.iterdir()) == []


async def test_a_stalled_head_segment_is_raced_on_another_connection(origin, make_proxy, client):
    """The first connection stalls inside the segment the relay waits for (as in a
    retransmission timeout, here for 30 s, past the read timeout): its missing bytes are asked
    for on another connection, which brings them first and wins; the body goes on at once."""
    proxy = await make_proxy(origin.url, tcp_congestion_min_rtt=0, read_timeout=30)
    size, stall_at = 20 * MIB, int(20 * MIB * 0.02)
    started = asyncio.get_running_loop().time()
    async with client.get(f"{proxy.url}/flaky/{size}?cuts=1&how=stall&at=0.02&key=race"
                          ) as response:
        assert await sha256_of(response) == (pattern_sha256(size), size)
    assert asyncio.get_running_loop().time() - started < 10  # (not the read timeout's 30 s)
    ranges = [event["range"] for event in origin.events("flaky")]
    assert ranges[:2] == [None, f"bytes={stall_at}-{MIB - 1}"]  # the head's missing bytes


async def test_a_client_leaving_stops_every_upstream_fetch(origin, make_proxy, client):
    """A client that goes away mid-transfer, once the fetch runs on several connections: every
    upstream response the fetch started is abandoned, none is left sending."""
    proxy = await make_proxy(origin.url, tcp_congestion_min_rtt=0, upstream_segments_max=4)
    size = 64 * MIB
    async with client.get(f"{proxy.url}/bytes/{size}?seed=7&rate={MIB}") as response:
        while len(origin.events("bytes-begun")) < 4:  # (the fetch grew past one connection)
            assert await response.content.readany(), "the body ended early"
        response.close()
    for _ in range(500):
        begun, abandoned = origin.events("bytes-begun"), origin.events("bytes-abandoned")
        finished = abandoned + origin.events("bytes-sent")
        if len(finished) == len(begun):
            break
        await asyncio.sleep(0.01)
    assert len(finished) == len(begun), f"{len(begun) - len(finished)} responses still sending"
    assert abandoned, "no upstream response was cut short"
    await asyncio.sleep(0.5)  # (a fetch still running would start another range by now)
    assert len(origin.events("bytes-begun")) == len(begun)
