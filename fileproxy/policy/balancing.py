"""The upstream servers of one worker: weights, balancing, breakers, active health, in-flight counts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from yarl import URL

from fileproxy.config import Config
from fileproxy.http.errors import ProxyError
from fileproxy.policy.breaker import CLOSED, OPEN, BreakerSettings, CircuitBreaker


@dataclass(eq=False)
class Upstream:
    """One upstream server: base URL (maybe with a path prefix), weight and live state."""

    base: str
    weight: int = 1
    breaker: CircuitBreaker | None = None
    in_flight: int = 0
    healthy: bool = True  # the active health check's verdict (always True without checks)
    current: int = 0  # smooth weighted round robin's running weight

    @cached_property
    def url(self) -> URL:
        return URL(self.base, encoded=True)

    @cached_property
    def authority(self) -> str:
        return self.url.raw_authority

    @cached_property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        assert self.url.host is not None and self.url.port is not None
        return self.url.host, self.url.port

    @cached_property
    def path_prefix(self) -> str:
        """What the base URL has after its authority ('' for none): it goes before every target."""
        return self.base.split("://", 1)[1][len(self.authority):]

    def url_for(self, target: str) -> URL:
        """base + the raw target, byte-for-byte: no decoding, merging of '//' or re-encoding."""
        return URL(self.base + target, encoded=True)

    def begin(self) -> None:
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1

    def record(self, failed: bool) -> None:
        if self.breaker is not None:
            self.breaker.record(failed)

    def abandon(self) -> None:
        """The attempt ended without an outcome (cancelled): its breaker slot is given back."""
        self.in_flight -= 1
        if self.breaker is not None:
            self.breaker.release()

    def usable(self) -> bool:
        """Healthy and not ejected by its breaker (peeks; allow() does the accounting)."""
        breaker = self.breaker
        return self.healthy and (breaker is None or breaker.state != OPEN
                                 or breaker.retry_after() == 0)


def split_spec(spec: str) -> tuple[str, int]:
    """'http://host:port weight=3' -> (url, 3); a spec is validated by config.parse_upstream."""
    url, *options = spec.split()
    weight = 1
    for option in options:
        weight = int(option.split("=", 1)[1])
    return url, weight


@dataclass
class Upstreams:
    """Chooses an upstream per attempt: round robin or least in flight, both weighted, skipping
    unhealthy ones and those whose circuit is open."""

    members: list[Upstream]
    strategy: str = "round_robin"

    @classmethod
    def from_config(cls, config: Config,
                    on_breaker_change: Callable[[str, str, str], None] = lambda *_: None
                    ) -> Upstreams:
        settings = BreakerSettings(
            threshold=config.circuit_breaker_threshold,
            failure_ratio=config.circuit_breaker_failure_ratio,
            window=config.circuit_breaker_window,
            open_seconds=config.circuit_breaker_timeout,
            half_open_probes=config.circuit_breaker_half_open_probes)
        members = []
        for spec in config.upstream:
            url, weight = split_spec(spec)
            upstream = Upstream(url, weight)
            upstream.breaker = CircuitBreaker(upstream.authority, settings, on_breaker_change)
            members.append(upstream)
        return cls(members, config.balance)

    def choose(self, exclude: set[Upstream] | frozenset[Upstream] = frozenset()) -> Upstream:
        """The next upstream for an attempt (others than `exclude` first), or 503."""
        if len(self.members) == 1:  # the common case, without building lists
            only = self.members[0]
            if only.usable() and (only.breaker is None or only.breaker.allow()):
                return only
            raise self.none_available()
        candidates = [u for u in self.members if u.usable() and u not in exclude] or \
            [u for u in self.members if u.usable()]
        while candidates:
            upstream = self._pick(candidates)
            if upstream.breaker is None or upstream.breaker.allow():
                return upstream
            candidates.remove(upstream)  # half-open with its probe slots taken
        raise self.none_available()

    def _pick(self, candidates: list[Upstream]) -> Upstream:
        if self.strategy == "least_in_flight":
            return min(candidates, key=lambda u: (u.in_flight / u.weight, -u.weight))
        total = sum(u.weight for u in candidates)  # nginx's smooth weighted round robin
        for upstream in candidates:
            upstream.current += upstream.weight
        chosen = max(candidates, key=lambda u: u.current)
        chosen.current -= total
        return chosen

    def has_another(self, tried: set[Upstream]) -> bool:
        """Is there a usable upstream not tried yet?"""
        return any(u.usable() and u not in tried for u in self.members)

    def none_available(self) -> ProxyError:
        waits = [u.breaker.retry_after() for u in self.members if u.healthy and u.breaker]
        retry_after = max(1, math.ceil(min(waits))) if waits else 5
        ejected = sum(1 for u in self.members if not u.usable())
        return ProxyError(503, f"Service Unavailable: no healthy upstream ({ejected} of "
                               f"{len(self.members)} ejected); retry after {retry_after} s",
                          headers={"Retry-After": str(retry_after)}, kind="ejected")

    def ready(self) -> bool:
        """Some upstream is healthy and its circuit closed (an open one, even one about to let a
        probe through, is not ready: its upstream was failing when last tried)."""
        return any(u.healthy and (u.breaker is None or u.breaker.state == CLOSED)
                   for u in self.members)
