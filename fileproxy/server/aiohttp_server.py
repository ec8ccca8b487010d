"""aiohttp's server as an adapter of the request path: its requests go through core.forward.serve_request,
and upstream answers back through aiohttp's response classes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from fileproxy.compat import NoDefaultHeaders, answer_as_http11, send_headers_with_first_chunk
from fileproxy.core.checks import SUPPORTED_VERSIONS
from fileproxy.core.exchange import Exchange, request_id_for
from fileproxy.core.forward import serve_request
from fileproxy.core.keys import CONFIG, LEGACY
from fileproxy.core.routing import Route
from fileproxy.features import resumable
from fileproxy.features.tasks import TASKS, task_unavailable
from fileproxy.http.errors import ProxyError
from fileproxy.http.headers import Outgoing, peer_address, response_headers, response_length
from fileproxy.observability.accesslog import EXCHANGE
from fileproxy.state import StateUnavailable
from fileproxy.upstream.aiohttp_client import UpstreamResponse, body_payload, close_if_taken_over
from fileproxy.upstream.socketrelay import write_all

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """aiohttp's server adapter: the request path for a request aiohttp parsed."""
    app = request.app
    config = app[CONFIG]
    exchange = request[EXCHANGE] = Exchange(request_id_for(request), time.monotonic())

    async def elsewhere(where: Route, outgoing: Outgoing) -> web.StreamResponse:
        if where is Route.LEGACY:
            return await app[LEGACY][request.path](request)
        if where is Route.TASK:
            return await submit_task(request, outgoing, exchange)
        if where is Route.UPLOAD:
            return await resumable_upload(request, outgoing, exchange)
        raise ProxyError(404, f"Not Found: no fileproxy endpoint {request.path}")

    return await serve_request(app, request, AiohttpSide(request), exchange,
                               lambda outgoing: body_payload(request, outgoing, config), elsewhere)


async def submit_task(request: web.Request, outgoing: Outgoing,
                      exchange: Exchange) -> web.StreamResponse:
    try:
        response = await request.app[TASKS].submit(request, outgoing, peer_address(request) or "-")
        exchange.bytes_in = request.content.total_bytes  # the body, stored for later
        return response
    except StateUnavailable as error:
        exchange.outcome, exchange.detail = "rejected", str(error)
        return task_unavailable(error)


async def resumable_upload(request: web.Request, outgoing: Outgoing,
                           exchange: Exchange) -> web.StreamResponse:
    """A request carrying Upload-Complete: an upload resource (features/resumable.py)."""
    try:
        return await resumable.create(request, outgoing)
    except StateUnavailable as error:
        exchange.outcome, exchange.detail = "rejected", str(error)
        return task_unavailable(error)
    finally:
        exchange.bytes_in = request.content.total_bytes  # (kept in the spool)


class RelayedResponse(NoDefaultHeaders, web.StreamResponse):
    """The upstream's status and end-to-end headers; no Server or Content-Type of our own."""

    def __init__(self, upstream: UpstreamResponse) -> None:
        super().__init__(status=upstream.status, reason=upstream.reason,
                         headers=response_headers(upstream))
        self.keep_headers_set_so_far()
        # Body bytes already here: the headers leave with the first of them in one write.
        # Otherwise they leave at once, so a slow body never delays the client's first byte.
        send_headers_with_first_chunk(self, wait=upstream.content.total_bytes != 0)
        self.body_bytes = 0
        self.aborted: str | None = None
        self.fault: str | None = None
        self.writer: AbstractStreamWriter | None = None  # the request's, once prepared

    async def flush(self, chunks: list[bytes]) -> int:
        """(Before a socket-to-socket relay, which only an HTTP/1 connection gets.)"""
        assert isinstance(self.writer, StreamWriter)
        return await write_all(self.writer, chunks)


class WholeResponse(NoDefaultHeaders, web.Response):
    """A small upstream response that arrived whole with its headers: aiohttp sends it in one
    write, without the streaming machinery."""

    aborted: str | None = None
    fault: str | None = None

    def __init__(self, upstream: UpstreamResponse, body: bytes) -> None:
        super().__init__(status=upstream.status, reason=upstream.reason,
                         headers=response_headers(upstream), body=body)
        self.keep_headers_set_so_far()
        self.body_bytes = len(body)


class AiohttpSide:
    """The client side of a request aiohttp parsed: its response classes do the writing."""

    def __init__(self, request: web.Request) -> None:
        self.request = request

    def whole(self, upstream: UpstreamResponse, body: bytes) -> WholeResponse:
        return WholeResponse(upstream, body)

    async def start(self, upstream: UpstreamResponse) -> RelayedResponse:
        """Send the upstream's status and headers (Content-Length kept when it gave one)."""
        response = RelayedResponse(upstream)
        close_if_taken_over(self.request, response)
        length = response_length(upstream)
        if length is not None:
            response.content_length = length
        await response.prepare(self.request)
        response.writer = self.request.writer
        return response

    def error(self, error: ProxyError, request_id: str) -> web.Response:
        if self.request.version not in SUPPORTED_VERSIONS:
            answer_as_http11(self.request)
        response = error.response(request_id)
        close_if_taken_over(self.request, response)
        return response


async def defer_expect(request: web.Request) -> None:
    """Send no early 100 Continue: the client gets one when the upstream asks for the body."""


@web.middleware
async def route_every_target(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Targets the router cannot place (CONNECT authority-form, '*') go to the proxy handler,
    which refuses them with a reason instead of a bare 404."""
    if request.match_info.http_exception is not None:
        return await proxy_handler(request)
    return await handler(request)
