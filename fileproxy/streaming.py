"""Relaying the upstream response to the client: headers as sent, body in large reads with backpressure."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import ClientResponse, hdrs, web

from fileproxy.config import Config
from fileproxy.headers import response_headers, response_length
from fileproxy.responses import NoDefaultHeaders
from fileproxy.splice import SinkGone, SourceCut, can_splice, splice_response_body

log = logging.getLogger("fileproxy.streaming")


class RelayedResponse(NoDefaultHeaders, web.StreamResponse):
    """The upstream's status and end-to-end headers; no Server or Content-Type of our own."""

    def __init__(self, upstream: ClientResponse) -> None:
        super().__init__(status=upstream.status, reason=upstream.reason,
                         headers=response_headers(upstream))
        self.keep_headers_set_so_far()
        # Body bytes already here: the headers leave with the first of them in one write.
        # Otherwise they leave at once, so a slow body never delays the client's first byte.
        self._send_headers_immediately = upstream.content.total_bytes == 0
        self.body_bytes = 0
        self.aborted: str | None = None
        self.fault: str | None = None


async def start_response(request: web.Request, upstream: ClientResponse) -> RelayedResponse:
    """Send the upstream's status and headers (Content-Length kept when it gave one)."""
    response = RelayedResponse(upstream)
    length = response_length(upstream)
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    return response


async def relay_body(request: web.Request, upstream: ClientResponse, response: RelayedResponse,
                     config: Config) -> None:
    """Send the upstream's body, spliced when large and of known length; a body cut short closes
    the client connection instead of ending cleanly."""
    if body_expected(request, upstream):
        length = response.content_length
        if config.splice and upstream.connection is not None and \
                can_splice(length, upstream.connection.transport, request.transport):
            assert length is not None
            await splice_relay(request, upstream, response, length, config.read_timeout)
        else:
            await copy_body(request, upstream, response)
    if response.aborted is None:
        await response.write_eof()


def body_expected(request: web.Request, upstream: ClientResponse) -> bool:
    return request.method != hdrs.METH_HEAD and upstream.status not in (204, 304) \
        and upstream.status >= 200


async def copy_body(request: web.Request, upstream: ClientResponse,
                    response: RelayedResponse) -> None:
    """Write what the upstream has buffered (the session's read_bufsize ahead, no more) as it
    comes; write() drains, so the upstream is never read faster than the client takes bytes."""
    content = upstream.content
    while True:
        try:
            chunk = await content.readany()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
            abort_client(request, response, f"upstream body cut short after "
                                            f"{response.body_bytes} bytes ({error!r})")
            return
        if not chunk:
            return
        try:
            await response.write(chunk)
        except ConnectionError:
            abort_client(request, response, "client went away", fault="client")
            return
        response.body_bytes += len(chunk)


async def splice_relay(request: web.Request, upstream: ClientResponse, response: RelayedResponse,
                       length: int, read_timeout: float) -> None:
    """The zero-copy path (fileproxy/splice.py), with the same outcomes as copy_body."""
    try:
        await splice_response_body(request, upstream, response, length, read_timeout)
    except (SourceCut, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        abort_client(request, response, f"upstream body cut short after "
                                        f"{response.body_bytes} bytes ({error})")
    except (SinkGone, ConnectionError):
        abort_client(request, response, "client went away", fault="client")
    finally:
        upstream.close()  # aiohttp's parser never saw the spliced bytes: never reuse this one


def abort_client(request: web.Request, response: RelayedResponse, reason: str,
                 fault: str = "upstream") -> None:
    """Close the client connection so a Content-Length or chunked body cannot end cleanly.
    `fault` says whose it was: upstream, client or timeout."""
    response.aborted = reason
    response.fault = fault
    log.info("%s %s: %s; closing the client connection", request.method, request.path, reason)
    if request.transport is not None:
        request.transport.close()
