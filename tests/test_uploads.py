"""Resumable uploads (tus 1.0) through fileproxy: protocol details, drops mid-PATCH, delivery."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time

import aiohttp
import pytest

from tests.pattern import pattern
from tests.rawserver import RawServer

TUS = {"Tus-Resumable": "1.0.0"}
MIB = 1024 * 1024


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def create(client, proxy, length: int, **meta: str) -> str:
    headers = {**TUS, "Upload-Length": str(length),
               "Upload-Metadata": metadata(target="/echo/uploaded", **meta)}
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers=headers) as response:
        assert response.status == 201, await response.text()
        assert response.headers["Tus-Resumable"] == "1.0.0" and "Upload-Expires" in response.headers
        return proxy.url + response.headers["Location"]


async def offset_of(client, url: str) -> int:
    async with client.head(url, headers=TUS) as response:
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        return int(response.headers["Upload-Offset"])


async def patch(client, url: str, offset: int, data: bytes, **headers: str):
    return await client.patch(url, data=data, headers={
        **TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
        **headers})


async def raw_patch(proxy, url: str, offset: int, length: int, data: bytes
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A PATCH over a raw socket announcing `length` body bytes and sending `data` of them, so
    that a test can stall it or drop it mid-body."""
    path = url.split("//", 1)[1].split("/", 1)[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"PATCH /{path} HTTP/1.1\r\nHost: t\r\nTus-Resumable: 1.0.0\r\n"
                 f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + data)
    await writer.drain()
    return reader, writer


async def test_discovery(proxy, client):
    async with client.options(f"{proxy.url}/_fileproxy/uploads") as response:
        assert response.status == 204
        assert response.headers["Tus-Version"] == "1.0.0"
        assert set(response.headers["Tus-Extension"].split(",")) >= {
            "creation", "creation-with-upload", "termination", "checksum", "expiration"}
        assert {"sha1", "sha256"} <= set(response.headers["Tus-Checksum-Algorithm"].split(","))
        assert int(response.headers["Tus-Max-Size"]) > 0


async def test_upload_cut_mid_patch_resumes_and_arrives_once_byte_exact(origin, proxy, client):
    size = 24 * MIB + 5
    body = b"".join(pattern(0, size, seed=11))
    url = await create(client, proxy, size, filetype="application/x-test", filename="f.bin")
    for cut in range(3):  # send part of a PATCH, then drop the connection
        offset = await offset_of(client, url)
        _reader, writer = await raw_patch(proxy, url, offset, size - offset,
                                          body[offset:offset + 5 * MIB + cut * 1000])
        await asyncio.sleep(0.2)
        writer.transport.abort()
        await asyncio.sleep(0.2)
        assert await offset_of(client, url) > offset, "what arrived before the drop was kept"
    offset = await offset_of(client, url)
    async with await patch(client, url, offset, body[offset:]) as response:
        assert response.status == 204 and int(response.headers["Upload-Offset"]) == size
        delivery = response.headers["Fileproxy-Delivery"]
        assert response.headers["Fileproxy-Upstream-Status"] == "200"
    async with client.get(proxy.url + delivery + "/result") as response:
        echoed = await response.json()
    assert echoed["method"] == "PUT" and echoed["raw_path"] == "/echo/uploaded"
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ["Content-Type", "application/x-test"] in echoed["headers"]
    assert len(origin.events("body-complete")) == 1, "delivered once"


async def test_protocol_errors(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, upload_max_size=10 * MIB)
    url = await create(client, proxy, 100)
    async with await patch(client, url, 5, b"x") as response:
        assert response.status == 409
    async with client.patch(url, data=b"x", headers={**TUS, "Upload-Offset": "0",
                                                       "Content-Type": "text/plain"}) as response:
        assert response.status == 415
    async with client.patch(url, data=b"x", headers={
            "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}) as response:
        assert response.status == 412
    wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    async with await patch(client, url, 0, b"abc", **{"Upload-Checksum": f"sha1 {wrong}"}) as r:
        assert r.status == 460
    assert await offset_of(client, url) == 0, "a mismatched chunk is discarded"
    right = base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
    async with await patch(client, url, 0, b"abc", **{"Upload-Checksum": f"sha256 {right}"}) as r:
        assert r.status == 204 and r.headers["Upload-Offset"] == "3"
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers={
            **TUS, "Upload-Length": str(11 * MIB),
            "Upload-Metadata": metadata(target="/x")}) as response:
        assert response.status == 413
    async with client.delete(url, headers=TUS) as response:
        assert response.status == 204
    async with client.head(url, headers=TUS) as response:
        assert response.status == 404


@pytest.mark.parametrize("target", ["/../../etc/x", "/%2e%2e/%2E%2e/x", "/a/../../x",
                                    "relative/x", "http://elsewhere/x"])
async def test_an_upload_target_outside_the_target_policy_is_refused(origin, proxy, client,
                                                                      target):
    """The same target policy as every proxied request: no dot-segments above the root,
    origin-form only; refused at creation, before any byte is taken."""
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers={
            **TUS, "Upload-Length": "3", "Upload-Metadata": metadata(target=target)}) as response:
        assert response.status == 400, await response.text()
        assert "target" in await response.text()
    assert origin.connections() == 0


async def test_quota_and_expiry(origin, make_proxy, client, tmp_path):
    proxy = await make_proxy(origin.url, upload_spool_quota=MIB, upload_ttl=0.3,
                             spool_dir=str(tmp_path))
    url = await create(client, proxy, MIB // 2)
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers={
            **TUS, "Upload-Length": str(MIB), "Upload-Metadata": metadata(target="/x")}) as r:
        assert r.status == 507
    await asyncio.sleep(0.4)
    async with client.head(url, headers=TUS) as response:
        assert response.status == 410


def test_tuspy_uploads_end_to_end(tmp_path):
    """The tuspy client (what tus users run) against fileproxy in its own process."""
    import subprocess
    import sys

    from tusclient import client as tus

    from tests.conftest import free_port, start_process, stop

    origin_port, proxy_port = free_port(), free_port()
    origin_url = f"http://127.0.0.1:{origin_port}"
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    origin = start_process([sys.executable, "-m", "tests.origin", "--port", str(origin_port)],
                           f"{origin_url}/_origin/events")
    proxy = start_process([sys.executable, "-m", "fileproxy", "dev", "--upstream", origin_url,
                           "--bind", f"127.0.0.1:{proxy_port}", "--no-access-log",
                           "--spool-dir", str(tmp_path)], f"{proxy_url}/_fileproxy/health",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        source = tmp_path / "source.bin"
        source.write_bytes(b"".join(pattern(0, 3 * MIB + 7, seed=4)))
        uploader = tus.TusClient(f"{proxy_url}/_fileproxy/uploads").uploader(
            str(source), chunk_size=MIB, metadata={"target": "/echo/tuspy", "filename": "s"})
        uploader.upload()
        assert uploader.offset == source.stat().st_size
    finally:
        stop(proxy)
        stop(origin)


async def finish_from_head(client, url: str, body: bytes) -> dict:
    """As a tus client does after a conflict: HEAD for the offset, PATCH the rest (again after
    a 409 or 423 while another PATCH still settles); the final response's headers."""
    for _ in range(50):
        offset = await offset_of(client, url)
        async with await patch(client, url, offset, body[offset:]) as response:
            if response.status == 204:
                return dict(response.headers)
            assert response.status in (409, 423), await response.text()
        await asyncio.sleep(0.1)
    raise AssertionError("the upload could not be finished")


async def test_concurrent_patches_do_not_interleave(origin, proxy, client):
    """Two PATCHes of the same file at once (a client that reconnected while its old request is
    still on the server): the newer takes the upload over, the older lets go keeping what it
    wrote, and the upload ends byte-exact, delivered once."""
    size = 2 * MIB
    body = b"".join(pattern(0, size, seed=21))
    url = await create(client, proxy, size)

    async def slow_body():
        for start in range(0, MIB, 128 * 1024):
            yield body[start:start + 128 * 1024]
            await asyncio.sleep(0.05)

    first = asyncio.create_task(client.patch(url, data=slow_body(), headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
        "Content-Length": str(MIB)}))
    await asyncio.sleep(0.1)
    headers = await finish_from_head(client, url, body)
    assert int(headers["Upload-Offset"]) == size
    with contextlib.suppress(aiohttp.ClientError):
        (await first).release()
    delivery = headers["Fileproxy-Delivery"]
    async with client.get(proxy.url + delivery + "/result") as response:
        assert (await response.json())["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert len(origin.events("body-complete")) == 1


async def test_sweep_metrics_and_token(origin, make_proxy, client, tmp_path):
    proxy = await make_proxy(origin.url, upload_ttl=0.3, upload_sweep_interval=0.2,
                             spool_dir=str(tmp_path), upload_token="up-token")
    headers = {**TUS, "Upload-Length": "10", "Upload-Metadata": metadata(target="/echo/t")}
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers=headers) as response:
        assert response.status == 401
    headers["Authorization"] = "Bearer up-token"
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers=headers) as response:
        url = proxy.url + response.headers["Location"]
    assert list(tmp_path.glob("uploads/*.part"))
    await asyncio.sleep(0.8)  # expired and swept: the spool space is back
    assert not list(tmp_path.glob("uploads/*.part"))
    async with client.get(f"{proxy.url}/_fileproxy/stats") as response:
        uploads = (await response.json())["uploads"]
    assert uploads["created"] == 1
    async with client.head(url, headers=TUS) as response:
        assert response.status == 404


async def test_resumed_counter(origin, proxy, client):
    url = await create(client, proxy, 4 * MIB)
    reader, writer = await raw_patch(proxy, url, 0, 4 * MIB, b"r" * MIB)
    await asyncio.sleep(0.2)
    writer.transport.abort()
    await asyncio.sleep(0.2)
    offset = await offset_of(client, url)
    async with await patch(client, url, offset, b"r" * (4 * MIB - offset)) as response:
        assert response.status == 204
    async with client.get(f"{proxy.url}/_fileproxy/stats") as response:
        uploads = (await response.json())["uploads"]
    assert uploads == {**uploads, "created": 1, "resumed": 1, "completed": 1}
    del reader


async def test_curl_resumes_a_download_through_the_proxy(proxy, tmp_path):
    """`curl -C -` continues a partial file with a Range request; fileproxy passes it on."""
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from tests.pattern import pattern_sha256

    size = 3 * MIB
    dest = tmp_path / "partial.bin"
    dest.write_bytes(b"".join(pattern(0, MIB)))
    process = await asyncio.create_subprocess_exec(
        "curl", "-s", "-C", "-", "-o", str(dest), f"{proxy.url}/bytes/{size}")
    assert await process.wait() == 0
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == pattern_sha256(size)


async def test_a_newer_patch_takes_the_upload_over_from_a_silent_one(origin, make_proxy,
                                                                     client):
    """tusd's lock handover: a PATCH whose client went silent holds the upload (its heartbeat
    keeps the lock); a newer PATCH asks it to let go instead of answering 423 or waiting for the
    lock to expire. The silent one keeps what arrived and its connection closes; the newer one
    finishes the upload from HEAD, well within the lock's time to live."""
    proxy = await make_proxy(origin.url, upload_lock_ttl=5)
    size = 4 * MIB
    body = b"".join(pattern(0, size, seed=5))
    url = await create(client, proxy, size)
    reader, writer = await raw_patch(proxy, url, 0, size, body[:3 * MIB])
    await asyncio.sleep(0.3)  # the bytes are in; the client goes silent
    started = time.monotonic()
    headers = await finish_from_head(client, url, body)
    assert int(headers["Upload-Offset"]) == size
    assert time.monotonic() - started < 3, "taken over, not waited out"
    assert await asyncio.wait_for(reader.read(), 5) == b"", "the silent PATCH was ended"
    writer.close()
    assert await offset_of(client, url) == size
    assert len(origin.events("body-complete")) == 1


async def test_a_stalled_patch_is_cut_off_and_frees_the_upload(origin, make_proxy, client):
    """--client-timeout ends a PATCH whose client went silent: what arrived is kept, and the
    client resumes at once instead of waiting for the lock to expire."""
    proxy = await make_proxy(origin.url, client_timeout=0.5, upload_lock_ttl=60)
    size = 2 * MIB
    body = b"".join(pattern(0, size, seed=8))
    url = await create(client, proxy, size)
    reader, writer = await raw_patch(proxy, url, 0, size, body[:MIB])
    assert await asyncio.wait_for(reader.read(), 10) == b"", "cut off after the client timeout"
    writer.close()
    offset = await offset_of(client, url)
    assert offset == MIB, "what arrived before the stall was kept"
    async with await patch(client, url, offset, body[offset:]) as response:
        assert response.status == 204
    assert len(origin.events("body-complete")) == 1


async def test_the_collection_answers_with_and_without_a_trailing_slash(origin, proxy, client):
    for base in ("/_fileproxy/uploads", "/_fileproxy/uploads/"):
        async with client.options(proxy.url + base, headers=TUS) as response:
            assert response.status == 204 and "creation" in response.headers["Tus-Extension"]
        async with client.post(proxy.url + base, headers={
                **TUS, "Upload-Length": "3", "Upload-Metadata": metadata(target="/echo/s")}) as r:
            assert r.status == 201 and r.headers["Location"].startswith("/_fileproxy/uploads/")


async def test_creation_with_upload_needs_no_upload_offset(origin, proxy, client):
    body = b"first and only chunk"
    async with client.post(f"{proxy.url}/_fileproxy/uploads", data=body, headers={
            **TUS, "Upload-Length": str(len(body)), "Upload-Metadata": metadata(target="/echo/c"),
            "Content-Type": "application/offset+octet-stream"}) as response:
        assert response.status == 201 and response.headers["Upload-Offset"] == str(len(body))


@pytest.mark.parametrize("number", ["\u0661\u0662\u0663", "+3", "3.0", "0x3", "-3"])
async def test_tus_numbers_are_ascii_digits_only(origin, proxy, client, number):
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers={
            **TUS, "Upload-Length": number, "Upload-Metadata": metadata(target="/echo/n")}) as r:
        assert r.status == 400


async def test_a_head_after_the_last_patch_tells_how_the_delivery_went(make_proxy, client):
    async with RawServer(lambda _: b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n"
                         ) as upstream:
        proxy = await make_proxy(upstream.url, upload_delivery_wait=0)
        url = await create(client, proxy, 3)
        async with await patch(client, url, 0, b"abc") as response:
            assert response.status == 204  # as tus requires, whatever the upstream says later
        for _ in range(200):
            async with client.head(url, headers=TUS) as response:
                if response.headers.get("Fileproxy-Delivery-Status") != "pending":
                    break
            await asyncio.sleep(0.05)
        assert response.headers["Fileproxy-Delivery-Status"] == "failed"
        assert response.headers["Fileproxy-Upstream-Status"] == "405"


async def test_cors_lets_a_page_on_another_origin_upload(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, cors_origin=("https://app.example",))
    page = {"Origin": "https://app.example"}
    async with client.options(f"{proxy.url}/_fileproxy/uploads/", headers={
            **page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "tus-resumable, upload-length"}) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
        assert "Upload-Length" in response.headers["Access-Control-Allow-Headers"]
    async with client.post(f"{proxy.url}/_fileproxy/uploads", headers={
            **page, **TUS, "Upload-Length": "3", "Upload-Metadata": metadata(target="/x")}) as r:
        assert r.status == 201
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Location" in r.headers["Access-Control-Expose-Headers"]
    async with client.options(f"{proxy.url}/_fileproxy/uploads", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_a_patch_on_a_finished_upload_is_not_a_server_error(origin, proxy, client):
    url = await create(client, proxy, 3)
    async with await patch(client, url, 0, b"abc") as response:
        assert response.status == 204
    async with await patch(client, url, 3, b"") as response:
        assert response.status < 500 and response.headers["Upload-Offset"] == "3"
    async with await patch(client, url, 3, b"more") as response:
        assert response.status == 413
    assert len(origin.events("body-complete")) == 1
