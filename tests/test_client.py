"""The Python client: tasks end to end, and a download that resumes after the proxy cut it, and
in a later run where an earlier one stopped (as wget -c does)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fileproxy.client import (
    SIDECAR_SUFFIX,
    AsyncClient,
    Client,
    DownloadError,
    DownloadState,
    StartOver,
    format_size,
    if_range_validator,
    progress_bar,
)
from tests.conftest import MATRIX, MATRIX_IDS
from tests.pattern import pattern, pattern_sha256

SIZE = 3 * 1024 * 1024 + 5


@pytest.fixture(params=MATRIX, ids=MATRIX_IDS)
async def cutting_proxy(origin, make_proxy, request):
    """The proxy on every server path and upstream client, passing an upstream cut on to the
    client."""
    fast_path, lean_client = request.param
    # The proxy would continue a cut upstream body itself (--upstream-resume-attempts) and hide
    # the cut from the client: these tests want it passed on, as nginx does.
    return await make_proxy(origin.url, fast_path=fast_path, lean_client=lean_client,
                            upstream_resume_attempts=0)


def sidecar_of(dest: Path) -> Path:
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def interrupted_run(url: str, dest: Path) -> int:
    """A first run whose only try is cut a third of the way: returns the partial file's size."""
    async with AsyncClient() as client:
        with pytest.raises(DownloadError, match="gave up"):
            await client.download(url, dest, retries=0, progress=False)
    partial = dest.stat().st_size
    assert 0 < partial < SIZE and sidecar_of(dest).exists()
    return partial


async def test_resumed_download_is_byte_exact_after_two_cuts(origin, cutting_proxy, tmp_path):
    proxy = cutting_proxy
    size = 6 * 1024 * 1024 + 11
    dest = tmp_path / "file.bin"
    async with AsyncClient() as client:
        got = await client.download(f"{proxy.url}/flaky/{size}?cuts=2&key=a", dest,
                                    progress=False)
    assert got == size
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == pattern_sha256(size)
    ranges = [event["range"] for event in origin.events("flaky")]
    assert len(ranges) == 3 and ranges[0] is None and all(ranges[1:]), "resumed, not restarted"


async def test_download_without_range_support_restarts_cleanly(origin, proxy, tmp_path):
    size = 2 * 1024 * 1024
    dest = tmp_path / "whole.bin"
    dest.write_bytes(b"stale partial content")
    async with AsyncClient() as client:
        await client.download(f"{proxy.url}/bytes/{size}?norange=1", dest, progress=False)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == pattern_sha256(size)


async def test_second_run_continues_where_the_first_stopped(origin, cutting_proxy, tmp_path):
    dest = tmp_path / "file.bin"
    url = f"{cutting_proxy.url}/flaky/{SIZE}?cuts=1&key=runs"
    partial = await interrupted_run(url, dest)
    assert json.loads(sidecar_of(dest).read_text()) == {"url": url, "validator": f'"{SIZE}-1"',
                                                        "size": SIZE}
    async with AsyncClient() as client:
        assert await client.download(url, dest, progress=False) == SIZE
    assert [event["range"] for event in origin.events("flaky")] == [None, f"bytes={partial}-"]
    assert sha256_of(dest) == pattern_sha256(SIZE)
    assert not sidecar_of(dest).exists()


@pytest.mark.parametrize("query", ["seed=2", "norange=1"], ids=["object-changed", "ranges-ignored"])
async def test_second_run_starts_over_when_the_server_answers_200(origin, cutting_proxy, tmp_path,
                                                                   query):
    """Once the cut is spent, /flaky serves seed 2's object (another ETag: If-Range fails), or
    ignores Range: the 200 replaces the partial file."""
    dest = tmp_path / "file.bin"
    url = f"{cutting_proxy.url}/flaky/{SIZE}?cuts=1&key=changed&{query}"
    partial = await interrupted_run(url, dest)
    async with AsyncClient() as client:
        assert await client.download(url, dest, progress=False) == SIZE
    assert [event["range"] for event in origin.events("flaky")] == [None, f"bytes={partial}-"]
    assert sha256_of(dest) == pattern_sha256(SIZE, seed=2 if query == "seed=2" else 1)
    assert not sidecar_of(dest).exists()


async def test_whole_file_left_with_its_sidecar_is_not_fetched_again(origin, cutting_proxy, tmp_path):
    """A run that wrote the last byte but stopped before removing the sidecar: the next one's
    Range starts at the end, the server answers 416, and no body is sent."""
    dest = tmp_path / "file.bin"
    url = f"{cutting_proxy.url}/flaky/{SIZE}?cuts=1&key=whole"
    partial = await interrupted_run(url, dest)
    with dest.open("ab") as handle:
        for piece in pattern(partial, SIZE - partial):
            handle.write(piece)
    async with AsyncClient() as client:
        assert await client.download(url, dest, progress=False) == SIZE
    assert [event["range"] for event in origin.events("flaky")] == [None, f"bytes={SIZE}-"]
    assert origin.events("bytes-sent") == []
    assert sha256_of(dest) == pattern_sha256(SIZE)
    assert not sidecar_of(dest).exists()


async def test_resume_false_starts_over(origin, cutting_proxy, tmp_path):
    dest = tmp_path / "file.bin"
    url = f"{cutting_proxy.url}/flaky/{SIZE}?cuts=1&key=fresh"
    await interrupted_run(url, dest)
    async with AsyncClient() as client:
        assert await client.download(url, dest, progress=False, resume=False) == SIZE
    assert [event["range"] for event in origin.events("flaky")] == [None, None]
    assert sha256_of(dest) == pattern_sha256(SIZE)
    assert not sidecar_of(dest).exists()


@pytest.mark.parametrize("leftover", ["no-sidecar", "other-url"])
async def test_partial_file_without_its_sidecar_is_not_trusted(origin, cutting_proxy, tmp_path,
                                                               leftover):
    """Nothing vouches that a partial file is a prefix of this object: the download starts over."""
    dest = tmp_path / "file.bin"
    url = f"{cutting_proxy.url}/flaky/{SIZE}?cuts=1&key=untrusted"
    await interrupted_run(url, dest)
    if leftover == "no-sidecar":
        sidecar_of(dest).unlink()
    else:
        url += "&other=1"
    async with AsyncClient() as client:
        assert await client.download(url, dest, progress=False) == SIZE
    assert [event["range"] for event in origin.events("flaky")] == [None, None]
    assert sha256_of(dest) == pattern_sha256(SIZE)
    assert not sidecar_of(dest).exists()


@pytest.mark.parametrize("record", [
    {"url": "U", "validator": 'W/"weak"', "size": 100},
    {"url": "U", "validator": '"strong"', "size": 5},
    {"url": "U", "size": 100},
    "not json",
], ids=["weak-etag", "file-larger-than-size", "no-validator", "garbage"])
def test_sidecar_that_cannot_vouch_for_the_file_is_ignored(tmp_path, record):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"0123456789")
    sidecar_of(dest).write_text(record if isinstance(record, str) else json.dumps(record))
    state = DownloadState(dest, "U")
    state.restore()
    assert (state.validator, state.total, state.trusted_size()) == (None, None, 0)


def test_sidecar_that_vouches_for_the_file_is_trusted(tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"0123456789")
    sidecar_of(dest).write_text(json.dumps({"url": "U", "validator": '"v1"', "size": 100}))
    state = DownloadState(dest, "U")
    state.restore()
    assert (state.trusted_size(), state.range_headers(10)) == (10, {"Range": "bytes=10-",
                                                                    "If-Range": '"v1"'})


RANGE_10 = {"Content-Range": "bytes 10-99/100", "ETag": '"v1"'}


@pytest.mark.parametrize(("status", "headers", "offset", "start"), [
    (200, {"ETag": '"v2"'}, 10, 0),
    (206, RANGE_10, 10, 10),
    (206, {"Content-Range": "bytes 10-99/100"}, 10, 10),
    (416, {"Content-Range": "bytes */100"}, 100, 100),
    (416, {}, 100, 100),
    (206, {**RANGE_10, "ETag": '"v2"'}, 10, StartOver),
    (206, {**RANGE_10, "Content-Range": "bytes 0-99/100"}, 10, StartOver),
    (206, {**RANGE_10, "Content-Range": "bytes 10-199/200"}, 10, StartOver),
    (416, {"Content-Range": "bytes */100"}, 10, StartOver),
    (416, {"Content-Range": "bytes */120"}, 100, StartOver),
    (206, RANGE_10, 0, DownloadError),
    (404, {}, 10, DownloadError),
], ids=["200-replaces", "206-continues", "206-without-etag", "416-whole", "416-stored-size",
        "206-other-object", "206-other-start", "206-other-size", "416-short", "416-other-size",
        "206-unasked", "404"])
def test_where_a_response_body_goes(tmp_path, status, headers, offset, start):
    """A 206 must continue this object exactly where the file ends; anything else starts over."""
    state = DownloadState(tmp_path / "file.bin", "U", total=100, validator='"v1"')
    if isinstance(start, int):
        assert state.start_of(status, headers, offset) == start
    else:
        with pytest.raises(start):
            state.start_of(status, headers, offset)


@pytest.mark.parametrize(("headers", "validator"), [
    ({"ETag": '"v1"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}, '"v1"'),
    ({"ETag": 'W/"v1"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}, None),
    ({"Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT", "Date": "Mon, 01 Jan 2024 00:00:01 GMT"},
     "Mon, 01 Jan 2024 00:00:00 GMT"),
    ({"Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT", "Date": "Mon, 01 Jan 2024 00:00:00 GMT"}, None),
    ({"Last-Modified": "yesterday", "Date": "Mon, 01 Jan 2024 00:00:00 GMT"}, None),
    ({}, None),
], ids=["strong-etag", "weak-etag", "old-last-modified", "last-modified-now", "bad-date", "none"])
def test_if_range_validator_is_strong_or_none(headers, validator):
    assert if_range_validator(headers) == validator


def test_progress_bar_starts_at_the_resumed_offset():
    resumed = progress_bar("big.iso", 12 * 1024 * 1024, 40 * 1024 * 1024)
    fresh = progress_bar("big.iso", 0, 40 * 1024 * 1024)
    try:
        assert (resumed.n, resumed.total, resumed.desc) == (12 * 1024 * 1024, 40 * 1024 * 1024,
                                                            "big.iso (resumed at 12.0 MiB)")
        assert (fresh.n, fresh.desc) == (0, "big.iso")
    finally:
        resumed.close()
        fresh.close()
    assert [format_size(n) for n in (0, 1023, 1536, 5 * 1024 ** 3)] == ["0 B", "1023 B", "1.5 KiB",
                                                                        "5.0 GiB"]


async def test_resumed_run_shows_where_it_resumed(origin, make_proxy, tmp_path, capsys):
    proxy = await make_proxy(origin.url, upstream_resume_attempts=0)
    dest = tmp_path / "file.bin"
    url = f"{proxy.url}/flaky/{SIZE}?cuts=1&key=bar"
    partial = await interrupted_run(url, dest)
    capsys.readouterr()
    async with AsyncClient() as client:
        await client.download(url, dest, progress=True)
    shown = capsys.readouterr().err
    assert f"file.bin (resumed at {format_size(partial)}):" in shown and "100%" in shown


async def test_async_client_submit_wait_result_cancel(origin, proxy):
    async with AsyncClient(proxy.url) as client:
        task_id = await client.submit("PUT", "/echo/thing", body=b"payload")
        record = await client.wait(task_id, timeout=10, poll=0.05)
        assert record["status"] == "completed"
        result = await client.result(task_id)
        assert result.status == 200 and b'"body_length": 7' in result.body
        slow = await client.submit("GET", "/slow-headers?delay=30")
        cancelled = await client.cancel(slow)
        assert cancelled["status"] == "cancelled"


def test_sync_client_and_cli(tmp_path):
    """The blocking client and the CLI, against a proxy and origin in their own processes."""
    from tests.conftest import free_port, start_process, stop

    origin_port, proxy_port = free_port(), free_port()
    origin_url, proxy_url = f"http://127.0.0.1:{origin_port}", f"http://127.0.0.1:{proxy_port}"
    origin = start_process([sys.executable, "-m", "tests.origin", "--port", str(origin_port)],
                           f"{origin_url}/_origin/events")
    proxy = start_process([sys.executable, "-m", "fileproxy", "dev", "--upstream", origin_url,
                           "--bind", f"127.0.0.1:{proxy_port}", "--no-access-log"],
                          f"{proxy_url}/_fileproxy/health")
    try:
        with Client(proxy_url) as client:
            task_id = client.submit("GET", "/status/200")
            assert client.wait(task_id, timeout=10)["status"] == "completed"
        out = tmp_path / "cli.bin"
        done = subprocess.run([sys.executable, "-m", "fileproxy.client", "get",
                               f"{proxy_url}/flaky/{1024 * 1024}?cuts=1&key=cli", "-o", str(out)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == str(1024 * 1024)
        submitted = subprocess.run([sys.executable, "-m", "fileproxy.client", "submit", "--base",
                                    proxy_url, "get", "/status/204"], capture_output=True,
                                   text=True, timeout=60)
        waited = subprocess.run([sys.executable, "-m", "fileproxy.client", "wait", "--base",
                                 proxy_url, submitted.stdout.strip()], capture_output=True,
                                text=True, timeout=60)
        assert '"upstream_status": 204' in waited.stdout, (submitted, waited)
        assert_cli_continues_across_runs(origin_url, tmp_path)
    finally:
        stop(proxy)
        stop(origin)


def assert_cli_continues_across_runs(origin_url: str, tmp_path: Path) -> None:
    """`get` after a run that gave up continues its file; `--no-continue` starts over (straight from
    the origin, whose cuts then reach the client whatever the proxy does about them)."""
    def get(key: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fileproxy.client", "get",
                               f"{origin_url}/flaky/{SIZE}?cuts=1&key={key}", "-o",
                               str(tmp_path / f"{key}.bin"), *flags],
                              capture_output=True, text=True, timeout=60)

    first_runs = [get(key, "--retries", "0") for key in ("cli-continue", "cli-fresh")]
    assert [run.returncode for run in first_runs] == [1, 1]
    assert all("gave up after 0 retries" in run.stderr for run in first_runs), first_runs
    partial = (tmp_path / "cli-continue.bin").stat().st_size
    second_runs = [get("cli-continue"), get("cli-fresh", "--no-continue")]
    assert [run.stdout.strip() for run in second_runs] == [str(SIZE)] * 2, second_runs
    with urllib.request.urlopen(f"{origin_url}/_origin/events", timeout=10) as response:
        events = json.load(response)["events"]
    ranges = [event["range"] for event in events
              if event["event"] == "flaky" and event["path"] == f"/flaky/{SIZE}"]
    assert ranges == [None, None, f"bytes={partial}-", None]
    for key in ("cli-continue", "cli-fresh"):
        assert sha256_of(tmp_path / f"{key}.bin") == pattern_sha256(SIZE)
        assert not sidecar_of(tmp_path / f"{key}.bin").exists()
