"""Bounded concurrent load: ./run.sh bench load --url URL --concurrency N --requests M [--duration S]

Sends at most M requests (and for at most S seconds) from N concurrent connections, shows progress,
and prints requests/s, latency percentiles, status counts and errors (--json FILE for a record).
It is the tool to tune --max-concurrent, --max-queue-size and the timeouts with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tqdm import tqdm


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, completed requests
    by_status: dict[int, list[float]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def completed(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> dict[str, Any]:
        return {**self.counts(), "latency_ms": latency_ms(self.latencies),
                "latency_ms_by_status": {str(status): latency_ms(values)
                                         for status, values in sorted(self.by_status.items())}}

    def counts(self) -> dict[str, Any]:
        return {
            "requests": self.completed + sum(self.errors.values()),
            "completed": self.completed, "elapsed_s": round(self.elapsed, 3),
            "requests_per_s": round(self.completed / self.elapsed, 1) if self.elapsed else 0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
        }


def latency_ms(latencies: list[float]) -> dict[str, float | None]:
    ordered = sorted(latencies)
    if not ordered:
        return {}

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"min": pct(0), "avg": round(statistics.fmean(ordered) * 1000, 2), "p50": pct(0.5),
            "p90": pct(0.9), "p95": pct(0.95), "p99": pct(0.99), "max": pct(1)}


async def run_load(url: str, concurrency: int, requests: int, duration: float | None = None,
                   method: str = "GET", timeout: float = 60.0, body: bytes | None = None,
                   progress: bool = True, warm_up: bool = False) -> LoadResult:
    """Send up to `requests` requests, `concurrency` at a time, stopping after `duration` s.
    `warm_up`: first one unmeasured request per connection, so that the figures are those of
    established connections (not of the connection storm, whose lost SYNs cost 1, 3, 7 s)."""
    result = LoadResult()
    issued = 0
    deadline: float | None = None
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    bar = tqdm(total=requests, unit="req", disable=not progress, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 5)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < requests and (deadline is None or time.monotonic() < deadline):
            issued += 1
            started = time.monotonic()
            try:
                async with session.request(method, url, data=body) as response:
                    await response.read()
                    latency = time.monotonic() - started
                    result.statuses[response.status] += 1
                    result.latencies.append(latency)
                    result.by_status.setdefault(response.status, []).append(latency)
            except (aiohttp.ClientError, TimeoutError) as error:
                result.errors[type(error).__name__] += 1
            bar.update()

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        if warm_up:
            await asyncio.gather(*(fetch(session, url, method, body) for _ in range(concurrency)),
                                 return_exceptions=True)
        started = time.monotonic()
        deadline = started + duration if duration else None
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.elapsed = time.monotonic() - started
    bar.close()
    return result


async def fetch(session: aiohttp.ClientSession, url: str, method: str, body: bytes | None) -> None:
    async with session.request(method, url, data=body) as response:
        await response.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1000, help="at most this many")
    parser.add_argument("--duration", type=float, help="and for at most this many seconds")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    parser.add_argument("--warm-up", action="store_true",
                        help="one unmeasured request per connection before measuring")
    args = parser.parse_args()
    if args.concurrency < 1 or args.requests < 1:
        parser.error("--concurrency and --requests must be at least 1")
    result = asyncio.run(run_load(args.url, args.concurrency, args.requests, args.duration,
                                  args.method, args.timeout, warm_up=args.warm_up))
    summary = {"url": args.url, "concurrency": args.concurrency, **result.summary()}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
