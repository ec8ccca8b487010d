"""The Python client: tasks end to end, and a download that resumes after the proxy cut it."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from fileproxy.client import AsyncClient, Client
from tests.pattern import pattern_sha256


async def test_resumed_download_is_byte_exact_after_two_cuts(origin, proxy, tmp_path):
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
    finally:
        stop(proxy)
        stop(origin)
