"""tus-js-client's browser bundle in headless Chromium, uploading through fileproxy from a page on
another origin: what --cors-origin is for.

The page (tests/js/browser/) is served by an aiohttp server on its own loopback port, so its
origin (http://127.0.0.1:P) is not the proxy's (http://127.0.0.1:Q): every tus request is
cross-origin and preflighted, and the page reads tus's headers only when the proxy exposes them.
The page uploads a Blob, HEADs the upload's URL, and POSTs what it saw to /result."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web

from tests.conftest import ROOT, ProxyFactory, Served, serve


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("Chromium is needed for the browser upload tests (apt-get install chromium; "
                ".ci/run does)", allow_module_level=True)

# node, npm and tus-js-client: the session fixture of the node interop tests (which skip this
# module, in one line, when node or npm is missing).
from tests.test_tusjs import JS_DIR, tusjs  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("tusjs")

PAGE_DIR = ROOT / "tests" / "js" / "browser"
BUNDLE = JS_DIR / "node_modules" / "tus-js-client" / "dist" / "tus.min.js"
MIB = 1024 * 1024
SIZE = 4 * MIB
RESULT_TIMEOUT = 60.0


def page_bytes(size: int) -> bytes:
    """What the page uploads: byte i is i % 251 (as upload.js builds its Blob)."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


@dataclass
class PageServer:
    """The page's own origin; `result` is the outcome the page POSTs to /result."""

    served: Served
    result: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def origin(self) -> str:
        return self.served.url

    def page_url(self, proxy: str, target: str) -> str:
        query = urlencode({"proxy": proxy, "size": SIZE, "target": target, "chunk": MIB})
        return f"{self.origin}/?{query}"


@pytest.fixture
async def page_server() -> AsyncIterator[PageServer]:
    app = web.Application()
    page: PageServer | None = None

    async def result(request: web.Request) -> web.Response:
        assert page is not None
        if not page.result.done():
            page.result.set_result(await request.json())
        return web.json_response({"received": True})

    def static(path: Path, content_type: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
        async def handler(request: web.Request) -> web.FileResponse:
            return web.FileResponse(path, headers={"Content-Type": content_type,
                                                   "Cache-Control": "no-store"})
        return handler

    app.router.add_get("/", static(PAGE_DIR / "upload.html", "text/html; charset=utf-8"))
    app.router.add_get("/upload.js", static(PAGE_DIR / "upload.js", "text/javascript"))
    app.router.add_get("/tus.min.js", static(BUNDLE, "text/javascript"))
    app.router.add_post("/result", result)
    page = PageServer(await serve(web.AppRunner(app, access_log=None)))
    yield page
    assert page.served.runner is not None
    await page.served.runner.cleanup()


@dataclass
class Browser:
    process: subprocess.Popen[bytes]
    log: Path  # Chromium's stderr (--enable-logging=stderr): the page's console is in it too

    def console(self) -> list[str]:
        """What the page's console showed (CORS refusals among it)."""
        return [line for line in self.log_lines() if ":CONSOLE" in line]

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def log_excerpt(self) -> str:
        """For failure messages: the console, then the last lines that are not D-Bus noise
        (a container has no system bus)."""
        quiet = [line for line in self.log_lines() if "dbus" not in line]
        return "\n".join(["console:", *self.console(), "last lines:", *quiet[-15:]])


def kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)  # its own session: the group is Chromium and its children
    except ProcessLookupError:
        pass


def open_page(url: str, directory: Path) -> Browser:
    log = directory / "chromium.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu",
             f"--user-data-dir={directory / 'profile'}", "--no-first-run",
             "--disable-dev-shm-usage", "--enable-logging=stderr", url],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)
    return Browser(process, log)


async def close(browser: Browser) -> None:
    kill_group(browser.process, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while browser.process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    kill_group(browser.process, signal.SIGKILL)  # whatever is left of the group
    if browser.process.poll() is None:
        browser.process.wait(5)


async def outcome_of(page: PageServer, proxy: Served, target: str,
                     directory: Path) -> tuple[dict[str, Any], Browser]:
    """Chromium opens the page; the outcome it reports (bounded), and the browser, gone by then."""
    browser = open_page(page.page_url(proxy.url, target), directory)
    try:
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not page.result.done():
            if browser.process.poll() is not None:
                pytest.fail(f"Chromium exited ({browser.process.returncode}) before the page "
                            f"reported:\n{browser.log_excerpt()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the page reported nothing within {RESULT_TIMEOUT:.0f} s:\n"
                            f"{browser.log_excerpt()}")
            await asyncio.wait({page.result}, timeout=0.2)
        return page.result.result(), browser
    finally:
        await close(browser)


async def body_completes(origin: Served, target: str, *, within: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if events := [e for e in origin.events("body-complete") if e["path"] == target]:
            return events
        await asyncio.sleep(0.05)
    return []


def target_path() -> str:
    return f"/echo/browser/{uuid.uuid4().hex}"


async def test_chromium_uploads_cross_origin_with_cors(
        origin: Served, make_proxy: ProxyFactory, page_server: PageServer, tmp_path: Path) -> None:
    proxy = await make_proxy(origin.url, cors_origin=(page_server.origin,), upload_delivery_wait=0)
    assert proxy.url != page_server.origin
    target = target_path()

    outcome, browser = await outcome_of(page_server, proxy, target, tmp_path)

    assert outcome["ok"], f"{outcome}\n{browser.log_excerpt()}"
    assert outcome["url"].startswith(f"{proxy.url}/_fileproxy/uploads/"), outcome
    # tus-js-client itself reads Location and Upload-Offset: both exposed, or no upload at all.
    assert outcome["requests"] == [["POST", 201, None]] + [
        ["PATCH", 204, str(offset)] for offset in range(MIB, SIZE + 1, MIB)], outcome
    head = outcome["head"]
    assert head["status"] == 200, outcome
    assert head["headers"].get("upload-offset", "") == str(SIZE), outcome
    assert head["headers"].get("upload-length", "") == str(SIZE), outcome
    assert head["headers"].get("fileproxy-delivery-status", "") in ("pending", "delivered"), outcome
    assert head["headers"].get("fileproxy-delivery", "").startswith("/_fileproxy/tasks/"), outcome

    assert await body_completes(origin, target, within=10), origin.events()
    await asyncio.sleep(0.3)  # a second delivery would show by now
    events = [e for e in origin.events("body-complete") if e["path"] == target]
    expected = hashlib.sha256(page_bytes(SIZE)).hexdigest()
    assert [(e["received"], e["sha256"]) for e in events] == [(SIZE, expected)], events


async def test_chromium_upload_fails_without_cors(
        origin: Served, make_proxy: ProxyFactory, page_server: PageServer, tmp_path: Path) -> None:
    """The same page, a proxy without --cors-origin: the browser refuses the first preflight."""
    proxy = await make_proxy(origin.url, upload_delivery_wait=0)
    target = target_path()

    outcome, browser = await outcome_of(page_server, proxy, target, tmp_path)

    assert not outcome["ok"] and outcome["stage"] == "upload", outcome
    assert "failed to create upload" in outcome["error"], outcome
    assert outcome["requests"] == [], outcome  # no response ever reached the page
    refusal = (f"from origin '{page_server.origin}' has been blocked by CORS policy: Response to "
               f"preflight request doesn't pass access control check: No "
               f"'Access-Control-Allow-Origin' header")
    assert any(refusal in line for line in browser.console()), browser.log_excerpt()
    assert origin.events() == [], origin.events()
