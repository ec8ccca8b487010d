"""An upload client whose connection is cut every N seconds (as on a link that drops), for the
resumable-upload benchmark; it runs in the client namespace.

    python -m benchmarks.cutclient tus  PROXY_URL FILE TARGET --cut-every 30 --deadline 900
    python -m benchmarks.cutclient put  URL FILE --cut-every 30 --deadline 900

`tus` creates an upload and PATCHes from the stored offset after every cut (HEAD tells where);
`put` can only start the whole PUT again. Prints one JSON line: completed, seconds, attempts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import time
from pathlib import Path

import aiohttp

TUS = {"Tus-Resumable": "1.0.0"}


async def attempt(coro: object, seconds: float) -> bool:
    """Run one attempt; the cut is the attempt being abandoned (its connection closed)."""
    try:
        async with asyncio.timeout(seconds):
            await coro  # type: ignore[misc]
        return True
    except (TimeoutError, aiohttp.ClientError):
        return False


async def tus_upload(base: str, path: Path, target: str, cut_every: float,
                     deadline: float) -> dict[str, object]:
    size = path.stat().st_size
    delivery: list[str] = []
    meta = "target " + base64.b64encode(target.encode()).decode()
    started, attempts = time.monotonic(), 0
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/_fileproxy/uploads", headers={
                **TUS, "Upload-Length": str(size), "Upload-Metadata": meta}) as response:
            url = base + response.headers["Location"]
        while time.monotonic() - started < deadline:
            attempts += 1
            async with session.head(url, headers=TUS) as response:
                offset = int(response.headers["Upload-Offset"])
            if offset == size:
                return {"completed": True, "seconds": round(time.monotonic() - started, 1),
                        "attempts": attempts - 1,
                        "intact": await delivered_intact(session, base, delivery, path)}

            async def send(offset: int = offset) -> None:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    async with session.patch(url, data=handle, headers={
                            **TUS, "Upload-Offset": str(offset),
                            "Content-Type": "application/offset+octet-stream"}) as reply:
                        reply.raise_for_status()
                        delivery.append(reply.headers.get("Fileproxy-Delivery", ""))

            await attempt(send(), cut_every)
    return {"completed": False, "seconds": round(time.monotonic() - started, 1),
            "attempts": attempts}


async def delivered_intact(session: aiohttp.ClientSession, base: str, delivery: list[str],
                           path: Path) -> bool:
    """Did the upstream receive the file byte-exact? (The test origin's echo reports a hash.)"""
    url = base + next(d for d in reversed(delivery) if d)
    for _ in range(600):
        async with session.get(url) as response:
            if (await response.json())["status"] in ("completed", "failed"):
                break
        await asyncio.sleep(0.5)
    async with session.get(url + "/result") as response:
        return (await response.json()).get("body_sha256") == file_sha256(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def put_upload(url: str, path: Path, cut_every: float, deadline: float
                     ) -> dict[str, object]:
    started, attempts = time.monotonic(), 0
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < deadline:
            attempts += 1

            answer: list[dict[str, object]] = []

            async def send(answer: list[dict[str, object]] = answer) -> None:
                with open(path, "rb") as handle:
                    async with session.put(url, data=handle) as reply:
                        reply.raise_for_status()
                        answer.append(await reply.json())

            if await attempt(send(), cut_every):
                return {"completed": True, "seconds": round(time.monotonic() - started, 1),
                        "attempts": attempts,
                        "intact": answer[0].get("body_sha256") == file_sha256(path)}
    return {"completed": False, "seconds": round(time.monotonic() - started, 1),
            "attempts": attempts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("tus", "put"))
    parser.add_argument("url")
    parser.add_argument("file")
    parser.add_argument("target", nargs="?", default="/upload/cut")
    parser.add_argument("--cut-every", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=900.0)
    args = parser.parse_args()
    path = Path(args.file)
    if args.mode == "tus":
        result = asyncio.run(tus_upload(args.url, path, args.target, args.cut_every,
                                        args.deadline))
    else:
        result = asyncio.run(put_upload(args.url, path, args.cut_every, args.deadline))
    print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
