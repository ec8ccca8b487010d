"""Resumable uploads as the IETF draft has them (draft-ietf-httpbis-resumable-upload, interop
versions 6 and 8), on the tus sessions, spool and locks: a request to a proxied path that carries
Upload-Complete becomes an upload resource; HEAD, PATCH (application/partial-upload) and DELETE go to
the upload's URL; the finished representation is delivered upstream as the request it started as,
and the completing request is answered with the upstream's answer (within --upload-delivery-wait)."""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from fileproxy.features.tasks import Task, send_result
from fileproxy.features.uploads import (
    OffsetMismatch,
    TooLong,
    TusError,
    Upload,
    Uploads,
    current_state,
    delivery_headers,
    uploads_of,
)
from fileproxy.http.headers import Outgoing, send_interim
from fileproxy.http.responses import QuietResponse

INTEROP_VERSIONS = ("6", "8")
LATEST_INTEROP = 8
PARTIAL_UPLOAD = "application/partial-upload"
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
# The upload protocol's own fields: never part of the request delivered upstream.
PROTOCOL_FIELDS = frozenset({"upload-complete", "upload-offset", "upload-length", "upload-limit",
                             "upload-draft-interop-version", "content-length",
                             "transfer-encoding", "expect", "fileproxy-upload-token"})
Handler = Callable[[web.Request, Upload], Awaitable[web.StreamResponse]]


class DraftError(Exception):
    """An answer the draft defines: a problem type (RFC 9457) where it names one."""

    def __init__(self, status: int, title: str, kind: str | None = None,
                 headers: Mapping[str, str] | None = None, **members: Any) -> None:
        super().__init__(title)
        self.status, self.title, self.kind = status, title, kind
        self.headers, self.members = dict(headers or {}), members

    def response(self, interop: int) -> QuietResponse:
        headers = {**interop_header(interop), **self.headers}
        if self.kind is None:
            return QuietResponse(status=self.status, text=f"{self.status} {self.title}\n",
                                 headers=headers)
        body = {"type": PROBLEM_TYPES + self.kind, "title": self.title, **self.members}
        return QuietResponse(status=self.status, text=json.dumps(body), headers=headers,
                             content_type="application/problem+json")


def sf_boolean(value: str | None) -> bool | None:
    """A Structured Field Boolean (RFC 9651 3.3.6): ?1 or ?0, else None."""
    return {"?1": True, "?0": False}.get((value or "").strip())


def sf_integer(value: str | None) -> int | None:
    """A non-negative Structured Field Integer (at most 15 ASCII digits), else None."""
    text = (value or "").strip()
    if not text or len(text) > 15 or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def interop_of(headers: Mapping[str, str], default: int = LATEST_INTEROP) -> int:
    version = headers.get("Upload-Draft-Interop-Version", "").strip()
    return int(version) if version in INTEROP_VERSIONS else default


def interop_header(interop: int) -> dict[str, str]:
    return {"Upload-Draft-Interop-Version": str(interop)}


def upload_limit(uploads: Uploads, upload: Upload | None, interop: int) -> dict[str, str]:
    """Upload-Limit: the size limit and the time left (interop 6 called it `expires`)."""
    limits = [f"max-size={uploads.config.upload_max_size}"]
    remaining = (upload.expires if upload else time.time() + uploads.config.upload_ttl) \
        - time.time()
    limits.append(f"{'expires' if interop < 8 else 'max-age'}={max(0, int(remaining))}")
    return {"Upload-Limit": ", ".join(limits)}


def state_headers(uploads: Uploads, upload: Upload) -> dict[str, str]:
    """What every answer about an upload says: offset, completeness, length, limits."""
    headers = {"Upload-Offset": str(upload.offset),
               "Upload-Complete": "?1" if upload.complete else "?0",
               **upload_limit(uploads, upload, upload.interop),
               **interop_header(upload.interop)}
    if upload.length is not None:
        headers["Upload-Length"] = str(upload.length)
    return headers


def declared_length(headers: Mapping[str, str], complete: bool, offset: int,
                    content_length: int | None, known: int | None) -> int | None:
    """The length this request implies (Upload-Length, or the offset plus the Content-Length
    of a completing request), checked against every other indication."""
    indications = [sf_integer(headers.get("Upload-Length"))]
    if complete and content_length is not None:
        indications.append(offset + content_length)
    values = {value for value in (*indications, known) if value is not None}
    if len(values) > 1:
        raise DraftError(400, "inconsistent length values for upload",
                         "inconsistent-upload-length")
    return values.pop() if values else None


def delivered_headers(outgoing: Outgoing) -> list[list[str]]:
    """The creating request's end-to-end headers (as fileproxy forwards them), without the
    upload protocol's: what the delivered request carries, with its Content-Length."""
    return [[name, value] for name, value in outgoing.headers.items()
            if name.lower() not in PROTOCOL_FIELDS]


# ---------------------------------------------------------------- creation (a proxied path)

async def create(request: web.Request, outgoing: Outgoing) -> web.StreamResponse:
    """A request carrying Upload-Complete to a proxied path: the upload resource is created and
    announced (104 with its Location, HTTP/1.1), then the request's content is its first part."""
    interop = interop_of(request.headers)
    try:
        return await create_upload(request, outgoing, interop)
    except DraftError as error:
        return error.response(interop)
    except TusError as error:
        return draft_error(uploads_of(request), None, interop, error).response(interop)


async def create_upload(request: web.Request, outgoing: Outgoing,
                        interop: int) -> web.StreamResponse:
    uploads = uploads_of(request)
    complete = sf_boolean(request.headers.get("Upload-Complete"))
    if complete is None:
        raise DraftError(400, "Bad Request: Upload-Complete must be ?0 or ?1")
    check_token(request, uploads.config.upload_token)
    length = declared_length(request.headers, complete, 0, request.content_length, None)
    upload = Upload(secrets.token_urlsafe(24), length, {}, expires=time.time()
                    + uploads.config.upload_ttl, protocol="ietf", interop=interop,
                    method=outgoing.method, target=outgoing.target,
                    headers=delivered_headers(outgoing))
    await uploads.open_session(upload)
    location = {"Location": uploads.url(upload.id)}
    await announce(request, {**location, **upload_limit(uploads, upload, interop),
                             **interop_header(interop)})
    upload = await uploads.write_at(request, upload, 0)
    if complete or reached_length(upload):
        return await completed(request, uploads, upload)
    return QuietResponse(status=201, headers={**location, **state_headers(uploads, upload)})


def check_token(request: web.Request, token: str) -> None:
    """With --upload-token, creating an upload needs it (in its own header: Authorization
    belongs to the upstream and goes there with the delivered request)."""
    if token and not hmac.compare_digest(
            request.headers.get("Fileproxy-Upload-Token", "").encode(), token.encode()):
        raise DraftError(401, "Unauthorized: creating an upload needs Fileproxy-Upload-Token")


async def announce(request: web.Request, headers: dict[str, str]) -> None:
    """104 Upload Resumption Supported, before the content is read: a client cut off later
    knows where to resume. (HTTP/1.0 has no interim responses.)"""
    if request.version < (1, 1):
        return
    fields = [(name.encode(), value.encode()) for name, value in headers.items()]
    await send_interim(request.writer, 104, fields)


# ---------------------------------------------------------------- the upload resource

async def head(request: web.Request, upload: Upload) -> web.StreamResponse:
    uploads = uploads_of(request)
    upload = await current_state(request, upload)
    return QuietResponse(status=204, headers={
        **state_headers(uploads, upload), "Cache-Control": "no-store",
        **await delivery_headers(uploads, upload)})


async def patch(request: web.Request, upload: Upload) -> web.StreamResponse:
    uploads = uploads_of(request)
    if request.content_type != PARTIAL_UPLOAD:
        raise DraftError(415, f"Unsupported Media Type: appends are {PARTIAL_UPLOAD}")
    offset = sf_integer(request.headers.get("Upload-Offset"))
    complete = sf_boolean(request.headers.get("Upload-Complete"))
    if offset is None or complete is None:
        raise DraftError(400, "Bad Request: an append needs Upload-Offset and Upload-Complete")
    if upload.complete:
        return await answer_again(request, uploads, upload, offset, complete)
    length = declared_length(request.headers, complete, offset, request.content_length,
                             upload.length)
    upload = await uploads.write_at(request, upload, offset, length=length)
    if complete or reached_length(upload):
        return await completed(request, uploads, upload)
    return QuietResponse(status=204, headers=state_headers(uploads, upload))


async def delete(request: web.Request, upload: Upload) -> web.StreamResponse:
    await uploads_of(request).terminate(upload)
    return QuietResponse(status=204, headers=interop_header(upload.interop))


def reached_length(upload: Upload) -> bool:
    """Every byte of a known length is in: complete, whatever the request said. (tusd does
    the same; tus-js-client 4.3.1 reading a file in node never marks its last chunk
    `Upload-Complete: ?1`.)"""
    return upload.length is not None and upload.offset == upload.length


async def answer_again(request: web.Request, uploads: Uploads, upload: Upload, offset: int,
                       complete: bool) -> web.StreamResponse:
    """A request to a completed upload changes nothing. An empty completing one at its final
    offset (a client that sent its last part with ?0, or missed the answer) gets the answer
    again; anything else is refused as the draft says."""
    if request.content_length != 0:
        raise DraftError(400, "inconsistent length values for upload",
                         "inconsistent-upload-length")
    if not complete or offset != upload.offset:
        raise DraftError(400, "upload is already completed", "completed-upload")
    return await completed(request, uploads, upload)


async def completed(request: web.Request, uploads: Uploads, upload: Upload) -> web.StreamResponse:
    """The client's last part is in: the representation goes upstream as the request it
    started as, and this request gets the upstream's answer (202 while it is still on its way,
    502 if it failed without one), with Upload-Complete: ?1."""
    if upload.length is not None and upload.offset != upload.length:
        raise DraftError(400, "inconsistent length values for upload",
                         "inconsistent-upload-length")
    if not upload.complete:
        upload.length, upload.complete = upload.offset, True
        await uploads.save(upload)
    task = await uploads.finish(upload, request.remote or "-")
    outcome = await uploads.delivery_outcome(task.id)
    headers = {**state_headers(uploads, upload), **await delivery_headers(uploads, upload)}
    if outcome is not None and outcome.status in ("completed", "failed") \
            and outcome.upstream_status is not None:  # the upstream answered: its answer
        return await send_result(request, uploads.tasks, outcome, headers)
    return not_answered(outcome, headers)


def not_answered(outcome: Task | None, headers: dict[str, str]) -> web.StreamResponse:
    if outcome is not None and outcome.status == "failed":
        return QuietResponse(status=502, headers=headers, text=(
            f"502 Bad Gateway: the upload is complete, but its delivery failed "
            f"({outcome.error}); see Fileproxy-Delivery\n"))
    return QuietResponse(status=202, headers=headers, text=(
        "202 Accepted: the upload is complete and on its way upstream; its answer will be at "
        "Fileproxy-Delivery\n"))


def draft_error(uploads: Uploads, upload: Upload | None, interop: int,
                error: TusError) -> DraftError:
    """A session error (shared with tus) in the draft's terms."""
    if isinstance(error, OffsetMismatch):
        return DraftError(409, "offset from request does not match offset of resource",
                          "mismatching-upload-offset", {"Upload-Offset": str(error.expected)},
                          **{"expected-offset": error.expected,
                             "provided-offset": error.provided})
    if isinstance(error, TooLong):
        if error.beyond_length:
            return DraftError(400, "inconsistent length values for upload",
                              "inconsistent-upload-length")
        return DraftError(413, error.message, None, upload_limit(uploads, upload, interop))
    return DraftError(error.status, error.message)


def draft_errors(handler: Handler) -> Handler:
    """An upload resource's errors as the draft answers them (problem types, no tus fields)."""
    async def wrapped(request: web.Request, upload: Upload) -> web.StreamResponse:
        interop = interop_of(request.headers, upload.interop)
        try:
            return await handler(request, upload)
        except DraftError as error:
            return error.response(interop)
        except TusError as error:
            return draft_error(uploads_of(request), upload, interop, error).response(interop)

    return wrapped
