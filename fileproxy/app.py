"""Wiring: the aiohttp Application and AppRunner for a Config; resource lifetimes, no feature logic."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from fileproxy.compat import ServerWrappingRunner
from fileproxy.config import Config, active_config
from fileproxy.core.forward import sent_later
from fileproxy.core.keys import ADMISSION, CONFIG, LEAN, METRICS, RETRY, SESSION, UPSTREAMS
from fileproxy.features.tasks import TASKS, TaskManager
from fileproxy.features.uploads import UPLOADS, Uploads
from fileproxy.http.headers import parser_limit
from fileproxy.loops import supervised
from fileproxy.observability.accesslog import AccessLogger
from fileproxy.observability.metrics import Metrics
from fileproxy.policy.admission import Admission
from fileproxy.policy.balancing import Upstreams
from fileproxy.policy.health import HealthChecker
from fileproxy.policy.retry import RetryPolicy
from fileproxy.server.admin import add_admin_routes
from fileproxy.server.aiohttp_server import defer_expect, proxy_handler, route_every_target
from fileproxy.server.cors import add_cors
from fileproxy.server.fastpath import FastServer
from fileproxy.state import STORE, open_store, warn_if_evicting
from fileproxy.upstream.aiohttp_client import make_session
from fileproxy.upstream.lean import LeanPool


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession per worker, from start-up to shutdown, and the lean client's pool."""
    config = app[CONFIG]
    async with make_session(config) as session:
        app[SESSION] = session
        if config.lean_client:
            app[LEAN] = LeanPool(config)
        try:
            yield
        finally:
            if LEAN in app:
                app[LEAN].close()


async def state_and_tasks(app: web.Application) -> AsyncIterator[None]:
    """The state store (Redis or memory) and this worker's share of running async tasks."""
    config = app[CONFIG]
    store = app[STORE] = open_store(config.redis_url, config.state_prefix)
    await warn_if_evicting(store)
    manager = app[TASKS] = TaskManager(config, store, functools.partial(sent_later, app),
                                       app[METRICS])
    uploads = app[UPLOADS] = Uploads(config, store, manager, app[METRICS])
    runners = [asyncio.create_task(manager.run_forever()),
               asyncio.create_task(supervised("upload sweep", uploads.sweep_forever))]
    yield
    for runner in runners:
        runner.cancel()
    await asyncio.gather(*runners, return_exceptions=True)
    await store.close()


async def background_tasks(app: web.Application) -> AsyncIterator[None]:
    """The worker's periodic jobs: metrics sampling every second, active health checks."""
    tasks = [asyncio.create_task(supervised("metrics refresh",
                                            functools.partial(refresh_metrics_forever, app)))]
    if app[CONFIG].health_check_path:
        checker = HealthChecker(app[CONFIG], app[UPSTREAMS], app[SESSION])
        tasks.append(asyncio.create_task(supervised("health checks", checker.run)))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def refresh_metrics_forever(app: web.Application) -> None:
    while True:
        refresh_metrics(app)
        await asyncio.sleep(1)


def refresh_metrics(app: web.Application) -> None:
    lean = app.get(LEAN)
    if lean is not None:
        lean.sweep()
    app[METRICS].refresh(app[ADMISSION], app[UPSTREAMS], app[SESSION].connector, lean)


def build_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[route_every_target])
    app[CONFIG] = config
    metrics = app[METRICS] = Metrics()
    app[UPSTREAMS] = Upstreams.from_config(config, metrics.breaker_changed)
    app[ADMISSION] = Admission(config.max_concurrent, config.max_queue_size,
                               config.queue_timeout, config.max_per_client)
    app[RETRY] = RetryPolicy.from_config(config)
    app.cleanup_ctx.append(upstream_session)
    app.cleanup_ctx.append(background_tasks)
    app.cleanup_ctx.append(state_and_tasks)
    add_cors(app)
    add_admin_routes(app, config, refresh_metrics)
    app.router.add_route("*", "/{path:.*}", proxy_handler, expect_handler=defer_expect)
    return app


class FastPathRunner(ServerWrappingRunner):
    """aiohttp's AppRunner whose protocol factory is the fast path's (server/fastpath.py),
    in front of the Server aiohttp made for the application."""

    def wrap(self, inner: web.Server) -> FastServer:
        config = self.app[CONFIG]
        access = AccessLogger(logging.getLogger("fileproxy.access"), config.access_log_format) \
            if config.access_log else None
        return FastServer(inner, self.app, access)


def build_runner(config: Config) -> web.AppRunner:
    """The runner with the server-side settings: keep-alive, parser limits, handler cancellation
    (a client that goes away cancels its upstream request at once)."""
    return FastPathRunner(
        build_app(config),
        handler_cancellation=True,
        keepalive_timeout=config.client_keepalive,
        shutdown_timeout=config.graceful_timeout,
        read_bufsize=config.read_size,
        max_line_size=parser_limit(config),
        max_field_size=parser_limit(config),
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
