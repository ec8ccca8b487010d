"""Load and fault scenarios for admission control and the circuit breaker, on loopback:

    ./run.sh bench faults

1. slow upstream (3 s per request, the Avatar forwarding case): 10 concurrent users;
2. overload: 500 concurrent clients against --max-concurrent 50 --max-queue-size 100 per worker;
3. upstream killed mid-run: the breaker opens and failures are answered in milliseconds.
fileproxy runs under gunicorn with 2 workers in front of tests/origin.py. Results go to
benchmarks/results/faults-*.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from benchmarks.common import (
    RssMonitor,
    free_port,
    markdown_table,
    progress,
    save_results,
    spawn,
    terminate,
    wait_http,
)
from benchmarks.load import latency_ms, run_load


def start_origin() -> tuple[Any, str]:
    port = free_port()
    process = spawn([sys.executable, "-m", "tests.origin", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_origin/events", process)
    return process, url


def start_fileproxy(origin: str, *flags: str) -> tuple[Any, str]:
    port = free_port()
    process = spawn([sys.executable, "-m", "fileproxy", "serve", "--upstream", origin, "--bind",
                     f"127.0.0.1:{port}", "--workers", "2", "--no-access-log", *flags])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_fileproxy/health", process)
    time.sleep(1)  # both workers up
    return process, url


def slow_upstream(origin: str) -> dict[str, Any]:
    proxy, url = start_fileproxy(origin)
    try:
        result = asyncio.run(run_load(f"{url}/slow-headers?delay=3", 10, 10))
    finally:
        terminate(proxy)
    return {"scenario": "10 users, upstream takes 3 s each", **result.summary()}


def overload(origin: str) -> dict[str, Any]:
    proxy, url = start_fileproxy(origin, "--max-concurrent", "50", "--max-queue-size", "100",
                                 "--queue-timeout", "10")
    try:
        with RssMonitor(proxy.pid) as before:
            time.sleep(0.5)
        with RssMonitor(proxy.pid) as during:
            result = asyncio.run(run_load(f"{url}/slow-headers?delay=3", 500, 500, timeout=60))
    finally:
        terminate(proxy)
    return {"scenario": "500 concurrent clients, limit 50 + queue 100 per worker (2 workers), "
                        "upstream 3 s", **result.summary(),
            "rss_mib_per_process": {"idle": round(before.peak_per_process / 2**20, 1),
                                    "peak_under_load": round(during.peak_per_process / 2**20, 1)}}


def upstream_killed() -> dict[str, Any]:
    origin_process, origin = start_origin()
    proxy, url = start_fileproxy(origin, "--circuit-breaker-threshold", "5",
                                 "--circuit-breaker-timeout", "30")
    try:
        async def run() -> Any:
            load = asyncio.create_task(run_load(f"{url}/status/200", 20, 1_000_000, duration=6,
                                                progress=False))
            await asyncio.sleep(1.5)
            terminate(origin_process)
            killed_at = time.monotonic()
            return await load, killed_at

        result, _ = asyncio.run(run())
    finally:
        terminate(proxy)
        terminate(origin_process)
    failures = [lat for status, lats in result.by_status.items() if status >= 500 for lat in lats]
    return {"scenario": "upstream killed 1.5 s into a 6 s load (20 concurrent)",
            **result.counts(), "latency_ms_by_status": {
                str(status): latency_ms(lats) for status, lats in sorted(result.by_status.items())},
            "failure_latency_ms": latency_ms(failures)}


def main() -> None:
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    origin_process, origin = start_origin()
    try:
        progress("1/3 slow upstream, 10 users")
        slow = slow_upstream(origin)
        progress("2/3 overload, 500 clients")
        over = overload(origin)
    finally:
        terminate(origin_process)
    progress("3/3 upstream killed mid-run")
    killed = upstream_killed()
    rows = [
        [slow["scenario"], f"{slow['elapsed_s']} s for all 10", slow["statuses"],
         slow["latency_ms"].get("max")],
        [over["scenario"], f"{over['elapsed_s']} s; none hung: {not over['errors']}",
         over["statuses"], f"503 p99 {over['latency_ms_by_status'].get('503', {}).get('p99')} ms"],
        [killed["scenario"], f"{killed['completed']} answered", killed["statuses"],
         f"5xx p50 {killed['failure_latency_ms'].get('p50')} ms, "
         f"p99 {killed['failure_latency_ms'].get('p99')} ms"],
    ]
    markdown = markdown_table(["scenario", "outcome", "statuses", "latency"], rows)
    markdown += (f"\n\nfileproxy RSS per process under overload: "
                 f"{over['rss_mib_per_process']} MiB")
    print(markdown)
    paths = save_results("faults", {"slow_upstream": slow, "overload": over,
                                    "upstream_killed": killed}, markdown)
    progress(f"saved {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
