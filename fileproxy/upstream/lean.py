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
from fileproxy.http.errors import (
    ProxyError,
    upstream_closed_early,
    upstream_connect_timeout,
    upstream_header_timeout,
    upstream_invalid,
    upstream_unreachable,
)
from fileproxy.http.headers import Outgoing
from fileproxy.policy.balancing import Upstream
from fileproxy.upstream.sockets import SocketOptions

LEAN_METHODS = frozenset({"GET"})
Interim = Callable[[int, list[tuple[bytes, bytes]]], None]
Key = tuple[str, int]  # an upstream address: (host, port)
# Upstream responses may be header-heavy (the core issue asks for ~130 fields and long cookies).
# Both clients stop at these: aiohttp's (upstream/aiohttp_client.py) and this one.
UPSTREAM_MAX_HEADERS = 1024
UPSTREAM_MAX_FIELD_SIZE = 64 * 1024  # one header line (name + value), or the status line
STATUS_PREFIX = len(b"HTTP/1.1 200 ")  # the status line before its reason phrase
# A line httptools is still gathering (it reports a header only once the next one starts) may
# not grow past this: the bound on the head's memory until the per-line check can run.
PENDING_LIMIT = 2 * UPSTREAM_MAX_FIELD_SIZE


class Disconnected(Exception):
    """The upstream closed the connection before the response headers were complete."""


class HeadTooLarge(Exception):
    """The response head is past UPSTREAM_MAX_HEADERS fields or UPSTREAM_MAX_FIELD_SIZE a line."""


class LeanBody:
    """The response body as it arrives: readany() for the copy loop, read_nowait()/total_bytes
    for the socket-to-socket take-over. Reading pauses past `limit` buffered bytes (backpressure)."""

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

    def __init__(self, pool: LeanPool, key: Key, authority: str) -> None:
        self.pool, self.key, self.authority = pool, key, authority
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.counted = True  # holds one of the pool's slots until closed (LeanPool.forget)
        self.idle_since = 0.0  # (0.0: never pooled yet)
        self._paused = False
        self._head: asyncio.Future[LeanResponse] | None = None
        self._reason = b""
        self._pending = 0  # head bytes since the last header line was reported
        self._line_done = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: LeanBody | None = None
        self._complete = self._keep_alive = self._head_keep_alive = False
        self._interim: Interim | None = None

    @property
    def protocol(self) -> LeanConnection:
        """The socket-relay take-over pauses reading through `connection.protocol`, as with aiohttp."""
        return self

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        # Kept: on Python 3.11 every asyncio.get_running_loop() costs a getpid() system call.
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self._body is None:
            self.head_received(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.parser_failed(error)

    def head_received(self, data: bytes) -> None:
        """Head bytes: the callbacks check each line as httptools reports it; a line it is still
        gathering is bounded here (PENDING_LIMIT)."""
        if self._head is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self._line_done = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.parser_failed(error)
            return
        if self._body is None and not self.closed:
            self._pending = 0 if self._line_done else self._pending + len(data)
            if self._pending > PENDING_LIMIT:
                self.fail(upstream_invalid(self.authority, HeadTooLarge(
                    f"a header line over {UPSTREAM_MAX_FIELD_SIZE} bytes")))

    def parser_failed(self, error: httptools.HttpParserError) -> None:
        cause = error.__context__  # what a callback raised (HeadTooLarge: the reason to give)
        self.fail(upstream_invalid(self.authority,
                                   cause if isinstance(cause, HeadTooLarge) else error))

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
        """The reason phrase, possibly in pieces (one per read)."""
        self._line_done = True
        self._reason += reason
        if len(self._reason) + STATUS_PREFIX > UPSTREAM_MAX_FIELD_SIZE:
            raise HeadTooLarge(f"status line over {UPSTREAM_MAX_FIELD_SIZE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._line_done = True
        if len(name) + len(value) > UPSTREAM_MAX_FIELD_SIZE:
            raise HeadTooLarge(f"a header line over {UPSTREAM_MAX_FIELD_SIZE} bytes")
        headers = self._headers
        headers.append((name, value))
        if len(headers) > UPSTREAM_MAX_HEADERS:
            raise HeadTooLarge(f"more than {UPSTREAM_MAX_HEADERS} header fields")

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
            self._head.set_result(LeanResponse(self, status, self._reason.decode("latin-1"),
                                               headers, self._body))

    def on_body(self, body: bytes) -> None:
        assert self._body is not None
        self._body.feed(body)

    def on_message_complete(self) -> None:
        if self._body is None:  # an interim 1xx response
            if self._interim is not None:
                self._interim(self.parser.get_status_code(), self._headers)
            self._headers, self._reason = [], b""
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
        if self.closed:  # by the upstream since it was handed over: the keep-alive race
            raise Disconnected("connection closed")
        self._headers, self._body, self._complete, self._interim = [], None, False, interim
        self._keep_alive, self._reason, self._pending = False, b"", 0
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

    def body_taken_over(self) -> None:
        """The rest of the body left the socket by the socket relay, exactly to its end: the parser never
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


# Someone waiting for room under the pool limits: its upstream address and what it is handed,
# a connection of that address going idle or (None) a slot reserved for a new connection.
Waiter = tuple[Key, asyncio.Future[LeanConnection | None]]


class LeanPool:
    """Idle keep-alive connections per upstream address, newest first; connections past the
    keep-alive timeout or closed by the upstream are never handed out.

    At most `pool_size` connections are open (in use, idle or connecting), at most
    `pool_size_per_host` per address (0: no limit), as aiohttp's connector does. A request that
    needs a new connection at the limit closes the oldest idle one of another address when that
    makes room, and otherwise waits in line (FIFO) for a connection of its address to go idle or
    for a slot to free, within the connect timeout. What frees goes straight to the first waiter
    that can use it, so a newcomer never takes it first.
    """

    def __init__(self, config: Config) -> None:
        self.read_size = config.read_size
        self.read_timeout = config.read_timeout
        self.connect_timeout = config.connect_timeout
        self.keepalive = config.upstream_keepalive
        self.limit = config.pool_size
        self.limit_per_host = config.pool_size_per_host
        self.max_idle = config.pool_size_per_host or config.pool_size or 1 << 16
        self.dns_ttl = config.dns_ttl
        self.socket_options = SocketOptions.from_config(config)
        self.idle: dict[Key, list[LeanConnection]] = {}
        self.in_use: set[LeanConnection] = set()
        self.open = 0  # connections holding a slot
        self.open_per_host: dict[Key, int] = {}
        self.waiters: collections.deque[Waiter] = collections.deque()
        self._addresses: dict[Key, tuple[float, list[Any]]] = {}

    def sizes(self) -> tuple[int, int]:
        return sum(map(len, self.idle.values())), len(self.in_use)

    async def send(self, upstream: Upstream, outgoing: Outgoing,
                   interim: Interim | None = None) -> LeanResponse:
        """The response once its headers arrived. A reused connection that the upstream closed
        just then (the keep-alive race) is retried on a new one: a GET is safe to repeat."""
        key = upstream.address
        head = request_head(outgoing, upstream)
        while True:
            connection = self.take_idle(key) or await self.connect(key, upstream.authority)
            reused = connection.idle_since > 0.0  # it has been in the pool
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

    def take_idle(self, key: Key) -> LeanConnection | None:
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
        connection.idle_since = time.monotonic()
        if self.waiters and self.hand_over(connection):
            return
        idle = self.idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle:
            connection.close()
            return
        idle.append(connection)

    def forget(self, connection: LeanConnection) -> None:
        """Out of the pool for good (closed): its slot goes to the first waiter that can use it."""
        self.in_use.discard(connection)
        idle = self.idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        if connection.counted:
            connection.counted = False
            self.release_slot(connection.key)

    def sweep(self) -> None:
        """Close idle connections past the keep-alive timeout (called every second)."""
        now = time.monotonic()
        for idle in self.idle.values():
            for connection in [c for c in idle if now - c.idle_since >= self.keepalive]:
                connection.close()

    def close(self) -> None:
        for connection in [*self.in_use, *(c for idle in self.idle.values() for c in idle)]:
            connection.close()

    # -- the limits

    def has_room(self, key: Key) -> bool:
        """A new connection to `key` stays within both limits."""
        return (not self.limit or self.open < self.limit) and \
            (not self.limit_per_host or self.open_per_host.get(key, 0) < self.limit_per_host)

    def reserve_slot(self, key: Key) -> None:
        self.open += 1
        self.open_per_host[key] = self.open_per_host.get(key, 0) + 1

    def release_slot(self, key: Key) -> None:
        self.open -= 1
        left = self.open_per_host[key] - 1
        if left:
            self.open_per_host[key] = left
        else:
            del self.open_per_host[key]
        if self.waiters:
            self.wake_one()

    def try_reserve(self, key: Key) -> bool:
        """A slot for a new connection to `key` when the limits allow, closing the oldest idle
        connection (of another address: this one's idle ones were taken) to make room."""
        if self.limit_per_host and self.open_per_host.get(key, 0) >= self.limit_per_host:
            return False
        while self.limit and self.open >= self.limit:
            if not self.close_oldest_idle():
                return False  # (a slot it freed may have gone to a waiter ahead: then again)
        self.reserve_slot(key)
        return True

    def close_oldest_idle(self) -> bool:
        lists = [idle for idle in self.idle.values() if idle]
        if not lists:
            return False
        min(lists, key=lambda idle: idle[0].idle_since)[0].close()
        return True

    def wake_one(self) -> None:
        """A slot is free: reserve it for the first waiter whose address it suits."""
        for index, (key, future) in enumerate(self.waiters):
            if not future.done() and self.has_room(key):
                del self.waiters[index]
                self.reserve_slot(key)
                future.set_result(None)
                return

    def hand_over(self, connection: LeanConnection) -> bool:
        """A connection going idle goes to the first waiter that can use it: one for its address
        takes it as it is; one held back by the total limit only gets its slot (it is closed)."""
        for index, (key, future) in enumerate(self.waiters):
            if future.done():
                continue
            if key == connection.key:
                del self.waiters[index]
                self.in_use.add(connection)
                future.set_result(connection)
                return True
            if not self.limit_per_host or self.open_per_host.get(key, 0) < self.limit_per_host:
                connection.close()  # release_slot -> wake_one reserves the slot for this waiter
                return True
        return False

    async def wait_for_room(self, key: Key) -> LeanConnection | None:
        """In line until handed an idle connection of `key` or (None) a slot reserved for a new
        one. Cancelled (the connect timeout, the client gone), it leaves the line, and gives
        back what it was handed just then."""
        future: asyncio.Future[LeanConnection | None] = asyncio.get_running_loop().create_future()
        waiter: Waiter = (key, future)
        self.waiters.append(waiter)
        try:
            return await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.give_back(key, future.result())
            else:
                self.remove_waiter(waiter)
            raise

    def remove_waiter(self, waiter: Waiter) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def give_back(self, key: Key, handed: LeanConnection | None) -> None:
        if handed is None:
            self.release_slot(key)
        else:
            self.put_back(handed)

    # -- new connections

    async def connect(self, key: Key, authority: str) -> LeanConnection:
        """A new connection to `key`, or an idle one handed over while waiting for room under
        the limits: waiting and connecting together take at most the connect timeout."""
        try:
            async with asyncio.timeout(self.connect_timeout or None):
                if not self.try_reserve(key):
                    handed = await self.wait_for_room(key)
                    if handed is not None:
                        return handed
                return await self.open_connection(key, authority)
        except TimeoutError:
            raise upstream_connect_timeout(authority) from None
        except OSError as error:
            raise upstream_unreachable(authority, error.strerror or str(error)) from None

    async def open_connection(self, key: Key, authority: str) -> LeanConnection:
        """Connect on the slot reserved for it; a failure frees the slot (close -> forget)."""
        connection = LeanConnection(self, key, authority)
        try:
            infos = await self.resolve(key)
            sock = await self.open_socket(infos)
            await asyncio.get_running_loop().create_connection(lambda: connection, sock=sock)
        except BaseException:
            connection.close()
            raise
        return connection

    async def resolve(self, key: Key) -> list[Any]:
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
                self.socket_options.fit_congestion(sock)
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

