"""The upstream side: the one ClientSession per worker, its tuned connector, and sending one request."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
from aiohttp import ClientResponse, ClientSession, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from aiohttp.payload import Payload

from fileproxy.compat import TransparentClientRequest, mark_consumed
from fileproxy.config import Config
from fileproxy.http.clientbody import client_body, send_100_continue
from fileproxy.http.errors import (
    upstream_closed_early,
    upstream_connect_timeout,
    upstream_header_timeout,
    upstream_invalid,
    upstream_unreachable,
)
from fileproxy.http.headers import Outgoing
from fileproxy.policy.balancing import Upstream
from fileproxy.policy.retry import IDEMPOTENT
from fileproxy.upstream.lean import (
    UPSTREAM_MAX_FIELD_SIZE,
    UPSTREAM_MAX_HEADERS,
    Interim,
    LeanPool,
    LeanResponse,
    can_use,
)
from fileproxy.upstream.socketrelay import Timeouts, can_take_over, take_over_request_body
from fileproxy.upstream.sockets import SocketOptions

# What aiohttp would add on its own; a transparent proxy sends only what the client sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def make_session(config: Config) -> ClientSession:
    """The worker's one session: pooled keep-alive, no cookies, no decompression, no redirects."""
    connector = aiohttp.TCPConnector(
        limit=config.pool_size,
        limit_per_host=config.pool_size_per_host,
        keepalive_timeout=config.upstream_keepalive,
        ttl_dns_cache=config.dns_ttl,
        socket_factory=SocketOptions.from_config(config).upstream_socket_factory,
        ssl=upstream_tls(config),
    )
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=config.connect_timeout,
                                    sock_read=config.read_timeout)
    return ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        read_bufsize=config.read_size,
        timeout=timeout,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        max_headers=UPSTREAM_MAX_HEADERS,
        max_field_size=UPSTREAM_MAX_FIELD_SIZE,
        max_line_size=UPSTREAM_MAX_FIELD_SIZE,
        request_class=TransparentClientRequest,
    )


def upstream_tls(config: Config) -> ssl.SSLContext:
    """https:// upstreams are verified: against --upstream-ca, else the system's CAs."""
    return ssl.create_default_context(cafile=config.upstream_ca or None)


UpstreamResponse = ClientResponse | LeanResponse


# Set on a request whose body went socket to socket: aiohttp's parser for that connection is out of step,
# so the response closes it.
CLOSE_CLIENT = web.RequestKey("close_client", bool)


class ForwardedBody(Payload):
    """A request body on its way upstream: counts what was sent; `replayable` when it can be sent
    again (stored), not when it streams from the client."""

    replayable = False

    def __init__(self, value: Any) -> None:
        super().__init__(value, content_type=None)
        self.body_bytes = 0
        self.sent = False  # a first byte went (or may have gone) upstream

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a forwarded request body is not kept, so it cannot be decoded")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)


class ClientBody(ForwardedBody):
    """The client's request body for aiohttp's client: streamed as it arrives, or socket to
    socket when large (upstream/socketrelay.py). Sends the client its 100 Continue when the
    upstream asked for the body. The upstream connection's congestion control is fitted to its
    path first (the body is what fileproxy sends on it)."""

    def __init__(self, request: web.Request, socket_relay: str, timeouts: Timeouts,
                 socket_options: SocketOptions) -> None:
        super().__init__(request.content)
        self._request = request
        self._socket_relay = socket_relay
        self._timeouts = timeouts  # source: the client stalling; sink: the upstream
        self._socket_options = socket_options

    async def write_with_length(self, writer: AbstractStreamWriter,
                                content_length: int | None) -> None:
        self.sent = True
        mark_consumed(self)  # the client's bytes go once only: no replay
        if writer.transport is not None:
            self._socket_options.fit_congestion(writer.transport.get_extra_info("socket"))
        request = self._request
        await send_100_continue(request)
        length = request.content_length
        if isinstance(writer, StreamWriter) and can_take_over(
                self._socket_relay, length, request.transport, writer.transport):
            assert length is not None
            request[CLOSE_CLIENT] = True
            await take_over_request_body(request, writer, length, self, self._timeouts,
                                         self._socket_relay)
            return
        async for chunk in client_body(request, self._timeouts.source):
            await writer.write(chunk)
            self.body_bytes += len(chunk)


def close_if_taken_over(request: web.Request, response: web.StreamResponse) -> None:
    """Before a response is prepared: after an upload relayed socket to socket the connection
    carries no further request, so the response says Connection: close and it closes after."""
    if request.get(CLOSE_CLIENT):
        response.force_close()


def body_payload(request: web.Request, outgoing: Outgoing, config: Config) -> ClientBody | None:
    if not outgoing.has_body:
        return None
    return ClientBody(request, config.socket_relay,
                      Timeouts(source=config.client_timeout, sink=config.read_timeout),
                      SocketOptions.from_config(config))


async def send(session: ClientSession, upstream: Upstream, outgoing: Outgoing,
               body: ForwardedBody | None, timeout: aiohttp.ClientTimeout | None = None,
               lean: LeanPool | None = None, interim: Interim | None = None) -> UpstreamResponse:
    """Send the request and return the response once its headers arrived; errors -> 502/504.

    GETs go through the lean client when it is on (upstream/lean.py); the rest through aiohttp.
    A pooled connection the upstream closed just as it was reused (the keep-alive race) is
    retried once on another connection while no byte of the client's body has been read: aiohttp
    itself does this for idempotent methods, this covers the rest.
    """
    if lean is not None and timeout is None and body is None and can_use(outgoing, upstream):
        return await lean.send(upstream, outgoing, interim)
    url = upstream.url_for(outgoing.target)
    headers = outgoing.headers_for(upstream.authority)
    for attempt in (1, 2):
        try:
            return await session.request(outgoing.method, url, headers=headers, data=body,
                                         allow_redirects=False,
                                         timeout=timeout or session.timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            if isinstance(error, aiohttp.ClientConnectorError):
                os_error = error.os_error
                raise upstream_unreachable(upstream.authority,
                                           os_error.strerror or str(os_error)) from error
            if attempt == 1 and body is not None and not body.consumed \
                    and outgoing.method not in IDEMPOTENT:
                continue
            raise upstream_closed_early(upstream.authority, error) from error
        except aiohttp.ConnectionTimeoutError as error:
            raise upstream_connect_timeout(upstream.authority) from error
        except (TimeoutError, aiohttp.ServerTimeoutError) as error:
            raise upstream_header_timeout(upstream.authority) from error
        except aiohttp.ClientError as error:
            raise upstream_invalid(upstream.authority, error) from error
    raise AssertionError("unreachable")
