"""The request path for every server adapter: checks, route, admission, choose and send with retries
(breaker bookkeeping), relay, the exchange record."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import aiohttp
from aiohttp import HttpVersion, web

from fileproxy.core.checks import RequestHead, check_request
from fileproxy.core.exchange import Exchange
from fileproxy.core.keys import ADMISSION, CONFIG, LEAN, METRICS, RETRY, SESSION, UPSTREAMS
from fileproxy.core.relay import (
    Answer,
    ClientSide,
    Relayed,
    RelayingRequest,
    ResumeFor,
    S,
    W,
    relay,
    within,
)
from fileproxy.core.routing import Route, route
from fileproxy.features.signing import verified_target
from fileproxy.http.errors import ProxyError
from fileproxy.http.headers import (
    ClientRequest,
    Outgoing,
    interim_head,
    outgoing_request,
    peer_address,
)
from fileproxy.policy.balancing import Upstream
from fileproxy.upstream.adaptive import AdaptiveFetch, SegmentSpool, adaptive_plan, path_rtt
from fileproxy.upstream.aiohttp_client import ForwardedBody, UpstreamResponse, send
from fileproxy.upstream.lean import Interim
from fileproxy.upstream.resume import Resumer, resumable_span
from fileproxy.upstream.segments import SegmentedFetch, plan_for


class ServedRequest(ClientRequest, RequestHead, RelayingRequest, Protocol):
    """What the request path reads of a request a server adapter parsed."""


R = TypeVar("R", bound=Relayed)
E = TypeVar("E", bound=Answer)  # a server path's error responses (ClientSide.error)
A = TypeVar("A", bound=Answer)
# fileproxy's own answers that are not the upstream's: legacy endpoints, async task submission.
Elsewhere = Callable[[Route, Outgoing], Awaitable[A]]
Respond = Callable[[UpstreamResponse, float | None, "BodyFetch"], Awaitable[R]]


@dataclass(frozen=True)
class BodyFetch:
    """How the rest of a response's body may be had: in segments side by side, or continued
    after a cut (resume, asked only once a cut happens); neither for most responses."""

    segments: SegmentedFetch | None = None
    resume: ResumeFor | None = None


async def serve_request(app: web.Application, request: ServedRequest, side: ClientSide[W, S, E],
                        exchange: Exchange,
                        body_for: Callable[[Outgoing], ForwardedBody | None],
                        elsewhere: Elsewhere[A] | None = None) -> W | S | E | A:
    """The request path, whichever server adapter parsed the request: 1 checks and signed links
    (a 4xx here never reaches an upstream), 2 route, 3 admission, 4-5 forward and relay, 6 metrics.
    fileproxy's own answers (errors, legacy endpoints, tasks) go back through the same side."""
    config = app[CONFIG]
    metrics = app[METRICS]
    metrics.started_one()
    try:
        target = verified_target(request.method, check_request(request, config), config)
        outgoing = outgoing_request(request, config, target, exchange.request_id)
        where = route(request.method, request.path, request.headers, config)
        if where is not Route.FORWARD:
            if elsewhere is None:
                raise AssertionError(f"{where} reached a server adapter that cannot answer it")
            answer = await elsewhere(where, outgoing)
            exchange.status = answer.status
            return answer
        # admission: a slot, a short bounded wait for one, or 503 at once
        async with app[ADMISSION].slot(peer_address(request) or "-"):
            return await forward_with(
                app, outgoing, body_for(outgoing), exchange,
                interim_relay(request.version, request.transport),
                lambda upstream, deadline, fetch: relay(request, upstream, config, deadline,
                                                        side, fetch.segments, fetch.resume))
    except ProxyError as error:
        exchange.fail(error)
        return side.error(error, exchange.request_id)
    except asyncio.CancelledError:  # the client went away (its connection closed)
        exchange.outcome, exchange.detail = "client_aborted", "client went away"
        raise
    finally:
        metrics.finished(exchange, time.monotonic() - exchange.started)


async def forward_with(app: web.Application, outgoing: Outgoing, body: ForwardedBody | None,
                       exchange: Exchange, interim: Interim | None,
                       respond: Respond[R]) -> R:
    """3-5: choose an upstream and send (retrying while safe), then `respond` streams the
    response back to the client (aiohttp's response machinery, or the fast path's own)."""
    config = app[CONFIG]
    deadline = total_deadline(config.total_timeout, exchange)
    try:
        async with within(deadline):
            upstream, upstream_response = await send_with_retries(
                app, outgoing, body, exchange, interim=interim)
    except TimeoutError:
        app[METRICS].upstream_error(exchange.upstream, "total_timeout")
        raise ProxyError(504, f"Gateway Timeout: no response within the total timeout of "
                              f"{config.total_timeout:g} s", kind="total_timeout") from None
    finally:
        exchange.bytes_in = body.body_bytes if body is not None else 0
    exchange.ttfb = time.monotonic() - exchange.started
    segments = segmented(app, upstream, outgoing, upstream_response)
    relaying = Relaying(upstream)
    resume = None if segments else functools.partial(resuming, app, relaying, outgoing,
                                                     upstream_response, exchange)
    try:
        async with upstream_response:
            response = await respond(upstream_response, deadline, BodyFetch(segments, resume))
    finally:
        relaying.upstream.end()
    exchange.relayed(response)
    if response.fault == "upstream":
        upstream.record(failed=True)
    return response


async def send_with_retries(app: web.Application, outgoing: Outgoing,
                            body: ForwardedBody | None, exchange: Exchange,
                            timeout: aiohttp.ClientTimeout | None = None,
                            interim: Interim | None = None,
                            avoid: Upstream | None = None) -> tuple[Upstream, UpstreamResponse]:
    """One attempt per upstream while the policy allows: transport failures (connect errors,
    resets and timeouts before headers) and the statuses the operator listed count against the
    upstream's breaker and are retried when safe, on another upstream when there is one (after a
    timeout only there: the same upstream would only make the client wait as long again).
    Returns the upstream, still counted in flight, and its response. `avoid` (an upstream that
    just failed) is chosen only when no other can be.
    (Async tasks run through here too, with a stored body.)"""
    upstreams, policy = app[UPSTREAMS], app[RETRY]
    policy.budget.record_request()
    tried: set[Upstream] = {avoid} if avoid is not None else set()
    while True:
        upstream = upstreams.choose(exclude=tried)
        tried.add(upstream)
        exchange.upstream = upstream.authority
        upstream.begin()
        try:
            response = await send(app[SESSION], upstream, outgoing, body, timeout, app.get(LEAN),
                                  interim)
        except ProxyError as error:
            upstream.end()
            upstream.record(failed=True)
            app[METRICS].upstream_error(upstream.authority, error.kind)
            if not policy.may_retry(exchange.retries, reached_upstream=error.reached_upstream,
                                    method=outgoing.method, timed_out=error.kind == "timeout",
                                    another_upstream=upstreams.has_another(tried),
                                    **body_state(body)):
                raise
        except BaseException:
            upstream.abandon()  # cancelled before an answer: a half-open probe slot goes back
            raise
        else:
            failed = response.status in policy.statuses
            upstream.record(failed)
            if failed:
                app[METRICS].upstream_error(upstream.authority, f"status_{response.status}")
            if not failed or not policy.may_retry(
                    exchange.retries, reached_upstream=True, method=outgoing.method,
                    timed_out=False, another_upstream=upstreams.has_another(tried),
                    **body_state(body)):
                return upstream, response
            response.release()
            upstream.end()
        exchange.retries += 1
        await asyncio.sleep(policy.backoff(exchange.retries))


@contextlib.asynccontextmanager
async def sent_later(app: web.Application, outgoing: Outgoing, body: ForwardedBody | None,
                     request_id: str, timeout: aiohttp.ClientTimeout, client: str
                     ) -> AsyncIterator[tuple[Upstream, aiohttp.ClientResponse]]:
    """The request path for work run later (async tasks, upload deliveries): admission, then
    send with retries; on exit the response is released and the upstream's slot given back."""
    exchange = Exchange(request_id, time.monotonic())
    async with app[ADMISSION].slot(client):
        upstream, response = await send_with_retries(app, outgoing, body, exchange,
                                                     timeout=timeout)
        try:
            # A request with a timeout of its own never takes the lean client (send): aiohttp's.
            assert isinstance(response, aiohttp.ClientResponse)
            yield upstream, response
        finally:
            response.release()
            upstream.end()


def segmented(app: web.Application, upstream: Upstream, outgoing: Outgoing,
              response: UpstreamResponse) -> SegmentedFetch | None:
    """--upstream-segments: the rest of a large body fetched as ranges from the same upstream,
    on N connections, or (auto) on as many as raise the goodput."""
    config, metrics = app[CONFIG], app[METRICS]

    def fetch(ranged: Outgoing) -> Awaitable[UpstreamResponse]:
        return send(app[SESSION], upstream, ranged, None, None, app.get(LEAN))

    plan = plan_for(config, outgoing, response)
    if plan is not None:
        return SegmentedFetch(plan, outgoing, fetch)
    plan = adaptive_plan(config, outgoing, response)
    if plan is None:
        return None
    spool = SegmentSpool(Path(config.spool_dir) / "segments", config.segment_spool,
                         config.segment_size) if config.segment_spool else None

    def report(most: int, twice: int) -> None:
        metrics.segment_connections.observe(most)
        metrics.fetched_twice.inc(twice)

    return AdaptiveFetch(plan, outgoing, fetch, path_rtt(response), report=report, spool=spool)


@dataclass
class Relaying:
    """The upstream whose body the relay reads, counted in flight until the relay ends (a
    resume moves that to the upstream that answered for the rest)."""

    upstream: Upstream

    def move_to(self, upstream: Upstream) -> None:
        self.upstream.end()
        self.upstream = upstream


def resuming(app: web.Application, relaying: Relaying, outgoing: Outgoing,
             response: UpstreamResponse, exchange: Exchange) -> Resumer | None:
    """Mid-body resume for a response that can be continued (--upstream-resume-attempts): the
    rest is asked for through the request path's own choice and retries, another upstream than
    the one that failed first."""
    config, metrics = app[CONFIG], app[METRICS]
    span = resumable_span(outgoing, response)
    if span is None or not config.upstream_resume_attempts:
        return None

    async def fetch(ranged: Outgoing) -> UpstreamResponse:
        chosen, rest = await send_with_retries(app, ranged, None, exchange,
                                               avoid=relaying.upstream)
        relaying.move_to(chosen)
        return rest

    return Resumer(span, outgoing, fetch, config.upstream_resume_attempts,
                   count=lambda outcome: metrics.resumes.labels(outcome).inc())


def interim_relay(version: HttpVersion, transport: asyncio.Transport | None) -> Interim | None:
    """Pass 1xx interim responses such as 103 Early Hints (RFC 9110 15.2) to an HTTP/1.1 or
    HTTP/2 client ahead of the final one (as bytes, or as the transport of an HTTP/2 stream
    sends them: a HEADERS frame); 100 Continue is between the proxy and each side."""
    if version < (1, 1) or transport is None:
        return None
    send = getattr(transport, "write_interim", None) or \
        (lambda status, headers: transport.write(interim_head(status, headers)))

    def relay(status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status not in (100, 101) and not transport.is_closing():
            send(status, headers)

    return relay


def total_deadline(total_timeout: float, exchange: Exchange) -> float | None:
    """The loop-clock deadline of the whole exchange, or None without a total timeout."""
    if not total_timeout:
        return None
    elapsed = time.monotonic() - exchange.started
    return asyncio.get_running_loop().time() + total_timeout - elapsed


def body_state(body: ForwardedBody | None) -> dict[str, bool]:
    return {"has_body": body is not None, "body_sent": body is not None and body.sent,
            "replayable": body is None or body.replayable}
