"""The upload endpoints under the admin prefix: tus creation on the collection (with and without the
trailing slash), and each upload's own URL answering in the protocol it was created with (tus 1.0,
or the IETF draft for one created on a proxied path)."""

from __future__ import annotations

from aiohttp import web

from fileproxy.features import resumable, uploads
from fileproxy.features.uploads import tus_errors, uploads_of

TUS = {"HEAD": uploads.head, "PATCH": uploads.patch, "DELETE": uploads.delete}
DRAFT = {method: resumable.draft_errors(handler) for method, handler in
         (("HEAD", resumable.head), ("PATCH", resumable.patch), ("DELETE", resumable.delete))}


async def upload_resource(request: web.Request) -> web.StreamResponse:
    upload = await uploads_of(request).load(request.match_info["upload_id"])
    handlers = DRAFT if upload.protocol == "ietf" else TUS
    return await handlers[request.method](request, upload)


def add_upload_routes(app: web.Application, prefix: str) -> None:
    base = f"{prefix}/uploads"
    routes = app.router
    for collection in (base, base + "/"):  # (clients are set up with and without the slash)
        routes.add_route("OPTIONS", collection, tus_errors(uploads.options))
        routes.add_post(collection, tus_errors(uploads.create))
    routes.add_route("OPTIONS", base + "/{upload_id}", tus_errors(uploads.options))
    for method in TUS:
        routes.add_route(method, base + "/{upload_id}", tus_errors(upload_resource))
