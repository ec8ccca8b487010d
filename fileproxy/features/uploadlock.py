"""An upload's PATCH lock with handover, as tusd does it: a new request for an upload asks a stalled
holder to let go instead of answering 423 or waiting for the lock to time out. The holder keeps a
short lease alive with a heartbeat while it runs; asked, it lets go once it has received no byte
for `stall` seconds (its client is most likely gone), keeping what arrived; a holder that died
(SIGKILL) lets go when its lease runs out, in a few seconds. It works through the state store,
so across workers and instances."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fileproxy.state import Locked, LockHandle, StateStore, StateUnavailable

log = logging.getLogger("fileproxy.features.uploads")
POLL = 0.1  # seconds between a waiting request's tries
CHECK = 0.25  # seconds between the holder's looks at the release request


class UploadLock:
    def __init__(self, store: StateStore, upload_id: str, ttl: float, stall: float) -> None:
        self.store, self.ttl, self.stall = store, ttl, stall
        self.name = f"upload:{upload_id}"
        self.release_key = f"{self.name}:release"
        self.last_byte = time.monotonic()

    def received(self) -> None:
        """The holder's PATCH received bytes: it is not stalled."""
        self.last_byte = time.monotonic()

    @contextlib.asynccontextmanager
    async def held(self, let_go: Callable[[str], None]) -> AsyncIterator[LockHandle]:
        """The lock, taken over from a stalled holder (or one whose lease ran out) within the
        longer of the lease and the stall time, and a second; else Locked. While it is held a
        heartbeat renews it and calls `let_go(reason)` when a newer request asks and this holder
        stalled, or the lease was lost."""
        async with contextlib.AsyncExitStack() as stack:
            lock = await self.take_over(stack)
            await self.answered()
            self.received()
            heartbeat = asyncio.create_task(self.beat(lock, let_go))
            try:
                yield lock
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    async def take_over(self, stack: contextlib.AsyncExitStack) -> LockHandle:
        deadline = time.monotonic() + max(self.ttl, self.stall) + 1
        while True:
            try:
                return await stack.enter_async_context(self.store.lock(self.name, ttl=self.ttl))
            except Locked:
                if time.monotonic() > deadline:
                    raise
            await self.ask()
            await asyncio.sleep(POLL)

    async def wait_for_a_stalled_holder(self) -> None:
        """(For a HEAD) ask a holder to let go, and wait until it did or, bounded, it did not
        (a holder still receiving bytes keeps the upload): the offset read next is then what
        the stalled PATCH kept."""
        deadline = time.monotonic() + self.stall + 1
        while True:
            try:
                async with self.store.lock(self.name, ttl=self.ttl):
                    pass
            except Locked:
                if time.monotonic() > deadline:
                    return
                await self.ask()
                await asyncio.sleep(POLL)
            else:
                await self.answered()
                return

    async def ask(self) -> None:
        await self.store.set(self.release_key, b"1", ttl=self.ttl + self.stall)

    async def answered(self) -> None:
        with contextlib.suppress(StateUnavailable):
            await self.store.delete(self.release_key)

    async def beat(self, lock: LockHandle, let_go: Callable[[str], None]) -> None:
        """Every quarter second: asked to let go while stalled? Every third of the lease: renew."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(min(CHECK, self.ttl / 4))
            try:
                stalled = time.monotonic() - self.last_byte >= self.stall
                if stalled and await self.store.get(self.release_key):
                    let_go(f"a newer request for this upload asked for it, and no byte came "
                           f"for {self.stall:g} s")
                    return
                if time.monotonic() - renewed > self.ttl / 3:
                    await lock.extend()
                    renewed = time.monotonic()
            except Locked:
                let_go("its lease was lost")
                return
            except StateUnavailable as error:
                log.info("upload lock heartbeat: %s", error)
