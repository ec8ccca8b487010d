"""The fast path: plain HTTP/1.1 GETs answered without aiohttp's web layer; others go to aiohttp.

Most of a small proxied GET's cost under aiohttp is its server machinery (request and response
objects, router, middlewares, signals, payload writer), not the proxying. So every client
connection starts on a lean protocol: it finds each request head in its buffer and parses it with
httptools (llhttp). A GET on HTTP/1.1 with a well-formed request line, no body, no Expect or
Upgrade, that the request path routes to the upstream, is served here through the same request path
as everywhere else (core.forward.serve_request: checks, routing, admission, upstream choice,
retries, breaker, metrics, errors; core.relay: whole, streamed or socket to socket, with the same timeouts and
abort rules). Anything else, including anything the parser refuses, is handed to aiohttp's server
with the connection, from the first byte of that request on; aiohttp then keeps that connection
and sends its requests through the same serve_request (server/aiohttp_server.py).
`--no-fast-path` hands every connection over at once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
from aiohttp import HttpVersion, HttpVersion11, web
from multidict import CIMultiDict

from fileproxy.compat import SINGLETONS, HttpVersion20, request_handler
from fileproxy.config import Config
from fileproxy.core.checks import REQUEST_LINE
from fileproxy.core.exchange import Exchange, request_id_for
from fileproxy.core.forward import serve_request
from fileproxy.core.keys import CONFIG
from fileproxy.core.routing import Route, route
from fileproxy.http.errors import ProxyError
from fileproxy.http.headers import (
    NO_BODY_STATUSES,
    http_date,
    no_body,
    parser_limit,
    response_headers,
    response_length,
)
from fileproxy.observability.accesslog import AccessLogger, exchange_fields
from fileproxy.server.h2server import H2Connection, Opening
from fileproxy.upstream.aiohttp_client import UpstreamResponse
from fileproxy.upstream.sockets import SocketOptions

# Headers that mean "not a plain GET": a body, an interim exchange, a protocol switch, async.
HANDED_OVER_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                                 b"prefer"})
# Seconds an idle connection stays open once the worker is stopping, for a request on its way.
SHUTDOWN_GRACE = 1.0
# Bytes a pipelining client may queue behind the request being served before reading pauses.
PIPELINE_LIMIT = 64 * 1024


def refusal(request: web.BaseRequest, status: int, reason: str) -> web.StreamResponse:
    """A request aiohttp's parser refused (or a handler that failed), answered as every error."""
    error = ProxyError(status, f"{HTTPStatus(status).phrase}: {reason}", close=True)
    return error.response(request_id_for(request))


@dataclass(slots=True)
class FastRequest:
    """A GET the fast path serves, as the request path reads it (core.forward.ServedRequest)."""

    raw_path: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    headers: CIMultiDict[str]
    remote: str | None
    scheme: str
    keep_alive: bool
    transport: asyncio.Transport | None
    method: str = "GET"
    version: HttpVersion = HttpVersion11
    body_exists: bool = False

    @property
    def path(self) -> str:
        return unquote(self.raw_path.partition("?")[0])


class Gate:
    """Which parsed requests the fast path serves: a GET on HTTP/1.1 with a well-formed request
    line, no body or interim exchange, no repeated singleton header, that the request path routes
    to the upstream. None hands the request to aiohttp's server, which answers everything else
    through the same request path (or refuses what its parser cannot read)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.longest_url = parser_limit(config)

    def admit(self, line: bytes, url: bytes, raw_headers: list[tuple[bytes, bytes]],
              keep_alive: bool, connection: FastConnection) -> FastRequest | None:
        if len(url) > self.longest_url or not REQUEST_LINE.fullmatch(line):
            return None
        return self.plain_get(url.decode("utf-8", "surrogateescape"), raw_headers,
                              connection.remote, connection.scheme, keep_alive,
                              connection.transport, HttpVersion11)

    def admit_h2(self, method: str, target: str, raw_headers: list[tuple[bytes, bytes]],
                 transport: asyncio.Transport, remote: str | None, scheme: str
                 ) -> FastRequest | None:
        """The same choice for an HTTP/2 stream that ended with its HEADERS (no body): a GET
        the request path routes to the upstream (server/h2server.py answers it without
        aiohttp's request and response objects)."""
        if method != "GET" or len(target) > self.longest_url or not target.startswith("/"):
            return None
        return self.plain_get(target, raw_headers, remote, scheme, True, transport,
                              HttpVersion20)

    def plain_get(self, target: str, raw_headers: list[tuple[bytes, bytes]], remote: str | None,
                  scheme: str, keep_alive: bool, transport: asyncio.Transport | None,
                  version: HttpVersion) -> FastRequest | None:
        """The GET, unless a field asks for aiohttp or the request path does not forward it."""
        headers = self.plain_headers(raw_headers)
        if headers is None:
            return None
        request = FastRequest(target, tuple(raw_headers), headers, remote, scheme, keep_alive,
                              transport, version=version)
        if route("GET", request.path, headers, self.config) is not Route.FORWARD:
            return None
        return request

    @staticmethod
    def plain_headers(raw_headers: list[tuple[bytes, bytes]]) -> CIMultiDict[str] | None:
        """The headers, unless one asks for aiohttp (a body, Expect, ...) or a singleton repeats
        (aiohttp's parser answers 400)."""
        seen: set[bytes] = set()
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in raw_headers:
            lowered = name.lower()
            if lowered in HANDED_OVER_HEADERS or (lowered in SINGLETONS and lowered in seen):
                return None
            seen.add(lowered)
            headers.add(name.decode("utf-8", "surrogateescape"),
                        value.decode("utf-8", "surrogateescape"))
        return headers


class FastServer:
    """The runner's protocol factory: a FastConnection per client connection, in front of
    aiohttp's Server, which takes the connections handed over (and counts their requests)."""

    def __init__(self, inner: web.Server, app: web.Application, access: AccessLogger | None
                 ) -> None:
        self.inner, self.app, self.access = inner, app, access
        self.config = app[CONFIG]
        self.gate = Gate(self.config)
        self.connections: set[FastConnection | H2Connection] = set()
        self.served = 0
        self.closing = False
        self.head_limit = 2 * self.config.max_header_size + 8192
        self.socket_options = SocketOptions.from_config(self.config)

    def __call__(self) -> asyncio.Protocol:
        """A new connection: HTTP/2 or HTTP/1.1 is decided first (ALPN, the h2c preface)."""
        if self.config.http2:
            return Opening(self)
        return self.http1()

    def http1(self) -> asyncio.Protocol:
        if not self.config.fast_path:
            return self.aiohttp_handler()
        return FastConnection(self)

    def aiohttp_handler(self) -> asyncio.Protocol:
        """aiohttp's connection handler, its own refusals answered in fileproxy's words."""
        return request_handler(self.inner, refusal, self.config.client_header_timeout,
                               self.connected)

    def connected(self, transport: asyncio.BaseTransport) -> None:
        """A new client connection: a short path keeps the system's congestion control."""
        self.socket_options.fit_congestion(transport.get_extra_info("socket"))

    @property
    def requests_count(self) -> int:
        """For gunicorn's max_requests (aiohttp's worker reads it)."""
        return self.inner.requests_count + self.served

    def pre_shutdown(self) -> None:
        """Stop taking requests: every connection closes after its current response, which says
        Connection: close; an idle one serves a request already on its way, or closes after
        SHUTDOWN_GRACE (closing at once would race a request the client just sent)."""
        self.closing = True
        self.inner.pre_shutdown()
        for connection in list(self.connections):
            connection.close_when_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let running exchanges finish within `timeout`, then cut what is left."""
        await asyncio.gather(self.inner.shutdown(timeout), self.drain(timeout))

    async def drain(self, timeout: float | None) -> None:
        """Until every connection closed by itself, at most `timeout`; then the rest is cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else SHUTDOWN_GRACE)
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()  # (its running exchange, if any, is cancelled with it)


class FastConnection(asyncio.Protocol):
    """One client connection while it sends plain GETs: one request at a time, in order."""

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.remote: str | None = None
        self.scheme = "http"
        self.closing = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._complete = self._keep_alive = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connected(transport)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (list, tuple)) and peer else None
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.server.connections.add(self)
        self.closing = self.server.closing  # (accepted just as the worker began to stop)
        self.wait_idle()

    def data_received(self, data: bytes) -> None:
        if not self.buffer and self.task is None:
            self.wait_for_head()  # the first byte of a head: it must be complete in time
        self.buffer += data
        if self.task is None:
            self.next_request()
        elif len(self.buffer) > PIPELINE_LIMIT:
            self.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.cancel_idle_timer()
        self.wake_writer()  # a write after this raises: the transport is closing
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client went away: the upstream request goes too

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        self.wake_writer()

    # -- httptools callbacks

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self.parser.should_keep_alive()

    # -- requests, one at a time

    def next_request(self) -> None:
        """Serve the next request in the buffer when its head is complete and it is a plain GET;
        hand the connection to aiohttp when it is anything else."""
        if not self.buffer:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > self.server.head_limit or b"\n\n" in self.buffer:
                self.hand_over()  # aiohttp answers the oversized or odd head
            return
        request = self.parse(bytes(self.buffer[:end + 4]))
        if request is None:
            self.hand_over()
            return
        del self.buffer[:end + 4]
        if self.closing:
            request.keep_alive = False  # the worker is stopping: this is the last one
        self.cancel_idle_timer()
        self.task = self.loop.create_task(self.serve(request))

    def parse(self, head: bytes) -> FastRequest | None:
        self._url, self._raw_headers, self._complete = b"", [], False
        try:
            self.parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None  # (CONNECT and Upgrade requests raise the latter)
        if not self._complete or self.parser.get_method() != b"GET" \
                or self.parser.get_http_version() != "1.1":
            return None
        line = head[:head.find(b"\r\n") + 2]
        return self.server.gate.admit(line, self._url, self._raw_headers, self._keep_alive, self)

    def hand_over(self) -> None:
        """aiohttp's server takes the connection from the first byte of the current request."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.server.connections.discard(self)
        self.cancel_idle_timer()
        handler = self.server.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._reading_paused:
            transport.resume_reading()
        data, self.buffer = bytes(self.buffer), bytearray()
        self.transport = None
        handler.data_received(data)

    async def serve(self, request: FastRequest) -> None:
        """The request path (core.forward.serve_request) for one GET, then the next request or the close."""
        server = self.server
        exchange = Exchange(request_id_for(request), time.monotonic())
        server.served += 1
        side = FastSide(self, request.keep_alive)
        try:
            await serve_request(server.app, request, side, exchange, no_body)
            await self.drained_within(server.config.client_timeout)
        except ConnectionError:
            exchange.outcome, exchange.detail = "client_aborted", "client went away"
            self.close()
        except asyncio.CancelledError:
            exchange.outcome, exchange.detail = "client_aborted", "client went away"
            raise
        finally:
            if server.access is not None:
                server.access.write(exchange_fields(
                    request.remote, request.method, request.raw_path, "1.1", exchange.status,
                    exchange.bytes_out, time.monotonic() - exchange.started, exchange))
            self.task = None
        self.after_response(request.keep_alive and not side.closed)

    def after_response(self, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not keep_alive or self.closing:
            transport.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self.buffer:
            self.wait_for_head()
        else:
            self.wait_idle()
        self.next_request()

    # -- writing

    def write(self, *parts: bytes) -> None:
        """Parts leave together without being joined here (a body chunk is not copied)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("client connection closed")
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)

    async def drain(self) -> None:
        """Returns once the client's socket takes bytes again (backpressure), or it closed."""
        if self._writable is not None:
            await asyncio.shield(self._writable)

    async def drained_within(self, client_timeout: float) -> None:
        """Before the next request: the last response left, or the client is cut off after
        `client_timeout` (a client that pipelines and never reads must not pile up answers)."""
        if self._writable is not None:
            try:
                async with asyncio.timeout(client_timeout or None):
                    await self.drain()
            except TimeoutError:
                raise ConnectionResetError("the client took no bytes") from None

    async def flushed(self) -> None:
        """Returns once every byte written so far left the process (before the socket relay takes over)."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("client connection closed")
        transport.set_write_buffer_limits(high=0)
        try:
            while transport.get_write_buffer_size():
                if transport.is_closing():
                    raise ConnectionResetError("client connection closed")
                if self._writable is not None:
                    await self.drain()
                else:  # pragma: no cover - the transport pauses us above high=0
                    await asyncio.sleep(0.001)
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits()

    def wake_writer(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- connection lifetime

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def wait_idle(self) -> None:
        """Close the connection if no complete request head arrives within the keep-alive time."""
        self.cancel_idle_timer()
        self._idle_timer = self.loop.call_later(self.server.config.client_keepalive, self.close)

    def wait_for_head(self) -> None:
        """Close the connection if the request head that began is not complete within the
        header timeout (nginx's client_header_timeout): a slow trickle holds nothing for ever."""
        if self.closing:
            return  # the shutdown grace timer stays
        self.cancel_idle_timer()
        self._idle_timer = self.loop.call_later(self.server.config.client_header_timeout,
                                                self.close)

    def cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close_when_idle(self) -> None:
        self.closing = True
        if self.task is None:
            self.cancel_idle_timer()
            self._idle_timer = self.loop.call_later(SHUTDOWN_GRACE, self.close)
            self.next_request()

    def close(self) -> None:
        """Closed for this server from now on (a TLS client that never answers the close
        keeps the socket until the TLS shutdown times out; shutdown does not wait for that)."""
        self.server.connections.discard(self)
        if self.transport is not None:
            self.transport.close()


def response_head(status: int, reason: str | None, headers: Any, framing: str,
                  close: bool) -> bytes:
    """The status line and headers as they go on the wire; Date added when the upstream sent
    none (RFC 9110 6.6.1), no Server of fileproxy's own."""
    if reason is None:
        reason = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if "Date" not in headers:
        lines.append(f"Date: {http_date()}\r\n")
    lines.append(framing)
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class FastSide:
    """core.relay.ClientSide for the fast path: responses written straight to the transport."""

    def __init__(self, connection: FastConnection, keep_alive: bool) -> None:
        self.connection, self.keep_alive = connection, keep_alive
        self.closed = False  # an answer of fileproxy's own closed the connection

    def error(self, error: ProxyError, request_id: str) -> FastResponse:
        """fileproxy's own answer: the error text, Connection: close when it must close."""
        text = error.text(request_id).encode()
        close = error.close or self.closes()
        headers = {"Content-Type": "text/plain; charset=utf-8", **error.headers_for(request_id)}
        head = response_head(error.status, None, headers, f"Content-Length: {len(text)}\r\n",
                             close)
        response = FastResponse(self.connection, error.status, len(text))
        if self.connection.transport is not None and not self.connection.transport.is_closing():
            self.connection.write(head + text)
            response.body_bytes = len(text)
        if error.close:
            self.closed = True
            self.connection.close()
        return response

    def closes(self) -> bool:
        """Connection: close on this response (the client's wish, or the worker is stopping)."""
        return not self.keep_alive or self.connection.closing

    def whole(self, upstream: UpstreamResponse, body: bytes) -> FastResponse:
        response = FastResponse(self.connection, upstream.status, len(body))
        head = response_head(upstream.status, upstream.reason, response_headers(upstream),
                             f"Content-Length: {len(body)}\r\n", self.closes())
        self.connection.write(head + body)
        response.body_bytes = len(body)
        return response

    async def start(self, upstream: UpstreamResponse) -> FastResponse:
        status = upstream.status
        length = response_length(upstream)
        if status in NO_BODY_STATUSES:
            framing = f"Content-Length: {length}\r\n" if status == 304 and length is not None \
                else ""
            length = 0
        elif length is None:
            framing = "Transfer-Encoding: chunked\r\n"
        else:
            framing = f"Content-Length: {length}\r\n"
        response = FastResponse(self.connection, status, length)
        response.pending = response_head(status, upstream.reason, response_headers(upstream),
                                         framing, self.closes())
        if upstream.content.total_bytes == 0:  # nothing to send it with: the head goes now
            self.connection.write(response.pending)
            response.pending = b""
        return response


class FastResponse:
    """core.relay.Streamed for the fast path: Content-Length or chunked framing, the head sent
    with the first body bytes when they are already there."""

    def __init__(self, connection: FastConnection, status: int, length: int | None) -> None:
        self.connection, self.status, self.content_length = connection, status, length
        self.chunked = length is None
        self.pending = b""
        self.body_bytes = 0
        self.aborted: str | None = None
        self.fault: str | None = None

    def framed(self, data: bytes) -> tuple[bytes, ...]:
        """The pending head (if any), then the chunk in its framing, as parts (no copies)."""
        parts = (b"%x\r\n" % len(data), data, b"\r\n") if self.chunked else (data,)
        if self.pending:
            parts, self.pending = (self.pending, *parts), b""
        return parts

    async def write(self, data: bytes) -> None:
        self.connection.write(*self.framed(data))
        await self.connection.drain()

    async def flush(self, chunks: list[bytes]) -> int:
        """(Spliced bodies have a length: no chunked framing here.)"""
        parts = [part for part in (self.pending, *chunks) if part]
        self.pending = b""
        if parts:
            self.connection.write(*parts)
        await self.connection.flushed()
        return sum(map(len, chunks))

    async def write_eof(self) -> None:
        tail = self.pending + (b"0\r\n\r\n" if self.chunked else b"")
        self.pending = b""
        if tail:
            self.connection.write(tail)

