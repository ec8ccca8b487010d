"""What a request may be (RFC 9112 request line, version, Host, field syntax, framing, limits, target
policy), decided once for every server path: a refusal here never reaches an upstream."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Protocol

from yarl import URL

from fileproxy.config import Config
from fileproxy.http.errors import ProxyError
from fileproxy.http.targets import TOKEN, check_dot_segments

# RFC 9112 3: method SP request-target SP HTTP-version CRLF, single spaces, no control bytes.
REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e\x80-\xff]+ HTTP/[0-9]\.[0-9]\r\n")
SUPPORTED_VERSIONS = frozenset({(1, 0), (1, 1)})
HTTP2 = (2, 0)
# The largest length a backend that keeps lengths in signed 64 bits can parse (nginx's limit too).
MAX_CONTENT_LENGTH = 2**63 - 1
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class RequestHead(Protocol):
    """What the checks read of a parsed request: aiohttp's web.Request or the fast path's."""

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str: ...

    @property
    def version(self) -> tuple[int, int]: ...

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...


def check_request_line(line: bytes) -> None:
    """The request line as it came on the wire (server adapters whose parser is lenient)."""
    if not REQUEST_LINE.fullmatch(line):
        raise ProxyError(400, "Bad Request: malformed request line (RFC 9112 3: method, one "
                              "space, target, one space, HTTP version)", close=True)


def check_request(head: RequestHead, config: Config) -> str:
    """Refuse what must never reach an upstream; return the origin-form target to send."""
    check_version(head.version, over_http2(head.transport))
    if head.method == "CONNECT":
        raise ProxyError(405, "Method Not Allowed: CONNECT is refused; fileproxy is a reverse "
                              "proxy, not a forward proxy", close=True,
                         headers={"Allow": ALLOWED_METHODS})
    host = check_fields(head.raw_headers, head.version, config)
    return request_target(head.raw_path, host)


def check_version(version: tuple[int, int], framed_as_http2: bool = False) -> None:
    """HTTP/1.0 and 1.1, and HTTP/2 when it came in HTTP/2 frames (not in a request line)."""
    accepted = tuple(version) == HTTP2 if framed_as_http2 else \
        tuple(version) in SUPPORTED_VERSIONS
    if not accepted:
        raise ProxyError(505, f"HTTP Version Not Supported: HTTP/{version[0]}.{version[1]}; "
                              "fileproxy speaks HTTP/1.0 and HTTP/1.1, and HTTP/2 in HTTP/2 "
                              "frames", close=True)


def over_http2(transport: asyncio.Transport | None) -> bool:
    """Did the request come on an HTTP/2 stream (server/h2server.py's transport says so)?"""
    return transport is not None and transport.get_extra_info("h2_stream") is not None


def check_fields(raw_headers: Sequence[tuple[bytes, bytes]], version: tuple[int, int],
                 config: Config) -> str | None:
    """Field names are tokens and values UTF-8, within the limits; one Host (HTTP/1.1 needs it,
    RFC 9112 3.2); framing that cannot be read two ways (RFC 9112 6.3). Returns the Host."""
    if len(raw_headers) > config.max_headers:
        raise ProxyError(431, f"Request Header Fields Too Large: {len(raw_headers)} fields, the "
                              f"limit is {config.max_headers}")
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    size = 0
    for name, value in raw_headers:
        size += len(name) + len(value) + 4
        check_field(name, value)
        lowered = name.lower()
        if lowered == b"host":
            hosts.append(value)
        elif lowered == b"content-length":
            lengths.append(value)
        elif lowered == b"transfer-encoding":
            codings.append(value)
    if size > config.max_header_size:
        raise ProxyError(431, f"Request Header Fields Too Large: {size} bytes, the limit is "
                              f"{config.max_header_size}")
    check_framing(lengths, codings, version)
    return check_host(hosts, version)


def check_field(name: bytes, value: bytes, _valid_names: set[bytes] = set()) -> None:  # noqa: B006
    """A token name (names already seen valid are remembered: requests repeat the same few),
    a value that is UTF-8."""
    if name not in _valid_names:
        if not TOKEN.fullmatch(name):
            raise ProxyError(400, f"Bad Request: invalid header field name {name[:64]!r}",
                             close=True)
        if len(_valid_names) < 4096:
            _valid_names.add(name)
    if not value.isascii():
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyError(400, f"Bad Request: the value of {name.decode()} is not valid "
                                  "UTF-8", close=True) from None


def check_host(hosts: list[bytes], version: tuple[int, int]) -> str | None:
    if len(hosts) > 1 or (not hosts and tuple(version) >= (1, 1)):
        raise ProxyError(400, "Bad Request: an HTTP/1.1 request needs exactly one Host header "
                              f"(RFC 9112 3.2); this one has {len(hosts)}", close=True)
    return hosts[0].decode() if hosts else None


def check_framing(lengths: list[bytes], codings: list[bytes], version: tuple[int, int]) -> None:
    """Request-smuggling shapes: Content-Length with Transfer-Encoding, lengths that disagree or
    do not fit 63 bits, a coding other than chunked last, Transfer-Encoding in HTTP/1.0."""
    if codings:
        if lengths:
            raise ProxyError(400, "Bad Request: both Content-Length and Transfer-Encoding "
                                  "were sent", close=True)
        if tuple(version) < (1, 1):
            raise ProxyError(400, "Bad Request: Transfer-Encoding in an HTTP/1.0 request",
                             close=True)
        last = b",".join(codings).split(b",")[-1].strip().lower()
        if last != b"chunked":
            raise ProxyError(400, "Bad Request: the last transfer coding must be chunked",
                             close=True)
    values = {part.strip() for value in lengths for part in value.split(b",")}
    if len(values) > 1:
        raise ProxyError(400, "Bad Request: conflicting Content-Length values", close=True)
    for value in values:
        if not value.isdigit() or int(value) > MAX_CONTENT_LENGTH:
            raise ProxyError(400, f"Bad Request: Content-Length {value[:32]!r} is not a length "
                                  f"up to {MAX_CONTENT_LENGTH}", close=True)


def request_target(raw: str, host: str | None) -> str:
    """The target exactly as received; absolute-form only when it names this host; never one
    whose dot-segments climb above the root."""
    if raw.startswith("/"):
        target = raw
    elif raw.startswith(("http://", "https://")):
        url = URL(raw, encoded=True)
        if url.raw_authority.lower() != (host or "").lower():
            raise ProxyError(400, f"Bad Request: absolute-form target for "
                                  f"{url.raw_authority!r} refused; fileproxy is a reverse "
                                  "proxy, not an open proxy")
        target = url.raw_path_qs or "/"
    else:
        raise ProxyError(400, f"Bad Request: unsupported request target form {raw[:64]!r}")
    check_dot_segments(target)
    return target
