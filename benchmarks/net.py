"""Bad-network benchmark: client / proxy / origin namespaces over emulated links.

    sudo ./run.sh bench net --profile poor --impaired client [--repeat 3] [--quick]

Builds the namespaces (benchmarks/topology.py), impairs the chosen link(s) with the user-space
TUN delay line (benchmarks/netem.py; this kernel has no netem qdisc), verifies RTT, loss and rate
before measuring, then measures direct / fileproxy / nginx / naive aiohttp side by side, interleaved:
small requests at the profile's concurrency, a large download and a large upload. Prints a table and
writes JSON, markdown and a PNG chart under benchmarks/results/. Removes everything on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import secrets
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, markdown_table, median, progress, save_results, terminate
from benchmarks.targets import Place, Running, Workdir, start_fileproxy, start_origin, start_proxies
from benchmarks.topology import (
    CLIENT_ADDR,
    EMULATIONS,
    ORIGIN_ADDR,
    PROXY_CLIENT_SIDE,
    PROXY_ORIGIN_SIDE,
    HarnessError,
    Topology,
    require_root_and_ip,
)
from tests.pattern import pattern_sha256

SCENARIOS = Path(__file__).with_name("scenarios.toml")
PROBE_PORT = 9999
LAN = {"rtt_ms": 0, "jitter_ms": 0, "rate_mbit": 0, "loss": 0.0}


@dataclass
class Origin:
    """Where the workloads find things on the origin, and what a download must hash to."""

    running: Running
    big_size: int
    digest: str

    @property
    def nginx(self) -> bool:
        return "nginx" in self.running.name

    def big(self) -> str:
        return "/big.bin" if self.nginx else f"/bytes/{self.big_size}"

    def small(self) -> str:
        return "/small.bin" if self.nginx else "/bytes/1024"

    def upload(self, name: str) -> str:
        return f"/upload/{name}" if self.nginx else f"/echo/{name}"


@dataclass
class Run:
    profile_name: str
    profile: dict[str, Any]
    defaults: dict[str, Any]
    impaired: str
    quick: bool

    def link(self, side: str) -> dict[str, Any]:
        """The profile on the impaired side(s), lan elsewhere."""
        return self.profile if self.impaired in (side, "both") else LAN

    def netem_spec(self, side: str) -> dict[str, Any]:
        link = self.link(side)
        return {"delay_ms": link["rtt_ms"] / 2, "jitter_ms": link["jitter_ms"] / 2,
                "rate_mbit": link["rate_mbit"], "loss": link["loss"],
                "queue_ms": self.defaults.get("queue_ms", 100)}

    @property
    def impaired_links(self) -> str:
        return "both links" if self.impaired == "both" else f"the {self.impaired} link"

    @property
    def bottleneck_mbit(self) -> float:
        rates = [self.link(side)["rate_mbit"] for side in ("client", "origin")]
        limited = [rate for rate in rates if rate]
        return min(limited) if limited else 0.0

    @property
    def transfer_bytes(self) -> int:
        cap = self.defaults.get("max_transfer_mib", 256) << 20
        seconds = 4 if self.quick else self.defaults.get("transfer_seconds", 20)
        if not self.bottleneck_mbit:
            return (16 << 20) if self.quick else cap
        return min(cap, int(self.bottleneck_mbit * 1e6 / 8 * seconds))


# ---------------------------------------------------------------- link verification

def verify_links(topology: Topology, run: Run) -> tuple[list[dict[str, Any]], bool]:
    """Measure RTT and loss client->proxy and proxy->origin, and the bottleneck rate in the
    direction downloads take; compare with the configuration. More than 20% off: invalid run."""
    checks = []
    count = 200 if run.quick else 500
    for side, source, echo_ns, echo_addr in (
            ("client", topology.client, topology.proxy, PROXY_CLIENT_SIDE),
            ("origin", topology.proxy, topology.origin, ORIGIN_ADDR)):
        with probe_server(topology, echo_ns, echo_addr):
            measured = probe(topology, source, "rtt", echo_addr, str(count))
        link = run.link(side)
        checks.append(check(f"{side} link RTT ms", link["rtt_ms"], measured["rtt_ms"], slack=2.0))
        checks.append(check(f"{side} link loss (each way)", link["loss"], measured["loss"],
                            slack=2.5 * math.sqrt(max(link["loss"], 0.001) / count)))
    if run.bottleneck_mbit:
        limited_client = bool(run.link("client")["rate_mbit"])
        sender = topology.proxy if limited_client else topology.origin
        sink_ns, sink_addr = (topology.client, CLIENT_ADDR) if limited_client \
            else (topology.proxy, PROXY_ORIGIN_SIDE)
        with probe_server(topology, sink_ns, sink_addr):
            measured = probe(topology, sender, "rate", sink_addr, "2" if run.quick else "4",
                             str(run.bottleneck_mbit))
        checks.append(check("bottleneck rate Mbit/s", run.bottleneck_mbit, measured["mbit"],
                            slack=0.0))
    return checks, all(c["ok"] for c in checks)


@contextlib.contextmanager
def probe_server(topology: Topology, namespace: str, address: str) -> Iterator[None]:
    server = topology.spawn_in(namespace, [sys.executable, "-m", "benchmarks.netprobe", "serve",
                                           address, str(PROBE_PORT)])
    time.sleep(0.5)
    try:
        yield
    finally:
        terminate(server)


def probe(topology: Topology, namespace: str, mode: str, target: str, *args: str
          ) -> dict[str, Any]:
    out = topology.ns_run(namespace, sys.executable, "-m", "benchmarks.netprobe", mode, target,
                          str(PROBE_PORT), *args).stdout
    return json.loads(out)


def check(name: str, configured: float, measured: float, slack: float) -> dict[str, Any]:
    """Within 20% of the configured value (plus an absolute slack for tiny values)."""
    ok = abs(measured - configured) <= 0.2 * configured + slack
    return {"check": name, "configured": configured, "measured": measured, "ok": ok}


# ---------------------------------------------------------------- workloads (in the client ns)

def small_requests(topology: Topology, target: Running, run: Run, work: Workdir,
                   origin: Origin) -> dict[str, Any]:
    out = work.path / f"load-{secrets.token_hex(4)}.json"
    seconds = 3 if run.quick else run.defaults.get("small_seconds", 10)
    topology.ns_run(topology.client, sys.executable, "-m", "benchmarks.load", "--url",
                    f"{target.url}{origin.small()}", "--concurrency", str(concurrency(run)),
                    "--requests", "100000000", "--duration", str(seconds), "--timeout", "60",
                    "--warm-up", "--json", str(out), check=False)
    summary = json.loads(out.read_text())
    return {"rps": summary["requests_per_s"], "p50_ms": summary["latency_ms"].get("p50"),
            "p95_ms": summary["latency_ms"].get("p95"),
            "p99_ms": summary["latency_ms"].get("p99"),
            "errors": sum(summary["errors"].values()) +
            sum(v for k, v in summary["statuses"].items() if int(k) >= 400)}


def concurrency(run: Run) -> int:
    wanted = int(run.profile["concurrency"])
    return min(wanted, 100) if run.quick else wanted


def download(topology: Topology, target: Running, run: Run, work: Workdir,
             origin: Origin) -> dict[str, Any]:
    dest = work.path / f"down-{secrets.token_hex(4)}"
    out = curl(topology, run, ["-o", str(dest), f"{target.url}{origin.big()}"])
    digest = file_sha256(dest)
    dest.unlink(missing_ok=True)
    figures = goodput(out, run, "speed_download")
    figures["ttfb_ms"] = round(out["time_starttransfer"] * 1000, 1)
    figures["intact"] = out["http_code"] == 200 and digest == origin.digest
    return figures


def upload(topology: Topology, target: Running, run: Run, work: Workdir,
           origin: Origin) -> dict[str, Any]:
    out = curl(topology, run, ["-T", str(work.path / "files" / "big.bin"),
                               f"{target.url}{origin.upload(secrets.token_hex(4))}",
                               "-o", "/dev/null"])
    figures = goodput(out, run, "speed_upload")
    figures["intact"] = out["http_code"] in (200, 201, 204) and \
        out["size_upload"] == run.transfer_bytes
    return figures


CURL_FIELDS = ("speed_download", "speed_upload", "time_starttransfer", "size_upload",
               "http_code", "time_total")


def curl(topology: Topology, run: Run, args: list[str]) -> dict[str, Any]:
    # A cubic flow on a lossy link can run at a twentieth of the link rate: leave it the time.
    limit = str(int(40 * run.defaults.get("transfer_seconds", 20) + 120))
    template = " ".join("%{" + name + "}" for name in CURL_FIELDS)
    result = topology.ns_run(topology.client, "curl", "-s", "--max-time", limit, "-w", template,
                             *args, check=False)
    values = (result.stdout.split() + ["0"] * len(CURL_FIELDS))[:len(CURL_FIELDS)]
    return {name: float(value) if "." in value else int(value)
            for name, value in zip(CURL_FIELDS, values, strict=True)}


def goodput(out: dict[str, Any], run: Run, field: str) -> dict[str, Any]:
    mbit = out[field] * 8 / 1e6
    share = round(mbit / run.bottleneck_mbit, 3) if run.bottleneck_mbit else None
    return {"mbit": round(mbit, 2), "share_of_link": share, "seconds": out["time_total"]}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    if path.exists():
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def make_random_files(work: Workdir, size: int) -> None:
    files = work.path / "files"
    files.mkdir(parents=True, exist_ok=True)
    with open(files / "big.bin", "wb") as handle:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 1 << 20))
            handle.write(block)
            remaining -= len(block)
    (files / "small.bin").write_bytes(os.urandom(1024))


# ---------------------------------------------------------------- the run

def open_origin(run: Run, topology: Topology, work: Workdir) -> Origin:
    """Random files of the run's transfer size, served in the origin namespace."""
    make_random_files(work, run.transfer_bytes)
    running = start_origin(work, {}, Place(ORIGIN_ADDR, topology.origin))
    return Origin(running, run.transfer_bytes,
                  file_sha256(work.path / "files" / "big.bin") if "nginx" in running.name
                  else pattern_sha256(run.transfer_bytes))


WORKLOADS = ("small", "download", "upload")


def measure(run: Run, topology: Topology, work: Workdir, fileproxy_flags: list[str],
            chosen: tuple[str, ...] = WORKLOADS, variants: dict[str, list[str]] | None = None
            ) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], list[str]]:
    origin = open_origin(run, topology, work)
    running = origin.running
    place = Place(PROXY_CLIENT_SIDE, topology.proxy)
    proxies, notes = start_proxies(running, work, fileproxy_flags, place, peers=("nginx",))
    for label, flags in (variants or {}).items():  # more fileproxy rows, after the default one
        variant = start_fileproxy(running, work, [*fileproxy_flags, *flags], place)
        proxies.insert(1, replace(variant, name=f"fileproxy {label}"))
    targets = [Running("direct", running.url, None, note="routed through the proxy namespace"),
               *proxies]
    workloads = {name: workload for name, workload in
                 (("small", small_requests), ("download", download), ("upload", upload))
                 if name in chosen}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in WORKLOADS}
    repeat = 1 if run.quick else run.defaults.get("repeat", 3)
    steps, step = len(workloads) * repeat * len(targets), 0
    for name, workload in workloads.items():
        for rep in range(repeat):
            for target in targets:
                step += 1
                figures = workload(topology, target, run, work, origin)
                results[name].setdefault(target.name, []).append(figures)
                progress(f"[{step}/{steps}] {name} #{rep + 1} {target.name}: {figures}")
    for target in proxies:
        target.stop()
    running.stop()
    notes += [f"{t.name}: {t.note}" for t in targets if t.note]
    return results, notes


def measured_targets(results: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(target for workload in WORKLOADS
                              for target in results.get(workload, {})))


def figure(rows: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    values = [row[key] for row in rows if row.get(key) is not None]
    return (median(values), min(values), max(values)) if values else (math.nan,) * 3


def report(run: Run, results: dict[str, Any], checks: list[dict[str, Any]], valid: bool,
           notes: list[str], congestion: dict[str, str], fileproxy_cc: str,
           emulation: str) -> str:
    def cell(workload: str, target: str, key: str) -> str:
        mid, low, high = figure(results[workload].get(target, []), key)
        return "-" if mid != mid else f"{mid:g} ({low:g}-{high:g})"

    headers = ["target", "req/s", "p50 ms", "p99 ms", "errors", "download Mbit/s",
               "share of link", "TTFB ms", "upload Mbit/s", "all intact"]
    rows = []
    for target in measured_targets(results):
        intact = all(r["intact"] for w in ("download", "upload")
                     for r in results[w].get(target, []))
        rows.append([target, cell("small", target, "rps"), cell("small", target, "p50_ms"),
                     cell("small", target, "p99_ms"), cell("small", target, "errors"),
                     cell("download", target, "mbit"), cell("download", target, "share_of_link"),
                     cell("download", target, "ttfb_ms"), cell("upload", target, "mbit"),
                     "yes" if intact else "NO"])
    link_rows = [[c["check"], c["configured"], c["measured"], "ok" if c["ok"] else "OFF"]
                 for c in checks]
    profile = run.profile
    head = (f"Profile `{run.profile_name}` on {run.impaired_links}: RTT {profile['rtt_ms']} "
            f"+- {profile['jitter_ms']} ms, {profile['rate_mbit'] or 'unlimited'} Mbit/s, "
            f"{profile['loss'] * 100:g}% loss each way; concurrency {concurrency(run)} "
            f"(small requests measured on established connections, after one unmeasured "
            f"request each); "
            f"congestion control {congestion}; fileproxy --tcp-congestion "
            f"{fileproxy_cc or 'auto (its default: bbr where the kernel has it)'}; "
            f"links: {emulation}.")
    validity = "" if valid else ("\n\n**INVALID RUN: the emulated links were more than 20% off "
                                 "their configuration (see the link checks).**")
    return (f"{head}{validity}\n\nLink checks (measured before the run):\n\n"
            f"{markdown_table(['check', 'configured', 'measured', 'verdict'], link_rows)}\n\n"
            f"Median (min-max) of interleaved runs:\n\n{markdown_table(headers, rows)}\n\n"
            "Notes:\n" + "\n".join(f"- {note}" for note in notes))


def chart(run: Run, results: dict[str, Any], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = measured_targets(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, workload, key, heading in ((left, "download", "mbit", "download goodput (Mbit/s)"),
                                         (right, "small", "p99_ms", "small requests p99 (ms)")):
        axis.set_title(heading)
        if not results.get(workload):
            axis.text(0.5, 0.5, "not measured in this run", ha="center", va="center",
                      transform=axis.transAxes)
            axis.set_xticks([])
            axis.set_yticks([])
            continue
        mids, errs = [], [[], []]
        for target in targets:
            mid, low, high = figure(results[workload].get(target, []), key)
            mids.append(0 if mid != mid else mid)
            errs[0].append(0 if mid != mid else mid - low)
            errs[1].append(0 if mid != mid else high - mid)
        axis.bar(targets, mids, yerr=errs, capsize=4,
                 color=["#888", "#2a7", "#36c", "#c63", "#999"][:len(targets)])
        axis.tick_params(axis="x", rotation=20)
    if results.get("download") and run.bottleneck_mbit:
        left.axhline(run.bottleneck_mbit, color="k", linestyle="--", linewidth=1)
        left.text(0, run.bottleneck_mbit * 1.02, "link rate", fontsize=8)
    fig.suptitle(title or f"fileproxy bench net: {run.profile_name} on {run.impaired_links}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_run(args: argparse.Namespace) -> Run:
    scenario = tomllib.loads(Path(args.scenarios).read_text())
    profiles = scenario.get("profiles", {})
    if args.profile not in profiles:
        raise HarnessError(f"bench net: no profile {args.profile!r} in {args.scenarios} "
                           f"(have: {', '.join(profiles)})")
    defaults = scenario.get("defaults", {})
    if args.repeat:
        defaults["repeat"] = args.repeat
    if args.transfer_seconds:
        defaults["transfer_seconds"] = args.transfer_seconds
    return Run(args.profile, profiles[args.profile], defaults, args.impaired, args.quick)


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """--variant LABEL=FLAGS, e.g. 'segments=--upstream-segments 4'."""
    variants = {}
    for spec in specs:
        label, _, flags = spec.partition("=")
        if not label or not flags:
            raise HarnessError(f"bench net: --variant takes LABEL=FLAGS, got {spec!r}")
        variants[label] = shlex.split(flags)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="poor")
    parser.add_argument("--impaired", choices=("client", "origin", "both"), default="client")
    parser.add_argument("--repeat", type=int, help="override the scenario file's repeat")
    parser.add_argument("--quick", action="store_true", help="short transfers, one repetition")
    parser.add_argument("--transfer-seconds", type=float,
                        help="override the scenario file's transfer_seconds")
    parser.add_argument("--scenarios", default=str(SCENARIOS))
    parser.add_argument("--fileproxy-flag", action="append", default=[])
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                        help="another fileproxy row with these flags, e.g. "
                             "'segments=--upstream-segments 4'")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of: " + ", ".join(WORKLOADS))
    parser.add_argument("--emulator", choices=EMULATIONS, default=None,
                        help="how links are emulated (default: the scenario's, else auto: "
                             "netem where the kernel has it, else the user-space TUN delay line)")
    parser.add_argument("--congestion", action="append", default=[], metavar="ROLE=NAME",
                        help="a namespace's default congestion control, e.g. proxy=bbr "
                             "(roles: client, proxy, origin)")
    args = parser.parse_args()
    require_root_and_ip()
    run = load_run(args)
    congestion = dict(run.defaults.get("congestion", {}))
    for override in args.congestion:
        role, _, name = override.partition("=")
        if role not in ("client", "proxy", "origin") or not name:
            raise HarnessError(f"bench net: --congestion takes ROLE=NAME, got {override!r}")
        congestion[role] = name
    fileproxy_cc = run.defaults.get("fileproxy_tcp_congestion", "")
    flags = [*args.fileproxy_flag, *(["--tcp-congestion", fileproxy_cc] if fileproxy_cc else [])]
    work = Workdir()
    with Topology(emulation=args.emulator or run.defaults.get("emulator", "auto")) as topology:
        try:
            progress(f"building namespaces {topology.prefix}[c|p|o]")
            topology.build(run.netem_spec("client"), run.netem_spec("origin"), congestion)
            progress(f"links emulated with: {topology.description}")
            checks, valid = verify_links(topology, run)
            for c in checks:
                progress(f"link check {c['check']}: configured {c['configured']}, measured "
                         f"{c['measured']} -> {'ok' if c['ok'] else 'OFF BY MORE THAN 20%'}")
            results, notes = measure(run, topology, work, flags,
                                     tuple(args.workloads.split(",")), parse_variants(args.variant))
            emulator = topology.emulator_stats()
        finally:
            work.remove()
    markdown = report(run, results, checks, valid, notes, congestion, fileproxy_cc,
                      topology.description)
    print(markdown)
    name = f"net-{run.profile_name}-{run.impaired}" + \
        ("-" + "-".join(args.congestion).replace("=", "") if args.congestion else "")
    paths = save_results(name, {"profile": run.profile, "impaired": run.impaired,
                                "valid": valid, "link_checks": checks, "results": results,
                                "emulator": emulator, "notes": notes}, markdown)
    png = RESULTS / f"{name}-latest.png"
    chart(run, results, png)
    progress(f"saved {paths[0]}, {paths[1]} and {png}")
    if not valid:
        sys.exit(3)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as error:
        raise HarnessError(f"bench net: {' '.join(error.cmd)} failed: "
                           f"{(error.stderr or '').strip()[:300]}") from None
