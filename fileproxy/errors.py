"""Errors the proxy answers itself: status, one-line explanation and the request id, as plain text."""

from __future__ import annotations

from fileproxy.responses import QuietResponse


class ProxyError(Exception):
    """A request fileproxy answers itself instead of forwarding (4xx) or after the upstream failed (5xx)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.close = close

    def response(self, request_id: str) -> QuietResponse:
        headers = {"X-Request-Id": request_id, "Cache-Control": "no-store", **self.headers}
        text = f"{self.status} {self.message}\nrequest id: {request_id}\n"
        response = QuietResponse(status=self.status, text=text, headers=headers)
        if self.close:
            response.force_close()
        return response
