"""The IETF resumable-upload draft (interop versions 6 and 8) on proxied paths, over real sockets:
creation by Upload-Complete, 104 announcements, appends, offset retrieval, problem types, drops
mid-request, and the upstream's own answer to the completing request."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from tests.pattern import pattern, pattern_sha256

MIB = 1024 * 1024
PARTIAL = "application/partial-upload"
VERSIONS = ["6", "8"]


def draft(version: str, **headers: str) -> dict[str, str]:
    return {"Upload-Draft-Interop-Version": version, **headers}


async def create(client, proxy, version: str, path: str = "/echo/target?x=1",
                 data: bytes = b"", complete: bool = False, **headers: str):
    return await client.post(f"{proxy.url}{path}", data=data, headers=draft(
        version, **{"Upload-Complete": "?1" if complete else "?0",
                    "Content-Type": "text/csv", **headers}))


async def state(client, url: str, version: str) -> dict[str, str]:
    async with client.head(url, headers=draft(version)) as response:
        assert response.status == 204, response.status
        assert response.headers["Cache-Control"] == "no-store"
        return dict(response.headers)


async def append(client, url: str, version: str, offset: int, data: bytes, complete: bool,
                 **headers: str):
    return await client.patch(url, data=data, headers=draft(version, **{
        "Upload-Offset": str(offset), "Upload-Complete": "?1" if complete else "?0",
        "Content-Type": PARTIAL, **headers}))


@pytest.mark.parametrize("version", VERSIONS)
async def test_upload_in_parts_reaches_the_upstream_as_the_request_it_started_as(
        origin, proxy, client, version):
    body = b"".join(pattern(0, 3 * MIB + 7, seed=3))
    async with await create(client, proxy, version, data=body[:MIB],
                            **{"Upload-Length": str(len(body)), "X-App": "kept"}) as response:
        assert response.status == 201, await response.text()
        assert response.headers["Upload-Complete"] == "?0"
        assert response.headers["Upload-Offset"] == str(MIB)
        assert response.headers["Upload-Draft-Interop-Version"] == version
        limit = response.headers["Upload-Limit"]
        assert "max-size=" in limit and ("max-age=" if version == "8" else "expires=") in limit
        url = proxy.url + response.headers["Location"]
    assert origin.events("body-complete") == []  # nothing went upstream yet
    async with await append(client, url, version, MIB, body[MIB:2 * MIB], False) as response:
        assert response.status == 204 and response.headers["Upload-Complete"] == "?0"
        assert response.headers["Upload-Offset"] == str(2 * MIB)
    headers = await state(client, url, version)
    assert (headers["Upload-Offset"], headers["Upload-Complete"],
            headers["Upload-Length"]) == (str(2 * MIB), "?0", str(len(body)))
    async with await append(client, url, version, 2 * MIB, body[2 * MIB:], True) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Upload-Complete"] == "?1"
        assert response.headers["Upload-Offset"] == str(len(body))
        echoed = await response.json()  # the upstream's own answer to the delivered request
    assert echoed["method"] == "POST" and echoed["raw_path"] == "/echo/target?x=1"
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    sent = {name.lower(): value for name, value in echoed["headers"]}
    assert sent["content-type"] == "text/csv" and sent["x-app"] == "kept"
    assert sent["content-length"] == str(len(body)) and "idempotency-key" in sent
    assert not {"upload-complete", "upload-offset", "upload-length",
                "upload-draft-interop-version"} & set(sent)
    headers = await state(client, url, version)
    assert headers["Upload-Complete"] == "?1"
    assert headers["Fileproxy-Delivery-Status"] == "delivered"


async def test_a_whole_upload_is_announced_with_104_and_answered_by_the_upstream(origin, proxy):
    """Upgrading an ordinary upload: Upload-Complete: ?1 with the whole body; the 104 carries
    the upload's URL before the body is read, the final answer is the upstream's."""
    size = 2 * MIB + 1
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"PUT /echo/whole HTTP/1.1\r\nHost: t\r\nUpload-Complete: ?1\r\n"
                 f"Upload-Draft-Interop-Version: 8\r\nContent-Length: {size}\r\n\r\n".encode())
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 104 ")
    assert b"Location: /_fileproxy/uploads/" in interim and b"Upload-Limit: " in interim
    for piece in pattern(0, size, seed=4):
        writer.write(piece)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"Upload-Complete: ?1" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    echoed = json.loads(await reader.readexactly(length))
    assert echoed["method"] == "PUT" and echoed["body_sha256"] == pattern_sha256(size, seed=4)
    writer.close()


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_drop_mid_creation_resumes_from_what_was_kept(origin, proxy, client, version):
    size = 8 * MIB + 3
    body = b"".join(pattern(0, size, seed=5))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"POST /echo/dropped HTTP/1.1\r\nHost: t\r\nUpload-Complete: ?1\r\n"
                 f"Upload-Draft-Interop-Version: {version}\r\nContent-Length: {size}\r\n\r\n"
                 .encode() + body[:3 * MIB])
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    url = proxy.url + interim.split(b"Location: ")[1].split(b"\r\n")[0].decode()
    await asyncio.sleep(0.3)
    writer.transport.abort()  # the connection drops mid-body
    offset = int((await state(client, url, version))["Upload-Offset"])
    assert 0 < offset <= 3 * MIB
    async with await append(client, url, version, offset, body[offset:], True) as response:
        assert response.status == 200 and response.headers["Upload-Complete"] == "?1"
        assert (await response.json())["body_sha256"] == pattern_sha256(size, seed=5)
    assert len(origin.events("body-complete")) == 1  # delivered once


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_offset_mismatch_is_a_409_problem_with_the_right_offset(proxy, client, version):
    async with await create(client, proxy, version, data=b"abc") as response:
        url = proxy.url + response.headers["Location"]
    async with await append(client, url, version, 7, b"def", False) as response:
        assert response.status == 409
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert response.headers["Upload-Offset"] == "3"
        problem = await response.json(content_type=None)
    assert problem["type"].endswith("#mismatching-upload-offset")
    assert (problem["expected-offset"], problem["provided-offset"]) == (3, 7)


async def test_a_completed_upload_takes_no_more(proxy, client):
    async with await create(client, proxy, "8", data=b"ab") as response:
        url = proxy.url + response.headers["Location"]
    async with await append(client, url, "8", 2, b"c", True) as response:
        assert response.status == 200
    async with await append(client, url, "8", 3, b"", False) as response:
        assert response.status == 400
        assert (await response.json(content_type=None))["type"].endswith("#completed-upload")
    async with await append(client, url, "8", 3, b"more", False) as response:
        assert response.status == 400
        problem = await response.json(content_type=None)
        assert problem["type"].endswith("#inconsistent-upload-length")


async def test_inconsistent_lengths_are_refused(proxy, client, origin):
    async with await create(client, proxy, "8", data=b"12345", complete=True,
                            **{"Upload-Length": "9"}) as response:
        assert response.status == 400
        problem = await response.json(content_type=None)
        assert problem["type"].endswith("#inconsistent-upload-length")
    async with await create(client, proxy, "8", data=b"12", **{"Upload-Length": "3"}) as response:
        url = proxy.url + response.headers["Location"]
    async with await append(client, url, "8", 2, b"345", False) as response:
        assert response.status == 400  # more than the length
    assert origin.events("body-complete") == []


async def test_the_last_byte_of_a_known_length_completes_the_upload(origin, proxy, client):
    """As tusd does (and tus-js-client in node needs: its last chunk says ?0): the answer is
    the upstream's; an empty completing request afterwards gets it again, nothing more."""
    async with await create(client, proxy, "6", data=b"abc", **{"Upload-Length": "6"}) as response:
        url = proxy.url + response.headers["Location"]
    async with await append(client, url, "6", 3, b"def", False) as response:
        assert response.status == 200 and response.headers["Upload-Complete"] == "?1"
        assert (await response.json())["body_sha256"] == hashlib.sha256(b"abcdef").hexdigest()
    async with await append(client, url, "6", 6, b"", True) as response:
        assert response.status == 200 and response.headers["Upload-Offset"] == "6"
        assert (await response.json())["body_length"] == 6
    assert len(origin.events("body-complete")) == 1


async def test_unknown_length_until_the_client_completes(proxy, client):
    async with await create(client, proxy, "8", data=b"x" * 1000) as response:
        assert "Upload-Length" not in response.headers
        url = proxy.url + response.headers["Location"]
    async with await append(client, url, "8", 1000, b"y" * 24, True) as response:
        assert response.status == 200
        assert (await response.json())["body_length"] == 1024
    assert (await state(client, url, "8"))["Upload-Length"] == "1024"


async def test_appends_are_partial_upload_documents(proxy, client):
    async with await create(client, proxy, "8") as response:
        url = proxy.url + response.headers["Location"]
    async with await append(client, url, "8", 0, b"x", False,
                            **{"Content-Type": "application/octet-stream"}) as response:
        assert response.status == 415


async def test_other_interop_versions_and_plain_requests_reach_the_upstream(origin, proxy,
                                                                            client):
    """tusd's older versions (3-5) are the upstream's business; so is everything without
    Upload-Complete."""
    async with client.post(f"{proxy.url}/echo/old", data=b"v5", headers=draft(
            "5", **{"Upload-Complete": "?1"})) as response:
        echoed = await response.json()
    sent = {name.lower(): value for name, value in echoed["headers"]}
    assert sent["upload-complete"] == "?1" and sent["upload-draft-interop-version"] == "5"


async def test_off_forwards_upload_complete_as_it_is(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, resumable_uploads=False)
    async with client.post(f"{proxy.url}/echo/raw", data=b"z", headers=draft(
            "8", **{"Upload-Complete": "?1"})) as response:
        assert response.status == 200
        sent = {name.lower(): value for name, value in (await response.json())["headers"]}
    assert sent["upload-complete"] == "?1"


async def test_the_upstream_refusal_is_the_answer_to_the_completing_request(proxy, client):
    async with await create(client, proxy, "8", path="/status/405", data=b"q",
                            complete=True) as response:
        assert response.status == 405 and response.headers["Upload-Complete"] == "?1"
        assert await response.text() == "origin says 405\n"


async def test_an_upload_token_guards_creation(origin, make_proxy, client):
    proxy = await make_proxy(origin.url, upload_token="s3cret")
    async with await create(client, proxy, "8", data=b"a") as response:
        assert response.status == 401
    async with await create(client, proxy, "8", data=b"a",
                            **{"Fileproxy-Upload-Token": "s3cret"}) as response:
        assert response.status == 201
    assert origin.events("body-complete") == []


async def test_a_delivery_slower_than_the_wait_answers_202_and_stays_findable(
        origin, make_proxy, client):
    proxy = await make_proxy(origin.url, upload_delivery_wait=0)
    async with await create(client, proxy, "8", path="/slow-headers?delay=1", data=b"s",
                            complete=True) as response:
        assert response.status == 202 and response.headers["Upload-Complete"] == "?1"
        status_url = proxy.url + response.headers["Fileproxy-Delivery"]
    for _ in range(100):
        async with client.get(status_url) as response:
            if (await response.json())["status"] == "completed":
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the delivery never completed")
