"""Choosing fileproxy's defaults on a bad network: sudo ./run.sh bench tuning --profile poor

One topology (benchmarks/topology.py, the profile on --impaired), one origin, and fileproxy started
once per variant of the settings the bad-network issue asks about: congestion control on the
proxy's sockets, TCP_NODELAY, socket buffer sizes, the socket relay's mover and the response read
size (which only matters where bodies go through aiohttp's streams, so those variants turn the
socket relay off). Every variant is measured on the same workloads as `bench net` (a large
download: goodput and TTFB; small requests: rate and p99), interleaved, --repeat times. Writes a
table, JSON, markdown and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from benchmarks.common import RESULTS, markdown_table, progress, save_results
from benchmarks.net import (
    SCENARIOS,
    Run,
    chart,
    download,
    figure,
    load_run,
    open_origin,
    small_requests,
    verify_links,
)
from benchmarks.targets import Place, Running, Workdir, start_fileproxy
from benchmarks.topology import PROXY_CLIENT_SIDE, Topology, require_root_and_ip

# name -> fileproxy flags; "default" is what fileproxy ships with.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "cubic": ["--tcp-congestion", "cubic"],
    "no nodelay": ["--no-tcp-nodelay"],
    "buffers 4m": ["--socket-sndbuf", "4m", "--socket-rcvbuf", "4m"],
    "buffers 64k": ["--socket-sndbuf", "64k", "--socket-rcvbuf", "64k"],
    "splice relay": ["--socket-relay", "splice"],
    "streams, read 64k": ["--socket-relay", "off", "--read-size", "64k"],
    "streams, read 256k": ["--socket-relay", "off", "--read-size", "256k"],
    "streams, read 1m": ["--socket-relay", "off", "--read-size", "1m"],
}


def measure(run: Run, topology: Topology, work: Workdir, variants: dict[str, list[str]]
            ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    origin = open_origin(run, topology, work)
    origin_running = origin.running
    place = Place(PROXY_CLIENT_SIDE, topology.proxy)
    started: dict[str, Running] = {}
    for name, flags in variants.items():
        started[name] = replace(start_fileproxy(origin_running, work, flags, place), name=name)
    workloads = {"download": download, "small": small_requests}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in workloads}
    repeat = 1 if run.quick else run.defaults.get("repeat", 3)
    steps, step = len(workloads) * repeat * len(started), 0
    try:
        for workload_name, workload in workloads.items():
            for rep in range(repeat):
                for name, target in started.items():
                    step += 1
                    figures = workload(topology, target, run, work, origin)
                    results[workload_name].setdefault(name, []).append(figures)
                    progress(f"[{step}/{steps}] {workload_name} #{rep + 1} {name}: {figures}")
    finally:
        for target in started.values():
            target.stop()
        origin_running.stop()
    return results


def report(run: Run, results: dict[str, Any], variants: dict[str, list[str]],
           checks: list[dict[str, Any]], valid: bool) -> str:
    def cell(workload: str, name: str, key: str) -> str:
        mid, low, high = figure(results[workload].get(name, []), key)
        return "-" if mid != mid else f"{mid:g} ({low:g}-{high:g})"

    rows = [[name, " ".join(variants[name]) or "(shipped defaults)",
             cell("download", name, "mbit"), cell("download", name, "share_of_link"),
             cell("download", name, "ttfb_ms"), cell("small", name, "rps"),
             cell("small", name, "p99_ms"),
             "yes" if all(r["intact"] for r in results["download"].get(name, [])) else "NO"]
            for name in variants]
    profile = run.profile
    checks_line = ", ".join(f"{c['check']} {c['measured']} ({'ok' if c['ok'] else 'OFF'})"
                            for c in checks)
    return (f"Profile `{run.profile_name}` on {run.impaired_links} (RTT {profile['rtt_ms']} ms, "
            f"{profile['rate_mbit'] or 'unlimited'} Mbit/s, {profile['loss'] * 100:g}% loss); "
            f"small requests at concurrency {min(int(profile['concurrency']), 100)}; "
            f"{'VALID' if valid else 'INVALID'} link checks: {checks_line}.\n\n"
            "Median (min-max) of interleaved runs:\n\n"
            + markdown_table(["variant", "flags", "download Mbit/s", "share of link", "TTFB ms",
                              "small req/s", "small p99 ms", "intact"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="poor")
    parser.add_argument("--impaired", choices=("client", "origin", "both"), default="client")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--transfer-seconds", type=float, default=8)
    parser.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--scenarios", default=str(SCENARIOS))
    args = parser.parse_args()
    require_root_and_ip()
    chosen = VARIANTS if not args.variants else \
        {name: VARIANTS[name] for name in args.variants.split(",")}
    args.quick = False
    run = load_run(args)
    run.profile = {**run.profile, "concurrency": min(int(run.profile["concurrency"]), 100)}
    work = Workdir()
    with Topology(emulation=run.defaults.get("emulator", "auto")) as topology:
        try:
            progress(f"building namespaces {topology.prefix}[c|p|o]")
            topology.build(run.netem_spec("client"), run.netem_spec("origin"),
                           run.defaults.get("congestion", {}))
            checks, valid = verify_links(topology, run)
            results = measure(run, topology, work, chosen)
        finally:
            work.remove()
    markdown = report(run, results, chosen, checks, valid)
    print(markdown)
    name = f"tuning-{run.profile_name}-{run.impaired}"
    paths = save_results(name, {"profile": run.profile, "impaired": run.impaired, "valid": valid,
                                "link_checks": checks, "variants": chosen, "results": results},
                         markdown)
    png = RESULTS / f"{name}-latest.png"
    chart(run, results, png, title=f"fileproxy settings on {run.profile_name}, "
                                   f"{run.impaired_links} impaired")
    progress(f"saved {paths[0]}, {paths[1]} and {png}")


if __name__ == "__main__":
    main()
