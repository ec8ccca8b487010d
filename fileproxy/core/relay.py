"""Relaying the upstream response to the client: headers as sent, body in large reads with backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

import aiohttp
from aiohttp import hdrs

from fileproxy.config import Config
from fileproxy.http.errors import ProxyError
from fileproxy.upstream.aiohttp_client import UpstreamResponse
from fileproxy.upstream.lean import LeanResponse
from fileproxy.upstream.resume import Resumer, ResumeRefused
from fileproxy.upstream.segments import SegmentedFetch, SegmentFailed
from fileproxy.upstream.socketrelay import (
    SinkGone,
    SourceCut,
    Timeouts,
    can_take_over,
    take_over_response_body,
)

log = logging.getLogger("fileproxy.core.relay")


class UpstreamCut(Exception):
    """The upstream's body ended before its length: a reset, an early FIN, a stall."""


# How a cut body may be continued, decided at the first cut (nothing is spent on the bodies,
# nearly all, that are never cut): a Resumer, or None when it cannot be.
ResumeFor = Callable[[], Resumer | None]


class Answer(Protocol):
    """Any response sent back to the client: the upstream's, relayed, or one of fileproxy's own."""

    @property
    def status(self) -> int: ...


class Relayed(Answer, Protocol):
    """The upstream's response as sent back to the client: whether it was cut short (`aborted`,
    with whose `fault` it was) and, as `body_bytes`, how much of its body went."""

    body_bytes: int
    aborted: str | None
    fault: str | None


class Streamed(Relayed, Protocol):
    """A response on its way to the client, as relay() drives it: aiohttp's (RelayedResponse) or
    the fast path's. write() returns once the client's side took the bytes (backpressure) and
    raises ConnectionError when the client is gone; flush() writes and returns once everything
    left, before the rest goes socket to socket behind it."""

    @property
    def content_length(self) -> int | None: ...

    async def write(self, data: bytes) -> None: ...

    async def flush(self, chunks: list[bytes]) -> int: ...

    async def write_eof(self) -> None: ...


# What one server path's ClientSide answers with: a whole response, a streamed one, an error.
W_co = TypeVar("W_co", bound=Relayed, covariant=True)
S_co = TypeVar("S_co", bound=Streamed, covariant=True)
E_co = TypeVar("E_co", bound=Answer, covariant=True)
W = TypeVar("W", bound=Relayed)
S = TypeVar("S", bound=Streamed)


class ClientSide(Protocol[W_co, S_co, E_co]):
    """How a response reaches the client: whole in one go, or started (headers) and then
    streamed; the type parameters are that server path's own response classes."""

    def whole(self, upstream: UpstreamResponse, body: bytes) -> W_co: ...

    async def start(self, upstream: UpstreamResponse) -> S_co: ...

    def error(self, error: ProxyError, request_id: str) -> E_co:
        """An answer of fileproxy's own (an error), as this server path sends it."""


class RelayingRequest(Protocol):
    """What relaying reads of the client's request (aiohttp's web.Request or the fast path's)."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...


async def relay(request: RelayingRequest, upstream: UpstreamResponse, config: Config,
                deadline: float | None, side: ClientSide[W, S, Answer],
                segments: SegmentedFetch | None = None, resume: ResumeFor | None = None) -> W | S:
    """The upstream's response to the client: whole when it is small and already here, else
    streamed (headers first, then the body) within the total deadline."""
    whole = arrived_whole(request, upstream)
    if whole is not None:  # (a GET's: no request body, so nothing was taken over)
        return side.whole(upstream, whole)
    response = await side.start(upstream)
    try:
        async with within(deadline):
            await relay_body(request, upstream, response, config, segments, resume)
    except TimeoutError:
        abort_client(request, response, f"total timeout of {config.total_timeout:g} s",
                     fault="timeout")
    return response


def arrived_whole(request: RelayingRequest, upstream: UpstreamResponse) -> bytes | None:
    """The body of a lean-client response that is complete already and has a Content-Length."""
    if not isinstance(upstream, LeanResponse) or not body_expected(request, upstream) \
            or hdrs.CONTENT_LENGTH not in upstream.headers:
        return None
    return upstream.content.whole()


def within(deadline: float | None) -> AbstractAsyncContextManager[object]:
    """asyncio.timeout_at, or nothing at all without a deadline (the common, cheap case)."""
    return asyncio.timeout_at(deadline) if deadline is not None else contextlib.nullcontext()


async def relay_body(request: RelayingRequest, upstream: UpstreamResponse, response: Streamed,
                     config: Config, segments: SegmentedFetch | None = None,
                     resume: ResumeFor | None = None) -> None:
    """Send the upstream's body: in segments fetched side by side when planned, else this
    response's body continued after every cut when it can be (`resume`); a body that cannot
    be completed closes the client connection instead of ending cleanly."""
    if body_expected(request, upstream):
        if segments is not None:
            try:
                await copy_body(request, segments.chunks(upstream), response,
                                config.client_timeout)
            except UpstreamCut as cut:
                abort_client(request, response, f"upstream body cut short after "
                                                f"{response.body_bytes} bytes ({cut})")
        else:
            await relay_resuming(request, upstream, response, config, resume)
    if response.aborted is None:
        await response.write_eof()


async def relay_resuming(request: RelayingRequest, first: UpstreamResponse, response: Streamed,
                         config: Config, resume: ResumeFor | None) -> None:
    """The body of `first`; after each cut, the rest on a new ranged response into the same
    client response (upstream/resume.py), until it is complete or cannot be."""
    try:
        await relay_one(request, first, response, config)
        return
    except UpstreamCut as cut:
        reason = str(cut)
    resumer = resume() if resume is not None else None
    while (rest := await continuation(request, response, resumer, reason)) is not None:
        async with rest:
            try:
                await relay_one(request, rest, response, config)
                return
            except UpstreamCut as cut:
                reason = str(cut)


async def continuation(request: RelayingRequest, response: Streamed, resumer: Resumer | None,
                       reason: str) -> UpstreamResponse | None:
    """The rest of a cut body from the upstream, or None once the client was cut instead."""
    cut = f"upstream body cut short after {response.body_bytes} bytes ({reason})"
    if resumer is None:
        abort_client(request, response, cut)
        return None
    try:
        rest = await resumer.resume(response.body_bytes)
    except ResumeRefused as error:
        abort_client(request, response, f"{cut}; not resumed: {error}")
        return None
    log.info("%s %s: %s; resumed", request.method, request.path, cut)
    return rest


async def relay_one(request: RelayingRequest, upstream: UpstreamResponse, response: Streamed,
                    config: Config) -> None:
    """One upstream response's body: socket to socket when large and of known length, else
    through the streams. UpstreamCut when it ends short."""
    length = response.content_length
    remaining = None if length is None else length - response.body_bytes
    if upstream.connection is not None and can_take_over(
            config.socket_relay, remaining, upstream.connection.transport, request.transport):
        assert length is not None
        await socket_relay(request, upstream, response, length,
                           Timeouts(source=config.read_timeout, sink=config.client_timeout),
                           config.socket_relay)
    else:
        await copy_body(request, body_chunks(upstream), response, config.client_timeout)


def body_expected(request: RelayingRequest, upstream: UpstreamResponse) -> bool:
    return request.method != hdrs.METH_HEAD and upstream.status not in (204, 304) \
        and upstream.status >= 200


async def body_chunks(upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    """What the upstream has buffered (the read size ahead, no more) as it comes."""
    while chunk := await upstream.content.readany():
        yield chunk


async def copy_body(request: RelayingRequest, chunks: AsyncIterator[bytes], response: Streamed,
                    client_timeout: float) -> None:
    """Write the body's chunks as they come; write() drains, so the upstream is never read
    faster than the client takes bytes. UpstreamCut when the chunks end short."""
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        while True:
            try:
                chunk = await anext(chunks, b"")
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                    SegmentFailed) as error:
                raise UpstreamCut(repr(error)) from None
            if not chunk:
                return
            try:
                async with asyncio.timeout(client_timeout or None):
                    await response.write(chunk)
            except ConnectionError:
                abort_client(request, response, "client went away", fault="client")
                return
            except TimeoutError:
                abort_client(request, response,
                             f"client took no bytes for {client_timeout:g} s", fault="client")
                return
            response.body_bytes += len(chunk)


async def socket_relay(request: RelayingRequest, upstream: UpstreamResponse,
                       response: Streamed, length: int, timeouts: Timeouts, mover: str) -> None:
    """Socket to socket (upstream/socketrelay.py), with the same outcomes as copy_body; `length`
    is the client response's. The upstream connection's parser never saw those bytes: a lean
    connection whose body went through to its end takes a fresh parser and is reused; any other
    is closed."""
    complete = False
    try:
        await take_over_response_body(upstream, response, length, timeouts, request.transport,
                                      response.flush, mover)
        complete = True
    except (SourceCut, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        raise UpstreamCut(str(error)) from None
    except (SinkGone, ConnectionError) as error:
        abort_client(request, response, f"client went away ({error})", fault="client")
    finally:
        if complete and isinstance(upstream, LeanResponse) and upstream.connection is not None:
            upstream.connection.body_taken_over()
        else:
            upstream.close()


def abort_client(request: RelayingRequest, response: Streamed, reason: str,
                 fault: str = "upstream") -> None:
    """Close the client connection so a Content-Length or chunked body cannot end cleanly.
    `fault` says whose it was: upstream, client or timeout."""
    response.aborted = reason
    response.fault = fault
    log.info("%s %s: %s; closing the client connection", request.method, request.path, reason)
    if request.transport is not None:
        request.transport.close()
