"""Loopback benchmark: direct vs fileproxy vs nginx (and HAProxy, Caddy, a naive aiohttp proxy).

    ./run.sh bench loopback [--repeat 3] [--quick]

Figures are medians of interleaved runs (min-max beside them): 1 GiB download and upload MB/s,
16 parallel 100 MiB downloads aggregate MB/s, 1 KiB requests/s and p99 at 64 connections (wrk),
CPU seconds per GiB streamed and peak RSS per process of each proxy. TLS rows: fileproxy and
nginx serving HTTPS (TLS 1.3, one cipher), the 1 GiB download over HTTP/1.1 and h2 (curl), and
1 KiB requests over h2 (h2load). Results go to benchmarks/results/loopback-*.{json,md}.
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
from benchmarks.h2floor import cores, floor_note, h2_seconds_per_request
from benchmarks.targets import (
    Running,
    Workdir,
    origin_path,
    start_origin,
    start_proxies,
    start_tls_proxies,
)

MB = 1_000_000
TLS_WORKLOADS = {"tls-h1", "tls-h2", "h2-small"}
ALL_WORKLOADS = "download,upload,parallel,small,tls-h1,tls-h2,h2-small"
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


TLS_CIPHER = "TLS_AES_128_GCM_SHA256"  # what both TLS targets are held to (curl offers only it)


def tls_download(target: Running, origin: Running, plan: Plan, http: str) -> Figures:
    """The 1 GiB download over TLS 1.3 with one cipher, HTTP/1.1 or h2 (`http`: curl's flag)."""
    url = target.url + origin_path(origin, "big.bin", plan.big)
    seconds, size, status = curl(["-k", http, "--tlsv1.3", "--tls13-ciphers", TLS_CIPHER, url])
    if status != 200 or size != plan.big:
        raise RuntimeError(f"{target.name}: TLS download ({http}) got {status}, {size} bytes")
    return {"MBps": size / seconds / MB}


def h2_small_requests(target: Running, origin: Running, plan: Plan) -> Figures:
    """1 KiB requests over h2 (TLS 1.3): h2load, 16 connections of 16 streams each."""
    url = target.url + origin_path(origin, "small.bin", 1024)
    out = subprocess.run(["h2load", "-D", str(plan.small_seconds), "--warm-up-time", "1",
                          "-c", "16", "-m", "16", "-t", "1", url],
                         capture_output=True, text=True, check=False).stdout
    rps = wrk_line(target, r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    done = wrk_line(target, r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, "
                            r"(\d+) failed, (\d+) errored", out)
    if "Application protocol: h2" not in out:
        raise RuntimeError(f"{target.name}: h2load did not speak h2:\n{out}")
    return {"rps": float(rps.group(1)), "failed": float(done.group(2)) + float(done.group(3))}


def warm_up(workload: str, direct: Running, origin: Running, plan: Plan, work: Workdir) -> None:
    """Unmeasured runs straight to the origin first: the upload sink's first two PUTs of a size
    allocate its tmpfs pages, and the origin's first read of the 1 GiB file is a third as fast
    (measured: 382 MB/s, then 1,240), which would otherwise fall on whichever target comes first
    in the first round."""
    if workload == "upload":
        for _ in range(2):
            upload(direct, origin, plan, work)
    elif workload in ("download", "tls-h1", "tls-h2"):
        download(direct, origin, plan)


def run_all(plan: Plan, work: Workdir, fileproxy_flags: list[str],
            only: set[str]) -> tuple[dict, list[str]]:
    origin = start_origin(work, plan.sizes)
    (work.path / "files").mkdir(exist_ok=True)
    if not (work.path / "files" / "big.bin").exists():
        with open(work.path / "files" / "big.bin", "wb") as handle:
            handle.truncate(plan.big)
    proxies, notes = start_proxies(origin, work, fileproxy_flags)
    targets = [Running("direct", origin.url, None, note=origin.name), *proxies]
    tls_targets: list[Running] = []
    if only & TLS_WORKLOADS:
        tls_targets, tls_notes = start_tls_proxies(origin, work, fileproxy_flags)
        notes += tls_notes
    if origin.note:
        notes.append(origin.note)
    workloads: dict[str, Callable[[Running], Figures]] = {
        "download": lambda t: measured(t, lambda: download(t, origin, plan)),
        "upload": lambda t: measured(t, lambda: upload(t, origin, plan, work)),
        "parallel": lambda t: measured(t, lambda: parallel_downloads(t, origin, plan)),
        "tls-h1": lambda t: measured(t, lambda: tls_download(t, origin, plan, "--http1.1")),
        "tls-h2": lambda t: measured(t, lambda: tls_download(t, origin, plan, "--http2")),
    }
    if shutil.which("wrk"):
        workloads["small"] = lambda t: measured(t, lambda: small_requests(t, origin, plan))
    else:
        notes.append("wrk not installed: small-request row skipped (apt-get install wrk)")
    if shutil.which("h2load"):
        workloads["h2-small"] = lambda t: measured(t, lambda: h2_small_requests(t, origin, plan))
    else:
        notes.append("h2load not installed: h2 small-request row skipped "
                     "(apt-get install nghttp2-client)")
    workloads = {name: run for name, run in workloads.items() if name in only}
    results: dict[str, dict[str, list[Figures]]] = defaultdict(lambda: defaultdict(list))
    steps = sum(len(tls_targets if name in TLS_WORKLOADS else targets) for name in workloads) \
        * plan.repeat
    step = 0
    for name, workload in workloads.items():
        warm_up(name, targets[0], origin, plan, work)
        for rep in range(plan.repeat):
            for target in (tls_targets if name in TLS_WORKLOADS else targets):
                step += 1
                figures = workload(target)
                results[name][target.name].append(figures)
                shown = ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
                progress(f"[{step}/{steps}] {name} #{rep + 1} {target.name}: {shown}")
    for target in [*targets, *tls_targets]:
        target.stop()
    origin.stop()
    notes += [f"{t.name}: {t.note}" for t in [*targets, *tls_targets] if t.note]
    return {name: dict(rows) for name, rows in results.items()}, notes


def stat(results: dict, workload: str, target: str, key: str) -> tuple[float, float, float]:
    values = [f[key] for f in results.get(workload, {}).get(target, []) if key in f]
    return (median(values), min(values), max(values)) if values else (float("nan"),) * 3


def cell(results: dict, workload: str, target: str, key: str, digits: int = 0) -> str:
    mid, low, high = stat(results, workload, target, key)
    return "-" if mid != mid else f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def targets_of(results: dict, workloads: set[str]) -> list[str]:
    return list(dict.fromkeys(target for name, rows in results.items() if name in workloads
                              for target in rows))


def summary(results: dict, plan: Plan) -> tuple[list[list[str]], dict]:
    """One row per clear-text target: median (min-max) of each figure; the medians."""
    rows, medians = [], {}
    for target in targets_of(results, set(results) - TLS_WORKLOADS):
        cpu_per_gib = stat(results, "download", target, "cpu_s")[0] / (plan.big / GIB)
        peaks = [stat(results, w, target, "peak_rss_mib")[2] for w in ("download", "parallel")]
        peak = max((p for p in peaks if p == p), default=float("nan"))
        medians[target] = {
            "download_MBps": stat(results, "download", target, "MBps")[0],
            "upload_MBps": stat(results, "upload", target, "MBps")[0],
            "parallel_MBps": stat(results, "parallel", target, "MBps")[0],
            "small_rps": stat(results, "small", target, "rps")[0],
            "small_p99_ms": stat(results, "small", target, "p99_ms")[0],
            "cpu_s_per_GiB": cpu_per_gib, "peak_rss_mib_per_process": peak,
        }
        rows.append([target, cell(results, "download", target, "MBps"),
                     cell(results, "upload", target, "MBps"),
                     cell(results, "parallel", target, "MBps"),
                     cell(results, "small", target, "rps"),
                     cell(results, "small", target, "p99_ms", 2),
                     "-" if cpu_per_gib != cpu_per_gib else f"{cpu_per_gib:.2f}",
                     "-" if peak != peak else f"{peak:.0f}"])
    return rows, medians


def tls_summary(results: dict) -> tuple[list[list[str]], dict]:
    """One row per TLS target: the 1 GiB download over HTTP/1.1 and h2, h2 small requests."""
    rows, medians = [], {}
    for target in targets_of(results, TLS_WORKLOADS):
        medians[target] = {
            "tls_h1_download_MBps": stat(results, "tls-h1", target, "MBps")[0],
            "tls_h2_download_MBps": stat(results, "tls-h2", target, "MBps")[0],
            "h2_small_rps": stat(results, "h2-small", target, "rps")[0],
            "h2_small_failed": stat(results, "h2-small", target, "failed")[2],
        }
        rows.append([target, cell(results, "tls-h1", target, "MBps"),
                     cell(results, "tls-h2", target, "MBps"),
                     cell(results, "h2-small", target, "rps"),
                     cell(results, "h2-small", target, "failed")])
    return rows, medians


def ratios(medians: dict) -> dict[str, float]:
    out = {}
    fp = medians.get("fileproxy", {})
    for peer in ("nginx", "naive aiohttp", "caddy", "haproxy"):
        if peer in medians and fp:
            for key in ("download_MBps", "upload_MBps", "parallel_MBps", "small_rps"):
                out[f"fileproxy/{peer} {key}"] = fp[key] / medians[peer][key]
    tls, nginx_tls = medians.get("fileproxy TLS", {}), medians.get("nginx TLS", {})
    if tls and nginx_tls:
        for key in ("tls_h1_download_MBps", "tls_h2_download_MBps", "h2_small_rps"):
            out[f"fileproxy TLS/nginx TLS {key}"] = tls[key] / nginx_tls[key]
    return {name: ratio for name, ratio in out.items() if ratio == ratio}  # (NaN: not run)


HEADERS = ["target", "1 GiB down MB/s", "1 GiB up MB/s", "parallel down MB/s",
           "1 KiB req/s", "p99 ms", "CPU s/GiB", "peak RSS MiB/proc"]
TLS_HEADERS = ["target", "1 GiB down HTTP/1.1 MB/s", "1 GiB down h2 MB/s", "h2 1 KiB req/s",
               "h2 failed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per figure")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one run: checks the harness in a minute")
    parser.add_argument("--only", default=ALL_WORKLOADS,
                        help=f"comma-separated workloads to run (default: all: {ALL_WORKLOADS})")
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
    tls_rows, tls_medians = tls_summary(results)
    medians.update(tls_medians)
    nginx_h2 = tls_medians.get("nginx TLS", {}).get("h2_small_rps")
    if nginx_h2 and nginx_h2 == nginx_h2:  # (NaN when the row did not run)
        notes.append(floor_note(min(h2_seconds_per_request() for _ in range(3)), nginx_h2,
                                cores()))
    tables = [markdown_table(HEADERS, rows)] if rows else []
    if tls_rows:
        tables.append(f"TLS 1.3 ({TLS_CIPHER}, curl and h2load as clients; h2load: 16 "
                      f"connections x 16 streams for {plan.small_seconds} s):\n\n"
                      + markdown_table(TLS_HEADERS, tls_rows))
    ratio_lines = "\n".join(f"- {k}: {v:.2f}x" for k, v in ratios(medians).items())
    markdown = (f"Loopback, 2 workers per proxy, {plan.repeat} interleaved runs; median (min-max).\n\n"
                + "\n\n".join(tables) + f"\n\nRatios (medians):\n{ratio_lines}\n\nNotes:\n"
                + "\n".join(f"- {n}" for n in notes))
    print(markdown)
    everything = set(args.only.split(",")) >= set(ALL_WORKLOADS.split(","))
    name = "loopback" if everything else "loopback-" + "-".join(sorted(args.only.split(",")))
    paths = save_results(name, {"plan": plan.__dict__, "results": results, "medians": medians,
                                      "ratios": ratios(medians), "notes": notes}, markdown)
    progress(f"saved {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
