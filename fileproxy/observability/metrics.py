"""Metrics with prometheus-client, one consistent answer across gunicorn workers (multiprocess mode),
and the /stats JSON summary built from the same numbers. Requests are tallied in plain ints and
reach the shared numbers every second (and before a worker answers /metrics or /stats)."""

from __future__ import annotations

import bisect
import collections
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fileproxy.compat import connector_sizes, histogram_add
from fileproxy.core.exchange import NOT_FAILURES, Exchange
from fileproxy.policy.breaker import STATES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by the gunicorn settings before workers start
OWN_DIR_ENV = "FILEPROXY_OWNS_METRICS_DIR"  # the directory is ours to remove at exit
# How a gauge's values from several workers add up (prometheus_client's multiprocess modes).
GaugeMode = Literal["livesum", "livemax", "min", "max"]
# Latency buckets from 1 ms to an hour: small requests and multi-hour transfers alike.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
           900, 3600, math.inf)


def multiprocess_dir() -> str | None:
    """The directory gunicorn's workers share metrics through, when running under gunicorn."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir() -> None:
    """gunicorn master, before forking: a private directory for this run, named in the
    environment the workers inherit (prometheus-client reads it when first imported there)."""
    if multiprocess_dir() is None:
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="fileproxy-metrics-")
        os.environ[OWN_DIR_ENV] = "1"


def worker_exited(pid: int) -> None:
    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def remove_multiprocess_dir() -> None:
    directory = multiprocess_dir()
    if directory and os.environ.pop(OWN_DIR_ENV, None):
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class RateMeter:
    """Events per second over the last `window` seconds, in one-second buckets."""

    window: int = 10
    clock: Callable[[], float] = time.monotonic
    _buckets: deque[list[int]] = field(default_factory=deque)

    def add(self) -> None:
        second = int(self.clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([second, 1])

    def rate(self) -> float:
        horizon = int(self.clock()) - self.window
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()
        return sum(count for _, count in self._buckets) / self.window


@dataclass
class HistogramTally:
    """Observations since the last flush, bucketed in plain ints (the request path takes no lock
    and writes no shared memory); flush() adds them to a prometheus Histogram."""

    bounds: tuple[float, ...] = BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self, histogram: Any) -> None:
        """prometheus_client has no bulk observe: add to its buckets and sum (compat)."""
        if not any(self.counts):
            return
        histogram_add(histogram, self.total, self.counts)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0


@dataclass
class Tally:
    """The request path's counts since the last flush into prometheus (every second and before
    each scrape)."""

    active: int = 0
    requests: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    duration: HistogramTally = field(default_factory=HistogramTally)
    ttfb: HistogramTally = field(default_factory=HistogramTally)
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0


class Metrics:
    """The worker's metrics. prometheus_client is imported here, inside the worker, so that under
    gunicorn it sees PROMETHEUS_MULTIPROC_DIR and writes where every worker's numbers meet."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.time()
        self.rate = RateMeter()
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = (), mode: GaugeMode = "livesum"
                  ) -> Any:
            return Gauge(name, doc, labels, registry=r, multiprocess_mode=mode)

        self.requests = Counter("fileproxy_requests", "Requests handled, by outcome and status",
                                ("outcome", "status"), registry=r)
        self.duration = Histogram("fileproxy_request_duration_seconds",
                                  "Time from request to the last byte sent", registry=r,
                                  buckets=BUCKETS)
        self.ttfb = Histogram("fileproxy_ttfb_seconds",
                              "Time from request to the upstream's response headers",
                              registry=r, buckets=BUCKETS)
        # Labelled so that a worker with no request yet reports nothing (not a 0 minimum).
        self.duration_min = gauge("fileproxy_request_duration_min_seconds",
                                  "Shortest request seen", ("scope",), mode="min")
        self.duration_max = gauge("fileproxy_request_duration_max_seconds",
                                  "Longest request seen", ("scope",), mode="max")
        self._shortest, self._longest = math.inf, 0.0
        self.bytes_in = Counter("fileproxy_request_body_bytes",
                                "Request body bytes sent upstream", registry=r)
        self.bytes_out = Counter("fileproxy_response_body_bytes",
                                 "Response body bytes sent to clients", registry=r)
        self.retries = Counter("fileproxy_retries", "Retried upstream attempts", registry=r)
        self.segment_connections = Histogram(
            "fileproxy_upstream_connections_per_transfer",
            "Upstream connections one adaptive ranged fetch grew to (--upstream-segments auto)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.fetched_twice = Counter(
            "fileproxy_upstream_bytes_fetched_twice",
            "Upstream body bytes an adaptive ranged fetch received that it already had (the "
            "loser of a raced segment, bytes read past a split)", registry=r)
        self.resumes = Counter("fileproxy_upstream_resumes",
                               "Response bodies continued after an upstream cut (Range + "
                               "If-Range), or not (refused)", ("outcome",), registry=r)
        self.upstream_errors = Counter("fileproxy_upstream_errors",
                                       "Failed upstream attempts, by kind", ("upstream", "kind"),
                                       registry=r)
        self.rejected = Counter("fileproxy_admission_rejected",
                                "Requests refused by admission control", ("reason",), registry=r)
        self.transitions = Counter("fileproxy_circuit_transitions",
                                   "Circuit breaker state changes", ("upstream", "from", "to"),
                                   registry=r)
        self.active = gauge("fileproxy_active_requests", "Requests being handled")
        self.queued = gauge("fileproxy_queue_length", "Requests waiting for a slot")
        self.available = gauge("fileproxy_available_slots", "Free upstream slots")
        self.rps = gauge("fileproxy_requests_per_second", "Requests per second, last 10 s")
        self.circuit = gauge("fileproxy_circuit_state",
                             "Workers whose circuit for an upstream is in this state",
                             ("upstream", "state"))
        self.in_flight = gauge("fileproxy_upstream_in_flight", "Requests in flight per upstream",
                               ("upstream",))
        self.pool = gauge("fileproxy_upstream_connections",
                          "Pooled upstream connections by state", ("state",))
        self.tasks = Counter("fileproxy_tasks", "Async tasks submitted, and finished by state",
                             ("event",), registry=r)
        self.tasks_running = gauge("fileproxy_tasks_running", "Async tasks running now")
        self.task_queue = gauge("fileproxy_task_queue_length",
                                "Async tasks queued or running, not yet acknowledged",
                                mode="livemax")
        self.uploads = Counter("fileproxy_uploads", "Resumable upload sessions: created, resumed "
                               "(a PATCH after a broken one), completed", ("event",), registry=r)
        self.spool_bytes = gauge("fileproxy_upload_spool_bytes",
                                 "Spool bytes reserved by unfinished uploads", mode="livemax")
        self._rejected_seen: dict[str, int] = {}
        self.tally = Tally()

    # -- recording, on the request path

    def started_one(self) -> None:
        """A request came in (paired with finished())."""
        self.tally.active += 1
        self.rate.add()

    def finished(self, exchange: Exchange, duration: float) -> None:
        tally = self.tally
        tally.active -= 1
        tally.requests[exchange.outcome, str(exchange.status)] += 1
        tally.duration.observe(duration)
        if exchange.ttfb is not None:
            tally.ttfb.observe(exchange.ttfb)
        if duration < self._shortest:
            self._shortest = duration
            self.duration_min.labels("all").set(duration)
        if duration > self._longest:
            self._longest = duration
            self.duration_max.labels("all").set(duration)
        tally.bytes_in += exchange.bytes_in
        tally.bytes_out += exchange.bytes_out
        tally.retries += exchange.retries

    def received(self, body_bytes: int) -> None:
        """Request body bytes fileproxy took itself (upload PATCHes), outside an exchange."""
        self.tally.bytes_in += body_bytes

    def flush(self) -> None:
        """Move the tally into prometheus, where /metrics and /stats (all workers) read it."""
        tally = self.tally
        self.active.set(tally.active)
        for (outcome, status), count in tally.requests.items():
            self.requests.labels(outcome, status).inc(count)
        tally.requests.clear()
        tally.duration.flush(self.duration)
        tally.ttfb.flush(self.ttfb)
        for counter, name in ((self.bytes_in, "bytes_in"), (self.bytes_out, "bytes_out"),
                              (self.retries, "retries")):
            if getattr(tally, name):
                counter.inc(getattr(tally, name))
                setattr(tally, name, 0)

    def upstream_error(self, upstream: str, kind: str) -> None:
        self.upstream_errors.labels(upstream, kind or "other").inc()

    def breaker_changed(self, upstream: str, old: str, new: str) -> None:
        self.transitions.labels(upstream, old, new).inc()

    # -- sampled state, refreshed every second and before each scrape

    def refresh(self, admission: Any, upstreams: Any, connector: Any, lean: Any = None) -> None:
        self.flush()
        self.queued.set(admission.queued)
        self.available.set(admission.available)
        self.rps.set(self.rate.rate())
        for reason, count in admission.rejected.items():
            new = count - self._rejected_seen.get(reason, 0)
            if new:
                self.rejected.labels(reason).inc(new)
                self._rejected_seen[reason] = count
        for upstream in upstreams.members:
            state = upstream.breaker.state if upstream.breaker else "closed"
            for name in STATES:
                self.circuit.labels(upstream.authority, name).set(1 if name == state else 0)
            self.in_flight.labels(upstream.authority).set(upstream.in_flight)
        idle, in_use = pool_sizes(connector)
        if lean is not None:
            lean_idle, lean_in_use = lean.sizes()
            idle, in_use = idle + lean_idle, in_use + lean_in_use
        self.pool.labels("idle").set(idle)
        self.pool.labels("in_use").set(in_use)
        self.pool.labels("open").set(idle + in_use)

    # -- exposition

    def collect_registry(self) -> Any:
        """All workers' numbers under gunicorn; this process's otherwise."""
        directory = multiprocess_dir()
        if directory is None:
            return self.registry
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return registry

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.collect_registry()), CONTENT_TYPE_LATEST


def pool_sizes(connector: Any) -> tuple[int, int]:
    """(idle, in use) connections of an aiohttp connector (no public API for it: compat)."""
    return connector_sizes(connector)


# ---------------------------------------------------------------- /stats from the samples

def samples_by_name(registry: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for family in registry.collect():
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def total(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, [])
               if all(s.labels.get(key) == value for key, value in labels.items()))


def histogram_summary(samples: dict[str, list[Any]], name: str) -> dict[str, float | None]:
    count = total(samples, f"{name}_count")
    buckets = sorted(((float(s.labels["le"]), s.value) for s in samples.get(f"{name}_bucket", [])),
                     key=lambda item: item[0])
    merged: dict[float, float] = {}
    for bound, value in buckets:
        merged[bound] = merged.get(bound, 0) + value
    cumulative = sorted(merged.items())
    summary: dict[str, float | None] = {
        "avg": total(samples, f"{name}_sum") / count if count else None}
    for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        summary[label] = quantile(cumulative, count, q) if count else None
    return summary


def quantile(cumulative: list[tuple[float, float]], count: float, q: float) -> float:
    """Linear interpolation inside the bucket holding the q-th observation (as Prometheus does)."""
    rank, lower_bound, lower_count = q * count, 0.0, 0.0
    for bound, cum in cumulative:
        if cum >= rank:
            if math.isinf(bound):
                return lower_bound
            share = (rank - lower_count) / (cum - lower_count) if cum > lower_count else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, cum
    return lower_bound


def stats(metrics: Metrics) -> dict[str, Any]:
    s = samples_by_name(metrics.collect_registry())
    requests = total(s, "fileproxy_requests_total")
    ok = total(s, "fileproxy_requests_total", outcome="ok")
    by_outcome = outcome_counts(s)
    failed = sum(count for outcome, count in by_outcome.items() if outcome not in NOT_FAILURES)
    upstreams: dict[str, dict[str, Any]] = {}
    for sample in s.get("fileproxy_circuit_state", []):
        entry = upstreams.setdefault(sample.labels["upstream"], {"circuit_workers": {}})
        entry["circuit_workers"][sample.labels["state"]] = \
            entry["circuit_workers"].get(sample.labels["state"], 0) + int(sample.value)
    for sample in s.get("fileproxy_upstream_in_flight", []):
        upstreams.setdefault(sample.labels["upstream"], {"circuit_workers": {}})["in_flight"] = \
            int(sample.value)
    errors: dict[str, float] = {}
    for sample in s.get("fileproxy_upstream_errors_total", []):
        errors[sample.labels["kind"]] = errors.get(sample.labels["kind"], 0) + sample.value
    latency = histogram_summary(s, "fileproxy_request_duration_seconds")
    latency["min"] = min((x.value for x in s.get("fileproxy_request_duration_min_seconds", [])),
                         default=None)
    latency["max"] = max((x.value for x in s.get("fileproxy_request_duration_max_seconds", [])),
                         default=None)
    return {
        "requests": {"total": int(requests), "succeeded": int(ok), "failed": failed,
                     "success_rate": round(ok / (ok + failed), 4) if ok + failed else None,
                     "per_second": round(total(s, "fileproxy_requests_per_second"), 3),
                     "by_outcome": by_outcome},
        "latency_seconds": latency,
        "ttfb_seconds": histogram_summary(s, "fileproxy_ttfb_seconds"),
        "bytes": {"in": int(total(s, "fileproxy_request_body_bytes_total")),
                  "out": int(total(s, "fileproxy_response_body_bytes_total"))},
        "admission": {"active_requests": int(total(s, "fileproxy_active_requests")),
                      "queue_length": int(total(s, "fileproxy_queue_length")),
                      "available_slots": int(total(s, "fileproxy_available_slots")),
                      "queue_rejected": int(total(s, "fileproxy_admission_rejected_total"))},
        "timeouts": int(sum(v for k, v in errors.items() if "timeout" in k)),
        "retries": int(total(s, "fileproxy_retries_total")),
        "upstream_errors": {kind: int(v) for kind, v in errors.items()},
        "upstreams": upstreams,
        "connection_pool": {state: int(total(s, "fileproxy_upstream_connections", state=state))
                            for state in ("open", "idle", "in_use")},
        "uploads": {**{sample.labels["event"]: int(sample.value)
                       for sample in s.get("fileproxy_uploads_total", [])},
                    "spool_bytes": int(max((x.value for x in
                                            s.get("fileproxy_upload_spool_bytes", [])),
                                           default=0))},
        "tasks": {**{sample.labels["event"]: int(sample.value)
                     for sample in s.get("fileproxy_tasks_total", [])},
                  "running": int(total(s, "fileproxy_tasks_running")),
                  "queue_length": int(max((x.value for x in
                                           s.get("fileproxy_task_queue_length", [])),
                                          default=0))},
    }


def outcome_counts(samples: dict[str, list[Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in samples.get("fileproxy_requests_total", []):
        counts[sample.labels["outcome"]] = counts.get(sample.labels["outcome"], 0) + \
            int(sample.value)
    return counts
