"""Segmented upstream fetch: a large GET's body fetched as several byte ranges at once, relayed in order.

On a long lossy link one TCP flow gets a fraction of the bandwidth whatever its receiver does
(cubic at 1.5% loss and 150 ms: under 1 Mbit/s of 10), and a transfer is only as fast as the
upstream's sender. With `--upstream-segments N`, once a GET's response shows it can be split
(200, a Content-Length of at least two segments, Accept-Ranges: bytes, a strong ETag), fileproxy
keeps the first segment of that response and fetches the following ones as `Range` + `If-Range`
requests to the same upstream on other connections, at most N segments at a time, relaying them
to the client in order. Memory per transfer stays under N segments. A segment whose connection
fails is fetched again from the byte where it stopped, so an upstream reset mid-body no longer
ends the download; a segment answered with anything but the exact 206 asked for (the object
changed) cuts the client connection: a body of mixed versions is never passed off as complete.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs

from fileproxy.config import Config
from fileproxy.http.errors import ProxyError
from fileproxy.http.headers import Outgoing, response_length
from fileproxy.upstream.aiohttp_client import UpstreamResponse

log = logging.getLogger("fileproxy.upstream.segments")

RETRIES_PER_SEGMENT = 3
# What a failed range fetch may raise: the fetch is repeated from the byte where it stopped.
FETCH_ERRORS = (ProxyError, TimeoutError, ConnectionError, aiohttp.ClientError)

Fetch = Callable[[Outgoing], Awaitable[UpstreamResponse]]


class SegmentFailed(Exception):
    """A segment could not be fetched (or the object changed): the body cannot be completed."""


@dataclass(frozen=True)
class Plan:
    """How one body is split: its length, the segment size, the validator every range must match."""

    length: int
    size: int
    etag: str
    parallel: int

    def spans(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.size, self.length))
                for start in range(0, self.length, self.size)]


def plan_for(config: Config, outgoing: Outgoing, response: UpstreamResponse) -> Plan | None:
    """A plan when a fixed number of segments is set and the response can be split safely."""
    if config.upstream_segments < 2:
        return None
    split = splittable(outgoing, response)
    if split is None or split[0] < 2 * config.segment_size:
        return None
    return Plan(split[0], config.segment_size, split[1], config.upstream_segments)


def splittable(outgoing: Outgoing, response: UpstreamResponse) -> tuple[int, str] | None:
    """(length, strong ETag) of a GET's 200 for a whole object that ranges can be asked of."""
    if outgoing.method != "GET" or response.status != 200 or hdrs.RANGE in outgoing.headers:
        return None
    headers = response.headers
    etag = headers.get(hdrs.ETAG, "")
    if headers.get(hdrs.ACCEPT_RANGES, "").lower() != "bytes" or not etag.startswith('"'):
        return None  # (a weak W/"..." validator cannot guard a byte range: RFC 9110 13.1.5)
    length = response_length(response)
    return None if length is None else (length, etag)


class Segment:
    """One byte range on its way: chunks as they arrive, taken in order by the relaying side."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.received = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._done = False
        self._error: BaseException | None = None
        self._changed = asyncio.Event()
        self._stored: Callable[[], Awaitable[bytes]] | None = None  # spilled bytes, read back
        self.duplicate = 0  # bytes offered that the segment already had (a race's loser's)
        self.on_progress: Callable[[], None] | None = None  # called when new bytes arrive

    @property
    def missing(self) -> int:
        return self.end - self.start - self.received

    @property
    def done(self) -> bool:
        return self._done

    @property
    def reached(self) -> int:
        """The byte the segment needs next."""
        return self.start + self.received

    def offer(self, position: int, chunk: bytes) -> int:
        """Take what `chunk` (the bytes from `position` on, which must not lie beyond what the
        segment has) adds; finished when complete. Two fillers of one segment (a race) may both
        offer: the first to bring a byte gives it. Returns how many bytes were new."""
        skip = self.reached - position
        if skip < 0:
            raise ValueError(f"a gap: byte {position} offered, byte {self.reached} needed")
        new = chunk[skip:skip + self.missing] if skip or len(chunk) > self.missing else chunk
        self.duplicate += len(chunk) - len(new)
        if new:
            self._chunks.append(new)
            self.received += len(new)
            self._changed.set()
            if self.on_progress is not None:
                self.on_progress()
            if not self.missing:
                self.finish()
        return len(new)

    def finish(self, error: BaseException | None = None) -> None:
        if not self._done:
            self._done, self._error = True, error
            self._changed.set()

    def hand_over(self, read_back: Callable[[], Awaitable[bytes]]) -> bytes:
        """The bytes held in memory, for keeping elsewhere: from now on `read_back` gives them
        back in pieces (b"" at their end)."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._stored = read_back
        return data

    async def next(self) -> bytes | None:
        """The next chunk, None once the segment is complete; raises what ended it early."""
        while not self._chunks:
            if self._stored is not None:
                if piece := await self._stored():
                    return piece
                self._stored = None
                continue
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            self._changed.clear()
            await self._changed.wait()
        return self._chunks.popleft()


class SegmentedFetch:
    """The body of `first` (a 200 for the whole object), fetched segment by segment."""

    def __init__(self, plan: Plan, outgoing: Outgoing, fetch: Fetch) -> None:
        self.plan, self.outgoing, self.fetch = plan, outgoing, fetch

    async def chunks(self, first: UpstreamResponse) -> AsyncIterator[bytes]:
        """The body in order; raises SegmentFailed when it cannot be completed."""
        segments = [Segment(start, end) for start, end in self.plan.spans()]
        fillers = [asyncio.create_task(self.fill(segments[0], first))]
        try:
            for index, segment in enumerate(segments):
                while len(fillers) < min(len(segments), index + self.plan.parallel):
                    fillers.append(asyncio.create_task(self.fill(segments[len(fillers)])))
                while (chunk := await segment.next()) is not None:
                    yield chunk
        finally:
            for filler in fillers:
                filler.cancel()
            await asyncio.gather(*fillers, return_exceptions=True)

    async def fill(self, segment: Segment, response: UpstreamResponse | None = None) -> None:
        """Fetch the segment, again from where it stopped when a connection fails; it fails for
        good after RETRIES_PER_SEGMENT failures in a row that brought no byte (a link reset
        every few seconds still lets every segment through)."""
        failures, received = 0, segment.received
        while segment.missing and not segment.done:
            position = segment.reached
            try:
                if response is None:
                    response = await self.fetch_range(segment, position)
                async with response:
                    await read_into(segment, response, position)
            except SegmentFailed as error:
                segment.finish(error)
                return
            except FETCH_ERRORS as error:
                failures = 1 if segment.received > received else failures + 1
                received = segment.received
                if failures > RETRIES_PER_SEGMENT:
                    segment.finish(SegmentFailed(f"bytes {segment.start}-{segment.end - 1}: "
                                                 f"{error!r}"))
                    return
                log.info("segment at %d failed at byte %d (%r): fetching the rest again",
                         segment.start, segment.start + segment.received, error)
                await asyncio.sleep(0.05 * failures)
            response = None
        segment.finish()

    async def fetch_range(self, segment: Segment, first: int) -> UpstreamResponse:
        last = segment.end - 1
        headers = self.outgoing.headers.copy()
        headers[hdrs.RANGE] = f"bytes={first}-{last}"
        headers[hdrs.IF_RANGE] = self.plan.etag
        response = await self.fetch(dataclasses.replace(self.outgoing, headers=headers))
        expected = f"bytes {first}-{last}/{self.plan.length}"
        if response.status != 206 or response.headers.get(hdrs.CONTENT_RANGE) != expected \
                or response.headers.get(hdrs.ETAG, self.plan.etag) != self.plan.etag:
            response.close()
            raise SegmentFailed(f"the upstream answered {response.status} "
                                f"{response.headers.get(hdrs.CONTENT_RANGE, '')!r} for "
                                f"{expected!r}: the object changed or ranges are not served")
        return response


async def read_into(segment: Segment, response: UpstreamResponse, position: int) -> None:
    """The segment's bytes from the response body, whose first byte is byte `position`, until
    the segment is complete (the first response carries the whole object: the reading stops at
    the segment's end and its connection is not reused)."""
    while position < segment.end and not segment.done:
        chunk = await response.content.readany()
        if not chunk:
            raise ConnectionResetError("the body ended early")
        piece = chunk[:segment.end - position]
        segment.offer(position, piece)
        position += len(piece)
