"""Upload clients for the resumable-upload benchmark; they run in the client namespace while the
harness cuts their connections from outside (`ss -K`, as a link that drops would).

    python -m benchmarks.cutclient tus  PROXY_URL FILE TARGET --deadline 3600
    python -m benchmarks.cutclient tusjs PROXY_URL FILE TARGET --deadline 3600 [--ietf]
    python -m benchmarks.cutclient put  URL FILE --deadline 600

`tus` is the tuspy client (what tus users run): after a cut it asks for the stored offset (HEAD)
and PATCHes on from there. `tusjs` is tus-js-client under node (tests/js/upload.mjs), tus 1.0 at
the upload endpoint or, with --ietf, the IETF draft (interop version 6) straight at TARGET on the
proxy. `put` can only start the whole PUT again. Prints one JSON line: completed, seconds,
attempts, and for PUT the most bytes one attempt got out before its cut.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError
from tusclient.request import TusRequest
from tusclient.uploader import Uploader

CHUNK = 8 * 1024 * 1024  # bytes per PATCH; a cut mid-PATCH keeps what the proxy stored
JS_DIR = Path(__file__).resolve().parent.parent / "tests" / "js"
# tus-js-client's waits before retrying (ms); it starts the list again once an upload moves on.
TUSJS_RETRY_DELAYS = "0,1000,1000,2000,3000,5000,5000,5000,5000,5000"


class CountingUploader(Uploader):
    """tuspy's uploader, counting its PATCH attempts and keeping the last answer's headers."""

    attempts = 0

    def _do_request(self) -> None:
        self.attempts += 1
        super()._do_request()

    @property
    def last_request(self) -> TusRequest | None:
        """The last PATCH: tuspy's `request`, typed here since mypy takes its type from tuspy's
        `self.request = None` in __init__. None before the first PATCH, and for an empty file."""
        return self.request


def tus_upload(base: str, path: Path, target: str, deadline: float) -> dict[str, object]:
    started = time.monotonic()
    uploader = CountingUploader(file_path=str(path), client=TusClient(f"{base}/_fileproxy/uploads"),
                                chunk_size=CHUNK, metadata={"target": target},
                                retries=100_000, retry_delay=1)
    done = threading.Event()

    def run() -> None:
        while time.monotonic() - started < deadline:
            try:
                uploader.upload()
                done.set()
                return
            except TusCommunicationError:
                time.sleep(1)

    threading.Thread(target=run, daemon=True).start()
    completed = done.wait(deadline)
    result: dict[str, object] = {"completed": completed,
                                 "seconds": round(time.monotonic() - started, 1),
                                 "attempts": uploader.attempts}
    if completed:
        request = uploader.last_request
        if request is None:
            raise RuntimeError("tus: the upload completed without a PATCH, so there is no answer "
                               "to read its fileproxy-delivery header from")
        delivery = request.response_headers.get("fileproxy-delivery", "")
        result["intact"] = delivered_intact(base + delivery, path)
    return result


def tusjs_upload(base: str, path: Path, target: str, deadline: float,
                 ietf: bool) -> dict[str, object]:
    """One tus-js-client upload (its own retries resume it after every cut)."""
    started = time.monotonic()
    endpoint = base + target if ietf else f"{base}/_fileproxy/uploads"
    command = [shutil.which("node") or "node", "upload.mjs", "--file", str(path),
               "--endpoint", endpoint, "--target", target, "--timeout", str(int(deadline)),
               "--retry-delays", TUSJS_RETRY_DELAYS,
               "--protocol", "ietf-draft-05" if ietf else "tus-v1"]
    done = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True,
                          timeout=deadline + 60, check=False)
    lines = done.stdout.strip().splitlines()
    if not lines:
        return {"completed": False, "error": done.stderr[-300:]}
    outcome = json.loads(lines[-1])
    result: dict[str, object] = {
        "completed": bool(outcome["ok"]), "seconds": round(time.monotonic() - started, 1),
        "attempts": outcome["patchesSent"]}
    if outcome["ok"]:
        delivery = outcome["lastResponse"]["headers"].get("fileproxy-delivery", "")
        result["intact"] = delivered_intact(base + delivery, path)
    else:
        result["error"] = outcome.get("error")
    return result


def delivered_intact(delivery_url: str, path: Path) -> bool:
    """Did the upstream receive the file byte-exact? (The test origin's echo reports a hash.)"""
    for _ in range(600):
        if get_json(delivery_url)["status"] in ("completed", "failed"):
            break
        time.sleep(0.5)
    return get_json(delivery_url + "/result").get("body_sha256") == file_sha256(path)


def get_json(url: str) -> dict[str, object]:
    """GET, asked again when a cut interrupts it."""
    for _ in range(100):
        try:
            return requests.get(url, timeout=30).json()
        except requests.RequestException:
            time.sleep(1)
    raise RuntimeError(f"no answer from {url}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def put_upload(url: str, path: Path, deadline: float) -> dict[str, object]:
    started, attempts, most_sent = time.monotonic(), 0, 0
    while time.monotonic() - started < deadline:
        attempts += 1
        with open(path, "rb") as handle:
            try:
                reply = requests.put(url, data=handle, timeout=(30, deadline))
                reply.raise_for_status()
            except requests.RequestException:
                most_sent = max(most_sent, handle.tell())  # read for sending; an upper bound
                time.sleep(1)
                continue
        return {"completed": True, "seconds": round(time.monotonic() - started, 1),
                "attempts": attempts, "intact": reply.json().get("body_sha256") == file_sha256(path)}
    return {"completed": False, "seconds": round(time.monotonic() - started, 1),
            "attempts": attempts, "most_bytes_sent": most_sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("tus", "tusjs", "put"))
    parser.add_argument("url")
    parser.add_argument("file")
    parser.add_argument("target", nargs="?", default="/upload/cut")
    parser.add_argument("--deadline", type=float, default=900.0)
    parser.add_argument("--ietf", action="store_true", help="tusjs: the IETF draft")
    args = parser.parse_args()
    path = Path(args.file)
    if args.mode == "tus":
        result = tus_upload(args.url, path, args.target, args.deadline)
    elif args.mode == "tusjs":
        result = tusjs_upload(args.url, path, args.target, args.deadline, args.ietf)
    else:
        result = put_upload(args.url, path, args.deadline)
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
