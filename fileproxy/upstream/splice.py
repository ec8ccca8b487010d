"""Zero-copy relay of large Content-Length bodies between two TCP sockets (Linux splice), both ways.

The aiohttp path copies every byte three times in user space (uvloop's read, the HTTP parser, the
stream buffer). A body of known length needs no parsing, so once the headers are through, fileproxy
pauses aiohttp's reading of the source connection, forwards what aiohttp had already buffered, and
moves the rest kernel-side: source socket -> pipe -> sink socket. The pipe is the only buffer
(256 KiB), so memory stays flat and backpressure is the kernel's. The source connection's HTTP parser
never sees those bytes: a lean-client upstream connection whose body went through to its end gets
a fresh parser and is reused (lean.LeanConnection.body_spliced); an aiohttp one is closed, and a
spliced upload closes the client's connection after the response. Anything unusual (TLS, unix
sockets, small or chunked bodies) takes the ordinary path.
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

PIPE_SIZE = 256 << 10
MIN_SPLICE_BYTES = 1 << 20  # below this the set-up costs more than the copies it saves
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
    """Seconds each side may stall (0: no limit): the source sending nothing while the pipe is
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


def can_splice(length: int | None, *transports: asyncio.BaseTransport | None) -> bool:
    return (hasattr(os, "splice") and length is not None and length >= MIN_SPLICE_BYTES
            and all(tcp_fd(transport) is not None for transport in transports))


@contextlib.contextmanager
def spliced_fds(source_fd: int, sink_fd: int) -> Iterator[tuple[int, int, int, int]]:
    """Private duplicates of both sockets (the event loop may watch these) and a pipe."""
    opened: list[int] = []
    try:
        opened += [os.dup(source_fd), os.dup(sink_fd)]
        opened += os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(opened[3], F_SETPIPE_SZ, PIPE_SIZE)
        yield opened[0], opened[1], opened[2], opened[3]
    finally:
        for fd in opened:
            os.close(fd)


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
    the first body chunk go now, and the transport buffer empties, so spliced bytes cannot
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


async def splice_response_body(upstream: UpstreamResponse, sent: Sent, length: int,
                               timeouts: Timeouts, sink: asyncio.BaseTransport | None,
                               flush: Flush) -> None:
    """Upstream -> client, counting in sent.body_bytes what reached the client's socket: what
    the upstream connection had buffered goes through `flush` (which returns once it left), the
    rest through the pipe. Raises SourceCut or SinkGone; the caller closes the upstream
    connection in every case."""
    assert upstream.connection is not None
    buffered = take_buffered(upstream.connection.protocol, upstream.content)
    sent.body_bytes += await flush(buffered)
    await splice_rest(upstream.connection.transport, sink, length - sent.body_bytes, timeouts,
                      sent)


async def splice_request_body(request: web.Request, writer: StreamWriter, length: int,
                              sent: Sent, timeouts: Timeouts) -> None:
    """Client -> upstream. The client connection cannot carry another request afterwards."""
    assert writer.transport is not None and request.transport is not None
    buffered = take_buffered(request.protocol, request.content)
    sent.body_bytes += await write_all(writer, buffered)
    try:
        await splice_rest(request.transport, writer.transport, length - sent.body_bytes, timeouts,
                          sent)
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


async def splice_rest(source: asyncio.BaseTransport | None, sink: asyncio.BaseTransport | None,
                      remaining: int, timeouts: Timeouts, sent: Sent) -> None:
    source_fd, sink_fd = tcp_fd(source), tcp_fd(sink)
    if source_fd is None or sink_fd is None:
        raise SinkGone("connection closed while taking over")
    with spliced_fds(source_fd, sink_fd) as (source_dup, sink_dup, pipe_r, pipe_w):
        pump = Pump(source_dup, sink_dup, pipe_r, pipe_w, timeouts, sent)
        await pump.run(remaining)


@dataclass
class Pump:
    """Moves `remaining` bytes source -> pipe -> sink, waiting only when neither side can move."""

    source: int
    sink: int
    pipe_r: int
    pipe_w: int
    timeouts: Timeouts
    sent: Sent

    async def run(self, remaining: int) -> None:
        readiness = Readiness(self.source, self.sink)
        in_pipe = since_yield = 0
        try:
            while remaining or in_pipe:
                took = put = 0
                if remaining and in_pipe < PIPE_SIZE:
                    took = splice_in(self.source, self.pipe_w, min(remaining, PIPE_SIZE - in_pipe))
                    remaining -= took
                    in_pipe += took
                if in_pipe:
                    put = splice_out(self.pipe_r, self.sink, in_pipe)
                    in_pipe -= put
                    self.sent.body_bytes += put
                    since_yield += put
                if took or put:
                    if since_yield >= YIELD_EVERY:  # let other transfers have a turn
                        since_yield = 0
                        await asyncio.sleep(0)
                    continue
                since_yield = 0
                await self.wait(readiness, read=bool(remaining) and in_pipe < PIPE_SIZE,
                                write=in_pipe > 0)
        finally:
            readiness.close()

    async def wait(self, readiness: Readiness, read: bool, write: bool) -> None:
        """With bytes in the pipe the sink is what holds things up, else the source."""
        limit = (self.timeouts.sink if write else self.timeouts.source) or None
        try:
            await readiness.wait(read, write, limit)
        except TimeoutError:
            if write:
                raise SinkGone(f"took no bytes for {limit:g} s") from None
            raise SourceCut(f"silent for {limit:g} s") from None


def splice_in(source: int, pipe_w: int, count: int) -> int:
    try:
        moved = os.splice(source, pipe_w, count, flags=SPLICE_FLAGS)
    except BlockingIOError:
        return 0
    except OSError as error:
        raise SourceCut(f"read failed: {error.strerror}") from None
    if moved == 0:
        raise SourceCut("connection closed")
    return moved


def splice_out(pipe_r: int, sink: int, count: int) -> int:
    try:
        return os.splice(pipe_r, sink, count, flags=SPLICE_FLAGS)
    except BlockingIOError:
        return 0
    except OSError as error:
        raise SinkGone(f"write failed: {error.strerror}") from None
