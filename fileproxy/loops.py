"""Event loop choice: uvloop when it is installed (it always is with fileproxy), asyncio otherwise."""

from __future__ import annotations

import asyncio


def loop_factory() -> type[asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.SelectorEventLoop
    return uvloop.Loop

