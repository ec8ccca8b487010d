"""Circuit breaker per upstream: closed -> open after failures, half-open probes after a timeout."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("fileproxy.policy.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)


@dataclass(frozen=True)
class BreakerSettings:
    threshold: int = 5  # consecutive failures that open the circuit (0: never by count)
    failure_ratio: float = 0.0  # or this share of failures over the window (0: off)
    window: int = 20  # outcomes the ratio is taken over (and the fewest it needs)
    open_seconds: float = 30.0  # how long it stays open before probing
    half_open_probes: int = 1  # requests let through at once while half-open


@dataclass
class CircuitBreaker:
    name: str
    settings: BreakerSettings
    on_change: Callable[[str, str, str], None] = lambda name, old, new: None
    clock: Callable[[], float] = time.monotonic
    state: str = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probes_in_flight: int = 0
    outcomes: deque[bool] = field(default_factory=deque)  # True: failure

    def allow(self) -> bool:
        """May a request go to this upstream now? Half-open admits a few probes at a time."""
        if self.state == OPEN and self.clock() - self.opened_at >= self.settings.open_seconds:
            self._move(HALF_OPEN)
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and self.probes_in_flight < self.settings.half_open_probes:
            self.probes_in_flight += 1
            return True
        return False

    def release(self) -> None:
        """A request let through that ended without an outcome (its client left, it was
        cancelled or timed out before an answer): a probe's slot is given back, the state
        stays as it is."""
        if self.state == HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def retry_after(self) -> float:
        """Seconds until this breaker lets a probe through (0 when it already would)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.settings.open_seconds - (self.clock() - self.opened_at))

    def record(self, failed: bool) -> None:
        if self.state == HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
            self._move(OPEN if failed else CLOSED)
            return
        self.outcomes.append(failed)
        if len(self.outcomes) > self.settings.window:
            self.outcomes.popleft()
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        if self.state == CLOSED and self._should_open():
            self._move(OPEN)

    def _should_open(self) -> bool:
        settings = self.settings
        if settings.threshold and self.consecutive_failures >= settings.threshold:
            return True
        if settings.failure_ratio and len(self.outcomes) >= settings.window:
            return sum(self.outcomes) / len(self.outcomes) >= settings.failure_ratio
        return False

    def _move(self, new: str) -> None:
        old, self.state = self.state, new
        if new == OPEN:
            self.opened_at = self.clock()
        if new in (OPEN, CLOSED):
            self.probes_in_flight = 0
        if new == CLOSED:
            self.consecutive_failures = 0
            self.outcomes.clear()
        log.warning("circuit for upstream %s: %s -> %s", self.name, old, new)
        self.on_change(self.name, old, new)
