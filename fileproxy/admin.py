"""Admin endpoints under the reserved prefix (default /_fileproxy): health now, more as features land."""

from __future__ import annotations

from aiohttp import web

from fileproxy import __version__
from fileproxy.responses import QuietResponse, json_response


async def health(request: web.Request) -> QuietResponse:
    """Liveness: the worker's event loop answers."""
    return json_response({"status": "ok", "version": __version__})


async def not_found(request: web.Request) -> QuietResponse:
    return QuietResponse(status=404, text=f"404 Not Found: no fileproxy endpoint {request.path}\n")


def add_admin_routes(app: web.Application, prefix: str) -> None:
    """Every path under the prefix is fileproxy's own: never forwarded."""
    app.router.add_get(f"{prefix}/health", health)
    app.router.add_route("*", prefix + "{tail:(/.*)?}", not_found)
