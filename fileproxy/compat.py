"""Every use of aiohttp's, h2's and prometheus-client's private names, with the versions tested.

Start-up stops with one line on any other version of these libraries."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any

import aiohttp
import h2.connection
import h2.exceptions
from aiohttp import HttpVersion, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import SINGLETON_HEADERS, HttpRequestParserPy, RawRequestMessage
from aiohttp.payload import Payload
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler, RequestPayloadError
from aiohttp.worker import GunicornUVLoopWebWorker
from h2.utilities import HeaderValidationFlags, validate_headers
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# The releases whose internals below were read and tested. A new one is added after the test
# suite passed on it (setup.cfg admits exactly these).
TESTED_AIOHTTP = ("3.14.4", "3.14.5")
TESTED_H2 = ("4.4",)
TESTED_PROMETHEUS_CLIENT = ("0.20", "0.21", "0.22", "0.23", "0.24", "0.25", "0.26")

log = logging.getLogger("fileproxy.server")
HttpVersion20 = HttpVersion(2, 0)

# Header names (lower-case bytes) aiohttp's request parser refuses to see twice (a 400): the fast
# path hands a request that repeats one to aiohttp rather than deciding otherwise.
SINGLETONS = frozenset(str(name).lower().encode() for name in SINGLETON_HEADERS)


class UntestedVersion(RuntimeError):
    """A library version whose internals fileproxy was not tested against."""


def check_versions() -> None:
    """Raise UntestedVersion naming the library when an untested release is installed."""
    if aiohttp.__version__ not in TESTED_AIOHTTP:
        raise UntestedVersion(f"aiohttp {aiohttp.__version__} is installed; fileproxy uses some of "
                              f"its internals and was tested with {', '.join(TESTED_AIOHTTP)} "
                              "(pip install -e . installs one)")
    h2_version = ".".join(version("h2").split(".")[:2])
    if h2_version not in TESTED_H2:
        raise UntestedVersion(f"h2 {version('h2')} is installed; fileproxy uses some of its "
                              f"internals and was tested with {', '.join(TESTED_H2)}")
    prometheus = version("prometheus-client")
    if ".".join(prometheus.split(".")[:2]) not in TESTED_PROMETHEUS_CLIENT:
        raise UntestedVersion(f"prometheus-client {prometheus} is installed; fileproxy uses some of "
                              f"its internals and was tested with {TESTED_PROMETHEUS_CLIENT[0]} "
                              f"to {TESTED_PROMETHEUS_CLIENT[-1]}")


# ---------------------------------------------------------------- aiohttp's server side

class NoDefaultHeaders:
    """Mixin for aiohttp responses: drop the Server (and Content-Type) aiohttp adds unless they
    were set on purpose (StreamResponse._prepare_headers)."""

    _own_header_names: frozenset[str] = frozenset()

    async def _prepare_headers(self) -> None:
        keep = self._own_header_names
        await super()._prepare_headers()  # type: ignore[misc]
        for name in ("server", "content-type"):
            if name not in keep:
                self.headers.popall(name, None)  # type: ignore[attr-defined]

    def keep_headers_set_so_far(self) -> None:
        self._own_header_names = frozenset(name.lower() for name in self.headers)  # type: ignore[attr-defined]


def send_headers_with_first_chunk(response: web.StreamResponse, wait: bool) -> None:
    """Hold the status line and headers back until the first body bytes (one write), or send
    them at once (StreamResponse._send_headers_immediately)."""
    response._send_headers_immediately = not wait


def answer_as_http11(request: web.BaseRequest) -> None:
    """An answer to a request of an unsupported version (HTTP/2.0 over HTTP/1 framing, 0.9)
    goes out with an HTTP/1.1 status line, not the request's (BaseRequest.version is reified)."""
    request._cache["version"] = HttpVersion11


ErrorAnswer = Callable[[web.BaseRequest, int, str], web.StreamResponse]


class QuietRequestHandler(RequestHandler):
    """aiohttp's connection handler whose own errors (a request its parser refuses, a handler that
    failed) are answered by `answer` (fileproxy's text, no Server header): a refusal is one log
    line, only a 500 carries a traceback (RequestHandler.handle_error)."""

    answer: ErrorAnswer
    header_timeout: float = 0.0
    on_connect: Callable[[asyncio.BaseTransport], None] | None = None
    _head_timer: asyncio.TimerHandle | None = None

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop,
                 **settings: Any) -> None:
        """aiohttp's handler with its pure-Python request parser, which reads request lines as
        RFC 9112 3 writes them (its C parser takes `GET  /x` with two spaces); the fast path
        serves plain GETs, so what this parses is the rest: bodies, admin, first lines of
        unusual requests."""
        super().__init__(manager, loop=loop, **settings)
        self._parser = HttpRequestParserPy(
            self, loop, settings.get("read_bufsize", 2**16),
            max_line_size=settings.get("max_line_size", 8190),
            max_field_size=settings.get("max_field_size", 8190),
            max_headers=settings.get("max_headers", 128),
            payload_exception=RequestPayloadError,
            auto_decompress=settings.get("auto_decompress", True),
            max_msg_queue_size=MAX_MSG_QUEUE_SIZE)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The first request's head must be complete within the header timeout (later ones
        are bounded by aiohttp's keep-alive timer, which closes a connection whose head is
        still incomplete)."""
        super().connection_made(transport)
        if self.on_connect is not None:
            self.on_connect(transport)
        if self.header_timeout:
            self._head_timer = self._loop.call_later(self.header_timeout, self.head_overdue)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def head_overdue(self) -> None:
        self._head_timer = None
        if self._request_count == 0:
            log.info("closing a connection from %s: no complete request head within %g s",
                     self.transport.get_extra_info("peername") if self.transport else "-",
                     self.header_timeout)
            self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.info("refused a request from %s: %s %s", request.remote, status,
                     message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun: no error answer can follow")
        answer_as_http11(request)  # (a head the parser refused has no version of its own)
        response = self.answer(request, status, reason_of(exc, message))
        response.force_close()
        return response


def reason_of(exc: BaseException | None, message: str | None) -> str:
    """A one-line reason from aiohttp's parser error (its message has the offending bytes)."""
    text = getattr(exc, "message", None) or message or (str(exc) if exc else "")
    return " ".join(str(text).split())[:200]


def request_handler(server: web.Server, answer: ErrorAnswer, header_timeout: float,
                    on_connect: Callable[[asyncio.BaseTransport], None] | None = None
                    ) -> RequestHandler:
    """A connection handler for aiohttp's Server (Server.__call__, with its settings);
    `on_connect` sees each new connection's transport."""
    handler = QuietRequestHandler(server, loop=server._loop, **server._kwargs)
    handler.answer, handler.header_timeout = answer, header_timeout
    handler.on_connect = on_connect
    return handler


class ServerWrappingRunner(web.AppRunner):
    """An AppRunner whose protocol factory is `wrap(the Server aiohttp made)` (AppRunner._make_server)."""

    def wrap(self, inner: web.Server) -> Any:
        raise NotImplementedError

    async def _make_server(self) -> web.Server:
        return self.wrap(await super()._make_server())


# ---------------------------------------------------------------- aiohttp's client side

def mark_consumed(payload: Payload) -> None:
    """A payload whose bytes went once and cannot be sent again (Payload._consumed)."""
    payload._consumed = True


def connector_sizes(connector: Any) -> tuple[int, int]:
    """(idle, in use) connections of an aiohttp TCPConnector (_conns, _acquired)."""
    idle = sum(len(conns) for conns in connector._conns.values())
    return idle, len(connector._acquired)


class TransparentClientRequest(aiohttp.ClientRequest):
    """aiohttp's client request that adds no `Content-Length: 0` to a request without a body
    (it does for DELETE, POST, custom methods): a proxy never invents framing."""

    def update_body_from_data(self, body: Any, _stacklevel: int = 3) -> None:
        had_length = "Content-Length" in self.headers
        super().update_body_from_data(body, _stacklevel=_stacklevel + 1)
        if body is None and not had_length:
            self.headers.popall("Content-Length", None)


# ---------------------------------------------------------------- prometheus-client

def histogram_add(histogram: Any, total: float, counts: Iterable[int]) -> None:
    """Observations added in bulk: bucket counts and their sum (Histogram._buckets/_sum)."""
    histogram._sum.inc(total)
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


# ---------------------------------------------------------------- requests from elsewhere (HTTP/2)

EMPTY_BODY = EMPTY_PAYLOAD


class PayloadFlow:
    """The connection protocol aiohttp's BaseRequest and StreamReader expect (its transport,
    ssl_context, peername, sockname, max_field_size, max_headers, connected; pause_reading and
    resume_reading with the _reading_paused flag they read), for requests that arrive on
    something else: an HTTP/2 stream. `resumed` is called when a paused reader has room again."""

    def __init__(self, transport: asyncio.Transport, max_field_size: int,
                 max_headers: int) -> None:
        self.transport = transport
        self.ssl_context = transport.get_extra_info("sslcontext")
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self.max_field_size, self.max_headers = max_field_size, max_headers
        self._reading_paused = False

    @property
    def paused(self) -> bool:
        return self._reading_paused

    @property
    def connected(self) -> bool:
        """(StreamReader asks before it waits for data.)"""
        return not self.transport.is_closing()

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.resumed()

    def resumed(self) -> None:
        """Room again in the reader."""


def body_reader(flow: PayloadFlow, limit: int) -> StreamReader:
    """A request body reader that pauses `flow` above twice `limit` bytes buffered."""
    return StreamReader(flow, limit, loop=asyncio.get_running_loop())  # type: ignore[arg-type]


def request_message(method: str, target: str, fields: list[tuple[bytes, bytes]]
                    ) -> RawRequestMessage:
    """A request head as aiohttp's HTTP/1.1 parser would hand it over, for HTTP/2."""
    headers = CIMultiDictProxy(CIMultiDict(
        (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        for name, value in fields))
    url = URL(target, encoded=True) if target.startswith("/") else URL.build(path=target,
                                                                            encoded=True)
    return RawRequestMessage(method, target, HttpVersion20, headers, tuple(fields),
                             should_close=False, compression=None, upgrade=False,
                             chunked=False, url=url)


def make_request(server: web.Server, message: RawRequestMessage, payload: StreamReader,
                 flow: PayloadFlow, writer: AbstractStreamWriter,
                 task: asyncio.Task[None]) -> web.BaseRequest:
    """The application's request object for a head that did not come through its own parser."""
    return server.request_factory(message, payload, flow, writer, task)  # type: ignore[arg-type]


# ---------------------------------------------------------------- aiohttp's gunicorn worker

class ContextWorker(GunicornUVLoopWebWorker):
    """aiohttp's uvloop gunicorn worker, its TLS context made by `server_tls` rather than from
    gunicorn's ssl settings (GunicornWebWorker._create_ssl_context, which knows no ALPN)."""

    def server_tls(self) -> ssl.SSLContext | None:
        raise NotImplementedError

    def _create_ssl_context(self, cfg: Any) -> ssl.SSLContext | None:  # type: ignore[override]
        return self.server_tls()

    backlog_restored = False

    def notify(self) -> None:
        """The heartbeat; the first, which aiohttp's worker sends once its sites listen, also
        puts gunicorn's --backlog back on the listening sockets: each site listens again with
        web.SockSite's default, 128, on a socket the master (or gunicorn's reuse_port) opened."""
        super().notify()
        if not self.backlog_restored:
            self.backlog_restored = True
            for listener in self.sockets:
                try:
                    listener.listen(self.cfg.backlog)
                except OSError as error:  # (aiohttp's worker would swallow it and stop)
                    self.log.warning("cannot set the listen backlog on %s: %s", listener, error)


# ---------------------------------------------------------------- h2's connection state

def h2_connection_closed(connection: h2.connection.H2Connection) -> bool:
    """Has the connection ended (GOAWAY sent or received; H2Connection.state_machine)?"""
    return bool(connection.state_machine.state == h2.connection.ConnectionState.CLOSED)


def h2_stream_open(connection: h2.connection.H2Connection, stream_id: int) -> bool:
    """Is the stream still open in some direction (H2Connection.streams)?"""
    stream = connection.streams.get(stream_id)
    return stream is not None and not stream.closed


# The flags h2 validates a request's fields with on the server side (not a client's, not
# trailers, not a response, not a push).
H2_REQUEST_FIELDS = HeaderValidationFlags(is_client=False, is_trailer=False,
                                          is_response_header=False, is_push_promise=False)


def h2_request_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What h2's own validation of a request's fields (h2.utilities.validate_headers: names and
    values, connection-specific fields, pseudo-header rules, Host against :authority) refuses,
    run by the caller so that the refusal can be a stream error, not the connection's end."""
    try:
        for _ in validate_headers(headers, H2_REQUEST_FIELDS):
            pass
    except h2.exceptions.ProtocolError as error:
        return str(error)
    return None
