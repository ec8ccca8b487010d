"""Typed aiohttp AppKeys for the objects the application shares (config, upstreams, session, ...)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import ClientSession, web

from fileproxy.admission import Admission
from fileproxy.config import Config
from fileproxy.lean import LeanPool
from fileproxy.metrics import Metrics
from fileproxy.retry import RetryPolicy
from fileproxy.state import StateStore
from fileproxy.tasks import TaskManager
from fileproxy.uploads import Uploads
from fileproxy.upstreams import Upstreams

CONFIG = web.AppKey("config", Config)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
SESSION = web.AppKey("session", ClientSession)
LEAN = web.AppKey("lean", LeanPool)  # set when --lean-client is on
ADMISSION = web.AppKey("admission", Admission)
RETRY = web.AppKey("retry", RetryPolicy)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", StateStore)
TASKS = web.AppKey("tasks", TaskManager)
UPLOADS = web.AppKey("uploads", Uploads)
# fileproxy's answers to the legacy endpoint names (--legacy-endpoints), by path.
LEGACY = web.AppKey("legacy", dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]])
