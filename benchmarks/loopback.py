"""Loopback benchmark: direct vs fileproxy vs nginx (and HAProxy, Caddy, a naive aiohttp proxy).

    ./run.sh bench loopback [--repeat 3] [--quick]

Figures are medians of interleaved runs (min-max beside them): 1 GiB download and upload MB/s,
16 parallel 100 MiB downloads aggregate MB/s, 1 KiB requests/s and p99 at 64 connections (wrk),
CPU seconds per GiB streamed and peak RSS per process of each proxy. Results go to
benchmarks/results/loopback-*.{json,md}.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.common import RssMonitor, cpu_seconds, markdown_table, median, progress, save_results
from benchmarks.targets import Running, Workdir, origin_path, start_origin, start_proxies

MB = 1_000_000
GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    big: int
    parallel_size: int
    parallel: int
    small_seconds: int
    small_connections: int
    repeat: int

    @property
    def sizes(self) -> dict[str, int]:
        return {"big.bin": self.big, "parallel.bin": self.parallel_size, "small.bin": 1024}


Figures = dict[str, float]


def curl(args: list[str]) -> tuple[float, int, int]:
    """Run curl; return (seconds, bytes moved, HTTP status)."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "600",
                          "-w", "%{time_total} %{size_download} %{size_upload} %{http_code}", *args],
                         capture_output=True, text=True, check=False).stdout.split()
    seconds, down, up, status = float(out[0]), int(out[1]), int(out[2]), int(out[3])
    return seconds, max(down, up), status


def measured(target: Running, run: Callable[[], Figures]) -> Figures:
    """Run a workload while sampling the target's CPU time and peak RSS."""
    if target.pid is None:
        return run()
    cpu_before = cpu_seconds(target.pid)
    with RssMonitor(target.pid) as rss:
        figures = run()
    figures["cpu_s"] = cpu_seconds(target.pid) - cpu_before
    figures["peak_rss_mib"] = rss.peak_per_process / 2**20
    return figures


def download(target: Running, origin: Running, plan: Plan) -> Figures:
    url = target.url + origin_path(origin, "big.bin", plan.big)
    seconds, size, status = curl([url])
    if status != 200 or size != plan.big:
        raise RuntimeError(f"{target.name}: download got {status}, {size} bytes")
    return {"MBps": size / seconds / MB}


def upload(target: Running, origin: Running, plan: Plan, work: Workdir) -> Figures:
    path = "/upload/big.bin" if "nginx" in origin.name else "/echo/upload"
    seconds, size, status = curl(["-T", str(work.path / "files" / "big.bin"), target.url + path])
    if status not in (200, 201, 204) or size != plan.big:
        raise RuntimeError(f"{target.name}: upload got {status}, {size} bytes")
    return {"MBps": size / seconds / MB}


def parallel_downloads(target: Running, origin: Running, plan: Plan) -> Figures:
    url = target.url + origin_path(origin, "parallel.bin", plan.parallel_size)
    started = time.monotonic()
    procs = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", url],
                              stdout=subprocess.PIPE, text=True) for _ in range(plan.parallel)]
    total = sum(int(proc.communicate()[0] or 0) for proc in procs)
    elapsed = time.monotonic() - started
    if total != plan.parallel * plan.parallel_size:
        raise RuntimeError(f"{target.name}: parallel downloads moved {total} bytes")
    return {"MBps": total / elapsed / MB}


def wrk_line(target: Running, pattern: str, out: str) -> re.Match[str]:
    """The figure `pattern` finds in wrk's report, or an error showing what wrk printed."""
    match = re.search(pattern, out)
    if match is None:
        raise RuntimeError(f"{target.name}: no {pattern!r} in what wrk printed:\n{out}")
    return match


def small_requests(target: Running, origin: Running, plan: Plan) -> Figures:
    url = target.url + origin_path(origin, "small.bin", 1024)
    out = subprocess.run(["wrk", "-t2", f"-c{plan.small_connections}", f"-d{plan.small_seconds}s",
                          "--latency", url], capture_output=True, text=True, check=True).stdout
    rps = float(wrk_line(target, r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = wrk_line(target, r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    error_count = int(errors.group(1)) if errors else 0
    if socket_errors:
        error_count += sum(int(n) for n in socket_errors.groups())
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale, "errors": error_count}


def warm_up(workload: str, direct: Running, origin: Running, plan: Plan, work: Workdir) -> None:
    """Unmeasured runs straight to the origin first: the upload sink's first two PUTs of a size
    allocate its tmpfs pages and take about three times as long, which would otherwise fall on
    whichever targets come first in the first round."""
    if workload == "upload":
        for _ in range(2):
            upload(direct, origin, plan, work)


def run_all(plan: Plan, work: Workdir, fileproxy_flags: list[str],
            only: set[str]) -> tuple[dict, list[str]]:
    origin = start_origin(work, plan.sizes)
    (work.path / "files").mkdir(exist_ok=True)
    if not (work.path / "files" / "big.bin").exists():
        with open(work.path / "files" / "big.bin", "wb") as handle:
            handle.truncate(plan.big)
    proxies, notes = start_proxies(origin, work, fileproxy_flags)
    targets = [Running("direct", origin.url, None, note=origin.name), *proxies]
    if origin.note:
        notes.append(origin.note)
    workloads: dict[str, Callable[[Running], Figures]] = {
        "download": lambda t: measured(t, lambda: download(t, origin, plan)),
        "upload": lambda t: measured(t, lambda: upload(t, origin, plan, work)),
        "parallel": lambda t: measured(t, lambda: parallel_downloads(t, origin, plan)),
    }
    if shutil.which("wrk"):
        workloads["small"] = lambda t: measured(t, lambda: small_requests(t, origin, plan))
    else:
        notes.append("wrk not installed: small-request row skipped (apt-get install wrk)")
    workloads = {name: run for name, run in workloads.items() if name in only}
    results: dict[str, dict[str, list[Figures]]] = defaultdict(lambda: defaultdict(list))
    steps, step = len(workloads) * plan.repeat * len(targets), 0
    for name, workload in workloads.items():
        warm_up(name, targets[0], origin, plan, work)
        for rep in range(plan.repeat):
            for target in targets:
                step += 1
                figures = workload(target)
                results[name][target.name].append(figures)
                shown = ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
                progress(f"[{step}/{steps}] {name} #{rep + 1} {target.name}: {shown}")
    for target in targets:
        target.stop()
    origin.stop()
    notes += [f"{t.name}: {t.note}" for t in targets if t.note]
    return {name: dict(rows) for name, rows in results.items()}, notes


def summary(results: dict, plan: Plan) -> tuple[list[list[str]], dict]:
    """One row per target: median (min-max) of each figure, and the ratios the issue asks for."""
    def stat(workload: str, target: str, key: str) -> tuple[float, float, float]:
        values = [f[key] for f in results.get(workload, {}).get(target, []) if key in f]
        return (median(values), min(values), max(values)) if values else (float("nan"),) * 3

    def cell(workload: str, target: str, key: str, digits: int = 0) -> str:
        mid, low, high = stat(workload, target, key)
        return "-" if mid != mid else f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"

    rows, medians = [], {}
    for target in next(iter(results.values())):
        cpu_per_gib = stat("download", target, "cpu_s")[0] / (plan.big / GIB)
        peaks = [stat(w, target, "peak_rss_mib")[2] for w in ("download", "parallel")]
        peak = max((p for p in peaks if p == p), default=float("nan"))
        medians[target] = {
            "download_MBps": stat("download", target, "MBps")[0],
            "upload_MBps": stat("upload", target, "MBps")[0],
            "parallel_MBps": stat("parallel", target, "MBps")[0],
            "small_rps": stat("small", target, "rps")[0],
            "small_p99_ms": stat("small", target, "p99_ms")[0],
            "cpu_s_per_GiB": cpu_per_gib, "peak_rss_mib_per_process": peak,
        }
        rows.append([target, cell("download", target, "MBps"), cell("upload", target, "MBps"),
                     cell("parallel", target, "MBps"), cell("small", target, "rps"),
                     cell("small", target, "p99_ms", 2),
                     "-" if cpu_per_gib != cpu_per_gib else f"{cpu_per_gib:.2f}",
                     "-" if peak != peak else f"{peak:.0f}"])
    return rows, medians


def ratios(medians: dict) -> dict[str, float]:
    fp = medians.get("fileproxy", {})
    out = {}
    for peer in ("nginx", "naive aiohttp", "caddy", "haproxy"):
        if peer in medians:
            for key in ("download_MBps", "upload_MBps", "parallel_MBps", "small_rps"):
                out[f"fileproxy/{peer} {key}"] = fp[key] / medians[peer][key]
    return out


HEADERS = ["target", "1 GiB down MB/s", "1 GiB up MB/s", "parallel down MB/s",
           "1 KiB req/s", "p99 ms", "CPU s/GiB", "peak RSS MiB/proc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per figure")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one run: checks the harness in a minute")
    parser.add_argument("--only", default="download,upload,parallel,small",
                        help="comma-separated workloads to run (default: all four)")
    parser.add_argument("--fileproxy-flag", action="append", default=[],
                        help="extra flag for fileproxy (repeatable), e.g. --fileproxy-flag=--read-size=1M")
    args = parser.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("bench loopback: curl is required (apt-get install curl)")
    plan = Plan(big=GIB, parallel_size=100 << 20, parallel=16, small_seconds=10,
                small_connections=64, repeat=args.repeat)
    if args.quick:
        plan = Plan(big=64 << 20, parallel_size=8 << 20, parallel=16, small_seconds=2,
                    small_connections=64, repeat=1)
    work = Workdir()
    try:
        results, notes = run_all(plan, work, args.fileproxy_flag, set(args.only.split(",")))
    finally:
        work.remove()
    rows, medians = summary(results, plan)
    table = markdown_table(HEADERS, rows)
    ratio_lines = "\n".join(f"- {k}: {v:.2f}x" for k, v in ratios(medians).items())
    markdown = (f"Loopback, 2 workers per proxy, {plan.repeat} interleaved runs; median (min-max).\n\n"
                f"{table}\n\nRatios (medians):\n{ratio_lines}\n\nNotes:\n"
                + "\n".join(f"- {n}" for n in notes))
    print(markdown)
    everything = set(args.only.split(",")) >= {"download", "upload", "parallel", "small"}
    name = "loopback" if everything else "loopback-" + "-".join(sorted(args.only.split(",")))
    paths = save_results(name, {"plan": plan.__dict__, "results": results, "medians": medians,
                                      "ratios": ratios(medians), "notes": notes}, markdown)
    progress(f"saved {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
