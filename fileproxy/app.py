"""Wiring: the aiohttp Application and AppRunner for a Config; resource lifetimes, no feature logic."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from fileproxy.accesslog import AccessLogger
from fileproxy.admin import add_admin_routes
from fileproxy.config import Config, active_config
from fileproxy.keys import CONFIG, SESSION, UPSTREAMS
from fileproxy.proxy import defer_expect, proxy_handler, route_every_target
from fileproxy.upstream import Upstream, close_client_if_spliced, make_session


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession per worker, from start-up to shutdown."""
    async with make_session(app[CONFIG]) as session:
        app[SESSION] = session
        yield


def build_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[route_every_target])
    app[CONFIG] = config
    app[UPSTREAMS] = tuple(Upstream(url) for url in config.upstream)
    app.cleanup_ctx.append(upstream_session)
    app.on_response_prepare.append(close_client_if_spliced)
    add_admin_routes(app, config.admin_prefix)
    app.router.add_route("*", "/{path:.*}", proxy_handler, expect_handler=defer_expect)
    return app


def build_runner(config: Config) -> web.AppRunner:
    """The runner with the server-side settings: keep-alive, parser limits, handler cancellation
    (a client that goes away cancels its upstream request at once)."""
    return web.AppRunner(
        build_app(config),
        handler_cancellation=True,
        keepalive_timeout=config.client_keepalive,
        shutdown_timeout=config.graceful_timeout,
        read_bufsize=config.read_size,
        # The parser's hard limits sit above ours so that check_header_limits answers 431.
        max_line_size=max(8190, 2 * config.max_header_size),
        max_field_size=max(8190, 2 * config.max_header_size),
        max_headers=2 * config.max_headers,
        access_log=logging.getLogger("fileproxy.access") if config.access_log else None,
        access_log_class=AccessLogger,
        access_log_format=config.access_log_format,
    )


def configure_logging(config: Config) -> None:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")


async def gunicorn_app() -> web.AppRunner:
    """gunicorn's worker factory (aiohttp.GunicornUVLoopWebWorker accepts an AppRunner)."""
    config = active_config()
    configure_logging(config)
    return build_runner(config)
