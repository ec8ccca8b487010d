"""Zero-copy relay of a Content-Length response body from the upstream socket to the client's (Linux splice).

The aiohttp path copies every byte three times in user space (uvloop's read, the HTTP parser, the
stream buffer). For a large body of known length the bytes need no parsing, so once the response
headers are in, fileproxy pauses aiohttp's reading of the upstream connection, forwards what aiohttp
had already buffered, and moves the rest kernel-side: upstream socket -> pipe -> client socket. The
pipe is the only buffer (1 MiB), so memory stays flat and backpressure is the kernel's. The upstream
connection is closed afterwards (its parser never saw those bytes); the client connection stays
usable. Anything unusual (TLS, unix sockets, small or chunked bodies) takes the ordinary path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from typing import Protocol

from aiohttp import ClientResponse, web

PIPE_SIZE = 1 << 20
MIN_SPLICE_BYTES = 1 << 20  # below this the set-up costs more than the copies it saves
YIELD_EVERY = 8 << 20  # give other transfers a turn after this many bytes moved without waiting
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class UpstreamCut(Exception):
    """The upstream closed or failed before the announced length arrived."""


class ClientGone(Exception):
    """The client closed or reset its connection."""


def tcp_fd(transport: asyncio.BaseTransport | None) -> int | None:
    """The socket fd of a plain (non-TLS) TCP transport, else None."""
    if transport is None or transport.is_closing() or transport.get_extra_info("sslcontext"):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock.fileno()


def can_splice(request: web.Request, upstream: ClientResponse, length: int) -> bool:
    return (hasattr(os, "splice") and length >= MIN_SPLICE_BYTES
            and upstream.connection is not None
            and tcp_fd(upstream.connection.transport) is not None
            and tcp_fd(request.transport) is not None)


@contextlib.contextmanager
def spliced_fds(upstream_fd: int, client_fd: int) -> Iterator[tuple[int, int, int, int]]:
    """Private duplicates of both sockets (the event loop may watch these) and a pipe."""
    opened: list[int] = []
    try:
        opened += [os.dup(upstream_fd), os.dup(client_fd)]
        opened += os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(opened[3], F_SETPIPE_SZ, PIPE_SIZE)
        yield opened[0], opened[1], opened[2], opened[3]
    finally:
        for fd in opened:
            os.close(fd)


async def wait_ready(read_fd: int | None, write_fd: int | None, timeout: float | None) -> None:
    """Until read_fd is readable or write_fd writable (whichever given) or the timeout passes."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if read_fd is not None:
        loop.add_reader(read_fd, wake)
    if write_fd is not None:
        loop.add_writer(write_fd, wake)
    try:
        async with asyncio.timeout(timeout):
            await ready
    finally:
        if read_fd is not None:
            loop.remove_reader(read_fd)
        if write_fd is not None:
            loop.remove_writer(write_fd)


async def take_over(request: web.Request, upstream: ClientResponse,
                    response: web.StreamResponse) -> int:
    """Stop aiohttp reading the upstream, send the client what it had buffered, and leave the
    client transport with nothing pending. Returns the body bytes sent so far."""
    protocol = upstream.connection.protocol  # type: ignore[union-attr]
    content = upstream.content
    protocol.pause_reading()  # also stops the sock_read timer; this path keeps its own
    pending: list[bytes] = []
    while content.total_bytes > sum(map(len, pending)) and not content.at_eof():
        pending.append(content.read_nowait())
        protocol.pause_reading()  # read_nowait may have resumed it; nothing ran in between
    for chunk in pending:
        await response.write(chunk)
    transport = request.transport
    assert transport is not None
    transport.set_write_buffer_limits(high=0)
    try:
        await request.writer.drain()
    finally:
        transport.set_write_buffer_limits()
    while transport.get_write_buffer_size():  # pragma: no cover - drain above empties it
        await asyncio.sleep(0.001)
    return sum(map(len, pending))


class Sent(Protocol):
    body_bytes: int


async def splice_body(request: web.Request, upstream: ClientResponse, response: web.StreamResponse,
                      sent: Sent, length: int, read_timeout: float) -> None:
    """Relay the body, counting in sent.body_bytes what reached the client's socket.
    Raises UpstreamCut or ClientGone; the caller closes the upstream connection in every case."""
    sent.body_bytes += await take_over(request, upstream, response)
    upstream_fd = tcp_fd(upstream.connection.transport)  # type: ignore[union-attr]
    client_fd = tcp_fd(request.transport)
    if upstream_fd is None or client_fd is None:
        raise ClientGone("connection closed while taking over")
    with spliced_fds(upstream_fd, client_fd) as (source, sink, pipe_r, pipe_w):
        await pump(source, sink, pipe_r, pipe_w, length - sent.body_bytes, read_timeout, sent)


async def pump(source: int, sink: int, pipe_r: int, pipe_w: int, remaining: int,
               read_timeout: float, sent: Sent) -> None:
    in_pipe = since_yield = 0
    while remaining or in_pipe:
        took = put = 0
        if remaining and in_pipe < PIPE_SIZE:
            took = splice_in(source, pipe_w, min(remaining, PIPE_SIZE - in_pipe))
            remaining -= took
            in_pipe += took
        if in_pipe:
            put = splice_out(pipe_r, sink, in_pipe)
            in_pipe -= put
            sent.body_bytes += put
            since_yield += put
        if took or put:
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)
            continue
        since_yield = 0
        waiting_on_upstream = in_pipe == 0
        try:
            await wait_ready(source if remaining and in_pipe < PIPE_SIZE else None,
                             sink if in_pipe else None,
                             read_timeout if waiting_on_upstream else None)
        except TimeoutError:
            raise UpstreamCut(f"upstream silent for {read_timeout:g} s") from None


def splice_in(source: int, pipe_w: int, count: int) -> int:
    try:
        moved = os.splice(source, pipe_w, count, flags=SPLICE_FLAGS)
    except BlockingIOError:
        return 0
    except OSError as error:
        raise UpstreamCut(f"upstream read failed: {error.strerror}") from None
    if moved == 0:
        raise UpstreamCut("upstream closed the connection")
    return moved


def splice_out(pipe_r: int, sink: int, count: int) -> int:
    try:
        return os.splice(pipe_r, sink, count, flags=SPLICE_FLAGS)
    except BlockingIOError:
        return 0
    except OSError as error:
        raise ClientGone(f"client write failed: {error.strerror}") from None
