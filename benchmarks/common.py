"""Benchmark plumbing: child processes that always get cleaned up, resource sampling, result files."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_children: list[subprocess.Popen[bytes]] = []
_logs: dict[subprocess.Popen[bytes], Path] = {}  # the log file of each child started with one


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(args: Sequence[str], *, log: Path | None = None,
          **popen: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own process group; it is killed on exit, Ctrl-C or crash."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the child
    process: subprocess.Popen[bytes] = subprocess.Popen(
        list(args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, **popen)
    if log:
        _logs[process] = log
    _children.append(process)
    return process


def _program(process: subprocess.Popen[bytes]) -> str:
    """The program a child runs: the first of its args (spawn always passes a list)."""
    args = process.args
    if isinstance(args, (str, bytes, os.PathLike)):
        return os.fsdecode(args)
    return os.fsdecode(args[0])


def terminate(process: subprocess.Popen[bytes], grace: float = 10) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


@atexit.register
def _cleanup_children() -> None:
    for process in reversed(_children):
        terminate(process, grace=3)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _exit_on_signal)


def unverified_tls() -> ssl.SSLContext:
    """For the benchmarks' own self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def wait_http(url: str, process: subprocess.Popen[bytes] | None = None, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log = _logs.get(process)
            tail = log.read_text()[-600:] if log and log.exists() else ""
            raise RuntimeError(f"{_program(process)} exited with {process.returncode}: {tail}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=unverified_tls()) as response:
                response.read()
                return
        except OSError as error:
            if getattr(error, "code", None):  # an HTTP error status: the server is up
                return
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for proc in process_tree(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class RssMonitor:
    """Samples the RSS of a process tree in a thread; peak per process and peak of the sum."""

    pid: int
    interval: float = 0.1
    peak_per_process: int = 0
    peak_total: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssMonitor:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = []
            for proc in process_tree(self.pid):
                try:
                    sizes.append(proc.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            if sizes:
                self.peak_per_process = max(self.peak_per_process, max(sizes))
                self.peak_total = max(self.peak_total, sum(sizes))
            self._stop.wait(self.interval)


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def progress(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def command_line() -> str:
    return " ".join(["./run.sh bench", Path(sys.argv[0]).stem, *sys.argv[1:]])


def save_results(name: str, payload: dict[str, object], markdown: str) -> tuple[Path, Path]:
    """benchmarks/results/NAME-<utc stamp>.json and .md, plus NAME-latest copies."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {"command": command_line(), "utc": stamp, "machine": machine_facts(), **payload}
    json_path, md_path = RESULTS / f"{name}-{stamp}.json", RESULTS / f"{name}-{stamp}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(f"Command: `{payload['command']}` ({stamp})\n\n{markdown}\n")
    for path in (json_path, md_path):
        (RESULTS / f"{name}-latest{path.suffix}").write_text(path.read_text())
    return json_path, md_path


def machine_facts() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": sys.version.split()[0], "kernel": os.uname().release}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
