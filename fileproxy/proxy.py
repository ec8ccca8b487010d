"""The proxy handler: the whole request path, top to bottom, in one place."""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from fileproxy.accesslog import EXCHANGE, Exchange
from fileproxy.errors import ProxyError
from fileproxy.headers import check_request, outgoing_request
from fileproxy.keys import CONFIG, SESSION, UPSTREAMS
from fileproxy.streaming import relay_response
from fileproxy.upstream import body_payload, send

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    loop = asyncio.get_running_loop()
    exchange = request[EXCHANGE] = Exchange(request_id_for(request), loop.time())
    body = None
    try:
        # 1. validate and build the upstream request (4xx here never reaches an upstream)
        target = check_request(request, config)
        # 2. choose an upstream
        upstream = request.app[UPSTREAMS][0]
        exchange.upstream = upstream.authority
        outgoing = outgoing_request(request, config, target, exchange.request_id,
                                    upstream.authority)
        # 3. send it; the body streams (or is spliced) from the client as it arrives
        body = body_payload(request, outgoing, config.splice)
        upstream_response = await send(request.app[SESSION], upstream, outgoing, body)
    except ProxyError as error:
        exchange.outcome = "refused" if error.status < 500 else "upstream_error"
        exchange.detail = error.message
        return error.response(exchange.request_id)
    finally:
        exchange.bytes_in = body.body_bytes if body is not None else 0
    exchange.ttfb = loop.time() - exchange.started
    # 4. stream the response back with backpressure; a cut body aborts the client connection
    async with upstream_response:
        response = await relay_response(request, upstream_response, config)
    if response.aborted:
        exchange.outcome, exchange.detail = "aborted", response.aborted
    return response


_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count(1)


def request_id_for(request: web.Request) -> str:
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
