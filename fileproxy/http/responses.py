"""Response classes that add no Server header of fileproxy's own (nor a made-up Content-Type)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from fileproxy.compat import NoDefaultHeaders


class QuietResponse(NoDefaultHeaders, web.Response):
    """A complete response written by fileproxy itself (errors, admin endpoints)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_headers_set_so_far()


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> QuietResponse:
    return QuietResponse(text=json.dumps(data), status=status, headers=headers,
                         content_type="application/json")
