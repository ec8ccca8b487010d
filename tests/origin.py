"""Test origin: deterministic large bodies with Range, echo with body hash, slow/cut/status endpoints.

Run alone with `python -m tests.origin --port 9000` (the benchmarks use it that way too).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import socket
import struct
import time

from aiohttp import web

from tests.pattern import pattern

ORIGIN_SERVER = "test-origin/1.0"
EVENTS = web.AppKey("events", list)
PEERS = web.AppKey("peers", set)


def record(request: web.Request, event: str, **details: object) -> None:
    request.app[EVENTS].append({"event": event, "path": request.path, "method": request.method,
                                "time": time.monotonic(),
                                **details})


@web.middleware
async def note_peer(request: web.Request, handler):
    """Remember every client connection (address, port) that sent a request."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer and request.path != "/_origin/events":
        request.app[PEERS].add(tuple(peer[:2]))
    return await handler(request)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single 'bytes=a-b' / 'bytes=a-' / 'bytes=-n' range -> (start, end exclusive)."""
    if not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].partition("-")
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    else:
        start, end = max(size - int(last), 0), size
    return (start, end) if start < end else (size, size)


async def bytes_handler(request: web.Request) -> web.StreamResponse:
    """GET/HEAD /bytes/{size}?seed=&chunked=1&norange=1&rate=: the deterministic body (rate:
    bytes a second per response)."""
    size = int(request.match_info["size"])
    seed = int(request.query.get("seed", "1"))
    etag = f'"{size}-{seed}"'
    response = web.StreamResponse(headers={"ETag": etag, "Server": ORIGIN_SERVER,
                                           "Content-Type": "application/octet-stream"})
    start, end = 0, size
    ranges_ok = "norange" not in request.query
    if ranges_ok:
        response.headers["Accept-Ranges"] = "bytes"
    wanted = request.headers.get("Range")
    if ranges_ok and wanted and request.headers.get("If-Range", etag) == etag:
        span = parse_range(wanted, size)
        if span is None or span[0] >= size:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
        start, end = span
        response.set_status(206)
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.query.get("chunked") == "1":
        response.enable_chunked_encoding()
    else:
        response.content_length = end - start
    await response.prepare(request)
    if request.method != "HEAD":
        record(request, "bytes-begun", range=wanted)
        try:
            await send_at_rate(response, pattern(start, end - start, seed),
                               float(request.query.get("rate", "0")))
        except (Exception, asyncio.CancelledError):
            record(request, "bytes-abandoned", range=wanted)  # (the peer went away)
            raise
    await response.write_eof()
    record(request, "bytes-sent", size=end - start, range=request.headers.get("Range"))
    return response


async def send_at_rate(response: web.StreamResponse, pieces, rate: float) -> None:
    """Write the pieces, at most `rate` bytes a second on this response (0: no limit), as a
    sender on a long lossy link is held to a fraction of it per connection."""
    started, sent = time.monotonic(), 0
    for piece in pieces:
        await response.write(piece)
        sent += len(piece)
        if rate:
            await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))


CUTS = web.AppKey("cuts", dict)


async def flaky_bytes_handler(request: web.Request) -> web.StreamResponse:
    """/flaky/{size}?cuts=N&key=K: like /bytes (Range, If-Range, ETag), but the first N responses
    for K break off after `at` (a fraction, default 1/3) of the span they send. `how`: fin (close,
    the default), reset (RST) or stall (stop sending, keep the connection). `seed`: the object
    served once the cuts are spent (another seed: the object changed). `weak=1`: a weak ETag,
    `norange=1`: no Accept-Ranges (then Range is ignored)."""
    key = request.query.get("key", "default")
    record(request, "flaky", range=request.headers.get("Range"),
           if_range=request.headers.get("If-Range"))
    cuts = request.app[CUTS]
    if cuts.get(key, 0) >= int(request.query.get("cuts", "2")):
        return await bytes_handler(request)
    cuts[key] = cuts.get(key, 0) + 1
    size = int(request.match_info["size"])
    response, start, end = flaky_head(request, size)
    await response.prepare(request)
    sent, stop = 0, int((end - start) * float(request.query.get("at", "0.3333")))
    for piece in pattern(start, end - start):
        if sent + len(piece) > stop:
            await response.write(piece[:stop - sent])
            break
        await response.write(piece)
        sent += len(piece)
    await asyncio.sleep(0.05)
    await break_off(request, request.query.get("how", "fin"))
    return response


def flaky_head(request: web.Request, size: int) -> tuple[web.StreamResponse, int, int]:
    """The head of a flaky response (seed 1's object) and the span it sends."""
    weak = request.query.get("weak") == "1"
    response = web.StreamResponse(headers={"ETag": f'{"W/" if weak else ""}"{size}-1"'})
    start, end = 0, size
    if request.query.get("norange") != "1":
        response.headers["Accept-Ranges"] = "bytes"
        wanted = request.headers.get("Range")
        if wanted and (span := parse_range(wanted, size)) and span[0] < size:
            start, end = span
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    response.content_length = end - start
    return response, start, end


async def break_off(request: web.Request, how: str) -> None:
    """End a response mid-body: FIN, RST, or a stall that outlasts any test's read timeout."""
    transport = request.transport
    assert transport is not None
    if how == "stall":
        await asyncio.sleep(30)
    elif how == "reset":
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()


async def echo_handler(request: web.Request) -> web.Response:
    """Any method: what arrived (raw target, headers in order, body hash and length)."""
    digest, length = hashlib.sha256(), 0
    try:
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
    except (Exception, asyncio.CancelledError) as error:
        record(request, "body-incomplete", received=length, error=repr(error))
        raise
    record(request, "body-complete", received=length, sha256=digest.hexdigest())
    body = {
        "method": request.method, "raw_path": request.raw_path,
        "headers": [[name, value] for name, value in request.headers.items()],
        "body_sha256": digest.hexdigest(), "body_length": length,
        "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
    }
    return web.json_response(body, headers={"Server": ORIGIN_SERVER})


async def status_handler(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    headers = {"Server": ORIGIN_SERVER}
    if 300 <= code < 400:
        headers["Location"] = request.query.get("location", "/elsewhere?a=%2F")
    if code in (204, 304):
        return web.Response(status=code, headers=headers)
    return web.Response(status=code, text=f"origin says {code}\n", headers=headers)


async def slow_headers_handler(request: web.Request) -> web.Response:
    delay = float(request.query.get("delay", "5"))
    try:
        await asyncio.sleep(delay)
    except asyncio.CancelledError:
        record(request, "cancelled")
        raise
    return web.Response(text="late\n")


async def slow_body_handler(request: web.Request) -> web.StreamResponse:
    """Streams `rate` bytes/s for `seconds`; records whether the peer went away."""
    rate = int(request.query.get("rate", "10000"))
    seconds = float(request.query.get("seconds", "30"))
    response = web.StreamResponse()
    response.content_length = int(rate * seconds)
    await response.prepare(request)
    tick = 0.1
    piece = b"s" * int(rate * tick)
    try:
        for _ in range(int(seconds / tick)):
            await response.write(piece)
            await asyncio.sleep(tick)
    except (asyncio.CancelledError, ConnectionError):
        record(request, "peer-gone")
        raise
    await response.write_eof()
    return response


async def truncate_handler(request: web.Request) -> web.StreamResponse:
    """Announces `size` bytes (or chunked), sends `send` of them, then drops the connection."""
    size, send = int(request.query["size"]), int(request.query["send"])
    response = web.StreamResponse()
    if request.query.get("chunked") == "1":
        response.enable_chunked_encoding()
    else:
        response.content_length = size
    await response.prepare(request)
    for piece in pattern(0, send):
        await response.write(piece)
    await asyncio.sleep(0.05)
    request.transport.close()
    return response


async def stall_handler(request: web.Request) -> web.StreamResponse:
    """Announces 2 * `send` bytes, sends `send`, goes silent for `pause` s, then sends the rest."""
    send, pause = int(request.query["send"]), float(request.query["pause"])
    response = web.StreamResponse()
    response.content_length = 2 * send
    await response.prepare(request)
    await response.write(b"a" * send)
    await asyncio.sleep(pause)
    await response.write(b"b" * send)
    await response.write_eof()
    return response


async def many_headers_handler(request: web.Request) -> web.Response:
    count = int(request.query.get("count", "130"))
    response = web.Response(text="many\n")
    for index in range(count):
        response.headers.add(f"X-Header-{index}", f"value-{index}-" + "v" * 40)
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    return response


async def gzip_handler(request: web.Request) -> web.Response:
    body = gzip.compress(b"compressible " * 1000)
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain", "ETag": '"gz1"'}
    return web.Response(body=body, headers=headers)


async def early_hints_handler(request: web.Request) -> web.Response:
    await request.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    request.writer.output_size = 0
    return web.Response(text="after hints\n")


async def expect_reject_handler(request: web.Request) -> web.Response:
    return web.Response(status=413, text="too large for me\n")


async def reject_expect(request: web.Request) -> web.Response | None:
    """Expect handler answering 413 before the body is sent (like a quota check)."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        return web.Response(status=413, text="too large for me\n")
    return None


async def events_handler(request: web.Request) -> web.Response:
    return web.json_response({"events": request.app[EVENTS],
                              "connections": len(request.app[PEERS])})


def build_origin() -> web.Application:
    app = web.Application(client_max_size=1 << 40, middlewares=[note_peer])
    app[EVENTS] = []
    app[PEERS] = set()
    app[CUTS] = {}
    app.router.add_get("/bytes/{size}", bytes_handler)
    app.router.add_get("/flaky/{size}", flaky_bytes_handler)
    app.router.add_route("*", "/echo{tail:.*}", echo_handler)
    app.router.add_route("*", "/status/{code}", status_handler)
    app.router.add_route("*", "/slow-headers", slow_headers_handler)
    app.router.add_get("/slow-body", slow_body_handler)
    app.router.add_get("/truncate", truncate_handler)
    app.router.add_get("/stall", stall_handler)
    app.router.add_get("/many-headers", many_headers_handler)
    app.router.add_get("/gzip", gzip_handler)
    app.router.add_get("/early-hints", early_hints_handler)
    app.router.add_route("PUT", "/expect-reject", expect_reject_handler,
                         expect_handler=reject_expect)
    app.router.add_get("/_origin/events", events_handler)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    web.run_app(build_origin(), host=args.host, port=args.port, access_log=None, handler_cancellation=True,
                print=lambda *_: None)


if __name__ == "__main__":
    main()
