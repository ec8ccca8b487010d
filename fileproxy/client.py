"""Python client for fileproxy: async tasks (submit, status, wait, result, cancel) and resumable
downloads, sync and async, and a CLI:

    python -m fileproxy.client get URL -o FILE
    python -m fileproxy.client submit --base URL METHOD PATH [--data FILE]
    python -m fileproxy.client wait --base URL TASK_ID [--timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

FINAL = frozenset({"completed", "failed", "cancelled"})


class DownloadError(Exception):
    """The file could not be fetched whole within the retries."""


@dataclass
class TaskResult:
    status: int
    headers: dict[str, str]
    body: bytes


class AsyncClient:
    def __init__(self, base_url: str = "", *, admin_prefix: str = "/_fileproxy",
                 token: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.admin_prefix = admin_prefix
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def task_url(self, task_id: str, suffix: str = "") -> str:
        return f"{self.base_url}{self.admin_prefix}/tasks/{task_id}{suffix}"

    # -- tasks

    async def submit(self, method: str, path: str, body: bytes | None = None,
                     headers: Mapping[str, str] | None = None) -> str:
        """Hand a request to fileproxy to run in the background; returns the task id."""
        sent = {**self.headers, **(headers or {}), "Prefer": "respond-async"}
        async with self.session.request(method, self.base_url + path, data=body,
                                        headers=sent) as response:
            if response.status != 202:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                  message=await response.text())
            return str((await response.json())["task_id"])

    async def status(self, task_id: str) -> dict[str, Any]:
        async with self.session.get(self.task_url(task_id), headers=self.headers) as response:
            response.raise_for_status()
            return dict(await response.json())

    async def wait(self, task_id: str, timeout: float = 3600.0, poll: float = 0.2,
                   max_poll: float = 5.0) -> dict[str, Any]:
        """Poll (backing off to max_poll) until the task is final; TimeoutError after timeout."""
        async with asyncio.timeout(timeout):
            while True:
                record = await self.status(task_id)
                if record["status"] in FINAL:
                    return record
                await asyncio.sleep(poll)
                poll = min(max_poll, poll * 1.5)

    async def result(self, task_id: str) -> TaskResult:
        async with self.session.get(self.task_url(task_id, "/result"),
                                    headers=self.headers) as response:
            if response.status == 409:
                raise RuntimeError(f"task {task_id} is not completed: {await response.text()}")
            return TaskResult(response.status, dict(response.headers), await response.read())

    async def cancel(self, task_id: str) -> dict[str, Any]:
        async with self.session.delete(self.task_url(task_id), headers=self.headers) as response:
            response.raise_for_status()
            return dict(await response.json())

    # -- downloads

    async def download(self, url: str, dest: str | os.PathLike[str], *, retries: int = 10,
                       progress: bool | None = None) -> int:
        """Stream url to dest; after a dropped connection resume with Range + If-Range (from
        where the file ends), backing off between tries; verify the final size."""
        path = Path(dest)
        state = DownloadState(path)
        bar = progress_bar(path.name, progress)
        for attempt in range(retries + 1):
            try:
                if await self._fetch(url, state, bar):
                    break
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                    TimeoutError) as error:
                if attempt == retries:
                    raise DownloadError(f"{url}: gave up after {retries} retries ({error})") from None
                await asyncio.sleep(min(10.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0))
        if bar is not None:
            bar.close()
        size = path.stat().st_size
        if state.total is not None and size != state.total:
            raise DownloadError(f"{url}: got {size} bytes of {state.total}")
        return size

    async def _fetch(self, url: str, state: DownloadState, bar: Any) -> bool:
        headers = dict(self.headers)
        have = state.path.stat().st_size if state.path.exists() else 0
        if have and state.validator:
            headers.update({"Range": f"bytes={have}-", "If-Range": state.validator})
        async with self.session.get(url, headers=headers) as response:
            if response.status == 416 and state.total == have:
                return True
            if response.status not in (200, 206):
                raise DownloadError(f"{url}: HTTP {response.status}")
            append = response.status == 206
            state.learn(response, have if append else 0)
            if bar is not None:
                bar.reset(total=state.total)
                bar.update(have if append else 0)
            with open(state.path, "ab" if append else "wb") as handle:
                async for chunk in response.content.iter_chunked(256 * 1024):
                    handle.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        return True


@dataclass
class DownloadState:
    path: Path
    total: int | None = None
    validator: str | None = None  # ETag (or Last-Modified) for If-Range

    def learn(self, response: aiohttp.ClientResponse, offset: int) -> None:
        self.validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        content_range = response.headers.get("Content-Range", "")
        if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
            self.total = int(content_range.rsplit("/", 1)[1])
        elif response.content_length is not None:
            self.total = offset + response.content_length


def progress_bar(name: str, wanted: bool | None) -> Any:
    if wanted is False or (wanted is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


class Client:
    """The same calls, blocking: each runs on a private event loop."""

    def __init__(self, base_url: str = "", **kwargs: Any) -> None:
        self._runner = asyncio.Runner()
        self._async = AsyncClient(base_url, **kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._async.close())
        self._runner.close()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._async, name)
        return lambda *args, **kwargs: self._runner.run(method(*args, **kwargs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fileproxy.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token", help="admin bearer token, if the proxy wants one")
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("get", help="download, resuming after drops")
    get.add_argument("url")
    get.add_argument("-o", "--output", required=True)
    get.add_argument("--retries", type=int, default=10)
    submit = commands.add_parser("submit", help="hand a request over as an async task")
    submit.add_argument("--base", required=True, help="fileproxy's URL, e.g. http://host:8080")
    submit.add_argument("method")
    submit.add_argument("path")
    submit.add_argument("--data", help="file to send as the body")
    wait = commands.add_parser("wait", help="wait for a task and print its record")
    wait.add_argument("--base", required=True)
    wait.add_argument("task_id")
    wait.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    with Client(getattr(args, "base", ""), token=args.token) as client:
        if args.command == "get":
            print(client.download(args.url, args.output, retries=args.retries))
        elif args.command == "submit":
            body = Path(args.data).read_bytes() if args.data else None
            print(client.submit(args.method.upper(), args.path, body=body))
        else:
            print(json.dumps(client.wait(args.task_id, timeout=args.timeout), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
