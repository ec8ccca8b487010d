"""Safe retries: which failures, when it is safe, how long to back off, and a budget against storms."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fileproxy.config import Config

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 9.2.2


@dataclass
class RetryBudget:
    """Retries may be at most `ratio` of the requests seen over the last `window` seconds, plus
    `floor_per_second` so a quiet proxy can still retry: a struggling upstream is not stormed."""

    ratio: float
    window: int = 10
    floor_per_second: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _buckets: deque[list[int]] = field(default_factory=deque)  # [second, requests, retries]

    def _bucket(self) -> list[int]:
        second = int(self.clock())
        while self._buckets and self._buckets[0][0] <= second - self.window:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]

    def record_request(self) -> None:
        self._bucket()[1] += 1

    def try_spend(self) -> bool:
        current = self._bucket()
        requests = sum(bucket[1] for bucket in self._buckets)
        retries = sum(bucket[2] for bucket in self._buckets)
        if retries >= self.ratio * requests + self.floor_per_second * self.window:
            return False
        current[2] += 1
        return True


@dataclass
class RetryPolicy:
    max_retries: int
    backoff_factor: float  # first retry waits up to this long, doubling after
    backoff_max: float
    statuses: frozenset[int]  # upstream answers treated as failures (retried when safe)
    budget: RetryBudget

    @classmethod
    def from_config(cls, config: Config) -> RetryPolicy:
        return cls(config.max_retries, config.retry_backoff_factor, config.retry_backoff_max,
                   frozenset(config.retry_statuses), RetryBudget(config.retry_budget))

    def backoff(self, retry_number: int) -> float:
        """Exponential backoff with full jitter: uniform(0, min(max, factor * 2^(n-1)))."""
        return random.uniform(0, min(self.backoff_max,
                                     self.backoff_factor * 2 ** (retry_number - 1)))

    def may_retry(self, retries_so_far: int, *, reached_upstream: bool, method: str,
                  timed_out: bool, another_upstream: bool, has_body: bool, body_sent: bool,
                  replayable: bool) -> bool:
        """Only when safe (RFC 9110 9.2.2): the upstream never got the request, or the method is
        idempotent, or the request's body has not been sent; and only when the body can be sent
        again (none, not a byte sent yet, or stored). After a timeout, only on another upstream:
        retrying the same one would multiply the client's wait."""
        if retries_so_far >= self.max_retries or (body_sent and not replayable):
            return False
        if timed_out and not another_upstream:
            return False
        body_unsent = has_body and not body_sent
        if reached_upstream and method not in IDEMPOTENT and not body_unsent:
            return False
        return self.budget.try_spend()
