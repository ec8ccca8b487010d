"""Header rewriting in both directions (hop-by-hop out, Via and X-Forwarded-* in)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import HttpVersion, hdrs
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from fileproxy.config import Config

if TYPE_CHECKING:
    from fileproxy.upstream.aiohttp_client import UpstreamResponse

# RFC 9110 7.6.1 and the de-facto ones every proxy strips.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate",
})
# Framing is decided by the proxy on each side, never copied (aiohttp issue 13431).
RESPONSE_FRAMING = frozenset({"content-length", "transfer-encoding"})
# Request headers fileproxy sets itself (Host per --host-header, the forwarding ones).
SET_BY_PROXY = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via",
                          "x-request-id", "host"})
REQUEST_DROP = HOP_BY_HOP | SET_BY_PROXY
RESPONSE_DROP = HOP_BY_HOP | RESPONSE_FRAMING


class ClientRequest(Protocol):
    """What building the upstream request reads of a client's request: aiohttp's web.Request,
    or the fast path's (fileproxy/fastpath.py)."""

    @property
    def method(self) -> str: ...

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]: ...

    @property
    def version(self) -> HttpVersion: ...

    @property
    def scheme(self) -> str: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def body_exists(self) -> bool: ...


@dataclass(frozen=True)
class Outgoing:
    """What goes upstream: method, raw target (path and query, byte-for-byte) and headers; Host
    is the client's when preserved, else the chosen upstream's."""

    method: str
    target: str
    headers: CIMultiDict[str]
    has_body: bool
    host: str | None

    def headers_for(self, upstream_authority: str) -> CIMultiDict[str]:
        headers = self.headers.copy()
        headers[hdrs.HOST] = self.host or upstream_authority
        return headers


def end_to_end(headers: CIMultiDict[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Drop `drop` and the headers named in Connection, in place; order and repeats stay."""
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            headers.popall(token.strip(), None)
    for name in drop:
        headers.popall(name, None)
    return headers


# ---------------------------------------------------------------- request side

def parser_limit(config: Config) -> int:
    """aiohttp's hard limit on a request line or header field: above fileproxy's own, so that
    check_header_limits answers 431 with a reason; the fast path hands longer ones to aiohttp."""
    return max(8190, 2 * config.max_header_size)


def outgoing_request(request: ClientRequest, config: Config, target: str,
                     request_id: str) -> Outgoing:
    headers = end_to_end(CIMultiDict(request.headers), REQUEST_DROP)
    add_forwarding(headers, request, config, request_id)
    client_host = request.headers.get(hdrs.HOST) if config.host_header == "preserve" else None
    return Outgoing(method=request.method, target=target, headers=headers,
                    has_body=request.body_exists, host=client_host)


def add_forwarding(headers: CIMultiDict[str], request: ClientRequest, config: Config,
                   request_id: str) -> None:
    """Via, X-Forwarded-For (appended to), -Proto and -Host (kept only when trusted)."""
    incoming = request.headers
    peer = peer_address(request)
    chain = ", ".join([*incoming.getall("X-Forwarded-For", []), peer]) if peer else None
    if chain:
        headers["X-Forwarded-For"] = chain
    trusted = config.trust_forwarded
    proto = incoming.get("X-Forwarded-Proto") if trusted else None
    headers["X-Forwarded-Proto"] = proto or request.scheme
    forwarded_host = incoming.get("X-Forwarded-Host") if trusted else None
    if forwarded_host or incoming.get(hdrs.HOST):
        headers["X-Forwarded-Host"] = forwarded_host or incoming[hdrs.HOST]
    vias = incoming.getall(hdrs.VIA, [])
    if config.via:
        vias.append(f"{version_text(request.version)} {config.via}")
    if vias:
        headers[hdrs.VIA] = ", ".join(vias)
    headers["X-Request-Id"] = request_id


def version_text(version: HttpVersion) -> str:
    """As Via writes a protocol version (RFC 9110 7.6.3): 1.0, 1.1, 2."""
    return str(version.major) if version.major >= 2 else f"{version.major}.{version.minor}"


def peer_address(request: ClientRequest) -> str | None:
    """The client's IP address: aiohttp reads the peer once per request (request.remote); asking
    the transport again would be another getpeername() system call."""
    return request.remote or None


# ---------------------------------------------------------------- response side

NO_BODY_STATUSES = frozenset({204, 304})


def no_body(outgoing: Outgoing) -> None:
    """The fast path serves requests without a body."""
    return None


def http_date(_cache: list[Any] = [0, ""]) -> str:  # noqa: B006 - the per-second cache
    """The Date header value, formatted once per second."""
    now = int(time.time())
    if _cache[0] != now:
        _cache[0], _cache[1] = now, formatdate(now, usegmt=True)
    return str(_cache[1])



def response_headers(upstream: UpstreamResponse) -> CIMultiDict[str]:
    """The upstream's end-to-end response headers in order, framing headers left to the proxy."""
    return end_to_end(CIMultiDict(upstream.headers), RESPONSE_DROP)


def response_length(upstream: UpstreamResponse) -> int | None:
    """The body length to announce downstream, or None to stream it chunked."""
    if "chunked" in upstream.headers.get(hdrs.TRANSFER_ENCODING, "").lower():
        return None
    length = upstream.headers.get(hdrs.CONTENT_LENGTH)
    return int(length) if length is not None and length.isdigit() else None


async def send_interim(writer: AbstractStreamWriter, status: int,
                       headers: list[tuple[bytes, bytes]]) -> None:
    """A 1xx interim response ahead of the final one: as HTTP/1.1 bytes, or as the writer sends
    it itself (an HTTP/2 stream's writer: a HEADERS frame)."""
    own = getattr(writer, "write_interim", None)
    if own is not None:
        await own(status, headers)
    else:
        await writer.write(interim_head(status, headers))
    writer.output_size = 0  # (the final response's bytes are what is counted)


def interim_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A 1xx interim response (such as 103 Early Hints) as it goes to the client, hop-by-hop
    headers removed."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Informational"
    lines = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in headers
              if name.decode("latin-1").lower() not in HOP_BY_HOP]
    lines.append(b"\r\n")
    return b"".join(lines)
