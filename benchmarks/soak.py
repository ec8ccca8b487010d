"""Fault soak: two fileproxy instances (gunicorn, several workers) sharing one Redis, HAProxy in front
when installed, a test origin that also resets and stalls; mixed downloads, PUT and tus uploads, async
tasks and small GETs, while workers and instances are SIGKILLed, Redis is killed and restarted and
clients cut their transfers. At the end it checks what must never happen, prints the invariants and
records them under benchmarks/results/:

  tasks lost, run twice (a POST without Idempotency-Key executed twice) or stuck; uploads lost,
  delivered twice or left unfinished; bodies truncated but delivered as complete; hung requests;
  the longest run of 423 answers an upload saw; tracebacks in the logs; RSS and fd growth per
  long-lived worker.

  ./run.sh bench soak --duration 600            the recorded 10-minute run
  ./run.sh bench soak --duration 40 --quick     the short variant the test suite runs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.common import (
    free_port,
    markdown_table,
    progress,
    save_results,
    spawn,
    terminate,
    wait_http,
)
from tests.pattern import pattern_sha256

TUS = {"Tus-Resumable": "1.0.0"}
MIB = 1 << 20
REQUEST_SECONDS = 90.0  # a request that takes longer than this is counted as hung
FAULTS = ("worker", "redis", "worker", "instance")


@lru_cache(maxsize=16)
def expected_sha(size: int) -> str:
    return pattern_sha256(size)


# ---------------------------------------------------------------- what happened

@dataclass
class Ledger:
    """Every outcome the workload saw; the invariants are read from it at the end."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # status URL -> facts
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)  # upload URL -> facts
    longest_423_run: int = 0

    def count(self, what: str) -> None:
        self.counts[what] += 1

    def violate(self, what: str, example: str) -> None:
        self.violations[what] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{what}: {example}")


# ---------------------------------------------------------------- the processes

@dataclass
class Instance:
    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[psutil.Process]:
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            return [child for child in psutil.Process(self.process.pid).children()
                    if "redis" not in child.name()]
        except psutil.NoSuchProcess:
            return []


class Cluster:
    """Redis (append-only), the origin, two fileproxy instances, HAProxy when installed."""

    def __init__(self, work: Path, workers: int) -> None:
        self.work, self.workers = work, workers
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.origin_url = ""
        self.spool = work / "spool"
        self.instances = [Instance("a", free_port()), Instance("b", free_port())]
        self.haproxy_port = free_port() if shutil.which("haproxy") else None

    @property
    def entry(self) -> str:
        """Where clients send requests: HAProxy, or the instances in turn without it."""
        if self.haproxy_port is not None:
            return f"http://127.0.0.1:{self.haproxy_port}"
        return random.choice(self.instances).url

    def start(self) -> None:
        self.start_redis()
        origin_port = free_port()
        self.origin_url = f"http://127.0.0.1:{origin_port}"
        origin = spawn([sys.executable, "-m", "tests.origin", "--port", str(origin_port)],
                       log=self.work / "origin.log")
        wait_http(f"{self.origin_url}/_origin/events", origin)
        for instance in self.instances:
            self.start_instance(instance)
        if self.haproxy_port is not None:
            self.start_haproxy()

    def start_redis(self) -> None:
        self.redis = spawn(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                            "--maxmemory-policy", "noeviction", "--dir", str(self.work)],
                           log=self.work / "redis.log")
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"],
                             capture_output=True).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def start_instance(self, instance: Instance) -> None:
        instance.process = spawn(
            [sys.executable, "-m", "fileproxy", "serve", "--upstream", self.origin_url,
             "--bind", f"127.0.0.1:{instance.port}", "--workers", str(self.workers),
             "--redis-url", f"redis://127.0.0.1:{self.redis_port}/0",
             "--spool-dir", str(self.spool), "--no-access-log", "--task-visibility-timeout", "5",
             "--upload-delivery-backoff", "0.5", "--upload-delivery-wait", "0",
             "--read-timeout", "20", "--client-timeout", "20", "--graceful-timeout", "5"],
            log=self.work / f"fileproxy-{instance.name}.log")
        wait_http(f"{instance.url}/_fileproxy/health", instance.process)

    def start_haproxy(self) -> None:
        servers = "\n".join(f"  server {i.name} 127.0.0.1:{i.port} check inter 300 fall 2 rise 2"
                            for i in self.instances)
        config = self.work / "haproxy.cfg"
        config.write_text(f"""global
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  retries 3
  option redispatch
frontend soak
  bind 127.0.0.1:{self.haproxy_port}
  default_backend fileproxy
backend fileproxy
  balance roundrobin
  option httpchk GET /_fileproxy/health
{servers}
""")
        process = spawn(["haproxy", "-f", str(config), "-db"], log=self.work / "haproxy.log")
        wait_http(f"{self.entry}/_fileproxy/health", process)

    # -- faults

    def kill_worker(self, rng: random.Random) -> str:
        instance = rng.choice(self.instances)
        workers = instance.workers()
        if not workers:
            return f"instance {instance.name} has no worker to kill"
        victim = rng.choice(workers)
        os.kill(victim.pid, signal.SIGKILL)
        return f"SIGKILL worker {victim.pid} of instance {instance.name}"

    def kill_instance(self, rng: random.Random) -> str:
        instance = rng.choice(self.instances)
        assert instance.process is not None
        os.killpg(instance.process.pid, signal.SIGKILL)
        instance.process.wait()
        time.sleep(1)
        self.start_instance(instance)
        return f"SIGKILL instance {instance.name} (master and workers), started again"

    def restart_redis(self, _rng: random.Random) -> str:
        assert self.redis is not None
        os.killpg(self.redis.pid, signal.SIGKILL)
        self.redis.wait()
        time.sleep(2)
        self.start_redis()
        return "SIGKILL redis-server, started again 2 s later (append-only file kept)"

    def worker_pids(self) -> list[int]:
        return [worker.pid for instance in self.instances for worker in instance.workers()]


# ---------------------------------------------------------------- the workload

class Workload:
    """Flows of one kind each, looping until the deadline; every request bounded in time."""

    def __init__(self, cluster: Cluster, ledger: Ledger, session: aiohttp.ClientSession,
                 rng: random.Random) -> None:
        self.cluster, self.ledger, self.session, self.rng = cluster, ledger, session, rng
        self.serial = 0

    def next_id(self) -> int:
        self.serial += 1
        return self.serial

    async def loop(self, step: Callable[[], Awaitable[None]], deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(REQUEST_SECONDS):
                    await step()
            except TimeoutError:
                self.ledger.violate("hung requests", step.__name__)
            except (aiohttp.ClientError, ConnectionError) as error:
                self.ledger.count(f"{step.__name__}: connection failed ({type(error).__name__})")
                await asyncio.sleep(0.2)
            except Exception as error:  # the workload's own surprise: counted, shown, go on
                self.ledger.violate("workload errors", f"{step.__name__}: {error!r}")
                await asyncio.sleep(0.2)

    async def download(self) -> None:
        size = self.rng.choice([256 * 1024, MIB, 4 * MIB])
        kind = self.rng.choices(["whole", "truncated", "stalled", "client-cut"],
                                [6, 2, 1, 1])[0]
        path = {"whole": f"/bytes/{size}", "client-cut": f"/bytes/{size}",
                "truncated": f"/truncate?size={size}&send={size // 3}",
                "stalled": "/stall?send=100000&pause=1"}[kind]
        async with self.session.get(self.cluster.entry + path) as response:
            if kind == "client-cut":
                await self.cut_by_client(response, min(size, 64 * 1024))
                return
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError:
                self.ledger.count(f"download {kind}: cut, the client told")
                return
        self.check_complete(kind, size, response.status, body)

    async def cut_by_client(self, response: aiohttp.ClientResponse, wanted: int) -> None:
        """Read the first `wanted` bytes of a 200, then leave. A refusal (its short body: a 502
        while an instance is down) is counted; a 200 that ends cleanly before them was
        truncated as complete."""
        if response.status != 200:
            self.ledger.count(f"download client-cut: status {response.status}")
            return
        try:
            await response.content.readexactly(wanted)
        except aiohttp.ClientPayloadError:
            self.ledger.count("download client-cut: cut, the client told")
            return
        except asyncio.IncompleteReadError as error:
            self.ledger.violate("bodies truncated but delivered as complete",
                                f"client-cut: ended cleanly after {len(error.partial)} bytes")
            return
        finally:
            response.close()
        self.ledger.count("download: cut by the client")

    def check_complete(self, kind: str, size: int, status: int, body: bytes) -> None:
        """A body that ended cleanly must be whole: anything else was truncated as complete."""
        if status != 200:
            self.ledger.count(f"download {kind}: status {status}")
            return
        if kind == "stalled":
            whole = body == b"a" * 100000 + b"b" * 100000
        else:
            whole = len(body) == size and hashlib.sha256(body).hexdigest() == expected_sha(size)
        if whole and kind != "truncated":
            self.ledger.count(f"download {kind}: whole")
        else:
            self.ledger.violate("bodies truncated but delivered as complete",
                                f"{kind} {size}: got {len(body)} bytes, status {status}")

    async def small(self) -> None:
        async with self.session.get(f"{self.cluster.entry}/status/200") as response:
            await response.read()
            self.ledger.count(f"small: {response.status}")

    async def put(self) -> None:
        body = self.rng.randbytes(self.rng.choice([64 * 1024, 2 * MIB]))
        async with self.session.put(f"{self.cluster.entry}/echo/put/{self.next_id()}",
                                    data=body) as response:
            if response.status != 200:
                self.ledger.count(f"put: status {response.status}")
                return
            echo = await response.json()
        if echo["body_sha256"] != hashlib.sha256(body).hexdigest():
            self.ledger.violate("bodies truncated but delivered as complete",
                                f"PUT of {len(body)} arrived as {echo['body_length']}")
        else:
            self.ledger.count("put: whole")

    async def task(self) -> None:
        number = self.next_id()
        headers = {"Prefer": "respond-async"}
        keyed = self.rng.random() < 0.3
        if keyed:
            headers["Idempotency-Key"] = f"soak-{number}"
        async with self.session.post(f"{self.cluster.entry}/echo/task/{number}",
                                     data=b"t" * 1000, headers=headers) as response:
            if response.status != 202:
                self.ledger.count(f"task submit: status {response.status}")
                return
            status_url = (await response.json())["status_url"]
        self.ledger.tasks[status_url] = {"path": f"/echo/task/{number}", "keyed": keyed}
        self.ledger.count("task: submitted")

    async def tus_upload(self) -> None:
        number = self.next_id()
        body = self.rng.randbytes(self.rng.choice([MIB, 3 * MIB]))
        target = f"/echo/tus/{number}"
        meta = f"target {base64.b64encode(target.encode()).decode()}"
        async with self.session.post(f"{self.cluster.entry}/_fileproxy/uploads", headers={
                **TUS, "Upload-Length": str(len(body)), "Upload-Metadata": meta}) as response:
            if response.status != 201:
                self.ledger.count(f"tus create: status {response.status}")
                return
            path = response.headers["Location"]
        facts = self.ledger.uploads[path] = {"target": target, "size": len(body),
                                             "sha256": hashlib.sha256(body).hexdigest(),
                                             "finished": False, "delivery": None}
        await self.send_upload(path, body, facts)

    async def send_upload(self, path: str, body: bytes, facts: dict[str, Any]) -> None:
        """PATCH in 512 KiB pieces (some cut by the client), resuming from HEAD after errors,
        through whichever instance the entry picks each time (they share Redis and the spool)."""
        run_423 = 0
        for _ in range(400):
            url = self.cluster.entry + path
            try:
                offset = await self.upload_offset(url)
            except (aiohttp.ClientError, ConnectionError):
                await asyncio.sleep(0.2)
                continue
            if offset is None:
                self.ledger.violate("uploads lost", f"{path}: gone after it was created")
                return
            piece = body[offset:offset + 512 * 1024]
            cut = self.rng.random() < 0.1
            status, delivery = await self.patch(url, offset, piece, cut)
            run_423 = run_423 + 1 if status == 423 else 0
            self.ledger.longest_423_run = max(self.ledger.longest_423_run, run_423)
            if status == 423:
                await asyncio.sleep(0.2)
            if status == 204 and offset + len(piece) == len(body):
                facts["finished"], facts["delivery"] = True, delivery
                self.ledger.count("tus: finished")
                return
        self.ledger.violate("uploads left unfinished", path)

    async def upload_offset(self, url: str) -> int | None:
        async with self.session.head(url, headers=TUS) as response:
            if response.status in (404, 410):
                return None
            response.raise_for_status()
            return int(response.headers["Upload-Offset"])

    async def patch(self, url: str, offset: int, piece: bytes, cut: bool) -> tuple[int, str | None]:
        headers = {**TUS, "Upload-Offset": str(offset),
                   "Content-Type": "application/offset+octet-stream"}
        try:
            if cut:  # the client goes away half way through its PATCH
                headers["Content-Length"] = str(len(piece))
                async with asyncio.timeout(0.05):
                    await self.session.patch(url, data=piece_slowly(piece), headers=headers)
                return 0, None
            async with self.session.patch(url, data=piece, headers=headers) as response:
                return response.status, response.headers.get("Fileproxy-Delivery")
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            self.ledger.count("tus: PATCH cut")
            return 0, None


async def piece_slowly(piece: bytes) -> Any:
    """Half of the piece, then nothing (the caller's timeout cuts the PATCH)."""
    yield piece[:len(piece) // 2]
    await asyncio.sleep(3600)


# ---------------------------------------------------------------- the end: invariants

async def settle(cluster: Cluster, ledger: Ledger, session: aiohttp.ClientSession,
                 seconds: float) -> None:
    """Wait (bounded) for every task and delivery to end, then check them against the origin."""
    base = f"http://127.0.0.1:{cluster.instances[0].port}"
    deliveries = {facts["delivery"]: facts for facts in ledger.uploads.values()
                  if facts["finished"] and facts["delivery"]}
    pending = {**{url: "task" for url in ledger.tasks}, **{url: "delivery" for url in deliveries}}
    finals: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + seconds
    while pending and time.monotonic() < deadline:
        for url in list(pending):
            async with session.get(base + url) as response:
                if response.status == 404:
                    finals[url] = {"status": "lost"}
                elif response.status == 200:
                    record = await response.json()
                    if record["status"] in ("completed", "failed", "cancelled"):
                        finals[url] = record
                else:
                    continue
            if url in finals:
                del pending[url]
        await asyncio.sleep(0.5)
    async with session.get(f"{cluster.origin_url}/_origin/events") as response:
        events = (await response.json())["events"]
    arrived = collections.defaultdict(list)
    for event in events:
        if event["event"] == "body-complete":
            arrived[event["path"]].append(event["sha256"])
    check_tasks(ledger, finals, pending, arrived)
    check_uploads(ledger, deliveries, finals, pending, arrived)


def check_tasks(ledger: Ledger, finals: dict[str, Any], pending: dict[str, str],
                arrived: dict[str, list[str]]) -> None:
    for url, facts in ledger.tasks.items():
        final = finals.get(url)
        if url in pending:
            ledger.violate("tasks stuck", f"{url} never ended")
        elif final is not None and final["status"] == "lost":
            ledger.violate("tasks lost", url)
        elif final is not None:
            ledger.count(f"task: {final['status']}"
                         + (" (interrupted)" if "interrupted" in (final.get("error") or "") else ""))
        if len(arrived[facts["path"]]) > 1 and not facts["keyed"]:
            ledger.violate("tasks run twice", f"{facts['path']} arrived {len(arrived[facts['path']])}x")


def check_uploads(ledger: Ledger, deliveries: dict[str, Any], finals: dict[str, Any],
                  pending: dict[str, str], arrived: dict[str, list[str]]) -> None:
    for url, facts in deliveries.items():
        copies = [sha for sha in arrived[facts["target"]] if sha == facts["sha256"]]
        if url in pending:
            ledger.violate("uploads left unfinished", f"delivery {url} never ended")
        elif not copies:
            ledger.violate("uploads lost", f"{facts['target']}: {finals.get(url, {}).get('error')}")
        elif len(copies) > 1:
            ledger.violate("uploads delivered twice", f"{facts['target']} x{len(copies)}")
        else:
            ledger.count("tus: delivered once, byte-exact")


# ---------------------------------------------------------------- memory and fds

class Sampler:
    """RSS and open fds of every fileproxy worker, every few seconds, in a thread."""

    def __init__(self, cluster: Cluster, interval: float) -> None:
        self.cluster, self.interval = cluster, interval
        self.samples: dict[int, list[tuple[float, int, int]]] = collections.defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval):
            for pid in self.cluster.worker_pids():
                try:
                    process = psutil.Process(pid)
                    self.samples[pid].append((time.monotonic() - started,
                                              process.memory_info().rss, process.num_fds()))
                except psutil.NoSuchProcess:
                    pass

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def trends(self, run_seconds: float) -> list[dict[str, Any]]:
        """Workers that lived at least a quarter of the run (faults kill workers often): RSS and
        fds after a warm-up (a quarter of its samples) against at the end."""
        rows = []
        for pid, samples in self.samples.items():
            if len(samples) < 8 or samples[-1][0] - samples[0][0] < run_seconds / 4:
                continue
            warm = samples[len(samples) // 4]
            rows.append({"pid": pid, "seconds": round(samples[-1][0] - samples[0][0]),
                         "rss_mib_warm": round(warm[1] / MIB, 1),
                         "rss_mib_end": round(samples[-1][1] / MIB, 1),
                         "rss_growth_mib": round((samples[-1][1] - warm[1]) / MIB, 1),
                         "fds_warm": warm[2], "fds_end": samples[-1][2]})
        return rows


# ---------------------------------------------------------------- running it

async def run_faults(cluster: Cluster, deadline: float, every: float, rng: random.Random,
                     log: list[str]) -> None:
    actions = {"worker": cluster.kill_worker, "instance": cluster.kill_instance,
               "redis": cluster.restart_redis}
    for number in range(10**6):
        await asyncio.sleep(every)
        if time.monotonic() > deadline - every / 2:
            return
        what = FAULTS[number % len(FAULTS)]
        done = await asyncio.to_thread(actions[what], rng)
        log.append(f"{time.strftime('%H:%M:%S')} {done}")
        progress(f"fault: {done}")


async def soak(cluster: Cluster, seconds: float, fault_every: float, settle_seconds: float,
               seed: int) -> tuple[Ledger, list[str]]:
    ledger, rng = Ledger(), random.Random(seed)
    faults: list[str] = []
    timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS, connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        workload = Workload(cluster, ledger, session, rng)
        deadline = time.monotonic() + seconds
        flows = [workload.download] * 3 + [workload.small] * 2 + [workload.put, workload.task,
                                                                   workload.tus_upload] * 2
        runners = [asyncio.create_task(workload.loop(step, deadline)) for step in flows]
        runners.append(asyncio.create_task(run_faults(cluster, deadline, fault_every, rng,
                                                      faults)))
        runners.append(asyncio.create_task(report_progress(ledger, deadline)))
        await asyncio.gather(*runners)
        progress(f"workload over: waiting up to {settle_seconds:g} s for tasks and deliveries")
        await settle(cluster, ledger, session, settle_seconds)
    return ledger, faults


async def report_progress(ledger: Ledger, deadline: float) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(10)
        done = sum(ledger.counts.values())
        progress(f"{max(0, deadline - time.monotonic()):.0f} s left: {done} outcomes, "
                 f"violations so far {dict(ledger.violations) or 0}")


def tracebacks(work: Path) -> int:
    return sum(path.read_text(errors="replace").count("Traceback (most recent call last)")
               for path in work.glob("fileproxy-*.log"))


INVARIANTS = ("tasks lost", "tasks run twice", "tasks stuck", "uploads lost",
              "uploads delivered twice", "uploads left unfinished",
              "bodies truncated but delivered as complete", "hung requests", "workload errors")


def summarize(ledger: Ledger, faults: list[str], trends: list[dict[str, Any]], traces: int,
              seconds: float, haproxy: bool) -> tuple[dict[str, Any], str]:
    invariants: dict[str, float] = {name: ledger.violations.get(name, 0) for name in INVARIANTS}
    invariants["longest run of 423 answers"] = ledger.longest_423_run
    invariants["tracebacks in the logs"] = traces
    growth = max((row["rss_growth_mib"] for row in trends), default=0.0)
    invariants["largest RSS growth of a long-lived worker (MiB)"] = growth
    payload = {"seconds": seconds, "haproxy": haproxy, "invariants": invariants,
               "outcomes": dict(sorted(ledger.counts.items())), "faults": faults,
               "examples": ledger.examples, "workers": trends}
    markdown = "\n\n".join([
        f"Fault soak: {seconds:g} s, two instances x workers, one Redis, "
        f"{'HAProxy in front' if haproxy else 'no HAProxy (clients pick an instance)'}; "
        f"{len(faults)} faults.",
        markdown_table(["invariant", "value"], invariants.items()),
        markdown_table(["outcome", "count"], sorted(ledger.counts.items())),
        markdown_table(["worker", "seconds", "RSS MiB after warm-up", "RSS MiB at the end",
                        "growth MiB", "fds after warm-up", "fds at the end"],
                       [list(row.values()) for row in trends]),
        "Faults:\n" + "\n".join(f"- {fault}" for fault in faults),
        "Examples:\n" + "\n".join(f"- {example}" for example in ledger.examples),
    ])
    return payload, markdown


def passed(payload: dict[str, Any], rss_limit: float) -> bool:
    invariants = payload["invariants"]
    return all(invariants[name] == 0 for name in INVARIANTS) \
        and invariants["tracebacks in the logs"] == 0 \
        and invariants["longest run of 423 answers"] <= 3 \
        and invariants["largest RSS growth of a long-lived worker (MiB)"] < rss_limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of workload")
    parser.add_argument("--fault-every", type=float, default=0,
                        help="seconds between faults (default: duration / 20, at least 8)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per instance")
    parser.add_argument("--settle", type=float, default=90,
                        help="longest wait for tasks and deliveries after the workload")
    parser.add_argument("--quick", action="store_true",
                        help="the test suite's variant: results are not recorded")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("bench soak: needs redis-server (apt-get install redis-server)", file=sys.stderr)
        return 2
    fault_every = args.fault_every or max(8.0, args.duration / 20)
    work = Path(tempfile.mkdtemp(prefix="fileproxy-soak-"))
    cluster = Cluster(work, args.workers)
    try:
        cluster.start()
        progress(f"soak: {args.duration:g} s, a fault every {fault_every:g} s, logs in {work}")
        with Sampler(cluster, interval=2.0) as sampler:
            ledger, faults = asyncio.run(soak(cluster, args.duration, fault_every, args.settle,
                                              args.seed))
        payload, markdown = summarize(ledger, faults, sampler.trends(args.duration),
                                      tracebacks(work), args.duration,
                                      cluster.haproxy_port is not None)
    finally:
        for process in [cluster.redis, *(i.process for i in cluster.instances)]:
            if process is not None:
                terminate(process)
    print(markdown)
    print("SOAK-JSON " + json.dumps(payload))
    if not args.quick:
        save_results("soak", payload, markdown)
    ok = passed(payload, rss_limit=16.0)
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"bench soak: invariants broken; logs kept in {work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
