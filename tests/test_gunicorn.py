"""fileproxy as deployed: `python -m fileproxy serve` under gunicorn with 2 uvloop workers."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest

from tests.conftest import GunicornProxy
from tests.pattern import pattern, pattern_sha256

BIG = 256 * 1024 * 1024


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def test_runs_two_workers_and_answers_health(gunicorn_proxy: GunicornProxy):
    assert len(gunicorn_proxy.worker_pids()) == 2
    with urllib.request.urlopen(f"{gunicorn_proxy.url}/_fileproxy/health") as response:
        assert response.status == 200


def test_256mib_download_byte_exact(gunicorn_proxy: GunicornProxy):
    digest, length = hashlib.sha256(), 0
    with urllib.request.urlopen(f"{gunicorn_proxy.url}/bytes/{BIG}") as response:
        assert response.headers["Content-Length"] == str(BIG)
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
    assert (digest.hexdigest(), length) == (pattern_sha256(BIG), BIG)


def test_256mib_upload_byte_exact(gunicorn_proxy: GunicornProxy):
    connection = http.client.HTTPConnection(*host_port(gunicorn_proxy.url), timeout=120)
    connection.putrequest("PUT", "/echo/upload")
    connection.putheader("Content-Length", str(BIG))
    connection.endheaders()
    for piece in pattern(0, BIG, seed=3):
        connection.send(piece)
    response = connection.getresponse()
    import json

    echoed = json.loads(response.read())
    connection.close()
    assert (echoed["body_sha256"], echoed["body_length"]) == (pattern_sha256(BIG, seed=3), BIG)


def worker_rss(pids: list[int]) -> dict[int, int]:
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


def test_slow_client_costs_bounded_memory(gunicorn_proxy: GunicornProxy):
    """A 1 GiB download read at ~1 MB/s for 8 s: no worker grows by more than 32 MiB."""
    pids = gunicorn_proxy.worker_pids()
    baseline = worker_rss(pids)
    peak = dict(baseline)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(host_port(gunicorn_proxy.url))
    sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (1 << 30))
    received, started = 0, time.monotonic()
    while time.monotonic() - started < 8:
        received += len(sock.recv(64 * 1024))
        time.sleep(0.064)
        for pid, rss in worker_rss(pids).items():
            peak[pid] = max(peak[pid], rss)
    sock.close()
    assert received < 20 * 1024 * 1024, "the client really was slow"
    growth = {pid: (peak[pid] - baseline[pid]) / 2**20 for pid in pids}
    assert max(growth.values()) < 32, f"RSS growth per worker in MiB: {growth}"


def get_json(url: str) -> dict:
    import json

    request = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def test_request_ids_are_unique_across_workers(gunicorn_proxy: GunicornProxy):
    """Each worker draws its own id prefix after the fork (not one in the master for all)."""
    ids = []
    for _ in range(120):  # a new connection each time: both workers take some
        with urllib.request.urlopen(f"{gunicorn_proxy.url}/echo/id") as response:
            echo = json.loads(response.read())
        ids += [value for name, value in echo["headers"] if name.lower() == "x-request-id"]
    assert len(ids) == 120
    assert len(set(ids)) == 120
    assert len({request_id[:8] for request_id in ids}) == 2  # one prefix per worker


def test_stats_are_the_same_whichever_worker_answers(gunicorn_proxy: GunicornProxy):
    time.sleep(1.2)  # earlier tests' requests have reached the shared numbers
    before = get_json(f"{gunicorn_proxy.url}/_fileproxy/stats")["requests"]["total"]
    for _ in range(40):  # a new connection each time: both workers serve some
        request = urllib.request.Request(f"{gunicorn_proxy.url}/status/200",
                                         headers={"Connection": "close"})
        with urllib.request.urlopen(request) as response:
            response.read()
    # Each worker moves its counts into the shared files every second (and before answering).
    for _ in range(30):
        seen = {get_json(f"{gunicorn_proxy.url}/_fileproxy/stats")["requests"]["total"]
                for _ in range(10)}
        if seen == {before + 40}:
            break
        time.sleep(0.1)
    assert seen == {before + 40}
    with urllib.request.urlopen(f"{gunicorn_proxy.url}/_fileproxy/metrics") as response:
        text = response.read().decode()
    assert 'fileproxy_requests_total{outcome="ok",status="200"}' in text


def test_workers_share_task_state_through_a_private_redis(gunicorn_proxy: GunicornProxy):
    """2 workers, no --redis-url: serve starts a private redis-server, so a task submitted to one
    worker is seen, run and fetched through any of them."""
    request = urllib.request.Request(f"{gunicorn_proxy.url}/status/203",
                                     headers={"Prefer": "respond-async", "Connection": "close"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 202
        status_url = response.headers["Location"]
    for _ in range(100):
        records = [get_json(gunicorn_proxy.url + status_url) for _ in range(4)]
        if all(r["status"] == "completed" for r in records):
            break
        time.sleep(0.05)
    assert all(r["status"] == "completed" and r["upstream_status"] == 203 for r in records)


def test_without_redis_server_it_runs_one_worker_and_says_so(origin_process: str, tmp_path):
    """Several workers need shared state: with no --redis-url and no redis-server on PATH,
    serve runs one worker with the in-memory store and says so in one line."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port, start_process, stop

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = start_process(
            [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process, "--bind",
             f"127.0.0.1:{port}", "--workers", "3", "--no-access-log"],
            f"http://127.0.0.1:{port}/_fileproxy/health",
            env={**os.environ, "PATH": str(tmp_path)}, stderr=out, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1)
        workers = [c for c in psutil.Process(process.pid).children()]
        assert len(workers) == 1
        assert "running 1 worker (not 3) with the in-memory store" in log.read_text()
    finally:
        stop(process)


@pytest.mark.parametrize(("method", "headers", "ends"), [
    ("GET", {}, "completed"),
    ("POST", {"Idempotency-Key": "order-17"}, "completed"),
    ("POST", {}, "failed"),
], ids=["idempotent-runs-again", "idempotency-key-runs-again", "post-is-not-sent-twice"])
def test_task_survives_its_worker_being_killed(origin_process: str, method, headers, ends):
    """SIGKILL the gunicorn workers while a task runs: new workers take its claim over after the
    visibility timeout; the task runs again when that is safe (an idempotent method, or an
    Idempotency-Key the origin can drop a duplicate by), else it ends failed: interrupted."""
    import os
    import signal
    import sys

    from tests.conftest import free_port, start_process, stop

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(
        [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process, "--bind",
         f"127.0.0.1:{port}", "--workers", "2", "--no-access-log",
         "--task-visibility-timeout", "1"], f"{url}/_fileproxy/health")
    try:
        request = urllib.request.Request(f"{url}/slow-headers?delay=2", method=method,
                                         data=b"x" if method == "POST" else None,
                                         headers={"Prefer": "respond-async", **headers})
        with urllib.request.urlopen(request) as response:
            status_url = response.headers["Location"]
        for _ in range(100):
            if get_json(url + status_url)["status"] == "processing":
                break
            time.sleep(0.05)
        workers = [c.pid for c in psutil.Process(process.pid).children()
                   if "redis" not in c.name()]
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        record = {}
        for _ in range(300):
            try:
                record = get_json(url + status_url)
            except OSError:
                pass  # no worker up for a moment
            if record.get("status") in ("completed", "failed"):
                break
            time.sleep(0.05)
        assert record.get("status") == ends, record
        if ends == "completed":
            assert record["upstream_status"] == 200 and record["attempts"] >= 2
        else:
            assert record["attempts"] == 1 and record["error"].startswith("interrupted")
    finally:
        stop(process)


def tus(method: str, url: str, headers: dict | None = None, body: bytes = b""):
    request = urllib.request.Request(url, data=body or None, method=method, headers={
        "Tus-Resumable": "1.0.0", "Connection": "close", **(headers or {})})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, response.headers


def raw_partial_patch(proxy_url: str, path: str, offset: int, total: int, data: bytes) -> None:
    """A PATCH that sends `data` of the announced rest, then drops the connection."""
    sock = socket.create_connection(host_port(proxy_url))
    sock.sendall(f"PATCH {path} HTTP/1.1\r\nHost: t\r\nTus-Resumable: 1.0.0\r\n"
                 f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
                 f"Content-Length: {total - offset}\r\n\r\n".encode())
    sock.sendall(data)
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST: the cut


def finish_upload(url: str, body: bytes) -> tuple[int, object, int]:
    """Send the rest as a tus client does: HEAD for the offset, PATCH; a cut PATCH may still be
    finishing on the server (409 offset moved, 423 locked), so ask again."""
    for _ in range(50):
        _, head = tus("HEAD", url)
        offset = int(head["Upload-Offset"])
        try:
            status, headers = tus("PATCH", url, {
                "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream"}, body[offset:])
            return status, headers, offset
        except urllib.error.HTTPError as error:
            if error.code not in (409, 423):
                raise
            time.sleep(0.2)
    raise AssertionError("the upload could not be finished")


def test_256mib_upload_cut_three_times_arrives_once_byte_exact(gunicorn_proxy: GunicornProxy):
    """Each PATCH on a new connection, so any of the 2 workers may take it; the session lives
    in the private redis-server the workers share."""
    import base64

    size = BIG
    body = b"".join(pattern(0, size, seed=21))
    meta = "target " + base64.b64encode(b"/echo/big-upload").decode()
    status, headers = tus("POST", f"{gunicorn_proxy.url}/_fileproxy/uploads",
                          {"Upload-Length": str(size), "Upload-Metadata": meta})
    assert status == 201
    path = headers["Location"]
    offsets = []
    for cut in range(3):
        _, head = tus("HEAD", gunicorn_proxy.url + path)
        offset = int(head["Upload-Offset"])
        offsets.append(offset)
        raw_partial_patch(gunicorn_proxy.url, path, offset, size,
                          body[offset:offset + 60 * 1024 * 1024 + cut])
    status, headers, offset = finish_upload(gunicorn_proxy.url + path, body)
    assert offsets == sorted(set(offsets)) and offset > offsets[-1], "every drop kept its bytes"
    assert status == 204 and headers["Upload-Offset"] == str(size)
    delivery = headers["Fileproxy-Delivery"]
    for _ in range(200):
        record = get_json(gunicorn_proxy.url + delivery)
        if record["status"] == "completed":
            break
        time.sleep(0.1)
    with urllib.request.urlopen(gunicorn_proxy.url + delivery + "/result") as response:
        echoed = json.loads(response.read())
    assert echoed["body_sha256"] == pattern_sha256(size, seed=21)
    assert echoed["body_length"] == size


def test_worker_killed_during_patch_resumes_from_what_was_kept(origin_process: str):
    import base64
    import os
    import signal
    import sys
    import threading

    from tests.conftest import free_port, start_process, stop

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(
        [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process, "--bind",
         f"127.0.0.1:{port}", "--workers", "2", "--no-access-log", "--upload-lock-ttl", "2"],
        f"{url}/_fileproxy/health")
    size = 32 * 1024 * 1024
    body = b"".join(pattern(0, size, seed=8))
    try:
        meta = "target " + base64.b64encode(b"/echo/killed").decode()
        _, headers = tus("POST", f"{url}/_fileproxy/uploads",
                         {"Upload-Length": str(size), "Upload-Metadata": meta})
        path = headers["Location"]
        sent = []

        def slow_patch() -> None:
            sock = socket.create_connection(host_port(url))
            sock.sendall(f"PATCH {path} HTTP/1.1\r\nHost: t\r\nTus-Resumable: 1.0.0\r\n"
                         f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                         f"Content-Length: {size}\r\n\r\n".encode())
            try:
                for start in range(0, size, 1024 * 1024):
                    sock.sendall(body[start:start + 1024 * 1024])
                    sent.append(start + 1024 * 1024)
                    time.sleep(0.05)
            except OSError:
                pass
            sock.close()

        sender = threading.Thread(target=slow_patch)
        sender.start()
        time.sleep(0.8)
        for child in psutil.Process(process.pid).children():
            if "redis" not in child.name():
                os.kill(child.pid, signal.SIGKILL)
        sender.join(30)
        time.sleep(3)  # respawned workers; the dead PATCH's lock lapses
        _, head = tus("HEAD", url + path)
        assert 0 < int(head["Upload-Offset"]) <= max(sent), (head["Upload-Offset"], max(sent))
        status, headers, _ = finish_upload(url + path, body)
        assert status == 204
        delivery = headers["Fileproxy-Delivery"]
        for _ in range(200):
            if get_json(url + delivery)["status"] == "completed":
                break
            time.sleep(0.1)
        with urllib.request.urlopen(url + delivery + "/result") as response:
            assert json.loads(response.read())["body_sha256"] == pattern_sha256(size, seed=8)
    finally:
        stop(process)


def test_the_private_redis_keeps_tasks_through_its_own_restart(origin_process: str):
    """The redis-server `serve` starts for several workers writes an append-only file and is
    started again by the master when it dies: tasks recorded before survive, new ones run."""
    import os
    import signal
    import sys

    from tests.conftest import free_port, start_process, stop

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(
        [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process, "--bind",
         f"127.0.0.1:{port}", "--workers", "2", "--no-access-log"], f"{url}/_fileproxy/health")
    try:
        def submit() -> str:
            request = urllib.request.Request(f"{url}/status/203",
                                             headers={"Prefer": "respond-async"})
            with urllib.request.urlopen(request) as response:
                return response.headers["Location"]

        def completed(status_url: str) -> dict:
            for _ in range(400):
                try:
                    record = get_json(url + status_url)
                    if record["status"] == "completed":
                        return record
                except OSError:
                    pass  # (task endpoints answer 503 while the store is away)
                time.sleep(0.05)
            raise AssertionError(f"{status_url} did not complete")

        before = submit()
        assert completed(before)["upstream_status"] == 203
        time.sleep(1.5)  # appendfsync everysec: on disk within a second
        redis = next(c for c in psutil.Process(process.pid).children() if "redis" in c.name())
        os.kill(redis.pid, signal.SIGKILL)
        for _ in range(200):
            restarted = [c for c in psutil.Process(process.pid).children()
                         if "redis" in c.name() and c.pid != redis.pid]
            if restarted:
                break
            time.sleep(0.05)
        assert restarted, "the master started its redis-server again"
        assert completed(before)["upstream_status"] == 203, "kept through the restart"
        assert completed(submit())["upstream_status"] == 203
    finally:
        stop(process)
