"""Active health checks: each worker probes every upstream's health path and ejects or restores it."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from fileproxy.config import Config
from fileproxy.policy.balancing import Upstream, Upstreams

log = logging.getLogger("fileproxy.policy.health")


class HealthChecker:
    """Consecutive failed probes (`unhealthy_threshold`) eject an upstream; consecutive passed ones
    (`healthy_threshold`) restore it. A probe passes with any status below 500 in time."""

    def __init__(self, config: Config, upstreams: Upstreams, session: aiohttp.ClientSession) -> None:
        self.config, self.upstreams, self.session = config, upstreams, session
        self.streaks: dict[Upstream, int] = {u: 0 for u in upstreams.members}  # +passes / -fails

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self.check(u) for u in self.upstreams.members))
            await asyncio.sleep(self.config.health_check_interval)

    async def check(self, upstream: Upstream) -> None:
        passed = await self.probe(upstream)
        streak = self.streaks[upstream]
        streak = max(streak, 0) + 1 if passed else min(streak, 0) - 1
        self.streaks[upstream] = streak
        if upstream.healthy and streak <= -self.config.unhealthy_threshold:
            upstream.healthy = False
            log.warning("upstream %s failed %d health checks: ejected", upstream.authority, -streak)
        elif not upstream.healthy and streak >= self.config.healthy_threshold:
            upstream.healthy = True
            log.warning("upstream %s passed %d health checks: restored", upstream.authority, streak)

    async def probe(self, upstream: Upstream) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.config.health_check_timeout)
        try:
            async with self.session.get(upstream.url_for(self.config.health_check_path),
                                        timeout=timeout, allow_redirects=False) as response:
                await response.read()
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False
