"""CORS for the upload and task endpoints (--cors-origin): preflights answered, fileproxy's and tus's
headers exposed, so a page on another origin (tus-js-client in a browser, Uppy) can upload."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from fileproxy.core.keys import CONFIG
from fileproxy.http.responses import QuietResponse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METHODS = "GET, HEAD, POST, PATCH, DELETE, OPTIONS"
ALLOWED_HEADERS = ("Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Metadata, "
                   "Upload-Offset, Upload-Checksum, Upload-Defer-Length, Upload-Concat, "
                   "Upload-Complete, Upload-Draft-Interop-Version, Fileproxy-Upload-Token, "
                   "X-Request-Id, "
                   "X-HTTP-Method-Override, Prefer")
EXPOSED_HEADERS = ("Location, Upload-Offset, Upload-Length, Upload-Expires, Upload-Metadata, "
                   "Upload-Complete, Upload-Limit, Upload-Draft-Interop-Version, Tus-Version, "
                   "Tus-Resumable, Tus-Max-Size, Tus-Extension, Tus-Checksum-Algorithm, "
                   "X-Request-Id, Retry-After, Preference-Applied, Fileproxy-Delivery, "
                   "Fileproxy-Delivery-Status, "
                   "Fileproxy-Upstream-Status")


def allowed_origin(origin: str, allowed: tuple[str, ...]) -> str | None:
    """The Access-Control-Allow-Origin value for this Origin, or None when it may not."""
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


def cors_paths(prefix: str) -> tuple[str, str]:
    return f"{prefix}/uploads", f"{prefix}/tasks"


def origin_allowed_here(request: web.Request) -> str | None:
    """The Access-Control-Allow-Origin value for a request to a covered path, else None."""
    config = request.app[CONFIG]
    origin = request.headers.get("Origin")
    if origin is None or not request.path.startswith(cors_paths(config.admin_prefix)):
        return None
    return allowed_origin(origin, config.cors_origin)


@web.middleware
async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Preflights (OPTIONS with Access-Control-Request-Method) for the covered paths."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        allow = origin_allowed_here(request)
        if allow is not None:
            return QuietResponse(status=204, headers={
                "Access-Control-Allow-Origin": allow, "Access-Control-Allow-Methods": METHODS,
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": "86400", "Vary": "Origin"})
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """(on_response_prepare) Every answer of a covered path, streamed ones included."""
    allow = origin_allowed_here(request)
    if allow is not None:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.headers.add("Vary", "Origin")


def add_cors(app: web.Application) -> None:
    """With --cors-origin only: no per-response work otherwise."""
    if app[CONFIG].cors_origin:
        app.middlewares.append(cors_preflight)
        app.on_response_prepare.append(add_cors_headers)
