"""tus-js-client, the official JavaScript tus client (pinned in tests/js/package.json), uploading
through fileproxy as deployed: gunicorn, 2 workers sharing a private Redis, so each node process
(and a resume) may land on either worker.

Every upload goes to its own /echo/tusjs/... target; the test origin's events then show that the
file arrived upstream exactly once and byte-exact. tests/js/upload.mjs does one upload per run and
prints a JSON line with what happened (see its header)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, GunicornProxy, free_port, start_process, stop

JS_DIR = ROOT / "tests" / "js"
TUS_JS_CLIENT = "4.3.1"  # the version pinned in tests/js/package.json
MIB = 1024 * 1024
SIZE = 8 * MIB
TUS = {"Tus-Resumable": "1.0.0"}
FILETYPE = "application/x-tusjs"  # what upload.mjs sends as Upload-Metadata filetype


def node_missing() -> str | None:
    """Why these tests cannot run here, or None."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return ("node and npm are needed for the tus-js-client interop tests "
                "(apt-get install nodejs npm; .ci/run does)")
    version = subprocess.run(["node", "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    major = version.removeprefix("v").split(".")[0]
    if not major.isdigit() or int(major) < 18:
        return f"tus-js-client {TUS_JS_CLIENT} needs node 18 or newer (found {version!r})"
    return None


if (missing := node_missing()) is not None:
    pytest.skip(missing, allow_module_level=True)  # one line in the summary for the module


@pytest.fixture(scope="session")
def tusjs() -> Path:
    """node with tus-js-client installed in tests/js/node_modules (npm ci, once, when missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node is not None and npm is not None
    installed = JS_DIR / "node_modules" / "tus-js-client" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != TUS_JS_CLIENT:
        command = [npm, "ci" if (JS_DIR / "package-lock.json").exists() else "install",
                   "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"{' '.join(command)} in {JS_DIR} took over 300 s:\n{error.stdout}\n{error.stderr}")
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} in {JS_DIR} failed ({done.returncode}):\n"
                        f"{done.stdout}\n{done.stderr}")
    assert json.loads(installed.read_text())["version"] == TUS_JS_CLIENT
    return Path(node)


@pytest.fixture(scope="module")
def deployed(origin_process: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornProxy]:
    """`python -m fileproxy serve --workers 2` (gunicorn and its private redis-server)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: 2 workers need it (apt-get install "
                    "redis-server; .ci/run does)")
    directory = tmp_path_factory.mktemp("tusjs-proxy")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(directory / "proxy.log", "wb") as log:
        process = start_process(
            [sys.executable, "-m", "fileproxy", "serve", "--upstream", origin_process,
             "--bind", f"127.0.0.1:{port}", "--workers", "2", "--no-access-log",
             "--spool-dir", str(directory / "spool")],
            f"{url}/_fileproxy/health", stdout=log, stderr=subprocess.STDOUT)
    proxy = GunicornProxy(url, process)
    deadline = time.monotonic() + 30
    while len(proxy.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(proxy.worker_pids()) == 2, (directory / "proxy.log").read_text()
    yield proxy
    stop(process)


@dataclass
class Source:
    path: Path
    sha256: str


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    data = os.urandom(SIZE)
    path = tmp_path_factory.mktemp("tusjs-source") / "source.bin"
    path.write_bytes(data)
    return Source(path, hashlib.sha256(data).hexdigest())


def run_upload(node: Path, source: Source, endpoint: str, target: str, *options: str) -> dict:
    """One run of upload.mjs; its JSON outcome (the run must end with status 0)."""
    command = [str(node), "upload.mjs", "--file", str(source.path), "--endpoint", endpoint,
               "--target", target, "--timeout", "60", *options]
    done = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True, timeout=90)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, (
        f"upload.mjs exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}")
    return json.loads(lines[-1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def target_path() -> str:
    return f"/echo/tusjs/{uuid.uuid4().hex}"


def assert_delivered_once(proxy: GunicornProxy, origin: str, outcome: dict, target: str,
                          source: Source) -> None:
    """The upload finished, its task completed, and the origin got the file once, byte-exact."""
    assert outcome["ok"], outcome
    assert outcome["offset"] == SIZE and outcome["requests"][-1] == ["PATCH", 204, SIZE], outcome
    last = outcome["lastResponse"]["headers"]
    assert last["tus-resumable"] == "1.0.0"
    delivery = last["fileproxy-delivery"]
    assert delivery.startswith("/_fileproxy/tasks/"), last
    for _ in range(200):
        record = get_json(proxy.url + delivery)
        if record["status"] in ("completed", "failed"):
            break
        time.sleep(0.05)
    assert (record["status"], record["upstream_status"]) == ("completed", 200), record
    echoed = get_json(proxy.url + delivery + "/result")
    assert (echoed["method"], echoed["raw_path"]) == ("PUT", target)
    assert (echoed["body_sha256"], echoed["body_length"]) == (source.sha256, SIZE)
    assert ["Content-Type", FILETYPE] in echoed["headers"]
    request = urllib.request.Request(outcome["url"], method="HEAD", headers=TUS)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Upload-Offset"] == str(SIZE)
        assert response.headers["Fileproxy-Delivery-Status"] == "delivered"
        assert response.headers["Fileproxy-Upstream-Status"] == "200"
    time.sleep(0.3)  # a second delivery (another worker, a retry) would show by now
    events = [event for event in get_json(f"{origin}/_origin/events")["events"]
              if event["path"] == target]
    assert [(e["event"], e["received"], e["sha256"]) for e in events] == [
        ("body-complete", SIZE, source.sha256)], events


def test_tusjs_uploads_8mib_in_1mib_chunks(tusjs, deployed, origin_process, source):
    target = target_path()
    outcome = run_upload(tusjs, source, f"{deployed.url}/_fileproxy/uploads", target,
                         "--chunk-size", str(MIB))
    assert [method for method, *_ in outcome["requests"]] == ["POST"] + ["PATCH"] * 8
    assert outcome["url"].startswith(f"{deployed.url}/_fileproxy/uploads/")
    assert_delivered_once(deployed, origin_process, outcome, target, source)


def test_tusjs_uploads_data_during_creation(tusjs, deployed, origin_process, source):
    """creation-with-upload: the POST carries the first chunk, PATCHes the rest."""
    target = target_path()
    outcome = run_upload(tusjs, source, f"{deployed.url}/_fileproxy/uploads", target,
                         "--chunk-size", str(MIB), "--data-during-creation")
    assert outcome["requests"][0] == ["POST", 201, MIB], outcome
    assert outcome["firstPatchOffset"] == MIB
    assert [method for method, *_ in outcome["requests"]] == ["POST"] + ["PATCH"] * 7
    assert_delivered_once(deployed, origin_process, outcome, target, source)


def test_tusjs_aborts_then_a_new_process_resumes_the_previous_upload(
        tusjs, deployed, origin_process, source, tmp_path):
    """The first node process aborts after 3 MiB; a second one finds the upload by the file's
    fingerprint (findPreviousUploads, a FileUrlStorage shared by both) and continues it from
    the offset fileproxy kept (resumeFromPreviousUpload: HEAD, then PATCH from there)."""
    target, store = target_path(), str(tmp_path / "tus-urls.json")
    endpoint = f"{deployed.url}/_fileproxy/uploads"
    first = run_upload(tusjs, source, endpoint, target, "--chunk-size", str(MIB),
                       "--store", store, "--abort-after", str(3 * MIB))
    assert first["aborted"] and not first["ok"], first
    assert first["offset"] == 3 * MIB and first["url"], first
    second = run_upload(tusjs, source, endpoint, target, "--chunk-size", str(MIB),
                        "--store", store, "--resume")
    assert second["previousUploads"] == 1 and second["url"] == first["url"], second
    assert second["requests"][0] == ["HEAD", 200, 3 * MIB], second
    assert second["resumedFrom"] == second["firstPatchOffset"] == 3 * MIB, "not from 0"
    assert "POST" not in [method for method, *_ in second["requests"]], "no new upload"
    assert_delivered_once(deployed, origin_process, second, target, source)


def test_tusjs_uploads_to_the_endpoint_with_a_trailing_slash(tusjs, deployed, origin_process,
                                                             source):
    target = target_path()
    outcome = run_upload(tusjs, source, f"{deployed.url}/_fileproxy/uploads/", target,
                         "--chunk-size", str(MIB))
    assert outcome["url"].startswith(f"{deployed.url}/_fileproxy/uploads/")
    assert outcome["url"] != f"{deployed.url}/_fileproxy/uploads/"
    assert_delivered_once(deployed, origin_process, outcome, target, source)


def assert_ietf_delivered_once(origin: str, outcome: dict, target: str, source: Source) -> None:
    """The last PATCH was answered by the origin itself (the draft's completing request), and
    the origin got the file once, byte-exact, as the POST tus-js-client created it with."""
    assert outcome["ok"], outcome
    assert outcome["requests"][-1] == ["PATCH", 200, SIZE], outcome
    last = outcome["lastResponse"]["headers"]
    assert last["upload-complete"] == "?1" and last["upload-draft-interop-version"] == "6"
    assert last["content-type"].startswith("application/json")  # the echo origin's answer
    time.sleep(0.3)  # a second delivery (another worker, a retry) would show by now
    events = [event for event in get_json(f"{origin}/_origin/events")["events"]
              if event["path"] == target]
    assert [(e["event"], e["method"], e["received"], e["sha256"]) for e in events] == [
        ("body-complete", "POST", SIZE, source.sha256)], events


def test_tusjs_ietf_draft_straight_at_a_proxied_path(tusjs, deployed, origin_process, source):
    """protocol: 'ietf-draft-05' (interop version 6) with the proxied path as its endpoint:
    the POST creates the upload (Upload-Complete: ?0), PATCHes append, the last one gets the
    origin's own answer."""
    target = target_path()
    outcome = run_upload(tusjs, source, deployed.url + target, target, "--chunk-size", str(MIB),
                         "--protocol", "ietf-draft-05")
    assert outcome["requests"][0] == ["POST", 201, 0], outcome
    assert [method for method, *_ in outcome["requests"]] == ["POST"] + ["PATCH"] * 8
    assert outcome["url"].startswith(f"{deployed.url}/_fileproxy/uploads/")
    assert_ietf_delivered_once(origin_process, outcome, target, source)


def test_tusjs_ietf_draft_aborts_then_resumes(tusjs, deployed, origin_process, source,
                                              tmp_path):
    """The draft's resumption: a new process finds the upload, asks its offset (HEAD, 204)
    and appends from there."""
    target, store = target_path(), str(tmp_path / "tus-urls.json")
    options = ("--chunk-size", str(MIB), "--store", store, "--protocol", "ietf-draft-05")
    first = run_upload(tusjs, source, deployed.url + target, target, *options,
                       "--abort-after", str(3 * MIB))
    assert first["aborted"] and first["offset"] == 3 * MIB, first
    second = run_upload(tusjs, source, deployed.url + target, target, *options, "--resume")
    assert second["previousUploads"] == 1 and second["url"] == first["url"], second
    assert second["requests"][0] == ["HEAD", 204, 3 * MIB], second
    assert second["firstPatchOffset"] == 3 * MIB
    assert_ietf_delivered_once(origin_process, second, target, source)
