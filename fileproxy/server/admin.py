"""Admin endpoints under the reserved prefix (default /_fileproxy): health, ready, metrics, stats."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from fileproxy import __version__
from fileproxy.config import Config
from fileproxy.core.keys import CONFIG, LEGACY, METRICS, UPSTREAMS
from fileproxy.features.tasks import add_task_routes
from fileproxy.features.uploadroutes import add_upload_routes
from fileproxy.http.responses import QuietResponse, json_response
from fileproxy.observability.metrics import stats
from fileproxy.state import STORE, StateUnavailable

AdminHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Refresh = Callable[[web.Application], None]


async def health(request: web.Request) -> QuietResponse:
    """Liveness: the worker's event loop answers."""
    return json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> QuietResponse:
    """Readiness: at least one upstream is neither unhealthy nor ejected by its breaker, and
    Redis answers when one is configured."""
    upstreams = request.app[UPSTREAMS]
    members = {u.authority: {"healthy": u.healthy,
                             "circuit": u.breaker.state if u.breaker else "closed"}
               for u in upstreams.members}
    state = await state_reachable(request.app)
    is_ready = upstreams.ready() and state != "unreachable"
    return json_response({"ready": is_ready, "upstreams": members, "state_store": state},
                         status=200 if is_ready else 503)


async def state_reachable(app: web.Application) -> str:
    if not app[CONFIG].redis_url:
        return "memory"
    try:
        await app[STORE].ping()
    except StateUnavailable:
        return "unreachable"
    return "redis"


async def not_found(request: web.Request) -> QuietResponse:
    return QuietResponse(status=404, text=f"404 Not Found: no fileproxy endpoint {request.path}\n")


def add_admin_routes(app: web.Application, config: Config, refresh: Refresh) -> None:
    """Every path under the prefix is fileproxy's own: never forwarded."""

    async def metrics_text(request: web.Request) -> web.Response:
        refresh(request.app)
        body, content_type = request.app[METRICS].exposition()
        # (set before the response is built: QuietResponse keeps only the headers it was given)
        return QuietResponse(body=body, headers={"Content-Type": content_type})

    async def stats_json(request: web.Request) -> QuietResponse:
        refresh(request.app)
        return json_response(stats(request.app[METRICS]))

    routes: dict[str, AdminHandler] = {"health": health, "ready": ready, "metrics": metrics_text,
                                       "stats": stats_json}
    prefix = config.admin_prefix
    for name, handler in routes.items():
        app.router.add_get(f"{prefix}/{name}", guarded(handler))
    # The names the services fileproxy replaces used: routed by the request path (core.routing)
    # on every server path, answered here.
    app[LEGACY] = {"/stats": guarded(stats_json), "/proxy-metrics": guarded(stats_json),
                   "/proxy-health": guarded(ready)}
    add_task_routes(app, prefix, admin_only)
    add_upload_routes(app, prefix)
    app.router.add_route("*", prefix + "{tail:(/.*)?}", guarded(not_found))


def guarded(handler: AdminHandler) -> AdminHandler:
    """Requires `Authorization: Bearer <admin token>` when --admin-token is set."""

    async def check_token(request: web.Request) -> web.StreamResponse:
        token = request.app[CONFIG].admin_token
        if token:
            scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or \
                    not hmac.compare_digest(offered.strip().encode(), token.encode()):
                return QuietResponse(status=401, text="401 Unauthorized: the admin endpoints "
                                                      "need the admin bearer token\n",
                                     headers={"WWW-Authenticate": 'Bearer realm="fileproxy"'})
        return await handler(request)

    return check_token


def admin_only(handler: AdminHandler) -> AdminHandler:
    """Needs the admin token, and is refused when none is set: a task listing holds every
    task's id, which is the capability to read its result."""
    with_token = guarded(handler)

    async def check_configured(request: web.Request) -> web.StreamResponse:
        if not request.app[CONFIG].admin_token:
            return QuietResponse(status=403, text="403 Forbidden: listing or cleaning up tasks "
                                                  "needs --admin-token (task ids are "
                                                  "capabilities)\n")
        return await with_token(request)

    return check_configured
