"""Where a request goes, decided once for every server path: fileproxy's own endpoints (admin prefix,
legacy names), a resumable upload, an async task, or the upstream."""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping

from fileproxy.config import Config

# The names the services fileproxy replaces answered (with --legacy-endpoints).
LEGACY_PATHS = ("/stats", "/proxy-metrics", "/proxy-health")
LEGACY_METHODS = frozenset({"GET", "HEAD"})
# Methods whose request can carry the content a resumable upload is made of.
UPLOAD_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The IETF resumable-upload draft's interop versions fileproxy speaks (none: the latest).
UPLOAD_INTEROP_VERSIONS = frozenset({"6", "8"})


class Route(enum.Enum):
    ADMIN = "admin"  # under the admin prefix: answered by fileproxy, never forwarded
    LEGACY = "legacy"  # one of LEGACY_PATHS with --legacy-endpoints
    UPLOAD = "upload"  # becomes a resumable upload (Upload-Complete: the IETF draft)
    TASK = "task"  # stored and run later (Prefer: respond-async or --async-route)
    FORWARD = "forward"


def route(method: str, path: str, headers: Mapping[str, str], config: Config) -> Route:
    """`path` is the decoded path (no query), as routers match it."""
    prefix = config.admin_prefix
    if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
        return Route.ADMIN
    if config.legacy_endpoints and path in LEGACY_PATHS and method in LEGACY_METHODS:
        return Route.LEGACY
    if config.resumable_uploads and resumable_upload(method, headers):
        return Route.UPLOAD
    if async_wanted(method, path, headers.get("Prefer"), config.async_route):
        return Route.TASK
    return Route.FORWARD


def resumable_upload(method: str, headers: Mapping[str, str]) -> bool:
    """A request that asks to be a resumable upload: it carries Upload-Complete, at an interop
    version fileproxy speaks (or none). Others (tusd's older versions) reach the upstream."""
    version = headers.get("Upload-Draft-Interop-Version")
    return method in UPLOAD_METHODS and "Upload-Complete" in headers \
        and (version is None or version.strip() in UPLOAD_INTEROP_VERSIONS)


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
