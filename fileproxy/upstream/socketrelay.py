"""Socket-to-socket relay of large Content-Length bodies, both ways, once the headers are through.

The aiohttp path handles every body byte several times in user space (uvloop's read into a new
bytes object, the HTTP parser, the stream buffer). A body of known length needs no parsing, so
fileproxy pauses aiohttp's reading of the source connection, forwards what aiohttp had already
buffered, and moves the rest itself between the two sockets with a mover:

- `copy` (the default): read into one reusable 256 KiB ring buffer, write from it; one copy in,
  one out, no allocation per chunk (what nginx does with proxy_buffering off).
- `splice`: source socket -> pipe -> sink socket in the kernel (Linux splice), no copy in user
  space, but a pipe slot per received fragment: with 4 KiB page-cache fragments (an origin using
  sendfile) or MTU-sized ones from a NIC it costs more CPU than the copies it saves.

Either way the buffer is the only one (256 KiB), so memory stays flat and backpressure is the
kernel's. The source connection's HTTP parser never sees those bytes: a lean-client upstream
connection whose body went through to its end gets a fresh parser and is reused
(lean.LeanConnection.body_taken_over); an aiohttp one is closed, and an upload relayed this way
closes the client's connection after the response. Anything unusual (TLS, unix sockets, small or
chunked bodies) takes the ordinary path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from aiohttp.http_writer import StreamWriter

if TYPE_CHECKING:
    from fileproxy.upstream.aiohttp_client import UpstreamResponse

BUFFER_SIZE = 256 << 10
MIN_TAKE_OVER_BYTES = 1 << 20  # below this the set-up costs more than it saves
MOVERS = ("copy", "splice")
YIELD_EVERY = 1 << 20  # give other transfers a turn after this many bytes moved without waiting
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class SourceCut(Exception):
    """The sending side closed, failed or went silent before the announced length arrived."""


class SinkGone(Exception):
    """The receiving side closed or reset its connection."""


class Sent(Protocol):
    body_bytes: int


# Writes body chunks to the sink's transport and returns once they all left (the byte count).
Flush = Callable[[list[bytes]], Awaitable[int]]


@dataclass(frozen=True)
class Timeouts:
    """Seconds each side may stall (0: no limit): the source sending nothing while the buffer is
    empty, the sink taking nothing while it is not."""

    source: float
    sink: float


def tcp_fd(transport: asyncio.BaseTransport | None) -> int | None:
    """The socket fd of a plain (non-TLS) TCP transport, else None."""
    if transport is None or transport.is_closing() or transport.get_extra_info("sslcontext"):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock.fileno()


def can_take_over(mover: str, length: int | None,
                  *transports: asyncio.BaseTransport | None) -> bool:
    """Whether a body can go socket to socket with this mover ("off": never)."""
    return (mover in MOVERS and (mover != "splice" or hasattr(os, "splice"))
            and length is not None and length >= MIN_TAKE_OVER_BYTES
            and all(tcp_fd(transport) is not None for transport in transports))


@contextlib.contextmanager
def duplicated(*fds: int) -> Iterator[list[int]]:
    """Private duplicates of the sockets: the event loop may be watching the originals."""
    opened: list[int] = []
    try:
        for fd in fds:
            opened.append(os.dup(fd))
        yield opened
    finally:
        for fd in opened:
            os.close(fd)


class Mover(Protocol):
    """Moves bytes source -> its buffer -> sink; `held` bytes are in the buffer."""

    held: int

    def fill(self, count: int) -> int:
        """Take up to `count` bytes from the source (0: none ready). Raises SourceCut."""

    def drain(self) -> int:
        """Give held bytes to the sink (0: it takes none now). Raises SinkGone."""

    def close(self) -> None:
        """Free the buffer."""


class CopyMover:
    """A ring buffer in user space: readv into the free part, write from the held part."""

    def __init__(self, source: int, sink: int) -> None:
        self._source, self._sink = source, sink
        self._view = memoryview(bytearray(BUFFER_SIZE))
        self._head = 0  # where the oldest held byte is
        self.held = 0

    def fill(self, count: int) -> int:
        tail = (self._head + self.held) % BUFFER_SIZE
        room = min(count, BUFFER_SIZE - self.held, BUFFER_SIZE - tail)
        moved = read_from_source(lambda: os.readv(self._source, [self._view[tail:tail + room]]))
        self.held += moved
        return moved

    def drain(self) -> int:
        head = self._head
        part = self._view[head:head + min(self.held, BUFFER_SIZE - head)]
        moved = write_to_sink(lambda: os.write(self._sink, part))
        self.held -= moved
        self._head = (head + moved) % BUFFER_SIZE if self.held else 0
        return moved

    def close(self) -> None:
        self._view.release()


class SpliceMover:
    """A pipe: splice socket -> pipe -> socket, the bytes never leave the kernel."""

    def __init__(self, source: int, sink: int) -> None:
        self._source, self._sink = source, sink
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._pipe_w, F_SETPIPE_SZ, BUFFER_SIZE)
        self.held = 0

    def fill(self, count: int) -> int:
        moved = read_from_source(
            lambda: os.splice(self._source, self._pipe_w, count, flags=SPLICE_FLAGS))
        self.held += moved
        return moved

    def drain(self) -> int:
        moved = write_to_sink(
            lambda: os.splice(self._pipe_r, self._sink, self.held, flags=SPLICE_FLAGS))
        self.held -= moved
        return moved

    def close(self) -> None:
        os.close(self._pipe_r)
        os.close(self._pipe_w)


def read_from_source(read: Callable[[], int]) -> int:
    """Bytes a non-blocking read moved (0: none ready); SourceCut when it failed or ended."""
    try:
        moved = read()
    except BlockingIOError:
        return 0
    except OSError as error:
        raise SourceCut(f"read failed: {error.strerror}") from None
    if moved == 0:
        raise SourceCut("connection closed")
    return moved


def write_to_sink(write: Callable[[], int]) -> int:
    """Bytes a non-blocking write moved (0: the sink takes none now); SinkGone when it failed."""
    try:
        return write()
    except BlockingIOError:
        return 0
    except OSError as error:
        raise SinkGone(f"write failed: {error.strerror}") from None


def make_mover(mover: str, source: int, sink: int) -> Mover:
    return SpliceMover(source, sink) if mover == "splice" else CopyMover(source, sink)


class Readiness:
    """Waits for a source to be readable or a sink writable. Registrations with the event loop
    change only when what is wanted changes, not at every wait: an idle source waited on a
    thousand times costs no epoll_ctl calls after the first."""

    def __init__(self, source: int, sink: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._source, self._sink = source, sink
        self._reading = self._writing = False
        self._ready: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _want(self, read: bool, write: bool) -> None:
        if read != self._reading:
            if read:
                self._loop.add_reader(self._source, self._wake)
            else:
                self._loop.remove_reader(self._source)
            self._reading = read
        if write != self._writing:
            if write:
                self._loop.add_writer(self._sink, self._wake)
            else:
                self._loop.remove_writer(self._sink)
            self._writing = write

    async def wait(self, read: bool, write: bool, timeout: float | None) -> None:
        self._want(read, write)
        self._ready = self._loop.create_future()
        async with asyncio.timeout(timeout):
            await self._ready

    def close(self) -> None:
        self._want(False, False)


def take_buffered(protocol: Any, content: Any) -> list[bytes]:
    """Pause aiohttp's reading of a connection and take every body byte it already holds.

    read_nowait() resumes the protocol whenever the buffer runs low, which also feeds the parser
    whatever it had put aside; nothing can arrive from the socket until the loop runs again, so
    pausing again at once leaves the socket as the only place the rest of the body can be."""
    protocol.pause_reading()  # for a ResponseHandler this also stops its sock_read timer
    taken: list[bytes] = []
    while content.total_bytes > sum(map(len, taken)) and not content.at_eof():
        taken.append(content.read_nowait())
        protocol.pause_reading()
    return taken


async def write_all(writer: StreamWriter, chunks: list[bytes]) -> int:
    """Write chunks through aiohttp's writer, then flush: headers aiohttp keeps back to send with
    the first body chunk go now, and the transport buffer empties, so bytes relayed socket to socket cannot
    overtake anything."""
    for chunk in chunks:
        await writer.write(chunk)
    writer.send_headers()
    transport = writer.transport
    assert transport is not None
    transport.set_write_buffer_limits(high=0)
    try:
        await writer.drain()
    finally:
        transport.set_write_buffer_limits()
    while transport.get_write_buffer_size():  # pragma: no cover - drain above empties it
        await asyncio.sleep(0.001)
    return sum(map(len, chunks))


async def take_over_response_body(upstream: UpstreamResponse, sent: Sent, length: int,
                                  timeouts: Timeouts, sink: asyncio.BaseTransport | None,
                                  flush: Flush, mover: str) -> None:
    """Upstream -> client, counting in sent.body_bytes what reached the client's socket: what
    the upstream connection had buffered goes through `flush` (which returns once it left), the
    rest socket to socket. Raises SourceCut or SinkGone; the caller closes the upstream
    connection in every case."""
    assert upstream.connection is not None
    buffered = take_buffered(upstream.connection.protocol, upstream.content)
    sent.body_bytes += await flush(buffered)
    await relay_rest(upstream.connection.transport, sink, length - sent.body_bytes, timeouts,
                     sent, mover)


async def take_over_request_body(request: web.Request, writer: StreamWriter, length: int,
                                 sent: Sent, timeouts: Timeouts, mover: str) -> None:
    """Client -> upstream. The client connection cannot carry another request afterwards."""
    assert writer.transport is not None and request.transport is not None
    buffered = take_buffered(request.protocol, request.content)
    sent.body_bytes += await write_all(writer, buffered)
    try:
        await relay_rest(request.transport, writer.transport, length - sent.body_bytes, timeouts,
                         sent, mover)
    except SourceCut:
        request.transport.close()  # the client broke off: this cancels the whole exchange
        raise
    finally:
        end_body_quietly(request)


def end_body_quietly(request: web.Request) -> None:
    """Mark the request body read, so aiohttp does not linger draining bytes that went by (or
    never will), and keep the connection paused: its parser must not see another byte."""
    request.content.feed_eof()  # this resumes reading...
    transport = request.transport
    if transport is not None and not transport.is_closing():
        request.protocol.pause_reading()  # ...so pause again before the loop can read anything


async def relay_rest(source: asyncio.BaseTransport | None, sink: asyncio.BaseTransport | None,
                     remaining: int, timeouts: Timeouts, sent: Sent, mover: str) -> None:
    source_fd, sink_fd = tcp_fd(source), tcp_fd(sink)
    if source_fd is None or sink_fd is None:
        raise SinkGone("connection closed while taking over")
    with duplicated(source_fd, sink_fd) as (source_dup, sink_dup):
        moving = make_mover(mover, source_dup, sink_dup)
        try:
            await Pump(source_dup, sink_dup, moving, timeouts, sent).run(remaining)
        finally:
            moving.close()


@dataclass
class Pump:
    """Moves `remaining` bytes source -> buffer -> sink, waiting only when neither side can
    move."""

    source: int
    sink: int
    mover: Mover
    timeouts: Timeouts
    sent: Sent

    async def run(self, remaining: int) -> None:
        readiness = Readiness(self.source, self.sink)
        mover, since_yield = self.mover, 0
        try:
            while remaining or mover.held:
                took = put = 0
                if remaining and mover.held < BUFFER_SIZE:
                    took = mover.fill(min(remaining, BUFFER_SIZE - mover.held))
                    remaining -= took
                if mover.held:
                    put = mover.drain()
                    self.sent.body_bytes += put
                    since_yield += put
                if took or put:
                    if since_yield >= YIELD_EVERY:  # let other transfers have a turn
                        since_yield = 0
                        await asyncio.sleep(0)
                    continue
                since_yield = 0
                await self.wait(readiness, read=bool(remaining) and mover.held < BUFFER_SIZE,
                                write=mover.held > 0)
        finally:
            readiness.close()

    async def wait(self, readiness: Readiness, read: bool, write: bool) -> None:
        """With bytes in the buffer the sink is what holds things up, else the source."""
        limit = (self.timeouts.sink if write else self.timeouts.source) or None
        try:
            await readiness.wait(read, write, limit)
        except TimeoutError:
            if write:
                raise SinkGone(f"took no bytes for {limit:g} s") from None
            raise SourceCut(f"silent for {limit:g} s") from None
