"""TLS and HTTP/2 to clients: curl over HTTPS (HTTP/1.1 and h2) and h2c, httpx, h2load, ALPN, the
HTTP/2-to-HTTP/1.1 defences with a raw h2 client, stream resets, windows, fileproxy's own
endpoints over h2; on both upstream clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pytest
from aiohttp import web

from fileproxy.app import build_runner
from fileproxy.client import sign_url
from fileproxy.config import Config
from fileproxy.server.tls import server_context
from tests.conftest import Served, free_port
from tests.origin import build_origin
from tests.pattern import pattern_sha256

MIB = 1024 * 1024
CLIENTS = [True, False]
CLIENT_IDS = ["lean", "aiohttp-client"]
# A plain GET on an h2 stream takes the fast side (frames straight out) or, with --no-fast-path,
# aiohttp's request and response objects: both are tested.
SIDES = pytest.mark.parametrize("fast_path", [True, False], ids=["h2-fast-side", "h2-aiohttp"])


def make_certificate(directory: Path, name: str = "cert") -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1 (openssl), and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


TlsFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def make_tls_proxy(certificate: tuple[str, str]) -> AsyncIterator[TlsFactory]:
    """The in-process proxy serving HTTPS (and h2 by ALPN) on a loopback port."""
    started: list[Served] = []

    async def start(*upstreams: str, **settings: Any) -> Served:
        config = Config(upstream=upstreams, certfile=certificate[0], keyfile=certificate[1],
                        **{"access_log": False, **settings})
        runner = build_runner(config)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(config))
        await site.start()
        served = Served(f"https://127.0.0.1:{runner.addresses[0][1]}", runner)
        started.append(served)
        return served

    yield start
    for served in started:
        assert served.runner is not None
        await served.runner.cleanup()


async def run(*command: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    """A client program, without blocking the loop the proxy runs on."""
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, out, err


async def curl(*args: str) -> dict[str, Any]:
    """curl's outcome: HTTP version, status, and the body's sha256 and length."""
    code, out, err = await run("curl", "-sS", "-k", "-o", "-", "-w",
                               "\n%{http_version} %{http_code}", *args)
    assert code == 0, err.decode()
    body, _, trailer = out.rpartition(b"\n")
    version, status = trailer.decode().split()
    return {"version": version, "status": int(status), "body": body,
            "sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}


@SIDES
@pytest.mark.parametrize("lean_client", CLIENTS, ids=CLIENT_IDS)
@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
async def test_curl_over_https_byte_exact_both_ways(origin, make_tls_proxy, tmp_path, http,
                                                    lean_client, fast_path):
    proxy = await make_tls_proxy(origin.url, lean_client=lean_client, fast_path=fast_path)
    size = 8 * MIB + 5
    got = await curl(http, f"{proxy.url}/bytes/{size}?seed=2")
    assert (got["version"], got["status"]) == (("1.1" if "1.1" in http else "2"), 200)
    assert (got["sha256"], got["length"]) == (pattern_sha256(size, seed=2), size)
    upload = tmp_path / "up.bin"
    upload.write_bytes(hashlib.sha256(b"x").digest() * (MIB // 8))
    sent = await curl(http, "-T", str(upload), f"{proxy.url}/echo/up")
    echoed = json.loads(sent["body"])
    assert (echoed["body_length"], echoed["body_sha256"]) == \
        (upload.stat().st_size, hashlib.sha256(upload.read_bytes()).hexdigest())


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-server"])
async def test_h2c_with_prior_knowledge_and_http11_on_one_port(origin, make_proxy, fast_path):
    """Clear text: a client that opens with the HTTP/2 preface speaks h2c, others HTTP/1.1."""
    proxy = await make_proxy(origin.url, fast_path=fast_path)
    size = 3 * MIB
    for flag, version in (("--http2-prior-knowledge", "2"), ("--http1.1", "1.1")):
        got = await curl(flag, f"{proxy.url}/bytes/{size}")
        assert (got["version"], got["sha256"]) == (version, pattern_sha256(size))


async def test_no_h2c_when_http2_is_off(origin, make_proxy):
    proxy = await make_proxy(origin.url, http2=False)
    code, _, _ = await run("curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
                           f"{proxy.url}/bytes/10")
    assert code != 0


async def negotiated(url: str, offered: list[str]) -> str | None:
    """The protocol the server picks from `offered` (ALPN)."""
    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(offered)
    _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        return writer.get_extra_info("ssl_object").selected_alpn_protocol()
    finally:
        writer.close()


async def test_alpn_offers_h2_then_http11(origin, make_tls_proxy):
    proxy = await make_tls_proxy(origin.url)
    assert await negotiated(proxy.url, ["h2", "http/1.1"]) == "h2"
    assert await negotiated(proxy.url, ["http/1.1"]) == "http/1.1"
    plain = await make_tls_proxy(origin.url, http2=False)
    assert await negotiated(plain.url, ["h2", "http/1.1"]) == "http/1.1"


async def test_tls_min_version_is_enforced(origin, make_tls_proxy):
    proxy = await make_tls_proxy(origin.url, tls_min_version="1.3")
    host, port = proxy.url.removeprefix("https://").split(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # (uvloop: a reset handshake)
        await asyncio.open_connection(host, int(port), ssl=context)
    assert await negotiated(proxy.url, ["http/1.1"]) == "http/1.1"  # (1.3 is served)


@SIDES
@pytest.mark.parametrize("lean_client", CLIENTS, ids=CLIENT_IDS)
async def test_httpx_http2_client(origin, make_tls_proxy, lean_client, fast_path):
    proxy = await make_tls_proxy(origin.url, lean_client=lean_client, fast_path=fast_path)
    size = 5 * MIB + 1
    async with httpx.AsyncClient(http2=True, verify=False) as client:
        responses = await asyncio.gather(*(client.get(f"{proxy.url}/bytes/{size}?seed={seed}")
                                           for seed in (1, 2, 3)))
        for seed, response in zip((1, 2, 3), responses, strict=True):
            assert response.http_version == "HTTP/2"
            assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(size,
                                                                                  seed=seed)
        body = bytes(range(256)) * 4096
        echoed = (await client.post(f"{proxy.url}/echo/p", content=body)).json()
        assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert echoed["method"] == "POST"
        headers = {name.lower(): value for name, value in echoed["headers"]}
        assert headers["host"] == proxy.url.removeprefix("https://")
        assert "2 fileproxy" in headers["via"]


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
async def test_h2load_small_requests_without_failure(origin, make_tls_proxy):
    proxy = await make_tls_proxy(origin.url)
    code, out, err = await run("h2load", "-n", "2000", "-c", "8", "-m", "16",
                               f"{proxy.url}/bytes/1024")
    text = out.decode()
    assert code == 0, text + err.decode()
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, "
                     r"0 failed, 0 errored", text), text
    assert "Application protocol: h2" in text


async def test_fileproxy_endpoints_over_h2(origin, make_tls_proxy):
    """Admin, async tasks (RFC 7240) and a tus upload, all over one HTTP/2 connection."""
    proxy = await make_tls_proxy(origin.url)
    async with httpx.AsyncClient(http2=True, verify=False, base_url=proxy.url) as client:
        health = await client.get("/_fileproxy/health")
        assert health.status_code == 200 and health.http_version == "HTTP/2"
        submitted = await client.post("/echo/task", content=b"t" * 1000,
                                      headers={"Prefer": "respond-async"})
        assert submitted.status_code == 202
        status_url = submitted.headers["Location"]
        for _ in range(500):
            record = (await client.get(status_url)).json()
            if record["status"] == "completed":
                break
            await asyncio.sleep(0.02)
        result = await client.get(status_url + "/result")
        assert result.status_code == 200 and result.json()["body_length"] == 1000
        data = b"u" * (3 * MIB)
        created = await client.post("/_fileproxy/uploads", headers={
            "Tus-Resumable": "1.0.0", "Upload-Length": str(len(data)),
            "Upload-Metadata": "target L2VjaG8vdHVz"})  # (target: /echo/tus)
        assert created.status_code == 201, created.text
        location = created.headers["Location"]
        patched = await client.patch(location, content=data, headers={
            "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream"})
        assert patched.status_code == 204, patched.text
        assert patched.headers["Upload-Offset"] == str(len(data))
    for _ in range(500):  # (the upload is delivered to its target once complete)
        if delivered := origin.events("body-complete"):
            break
        await asyncio.sleep(0.02)
    assert [event["received"] for event in delivered if event["path"] == "/echo/tus"] == \
        [len(data)]


@SIDES
async def test_a_client_reset_stream_cancels_the_upstream_request(origin, make_proxy, fast_path):
    """RST_STREAM from the client: the upstream request goes at once; the connection lives on."""
    proxy = await make_proxy(origin.url, fast_path=fast_path)
    client = await RawH2.open(proxy.url)
    try:
        client.h2.send_headers(1, get_fields(b"/slow-body?rate=20000&seconds=30"),
                               end_stream=True)
        await client.flush()
        await client.until(lambda events: any(isinstance(e, h2.events.DataReceived)
                                              for e in events))
        client.h2.reset_stream(1)
        await client.flush()
        for _ in range(500):
            if origin.events("peer-gone"):
                break
            await asyncio.sleep(0.01)
        assert origin.events("peer-gone"), "the upstream request went on"
        await client.ask(3, get_fields(b"/bytes/100"))
    finally:
        client.close()
    assert sum(len(e.data) for e in client.events
               if isinstance(e, h2.events.DataReceived) and e.stream_id == 3) == 100


class RawH2:
    """An HTTP/2 client on the h2 library that sends what it is told, checked or not."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []

    @classmethod
    async def open(cls, url: str) -> RawH2:
        """h2c, or h2 by ALPN for an https:// URL."""
        scheme, _, address = url.partition("://")
        host, port = address.split(":")
        context = None
        if scheme == "https":
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            context.set_alpn_protocols(["h2"])
        return cls(*await asyncio.open_connection(host, int(port), ssl=context))

    async def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())
        await self.writer.drain()

    async def ask(self, stream_id: int, fields: list[tuple[bytes, bytes]]) -> None:
        """A request without a body, and its answer (until its stream ended or was reset)."""
        self.h2.send_headers(stream_id, fields, end_stream=True)
        await self.flush()
        await self.until(ended(stream_id))

    async def until(self, done: Callable[[list[h2.events.Event]], bool]) -> None:
        while not done(self.events):
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                return
            self.events += self.h2.receive_data(data)
            await self.flush()

    def close(self) -> None:
        self.writer.close()


def get_fields(path: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"localhost"),
            (b":path", path)]


def request_fields(path: bytes = b"/echo/x", **extra: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"localhost"),
            (b":path", path), *((name.encode(), value) for name, value in extra.items())]


def ended(stream_id: int) -> Callable[[list[h2.events.Event]], bool]:
    def check(events: list[h2.events.Event]) -> bool:
        return any(isinstance(e, h2.events.ConnectionTerminated) or (
            getattr(e, "stream_id", None) == stream_id and isinstance(
                e, (h2.events.StreamReset, h2.events.StreamEnded))) for e in events)
    return check


MALFORMED = {
    "CR LF in a value": request_fields(**{"x-evil": b"a\r\nx-injected: 1"}),
    "NUL in a value": request_fields(**{"x-evil": b"a\x00b"}),
    "connection-specific field": request_fields(connection=b"keep-alive"),
    "transfer-encoding": request_fields(**{"transfer-encoding": b"chunked"}),
    "no :path": [f for f in request_fields() if f[0] != b":path"],
    "two :method": [*request_fields(), (b":method", b"GET")],
    "pseudo after regular": [(b"x-a", b"1"), *request_fields()],
    "upper-case name": request_fields(**{"X-Upper": b"1"}),
    "Host other than :authority": request_fields(host=b"elsewhere.example"),
}


@pytest.mark.parametrize("fields", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_h2_requests_never_reach_the_upstream(origin, make_proxy, fields):
    """A stream error (RST_STREAM PROTOCOL_ERROR), never forwarded; the connection serves on."""
    proxy = await make_proxy(origin.url)
    client = await RawH2.open(proxy.url)
    try:
        await client.ask(1, fields)
        assert origin.events() == []
        await client.ask(3, get_fields(b"/bytes/10"))
    finally:
        client.close()
    resets = [e.error_code for e in client.events
              if isinstance(e, h2.events.StreamReset) and e.stream_id == 1]
    assert resets == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    assert not any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == 1
                   for e in client.events)
    assert len(origin.events("bytes-sent")) == 1  # (stream 3, on the same connection)


async def test_content_length_must_match_the_data(origin, make_proxy):
    proxy = await make_proxy(origin.url)
    client = await RawH2.open(proxy.url)
    try:
        client.h2.send_headers(1, request_fields(**{"content-length": b"10"}))
        client.h2.send_data(1, b"0123456789ABCDEF", end_stream=True)
        await client.flush()
        await client.until(ended(1))
    finally:
        client.close()
    assert not any(isinstance(e, h2.events.StreamEnded) for e in client.events)
    assert not origin.events("body-complete")


async def test_windows_are_sized_for_long_fat_links(origin, make_proxy):
    """SETTINGS announce the stream window and the connection window is raised to match."""
    proxy = await make_proxy(origin.url, h2_window=32 * MIB, h2_max_streams=7)
    client = await RawH2.open(proxy.url)
    try:
        await client.flush()
        await client.until(lambda events: any(
            isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0 for e in events))
    finally:
        client.close()
    settings = next(e for e in client.events if isinstance(e, h2.events.RemoteSettingsChanged))
    changed = {code: value.new_value for code, value in settings.changed_settings.items()}
    assert changed[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 32 * MIB
    assert changed[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    update = next(e for e in client.events if isinstance(e, h2.events.WindowUpdated))
    assert update.delta == 32 * MIB - 65535


@SIDES
async def test_a_truncated_upstream_body_resets_the_stream(origin, make_proxy, fast_path):
    """An upstream that drops mid-body: the client sees RST_STREAM, never a clean end."""
    proxy = await make_proxy(origin.url, upstream_resume_attempts=0, fast_path=fast_path)
    async with httpx.AsyncClient(http2=True, http1=False) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"{proxy.url}/truncate?size=1000000&send=300000")


@pytest.fixture
async def tls_origin(certificate: tuple[str, str]) -> AsyncIterator[Served]:
    """The test origin over HTTPS."""
    runner = web.AppRunner(build_origin(), access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield Served(f"https://127.0.0.1:{runner.addresses[0][1]}", runner)
    await runner.cleanup()


async def test_https_upstreams_are_verified_against_the_ca_given(tls_origin, make_proxy, client,
                                                                 certificate):
    """An https:// upstream goes through aiohttp's client, verified: with --upstream-ca that
    signed its certificate the body arrives byte-exact; without it, a 502 and no body."""
    trusted = await make_proxy(tls_origin.url, upstream_ca=certificate[0])
    size = 6 * MIB + 3
    async with client.get(f"{trusted.url}/bytes/{size}?seed=5") as response:
        assert response.status == 200
        assert hashlib.sha256(await response.read()).hexdigest() == pattern_sha256(size, seed=5)
    untrusted = await make_proxy(tls_origin.url)
    async with client.get(f"{untrusted.url}/bytes/10") as response:
        assert response.status == 502
        assert "certificate" in (await response.text()).lower()


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "h2"])
async def test_an_idle_h2_connection_does_not_hold_shutdown_up(origin, make_proxy,
                                                               make_tls_proxy, tls):
    """A stopping worker sends GOAWAY and closes an HTTP/2 connection with no stream open at
    once (the graceful timeout is for transfers, not for idle clients), even when the client
    does not answer TLS's close (it keeps the connection and reads nothing)."""
    proxy = await (make_tls_proxy if tls else make_proxy)(origin.url, graceful_timeout=30)
    client = await RawH2.open(proxy.url)
    try:
        await client.ask(1, get_fields(b"/bytes/10"))
        client.writer.transport.pause_reading()  # (TLS's close is never answered)
        started = asyncio.get_running_loop().time()
        assert proxy.runner is not None
        await asyncio.wait_for(proxy.runner.cleanup(), 60)
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        client.close()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-server"])
async def test_an_idle_https_keep_alive_connection_does_not_hold_shutdown_up(
        origin, make_tls_proxy, fast_path):
    proxy = await make_tls_proxy(origin.url, graceful_timeout=30, fast_path=fast_path)
    host, port = proxy.url.removeprefix("https://").split(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        writer.write(b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(await reader.readexactly(10)) == 10
        writer.transport.pause_reading()  # (TLS's close is never answered)
        started = asyncio.get_running_loop().time()
        assert proxy.runner is not None
        await asyncio.wait_for(proxy.runner.cleanup(), 60)
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        writer.close()


async def test_a_client_that_asks_without_reading_is_not_read_either(origin, make_proxy):
    """Requests keep coming but the client reads no answer: once the output buffer is full the
    server stops reading the connection, so what it holds for the client stays bounded."""
    proxy = await make_proxy(origin.url)
    client = await RawH2.open(proxy.url)
    try:
        client.writer.transport.pause_reading()  # (never reads: the answers pile up)
        client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        client.h2.increment_flow_control_window(2**31 - 1 - 65535)  # (flow control allows it)
        await client.flush()
        sent = 0
        for stream_id in range(1, 4001, 2):
            client.h2.send_headers(stream_id, get_fields(b"/bytes/65536"), end_stream=True)
            client.writer.write(client.h2.data_to_send())
            sent += 1
            if client.writer.transport.get_write_buffer_size() > 4 << 20:
                break  # (the server stopped reading us: our own buffer fills)
            await asyncio.sleep(0)
            if sent % 50 == 0:
                await asyncio.sleep(0.01)
        answered = len(origin.events("bytes-sent"))
        assert sent > 200 and answered < 400, \
            f"{answered} of {sent} requests answered for a client that reads nothing"
    finally:
        client.close()


async def test_ietf_resumable_upload_over_h2(origin, make_tls_proxy):
    """The IETF draft's creation (with its 104 interim response as an HTTP/2 HEADERS frame),
    an append and the completion, over one HTTP/2 connection: the upstream gets the upload as
    the request it started as."""
    proxy = await make_tls_proxy(origin.url)
    body = bytes(range(256)) * (8 * 1024)  # 2 MiB
    version = {"Upload-Draft-Interop-Version": "6"}
    async with httpx.AsyncClient(http2=True, verify=False, base_url=proxy.url) as client:
        created = await client.post("/echo/ietf?x=1", content=body[:MIB], headers={
            **version, "Upload-Complete": "?0", "Upload-Length": str(len(body))})
        assert created.http_version == "HTTP/2"
        assert created.status_code == 201, created.text
        assert created.headers["Upload-Offset"] == str(MIB)
        location = created.headers["Location"]
        done = await client.patch(location, content=body[MIB:], headers={
            **version, "Upload-Offset": str(MIB), "Upload-Complete": "?1",
            "Content-Type": "application/partial-upload"})
        assert done.status_code == 200, done.text
        echoed = done.json()
    assert echoed["raw_path"] == "/echo/ietf?x=1" and echoed["method"] == "POST"
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_interim_responses_go_as_headers_frames(origin, make_proxy):
    """104 (the IETF draft) and 100 Continue reach an HTTP/2 client as informational HEADERS
    before the final response, never as bytes inside DATA."""
    proxy = await make_proxy(origin.url)
    client = await RawH2.open(proxy.url)
    try:
        client.h2.send_headers(1, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"localhost"),
            (b":path", b"/echo/interim"), (b"upload-draft-interop-version", b"6"),
            (b"upload-complete", b"?1"), (b"content-length", b"5")])
        client.h2.send_data(1, b"hello", end_stream=True)
        await client.flush()
        await client.until(ended(1))
    finally:
        client.close()
    informational = [dict(e.headers)[b":status"] for e in client.events
                     if isinstance(e, h2.events.InformationalResponseReceived)]
    final = [dict(e.headers)[b":status"] for e in client.events
             if isinstance(e, h2.events.ResponseReceived)]
    body = b"".join(e.data for e in client.events if isinstance(e, h2.events.DataReceived))
    assert informational == [b"104"] and final == [b"200"]
    assert json.loads(body)["body_length"] == 5


def handshake(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
              ) -> tuple[ssl.SSLSession | None, bool]:
    """One HTTPS request (its answer read, which takes in TLS 1.3's session ticket): the
    session, and whether it was a resumed one."""
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, session=session) as tls:
        tls.sendall(b"GET /_fileproxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):
            pass
        return tls.session, tls.session_reused


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_tls_sessions_are_resumed(origin, make_tls_proxy, version):
    """A client back over a long round trip skips the full handshake (tickets)."""
    proxy = await make_tls_proxy(origin.url)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else \
        ssl.TLSVersion.TLSv1_3
    port = int(proxy.url.rsplit(":", 1)[1])
    session, reused = await asyncio.to_thread(handshake, port, context)
    assert session is not None and not reused
    _, reused = await asyncio.to_thread(handshake, port, context, session)
    assert reused


@SIDES
async def test_signed_links_over_h2(origin, make_tls_proxy, fast_path):
    """The signature check is the request path's: an HTTP/2 request is held to it as well."""
    secret = "s" * 32
    proxy = await make_tls_proxy(origin.url, signing_key=(f"k1={secret}",),
                                 require_signature=("/bytes/",), fast_path=fast_path)
    async with httpx.AsyncClient(http2=True, verify=False) as client:
        refused = await client.get(f"{proxy.url}/bytes/100")
        signed = await client.get(sign_url(f"{proxy.url}/bytes/100", "k1", secret, 60))
    assert (refused.http_version, refused.status_code) == ("HTTP/2", 403)
    assert (signed.status_code, len(signed.content)) == (200, 100)
    assert len(origin.events("bytes-sent")) == 1


@SIDES
async def test_a_client_leaving_an_h2_connection_cancels_its_upstream_requests(
        origin, make_proxy, fast_path):
    """The connection closes mid-download (no RST_STREAM first): every stream's upstream
    request goes at once."""
    proxy = await make_proxy(origin.url, fast_path=fast_path)
    client = await RawH2.open(proxy.url)
    for stream_id in (1, 3):
        client.h2.send_headers(stream_id, get_fields(b"/slow-body?rate=20000&seconds=30"), end_stream=True)
    await client.flush()
    await client.until(lambda events: len({e.stream_id for e in events
                                           if isinstance(e, h2.events.DataReceived)}) == 2)
    client.close()
    for _ in range(500):
        if len(origin.events("peer-gone")) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(origin.events("peer-gone")) == 2, "an upstream request went on"


@SIDES
async def test_early_hints_reach_an_h2_client_as_informational_headers(origin, make_proxy,
                                                                      fast_path):
    """An upstream's 103 (the lean client passes interim responses on) goes out as a HEADERS
    frame before the final response."""
    proxy = await make_proxy(origin.url, lean_client=True, fast_path=fast_path)
    client = await RawH2.open(proxy.url)
    try:
        await client.ask(1, get_fields(b"/early-hints"))
    finally:
        client.close()
    hints = [dict(e.headers) for e in client.events
             if isinstance(e, h2.events.InformationalResponseReceived)]
    final = [dict(e.headers)[b":status"] for e in client.events
             if isinstance(e, h2.events.ResponseReceived)]
    assert [(h[b":status"], h[b"link"]) for h in hints] == [(b"103", b"</a.css>; rel=preload")]
    assert final == [b"200"]


@SIDES
async def test_statuses_without_a_body_head_and_errors_over_h2(origin, make_proxy, fast_path):
    """204 and 304 end with their HEADERS, HEAD keeps the length and sends no body, and
    fileproxy's own error (an upstream that refuses connections) arrives whole."""
    proxy = await make_proxy(origin.url, fast_path=fast_path)
    async with httpx.AsyncClient(http2=True, http1=False) as client:
        for code in (204, 304):
            response = await client.get(f"{proxy.url}/status/{code}")
            assert (response.status_code, response.content) == (code, b"")
        head = await client.head(f"{proxy.url}/bytes/1000")
        assert (head.status_code, head.headers["content-length"], head.content) == \
            (200, "1000", b"")
        down = await make_proxy(f"http://127.0.0.1:{free_port()}", fast_path=fast_path)
        refused = await client.get(f"{down.url}/bytes/10")
    assert refused.status_code == 502 and refused.http_version == "HTTP/2"
    assert refused.text.startswith("502 ") and "request id:" in refused.text


@SIDES
async def test_h2_answers_carry_one_date_and_are_logged_with_their_bytes(origin, make_proxy,
                                                                        fast_path, caplog):
    """The upstream's Date is passed on, never doubled; the access log counts the body."""
    proxy = await make_proxy(origin.url, fast_path=fast_path, access_log=True)
    with caplog.at_level(logging.INFO, logger="fileproxy.access"):
        async with httpx.AsyncClient(http2=True, http1=False) as client:
            response = await client.get(f"{proxy.url}/bytes/1000")
    assert response.status_code == 200 and len(response.headers.get_list("date")) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "fileproxy.access"]
    assert any('"GET /bytes/1000 HTTP/2.0" 200' in line and "out=1000" in line
               for line in lines), lines
