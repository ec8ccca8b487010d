"""The lean upstream client for GET requests: a keep-alive pool of asyncio protocols parsed by httptools.

aiohttp's ClientSession spends most of a small exchange on machinery a proxy does not need (URL
building, auto headers, cookie and redirect handling, tracing). A GET has no body to stream, so its
exchange is simple: write the head, parse the answer (httptools, llhttp's C parser), relay the body
with backpressure. The response object offers what the relaying code uses of aiohttp's
ClientResponse (status, headers, content.readany(), the connection for splicing), so the request
path is the same for both clients. Everything else (bodies, HEAD, TLS, async tasks) uses aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from fileproxy.config import Config
from fileproxy.errors import (
    ProxyError,
    upstream_closed_early,
    upstream_connect_timeout,
    upstream_header_timeout,
    upstream_invalid,
    upstream_unreachable,
)
from fileproxy.headers import Outgoing
from fileproxy.sockets import SocketOptions
from fileproxy.upstreams import Upstream

LEAN_METHODS = frozenset({"GET"})
Interim = Callable[[int, list[tuple[bytes, bytes]]], None]


class Disconnected(Exception):
    """The upstream closed the connection before the response headers were complete."""


class LeanBody:
    """The response body as it arrives: readany() for the copy loop, read_nowait()/total_bytes
    for the splice take-over. Reading pauses past `limit` buffered bytes (backpressure)."""

    def __init__(self, connection: LeanConnection, limit: int, read_timeout: float) -> None:
        self._connection = connection
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._limit = limit
        self._read_timeout = read_timeout or None
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self.total_bytes = 0

    def feed(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        self.total_bytes += len(data)
        if self._buffered > self._limit:
            self._connection.pause_reading()
        self._wake()

    def feed_eof(self, error: BaseException | None = None) -> None:
        self._eof, self._error = True, error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def whole(self) -> bytes | None:
        """The entire body when all of it is already here (and none of it was read yet)."""
        if self._eof and self._error is None and self._buffered == self.total_bytes:
            return self.read_nowait()
        return None

    def read_nowait(self) -> bytes:
        chunk = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        return chunk

    async def readany(self) -> bytes:
        """Whatever is buffered, waiting (at most the read timeout) when nothing is; b"" at the
        end; ClientPayloadError when the body was cut short."""
        while not self._buffer and not self._eof:
            self._connection.resume_reading()
            self._waiter = self._connection.loop.create_future()
            try:
                async with asyncio.timeout(self._read_timeout):
                    await self._waiter
            finally:
                self._waiter = None
        if self._buffer:
            chunk = self.read_nowait()
            self._connection.resume_reading()
            return chunk
        if self._error is not None:
            raise aiohttp.ClientPayloadError(f"response body cut short: {self._error}")
        return b""


class LeanResponse:
    """One upstream answer, shaped like the parts of aiohttp's ClientResponse fileproxy uses."""

    def __init__(self, connection: LeanConnection, status: int, reason: str,
                 headers: CIMultiDict[str], content: LeanBody) -> None:
        self.connection: LeanConnection | None = connection
        self.status, self.reason, self.content = status, reason, content
        self.headers = CIMultiDictProxy(headers)

    async def __aenter__(self) -> LeanResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Back to the pool when the whole answer was read on a keep-alive connection."""
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.done_with()

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()


class LeanConnection(asyncio.Protocol):
    """One upstream connection, one exchange at a time, its bytes fed to httptools."""

    def __init__(self, pool: LeanPool, key: tuple[str, int], authority: str) -> None:
        self.pool, self.key, self.authority = pool, key, authority
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._head: asyncio.Future[LeanResponse] | None = None
        self._reason = ""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: LeanBody | None = None
        self._complete = self._keep_alive = self._head_keep_alive = False
        self._interim: Interim | None = None

    @property
    def protocol(self) -> LeanConnection:
        """The splice take-over pauses reading through `connection.protocol`, as with aiohttp."""
        return self

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        # Kept: on Python 3.11 every asyncio.get_running_loop() costs a getpid() system call.
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self._head is None and self._body is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.fail(upstream_invalid(self.authority, error))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._head is not None and not self._head.done():
            self._head.set_exception(Disconnected(str(exc or "connection closed")))
        elif self._body is not None and not self._complete:
            if self.reads_until_close():
                self._complete = True  # an HTTP/1.0-style body ends with the connection
                self._body.feed_eof()
            else:
                self._body.feed_eof(exc or ConnectionResetError("connection closed"))

    # -- httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # interim: passed on when its message completes
        assert self._head is not None and self.transport is not None
        self._head_keep_alive = self.parser.should_keep_alive()  # (valid from here on)
        self._body = LeanBody(self, self.pool.read_size, self.pool.read_timeout)
        headers = CIMultiDict((name.decode("utf-8", "surrogateescape"),
                               value.decode("utf-8", "surrogateescape"))
                              for name, value in self._headers)
        if not self._head.done():
            self._head.set_result(LeanResponse(self, status, self._reason, headers, self._body))

    def on_body(self, body: bytes) -> None:
        assert self._body is not None
        self._body.feed(body)

    def on_message_complete(self) -> None:
        if self._body is None:  # an interim 1xx response
            if self._interim is not None:
                self._interim(self.parser.get_status_code(), self._headers)
            self._headers = []
            return
        self._complete = True
        self._keep_alive = self.parser.should_keep_alive()  # (reset once this returns)
        self._body.feed_eof()

    # -- the exchange

    def reads_until_close(self) -> bool:
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    async def exchange(self, head: bytes, interim: Interim | None) -> LeanResponse:
        assert self.transport is not None
        self._headers, self._body, self._complete, self._interim = [], None, False, interim
        self._keep_alive = False
        loop = self.loop
        head_future = self._head = loop.create_future()
        timer = loop.call_later(self.pool.read_timeout, self.time_out, head_future) \
            if self.pool.read_timeout else None
        self.transport.write(head)
        try:
            return await head_future
        except BaseException:
            self.close()
            raise
        finally:
            self._head = None
            if timer is not None:
                timer.cancel()

    @staticmethod
    def time_out(head: asyncio.Future[LeanResponse]) -> None:
        if not head.done():
            head.set_exception(TimeoutError())

    def body_spliced(self) -> None:
        """The rest of the body left the socket by splice, exactly to its end: the parser never
        saw those bytes, so a fresh one takes the next response and the connection, at a message
        boundary, can go back to the pool (saving the next request a handshake)."""
        self.parser = httptools.HttpResponseParser(self)
        self._complete, self._keep_alive = True, self._head_keep_alive
        self.resume_reading()

    def done_with(self) -> None:
        """The exchange is over: back to the pool if it ended cleanly on a keep-alive connection."""
        if self._complete and self._keep_alive and not self.closed:
            self._body = None
            self.pool.put_back(self)
        else:
            self.close()

    def fail(self, error: ProxyError) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        elif self._body is not None:
            self._body.feed_eof(error)
        self.close()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()


class LeanPool:
    """Idle keep-alive connections per upstream address, newest first; connections past the
    keep-alive timeout or closed by the upstream are never handed out."""

    def __init__(self, config: Config) -> None:
        self.read_size = config.read_size
        self.read_timeout = config.read_timeout
        self.connect_timeout = config.connect_timeout
        self.keepalive = config.upstream_keepalive
        self.max_idle = config.pool_size_per_host or config.pool_size or 1 << 16
        self.dns_ttl = config.dns_ttl
        self.socket_options = SocketOptions.from_config(config)
        self.idle: dict[tuple[str, int], list[LeanConnection]] = {}
        self.in_use: set[LeanConnection] = set()
        self._addresses: dict[tuple[str, int], tuple[float, list[Any]]] = {}

    def sizes(self) -> tuple[int, int]:
        return sum(map(len, self.idle.values())), len(self.in_use)

    async def send(self, upstream: Upstream, outgoing: Outgoing,
                   interim: Interim | None = None) -> LeanResponse:
        """The response once its headers arrived. A reused connection that the upstream closed
        just then (the keep-alive race) is retried on a new one: a GET is safe to repeat."""
        key = upstream.address
        head = request_head(outgoing, upstream)
        while True:
            connection = self.take_idle(key)
            reused = connection is not None
            if connection is None:
                connection = await self.connect(key, upstream.authority)
            self.in_use.add(connection)
            try:
                return await connection.exchange(head, interim)
            except Disconnected as error:
                self.in_use.discard(connection)
                if not reused:
                    raise upstream_closed_early(upstream.authority, error) from None
            except TimeoutError:
                self.in_use.discard(connection)
                raise upstream_header_timeout(upstream.authority) from None
            except BaseException:
                self.in_use.discard(connection)
                raise

    def take_idle(self, key: tuple[str, int]) -> LeanConnection | None:
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self.keepalive:
                return connection
            connection.close()
        return None

    def put_back(self, connection: LeanConnection) -> None:
        self.in_use.discard(connection)
        idle = self.idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def forget(self, connection: LeanConnection) -> None:
        self.in_use.discard(connection)
        idle = self.idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def sweep(self) -> None:
        """Close idle connections past the keep-alive timeout (called every second)."""
        now = time.monotonic()
        for idle in self.idle.values():
            for connection in [c for c in idle if now - c.idle_since >= self.keepalive]:
                connection.close()

    def close(self) -> None:
        for connection in [*self.in_use, *(c for idle in self.idle.values() for c in idle)]:
            connection.close()

    async def connect(self, key: tuple[str, int], authority: str) -> LeanConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout or None):
                infos = await self.resolve(key)
                sock = await self.open_socket(infos)
                _, connection = await loop.create_connection(
                    lambda: LeanConnection(self, key, authority), sock=sock)
        except TimeoutError:
            raise upstream_connect_timeout(authority) from None
        except OSError as error:
            raise upstream_unreachable(authority, error.strerror or str(error)) from None
        return connection

    async def resolve(self, key: tuple[str, int]) -> list[Any]:
        cached = self._addresses.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        infos = await asyncio.get_running_loop().getaddrinfo(*key, type=socket.SOCK_STREAM)
        self._addresses[key] = (time.monotonic() + (self.dns_ttl or 0), infos)
        return infos

    async def open_socket(self, infos: list[Any]) -> socket.socket:
        """The first address that accepts, with fileproxy's socket options set before connect."""
        error: OSError = OSError("no address")
        for info in infos:
            sock = self.socket_options.upstream_socket_factory(info)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, info[4])
                return sock
            except OSError as failed:
                sock.close()
                error = failed
            except BaseException:
                sock.close()
                raise
        raise error


def can_use(outgoing: Outgoing, upstream: Upstream) -> bool:
    return outgoing.method in LEAN_METHODS and not outgoing.has_body \
        and upstream.base.startswith("http://")


def request_head(outgoing: Outgoing, upstream: Upstream) -> bytes:
    """Request line and headers as they go on the wire (values byte-exact as received)."""
    lines = [f"{outgoing.method} {upstream.path_prefix}{outgoing.target} HTTP/1.1\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in outgoing.headers.items()]
    # Host last, as headers_for() places it (outgoing.headers never holds one), without a copy.
    lines.append(f"Host: {outgoing.host or upstream.authority}\r\n\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")

