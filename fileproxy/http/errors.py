"""Errors the proxy answers itself: status, one-line explanation and the request id, as plain text."""

from __future__ import annotations

from fileproxy.http.responses import QuietResponse


class ProxyError(Exception):
    """A request fileproxy answers itself instead of forwarding (4xx) or after the upstream failed (5xx)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None,
                 close: bool = False, kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.close = close
        self.kind = kind  # for upstream failures: connect, connect_timeout, reset, timeout, ...

    @property
    def reached_upstream(self) -> bool:
        """False when the upstream cannot have seen the request at all."""
        return self.kind not in ("connect", "connect_timeout")

    def response(self, request_id: str) -> QuietResponse:
        response = QuietResponse(status=self.status, text=self.text(request_id),
                                 headers=self.headers_for(request_id))
        if self.close:
            response.force_close()
        return response

    def text(self, request_id: str) -> str:
        return f"{self.status} {self.message}\nrequest id: {request_id}\n"

    def headers_for(self, request_id: str) -> dict[str, str]:
        return {"X-Request-Id": request_id, "Cache-Control": "no-store", **self.headers}


# The upstream failures both clients (aiohttp's and upstream/lean.py) report, worded once.

def upstream_unreachable(authority: str, reason: str) -> ProxyError:
    return ProxyError(502, f"Bad Gateway: upstream {authority} unreachable ({reason})",
                      kind="connect")


def upstream_connect_timeout(authority: str) -> ProxyError:
    return ProxyError(504, f"Gateway Timeout: connecting to upstream {authority} timed out",
                      kind="connect_timeout")


def upstream_closed_early(authority: str, error: object) -> ProxyError:
    return ProxyError(502, f"Bad Gateway: upstream {authority} closed the connection before "
                           f"responding ({error})", kind="reset")


def upstream_header_timeout(authority: str) -> ProxyError:
    return ProxyError(504, f"Gateway Timeout: upstream {authority} sent no response headers "
                           "within the read timeout", kind="timeout")


def upstream_invalid(authority: str, error: object) -> ProxyError:
    return ProxyError(502, f"Bad Gateway: invalid response from upstream {authority} ({error})",
                      kind="invalid")
