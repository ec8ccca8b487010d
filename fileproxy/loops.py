"""Event loops: uvloop when it is installed (it always is with fileproxy), and supervised background
loops that log a failure and start again instead of dying silently."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger("fileproxy.loops")
T = TypeVar("T")


def loop_factory() -> type[asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.SelectorEventLoop
    return uvloop.Loop



async def supervised(name: str, run: Callable[[], Awaitable[None]], *,
                     first_delay: float = 0.1, longest_delay: float = 30.0) -> None:
    """Run the background loop `run` until cancelled. When it raises (or returns), the traceback
    is logged and it starts again after a backoff that doubles up to `longest_delay` (and starts
    over once the loop has run for a minute): no background loop dies silently."""
    loop = asyncio.get_running_loop()
    delay = first_delay
    while True:
        started = loop.time()
        try:
            await run()
            log.error("background loop %s returned; starting it again in %.1f s", name, delay)
        except Exception:
            log.exception("background loop %s failed; starting it again in %.1f s", name, delay)
        if loop.time() - started > 60:
            delay = first_delay
        await asyncio.sleep(delay)
        delay = min(delay * 2, longest_delay)


async def uncancelled(step: Awaitable[T]) -> T:
    """Run `step` to its end even if the caller is cancelled meanwhile (a client that left must
    not interrupt keeping what it sent); the cancellation is raised once the step is done."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result
