"""The exchange record (what happened to one request, for metrics and the access log) and request ids."""

from __future__ import annotations

import itertools
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from fileproxy.http.errors import ProxyError

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class HasHeaders(Protocol):
    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]: ...


@dataclass
class Exchange:
    """What happened to one proxied request; filled in along the request path."""

    request_id: str
    started: float  # time.monotonic() (the loop's clock too)
    upstream: str = "-"
    bytes_in: int = 0  # request body bytes sent upstream
    bytes_out: int = 0  # response body bytes sent to the client
    ttfb: float | None = None  # seconds until the response headers went to the client
    retries: int = 0
    status: int = 0
    # ok, refused (4xx for the request itself), rejected (admission), upstream_error, aborted
    # (cut short by the upstream or a timeout), client_aborted (the client left or stalled)
    outcome: str = "ok"
    detail: str = ""

    def fail(self, error: ProxyError) -> None:
        """fileproxy answered itself: a refusal (4xx), a rejection by admission (429/503 before
        any upstream) or an upstream failure (5xx)."""
        self.detail, self.status = error.message, error.status
        if error.status < 500 and error.status != 429:
            self.outcome = "refused"
        elif error.kind:
            self.outcome = "upstream_error"
        else:
            self.outcome = "rejected"

    def relayed(self, response: Any) -> None:
        """From the response sent back: a web.StreamResponse, or the fast path's record."""
        self.status = response.status
        self.bytes_out = response_bytes(response)
        aborted = getattr(response, "aborted", None)
        if aborted:
            client = getattr(response, "fault", None) == "client"
            self.outcome, self.detail = ("client_aborted" if client else "aborted"), aborted


# Outcomes that are not fileproxy's or the upstream's failure.
NOT_FAILURES = frozenset({"ok", "refused", "client_aborted"})


def response_bytes(response: Any) -> int:
    """Body bytes the client was sent: counted by fileproxy when it relayed (socket relay included),
    else what aiohttp wrote (a web.StreamResponse)."""
    counted = getattr(response, "body_bytes", None)
    return counted if counted is not None else response.body_length


class RequestIds:
    """Request ids: this process's random prefix and a counter (unique without a syscall per
    request). The prefix is drawn again in every forked child: gunicorn's workers are forked
    from a master that imported this module, and must not hand out the same ids."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(4)
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):08x}"


REQUEST_IDS = RequestIds()


def request_id_for(request: HasHeaders) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one."""
    incoming = request.headers.get("X-Request-Id", "")
    if incoming and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return REQUEST_IDS.next()


