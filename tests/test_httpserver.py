"""The proxy's own HTTP/1.1 server (proxy/httpserver.py), spoken to over real sockets.

A tiny App with probe handlers (echo, streams, a slow handler that records being cancelled,
one that raises) runs on a free port of 127.0.0.1; the tests write raw request bytes with
`asyncio.open_connection` wherever framing matters, and read the answers byte for byte.
Every network read has a guard timeout so that a broken server fails a test instead of
hanging it; no test asserts on durations.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from proxy.httpserver import (
    MAX_HEAD_BYTES,
    App,
    Request,
    Response,
    Server,
    StreamResponse,
    start_server,
    stop_server,
)
from tests.conftest import wait_for

#: client_max_size of the test app (small, so that "too large" is cheap to send).
LIMIT = 64 * 1024
#: Longest a single network read may take before the test fails instead of hanging.
GUARD_S = 3.0


# --------------------------------------------------------------------------- the test app


@dataclass
class Probe:
    """What the handlers observed."""

    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    slow_finished: asyncio.Event = field(default_factory=asyncio.Event)
    stream_started: asyncio.Event = field(default_factory=asyncio.Event)
    stream_go: asyncio.Event = field(default_factory=asyncio.Event)
    stream_done: asyncio.Event = field(default_factory=asyncio.Event)
    stream_errors: list[BaseException] = field(default_factory=list)
    echo_bodies: list[bytes] = field(default_factory=list)
    lifecycle: list[str] = field(default_factory=list)


def json_error(status: int, message: str) -> Response:
    """The app's error_response factory: a JSON error body."""
    return Response(status, json.dumps({"error": {"status": status, "message": message}}).encode())


def chunk_payload(i: int, size: int) -> bytes:
    """Chunk `i` of a stream: its number first, then filler that differs between chunks."""
    return f"{i:06d}|".encode().ljust(size, bytes([97 + i % 26]))


def make_app(probe: Probe) -> App:
    app = App(client_max_size=LIMIT, error_response=json_error)

    async def hello(request: Request) -> Response:
        return Response(200, b"hello world", content_type="text/plain")

    async def echo(request: Request) -> Response:
        body = await request.read()
        probe.echo_bodies.append(body)
        return Response(200, body, content_type="application/octet-stream")

    async def thing(request: Request) -> Response:
        return Response(200, json.dumps({"id": request.match_info["id"]}).encode())

    async def query(request: Request) -> Response:
        return Response(200, json.dumps(dict(request.query)).encode())

    async def stream(request: Request) -> StreamResponse:
        n = int(request.query.get("n", "10"))
        size = int(request.query.get("size", "32"))
        wait = request.query.get("wait") == "1"
        response = StreamResponse(200, {"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        try:
            for i in range(n):
                await response.write(chunk_payload(i, size))
                if i == 0:
                    probe.stream_started.set()
                    if wait:
                        await probe.stream_go.wait()
                await asyncio.sleep(0)
            await response.write_eof()
        except BaseException as exc:
            probe.stream_errors.append(exc)
            raise
        probe.stream_done.set()
        return response

    async def slow(request: Request) -> Response:
        probe.slow_started.set()
        try:
            await probe.release.wait()
        except asyncio.CancelledError:
            probe.slow_cancelled.set()
            raise
        probe.slow_finished.set()
        return Response(200, b"slow done", content_type="text/plain")

    async def boom(request: Request) -> Response:
        raise RuntimeError("the handler broke")

    async def lifecycle(app: App) -> AsyncIterator[None]:
        probe.lifecycle.append("startup")
        yield
        probe.lifecycle.append("cleanup")

    app.add_get("/hello", hello)
    app.add_post("/echo", echo)
    app.add_get("/things/{id}/x", thing)
    app.add_get("/query", query)
    app.add_get("/stream", stream)
    app.add_get("/slow", slow)
    app.add_get("/boom", boom)
    app.lifecycles.append(lifecycle)
    return app


# --------------------------------------------------------------------------- raw client


@dataclass
class Reply:
    version: str
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    chunks: list[bytes] | None = None  # the chunks of a chunked body, in order

    def json(self) -> Any:
        return json.loads(self.body)


def build(method: str, path: str, body: bytes = b"", *, version: str = "HTTP/1.1",
          headers: dict[str, str] | None = None, length: bool = True) -> bytes:
    """A request's bytes; Content-Length is added for a body unless `length` is False."""
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    all_headers = dict(headers or {})
    if body and length:
        all_headers.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


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
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    assert await reader.readexactly(2) == b"\r\n", "no CRLF after the last chunk"
                    return Reply(version, code, headers, b"".join(chunks), chunks)
                data = await reader.readexactly(size + 2)
                assert data[-2:] == b"\r\n", "chunk not followed by CRLF"
                chunks.append(data[:-2])
        if "content-length" in headers:
            return Reply(version, code, headers, await reader.readexactly(int(headers["content-length"])))
        return Reply(version, code, headers, await reader.read())


async def assert_closed(reader: asyncio.StreamReader) -> None:
    """The server closed the connection cleanly: EOF, with nothing else sent (a reset fails)."""
    async with asyncio.timeout(GUARD_S):
        rest = await reader.read()
    assert rest == b"", f"unexpected bytes before EOF: {rest[:200]!r}"


@dataclass
class Served:
    server: Server
    probe: Probe
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    async def connect(self, *, rcvbuf: int | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            reader, writer = await asyncio.open_connection(sock=sock)
        self.writers.append(writer)
        return reader, writer

    async def ask(self, data: bytes, **kw: Any) -> tuple[Reply, asyncio.StreamReader]:
        """Send on a new connection and read one answer."""
        reader, writer = await self.connect()
        writer.write(data)
        await writer.drain()
        return await read_reply(reader, **kw), reader


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    probe = Probe()
    server = await start_server(make_app(probe), "127.0.0.1", 0)
    s = Served(server, probe)
    yield s
    for writer in s.writers:
        writer.close()
    await stop_server(server, 0.5)


# --------------------------------------------------------------------------- 1. keep-alive


async def test_keep_alive_answers_sequential_requests_on_one_connection(served: Served) -> None:
    reader, writer = await served.connect()
    for body in (b"first body", b"the second, longer body"):
        writer.write(build("POST", "/echo", body))
        reply = await read_reply(reader)
        assert reply.status == 200
        assert reply.headers["content-length"] == str(len(body))
        assert reply.body == body
        assert "connection" not in reply.headers
    assert served.probe.echo_bodies == [b"first body", b"the second, longer body"]
    assert len(served.server.connections) == 1  # both answered on the same connection
    writer.write(build("GET", "/hello"))
    assert (await read_reply(reader)).body == b"hello world"


async def test_connection_close_request_is_answered_then_closed(served: Served) -> None:
    reply, reader = await served.ask(build("GET", "/hello", headers={"Connection": "close"}))
    assert reply.status == 200
    assert reply.body == b"hello world"
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)


async def test_http10_without_keep_alive_is_closed_after_the_answer(served: Served) -> None:
    reply, reader = await served.ask(b"GET /hello HTTP/1.0\r\n\r\n")
    assert reply.status == 200
    assert reply.body == b"hello world"
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)


async def test_aiohttp_client_reuses_the_connection(served: Served) -> None:
    url = f"http://127.0.0.1:{served.port}"
    async with aiohttp.ClientSession() as session:
        for n in range(3):
            async with session.post(f"{url}/echo", data=b"x" * (n + 1)) as resp:
                assert resp.status == 200
                assert await resp.read() == b"x" * (n + 1)
        assert len(served.server.connections) == 1


# --------------------------------------------------------------------------- 2. pipelining


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("GET", "/stream?n=5&size=16")  # the first one takes several turns
                 + build("POST", "/echo", b"second")
                 + build("GET", "/things/3/x"))
    await writer.drain()
    first = await read_reply(reader)
    second = await read_reply(reader)
    third = await read_reply(reader)
    assert first.status == 200
    assert first.chunks == [chunk_payload(i, 16) for i in range(5)]
    assert (second.status, second.body) == (200, b"second")
    assert (third.status, third.json()) == (200, {"id": "3"})
    assert len(served.server.connections) == 1


async def test_many_pipelined_requests_beyond_the_read_ahead_limit(served: Served) -> None:
    reader, writer = await served.connect()
    count = 40  # more than MAX_PIPELINED: the server pauses reading, then resumes
    writer.write(b"".join(build("POST", "/echo", f"body {n}".encode()) for n in range(count)))
    await writer.drain()
    for n in range(count):
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, f"body {n}".encode())


# --------------------------------------------------------------------------- 3. chunked body


async def test_chunked_request_body_is_read_whole(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("POST", "/echo", headers={"Transfer-Encoding": "chunked"}))
    for piece in (b"5\r\nhello\r\n", b"6\r\n world\r\n", b"1;ext=1\r\n!\r\n", b"0\r\n\r\n"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.01)  # arrives in pieces
    reply = await read_reply(reader)
    assert reply.status == 200
    assert reply.body == b"hello world!"
    assert served.probe.echo_bodies == [b"hello world!"]
    # and the connection is still usable
    writer.write(build("GET", "/hello"))
    assert (await read_reply(reader)).body == b"hello world"


# --------------------------------------------------------------------------- 4. 100-continue


async def test_expect_100_continue(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("POST", "/echo", headers={"Expect": "100-continue", "Content-Length": "11"}))
    await writer.drain()
    async with asyncio.timeout(GUARD_S):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert served.probe.echo_bodies == []
    writer.write(b"hello world")
    reply = await read_reply(reader)
    assert (reply.status, reply.body) == (200, b"hello world")


async def test_expect_100_continue_with_too_large_body_gets_413_without_continue(
        served: Served) -> None:
    reply, reader = await served.ask(build(
        "POST", "/echo", headers={"Expect": "100-continue", "Content-Length": str(LIMIT + 1)}))
    assert reply.status == 413  # the first thing sent: no "100 Continue" before it
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)


async def test_expect_100_continue_on_a_pipelined_request_does_not_break_the_answer_in_progress(
        served: Served) -> None:
    """A pipelined request's interim 100 must not land inside the previous request's answer."""
    reader, writer = await served.connect()
    writer.write(build("GET", "/stream?n=4&size=32&wait=1"))
    await writer.drain()
    await wait_for(served.probe.stream_started.is_set, what="the stream's first chunk")
    writer.write(build("POST", "/echo", b"hello",
                       headers={"Expect": "100-continue"}))  # body sent without waiting
    await writer.drain()
    await wait_for(lambda: any(c.queue for c in served.server.connections),
                   what="the server to parse the second request mid-stream")
    served.probe.stream_go.set()
    first = await read_reply(reader)
    assert first.status == 200
    assert first.chunks == [chunk_payload(i, 32) for i in range(4)]
    reply = await read_reply(reader)
    if reply.status == 100:
        reply = await read_reply(reader)
    assert (reply.status, reply.body) == (200, b"hello")


# --------------------------------------------------------------------------- 5. body limit


async def test_body_over_limit_by_content_length_is_413_readable_then_closed(
        served: Served) -> None:
    reader, writer = await served.connect()
    size = 2 * 1024 * 1024
    writer.write(build("POST", "/echo", headers={"Content-Length": str(size)}))
    piece = b"z" * 65536
    for _ in range(size // len(piece)):  # the whole body really is sent
        writer.write(piece)
        await writer.drain()
    reply = await read_reply(reader)  # no reset before the answer can be read
    assert reply.status == 413
    assert reply.headers["connection"].lower() == "close"
    assert reply.json()["error"]["status"] == 413
    assert str(LIMIT) in reply.json()["error"]["message"]
    await assert_closed(reader)
    assert served.probe.echo_bodies == []


async def test_chunked_body_growing_over_limit_is_413(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("POST", "/echo", headers={"Transfer-Encoding": "chunked"}))
    piece = b"q" * 16384
    for _ in range(4 * LIMIT // len(piece)):
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    reply = await read_reply(reader)
    assert reply.status == 413
    assert reply.headers["connection"].lower() == "close"
    assert reply.json()["error"]["status"] == 413
    await assert_closed(reader)
    assert served.probe.echo_bodies == []


async def test_body_at_the_limit_is_accepted(served: Served) -> None:
    body = bytes(range(256)) * (LIMIT // 256)
    assert len(body) == LIMIT
    reply, _ = await served.ask(build("POST", "/echo", body))
    assert (reply.status, reply.body) == (200, body)


# --------------------------------------------------------------------------- 6. bad heads


async def test_headers_larger_than_the_limit_get_431_json_and_close(served: Served) -> None:
    reader, writer = await served.connect()
    pad = "p" * 1000
    count = MAX_HEAD_BYTES // 1000 + 20
    head = "GET /hello HTTP/1.1\r\nHost: x\r\n" + "".join(
        f"X-Pad-{n}: {pad}\r\n" for n in range(count)) + "\r\n"
    writer.write(head.encode())
    await writer.drain()
    reply = await read_reply(reader)
    assert reply.status == 431
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["connection"].lower() == "close"
    assert reply.json()["error"]["status"] == 431
    await assert_closed(reader)


async def test_one_unterminated_header_larger_than_the_limit_gets_431(served: Served) -> None:
    """The head limit also holds for a single header line that never ends (no unbounded buffering)."""
    reader, writer = await served.connect()
    writer.write(b"GET /hello HTTP/1.1\r\nX-Big: ")
    piece = b"b" * 16384
    for _ in range((MAX_HEAD_BYTES + 65536) // len(piece)):
        writer.write(piece)
        await writer.drain()
    reply = await read_reply(reader)
    assert reply.status == 431
    assert reply.json()["error"]["status"] == 431


async def test_request_line_too_long_gets_414(served: Served) -> None:
    reply, reader = await served.ask(build("GET", "/hello?q=" + "a" * (MAX_HEAD_BYTES + 10)))
    assert reply.status == 414
    assert reply.json()["error"]["status"] == 414
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)


async def test_malformed_request_line_gets_400_and_close(served: Served) -> None:
    reply, reader = await served.ask(b"GARBAGE\r\n\r\n")
    assert reply.status == 400
    assert reply.json()["error"]["status"] == 400
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)


# --------------------------------------------------------------------------- 7. routing


async def test_unknown_path_404_and_wrong_method_405(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("GET", "/nowhere") + build("POST", "/hello", b"{}") + build("GET", "/hello"))
    await writer.drain()
    missing = await read_reply(reader)
    assert missing.status == 404
    assert missing.json()["error"]["status"] == 404
    wrong = await read_reply(reader)
    assert wrong.status == 405
    assert wrong.json()["error"]["status"] == 405
    assert "GET" in wrong.json()["error"]["message"]
    ok = await read_reply(reader)  # errors from routing keep the connection
    assert (ok.status, ok.body) == (200, b"hello world")


async def test_pattern_segment_is_percent_decoded(served: Served) -> None:
    reply, _ = await served.ask(build("GET", "/things/a%3Ab/x"))
    assert (reply.status, reply.json()) == (200, {"id": "a:b"})
    reply, _ = await served.ask(build("GET", "/things/plain/x"))
    assert (reply.status, reply.json()) == (200, {"id": "plain"})
    reply, _ = await served.ask(build("GET", "/things//x"))
    assert reply.status == 404  # an empty segment does not match {id}
    reply, _ = await served.ask(build("GET", "/things/a/b/x"))
    assert reply.status == 404


async def test_pattern_segment_is_decoded_exactly_once(served: Served) -> None:
    """An encoded '/' belongs to the segment and an encoded '%' is not decoded twice."""
    reply, _ = await served.ask(build("GET", "/things/a%2Fb/x"))
    assert (reply.status, reply.json()) == (200, {"id": "a/b"})
    reply, _ = await served.ask(build("GET", "/things/100%2541/x"))
    assert (reply.status, reply.json()) == (200, {"id": "100%41"})


async def test_query_parsing(served: Served) -> None:
    reply, _ = await served.ask(build("GET", "/query?a=1&a=2&b=&c=%C3%A9+x"))
    assert reply.status == 200
    assert reply.json() == {"a": "1", "b": "", "c": "é x"}


# --------------------------------------------------------------------------- 8. HEAD


async def test_head_on_a_get_route_sends_headers_only(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("HEAD", "/hello") + build("GET", "/things/after-head/x"))
    await writer.drain()
    head = await read_reply(reader, head=True)
    assert head.status == 200
    assert head.headers["content-length"] == str(len(b"hello world"))
    # no body bytes: the very next bytes are the second answer's status line
    following = await read_reply(reader)
    assert (following.status, following.json()) == (200, {"id": "after-head"})


# --------------------------------------------------------------------------- 9. disconnect


async def test_client_disconnect_cancels_the_handler(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("GET", "/slow"))
    await writer.drain()
    await wait_for(served.probe.slow_started.is_set, what="the slow handler to start")
    assert served.server.active == 1
    writer.close()
    await wait_for(served.probe.slow_cancelled.is_set, what="the handler to be cancelled")
    await wait_for(lambda: served.server.active == 0, what="no handler running")
    await wait_for(lambda: not served.server.connections, what="the connection to be dropped")
    assert not served.probe.slow_finished.is_set()
    # the server still serves
    reply, _ = await served.ask(build("GET", "/hello"))
    assert reply.status == 200


# --------------------------------------------------------------------------- 10. streaming


async def test_stream_response_arrives_whole_and_in_order(served: Served) -> None:
    reply, _ = await served.ask(build("GET", "/stream?n=100&size=40"))
    assert reply.status == 200
    assert reply.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in reply.headers
    assert reply.chunks == [chunk_payload(i, 40) for i in range(100)]
    await wait_for(served.probe.stream_done.is_set, what="the stream handler to finish")
    assert served.probe.stream_errors == []


async def test_stream_to_an_http10_client_is_unframed_and_ends_with_the_connection(
        served: Served) -> None:
    """HTTP/1.0 has no chunked encoding: the body is the bytes up to the close."""
    reader, writer = await served.connect()
    writer.write(b"GET /stream?n=5&size=16 HTTP/1.0\r\n\r\n")
    async with asyncio.timeout(GUARD_S):
        raw = await reader.read()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"".join(chunk_payload(i, 16) for i in range(5))


async def test_stream_to_a_client_that_does_not_read_waits_then_delivers_everything(
        served: Served) -> None:
    n, size = 200, 64 * 1024
    reader, writer = await served.connect(rcvbuf=64 * 1024)
    writer.write(build("GET", f"/stream?n={n}&size={size}"))
    await writer.drain()
    # the client reads nothing: the server's writes must pause (not buffer 12.5 MiB)
    await wait_for(lambda: any(c.paused for c in served.server.connections),
                   what="the server to pause writing")
    await asyncio.sleep(0.1)
    assert not served.probe.stream_done.is_set()
    assert served.probe.stream_errors == []
    reply = await read_reply(reader)
    assert reply.status == 200
    assert reply.chunks is not None and len(reply.chunks) == n
    for i, got in enumerate(reply.chunks):
        assert got == chunk_payload(i, size), f"chunk {i} differs"
    await wait_for(served.probe.stream_done.is_set, what="the stream handler to finish")
    assert served.probe.stream_errors == []
    # the connection is still usable afterwards
    writer.write(build("GET", "/hello"))
    assert (await read_reply(reader)).body == b"hello world"


# --------------------------------------------------------------------------- 11. graceful stop


async def test_graceful_stop_lets_a_running_handler_finish(served: Served) -> None:
    server, probe, port = served.server, served.probe, served.port
    idle_reader, idle_writer = await served.connect()  # an idle keep-alive connection
    idle_writer.write(build("GET", "/hello"))
    assert (await read_reply(idle_reader)).status == 200
    reader, writer = await served.connect()
    writer.write(build("GET", "/slow"))
    await writer.drain()
    await wait_for(probe.slow_started.is_set, what="the slow handler to start")

    stopping = asyncio.create_task(stop_server(server, grace_s=5))
    await wait_for(lambda: server.stopping, what="the server to start closing")
    with pytest.raises(OSError):  # no longer accepting
        await asyncio.open_connection("127.0.0.1", port)
    await assert_closed(idle_reader)  # idle connections are closed at once
    assert not stopping.done()  # still waiting for the handler

    probe.release.set()
    reply = await read_reply(reader)
    assert (reply.status, reply.body) == (200, b"slow done")
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)
    async with asyncio.timeout(GUARD_S):
        await stopping
    assert probe.slow_finished.is_set()
    assert not probe.slow_cancelled.is_set()
    assert probe.lifecycle == ["startup", "cleanup"]


async def test_stop_with_short_grace_cancels_a_handler_that_never_finishes(
        served: Served) -> None:
    server, probe = served.server, served.probe
    reader, writer = await served.connect()
    writer.write(build("GET", "/slow"))
    await writer.drain()
    await wait_for(probe.slow_started.is_set, what="the slow handler to start")
    async with asyncio.timeout(GUARD_S):
        await stop_server(server, grace_s=0.2)
    await wait_for(probe.slow_cancelled.is_set, what="the handler to be cancelled")
    await wait_for(lambda: server.active == 0, what="no handler running")
    assert not probe.slow_finished.is_set()
    async with asyncio.timeout(GUARD_S):
        rest = await reader.read()
    assert b"slow done" not in rest


# --------------------------------------------------------------------------- 12. handler errors


async def test_handler_exception_gives_500_and_the_server_keeps_serving(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("GET", "/boom"))
    reply = await read_reply(reader)
    assert reply.status == 500
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["status"] == 500
    assert "the handler broke" not in reply.body.decode()  # no internals leaked
    assert served.server.active == 0
    # the same connection and a new one both still work
    writer.write(build("GET", "/hello"))
    assert (await read_reply(reader)).body == b"hello world"
    other, _ = await served.ask(build("POST", "/echo", b"still here"))
    assert (other.status, other.body) == (200, b"still here")


# --------------------------------------------------------------------------- found in review


async def test_upgrade_with_a_body_is_refused_and_nothing_is_smuggled(served: Served) -> None:
    """httptools takes everything after an Upgrade request's head for the other protocol:
    a body there must not be parsed as a next request."""
    reader, writer = await served.connect()
    smuggled = build("GET", "/hello")
    writer.write(build("POST", "/echo", headers={
        "Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
        "Content-Length": str(len(smuggled))}))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(smuggled)  # the "body"
    reply = await read_reply(reader)
    assert reply.status == 400 and "Upgrade" in reply.json()["error"]["message"]
    await assert_closed(reader)  # and no answer for the smuggled GET
    assert served.probe.echo_bodies == []


async def test_bodyless_upgrade_is_answered_as_http11_then_closed(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("GET", "/hello", headers={"Connection": "Upgrade",
                                                  "Upgrade": "websocket"}) + build("GET", "/hello"))
    reply = await read_reply(reader)
    assert reply.status == 200 and reply.body == b"hello world"
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)


async def test_connect_is_refused(served: Served) -> None:
    reply, reader = await served.ask(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 400
    await assert_closed(reader)


async def test_transfer_encoding_other_than_chunked_is_refused(served: Served) -> None:
    reply, reader = await served.ask(build("POST", "/echo", b"abc", length=False,
                                           headers={"Transfer-Encoding": "gzip"}))
    assert reply.status == 400
    await assert_closed(reader)


async def test_broken_chunked_body_fails_the_read_at_once(served: Served) -> None:
    """A handler already waiting on the body learns of broken framing at once (not after
    its read timeout); the answer is the app's, then the connection closes."""
    reader, writer = await served.connect()
    writer.write(build("POST", "/echo", length=False, headers={"Transfer-Encoding": "chunked"}))
    writer.write(b"5\r\n{\"mod\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)  # the handler now waits for the rest
    writer.write(b"ZZ\r\n")
    reply = await read_reply(reader)
    assert reply.status == 500  # this test app has no error wrapper: its read raised
    assert served.probe.echo_bodies == []
    await assert_closed(reader)


async def test_a_large_header_split_before_its_end_is_counted_once(served: Served) -> None:
    """70 KB of header (under the 128 KiB limit) in one segment, the end in the next."""
    reader, writer = await served.connect()
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"\r\n\r\n")
    reply = await read_reply(reader)
    assert reply.status == 200


async def test_405_names_the_allowed_methods(served: Served) -> None:
    reply, _ = await served.ask(build("DELETE", "/hello"))
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"


async def test_http10_keep_alive_is_said_and_kept(served: Served) -> None:
    reader, writer = await served.connect()
    for _ in range(2):
        writer.write(build("GET", "/hello", version="HTTP/1.0",
                           headers={"Connection": "keep-alive"}))
        reply = await read_reply(reader)
        assert reply.status == 200 and reply.headers["connection"].lower() == "keep-alive"


async def test_no_100_continue_for_http10(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(build("POST", "/echo", version="HTTP/1.0",
                       headers={"Expect": "100-continue", "Content-Length": "2"}))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"hi")
    reply = await read_reply(reader)
    assert reply.status == 200 and reply.body == b"hi"
