"""Segmented upstream fetch (--upstream-segments, fileproxy/segments.py): ranges side by side,
relayed in order, byte-exact; failed segments fetched again; a changed object cuts the client."""

from __future__ import annotations

import aiohttp
import pytest

from fileproxy.upstream.segments import Segment
from tests.pattern import pattern, pattern_sha256
from tests.rawserver import RawRequest, RawServer
from tests.test_streaming import sha256_of

MIB = 1024 * 1024


async def range_requests(client: aiohttp.ClientSession, origin_url: str, size: int
                         ) -> list[str | None]:
    """The Range header of each request the origin had for /flaky/{size}, in order."""
    async with client.get(f"{origin_url}/_origin/events") as response:
        events = (await response.json())["events"]
    return [event["range"] for event in events
            if event["event"] == "flaky" and event["path"] == f"/flaky/{size}"]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-server"])
async def test_a_large_get_arrives_byte_exact_from_ranges_fetched_side_by_side(
        origin, make_proxy, client, fast_path):
    proxy = await make_proxy(origin.url, upstream_segments=4, segment_size=MIB,
                             fast_path=fast_path)
    size = 10 * MIB + (7 if fast_path else 9)
    async with client.get(f"{proxy.url}/flaky/{size}?cuts=0&key=whole") as response:
        assert response.status == 200 and response.headers["Content-Length"] == str(size)
        assert await sha256_of(response) == (pattern_sha256(size), size)
    ranges = await range_requests(client, origin.url, size)
    assert ranges[0] is None  # the client's GET, whose first segment is kept
    assert sorted(ranges[1:], key=lambda wanted: int(wanted[6:].partition("-")[0])) == [
        f"bytes={start}-{min(start + MIB, size) - 1}" for start in range(MIB, size, MIB)]


async def test_segments_cut_by_the_upstream_are_fetched_again_from_where_they_stopped(
        origin, make_proxy, client):
    """The first three upstream responses break off a third of the way through: with segments
    the download still completes byte-exact (without them the client's connection is cut)."""
    proxy = await make_proxy(origin.url, upstream_segments=3, segment_size=MIB)
    size = 6 * MIB
    async with client.get(f"{proxy.url}/flaky/{size}?cuts=3&key=cut") as response:
        assert await sha256_of(response) == (pattern_sha256(size), size)
    ranges = await range_requests(client, origin.url, size)
    starts = [int(wanted[6:].partition("-")[0]) for wanted in ranges if wanted]
    assert any(start % MIB for start in starts), ranges  # a segment resumed where it stopped


async def test_a_segment_cut_again_and_again_goes_on_while_each_try_brings_bytes(
        origin, make_proxy, client):
    """With one segment at a time every response breaks off a third of the way, eight times in
    a row: each try brings bytes, so the segment is never given up (a link reset every few
    seconds must not end a download)."""
    proxy = await make_proxy(origin.url, upstream_segments=2, segment_size=MIB)
    size = 2 * MIB
    async with client.get(f"{proxy.url}/flaky/{size}?cuts=8&key=again") as response:
        assert await sha256_of(response) == (pattern_sha256(size), size)
    assert len(await range_requests(client, origin.url, size)) >= 8


def changing_object(request: RawRequest) -> bytes:
    """A 3 MiB object whose ETag changes after the first request (If-Range then gets a 200)."""
    body = b"".join(pattern(0, 3 * MIB))
    etag = b'"v1"' if request.number == 1 and request.connection == 1 else b'"v2"'
    return (b"HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\nETag: %b\r\nContent-Length: %d\r\n\r\n"
            % (etag, len(body)) + body)


async def test_an_object_that_changed_between_segments_cuts_the_client_connection(make_proxy,
                                                                                  client):
    async with RawServer(changing_object) as origin:
        proxy = await make_proxy(origin.url, upstream_segments=2, segment_size=MIB)
        async with client.get(f"{proxy.url}/object") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


@pytest.mark.parametrize("head", [
    b'HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\nETag: W/"weak"\r\n',
    b'HTTP/1.1 200 OK\r\nETag: "no-ranges"\r\n',
], ids=["weak-etag", "no-accept-ranges"])
async def test_responses_that_cannot_be_split_safely_are_relayed_whole(make_proxy, client, head):
    body = b"".join(pattern(0, 3 * MIB))
    async with RawServer(lambda _request: head + b"Content-Length: %d\r\n\r\n" % len(body)
                         + body) as origin:
        proxy = await make_proxy(origin.url, upstream_segments=4, segment_size=MIB)
        async with client.get(f"{proxy.url}/object") as response:
            assert await sha256_of(response) == (pattern_sha256(3 * MIB), 3 * MIB)
        assert len(origin.requests) == 1


async def test_two_fillers_of_one_segment_each_give_only_what_it_lacks():
    """A raced segment: both connections offer the same bytes from where they stand; each byte
    is taken once, from the first to bring it, in order, and the rest counted as fetched twice."""
    segment = Segment(100, 110)
    assert segment.offer(100, b"abcd") == 4
    assert segment.offer(100, b"abcdef") == 2  # (the slower one: its first 4 were had)
    assert segment.offer(104, b"ef") == 0
    with pytest.raises(ValueError):
        segment.offer(107, b"h")  # (a byte beyond the next one needed: never taken)
    assert segment.offer(106, b"ghijXYZ") == 4  # (nothing past the segment's end)
    assert segment.done and segment.duplicate == 4 + 2 + 3
    assert b"".join([chunk async for chunk in chunks_of(segment)]) == b"abcdefghij"


async def chunks_of(segment: Segment):
    while (chunk := await segment.next()) is not None:
        yield chunk
