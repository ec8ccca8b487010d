"""Upload sessions and tus 1.0 (core, creation, creation-with-upload, termination, checksum,
expiration) under the admin prefix. Sessions live in the state store, bytes in the spool (fsync'd
before the offset advances); a finished upload is delivered upstream as one ordinary request through
the async task machinery. The IETF draft (features/resumable.py) uses the same sessions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

from aiohttp import web

from fileproxy.config import Config
from fileproxy.features.spoolfile import SpoolFile, create_empty, remove
from fileproxy.features.tasks import Task, TaskManager
from fileproxy.features.uploadlock import UploadLock
from fileproxy.http.clientbody import ClientStalled, client_body
from fileproxy.http.errors import ProxyError
from fileproxy.http.responses import QuietResponse
from fileproxy.http.targets import check_method, check_value, origin_form_path
from fileproxy.loops import uncancelled
from fileproxy.observability.metrics import Metrics
from fileproxy.state import Locked, LockHandle, StateStore, StateUnavailable

log = logging.getLogger("fileproxy.features.uploads")
TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
CHECKSUMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}
OFFSET_TYPE = "application/offset+octet-stream"
CHUNK = 256 * 1024
INDEX = "uploads:index"


@dataclass
class Upload:
    id: str
    length: int | None  # None: not known yet (an IETF upload before the client says)
    metadata: dict[str, str]
    created: float = field(default_factory=time.time)
    expires: float = 0.0
    offset: int = 0
    task_id: str | None = None
    broken: bool = False  # the last PATCH ended before its Content-Length
    protocol: str = "tus"  # or "ietf" (features/resumable.py)
    interop: int = 0  # ietf: the draft interop version it was created with
    complete: bool = False  # ietf: the client marked it complete
    method: str = ""  # ietf: the creating request's method, target and end-to-end headers
    target: str = ""
    headers: list[list[str]] = field(default_factory=list)
    reserved: int = 0  # bytes counted against the spool quota

    def __post_init__(self) -> None:
        if not self.reserved and self.length:  # (a record from before `reserved`)
            self.reserved = self.length

    @property
    def finished(self) -> bool:
        """Every byte is in: tus when the offset reaches the length, ietf when the client said
        so (Upload-Complete: ?1) and its request went through."""
        return self.complete if self.protocol == "ietf" else self.offset == self.length

    def delivery(self) -> tuple[str, str, list[list[str]]]:
        """Method, target and headers of the request that delivers the finished file."""
        if self.protocol == "ietf":
            headers = [[name, value] for name, value in self.headers]
        else:
            headers = [["Content-Type", self.metadata.get("filetype",
                                                         "application/octet-stream")]]
        headers.append(["Content-Length", str(self.offset)])
        if not any(name.lower() == "idempotency-key" for name, _ in headers):
            headers.append(["Idempotency-Key", self.id])
        method = self.method if self.protocol == "ietf" else \
            self.metadata.get("method", "PUT").upper()
        target = self.target if self.protocol == "ietf" else self.metadata["target"]
        return method, target, headers


def tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


class TusError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> QuietResponse:
        return QuietResponse(status=self.status, text=f"{self.status} {self.message}\n",
                             headers=tus_headers())


class OffsetMismatch(TusError):
    """An append at another offset than the upload's."""

    def __init__(self, expected: int, provided: int) -> None:
        super().__init__(409, f"Conflict: Upload-Offset must be {expected}")
        self.expected, self.provided = expected, provided


class TooLong(TusError):
    """Over the size limit, or (`beyond_length`) more bytes than the upload's own length."""

    def __init__(self, limit: int, message: str, beyond_length: bool = False) -> None:
        super().__init__(413, f"Request Entity Too Large: {message}")
        self.limit, self.beyond_length = limit, beyond_length


def parse_metadata(header: str) -> dict[str, str]:
    """Upload-Metadata: `key base64value, key2 base64value2` (a value may be absent)."""
    metadata = {}
    for pair in filter(None, (part.strip() for part in header.split(","))):
        key, _, encoded = pair.partition(" ")
        try:
            metadata[key] = base64.b64decode(encoded, validate=True).decode() if encoded else ""
        except ValueError:
            raise TusError(400, f"Bad Request: Upload-Metadata value for {key!r} is not "
                                "base64") from None
    return metadata


class Uploads:
    """tus uploads: sessions in the store, bytes in the spool; a finished one becomes a task."""

    def __init__(self, config: Config, store: StateStore, tasks: TaskManager,
                 metrics: Metrics | None = None) -> None:
        self.config, self.store, self.tasks, self.metrics = config, store, tasks, metrics
        self.spool = Path(config.spool_dir) / "uploads"

    def path(self, upload_id: str) -> Path:
        return self.spool / f"{upload_id}.part"

    def url(self, upload_id: str) -> str:
        return f"{self.config.admin_prefix}/uploads/{upload_id}"

    async def load(self, upload_id: str) -> Upload:
        raw = await self.store.get(f"upload:{upload_id}")
        if raw is None:
            raise TusError(404, "Not Found: no such upload (or it expired)")
        upload = Upload(**json.loads(raw))
        if upload.expires and upload.expires < time.time():
            raise TusError(410, "Gone: this upload expired")
        return upload

    async def save(self, upload: Upload) -> None:
        ttl = max(1.0, upload.expires - time.time()) + 3600 if upload.expires else None
        await self.store.set(f"upload:{upload.id}", json.dumps(asdict(upload)).encode(), ttl=ttl)

    async def spool_in_use(self) -> int:
        return int(await self.store.incr("uploads:spool-bytes", 0))

    async def reserve(self, upload: Upload, size: int) -> None:
        """Count `size` more spool bytes for this upload against the quota (507 when full)."""
        if await self.spool_in_use() + size > self.config.upload_spool_quota:
            raise TusError(507, "Insufficient Storage: the upload spool is full; retry later")
        await self.store.incr("uploads:spool-bytes", size)
        upload.reserved += size

    async def release(self, upload: Upload) -> None:
        await self.store.incr("uploads:spool-bytes", -upload.reserved)
        upload.reserved = 0

    async def open_session(self, upload: Upload) -> None:
        """A new upload: its spool file, its share of the quota, its record."""
        if upload.length is not None and upload.length > self.config.upload_max_size:
            raise TooLong(self.config.upload_max_size,
                          f"the limit is {self.config.upload_max_size} bytes")
        upload.reserved = 0
        await self.reserve(upload, upload.length or 0)
        await create_empty(self.path(upload.id))
        await self.save(upload)
        await self.store.index_add(INDEX, upload.id, upload.expires)
        self.count("created")

    async def create(self, request: web.Request) -> Upload:
        check_version(request)
        length_header = request.headers.get("Upload-Length", "")
        if not ascii_number(length_header):
            raise TusError(400, "Bad Request: Upload-Length must be a whole number of bytes")
        length = int(length_header)
        header = request.headers.get("Upload-Metadata", "")
        if len(header) > self.config.max_header_size:
            raise TusError(431, f"Request Header Fields Too Large: Upload-Metadata over "
                                f"{self.config.max_header_size} bytes")
        metadata = parse_metadata(header)
        if not metadata.get("target"):
            raise TusError(400, "Bad Request: Upload-Metadata needs `target`, the upstream path "
                                "the finished file goes to")
        try:
            check_deliverable(metadata)
        except ProxyError as error:
            raise TusError(error.status, f"{error.message} (Upload-Metadata)") from None
        upload = Upload(secrets.token_urlsafe(24), length, metadata,
                        expires=time.time() + self.config.upload_ttl)
        await self.open_session(upload)
        return upload

    async def append(self, request: web.Request, upload: Upload,
                     creating: bool = False) -> Upload:
        """tus: write the PATCH body at the upload's offset, fsync'd; a checksum mismatch (460)
        discards the chunk. The body of a creation-with-upload POST is a PATCH at offset 0 (it
        need not say Upload-Offset)."""
        check_version(request)
        if request.content_type != OFFSET_TYPE:
            raise TusError(415, f"Unsupported Media Type: PATCH bodies are {OFFSET_TYPE}")
        offset = request.headers.get("Upload-Offset", "0" if creating else "")
        if not ascii_number(offset):
            raise TusError(409, f"Conflict: Upload-Offset must be {upload.offset}")
        digest, expected = checksum_of(request.headers.get("Upload-Checksum"))
        return await self.write_at(request, upload, int(offset), digest, expected)

    async def write_at(self, request: web.Request, upload: Upload, offset: int,
                       digest: Any = None, expected: bytes | None = None,
                       length: int | None = None) -> Upload:
        """Append the request body at `offset`, which must be the upload's (OffsetMismatch);
        `length` is the upload's, when this request is the first to tell. A request to an
        upload another one holds asks that one to let go (UploadLock: it does once it
        stalled) and goes on then: 423 when it never does."""
        if offset != upload.offset:
            raise OffsetMismatch(upload.offset, offset)
        handover = self.lock_of(upload.id)
        try:
            async with handover.held(lambda why: let_go(request, why)) as lock:
                upload = await self.load(upload.id)  # the offset as it is now, under the lock
                if offset != upload.offset:
                    raise OffsetMismatch(upload.offset, offset)
                if length is not None and upload.length is None:
                    await self.learn_length(upload, length)
                if upload.broken:
                    self.count("resumed")
                    upload.broken = False
                return await self.write_chunk(request, upload, digest, expected, lock,
                                              handover)
        except Locked:
            raise TusError(423, "Locked: another PATCH to this upload is running") from None

    def lock_of(self, upload_id: str) -> UploadLock:
        return UploadLock(self.store, upload_id, self.config.upload_lock_ttl,
                          self.config.upload_stall)

    async def write_chunk(self, request: web.Request, upload: Upload, digest: Any,
                          expected: bytes | None, lock: LockHandle,
                          handover: UploadLock) -> Upload:
        """Without a checksum, what arrived is kept however the PATCH ends (the client left or
        stalled, a newer PATCH took the upload over) while this PATCH holds the lock; with one,
        all or nothing."""
        first = start = upload.offset
        keep, stalled = digest is None, False
        handle = await SpoolFile.open(self.path(upload.id), "r+b")
        try:
            await handle.seek(start)
            try:
                async for chunk in client_body(request, self.config.client_timeout,
                                               close_on_stall=False):
                    await self.make_room(upload, upload.offset + len(chunk))
                    handover.received()
                    await handle.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    upload.offset += len(chunk)
                    if digest is None and upload.offset - start >= 8 * CHUNK:
                        await self.persist(handle, upload)
                        start = upload.offset
            except BaseException as error:
                upload.broken = True
                stalled = isinstance(error, ClientStalled)
                raise
            if digest is not None:
                if digest.digest() != expected:
                    await handle.truncate(start)
                    raise TusError(460, "Checksum Mismatch: the chunk was discarded")
                keep = True
        finally:
            # A client that left cancels this handler: what arrived is kept all the same, while
            # this PATCH still holds the upload's lock.
            await uncancelled(self.settle(handle, upload, lock, keep))
            if self.metrics is not None:
                self.metrics.received(upload.offset - first)
            if stalled and request.transport is not None:
                request.transport.close()  # (once what arrived is kept: a HEAD then sees it)
        return upload

    async def settle(self, handle: SpoolFile, upload: Upload, lock: LockHandle,
                     keep: bool) -> None:
        """After a PATCH: what it wrote is kept (fsync, then the offset) while this PATCH still
        holds the upload, and the file is closed."""
        try:
            if keep and await still_held(lock):
                await self.persist(handle, upload)
        finally:
            await handle.close()

    async def learn_length(self, upload: Upload, length: int) -> None:
        """An upload of unknown length learns it: within the limit, its quota share grown to
        it (kept with the first bytes persisted)."""
        if length > self.config.upload_max_size:
            raise TooLong(self.config.upload_max_size,
                          f"the limit is {self.config.upload_max_size} bytes")
        if length < upload.offset:
            raise TooLong(length, "more bytes than Upload-Length", beyond_length=True)
        await self.reserve(upload, max(0, length - upload.reserved))
        upload.length = length

    async def make_room(self, upload: Upload, end: int) -> None:
        """Bytes up to `end` may be written: within the length, or for an upload of unknown
        length within the size limit, its quota share grown in 8 MiB steps."""
        if upload.length is not None:
            if end > upload.length:
                raise TooLong(upload.length, "more bytes than Upload-Length",
                              beyond_length=True)
            return
        if end > self.config.upload_max_size:
            raise TooLong(self.config.upload_max_size,
                          f"more bytes than the limit of {self.config.upload_max_size}")
        if end > upload.reserved:
            step = max(end - upload.reserved, 8 << 20)
            await self.reserve(upload, min(step, self.config.upload_max_size - upload.reserved))

    async def persist(self, handle: SpoolFile, upload: Upload) -> None:
        """fsync first, then advance the stored offset: a crash never reports unkept bytes."""
        await handle.sync()
        await self.save(upload)

    async def terminate(self, upload: Upload) -> None:
        """Free its record, its spool file and its share of the quota."""
        await self.store.delete(f"upload:{upload.id}")
        await self.store.index_remove(INDEX, upload.id)
        if upload.task_id is None:  # a delivered upload's file belongs to its task now
            await self.release(upload)
            await remove(self.path(upload.id))

    async def finish(self, upload: Upload, client: str) -> Task:
        """Hand a complete upload to its delivery (an async task whose id follows from the
        upload's, so doing this again after a crash half way is harmless); its file becomes the
        task's. The upload's id goes as Idempotency-Key: delivered at least once (tried again
        until accepted or expired), the origin can recognise a repeat."""
        method, target, headers = upload.delivery()
        task = await self.tasks.submit_file(
            f"u{upload.id}", method, target, headers, self.path(upload.id), upload.offset,
            client, deliver_until=upload.expires)
        if upload.task_id is None:
            upload.task_id = task.id
            await self.save(upload)  # (first: a crash in between leaks quota, never frees twice)
            await self.release(upload)
            self.count("completed")
        return task

    async def delivery_outcome(self, task_id: str) -> Task | None:
        """The delivery as it stands after at most --upload-delivery-wait seconds: back as soon
        as the upstream answered (or the delivery failed for good)."""
        deadline = time.monotonic() + self.config.upload_delivery_wait
        while True:
            task = await self.tasks.load(task_id)
            if task is None or task.status in ("completed", "failed") \
                    or time.monotonic() >= deadline:
                return task
            await asyncio.sleep(0.05)

    async def finish_stranded(self) -> int:
        """Uploads whose every byte is in but whose delivery was never handed over (the worker
        or the store died between the two): handed over now."""
        finished = 0
        for upload_id, _ in await self.store.index_range(INDEX, 100_000):
            raw = await self.store.get(f"upload:{upload_id}")
            if raw is None:
                continue
            upload = Upload(**json.loads(raw))
            if upload.finished and upload.task_id is None:
                log.warning("upload %s was complete without a delivery: handing it over now",
                            upload.id)
                await self.finish(upload, "-")
                finished += 1
        return finished

    async def sweep(self) -> int:
        """Expired uploads give their spool space back and stranded complete ones are handed to
        their delivery (run every minute by each worker)."""
        await self.finish_stranded()
        expired = await self.store.index_range(INDEX, 1000, max_score=time.time())
        for upload_id, _ in expired:
            raw = await self.store.get(f"upload:{upload_id}")
            if raw is None:
                await self.store.index_remove(INDEX, upload_id)
                continue
            await self.terminate(Upload(**json.loads(raw)))
        return len(expired)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.upload_sweep_interval)
            with contextlib.suppress(StateUnavailable):
                await self.sweep()

    def count(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.uploads.labels(event).inc()


def ascii_number(text: str) -> bool:
    """Digits 0-9 only (str.isdigit() takes other scripts' digits, which int() reads)."""
    return text.isascii() and text.isdigit()


def check_deliverable(metadata: dict[str, str]) -> None:
    """What the finished upload's delivery will send must be sendable: checked at creation, so
    that no delivery can fail for its metadata later (or wedge a runner)."""
    origin_form_path(metadata["target"])
    check_method(metadata.get("method", "PUT").upper())
    for key, value in metadata.items():
        check_value(f"`{key}`", value)


def check_version(request: web.Request) -> None:
    if request.headers.get("Tus-Resumable") != TUS_VERSION:
        raise TusError(412, f"Precondition Failed: Tus-Resumable {TUS_VERSION} is required")


def let_go(request: web.Request, why: str) -> None:
    """A PATCH asked to give its upload up ends: its connection closes (what arrived is kept)."""
    log.info("%s %s: ending this PATCH: %s", request.method, request.path, why)
    if request.transport is not None:
        request.transport.close()


async def still_held(lock: LockHandle) -> bool:
    """A PATCH that stalled past its lock may have been taken over: then its view is stale."""
    try:
        await lock.extend()
    except Locked:
        return False
    return True


def checksum_of(header: str | None) -> tuple[Any, bytes | None]:
    if not header:
        return None, None
    algorithm, _, encoded = header.partition(" ")
    if algorithm not in CHECKSUMS:
        raise TusError(400, f"Bad Request: checksum algorithm {algorithm!r} is not supported")
    try:
        return CHECKSUMS[algorithm](), base64.b64decode(encoded, validate=True)
    except ValueError:
        raise TusError(400, "Bad Request: Upload-Checksum is not base64") from None


def expires_header(upload: Upload) -> dict[str, str]:
    return {"Upload-Expires": formatdate(upload.expires, usegmt=True)} if upload.expires else {}


# ---------------------------------------------------------------- endpoints

UPLOADS = web.AppKey("uploads", Uploads)


def uploads_of(request: web.Request) -> Uploads:
    return request.app[UPLOADS]


async def options(request: web.Request) -> web.StreamResponse:
    config = uploads_of(request).config
    return QuietResponse(status=204, headers=tus_headers(
        **{"Tus-Version": TUS_VERSION, "Tus-Extension": EXTENSIONS,
           "Tus-Max-Size": str(config.upload_max_size),
           "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)}))


async def create(request: web.Request) -> web.StreamResponse:
    uploads = uploads_of(request)
    token = uploads.config.upload_token
    if token and not hmac.compare_digest(
            request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode(),
            token.encode()):
        raise TusError(401, "Unauthorized: creating an upload needs the upload bearer token")
    upload = await uploads.create(request)
    headers = tus_headers(Location=uploads.url(upload.id), **expires_header(upload))
    if request.body_exists and request.content_type == OFFSET_TYPE:  # creation-with-upload
        upload = await uploads.append(request, upload, creating=True)
        headers["Upload-Offset"] = str(upload.offset)
        headers.update(await finish_if_complete(request, uploads, upload))
    return QuietResponse(status=201, headers=headers)


async def current_state(request: web.Request, upload: Upload) -> Upload:
    """The upload as a HEAD reports it. A PATCH that still holds it but stalled (its client
    reconnected and asks here first) is asked to let go first, so the offset is what it kept;
    a finished upload whose delivery was never handed over (its last PATCH was cut short just
    then) is handed over now."""
    uploads = uploads_of(request)
    if not upload.finished:
        await uploads.lock_of(upload.id).wait_for_a_stalled_holder()
        upload = await uploads.load(upload.id)
    if upload.finished and upload.task_id is None:
        await uploads.finish(upload, request.remote or "-")
    return upload


async def head(request: web.Request, upload: Upload) -> web.StreamResponse:
    """Where the upload stands."""
    uploads = uploads_of(request)
    upload = await current_state(request, upload)
    delivery = await delivery_headers(uploads, upload)
    metadata = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                        for key, value in upload.metadata.items())
    return QuietResponse(status=200, headers=tus_headers(
        **{"Upload-Offset": str(upload.offset), "Upload-Length": str(upload.length),
           "Upload-Metadata": metadata}, **expires_header(upload), **delivery))


async def delivery_headers(uploads: Uploads, upload: Upload) -> dict[str, str]:
    """Where a finished upload's delivery stands, for a client that asks later (the final
    PATCH answered 204 before the upstream did): pending, delivered or failed, and the
    upstream's status once it answered."""
    if upload.task_id is None:
        return {}
    task = await uploads.tasks.load(upload.task_id)
    headers = {"Fileproxy-Delivery": uploads.tasks.status_url(upload.task_id),
               "Fileproxy-Delivery-Status": delivery_status(task)}
    if task is not None and task.upstream_status is not None:
        headers["Fileproxy-Upstream-Status"] = str(task.upstream_status)
    return headers


def delivery_status(task: Task | None) -> str:
    if task is None:
        return "unknown"  # (its record expired)
    if task.status in ("failed", "cancelled"):
        return "failed"
    return "delivered" if task.status == "completed" else "pending"


async def patch(request: web.Request, upload: Upload) -> web.StreamResponse:
    uploads = uploads_of(request)
    upload = await uploads.append(request, upload)
    headers = tus_headers(**{"Upload-Offset": str(upload.offset)}, **expires_header(upload))
    headers.update(await finish_if_complete(request, uploads, upload))
    return QuietResponse(status=204, headers=headers)


async def delete(request: web.Request, upload: Upload) -> web.StreamResponse:
    check_version(request)
    await uploads_of(request).terminate(upload)
    return QuietResponse(status=204, headers=tus_headers())


async def finish_if_complete(request: web.Request, uploads: Uploads,
                             upload: Upload) -> dict[str, str]:
    """The last byte is in: deliver the file upstream as one request (an async task), and say
    what the upstream answered if it answers within --upload-delivery-wait."""
    if not upload.finished or upload.task_id is not None:
        return {}
    task = await uploads.finish(upload, request.remote or "-")
    answer = {"Fileproxy-Delivery": uploads.tasks.status_url(task.id)}
    outcome = await uploads.delivery_outcome(task.id)
    if outcome is not None and outcome.status in ("completed", "failed"):
        answer["Fileproxy-Upstream-Status"] = str(outcome.upstream_status or 502)
    return answer


def tus_errors(handler: Any) -> Any:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except TusError as error:
            return error.response()
        except StateUnavailable as error:
            return QuietResponse(status=503, text=f"503 Service Unavailable: the upload store "
                                                  f"is unavailable ({error}); retry shortly\n",
                                 headers=tus_headers(**{"Retry-After": "5"}))

    return wrapped
