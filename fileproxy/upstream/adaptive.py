"""Adaptive parallel ranged fetch (`--upstream-segments auto`, the default).

On a long lossy upstream link one TCP flow gets a fraction of the bandwidth whatever its receiver
does; several ranged connections side by side fill it. How many is not known in advance, so a
large response (strong ETag, Accept-Ranges, at least AUTO_MIN_LENGTH) on a long path (its
connection's round trip at least --tcp-congestion-min-rtt) starts on its own connection alone,
segment after segment; the goodput of all connections together is measured (an interval to
settle, one to measure), and the connections grow STEP-fold while the last step raised it by GAIN
or more, up to --upstream-segments-max (a step that did not pay is taken back and tried again
later, RETRIES times). A short path (loopback, a LAN), where one connection already fills the
link, gets none. Segments are relayed in order, at most max(connections, 2) of them in memory
(the original connection reads ahead by one until a ranged one takes the next segment, then it
stops). The relay waits for the window's first segment, so a connection with nothing left to
claim splits the first segment still missing bytes and fetches its second half: segments stay
small near the head. A head segment that brings no byte for PATIENCE_RTTS round trips (a loss
burst, a retransmission timeout) is raced: its missing bytes are asked for on another
connection, and the first of the two to bring the next byte wins; the other is cancelled. A
failed segment is fetched again from where it stopped (segments.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from fileproxy.config import Config
from fileproxy.http.headers import Outgoing
from fileproxy.upstream.aiohttp_client import UpstreamResponse
from fileproxy.upstream.segments import (
    FETCH_ERRORS,
    Fetch,
    Plan,
    Segment,
    SegmentedFetch,
    SegmentFailed,
    splittable,
)
from fileproxy.upstream.sockets import handshake_rtt

log = logging.getLogger("fileproxy.upstream.adaptive")

AUTO = 0  # --upstream-segments auto
AUTO_MIN_LENGTH = 16 << 20  # smaller bodies end before more connections could pay off
GAIN = 1.15  # a connection stays when the total goodput rose by this much with it
PROBE_SECONDS = 1.0  # at least; and at least 8 round trips (a new flow's slow start)
RETRIES = 3  # steps up that did not pay before the count stays
STEP = 4  # connections multiply by this while it pays: 1, 4, 16 (a short ramp)
READ_BACK = 256 << 10  # bytes read back from the spool at a time
MIN_SPLIT = 64 << 10  # a straggler is split in two while each half is at least this
PATIENCE_RTTS = 3  # a head segment silent this many round trips is raced on another connection
MIN_PATIENCE = 0.3  # seconds, at least (and when the round trip is unknown: 1 s)


def adaptive_plan(config: Config, outgoing: Outgoing, response: UpstreamResponse) -> Plan | None:
    """A plan when segments are auto and the response is large, splittable and on a long path."""
    if config.upstream_segments != AUTO:
        return None
    split = splittable(outgoing, response)
    if split is None or split[0] < max(AUTO_MIN_LENGTH, 2 * config.segment_size):
        return None
    rtt = path_rtt(response)
    if rtt is not None and rtt < config.tcp_congestion_min_rtt:
        return None  # one connection fills a short path
    return Plan(split[0], config.segment_size, split[1], config.upstream_segments_max)


def path_rtt(response: UpstreamResponse) -> float | None:
    connection = response.connection
    transport = connection.transport if connection is not None else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    return handshake_rtt(sock) if sock is not None else None


class AdaptiveFetch(SegmentedFetch):
    """The body of `first` (a 200 for the whole object), on as many connections as pay off."""

    def __init__(self, plan: Plan, outgoing: Outgoing, fetch: Fetch, rtt: float | None = None,
                 report: Callable[[int, int], None] = lambda most, twice: None,
                 spool: SegmentSpool | None = None) -> None:
        super().__init__(plan, outgoing, fetch)
        self.spool = spool
        # Once it ends: the most connections the transfer had, the bytes received twice.
        self.report = report
        self.segments = [Segment(start, end) for start, end in plan.spans()]
        self.claimed = 0  # segments [0, claimed) have a filler
        self.relayed = 0  # the segment being relayed
        self.connections = 1  # wanted: the original one and connections - 1 ranged ones
        self.most = 1  # the most connections this transfer had
        self.ranged = 0  # ranged fillers running
        self.streaming = True  # the original connection still reads
        self.splits = 0
        self.closed = False  # the transfer ended: nothing more is started
        self.interval = max(PROBE_SECONDS, 8 * (rtt or 0.0))
        self.patience = max(MIN_PATIENCE, PATIENCE_RTTS * rtt) if rtt is not None else 1.0
        self.dropped = 0  # bytes read past a segment's end that its neighbour fetches itself
        self.filler: dict[Segment, asyncio.Task[Any]] = {}  # who fills a claimed segment
        self.racing: set[Segment] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._window_moved = asyncio.Event()

    async def chunks(self, first: UpstreamResponse) -> AsyncIterator[bytes]:
        """The body in order; raises SegmentFailed when it cannot be completed."""
        self.spawn(self.stream(first, self.claim_next()))
        self.spawn(self.control())
        self.spawn(self.watch_head())
        try:
            for index, segment in enumerate(self.segments):
                self.relayed = index
                self.schedule()
                while (chunk := await segment.next()) is not None:
                    yield chunk
        finally:
            self.closed = True  # (a filler ending now must not start another)
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.report(self.most, self.dropped + sum(s.duplicate for s in self.segments))
            if self.spool is not None:
                await self.spool.close()

    # -- who fetches what

    def window_end(self) -> int:
        """Segments may be fetched this far ahead of the relay: those in memory, and as many
        again as the spool may keep (three times the connections at most)."""
        spooled = min(3 * self.connections, self.spool.slots) if self.spool is not None else 0
        return self.relayed + self.in_memory() + spooled

    def in_memory(self) -> int:
        return max(self.connections, 2)

    def claim_next(self) -> Segment:
        segment = self.segments[self.claimed]
        self.claimed += 1
        return segment

    def can_claim(self) -> bool:
        return self.claimed < len(self.segments) and self.claimed < self.window_end()

    def schedule(self) -> None:
        """Ranged fillers up to the connections wanted: for the window's unclaimed segments,
        else for the second half of a straggler that holds the window up; the original
        connection is told the window moved."""
        while not self.closed and self.ranged + self.streaming < self.connections:
            if self.can_claim():
                segment = self.claim_next()
            elif (half := self.split_a_straggler()) is not None:
                segment = half
            else:
                break
            self.ranged += 1
            self.spawn(self.fill_ranged(segment))
        self._window_moved.set()

    def split_a_straggler(self) -> Segment | None:
        """The second half of the window's first segment still missing enough bytes, as a new
        segment right after it, claimed (its own filler stops at the split). In-order relay
        waits for the head: splitting it keeps idle connections at work there, and leaves
        segments small near the head."""
        for index in range(self.relayed, self.claimed):
            segment = self.segments[index]
            if segment.missing >= 2 * MIN_SPLIT and not segment.done:
                middle = segment.end - segment.missing // 2
                half = Segment(middle, segment.end)
                segment.end = middle
                self.segments.insert(index + 1, half)
                self.claimed += 1
                self.splits += 1
                return half
        return None

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self.finished)

    def finished(self, task: asyncio.Task[None]) -> None:
        """A filler or the controller ended: one that failed says so (a segment's own failure
        ends that segment, which the relay reports; this is anything else)."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("adaptive fetch: %s failed: %r", task.get_coro(), task.exception())

    async def fill_ranged(self, segment: Segment) -> None:
        try:
            with self.filling(segment):
                await self.fill(segment)
            self.keep(segment)
        finally:
            self.ranged -= 1
            self.schedule()

    @contextlib.contextmanager
    def filling(self, segment: Segment) -> Iterator[None]:
        """The running task is the one filling `segment` (a race may cancel it)."""
        task = asyncio.current_task()
        assert task is not None
        self.filler[segment] = task
        try:
            yield
        finally:
            if self.filler.get(segment) is task:
                del self.filler[segment]

    def keep(self, segment: Segment) -> None:
        """A finished segment far ahead of the relay goes to the spool, not memory."""
        if self.spool is not None and segment.done and \
                self.segments.index(segment) >= self.relayed + self.in_memory():
            self.spool.take(segment)

    async def stream(self, response: UpstreamResponse, segment: Segment) -> None:
        """The original response's body, segment after segment, while the next one is still
        unclaimed (it waits while the window is full); it stops once a ranged connection took
        the next one. A cut here leaves the rest of its segment to a ranged fetch."""
        carried, position = b"", 0  # (read past a segment's end: the next one's first bytes)
        try:
            async with response:
                while True:
                    try:
                        with self.filling(segment):
                            carried, position = await read_span(segment, response, carried,
                                                                position)
                    except FETCH_ERRORS as error:
                        log.info("segment at %d: the first connection failed (%r); ranges go "
                                 "on", segment.start, error)
                        break
                    self.keep(segment)
                    following = await self.next_in_line(segment)
                    if following is None:
                        self.dropped += len(carried)
                        return
                    segment = following
            with self.filling(segment):
                await self.fill(segment)  # (the rest of the segment it was reading when cut)
        finally:
            self.streaming = False
            self.schedule()

    async def next_in_line(self, segment: Segment) -> Segment | None:
        """The segment right after `segment` once the window allows it, if no one took it."""
        index = self.segments.index(segment) + 1
        while self.claimed == index and not self.can_claim():
            self._window_moved.clear()
            await self._window_moved.wait()
        return self.claim_next() if self.claimed == index else None

    # -- a stalled head

    async def watch_head(self) -> None:
        """Race the segment the relay waits for once it brought no byte for a while."""
        seen, since = (self.segments[0], 0), time.monotonic()
        while True:
            await asyncio.sleep(self.patience / 4)
            head = self.segments[self.relayed]
            if head.done or head in self.racing or head not in self.filler:
                continue
            if (head, head.received) != seen:
                seen, since = (head, head.received), time.monotonic()
            elif time.monotonic() - since >= self.patience:
                self.racing.add(head)
                self.spawn(self.race(head))

    async def race(self, segment: Segment) -> None:
        """Ask for the segment's missing bytes on another connection: the first of the two
        fillers to bring a byte wins (and goes on filling it), the other is cancelled."""
        racer, holder = asyncio.current_task(), self.filler[segment]
        assert racer is not None
        log.info("segment at %d: no byte for %.1f s at byte %d; racing it on another "
                 "connection", segment.start, self.patience, segment.reached)

        def first_answer() -> None:
            winner = asyncio.current_task()
            segment.on_progress = None
            self.racing.discard(segment)
            (holder if winner is racer else racer).cancel()
            if winner is racer:
                self.filler[segment] = racer

        segment.on_progress = first_answer
        try:
            await self.fill(segment)
        finally:
            if segment.on_progress is first_answer:
                segment.on_progress = None
                self.racing.discard(segment)
            if self.filler.get(segment) is racer:
                del self.filler[segment]

    # -- how many connections

    async def control(self) -> None:
        """STEP times as many connections while that paid, else back to the last count that did
        (and another try a few intervals later, as a lossy link's rates are noisy): each count is
        given an interval to settle, then measured over the next one."""
        before: float | None = None
        paid, failures = self.connections, 0
        while failures < RETRIES:
            rate = await self.goodput()
            if before is not None and rate < before * GAIN:
                failures += 1
                self.connections = paid
                log.info("adaptive fetch: back to %d connections (%.1f Mbit/s did not rise)",
                         paid, rate * 8e-6)
                await asyncio.sleep(self.interval * 4 * failures)
                before = await self.goodput()
            else:
                before, paid = rate, self.connections
            if self.connections >= self.plan.parallel:
                return
            self.connections = min(self.plan.parallel, self.connections * STEP)
            self.most = max(self.most, self.connections)
            self.schedule()

    async def goodput(self) -> float:
        """Bytes a second of all connections together, over an interval after one to settle."""
        await asyncio.sleep(self.interval)
        received, started = self.received(), time.monotonic()
        await asyncio.sleep(self.interval)
        return (self.received() - received) / max(time.monotonic() - started, 1e-6)

    def received(self) -> int:
        return sum(segment.received for segment in self.segments)


async def read_span(segment: Segment, response: UpstreamResponse, carried: bytes,
                    position: int) -> tuple[bytes, int]:
    """The segment's bytes from the whole object's body, read to byte `position`, `carried`
    (the bytes from there on) first; returns what was read past the segment's end (it belongs
    to the next segment) and the position after the segment."""
    chunk = carried
    while position < segment.end:
        if not chunk:
            chunk = await response.content.readany()
            if not chunk:
                raise ConnectionResetError("the body ended early")
        piece = chunk[:segment.end - position]
        segment.offer(position, piece)
        position += len(piece)
        chunk = chunk[len(piece):]
    return chunk, position


class SegmentSpool:
    """Finished segments kept on disk while the relay catches up (a file each, removed once
    read back or when the transfer ends), at most `limit` bytes at a time; file I/O runs in a
    thread, never on the event loop."""

    def __init__(self, directory: Path, limit: int, segment_size: int) -> None:
        self.directory, self.limit = directory, limit
        self.slots = limit // segment_size
        self.in_use = 0
        self._paths: set[Path] = set()
        self._writes: set[asyncio.Future[None]] = set()

    def take(self, segment: Segment) -> None:
        if self.in_use + segment.received > self.limit:
            return  # (full: it stays in memory, the window is bounded anyway)
        path = self.directory / f"{secrets.token_hex(8)}.segment"
        self._paths.add(path)
        self.in_use += segment.received
        written: asyncio.Future[None] | None = None
        position = 0

        async def read_back() -> bytes:
            nonlocal position
            assert written is not None
            try:
                await written
                piece = await asyncio.to_thread(read_piece, path, position, READ_BACK)
            except OSError as error:
                raise SegmentFailed(f"the segment spool failed: {error}") from None
            position += len(piece)
            if not piece:
                await self.forget(path, position)
            return piece

        data = segment.hand_over(read_back)
        written = asyncio.ensure_future(asyncio.to_thread(write_file, path, data))
        self._writes.add(written)
        written.add_done_callback(self._writes.discard)

    async def forget(self, path: Path, size: int) -> None:
        if path in self._paths:
            self._paths.discard(path)
            self.in_use -= size
            await asyncio.to_thread(path.unlink, True)

    async def close(self) -> None:
        """Every file still kept goes (on every way a transfer ends), once no write to one is
        still on its way."""
        await asyncio.gather(*self._writes, return_exceptions=True)
        paths, self._paths = list(self._paths), set()
        for path in paths:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(path.unlink, True)


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def read_piece(path: Path, position: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(position)
        return handle.read(size)
