"""Typed aiohttp AppKeys for what the request path shares (config, upstreams, session, admission, ...)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import ClientSession, web

from fileproxy.config import Config
from fileproxy.observability.metrics import Metrics
from fileproxy.policy.admission import Admission
from fileproxy.policy.balancing import Upstreams
from fileproxy.policy.retry import RetryPolicy
from fileproxy.upstream.lean import LeanPool

CONFIG = web.AppKey("config", Config)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
SESSION = web.AppKey("session", ClientSession)
LEAN = web.AppKey("lean", LeanPool)  # set when --lean-client is on
ADMISSION = web.AppKey("admission", Admission)
RETRY = web.AppKey("retry", RetryPolicy)
METRICS = web.AppKey("metrics", Metrics)
# fileproxy's answers to the legacy endpoint names (--legacy-endpoints), by path.
LEGACY = web.AppKey("legacy", dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]])
