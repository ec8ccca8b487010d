"""Admission control per worker: a concurrency limit, a bounded FIFO queue with a maximum wait, and an
optional per-client limit. Whoever cannot be served soon is told so at once (503/429 + Retry-After)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter, deque
from dataclasses import dataclass, field

from fileproxy.http.errors import ProxyError


@dataclass
class Admission:
    limit: int  # concurrent upstream exchanges per worker
    queue_size: int  # requests that may wait for a slot (0: none wait)
    queue_timeout: float  # longest wait for a slot
    per_client: int = 0  # concurrent exchanges per client address (0: no limit)
    active: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # queue_full, queue_timeout, client
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    _clients: Counter[str] = field(default_factory=Counter)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def available(self) -> int:
        return max(0, self.limit - self.active)

    def slot(self, client: str) -> Slot:
        """Hold one of the worker's slots (and one of the client's) for the whole exchange:
        `async with admission.slot(address):`."""
        return Slot(self, client)

    def _count_client(self, client: str) -> None:
        if self._clients[client] >= self.per_client:
            self.rejected["client"] += 1
            raise ProxyError(429, f"Too Many Requests: {self.per_client} transfers from "
                                  f"{client} are already running", headers={"Retry-After": "1"})
        self._clients[client] += 1

    def _uncount_client(self, client: str) -> None:
        self._clients[client] -= 1
        if not self._clients[client]:
            del self._clients[client]

    async def _acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.queue_size:
            self.rejected["queue_full"] += 1
            raise self._busy(f"all {self.limit} slots busy and {self.queue_size} requests "
                             "already waiting")
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await granted
        except (TimeoutError, asyncio.CancelledError) as error:
            if granted.done() and not granted.cancelled():
                self._release()  # the slot arrived as we gave up: pass it on
            if isinstance(error, asyncio.CancelledError):
                raise
            self.rejected["queue_timeout"] += 1
            raise self._busy(f"no slot within {self.queue_timeout:g} s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(granted)

    def _release(self) -> None:
        """Hand the slot to the longest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    def _busy(self, why: str) -> ProxyError:
        retry_after = max(1, math.ceil(min(self.queue_timeout, 5)))
        return ProxyError(503, f"Service Unavailable: {why}; retry after {retry_after} s",
                          headers={"Retry-After": str(retry_after)})


class Slot:
    """The async context manager Admission.slot() returns (a class: it is on every request's
    path, and a free slot costs no awaiting at all)."""

    __slots__ = ("admission", "client")

    def __init__(self, admission: Admission, client: str) -> None:
        self.admission, self.client = admission, client

    async def __aenter__(self) -> None:
        admission = self.admission
        if admission.per_client:
            admission._count_client(self.client)
        if admission.active < admission.limit and not admission._waiters:
            admission.active += 1
            return
        try:
            await admission._acquire()
        except BaseException:
            if admission.per_client:
                admission._uncount_client(self.client)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        admission = self.admission
        admission._release()
        if admission.per_client:
            admission._uncount_client(self.client)
