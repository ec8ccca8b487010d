"""HTTPS as deployed: `fileproxy serve` (gunicorn) and `fileproxy dev` with --certfile/--keyfile;
SIGHUP reads the certificate again without cutting a running transfer."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, stop
from tests.test_h2 import make_certificate

RATE, SECONDS = 200_000, 3.0  # the slow transfer that spans the reload


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def served_certificate(port: int) -> str | None:
    """The sha256 of the certificate a new connection gets, or None while nothing listens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                unverified().wrap_socket(raw) as tls:
            certificate = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    return hashlib.sha256(certificate or b"").hexdigest()


def pem_sha256(path: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(Path(path).read_text())).hexdigest()


def wait_for(check, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)


class SlowDownload(threading.Thread):
    """A download over HTTPS that lasts a few seconds; what arrived, once it ended."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.received, self.error = port, 0, None
        self.started_receiving = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30,
                                                 context=unverified())
        try:
            connection.request("GET", f"/slow-body?rate={RATE}&seconds={SECONDS}")
            response = connection.getresponse()
            while chunk := response.read(16384):
                self.received += len(chunk)
                self.started_receiving.set()
        except Exception as error:  # (reported by the test)
            self.error = error
        finally:
            self.started_receiving.set()
            connection.close()


@pytest.mark.parametrize("command", ["serve", "dev"])
def test_sighup_reloads_the_certificate_and_transfers_go_on(origin_process, tmp_path, command):
    first, second = make_certificate(tmp_path, "first"), make_certificate(tmp_path, "second")
    cert, key = str(tmp_path / "live.pem"), str(tmp_path / "live.key")
    shutil.copy(first[0], cert)
    shutil.copy(first[1], key)
    port = free_port()
    process = psutil.Popen([sys.executable, "-m", "fileproxy", command, "--upstream",
                            origin_process, "--bind", f"127.0.0.1:{port}", "--workers", "2",
                            "--certfile", cert, "--keyfile", key, "--no-access-log"],
                           start_new_session=True)
    try:
        wait_for(lambda: served_certificate(port) is not None)
        assert served_certificate(port) == pem_sha256(first[0])
        workers = sorted(child.pid for child in process.children() if "redis" not in
                         child.name())
        download = SlowDownload(port)
        download.start()
        assert download.started_receiving.wait(10)
        shutil.copy(second[0], cert)
        shutil.copy(second[1], key)
        os.kill(process.pid, signal.SIGHUP)
        wait_for(lambda: served_certificate(port) == pem_sha256(second[0]))
        download.join(30)
        assert download.error is None and download.received == int(RATE * SECONDS)
        assert sorted(child.pid for child in process.children() if "redis" not in
                      child.name()) == workers  # (in place: no worker was replaced)
    finally:
        stop(process)


def test_an_unusable_certificate_stops_start_up_with_one_line(origin_process, tmp_path):
    _, key = make_certificate(tmp_path)
    other_cert, _ = make_certificate(tmp_path, "other")
    result = subprocess.run(
        [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process,
         "--certfile", other_cert, "--keyfile", key], capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fileproxy: error: --keyfile {key} is not the key of --certfile {other_cert}"]
