"""Raw HTTP/1.1 over asyncio streams, for tests where a library client would hide the
fault: requests written byte for byte, answers read as the server framed them.

Every read has a guard timeout (GUARD_S) so that a broken server fails a test instead of
hanging it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any

#: Longest a single network read may take before the test fails instead of hanging.
GUARD_S = 5.0


class RawServer:
    """A raw-socket server on 127.0.0.1, on a port of the kernel's choosing (`port`, once
    started; over TLS with `context`): a subclass answers each connection in `_handle`.
    `stop` closes the listener and aborts every connection still open."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.port = 0
        self._context = context
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0,
                                                  ssl=self._context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await self._handle(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class Reply:
    version: str
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    chunks: list[bytes] | None = None  # the chunks of a chunked body, in order

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The OpenAI-shaped error of this reply (asserting the shape)."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        doc = self.json()
        assert set(doc) == {"error"}, doc
        assert {"message", "type", "param", "code"} <= set(doc["error"]), doc
        assert isinstance(doc["error"]["message"], str) and doc["error"]["message"], doc
        return dict(doc["error"])

    def text(self) -> str:
        """The content of a streamed chat answer."""
        text = ""
        for line in self.body.split(b"\n"):
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
        return text


def build(method: str, path: str, body: bytes = b"", *, version: str = "HTTP/1.1",
          headers: dict[str, str] | None = None, length: bool = True) -> bytes:
    """A request's bytes; Host is added, and Content-Length for a body unless `length`
    is False."""
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    all_headers = dict(headers or {})
    if body and length:
        all_headers.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chat(prompt: str = "hello", *, stream: bool = False, **extra: Any) -> bytes:
    return json.dumps({"model": "auto", "messages": [{"role": "user", "content": prompt}],
                       "stream": stream, **extra}).encode()


def post_chat(prompt: str = "hello", *, stream: bool = False, version: str = "HTTP/1.1",
              headers: dict[str, str] | None = None) -> bytes:
    return build("POST", "/v1/chat/completions", chat(prompt, stream=stream), version=version,
                 headers={"Content-Type": "application/json", **(headers or {})})


async def read_reply(reader: asyncio.StreamReader, *, head: bool = False) -> Reply:
    """One response (an interim 1xx too) as framed by the server."""
    async with asyncio.timeout(GUARD_S):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            assert key not in headers, f"header {key!r} sent twice"
            headers[key] = value.strip()
        code = int(status)
        if head or 100 <= code < 200 or code in (204, 304):
            return Reply(version, code, headers, b"")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    assert await reader.readexactly(2) == b"\r\n", "no CRLF after the last chunk"
                    return Reply(version, code, headers, b"".join(chunks), chunks)
                data = await reader.readexactly(size + 2)
                assert data[-2:] == b"\r\n", "chunk not followed by CRLF"
                chunks.append(data[:-2])
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
            return Reply(version, code, headers, body)
        return Reply(version, code, headers, await reader.read())


async def assert_closed(reader: asyncio.StreamReader) -> None:
    """The server closed the connection cleanly: EOF with nothing else sent (a reset fails)."""
    async with asyncio.timeout(GUARD_S):
        rest = await reader.read()
    assert rest == b"", f"unexpected bytes before EOF: {rest[:200]!r}"


class Conns:
    """Raw connections to one port, closed at the end of the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self, *, rcvbuf: int | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        else:  # a small receive window, set before connecting
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            reader, writer = await asyncio.open_connection(sock=sock)
        self.writers.append(writer)
        return reader, writer

    async def ask(self, data: bytes, **kw: Any) -> tuple[Reply, asyncio.StreamReader]:
        """Send on a new connection and read one answer."""
        reader, writer = await self.open()
        writer.write(data)
        await writer.drain()
        return await read_reply(reader, **kw), reader

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
