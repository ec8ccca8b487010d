"""Where a request goes, decided once for every server path: fileproxy's own endpoints (admin prefix,
legacy names), an async task, or the upstream."""

from __future__ import annotations

import enum
import fnmatch

from fileproxy.config import Config

# The names the services fileproxy replaces answered (with --legacy-endpoints).
LEGACY_PATHS = ("/stats", "/proxy-metrics", "/proxy-health")
LEGACY_METHODS = frozenset({"GET", "HEAD"})


class Route(enum.Enum):
    ADMIN = "admin"  # under the admin prefix: answered by fileproxy, never forwarded
    LEGACY = "legacy"  # one of LEGACY_PATHS with --legacy-endpoints
    TASK = "task"  # stored and run later (Prefer: respond-async or --async-route)
    FORWARD = "forward"


def route(method: str, path: str, prefer: str | None, config: Config) -> Route:
    """`path` is the decoded path (no query), as routers match it."""
    prefix = config.admin_prefix
    if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
        return Route.ADMIN
    if config.legacy_endpoints and path in LEGACY_PATHS and method in LEGACY_METHODS:
        return Route.LEGACY
    if async_wanted(method, path, prefer, config.async_route):
        return Route.TASK
    return Route.FORWARD


def async_wanted(method: str, path: str, prefer: str | None, routes: tuple[str, ...]) -> bool:
    """Run as an async task: the client asked (Prefer: respond-async, RFC 7240) or an
    --async-route pattern ("METHOD /path*") matches."""
    if prefer and "respond-async" in [token.strip().split("=")[0]
                                      for token in prefer.lower().split(",")]:
        return True
    if not routes:
        return False
    line = f"{method} {path}"
    return any(fnmatch.fnmatchcase(line, pattern) for pattern in routes)
