"""HTTP/2 against HTTP/1.1 through fileproxy (HTTPS) over an emulated bad link.

    sudo ./run.sh bench h2net --profile poor --impaired client [--repeat 3]

The namespaces and links of `bench net` (benchmarks/net.py, topology.py); fileproxy serves HTTPS
(TLS 1.3) in the proxy namespace. Two workloads, interleaved: a page's worth of small files (100
requests of 1 KiB wanted at once) over one h2 connection (h2load -c 1 -m 100) and over six
HTTP/1.1 connections as a browser opens them (h2load --h1 -c 6 -m 1), timed per request from the
first request's start to each response's end (p50, p99, the last); and one large download over
h2 and over HTTP/1.1 (curl), as a share of the link. Results (markdown, JSON, a PNG) go to
benchmarks/results/h2net-*.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, markdown_table, median, progress, save_results
from benchmarks.net import (
    Origin,
    Run,
    curl,
    file_sha256,
    goodput,
    load_run,
    open_origin,
    run_arguments,
    verify_links,
)
from benchmarks.targets import Place, Running, Workdir, make_certificate, start_fileproxy
from benchmarks.topology import PROXY_CLIENT_SIDE, Topology, require_root_and_ip

FILES = 100  # small files a page wants at once
BROWSER_CONNECTIONS = 6  # HTTP/1.1 connections a browser opens to one host
MODES = {"h2": ["-c", "1", "-m", str(FILES)],
         "HTTP/1.1": ["--h1", "-c", str(BROWSER_CONNECTIONS), "-m", "1"]}
CURL_FLAGS = {"h2": "--http2", "HTTP/1.1": "--http1.1"}


def small_files(topology: Topology, target: Running, origin: Origin, work: Workdir,
                mode: str) -> dict[str, Any]:
    """100 small files at once; per request, milliseconds from the first start to its end."""
    log = work.path / f"h2load-{secrets.token_hex(4)}.tsv"
    result = topology.ns_run(topology.client, "h2load", "-n", str(FILES), *MODES[mode],
                             "--log-file", str(log), f"{target.url}{origin.small()}",
                             check=False)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()] \
        if log.exists() else []
    log.unlink(missing_ok=True)
    if not rows:
        return {"completed": 0, "failed": FILES, "error": result.stdout[-300:]}
    starts = [int(row[0]) for row in rows]
    ends = sorted((int(row[0]) + int(row[2]) - min(starts)) / 1000 for row in rows)
    ok = sum(1 for row in rows if row[1] == "200")
    return {"completed": ok, "failed": FILES - ok, "p50_ms": percentile(ends, 0.5),
            "p99_ms": percentile(ends, 0.99), "last_ms": ends[-1]}


def percentile(sorted_values: list[float], share: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(share * len(sorted_values)) - 1))
    return round(sorted_values[index], 1)


def large_download(topology: Topology, target: Running, origin: Origin, work: Workdir,
                   run: Run, mode: str) -> dict[str, Any]:
    dest = work.path / f"down-{secrets.token_hex(4)}"
    out = curl(topology, run, ["-k", CURL_FLAGS[mode], "-o", str(dest),
                               f"{target.url}{origin.big()}"])
    digest = file_sha256(dest)
    dest.unlink(missing_ok=True)
    return goodput(out, run, "speed_download") | {
        "intact": out["exit"] == 0 and out["http_code"] == 200 and digest == origin.digest}


def measure(run: Run, topology: Topology, work: Workdir, flags: list[str]
            ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    origin = open_origin(run, topology, work)
    cert, key = make_certificate(work)
    place = Place(PROXY_CLIENT_SIDE, topology.proxy)
    proxy = start_fileproxy(origin.running, work, [*flags, "--certfile", cert, "--keyfile",
                                                   key, "--tls-min-version", "1.3"], place)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {"small": {}, "download": {}}
    repeat = 1 if run.quick else run.defaults.get("repeat", 3)
    try:
        for rep in range(repeat):
            for mode in MODES:
                figures = small_files(topology, proxy, origin, work, mode)
                results["small"].setdefault(mode, []).append(figures)
                progress(f"small #{rep + 1} {mode}: {figures}")
            for mode in MODES:
                figures = large_download(topology, proxy, origin, work, run, mode)
                results["download"].setdefault(mode, []).append(figures)
                progress(f"download #{rep + 1} {mode}: {figures}")
    finally:
        proxy.stop()
        origin.running.stop()
    return results


def cell(rows: list[dict[str, Any]], key: str) -> str:
    values = [row[key] for row in rows if row.get(key) is not None]
    if not values:
        return "-"
    return f"{median(values):g} ({min(values):g}-{max(values):g})"


def report(run: Run, results: dict[str, dict[str, list[dict[str, Any]]]],
           checks: list[dict[str, Any]]) -> str:
    small = markdown_table(
        ["protocol", "connections", "p50 ms", "p99 ms", "last ms", "failed"],
        [[mode, "1" if mode == "h2" else str(BROWSER_CONNECTIONS),
          cell(rows, "p50_ms"), cell(rows, "p99_ms"), cell(rows, "last_ms"),
          cell(rows, "failed")] for mode, rows in results["small"].items()])
    large = markdown_table(
        ["protocol", "download Mbit/s", "share of link", "all intact"],
        [[mode, cell(rows, "mbit"), cell(rows, "share_of_link"),
          "yes" if all(row["intact"] for row in rows) else "NO"]
         for mode, rows in results["download"].items()])
    link_rows = [[c["check"], str(c["configured"]), str(c["measured"]),
                  "ok" if c["ok"] else "OFF"] for c in checks]
    return (f"Profile `{run.profile_name}` on the {run.impaired} link, through fileproxy serving "
            f"HTTPS (TLS 1.3); median (min-max) of interleaved runs.\n\n"
            + markdown_table(["check", "configured", "measured", "verdict"], link_rows)
            + f"\n\n{FILES} files of 1 KiB wanted at once: milliseconds from the first request's "
            f"start to each response's end (h2load --log-file):\n\n{small}\n\n"
            f"One {run.transfer_bytes / 1e6:.1f} MB download (curl):\n\n{large}\n")


def chart(results: dict[str, dict[str, list[dict[str, Any]]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 4))
    modes = list(results["small"])
    for key, offset in (("p50_ms", -0.2), ("p99_ms", 0.2)):
        left.bar([i + offset for i in range(len(modes))],
                 [median([r[key] for r in results["small"][m] if key in r] or [0])
                  for m in modes], width=0.4, label=key.removesuffix("_ms"))
    left.set_xticks(range(len(modes)), modes)
    left.set_ylabel(f"ms until a file of {FILES} arrived")
    left.legend()
    right.bar(modes, [median([r["mbit"] for r in results["download"][m]]) for m in modes],
              color=["#2a7", "#36c"])
    right.set_ylabel("large download Mbit/s")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    args = run_arguments(__doc__).parse_args()
    require_root_and_ip()
    run = load_run(args)
    work = Workdir()
    with Topology(emulation=run.defaults.get("emulator", "auto")) as topology:
        try:
            topology.build(run.netem_spec("client"), run.netem_spec("origin"),
                           dict(run.defaults.get("congestion", {})))
            checks, valid = verify_links(topology, run)
            results = measure(run, topology, work, args.fileproxy_flag)
        finally:
            work.remove()
    markdown = report(run, results, checks)
    print(markdown)
    name = f"h2net-{run.profile_name}-{run.impaired}"
    paths = save_results(name, {"valid": valid, "link_checks": checks, "results": results},
                         markdown)
    png = RESULTS / f"{name}-latest.png"
    chart(results, png, f"HTTP/2 vs HTTP/1.1 through fileproxy, {run.profile_name}/"
                        f"{run.impaired}")
    progress(f"saved {paths[0]}, {paths[1]} and {png}")
    if not valid:
        raise SystemExit(3)


if __name__ == "__main__":
    main()
