"""The upstream side: the one ClientSession per worker, its tuned connector, and sending one request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import ClientResponse, ClientSession, web
from aiohttp.payload import AsyncIterablePayload
from yarl import URL

from fileproxy.config import Config
from fileproxy.errors import ProxyError
from fileproxy.headers import Outgoing
from fileproxy.sockets import SocketOptions

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Upstream responses may be header-heavy (the core issue asks for ~130 fields and long cookies).
UPSTREAM_MAX_HEADERS = 1024
UPSTREAM_MAX_FIELD_SIZE = 64 * 1024
# What aiohttp would add on its own; a transparent proxy sends only what the client sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


@dataclass(frozen=True)
class Upstream:
    """One upstream server: base URL (maybe with a path prefix) and its Host authority."""

    base: str

    @property
    def url(self) -> URL:
        return URL(self.base, encoded=True)

    @property
    def authority(self) -> str:
        return self.url.raw_authority

    def url_for(self, target: str) -> URL:
        """base + the raw target, byte-for-byte: no decoding, merging of '//' or re-encoding."""
        return URL(self.base + target, encoded=True)


def make_session(config: Config) -> ClientSession:
    """The worker's one session: pooled keep-alive, no cookies, no decompression, no redirects."""
    connector = aiohttp.TCPConnector(
        limit=config.pool_size,
        limit_per_host=config.pool_size_per_host,
        keepalive_timeout=config.upstream_keepalive,
        ttl_dns_cache=config.dns_ttl,
        socket_factory=SocketOptions.from_config(config).upstream_socket_factory,
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
    )


async def client_body(request: web.Request) -> AsyncIterator[bytes]:
    """The client's body as it arrives; sends the client its 100 Continue when the upstream did."""
    if request.version >= (1, 1) and \
            request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    async for chunk in request.content.iter_any():
        yield chunk


def body_payload(request: web.Request, outgoing: Outgoing) -> AsyncIterablePayload | None:
    if not outgoing.has_body:
        return None
    return AsyncIterablePayload(client_body(request), content_type=None)


async def send(session: ClientSession, upstream: Upstream, outgoing: Outgoing,
               body: AsyncIterablePayload | None) -> ClientResponse:
    """Send the request and return the response once its headers arrived; errors -> 502/504.

    A pooled connection the upstream closed just as it was reused (the keep-alive race) is
    retried once on another connection while no byte of the client's body has been read: aiohttp
    itself does this for idempotent methods, this covers the rest.
    """
    url = upstream.url_for(outgoing.target)
    for attempt in (1, 2):
        try:
            return await session.request(outgoing.method, url, headers=outgoing.headers,
                                         data=body, allow_redirects=False)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            if isinstance(error, aiohttp.ClientConnectorError):
                raise unreachable(upstream, error) from error
            if attempt == 1 and body is not None and not body.consumed \
                    and outgoing.method not in IDEMPOTENT:
                continue
            raise ProxyError(502, f"Bad Gateway: upstream {upstream.authority} closed the "
                                  f"connection before responding ({error})") from error
        except aiohttp.ConnectionTimeoutError as error:
            raise ProxyError(504, f"Gateway Timeout: connecting to upstream {upstream.authority} "
                                  "timed out") from error
        except (TimeoutError, aiohttp.ServerTimeoutError) as error:
            raise ProxyError(504, f"Gateway Timeout: upstream {upstream.authority} sent no "
                                  "response headers within the read timeout") from error
        except aiohttp.ClientError as error:
            raise ProxyError(502, f"Bad Gateway: invalid response from upstream "
                                  f"{upstream.authority} ({error})") from error
    raise AssertionError("unreachable")


def unreachable(upstream: Upstream, error: aiohttp.ClientConnectorError) -> ProxyError:
    reason = error.os_error.strerror or str(error.os_error)
    return ProxyError(502, f"Bad Gateway: upstream {upstream.authority} unreachable ({reason})")
