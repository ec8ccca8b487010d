"""The floor: a naive aiohttp proxy (a session per request, 16 KiB reads), as people first write one."""

from __future__ import annotations

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}


def make_app(upstream: str) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with aiohttp.ClientSession(auto_decompress=False) as session, session.request(
                request.method, upstream + request.path_qs, headers=headers,
                data=request.content if request.body_exists else None) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status)
            for name, value in upstream_response.headers.items():
                if name.lower() not in HOP:
                    response.headers[name] = value
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_chunked(16384):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=1 << 40)
    app.router.add_route("*", "/{path:.*}", handler)
    return app
