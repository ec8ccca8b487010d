"""Response classes that add no Server header of fileproxy's own (nor a made-up Content-Type)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class NoDefaultHeaders:
    """Mixin: drop the Server (and Content-Type) aiohttp adds unless they were set on purpose."""

    _own_header_names: frozenset[str] = frozenset()

    async def _prepare_headers(self) -> None:
        keep = self._own_header_names
        await super()._prepare_headers()  # type: ignore[misc]
        for name in ("server", "content-type"):
            if name not in keep:
                self.headers.popall(name, None)  # type: ignore[attr-defined]

    def keep_headers_set_so_far(self) -> None:
        self._own_header_names = frozenset(name.lower() for name in self.headers)  # type: ignore[attr-defined]


class QuietResponse(NoDefaultHeaders, web.Response):
    """A complete response written by fileproxy itself (errors, admin endpoints)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_headers_set_so_far()


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> QuietResponse:
    return QuietResponse(text=json.dumps(data), status=status, headers=headers,
                         content_type="application/json")
