"""A raw TCP origin for shapes aiohttp will not produce: bare responses, closes mid-keep-alive."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RawRequest:
    head: bytes
    body: bytes
    connection: int  # 1 for the first connection the server accepted
    number: int  # 1 for the first request on its connection


# Called with the request head (its body is read after): bytes to answer, or None to close the
# connection without answering (the keep-alive race).
Responder = Callable[[RawRequest], "bytes | None"]


class RawServer:
    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[RawRequest] = []
        self.connections = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection, number = self.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                number += 1
                request = RawRequest(head, b"", connection, number)
                self.requests.append(request)
                answer = self.respond(request)
                if answer is None:
                    break
                if re.search(rb"(?i)\r\nexpect:\s*100-continue", head):
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.body = await read_body(reader, head)
                writer.write(answer)
                await writer.drain()
                if re.search(rb"(?i)\r\nconnection:\s*close", answer.partition(b"\r\n\r\n")[0]):
                    break  # as a server must after announcing it
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if length:
        return await reader.readexactly(int(length.group(1)))
    if re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return body
    return b""
