"""An upload's PATCH lock with handover, as tusd does it: a new PATCH asks the holder to let go instead
of answering 423 or waiting for the lock to time out. The holder keeps its lock alive with a
heartbeat while it runs and stops (keeping what arrived) when asked, or when it lost the lock; a
holder that died (SIGKILL) lets go when its short lock expires."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fileproxy.state import Locked, LockHandle, StateStore, StateUnavailable

log = logging.getLogger("fileproxy.features.uploads")
POLL = 0.1  # seconds between a waiting PATCH's tries


class UploadLock:
    def __init__(self, store: StateStore, upload_id: str, ttl: float) -> None:
        self.store, self.ttl = store, ttl
        self.name = f"upload:{upload_id}"
        self.release_key = f"{self.name}:release"

    @contextlib.asynccontextmanager
    async def held(self, let_go: Callable[[str], None]) -> AsyncIterator[LockHandle]:
        """The lock, taken over from a holder that is asked to let go (at most the lock's time
        to live and a second; then Locked). While it is held a heartbeat extends it, and calls
        `let_go(reason)` when another PATCH asks for it or it was lost."""
        async with contextlib.AsyncExitStack() as stack:
            lock = await self.take_over(stack)
            with contextlib.suppress(StateUnavailable):
                await self.store.delete(self.release_key)  # (our own request, answered)
            heartbeat = asyncio.create_task(self.beat(lock, let_go))
            try:
                yield lock
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    async def take_over(self, stack: contextlib.AsyncExitStack) -> LockHandle:
        deadline = time.monotonic() + self.ttl + 1
        while True:
            try:
                return await stack.enter_async_context(self.store.lock(self.name, ttl=self.ttl))
            except Locked:
                if time.monotonic() > deadline:
                    raise
            await self.store.set(self.release_key, b"1", ttl=self.ttl)
            await asyncio.sleep(POLL)

    async def beat(self, lock: LockHandle, let_go: Callable[[str], None]) -> None:
        """Every quarter second: asked to let go? Every third of the lock's life: extend."""
        extended = time.monotonic()
        while True:
            await asyncio.sleep(min(0.25, self.ttl / 4))
            try:
                if await self.store.get(self.release_key):
                    let_go("a newer PATCH for this upload asked for it")
                    return
                if time.monotonic() - extended > self.ttl / 3:
                    await lock.extend()
                    extended = time.monotonic()
            except Locked:
                let_go("its lock was lost (it stalled past the lock's time to live)")
                return
            except StateUnavailable as error:
                log.info("upload lock heartbeat: %s", error)
