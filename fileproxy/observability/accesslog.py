"""The access-log line written from a request's exchange record, plain or JSON."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from fileproxy.core.exchange import Exchange, response_bytes

EXCHANGE = web.RequestKey("exchange", Exchange)


def log_fields(request: web.BaseRequest, response: web.StreamResponse,
               duration: float) -> dict[str, Any]:
    exchange = request.get(EXCHANGE) if isinstance(request, web.Request) else None
    version = f"{request.version.major}.{request.version.minor}"
    return exchange_fields(request.remote, request.method, request.raw_path, version,
                           response.status, response_bytes(response), duration, exchange)


def exchange_fields(remote: str | None, method: str, target: str, version: str, status: int,
                    bytes_out: int, duration: float, exchange: Exchange | None) -> dict[str, Any]:
    """The access-log fields, whichever server path answered (aiohttp's or the fast path)."""
    fields: dict[str, Any] = {
        "remote": remote or "-", "method": method, "target": target, "version": version,
        "status": status, "bytes_out": bytes_out, "duration": round(duration, 6),
    }
    if exchange is not None:
        fields.update(bytes_in=exchange.bytes_in, upstream=exchange.upstream,
                      ttfb=None if exchange.ttfb is None else round(exchange.ttfb, 6),
                      retries=exchange.retries, request_id=exchange.request_id,
                      outcome=exchange.outcome)
        if exchange.detail:
            fields["detail"] = exchange.detail
    return fields


def plain_line(fields: dict[str, Any]) -> str:
    head = (f'{fields["remote"]} "{fields["method"]} {fields["target"]} HTTP/{fields["version"]}" '
            f'{fields["status"]} out={fields["bytes_out"]} {fields["duration"]:.3f}s')
    rest = " ".join(f"{key}={value}" for key, value in fields.items()
                    if key not in {"remote", "method", "target", "version", "status", "bytes_out",
                                   "duration"} and value is not None)
    return f"{head} {rest}".rstrip()


class AccessLogger(AbstractAccessLogger):
    """One line per request: plain `key=value` text, or one JSON object (--access-log-format)."""

    json_format = False

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.json_format = log_format == "json"

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.write(log_fields(request, response, time))

    def write(self, fields: dict[str, Any]) -> None:
        self.logger.info(json.dumps(fields) if self.json_format else plain_line(fields))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
