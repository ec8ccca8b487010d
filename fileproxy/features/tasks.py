"""Async task mode: a request handed over with `Prefer: respond-async` (or matching --async-route) is
stored and answered 202 at once; any worker of any instance then runs it through the same upstream
machinery (admission, retries, breakers) and keeps the response until it is fetched or expires."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from fileproxy.config import Config, parse_seconds
from fileproxy.features.spoolfile import SpoolFile, read_chunks, remove
from fileproxy.http.clientbody import client_body
from fileproxy.http.errors import ProxyError
from fileproxy.http.headers import Outgoing
from fileproxy.http.responses import QuietResponse, json_response
from fileproxy.loops import supervised
from fileproxy.observability.metrics import Metrics
from fileproxy.policy.balancing import Upstream
from fileproxy.policy.retry import IDEMPOTENT
from fileproxy.state import StateStore, StateUnavailable
from fileproxy.upstream.aiohttp_client import ForwardedBody
from fileproxy.upstream.resume import Resumer, ResumeRefused, resumable_span

log = logging.getLogger("fileproxy.features.tasks")
QUEUE, INDEX = "tasks", "tasks:index"
PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = (
    "pending", "processing", "completed", "failed", "cancelled")
FINAL = frozenset({COMPLETED, FAILED, CANCELLED})
INTERRUPTED = ("interrupted: its worker stopped while the upstream had the request, and a "
               "request that is not idempotent and has no Idempotency-Key is not sent twice")
# A delivery answered with one of these (or 5xx, or not at all) is tried again.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
DELIVERY_BACKOFF_MAX = 60.0
CHUNK = 256 * 1024


@dataclass
class Task:
    id: str
    method: str
    target: str
    headers: list[list[str]]
    host: str | None
    client: str
    status: str = PENDING
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    upstream: str | None = None
    upstream_status: int | None = None
    error: str | None = None
    body_size: int = 0
    body_spooled: bool = False
    bytes_received: int = 0
    result_spooled: bool = False
    result_headers: list[list[str]] = field(default_factory=list)
    deliver_until: float | None = None  # an upload's delivery: tried again until then
    body_path: str | None = None  # a body spooled elsewhere (a finished upload's file)

    def public(self, status_url: str) -> dict[str, Any]:
        return {"task_id": self.id, "status": self.status, "status_url": status_url,
                "created": self.created, "started": self.started, "finished": self.finished,
                "attempts": self.attempts, "upstream": self.upstream,
                "upstream_status": self.upstream_status, "error": self.error,
                "request": {"method": self.method, "target": self.target,
                            "body_bytes": self.body_size},
                "bytes_received": self.bytes_received}


class Spill:
    """Keeps bytes in memory up to `limit`, then moves them (and all that follows) to a file."""

    def __init__(self, limit: int, path: Path) -> None:
        self.limit, self.path = limit, path
        self.kept: list[bytes] = []
        self.size = 0
        self.file: SpoolFile | None = None

    @property
    def spilled(self) -> bool:
        return self.file is not None

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.file is None and self.size > self.limit:
            self.file = await SpoolFile.open(self.path, "wb")
            await self.file.write(b"".join(self.kept))
            self.kept.clear()
        if self.file is not None:
            await self.file.write(chunk)
        else:
            self.kept.append(chunk)

    async def close(self) -> bytes | None:
        """The bytes kept in memory, or None when they went to the file."""
        if self.file is not None:
            await self.file.close()
            return None
        return b"".join(self.kept)


class StoredBody(ForwardedBody):
    """A task's request body, from the store or the spool: it can be sent again."""

    replayable = True

    def __init__(self, data: bytes | None, path: Path | None) -> None:
        super().__init__(data or b"")
        self._data, self._path = data, path

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        self.sent = True
        if self._path is None:
            await writer.write(self._data or b"")
            self.body_bytes = len(self._data or b"")
            return
        async for chunk in read_chunks(self._path):
            await writer.write(chunk)
            self.body_bytes += len(chunk)


# Handed over by the request path: admission, then one request sent (upstream choice, retries,
# breaker), as a context that yields the upstream and its response and releases both on exit.
# Called with the request, its stored body, a request id, the task's timeouts and the client.
Send = Callable[[Outgoing, ForwardedBody | None, str, aiohttp.ClientTimeout, str],
                AbstractAsyncContextManager[tuple[Upstream, aiohttp.ClientResponse]]]


class TaskManager:
    """Stores submitted requests, runs this worker's share of them, keeps their responses."""

    def __init__(self, config: Config, store: StateStore, send: Send, metrics: Metrics) -> None:
        self.config, self.store, self.send, self.metrics = config, store, send, metrics
        self.spool = Path(config.spool_dir) / "tasks"
        self.consumer = f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self.reclaimed: set[asyncio.Task[None]] = set()

    # -- keys and records

    def status_url(self, task_id: str) -> str:
        return f"{self.config.admin_prefix}/tasks/{task_id}"

    async def load(self, task_id: str) -> Task | None:
        raw = await self.store.get(f"task:{task_id}")
        return Task(**json.loads(raw)) if raw else None

    async def save(self, task: Task) -> None:
        await self.store.set(f"task:{task.id}", json.dumps(asdict(task)).encode(),
                             ttl=self.config.task_ttl)

    def spool_path(self, task_id: str, kind: str) -> Path:
        return self.spool / f"{task_id}.{kind}"

    # -- submitting

    async def submit(self, request: web.Request, outgoing: Outgoing, client: str
                     ) -> web.StreamResponse:
        """Store the request (body included) and queue it; 202 with where to look."""
        if await self.store.queue_length(QUEUE) >= self.config.task_queue_size:
            raise ProxyError(503, "Service Unavailable: the task queue is full; retry later",
                             headers={"Retry-After": "5"})
        headers = [[k, v] for k, v in outgoing.headers.items() if k.lower() != "prefer"]
        task = Task(secrets.token_urlsafe(24), outgoing.method, outgoing.target, headers,
                    outgoing.host, client)
        await self.store_body(request, task)
        await self.save(task)
        await self.store.index_add(INDEX, task.id, task.created)
        await self.store.queue_push(QUEUE, {"task_id": task.id})
        self.metrics.tasks.labels("submitted").inc()
        url = self.status_url(task.id)
        return json_response({"task_id": task.id, "status": PENDING, "status_url": url},
                             status=202, headers={"Location": url,
                                                  "Preference-Applied": "respond-async"})

    async def submit_file(self, task_id: str, method: str, target: str,
                          headers: list[list[str]], path: Path, size: int, client: str,
                          deliver_until: float) -> Task:
        """Queue a request whose body is a finished file (a completed upload), which stays where
        it is; it is sent until the upstream accepts it or `deliver_until`. Idempotent for one
        `task_id`: submitting again after a crash half way neither loses it nor queues it twice
        (the queued mark is set once it is in the queue)."""
        task = await self.load(task_id)
        if task is None:
            task = Task(task_id, method, target, headers, None, client, body_size=size,
                        body_spooled=True, body_path=str(path), deliver_until=deliver_until)
            await self.save(task)
            await self.store.index_add(INDEX, task.id, task.created)
        if not await self.store.get(f"task:{task.id}:queued"):
            await self.store.queue_push(QUEUE, {"task_id": task.id})
            await self.store.set(f"task:{task.id}:queued", b"1", ttl=self.config.task_ttl)
            self.metrics.tasks.labels("submitted").inc()
        return task

    async def store_body(self, request: web.Request, task: Task) -> None:
        """Below the inline threshold in the store, above it in the spool directory."""
        if not request.body_exists:
            return
        async with self.keeper(task, "body") as keep:
            async for chunk in client_body(request, self.config.client_timeout):
                task.body_size += len(chunk)
                await keep.write(chunk)
        task.body_spooled = keep.spilled

    @contextlib.asynccontextmanager
    async def keeper(self, task: Task, kind: str) -> AsyncIterator[Spill]:
        """Bytes written inside the block end up in the store (small) or the spool (large)."""
        keep = Spill(self.config.task_inline_max, self.spool_path(task.id, kind))
        try:
            yield keep
        finally:
            kept = await keep.close()
        if kept is not None:
            await self.store.set(f"task:{task.id}:{kind}", kept, ttl=self.config.task_ttl)

    # -- running (every worker)

    async def run_forever(self) -> None:
        """This worker's runners, the reclaim of dead workers' tasks and the queue sampling,
        each supervised (a failure is logged and the loop starts again)."""
        loops = [(f"task runner {n}", self.claim_and_run)
                 for n in range(1, self.config.task_concurrency + 1)]
        loops += [("task reclaim", self.reclaim_forever), ("task queue sampling",
                                                          self.sample_queue_forever)]
        runners = [asyncio.create_task(supervised(name, run)) for name, run in loops]
        try:
            await asyncio.gather(*runners)
        finally:
            for runner in runners:
                runner.cancel()

    async def claim_and_run(self) -> None:
        while True:
            try:
                claimed = await self.store.queue_claim(QUEUE, self.consumer, wait=1.0)
            except StateUnavailable:
                await asyncio.sleep(1)
                continue
            if claimed is not None:
                await self.run_claimed(*claimed)

    async def sample_queue_forever(self) -> None:
        while True:
            await self.sample_queue()
            await asyncio.sleep(2)

    async def reclaim_forever(self) -> None:
        """Tasks claimed by a worker that died come back after the visibility timeout."""
        while True:
            await asyncio.sleep(self.config.task_visibility_timeout / 2)
            with contextlib.suppress(StateUnavailable):
                for message_id, item in await self.store.queue_reclaim(
                        QUEUE, self.consumer, self.config.task_visibility_timeout):
                    job = asyncio.create_task(self.run_claimed(message_id, item))
                    self.reclaimed.add(job)
                    job.add_done_callback(self.reclaimed.discard)

    async def run_claimed(self, message_id: str, item: dict[str, Any]) -> None:
        """Run a claimed task and ack it. When the store goes away meanwhile, the claim stays
        unacked: whichever worker reclaims it once the store is back decides (run it again when
        that is safe, else end it interrupted)."""
        try:
            await self.run_task(message_id, item["task_id"])
            await self.store.queue_ack(QUEUE, message_id)
        except StateUnavailable as error:
            log.warning("task %s: the state store went away while it ran (%s); it is taken "
                        "over again once the store is back", item["task_id"], error)

    async def run_task(self, message_id: str, task_id: str) -> None:
        task = await self.load(task_id)
        if task is not None and task.status == PROCESSING and not safe_to_repeat(task):
            await self.interrupted(task)
        elif task is not None and task.status not in FINAL:
            runner = asyncio.create_task(self.execute(task))
            self.running[task.id] = runner
            try:
                await self.supervise(task.id, message_id, runner)
            finally:
                self.running.pop(task.id, None)

    async def supervise(self, task_id: str, message_id: str, runner: asyncio.Task[None]) -> None:
        """Keep the claim fresh while it runs; stop it when someone cancelled the task, or when
        this worker stops (then it goes back to the queue, when running it again is safe)."""
        try:
            while not runner.done():
                await asyncio.wait({runner}, timeout=1.0)
                if runner.done():
                    break
                with contextlib.suppress(StateUnavailable):
                    await self.store.queue_touch(QUEUE, self.consumer, message_id)
                    current = await self.load(task_id)
                    if current is None or current.status == CANCELLED:
                        runner.cancel()
        finally:
            if not runner.done():
                runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(runner)  # (its record is saved before this returns)

    async def execute(self, task: Task) -> None:
        """Run the task's request (a delivery again and again, with backoff, until the upstream
        accepts it or the upload expires) and keep the answer; the record says how it ended."""
        task.status, task.started = PROCESSING, time.time()
        metrics = self.metrics
        metrics.tasks_running.inc()
        try:
            error = await self.attempts_until_done(task)
            task.status, task.error = (FAILED, error) if error else (COMPLETED, None)
            if task.deliver_until is not None:
                self.delivered(task)
        except asyncio.CancelledError:
            # A user's cancel marked the record first (kept below); otherwise this worker is
            # stopping: the task goes back to pending and its unacked claim is taken over, when
            # sending it again is safe.
            if safe_to_repeat(task):
                task.status, task.error = PENDING, "interrupted; it will run again"
            else:
                task.status, task.error = FAILED, INTERRUPTED
            raise
        except StateUnavailable:
            raise  # not the task's fault: it stays claimed and runs again when that is safe
        except Exception as error:  # a task that cannot run ends, with its reason
            log.exception("task %s failed", task.id)
            task.status, task.error = FAILED, f"could not be run: {error!r}"
        finally:
            metrics.tasks_running.dec()
            task.finished = time.time()
            with contextlib.suppress(StateUnavailable):
                current = await self.load(task.id)
                if current is not None and current.status == CANCELLED:
                    task.status = CANCELLED
                await self.save(task)
            metrics.tasks.labels(task.status).inc()

    async def attempts_until_done(self, task: Task) -> str | None:
        """Attempts while a delivery may try again; the last one's error, if it failed."""
        while True:
            task.attempts += 1
            await self.save(task)
            error = await self.attempt(task)
            if task.deliver_until is not None and error is None and not accepted(task):
                error = f"the upstream answered {task.upstream_status}"
            delay = self.config.upload_delivery_backoff * 2 ** (task.attempts - 1)
            delay = min(delay, DELIVERY_BACKOFF_MAX)
            if not self.deliver_again(task, error, delay):
                return error
            task.error = f"attempt {task.attempts} failed ({error}); again in {delay:g} s"
            log.warning("delivery task %s (%s %s): %s", task.id, task.method, task.target,
                        task.error)
            await self.save(task)
            await asyncio.sleep(delay)

    async def attempt(self, task: Task) -> str | None:
        """One send; None when the upstream answered (its answer is kept), else why not."""
        headers = CIMultiDict((name, value) for name, value in task.headers)
        outgoing = Outgoing(task.method, task.target, headers,
                            task.body_size > 0 or task.method not in ("GET", "HEAD"), task.host)
        body = await self.stored_body(task) if outgoing.has_body else None
        try:
            async with self.send(outgoing, body, f"task-{task.id[:8]}", self.task_timeout(),
                                 task.client) as (upstream, response):
                task.upstream, task.upstream_status = upstream.authority, response.status
                task.result_headers = [[k, v] for k, v in response.headers.items()
                                       if k.lower() not in ("transfer-encoding",)]
                await self.keep_result(task, response, outgoing)
        except ProxyError as error:
            return error.message
        except (aiohttp.ClientError, TimeoutError) as error:
            return f"upstream body cut short: {error!r}"
        except ResumeRefused as error:
            return f"upstream body cut short, not resumed: {error}"
        return None

    @staticmethod
    def deliver_again(task: Task, error: str | None, delay: float) -> bool:
        """A delivery not yet accepted, for a reason that may pass, tries again while the
        upload has not expired."""
        if task.deliver_until is None or error is None or time.time() + delay > task.deliver_until:
            return False
        return task.upstream_status is None or task.upstream_status in RETRYABLE_STATUSES \
            or task.upstream_status >= 500

    def delivered(self, task: Task) -> None:
        """How a finished upload's delivery ended: a log line and a metric when it failed."""
        if task.status == FAILED:
            log.warning("upload delivery %s (%s %s) failed for good after %d attempts: %s",
                        task.id, task.method, task.target, task.attempts, task.error)
            self.metrics.uploads.labels("delivery_failed").inc()
        else:
            self.metrics.uploads.labels("delivered").inc()

    async def interrupted(self, task: Task) -> None:
        """A task whose worker died while the upstream had its request, which is not safe to
        send twice: it ends failed, saying so."""
        task.status, task.error, task.finished = FAILED, INTERRUPTED, time.time()
        await self.save(task)
        self.metrics.tasks.labels(FAILED).inc()
        log.warning("task %s (%s %s) %s", task.id, task.method, task.target, INTERRUPTED)

    async def sample_queue(self) -> None:
        """For the metrics: the queue length and the upload spool, read from the store."""
        with contextlib.suppress(StateUnavailable):
            self.metrics.task_queue.set(await self.store.queue_length(QUEUE))
            self.metrics.spool_bytes.set(
                int(await self.store.incr("uploads:spool-bytes", 0)))

    def task_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.config.task_timeout or None,
                                     sock_connect=self.config.connect_timeout,
                                     sock_read=self.config.task_read_timeout)

    async def stored_body(self, task: Task) -> StoredBody:
        if task.body_path is not None:
            return StoredBody(None, Path(task.body_path))
        if task.body_spooled:
            return StoredBody(None, self.spool_path(task.id, "body"))
        return StoredBody(await self.store.get(f"task:{task.id}:body"), None)

    async def keep_result(self, task: Task, response: aiohttp.ClientResponse,
                          outgoing: Outgoing) -> None:
        """The upstream's body into the store or the spool; a body cut mid-way is continued
        with Range + If-Range when it can be (upstream/resume.py), as a relayed one is."""
        task.bytes_received = 0  # (this attempt's body: the keeper starts empty)
        async with contextlib.AsyncExitStack() as parts, self.keeper(task, "result") as keep:
            resumer = self.result_resumer(task, response, outgoing, parts)
            current: aiohttp.ClientResponse | None = response
            while current is not None:
                try:
                    await self.keep_body(task, current, keep)
                    current = None
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                        TimeoutError):
                    if resumer is None:
                        raise
                    current = await rest_of(resumer, task.bytes_received)
        task.result_spooled = keep.spilled

    def result_resumer(self, task: Task, response: aiohttp.ClientResponse, outgoing: Outgoing,
                       parts: contextlib.AsyncExitStack) -> Resumer | None:
        span = resumable_span(outgoing, response)
        if span is None or not self.config.upstream_resume_attempts:
            return None

        async def fetch(ranged: Outgoing) -> aiohttp.ClientResponse:
            _, rest = await parts.enter_async_context(self.send(
                ranged, None, f"task-{task.id[:8]}", self.task_timeout(), task.client))
            return rest

        return Resumer(span, outgoing, fetch, self.config.upstream_resume_attempts,
                       count=lambda outcome: self.metrics.resumes.labels(outcome).inc())

    async def keep_body(self, task: Task, response: aiohttp.ClientResponse,
                        keep: Spill) -> None:
        reported = task.bytes_received
        async for chunk in response.content.iter_chunked(CHUNK):
            task.bytes_received += len(chunk)
            await keep.write(chunk)
            if task.bytes_received - reported >= 4 * CHUNK:  # progress for the status call
                reported = task.bytes_received
                with contextlib.suppress(StateUnavailable):
                    await self.save(task)

    # -- reading, cancelling, cleaning up

    async def result_body(self, task: Task) -> AsyncIterator[bytes]:
        if task.result_spooled:
            async for chunk in read_chunks(self.spool_path(task.id, "result")):
                yield chunk
        else:
            yield await self.store.get(f"task:{task.id}:result") or b""

    async def cancel(self, task: Task) -> None:
        task.status, task.finished, task.error = CANCELLED, time.time(), "cancelled"
        await self.save(task)
        runner = self.running.get(task.id)
        if runner is not None:
            runner.cancel()

    async def remove(self, task_id: str) -> None:
        task = await self.load(task_id)
        await self.store.delete(f"task:{task_id}", f"task:{task_id}:body",
                                f"task:{task_id}:result", f"task:{task_id}:queued")
        await self.store.index_remove(INDEX, task_id)
        files = [self.spool_path(task_id, kind) for kind in ("body", "result")]
        if task is not None and task.body_path is not None:
            files.append(Path(task.body_path))
        await remove(*files)

    async def listing(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        found = []
        for task_id, _ in await self.store.index_range(INDEX, 10_000):
            task = await self.load(task_id)
            if task is None:
                await self.store.index_remove(INDEX, task_id)  # expired
            elif status is None or task.status == status:
                found.append(task.public(self.status_url(task.id)))
            if len(found) >= limit:
                break
        return found

    async def remove_older_than(self, seconds: float) -> int:
        old = await self.store.index_range(INDEX, 100_000, max_score=time.time() - seconds)
        for task_id, _ in old:
            await self.remove(task_id)
        return len(old)


async def rest_of(resumer: Resumer, received: int) -> aiohttp.ClientResponse:
    """The rest of a task result's body (ResumeRefused when it cannot be had)."""
    rest = await resumer.resume(received)
    assert isinstance(rest, aiohttp.ClientResponse)  # (a task's sends are aiohttp's)
    return rest


def accepted(task: Task) -> bool:
    """A delivery's answer that means the upstream took the file."""
    return task.upstream_status is not None and task.upstream_status < 400


def safe_to_repeat(task: Task) -> bool:
    """May the task's request reach the upstream a second time? (An idempotent method, or an
    Idempotency-Key, which lets the origin drop a duplicate.)"""
    return task.method in IDEMPOTENT or any(
        name.lower() == "idempotency-key" for name, _ in task.headers)


def task_unavailable(error: StateUnavailable) -> QuietResponse:
    return QuietResponse(status=503, text=f"503 Service Unavailable: the task store is "
                                          f"unavailable ({error}); plain proxying still works, "
                                          "try the task again shortly\n",
                         headers={"Retry-After": "5"})


# ---------------------------------------------------------------- endpoints (under the admin prefix)

TASKS = web.AppKey("tasks", TaskManager)


def manager_of(request: web.Request) -> TaskManager:
    return request.app[TASKS]


async def found_task(request: web.Request) -> tuple[TaskManager, Task]:
    manager = manager_of(request)
    task = await manager.load(request.match_info["task_id"])
    if task is None:
        raise web.HTTPNotFound(text="404 Not Found: no such task (or it expired)\n")
    return manager, task


async def task_status(request: web.Request) -> web.StreamResponse:
    manager, task = await found_task(request)
    return json_response(task.public(manager.status_url(task.id)))


async def task_result(request: web.Request) -> web.StreamResponse:
    """The upstream's response as it came: status, end-to-end headers, body streamed."""
    manager, task = await found_task(request)
    if task.status != COMPLETED:
        return json_response(task.public(manager.status_url(task.id)), status=409)
    return await send_result(request, manager, task)


async def send_result(request: web.Request, manager: TaskManager, task: Task,
                      extra: dict[str, str] | None = None) -> web.StreamResponse:
    """A completed task's upstream response, streamed to the client, with `extra` headers."""
    response = web.StreamResponse(status=task.upstream_status or 502)
    for name, value in task.result_headers:
        if name.lower() not in ("content-length", "connection", "keep-alive"):
            response.headers.add(name, value)
    for name, value in (extra or {}).items():
        response.headers[name] = value
    response.content_length = task.bytes_received
    await response.prepare(request)
    async for chunk in manager.result_body(task):
        await response.write(chunk)
    await response.write_eof()
    return response


async def task_delete(request: web.Request) -> web.StreamResponse:
    """Cancels a task that has not finished (its upstream request is stopped), else removes it."""
    manager, task = await found_task(request)
    if task.status in FINAL:
        await manager.remove(task.id)
        return json_response({"task_id": task.id, "removed": True})
    await manager.cancel(task)
    return json_response(task.public(manager.status_url(task.id)))


async def task_list(request: web.Request) -> web.StreamResponse:
    limit = min(int(request.query.get("limit", "100")), 1000)
    tasks = await manager_of(request).listing(request.query.get("status"), limit)
    return json_response({"tasks": tasks})


async def task_cleanup(request: web.Request) -> web.StreamResponse:
    try:
        older_than = parse_seconds(request.query.get("older_than", ""))
    except ValueError:
        raise web.HTTPBadRequest(text="400 Bad Request: older_than must be a duration such as "
                                      "24h or 30m\n") from None
    removed = await manager_of(request).remove_older_than(older_than)
    return json_response({"removed": removed})


def store_errors_as_503(handler: Any) -> Any:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except StateUnavailable as error:
            return task_unavailable(error)

    return wrapped


def add_task_routes(app: web.Application, prefix: str, guarded: Any) -> None:
    """The task id is the capability to read a task; listing and cleanup need the admin token
    (`admin_only` refuses them when none is set)."""
    routes = app.router
    routes.add_get(f"{prefix}/tasks/{{task_id}}", store_errors_as_503(task_status))
    routes.add_get(f"{prefix}/tasks/{{task_id}}/result", store_errors_as_503(task_result))
    routes.add_delete(f"{prefix}/tasks/{{task_id}}", store_errors_as_503(task_delete))
    routes.add_get(f"{prefix}/tasks", guarded(store_errors_as_503(task_list)))
    routes.add_delete(f"{prefix}/tasks", guarded(store_errors_as_503(task_cleanup)))
