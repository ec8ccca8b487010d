"""Reading a client's request body as it arrives, and cutting off a client that stalls mid-body."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from fileproxy.http.headers import send_interim

log = logging.getLogger("fileproxy.http.clientbody")


CONTINUED = web.RequestKey("continued", bool)


async def send_100_continue(request: web.Request) -> None:
    """A client that sent `Expect: 100-continue` is told to send its body (once): when the
    upstream asks for it, or when fileproxy itself takes the body (an async task, an upload)."""
    if request.get(CONTINUED):
        return
    request[CONTINUED] = True
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await send_interim(request.writer, 100, [])


class ClientStalled(ConnectionError):
    """The client sent no body byte for the client timeout; its connection has been closed."""


async def client_body(request: web.Request, timeout: float,
                      close_on_stall: bool = True) -> AsyncIterator[bytes]:
    """The body in the pieces it arrives in. A client silent for `timeout` seconds mid-body
    (0: no limit) has its connection closed, as nginx's client_body_timeout does, so a stalled
    upload cannot hold a slot, an upstream connection or an upload lock for ever (the caller
    closes it itself, after keeping what arrived, with `close_on_stall` False)."""
    await send_100_continue(request)
    content = request.content
    while True:
        try:
            async with asyncio.timeout(timeout or None):
                chunk = await content.readany()
        except TimeoutError:
            log.info("%s %s: the client sent no body bytes for %g s; closing its connection",
                     request.method, request.path, timeout)
            if close_on_stall and request.transport is not None:
                request.transport.close()
            raise ClientStalled(f"no body bytes for {timeout:g} s") from None
        if not chunk:
            return
        yield chunk
