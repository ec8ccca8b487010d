"""The proxy handler: the whole request path, top to bottom, in one place."""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, cast

import aiohttp
from aiohttp import HttpVersion, web

from fileproxy.accesslog import EXCHANGE, Exchange
from fileproxy.errors import ProxyError
from fileproxy.headers import (
    ClientRequest,
    Outgoing,
    check_request,
    interim_head,
    outgoing_request,
    peer_address,
)
from fileproxy.keys import ADMISSION, CONFIG, LEAN, METRICS, RETRY, SESSION, TASKS, UPSTREAMS
from fileproxy.lean import Interim
from fileproxy.segments import SegmentedFetch, plan_for
from fileproxy.state import StateUnavailable
from fileproxy.streaming import AiohttpSide, Streamed, relay, within
from fileproxy.tasks import task_unavailable
from fileproxy.upstream import ForwardedBody, UpstreamResponse, body_payload, close_if_spliced, send
from fileproxy.upstreams import Upstream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Relayed(Protocol):
    """What a response sent back to the client reports: its status, whether it was cut short
    (`aborted`, with whose `fault` it was) and, as `body_bytes`, how much of it went."""

    status: int
    aborted: str | None
    fault: str | None


R = TypeVar("R", bound=Relayed)
Respond = Callable[[UpstreamResponse, float | None, "SegmentedFetch | None"], Awaitable[R]]
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app[CONFIG]
    exchange = request[EXCHANGE] = Exchange(request_id_for(request), time.monotonic())
    metrics = app[METRICS]
    metrics.started_one()
    try:
        # 1. validate and build the upstream request (4xx here never reaches an upstream)
        target = check_request(request, config)
        outgoing = outgoing_request(request, config, target, exchange.request_id)
        # (async task mode: store it, answer 202, run it later on any worker)
        if app[TASKS].wants_async(request):
            return await submit_task(request, outgoing, exchange)
        # 2. admission: a slot, a short bounded wait for one, or 503 at once
        async with app[ADMISSION].slot(peer_address(request) or "-"):
            return await forward(request, outgoing, exchange)  # --total-timeout inside
    except ProxyError as error:
        exchange.fail(error)
        response = error.response(exchange.request_id)
        close_if_spliced(request, response)
        return response
    finally:
        # 6. metrics (the access log line is written by aiohttp once the response is sent)
        metrics.finished(exchange, time.monotonic() - exchange.started)


async def submit_task(request: web.Request, outgoing: Outgoing,
                      exchange: Exchange) -> web.StreamResponse:
    try:
        response = await request.app[TASKS].submit(request, outgoing,
                                                    peer_address(request) or "-")
    except StateUnavailable as error:
        exchange.outcome, exchange.detail = "rejected", str(error)
        return task_unavailable(error)
    exchange.status = response.status
    return response


async def forward(request: web.Request, outgoing: Outgoing,
                  exchange: Exchange) -> web.StreamResponse:
    """3-5 for a request aiohttp parsed: the body streams up, the response goes back through
    aiohttp's response machinery (streaming.relay)."""
    config = request.app[CONFIG]
    body = body_payload(request, outgoing, config)

    async def respond(upstream_response: UpstreamResponse, deadline: float | None,
                      segments: SegmentedFetch | None) -> Streamed:
        return await relay(request, upstream_response, config, deadline, AiohttpSide(request),
                           segments)

    response = await forward_with(request.app, outgoing, body, exchange,
                                  interim_relay(request.version, request.transport), respond)
    return cast(web.StreamResponse, response)  # AiohttpSide's responses are aiohttp's


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
    try:
        async with upstream_response:
            response = await respond(upstream_response, deadline, segments)
    finally:
        upstream.end()
    exchange.relayed(response)
    if response.fault == "upstream":
        upstream.record(failed=True)
    return response


async def send_with_retries(app: web.Application, outgoing: Outgoing,
                            body: ForwardedBody | None, exchange: Exchange,
                            timeout: aiohttp.ClientTimeout | None = None,
                            interim: Interim | None = None) -> tuple[Upstream, UpstreamResponse]:
    """One attempt per upstream while the policy allows: connect errors, resets before headers and
    the retry statuses count against the upstream's breaker and are retried when safe, on another
    upstream when there is one. Returns the upstream, still counted in flight, and its response.
    (Async tasks run through here too, with a stored body.)"""
    upstreams, policy = app[UPSTREAMS], app[RETRY]
    policy.budget.record_request()
    tried: set[Upstream] = set()
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
                                    method=outgoing.method, **body_state(body)):
                raise
        except BaseException:
            upstream.end()
            raise
        else:
            failed = response.status in policy.statuses
            upstream.record(failed)
            if failed:
                app[METRICS].upstream_error(upstream.authority, f"status_{response.status}")
            if not failed or not policy.may_retry(exchange.retries, reached_upstream=True,
                                                  method=outgoing.method, **body_state(body)):
                return upstream, response
            response.release()
            upstream.end()
        exchange.retries += 1
        await asyncio.sleep(policy.backoff(exchange.retries))


def segmented(app: web.Application, upstream: Upstream, outgoing: Outgoing,
              response: UpstreamResponse) -> SegmentedFetch | None:
    """--upstream-segments: the rest of a large body fetched as ranges from the same upstream."""
    plan = plan_for(app[CONFIG], outgoing, response)
    if plan is None:
        return None

    def fetch(ranged: Outgoing) -> Awaitable[UpstreamResponse]:
        return send(app[SESSION], upstream, ranged, None, None, app.get(LEAN))

    return SegmentedFetch(plan, outgoing, fetch)


def interim_relay(version: HttpVersion, transport: asyncio.Transport | None) -> Interim | None:
    """Pass 1xx interim responses such as 103 Early Hints (RFC 9110 15.2) to an HTTP/1.1 client
    ahead of the final one; 100 Continue is between the proxy and each side."""
    if version < (1, 1) or transport is None:
        return None

    def relay(status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status not in (100, 101) and not transport.is_closing():
            transport.write(interim_head(status, headers))

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


_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count(1)


def request_id_for(request: ClientRequest) -> str:
    """The client's X-Request-Id when it is a sane token, else this worker's random prefix and a
    counter (unique without a syscall per request)."""
    incoming = request.headers.get("X-Request-Id", "")
    if incoming and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


async def defer_expect(request: web.Request) -> None:
    """Send no early 100 Continue: the client gets one when the upstream asks for the body."""


@web.middleware
async def route_every_target(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Targets the router cannot place (CONNECT authority-form, '*') go to the proxy handler,
    which refuses them with a reason instead of a bare 404."""
    if request.match_info.http_exception is not None:
        return await proxy_handler(request)
    return await handler(request)
