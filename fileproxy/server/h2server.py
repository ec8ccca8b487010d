"""HTTP/2 to clients (RFC 9113, on the h2 library): each stream an aiohttp request of the same app.

Every stream goes to the same application as HTTP/1.1 (the one request path, tus, tasks, admin),
its body streamed both ways under HTTP/2 flow control.

A connection starts on Opening, which picks the protocol: HTTP/2 when TLS negotiated `h2` (ALPN)
or when a clear-text client's first bytes are the HTTP/2 preface (h2c with prior knowledge);
HTTP/1.1 otherwise (the fast path, or aiohttp's server). A plain GET (no body, routed to the
upstream: the fast path's Gate decides) goes through the request path with H2Side, which sends
the upstream's head as HEADERS and its body as DATA; any other request is an aiohttp request whose
"transport" is the stream (closing it resets the stream, never the connection; it has no socket,
so no socket-to-socket relay) and whose writer sends HEADERS and DATA frames.
Windows are sized for long fat links (--h2-window, per stream and for the connection); received
bytes are acknowledged once the request's body reader has room for them, so a slow upstream
holds a fast client back through flow control and memory stays bounded by the window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from fileproxy.compat import (
    EMPTY_BODY,
    PayloadFlow,
    body_reader,
    h2_connection_closed,
    h2_request_problem,
    h2_stream_open,
    make_request,
    request_message,
)
from fileproxy.config import Config
from fileproxy.core.exchange import Exchange, request_id_for
from fileproxy.core.forward import ServedRequest, serve_request
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
from fileproxy.upstream.aiohttp_client import UpstreamResponse

log = logging.getLogger("fileproxy.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Connection-specific fields (RFC 9113 8.2.2): never sent in HTTP/2, refused when received.
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade"})
CONNECTION_SPECIFIC_OR_LENGTH = CONNECTION_SPECIFIC | {"content-length"}
DEFAULT_WINDOW = 65535  # every HTTP/2 window's size before SETTINGS or WINDOW_UPDATE
BULK = 256 << 10  # DATA bytes queued before they are written at once (and backpressure heeded)


class Gate(Protocol):
    """Which requests skip aiohttp's request and response objects (server/fastpath.py)."""

    def admit_h2(self, method: str, target: str, raw_headers: list[tuple[bytes, bytes]],
                 transport: asyncio.Transport, remote: str | None, scheme: str
                 ) -> ServedRequest | None: ...


class Host(Protocol):
    """What a connection needs of the server it belongs to (server/fastpath.py's FastServer)."""

    config: Config
    app: web.Application
    inner: web.Server
    access: AccessLogger | None
    connections: set[Any]
    served: int
    closing: bool

    @property
    def gate(self) -> Gate: ...

    def connected(self, transport: asyncio.BaseTransport) -> None: ...

    def http1(self) -> asyncio.Protocol: ...


class Opening(asyncio.Protocol):
    """A new client connection until its protocol is known."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            chosen = ssl_object.selected_alpn_protocol()
            self.switch(H2Connection(self.host) if chosen == "h2" else self.host.http1())
            return
        self.timer = asyncio.get_running_loop().call_later(
            self.host.config.client_header_timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.startswith(PREFACE):
            self.switch(H2Connection(self.host))
        elif not PREFACE.startswith(self.buffer):
            self.switch(self.host.http1())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def switch(self, protocol: asyncio.Protocol) -> None:
        if self.timer is not None:
            self.timer.cancel()
        transport = self.transport
        assert transport is not None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer:
            protocol.data_received(self.buffer)


def server_machine(config: Config) -> h2.connection.H2Connection:
    """h2's state machine for one client connection, with fileproxy's settings. A request's
    fields are validated with h2's own rules (RFC 9113 8.2, 8.3) once they arrived
    (request_received), so that a malformed request is a stream error and the connection's other
    streams go on; responses are built here from checked fields, so h2's second look at them is
    skipped."""
    machine = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False,
        validate_outbound_headers=False, normalize_outbound_headers=False))
    machine.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: config.h2_window,
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: config.h2_max_streams,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2 * config.max_header_size,
    })
    return machine


class H2Connection(asyncio.Protocol):
    """One client connection speaking HTTP/2: frames in, events to streams, frames out."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.h2 = server_machine(host.config)
        self.streams: dict[int, H2Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.scheme = "http"
        self.closing = False
        self._writable: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._flush_due = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.host.connected(transport)
        self.host.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (list, tuple)) and peer else None
        self.scheme = "https" if transport.get_extra_info("sslcontext") is not None else "http"
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(self.host.config.h2_window - DEFAULT_WINDOW)
        self.flush()
        self.closing = self.host.closing
        self.wait_idle()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            log.info("closing an HTTP/2 connection: %s", error)
            self.flush()  # (h2 queued a GOAWAY)
            self.close()
            return
        for event in events:
            self.dispatch(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.host.connections.discard(self)
        self.cancel_idle()
        for stream in list(self.streams.values()):
            stream.lost()
        self.wake_writer()

    def pause_writing(self) -> None:
        """The client is not reading what it is sent: writers wait, and so do its requests (a
        client that asks without reading never makes the output buffer grow without bound)."""
        if self._writable is None:
            self._writable = self.loop.create_future()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self.wake_writer()

    # -- events

    def dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.request_received(event)
        elif isinstance(event, h2.events.DataReceived):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.data(event.data, event.flow_controlled_length)
            elif event.flow_controlled_length:  # (a stream already answered: its bytes
                # still count against the connection's window)
                self.h2.increment_flow_control_window(event.flow_controlled_length)
        elif isinstance(event, (h2.events.StreamEnded, h2.events.TrailersReceived)):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.ended()
        elif isinstance(event, h2.events.StreamReset):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.reset_by_client(event.error_code)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            for stream in self.streams.values():
                stream.window_changed()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closing = True
            self.close_when_idle()

    def request_received(self, event: h2.events.RequestReceived) -> None:
        if self.closing:
            self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        headers = list(event.headers or [])
        problem = h2_request_problem(headers)
        if problem is not None:
            log.info("HTTP/2 stream %d refused: %s", event.stream_id, problem)
            self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        ended = event.stream_ended is not None
        stream = self.streams[event.stream_id] = H2Stream(self, event.stream_id)
        self.cancel_idle()
        stream.start(headers, ended)

    def stream_done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.id, None)
        self.host.served += 1
        if not self.streams:
            if self.closing:
                self.close_when_idle()
            else:
                self.wait_idle()

    # -- output

    def flush(self) -> None:
        """Frames h2 has queued go out now."""
        self._flush_due = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Frames go out once this turn of the event loop is over: the frames of every stream
        that answered in it leave in one write (one TLS record, one system call)."""
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self.flush)

    async def writable(self) -> None:
        """Until the transport's buffer is below its high-water mark (or the connection ended)."""
        while self._writable is not None:
            await self._writable

    def wake_writer(self) -> None:
        if self._writable is not None:
            waiter, self._writable = self._writable, None
            if not waiter.done():
                waiter.set_result(None)

    # -- closing

    def wait_idle(self) -> None:
        self.cancel_idle()
        self._idle = self.loop.call_later(self.host.config.client_keepalive, self.close_when_idle)

    def cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def close_when_idle(self) -> None:
        """GOAWAY: no new stream; the connection closes once its streams ended."""
        self.closing = True
        if self.transport is None or self.transport.is_closing():
            return
        if not h2_connection_closed(self.h2):
            self.h2.close_connection()
            self.flush()
        if not self.streams:
            self.close()

    def close(self) -> None:
        """Closed for this server from now on (a TLS client that never answers the close
        keeps the socket until the TLS shutdown times out; shutdown does not wait for that)."""
        self.host.connections.discard(self)
        if self.transport is not None:
            self.transport.close()


class H2Stream:
    """One request and its response on a connection."""

    def __init__(self, connection: H2Connection, stream_id: int) -> None:
        self.connection = connection
        self.id = stream_id
        self.flow = StreamFlow(self)
        self.body: StreamReader | None = None  # (none for a request that has no body)
        self.unacknowledged = 0
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self._window = asyncio.Event()

    @property
    def machine(self) -> h2.connection.H2Connection:
        return self.connection.h2

    def start(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        """A plain GET goes through the request path without aiohttp's request and response
        objects (as the HTTP/1.1 fast path does); any other request as an aiohttp request."""
        self.started = time.monotonic()
        method, target, fields = as_http1(headers)
        loop = asyncio.get_running_loop()
        if ended and self.connection.host.config.fast_path:
            plain = self.connection.host.gate.admit_h2(
                method, target, fields, self.flow.transport, self.connection.remote,
                self.connection.scheme)
            if plain is not None:
                self.task = loop.create_task(self.serve_plain(plain))
                return
        if not ended:
            self.body = body_reader(self.flow, self.connection.host.config.read_size)
        self.task = loop.create_task(
            self.run(request_message(method, target, fields), self.body or EMPTY_BODY))

    async def serve_plain(self, request: ServedRequest) -> None:
        """The request path (core.forward.serve_request) for a plain GET; frames straight out."""
        host = self.connection.host
        exchange = Exchange(request_id_for(request), time.monotonic())
        try:
            answer = await serve_request(host.app, request, H2Side(self), exchange, no_body)
            await answer.finish()
        except ConnectionError:
            exchange.outcome, exchange.detail = "client_aborted", "client went away"
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        except asyncio.CancelledError:
            exchange.outcome, exchange.detail = "client_aborted", "client went away"
            raise
        finally:
            if host.access is not None:
                host.access.write(exchange_fields(
                    request.remote, request.method, request.raw_path, "2.0", exchange.status,
                    exchange.bytes_out, time.monotonic() - exchange.started, exchange))
            self.finish()

    async def run(self, message: Any, body: Any) -> None:
        """The application answers the request; the response goes out as frames."""
        host = self.connection.host
        assert self.task is not None
        writer = H2Writer(self)
        request = make_request(host.inner, message, body, self.flow, writer, self.task)
        response: web.StreamResponse | None = None
        try:
            response = await answer(host.inner, request)
        except ConnectionError as error:
            log.debug("HTTP/2 stream %d ended early: %s", self.id, error)
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        except Exception as error:  # (what aiohttp's server answers with a 500)
            log.error("error handling an HTTP/2 request", exc_info=error)
            if not writer.headers_sent:
                response = ProxyError(500, "Internal Server Error").response(
                    request_id_for(request))
                await self.answer_quietly(request, response)
            else:
                self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            if host.access is not None and response is not None:
                host.access.log(request, response, time.monotonic() - self.started)
            self.finish()

    async def answer_quietly(self, request: web.BaseRequest, response: web.StreamResponse
                             ) -> None:
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

    def finish(self) -> None:
        """The stream is done with: a body the client still sends is not waited for (RST_STREAM
        NO_ERROR after a complete response, RFC 9113 8.1)."""
        if self.client_still_sending():
            self.reset(h2.errors.ErrorCodes.NO_ERROR)
        self.closed = True
        self.acknowledge()
        self.connection.stream_done(self)

    def client_still_sending(self) -> bool:
        return h2_stream_open(self.machine, self.id)

    # -- from the client

    def data(self, data: bytes, flow_controlled_length: int) -> None:
        self.unacknowledged += flow_controlled_length
        if data and not self.closed and self.body is not None:
            self.body.feed_data(data)
        if not self.flow.paused or self.closed:
            self.acknowledge()

    def ended(self) -> None:
        if self.body is not None:
            self.body.feed_eof()

    def acknowledge(self) -> None:
        """Open the windows again for the bytes received and taken."""
        if self.unacknowledged:
            count, self.unacknowledged = self.unacknowledged, 0
            try:
                self.machine.acknowledge_received_data(count, self.id)
            except h2.exceptions.StreamClosedError:
                self.machine.increment_flow_control_window(count)
            self.connection.flush_soon()

    def reset_by_client(self, error_code: int) -> None:
        log.debug("HTTP/2 stream %d reset by the client (%s)", self.id, error_code)
        self.lost()

    def lost(self) -> None:
        """The client reset the stream or left: its request is cancelled (and its upstream one)."""
        self.closed = True
        if self.body is not None:
            self.body.set_exception(ConnectionResetError("the client reset the stream"))
        self._window.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- to the client

    def reset(self, code: h2.errors.ErrorCodes) -> None:
        """End the stream without a clean end (a truncated body is never passed off as whole)."""
        self.closed = True
        self._window.set()
        try:
            self.machine.reset_stream(self.id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.connection.flush_soon()

    def send_interim(self, status: int, fields: list[tuple[bytes, bytes]]) -> None:
        """A 1xx response as a HEADERS frame before the final one (RFC 9113 8.1)."""
        self.send_headers(response_fields(status, (
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
            for name, value in fields), CONNECTION_SPECIFIC), False)

    def send_headers(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        self.check_open()
        self.machine.send_headers(self.id, headers, end_stream=end)
        self.connection.flush_soon()
        if end:
            self.closed = True

    async def send_data(self, data: bytes, end: bool) -> None:
        """DATA frames as the stream's and the connection's windows allow (a large chunk's
        frames leave as they are made, small ones with the rest of this loop turn's)."""
        sent = flushed = 0
        view = memoryview(data)  # (frames are cut from it without copying)
        while sent < len(data) or end:
            self.check_open()
            window = min(self.machine.local_flow_control_window(self.id),
                         self.machine.max_outbound_frame_size)
            if window <= 0 and sent < len(data):
                self._window.clear()
                await self._window.wait()
                continue
            piece = view[sent:sent + window]
            sent += len(piece)
            last = end and sent >= len(data)
            self.machine.send_data(self.id, piece, end_stream=last)
            if sent - flushed >= BULK:
                flushed = sent
                self.connection.flush()
                await self.connection.writable()
            else:
                self.connection.flush_soon()
            if last:
                self.closed = True
                return

    def check_open(self) -> None:
        if self.closed or self.connection.transport is None or \
                self.connection.transport.is_closing():
            raise ConnectionResetError("the HTTP/2 stream was reset or the connection closed")

    def window_changed(self) -> None:
        self._window.set()


def response_fields(status: int, fields: Iterable[tuple[str, str]], dropped: frozenset[str]
                    ) -> list[tuple[bytes, bytes]]:
    """A response head as HTTP/2 fields: :status first, names lower-cased, the fields HTTP/2
    does not carry (`dropped`) left out."""
    return [(b":status", str(status).encode())] + [
        (name.lower().encode("latin-1"), value.encode("utf-8", "surrogateescape"))
        for name, value in fields if name.lower() not in dropped]


def as_http1(headers: list[tuple[bytes, bytes]]) -> tuple[str, str, list[tuple[bytes, bytes]]]:
    """(method, target, fields) of a request's HTTP/2 fields as HTTP/1.1 would carry them
    (RFC 9113 8.3.1, 8.2.3): :authority becomes Host, cookie fields are joined."""
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        elif name == b"cookie":
            cookies.append(value)
        else:
            fields.append((name, value))
    if b":authority" in pseudo and not any(name == b"host" for name, _ in fields):
        fields.insert(0, (b"host", pseudo[b":authority"]))
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    method = pseudo.get(b":method", b"GET").decode("latin-1")
    target = pseudo.get(b":path", pseudo.get(b":authority", b"")).decode("utf-8",
                                                                            "surrogateescape")
    return method, target, fields


async def answer(server: web.Server, request: web.BaseRequest) -> web.StreamResponse:
    """The application's response to a request, sent whole (as aiohttp's connection handler
    does: an HTTPException raised is the response)."""
    try:
        response = await server.request_handler(request)
    except web.HTTPException as exception:
        response = exception
    await response.prepare(request)
    await response.write_eof()
    return response


class StreamFlow(PayloadFlow):
    """What aiohttp's request and body reader see of a stream (they expect a connection's
    protocol): pausing holds back the acknowledgement of received bytes."""

    def __init__(self, stream: H2Stream) -> None:
        connection = stream.connection
        outer = connection.transport
        assert outer is not None
        config = connection.host.config
        super().__init__(StreamTransport(stream, outer), parser_limit(config),
                         2 * config.max_headers)
        self.stream = stream

    def resumed(self) -> None:
        self.stream.acknowledge()


class StreamTransport(asyncio.Transport):
    """A stream as the transport of its request: closing it resets the stream; it has no socket
    of its own (no socket-to-socket relay) and says which stream it is."""

    def __init__(self, stream: H2Stream, outer: asyncio.Transport) -> None:
        super().__init__()
        self.stream, self.outer = stream, outer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return None
        if name == "h2_stream":
            return self.stream.id
        return self.outer.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.stream.closed or self.outer.is_closing()

    def close(self) -> None:
        self.stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0

    def write_interim(self, status: int, fields: list[tuple[bytes, bytes]]) -> None:
        """An upstream's 1xx (103 Early Hints) passed on as a HEADERS frame."""
        self.stream.send_interim(status, fields)


class H2Side:
    """core.relay.ClientSide for a plain GET on a stream: the upstream's head as HEADERS, its
    body as DATA, under the stream's flow control."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream

    def error(self, error: ProxyError, request_id: str) -> H2Response:
        text = error.text(request_id).encode()
        fields = {"content-type": "text/plain; charset=utf-8",
                  **error.headers_for(request_id)}.items()
        return H2Response(self.stream, error.status, len(text), fields, text)

    def whole(self, upstream: UpstreamResponse, body: bytes) -> H2Response:
        return H2Response(self.stream, upstream.status, len(body),
                          response_headers(upstream).items(), body)

    async def start(self, upstream: UpstreamResponse) -> H2Response:
        length = response_length(upstream)
        if upstream.status in NO_BODY_STATUSES:
            length = length if upstream.status == 304 else None
        return H2Response(self.stream, upstream.status, length,
                          response_headers(upstream).items(), None)


class H2Response:
    """core.relay.Streamed on a stream: HEADERS at once (with the body, when it is all here),
    then DATA; finish() ends the stream."""

    def __init__(self, stream: H2Stream, status: int, length: int | None,
                 fields: Iterable[tuple[str, str]], body: bytes | None) -> None:
        self.stream, self.status, self.content_length = stream, status, length
        self.body_bytes = len(body) if body else 0  # (counted as given, as the fast path does)
        self.aborted: str | None = None
        self.fault: str | None = None
        self.whole = body
        empty = status in NO_BODY_STATUSES
        head = response_fields(status, fields, CONNECTION_SPECIFIC_OR_LENGTH)
        if length is not None:
            head.append((b"content-length", str(length).encode()))
        if not any(name == b"date" for name, _ in head):
            head.append((b"date", http_date().encode()))
        stream.send_headers(head, end=empty and not body)
        self.ended = empty and not body

    async def write(self, data: bytes) -> None:
        await self.stream.send_data(data, end=False)
        self.body_bytes += len(data)

    async def flush(self, chunks: list[bytes]) -> int:
        raise AssertionError("no socket-to-socket relay on an HTTP/2 stream")

    async def write_eof(self) -> None:
        if not self.ended:
            self.ended = True
            await self.stream.send_data(b"", end=True)

    async def finish(self) -> None:
        """The whole body of an answer made at once (an error, a small response), then the end."""
        if self.whole is not None and not self.ended:
            body, self.whole = self.whole, None
            self.ended = True
            await self.stream.send_data(body, end=True)
        await self.write_eof()


class H2Writer(AbstractStreamWriter):
    """aiohttp's response writer for a stream: the head as HEADERS, the body as DATA."""

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self.length = None
        self._head: list[tuple[bytes, bytes]] | None = None
        self.headers_sent = False

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None
                           ) -> None:
        raise RuntimeError("fileproxy never compresses a response itself")

    def enable_chunking(self) -> None:
        """HTTP/2 frames the body itself."""

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        status = int(status_line.split(" ", 2)[1])
        self._head = response_fields(status, headers.items(), CONNECTION_SPECIFIC)

    def send_headers(self, end: bool = False) -> None:
        if self._head is not None and not self.headers_sent:
            self.headers_sent = True
            self.stream.send_headers(self._head, end)

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if chunk:
            self.send_headers()
            await self.stream.send_data(bytes(chunk), end=False)
            self.output_size += len(chunk)

    async def write_eof(self, chunk: bytes = b"") -> None:
        if not self.headers_sent and not chunk:
            self.send_headers(end=True)
            return
        self.send_headers()
        await self.stream.send_data(bytes(chunk), end=True)
        self.output_size += len(chunk)

    async def drain(self) -> None:
        await self.stream.connection.writable()

    async def write_interim(self, status: int, fields: list[tuple[bytes, bytes]]) -> None:
        """fileproxy's own 1xx (100 Continue, 104) before the final response."""
        self.stream.send_interim(status, fields)
