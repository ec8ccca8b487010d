"""Bad-network benchmark: client / proxy / origin namespaces over emulated links.

    sudo ./run.sh bench net --profile poor --impaired client [--repeat 3] [--quick]
    sudo ./run.sh bench net --profile poor --impaired origin --reset-origin-every 10

Builds the namespaces (benchmarks/topology.py), impairs the chosen link(s) with the user-space
TUN delay line (benchmarks/netem.py; this kernel has no netem qdisc), verifies RTT, loss and rate
before measuring, then measures direct / fileproxy / nginx / naive aiohttp side by side, interleaved:
small requests at the profile's concurrency, a large download (also with aria2c -x16 straight to
the origin, when installed) and a large upload. Prints a table and writes JSON, markdown and a PNG
chart under benchmarks/results/. Removes everything on exit.

With --reset-origin-every SECONDS it runs one download per target instead, while every TCP
connection of the origin's port is reset every SECONDS (`ss -K` in the origin namespace), and
reports which targets still delivered the whole body byte-exact as one response.
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
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.common import RESULTS, markdown_table, median, progress, save_results, terminate
from benchmarks.targets import (
    Place,
    Running,
    Workdir,
    start_fileproxy,
    start_origin,
    start_proxies,
    tmpfs_or,
)
from benchmarks.topology import (
    CLIENT_ADDR,
    EMULATIONS,
    ORIGIN_ADDR,
    PROXY_CLIENT_SIDE,
    PROXY_ORIGIN_SIDE,
    HarnessError,
    Topology,
    killing,
    require_root_and_ip,
)
from tests.pattern import pattern_sha256

SCENARIOS = Path(__file__).with_name("scenarios.toml")
PROBE_PORT = 9999
LAN = {"rtt_ms": 0, "jitter_ms": 0, "rate_mbit": 0, "loss": 0.0}
RESET_INTERVALS = 2.5  # with resets, a download lasts at least this many intervals at the link rate


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
    reset_every: float = 0.0  # --reset-origin-every: the transfer then spans several resets

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
        seconds = max(seconds, RESET_INTERVALS * self.reset_every)
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
    figures["completed"] = out["exit"] == 0 and out["http_code"] == 200
    figures["intact"] = figures["completed"] and digest == origin.digest
    figures |= {"received": out["size_download"], "http_code": out["http_code"],
                "exit": out["exit"]}
    return figures


ARIA2 = "aria2c -x16 direct"
ROWS = ("direct", "fileproxy", "nginx", "naive", "aria2c")  # --targets: first words of the rows
ARIA2_ARGS = ("-x16", "-s16", "-k1M")
ARIA2_QUIET = ("--no-conf=true", "--file-allocation=none", "--allow-overwrite=true",
               "--auto-file-renaming=false", "--summary-interval=0",
               "--show-console-readout=false", "--download-result=hide", "--console-log-level=error")


def aria2_target(origin: Origin) -> Running | None:
    """aria2c in the client namespace, straight to the origin; None when it is not installed."""
    if not shutil.which("aria2c"):
        return None
    return Running(ARIA2, origin.running.url, None,
                   note=f"aria2c {' '.join(ARIA2_ARGS)} in the client namespace straight to the "
                        "origin, into tmpfs; goodput = file size / aria2c's wall time; no TTFB")


def aria2_download(topology: Topology, target: Running, run: Run, work: Workdir,
                   origin: Origin) -> dict[str, Any]:
    """The download workload with aria2c's segmented client instead of curl."""
    scratch = Path(tempfile.mkdtemp(prefix="aria2-", dir=tmpfs_or(work.path)))
    dest = scratch / "big.bin"
    try:
        started = time.monotonic()
        result = topology.ns_run(topology.client, "timeout", transfer_limit(run), "aria2c",
                                 *ARIA2_ARGS, *ARIA2_QUIET, "-d", str(scratch), "-o", dest.name,
                                 f"{target.url}{origin.big()}", check=False)
        seconds = time.monotonic() - started
        digest, received = file_sha256(dest), bytes_on_disk(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    completed = result.returncode == 0
    figures = goodput({"speed_download": received / seconds, "time_total": round(seconds, 3)},
                      run, "speed_download")
    return figures | {"completed": completed, "intact": completed and digest == origin.digest,
                      "received": received, "exit": result.returncode,
                      "error": result.stderr.strip()[-200:]}


def bytes_on_disk(path: Path) -> int:
    """What a (sparse, possibly incomplete) download holds: its allocated blocks, up to its size."""
    if not path.exists():
        return 0
    stat = path.stat()
    return min(stat.st_size, stat.st_blocks * 512)


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
               "http_code", "time_total", "size_download")


def transfer_limit(run: Run) -> str:
    """Seconds a large transfer may take: a cubic flow on a lossy link can run at a twentieth of
    the link rate, so leave it the time."""
    seconds = max(run.defaults.get("transfer_seconds", 20), RESET_INTERVALS * run.reset_every)
    return str(int(40 * seconds + 120))


def curl(topology: Topology, run: Run, args: list[str]) -> dict[str, Any]:
    template = " ".join("%{" + name + "}" for name in CURL_FIELDS)
    result = topology.ns_run(topology.client, "curl", "-s", "--max-time", transfer_limit(run),
                             "-w", template, *args, check=False)
    values = (result.stdout.split() + ["0"] * len(CURL_FIELDS))[:len(CURL_FIELDS)]
    out: dict[str, Any] = {name: float(value) if "." in value else int(value)
                           for name, value in zip(CURL_FIELDS, values, strict=True)}
    return out | {"exit": result.returncode}


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
Workload = Callable[[Topology, Running, Run, Workdir, Origin], dict[str, Any]]
RUNNERS: dict[str, Workload] = {"small": small_requests, "download": download, "upload": upload}


@dataclass
class Started:
    """The origin and the proxies of a run, and what each workload runs against."""

    origin: Origin
    proxies: list[Running]
    targets: list[Running]
    notes: list[str]

    def stop(self) -> None:
        for target in self.proxies:
            target.stop()
        self.origin.running.stop()

    def plan(self, chosen: tuple[str, ...], rows: tuple[str, ...] = ()
             ) -> dict[str, list[tuple[Running, Workload]]]:
        """Every chosen workload against every target (or those `rows` names); downloads also
        with aria2c."""
        plan = {name: [(target, RUNNERS[name]) for target in self.targets
                       if named(target.name, rows)]
                for name in WORKLOADS if name in chosen}
        if "download" in plan and named(ARIA2, rows):
            aria2 = aria2_target(self.origin)
            if aria2 is None:
                self.notes.append(f"{ARIA2}: aria2c not installed, row skipped "
                                  "(apt-get install aria2)")
            else:
                plan["download"].append((aria2, aria2_download))
        return plan

    def target_notes(self, plan: dict[str, list[tuple[Running, Workload]]]) -> list[str]:
        described = dict.fromkeys(target.name + ": " + target.note for rows in plan.values()
                                  for target, _ in rows if target.note)
        return [*self.notes, *described]


def named(target: str, rows: tuple[str, ...]) -> bool:
    """Is the target one of `rows` (its name's first word: direct, fileproxy, nginx, naive,
    aria2c), or are all wanted?"""
    return not rows or target.split()[0] in rows


def start_targets(run: Run, topology: Topology, work: Workdir, fileproxy_flags: list[str],
                  variants: dict[str, list[str]] | None) -> Started:
    """The origin, then fileproxy (and its variants), nginx and naive in the proxy namespace."""
    origin = open_origin(run, topology, work)
    running = origin.running
    place = Place(PROXY_CLIENT_SIDE, topology.proxy)
    proxies, notes = start_proxies(running, work, fileproxy_flags, place, peers=("nginx",))
    for label, flags in (variants or {}).items():  # more fileproxy rows, after the default one
        variant = start_fileproxy(running, work, [*fileproxy_flags, *flags], place)
        proxies.insert(1, replace(variant, name=f"fileproxy {label}"))
    targets = [Running("direct", running.url, None, note="routed through the proxy namespace"),
               *proxies]
    return Started(origin, proxies, targets, notes)


def measure(run: Run, topology: Topology, work: Workdir, fileproxy_flags: list[str],
            chosen: tuple[str, ...] = WORKLOADS, variants: dict[str, list[str]] | None = None,
            rows: tuple[str, ...] = ()
            ) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], list[str]]:
    started = start_targets(run, topology, work, fileproxy_flags, variants)
    plan = started.plan(chosen, rows)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in WORKLOADS}
    repeat = 1 if run.quick else run.defaults.get("repeat", 3)
    steps, step = sum(len(runs) for runs in plan.values()) * repeat, 0
    for name, runs in plan.items():
        for rep in range(repeat):
            for target, workload in runs:
                step += 1
                figures = workload(topology, target, run, work, started.origin)
                results[name].setdefault(target.name, []).append(figures)
                progress(f"[{step}/{steps}] {name} #{rep + 1} {target.name}: {figures}")
    started.stop()
    return results, started.target_notes(plan)


# ---------------------------------------------------------------- resets on the origin link


def measure_resets(run: Run, topology: Topology, work: Workdir, fileproxy_flags: list[str],
                   variants: dict[str, list[str]] | None = None, rows: tuple[str, ...] = ()
                   ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """One download per target, each with the origin's connections reset every interval."""
    started = start_targets(run, topology, work, fileproxy_flags, variants)
    plan = started.plan(("download",), rows)
    port = urlsplit(started.origin.running.url).port or 80
    results: dict[str, dict[str, Any]] = {}
    for step, (target, workload) in enumerate(plan["download"], 1):
        progress(f"[{step}/{len(plan['download'])}] download {target.name}, origin connections "
                 f"reset every {run.reset_every:g} s")
        with killing(topology, topology.origin, ("sport", "=", f":{port}"),
                     run.reset_every) as resets:
            figures = workload(topology, target, run, work, started.origin)
        results[target.name] = figures | {"resets": resets.rounds,
                                          "connections_reset": resets.connections}
        progress(f"... {results[target.name]}")
    started.stop()
    return results, started.target_notes(plan)


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


def report_resets(run: Run, results: dict[str, dict[str, Any]], checks: list[dict[str, Any]],
                  valid: bool, notes: list[str], emulation: str) -> str:
    """One row per target: did its download survive the resets, intact, and how fast."""
    headers = ["target", "completed", "byte-exact", "received MB", "seconds", "Mbit/s",
               "share of link", "resets during it", "connections reset", "HTTP status",
               "client exit"]
    rows = [[name, yes(r["completed"]), yes(r["intact"]), f"{r['received'] / 1e6:.2f}",
             round(r["seconds"], 1), r["mbit"], r["share_of_link"], r["resets"], r["connections_reset"],
             r.get("http_code", "-"), r["exit"]]
            for name, r in results.items()]
    link_rows = [[c["check"], c["configured"], c["measured"], "ok" if c["ok"] else "OFF"]
                 for c in checks]
    profile, every = run.profile, run.reset_every
    head = (f"Profile `{run.profile_name}` on {run.impaired_links}: RTT {profile['rtt_ms']} "
            f"+- {profile['jitter_ms']} ms, {profile['rate_mbit'] or 'unlimited'} Mbit/s, "
            f"{profile['loss'] * 100:g}% loss each way; links: {emulation}. One "
            f"{run.transfer_bytes / 1e6:.1f} MB download per target ({link_seconds(run)}) "
            f"while every TCP connection of the origin's port is reset every {every:g} s "
            f"(`ss -K` in the origin namespace, from {every:g} s into each download until it "
            "ends).")
    validity = "" if valid else ("\n\n**INVALID RUN: the emulated links were more than 20% off "
                                 "their configuration (see the link checks).**")
    expected = ("direct, nginx and naive aiohttp cannot continue a body whose connection was "
                "reset, so a reset during their download cuts it (completed: NO); fileproxy "
                "completes only where it resumes a cut upstream body with Range + If-Range into "
                "the same response. Mbit/s of a row that did not complete is what arrived before "
                "the cut over the time until then. Resets during it: the resets that closed at "
                "least one connection; connections reset counts every connection of the origin's "
                "port they closed, the proxies' idle keep-alive ones included.")
    idle = [f"{name}: no reset hit its download (it ended first, or held no connection at the "
            "moments of the resets): this row tests nothing"
            for name, r in results.items() if not r["resets"]]
    return (f"{head}{validity}\n\nLink checks (measured before the run):\n\n"
            f"{markdown_table(['check', 'configured', 'measured', 'verdict'], link_rows)}\n\n"
            f"{markdown_table(headers, rows)}\n\n"
            "Notes:\n" + "\n".join(f"- {note}" for note in [expected, *idle, *notes]))


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def link_seconds(run: Run) -> str:
    """How long the run's transfer takes at the bottleneck rate."""
    if not run.bottleneck_mbit:
        return "no rate limit: it may well end before the first reset"
    seconds = run.transfer_bytes * 8 / 1e6 / run.bottleneck_mbit
    return f"{seconds:.0f} s at the {run.bottleneck_mbit:g} Mbit/s link rate"


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
        mids: list[float] = []
        errs: list[list[float]] = [[], []]
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


def run_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options every bad-network run takes: the profile, the impaired link, repetitions,
    transfer length, the scenario file and flags for fileproxy."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="poor")
    parser.add_argument("--impaired", choices=("client", "origin", "both"), default="client")
    parser.add_argument("--repeat", type=int, help="override the scenario file's repeat")
    parser.add_argument("--quick", action="store_true", help="short transfers, one repetition")
    parser.add_argument("--transfer-seconds", type=float,
                        help="override the scenario file's transfer_seconds")
    parser.add_argument("--scenarios", default=str(SCENARIOS))
    parser.add_argument("--fileproxy-flag", action="append", default=[])
    return parser


def main() -> None:
    parser = run_arguments(__doc__)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                        help="another fileproxy row with these flags, e.g. "
                             "'segments=--upstream-segments 4'")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of: " + ", ".join(WORKLOADS))
    parser.add_argument("--targets", default="", metavar="NAMES",
                        help="comma-separated subset of the rows: " + ", ".join(ROWS) +
                             " (default: all)")
    parser.add_argument("--emulator", choices=EMULATIONS, default=None,
                        help="how links are emulated (default: the scenario's, else auto: "
                             "netem where the kernel has it, else the user-space TUN delay line)")
    parser.add_argument("--congestion", action="append", default=[], metavar="ROLE=NAME",
                        help="a namespace's default congestion control, e.g. proxy=bbr "
                             "(roles: client, proxy, origin)")
    parser.add_argument("--reset-origin-every", type=float, nargs="?", const=10.0,
                        metavar="SECONDS",
                        help="instead of the workloads: one download per target while every "
                             "connection to the origin is reset every SECONDS (default 10); the "
                             f"file lasts at least {RESET_INTERVALS:g} intervals at the link rate")
    args = parser.parse_args()
    rows = tuple(filter(None, args.targets.split(",")))
    if unknown := set(rows) - set(ROWS):
        raise HarnessError(f"bench net: --targets: unknown row(s) {', '.join(sorted(unknown))} "
                           f"(rows: {', '.join(ROWS)})")
    require_root_and_ip()
    run = load_run(args)
    if args.reset_origin_every is not None:
        if args.reset_origin_every <= 0:
            raise HarnessError("bench net: --reset-origin-every takes a number of seconds above 0")
        run = replace(run, reset_every=args.reset_origin_every)
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
            if run.reset_every:
                survived, notes = measure_resets(run, topology, work, flags,
                                                 parse_variants(args.variant), rows)
            else:
                results, notes = measure(run, topology, work, flags,
                                         tuple(args.workloads.split(",")),
                                         parse_variants(args.variant), rows)
            emulator = topology.emulator_stats()
        finally:
            work.remove()
    name = f"net-{run.profile_name}-{run.impaired}" + \
        ("-" + "-".join(args.congestion).replace("=", "") if args.congestion else "")
    facts = {"profile": run.profile, "impaired": run.impaired, "valid": valid,
             "link_checks": checks, "emulator": emulator, "notes": notes}
    if run.reset_every:
        finish_resets(run, f"{name}-reset{run.reset_every:g}s", facts, survived, valid,
                      topology.description)
        return
    markdown = report(run, results, checks, valid, notes, congestion, fileproxy_cc,
                      topology.description)
    print(markdown)
    paths = save_results(name, {**facts, "results": results}, markdown)
    png = RESULTS / f"{name}-latest.png"
    chart(run, results, png)
    progress(f"saved {paths[0]}, {paths[1]} and {png}")
    if not valid:
        sys.exit(3)


def finish_resets(run: Run, name: str, facts: dict[str, Any], results: dict[str, dict[str, Any]],
                  valid: bool, emulation: str) -> None:
    """Print and save the reset scenario's table; exit 3 if the links were off, 4 if a fileproxy
    row did not deliver the whole body byte-exact."""
    markdown = report_resets(run, results, facts["link_checks"], valid, facts["notes"], emulation)
    print(markdown)
    paths = save_results(name, {**facts, "reset_every_s": run.reset_every,
                                "transfer_bytes": run.transfer_bytes, "results": results},
                         markdown)
    progress(f"saved {paths[0]} and {paths[1]}")
    failed = [target for target, r in results.items()
              if target.startswith("fileproxy") and not r["intact"]]
    if not valid:
        sys.exit(3)
    if failed:
        progress(f"{', '.join(failed)}: the download did not survive the resets byte-exact")
        sys.exit(4)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as error:
        raise HarnessError(f"bench net: {' '.join(error.cmd)} failed: "
                           f"{(error.stderr or '').strip()[:300]}") from None
