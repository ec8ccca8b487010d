"""Python client for fileproxy: async tasks (submit, status, wait, result, cancel) and resumable
downloads (after a drop, and across runs as `wget -c` does), sync and async, signed links
(sign_url), and a CLI (--sign-key ID=SECRET signs each request, valid for an hour):

    python -m fileproxy.client [--sign-key ID=SECRET] get URL -o FILE [--no-continue]
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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

import aiohttp

from fileproxy.config import parse_signing_key
from fileproxy.features.signing import signed_link

if TYPE_CHECKING:
    from tqdm import tqdm

FINAL = frozenset({"completed", "failed", "cancelled"})
# How long the links a client with a signing key makes work (each request gets a fresh one).
SIGNED_LINK_LIFETIME = 3600.0


def sign_url(url: str, key_id: str, secret: str, expires_in: float, method: str = "GET") -> str:
    """url signed for method (fp-expires, fp-key, fp-signature), working for expires_in seconds:
    what `fileproxy sign` prints, for paths under --require-signature."""
    return signed_link(url, key_id, secret, int(time.time() + expires_in), method)


class DownloadError(Exception):
    """The file could not be fetched whole within the retries."""


@dataclass
class TaskResult:
    status: int
    headers: dict[str, str]
    body: bytes


class AsyncClient:
    def __init__(self, base_url: str = "", *, admin_prefix: str = "/_fileproxy",
                 token: str | None = None, timeout: float = 60.0,
                 sign_key: tuple[str, str] | None = None) -> None:
        """sign_key: (id, secret) to sign every download and task submission with."""
        self.base_url = base_url.rstrip("/")
        self.admin_prefix = admin_prefix
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.sign_key = sign_key
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

    def signed(self, url: str, method: str) -> str:
        """url signed afresh when the client has a signing key, else url."""
        if self.sign_key is None:
            return url
        return sign_url(url, *self.sign_key, SIGNED_LINK_LIFETIME, method)

    # -- tasks

    async def submit(self, method: str, path: str, body: bytes | None = None,
                     headers: Mapping[str, str] | None = None) -> str:
        """Hand a request to fileproxy to run in the background; returns the task id."""
        sent = {**self.headers, **(headers or {}), "Prefer": "respond-async"}
        async with self.session.request(method, self.signed(self.base_url + path, method),
                                        data=body, headers=sent) as response:
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
                       progress: bool | None = None, resume: bool = True) -> int:
        """Stream url to dest, continuing a partial file (earlier run, dropped try); returns the size."""
        state = DownloadState(Path(dest), url)
        if resume:
            await asyncio.to_thread(state.restore)
        bar = ProgressBar(state.path.name, progress)
        try:
            await self._fetch_until_whole(state, bar, retries)
        finally:
            bar.close()
        return await asyncio.to_thread(state.finish)

    async def _fetch_until_whole(self, state: DownloadState, bar: ProgressBar, retries: int) -> None:
        """GET until a body ran to its end: drops are retried with backoff, a refused resume starts over."""
        attempt = 0
        while True:
            try:
                await self._fetch(state, bar)
                return
            except StartOver:
                state.forget()
            except RETRYABLE as error:
                if attempt == retries:
                    raise DownloadError(f"{state.url}: gave up after {retries} retries ({error})") from None
                await asyncio.sleep(min(10.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0))
                attempt += 1

    async def _fetch(self, state: DownloadState, bar: ProgressBar) -> None:
        """One GET: from where the trusted part of the file ends, or the whole object."""
        offset = await asyncio.to_thread(state.trusted_size)
        headers = {**self.headers, **state.range_headers(offset)}
        async with self.session.get(self.signed(state.url, "GET"), headers=headers) as response:
            start = state.start_of(response.status, response.headers, offset)
            if response.status == 416:  # the file was already whole
                bar.start(start, start)
                return
            state.learn(response, start)
            handle = await asyncio.to_thread(state.open_at, start)
            try:
                bar.start(start, state.total)
                async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                    await asyncio.to_thread(handle.write, chunk)  # (never on the loop)
                    bar.advance(len(chunk))
            finally:
                await asyncio.to_thread(handle.close)


RETRYABLE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)
CHUNK_SIZE = 256 * 1024
SIDECAR_SUFFIX = ".fileproxy-partial"


class StartOver(Exception):
    """The server did not continue the file where it ends: fetch the whole object again."""


@dataclass
class DownloadState:
    """A download's file and what vouches for its bytes (If-Range validator, total), kept in its sidecar."""

    path: Path
    url: str
    total: int | None = None
    validator: str | None = None  # strong ETag, or Last-Modified (see if_range_validator)

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + SIDECAR_SUFFIX)

    def restore(self) -> None:
        """Trust the file if its sidecar names this url, a strong validator and a size it does not exceed."""
        record = read_sidecar(self.sidecar)
        if record is None or not self.path.exists():
            return
        validator, size = record.get("validator"), record.get("size")
        if (record.get("url") != self.url or not isinstance(validator, str)
                or not validator or validator.startswith("W/")):
            return
        if size is not None and (not isinstance(size, int) or self.path.stat().st_size > size):
            return
        self.validator, self.total = validator, size

    def forget(self) -> None:
        """Stop trusting the file: the next request fetches the whole object."""
        self.validator = self.total = None

    def trusted_size(self) -> int:
        """Bytes of the file the validator vouches for: all of them, or none without one."""
        if self.validator is None:
            return 0
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def range_headers(self, offset: int) -> dict[str, str]:
        """Range + If-Range to continue at offset (none at 0: the whole object is wanted)."""
        if not offset or self.validator is None:
            return {}
        return {"Range": f"bytes={offset}-", "If-Range": self.validator}

    def start_of(self, status: int, headers: Mapping[str, str], offset: int) -> int:
        """Where the body goes: offset (a 206 continuing the file, a 416 as it is whole) or 0 (a 200)."""
        # Any other answer to a range (another start, size or object) starts over; other statuses fail.
        if status == 200:
            return 0
        if offset and status == 206 and self.continues(headers, offset):
            return offset
        if offset and status == 416 and self.is_whole(headers, offset):
            return offset
        if offset and status in (206, 416):
            raise StartOver
        raise DownloadError(f"{self.url}: HTTP {status}")

    def continues(self, headers: Mapping[str, str], offset: int) -> bool:
        """The 206 starts at offset, of the same total size and (if it says) the same object."""
        first, total = parse_content_range(headers.get("Content-Range", ""))
        same_size = self.total is None or total == self.total
        same_object = if_range_validator(headers) in (None, self.validator)
        return first == offset and same_size and same_object

    def is_whole(self, headers: Mapping[str, str], offset: int) -> bool:
        """The 416's Content-Range and the stored size (those known, one at least) end at offset."""
        reported = parse_content_range(headers.get("Content-Range", ""))[1]
        known = [size for size in (reported, self.total) if size is not None]
        return bool(known) and all(size == offset for size in known)

    def learn(self, response: aiohttp.ClientResponse, start: int) -> None:
        """Take the validator and the total size from a response whose body goes at start."""
        # (A 206 without a validator of its own continues the object whose validator it matched.)
        self.validator = if_range_validator(response.headers) or (self.validator if start else None)
        total = parse_content_range(response.headers.get("Content-Range", ""))[1]
        if total is not None:
            self.total = total
        elif response.content_length is not None:
            self.total = start + response.content_length
        else:
            self.total = None

    def open_at(self, start: int) -> BinaryIO:
        """Open the file for a body at start (0 truncates it), then write the sidecar for the new body."""
        # In this order, a sidecar never vouches for an older object's bytes.
        handle = open(self.path, "ab" if start else "wb")  # noqa: SIM115 (closed by the caller)
        try:
            self.save()
        except BaseException:
            handle.close()
            raise
        return handle

    def save(self) -> None:
        """Write the sidecar (url, validator, size) atomically, or remove it without a validator."""
        if self.validator is None:
            self.sidecar.unlink(missing_ok=True)
            return
        record = {"url": self.url, "validator": self.validator, "size": self.total}
        temporary = self.sidecar.with_name(self.sidecar.name + ".tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self.sidecar)

    def finish(self) -> int:
        """Check the file's size against the total, remove the sidecar and return the size."""
        size = self.path.stat().st_size
        if self.total is not None and size != self.total:
            raise DownloadError(f"{self.url}: got {size} bytes of {self.total}")
        self.sidecar.unlink(missing_ok=True)
        return size


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's record, or None when it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def if_range_validator(headers: Mapping[str, str]) -> str | None:
    """What If-Range may carry (RFC 9110 13.1.5): a strong ETag, else a strong Last-Modified, else None."""
    # A weak ETag rules out Last-Modified too: "unless the client has no entity tag".
    etag = headers.get("ETag")
    if etag:
        return None if etag.startswith("W/") else etag
    modified = headers.get("Last-Modified")
    return modified if modified and is_strong_date(modified, headers.get("Date")) else None


def is_strong_date(modified: str, date: str | None) -> bool:
    """A Last-Modified is a strong validator when the response's Date is a second or more later."""
    if date is None:
        return True
    try:
        return parsedate_to_datetime(date) - parsedate_to_datetime(modified) >= timedelta(seconds=1)
    except (TypeError, ValueError):
        return False


def parse_content_range(value: str) -> tuple[int | None, int | None]:
    """'bytes 10-19/100' -> (10, 100); 'bytes */100' -> (None, 100); unknown parts are None."""
    unit, _, rest = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None, None
    span, _, total = rest.partition("/")
    first = span.partition("-")[0].strip()
    return (int(first) if first.isdigit() else None, int(total) if total.strip().isdigit() else None)


class ProgressBar:
    """A tqdm bar on stderr (if wanted; by default on a terminal), made at the first response's offset."""

    def __init__(self, name: str, wanted: bool | None) -> None:
        self.name = name
        self.wanted = wanted is True or (wanted is None and sys.stderr.isatty())
        self.bar: tqdm[NoReturn] | None = None

    def start(self, offset: int, total: int | None) -> None:
        """Show a body that starts at offset: a new bar, or the bar moved there after a drop."""
        if not self.wanted:
            return
        if self.bar is None:
            self.bar = progress_bar(self.name, offset, total)
        else:
            self.bar.reset(total=total)
            self.bar.update(offset)

    def advance(self, count: int) -> None:
        """Count bytes written."""
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        """End the bar's line."""
        if self.bar is not None:
            self.bar.close()


def progress_bar(name: str, offset: int, total: int | None) -> tqdm[NoReturn]:
    """A tqdm bar on stderr that starts at offset and, when that is past 0, says it resumed there."""
    from tqdm import tqdm

    description = f"{name} (resumed at {format_size(offset)})" if offset else name
    return tqdm(desc=description, initial=offset, total=total, unit="B", unit_scale=True,
                unit_divisor=1024, file=sys.stderr)


def format_size(count: int) -> str:
    """12582912 -> '12.0 MiB' (binary units)."""
    if count < 1024:
        return f"{count} B"
    size = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


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


def build_parser() -> argparse.ArgumentParser:
    """The command line: get, submit, wait."""
    parser = argparse.ArgumentParser(prog="python -m fileproxy.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token", help="admin bearer token, if the proxy wants one")
    parser.add_argument("--sign-key", metavar="ID=SECRET", type=signing_key,
                        help="sign each download and submission with this key (signed links)")
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("get", help="download, resuming after drops and where an earlier run stopped")
    get.add_argument("url")
    get.add_argument("-o", "--output", required=True)
    get.add_argument("--retries", type=int, default=10)
    get.add_argument("--no-continue", dest="resume", action="store_false",
                     help="start over even if an earlier run left a partial OUTPUT")
    submit = commands.add_parser("submit", help="hand a request over as an async task")
    submit.add_argument("--base", required=True, help="fileproxy's URL, e.g. http://host:8080")
    submit.add_argument("method")
    submit.add_argument("path")
    submit.add_argument("--data", help="file to send as the body")
    wait = commands.add_parser("wait", help="wait for a task and print its record")
    wait.add_argument("--base", required=True)
    wait.add_argument("task_id")
    wait.add_argument("--timeout", type=float, default=3600)
    return parser


def signing_key(text: str) -> tuple[str, str]:
    """--sign-key ID=SECRET as (id, secret)."""
    try:
        key_id, _, secret = parse_signing_key(text).partition("=")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return key_id, secret


def main(argv: list[str] | None = None) -> int:
    """Run one command; a download that could not be completed exits with 1."""
    args = build_parser().parse_args(argv)
    with Client(getattr(args, "base", ""), token=args.token, sign_key=args.sign_key) as client:
        if args.command == "get":
            try:
                print(client.download(args.url, args.output, retries=args.retries, resume=args.resume))
            except DownloadError as error:
                print(f"fileproxy.client get: {error}", file=sys.stderr)
                return 1
        elif args.command == "submit":
            body = Path(args.data).read_bytes() if args.data else None
            print(client.submit(args.method.upper(), args.path, body=body))
        else:
            print(json.dumps(client.wait(args.task_id, timeout=args.timeout), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
