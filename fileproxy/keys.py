"""Typed aiohttp AppKeys for the objects the application shares (config, upstreams, the session)."""

from __future__ import annotations

from aiohttp import ClientSession, web

from fileproxy.config import Config
from fileproxy.upstream import Upstream

CONFIG = web.AppKey("config", Config)
UPSTREAMS = web.AppKey("upstreams", tuple[Upstream, ...])
SESSION = web.AppKey("session", ClientSession)
