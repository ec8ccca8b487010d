"""Spool files for tasks and uploads whose every disk operation runs in a worker thread
(asyncio.to_thread): a slow disk or an fsync never stalls the event loop's other transfers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, cast

READ_SIZE = 256 * 1024


class SpoolFile:
    """An open binary file; each call is one trip to the default thread pool."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    @classmethod
    async def open(cls, path: Path, mode: str) -> SpoolFile:
        return cls(await asyncio.to_thread(open_file, path, mode))

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._handle.write, data)

    async def read(self, size: int = READ_SIZE) -> bytes:
        return await asyncio.to_thread(self._handle.read, size)

    async def seek(self, offset: int) -> None:
        await asyncio.to_thread(self._handle.seek, offset)

    async def truncate(self, size: int) -> None:
        await asyncio.to_thread(self._handle.truncate, size)

    async def sync(self) -> None:
        """Flushed and fsync'd: the bytes are on disk."""
        await asyncio.to_thread(flush_and_sync, self._handle)

    async def close(self) -> None:
        await asyncio.to_thread(self._handle.close)


def open_file(path: Path, mode: str) -> BinaryIO:
    if "w" in mode:
        path.parent.mkdir(parents=True, exist_ok=True)
    return cast(BinaryIO, open(path, mode))  # (SpoolFile.close() closes it)


def flush_and_sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


async def read_chunks(path: Path) -> AsyncIterator[bytes]:
    """A spooled file's bytes, read in a worker thread."""
    spooled = await SpoolFile.open(path, "rb")
    try:
        while chunk := await spooled.read():
            yield chunk
    finally:
        await spooled.close()


async def create_empty(path: Path) -> None:
    def create() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    await asyncio.to_thread(create)


async def remove(*paths: Path) -> None:
    def unlink() -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    await asyncio.to_thread(unlink)
