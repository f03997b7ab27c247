"""The upstream HTTP client (proxy.httpclient) against real sockets on 127.0.0.1.

Most tests run a tiny asyncio server written here, which scripts exactly what the server
sends and counts the connections it accepted; the SSE test uses the repo's simulator.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import uvloop

from proxy import httpclient
from proxy.failures import ConnRefused, ProcessExited, UpstreamTimeout
from proxy.httpclient import Pool, Response
from proxy.simulator import Simulator
from proxy.sse import DONE_EVENT, EventReader

Handler = Callable[["Conn"], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops: the proxy serves on uvloop, whose transports differ."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


pytestmark = pytest.mark.filterwarnings(
    "ignore:Overriding the \"event_loop_policy\" fixture:DeprecationWarning")


async def test_runs_on_the_parametrized_loop(request: pytest.FixtureRequest) -> None:
    on_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert on_uvloop == ("uvloop" in request.node.callspec.id)


class Conn:
    """One accepted connection, as a handler sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        self.reader = reader
        self.writer = writer
        self.n = n  # 0 for the server's first connection, 1 for the next...
        self.requests = 0  # requests read on this connection so far

    async def read_request(self) -> tuple[bytes, dict[str, str], bytes] | None:
        """(request line, headers with lowercase names, body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head[:-4].split(b"\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await self.reader.readexactly(length) if length else b""
        self.requests += 1
        return lines[0], headers, body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class Server:
    """A scripted HTTP server: `handler` runs once per accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.open = 0  # connections not yet closed by either side
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer, self.accepted)
        self.accepted += 1
        self.open += 1
        try:
            await self.handler(conn)
            # Keep the connection until the client closes it (a keep-alive server).
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(getattr(self._server, "_clients", ())):
                writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[Server] = []

    async def make(handler: Handler) -> Server:
        server = Server(handler)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    p = Pool(connect_timeout_s=2.0, keepalive_s=60.0)
    yield p
    await p.close()


def ok(body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def keep_answering(respond: Callable[[Conn, bytes, dict[str, str], bytes], bytes] | None = None
                   ) -> Handler:
    """A handler answering every request on the connection (default: echo of the body)."""
    async def handler(conn: Conn) -> None:
        while (req := await conn.read_request()) is not None:
            line, headers, body = req
            await conn.send(respond(conn, line, headers, body) if respond else ok(b"echo:" + body))
    return handler


async def settle(condition: Callable[[], bool], ticks: int = 200) -> bool:
    """Let the loop run until `condition` holds (bounded by ticks, not by wall-clock)."""
    for _ in range(ticks):
        if condition():
            return True
        await asyncio.sleep(0.005)
    return condition()


async def get(pool: Pool, url: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[Response, bytes]:
    resp = await pool.request("POST" if body is not None else "GET", url, body, headers or {})
    data = await resp.read()
    resp.release()
    return resp, data


async def test_keep_alive_reuses_one_connection(serve: Any, pool: Pool) -> None:
    server = await serve(keep_answering())
    for n in range(5):
        resp, data = await get(pool, server.url + "/v1/x", f"req{n}".encode())
        assert resp.status == 200 and data == f"echo:req{n}".encode()
    assert server.accepted == 1
    assert pool.idle_count == 1 and pool.open_count == 1


async def test_request_carries_only_the_given_headers(serve: Any, pool: Pool) -> None:
    seen: list[tuple[bytes, dict[str, str], bytes]] = []

    def respond(conn: Conn, line: bytes, headers: dict[str, str], body: bytes) -> bytes:
        seen.append((line, headers, body))
        return ok(b"")

    server = await serve(keep_answering(respond))
    await get(pool, server.url + "/v1/chat/completions?a=1", b'{"x":1}',
              {"Content-Type": "application/json", "Authorization": "Bearer k"})
    await get(pool, server.url + "/health")
    (line1, h1, b1), (line2, h2, b2) = seen
    port = server.url.rsplit(":", 1)[1]
    assert line1 == b"POST /v1/chat/completions?a=1 HTTP/1.1"
    assert h1 == {"host": f"127.0.0.1:{port}", "content-type": "application/json",
                  "authorization": "Bearer k", "content-length": "7"}
    assert b1 == b'{"x":1}'
    assert line2 == b"GET /health HTTP/1.1" and h2 == {"host": f"127.0.0.1:{port}"}
    with pytest.raises(ValueError):
        await pool.request("GET", server.url + "/", None, {"X-Bad": "a\r\nInjected: 1"})


async def test_cached_request_heads_follow_the_headers_given(serve: Any, pool: Pool) -> None:
    """Request heads are cached per (method, url, headers); a changed header, or the same
    mapping changed in place, is sent as it is now, and bodies of any length are framed."""
    seen: list[dict[str, str]] = []

    def respond(conn: Conn, line: bytes, headers: dict[str, str], body: bytes) -> bytes:
        seen.append(headers)
        return ok(body)

    server = await serve(keep_answering(respond))
    headers = {"Authorization": "Bearer one"}
    assert (await get(pool, server.url + "/x", b"abc", headers))[1] == b"abc"
    headers["Authorization"] = "Bearer two"
    assert (await get(pool, server.url + "/x", b"abcdef", headers))[1] == b"abcdef"
    assert (await get(pool, server.url + "/x", b"", headers))[1] == b""
    assert [(h["authorization"], h["content-length"]) for h in seen] == [
        ("Bearer one", "3"), ("Bearer two", "6"), ("Bearer two", "0")]


async def test_header_names_merge_case_insensitively(serve: Any, pool: Pool) -> None:
    seen: list[bytes] = []

    async def handler(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        await conn.reader.readexactly(2)
        await conn.send(ok(b""))

    server = await serve(handler)
    await get(pool, server.url + "/", b"{}", {"Content-Type": "text/plain", "X-A": "1",
                                              "content-type": "application/json",
                                              "Content-Length": "99", "host": "evil"})
    lines = seen[0].split(b"\r\n")
    assert lines[1].startswith(b"Host: 127.0.0.1:")
    assert sorted(lines[2:-2]) == [b"Content-Length: 2", b"X-A: 1",
                                   b"content-type: application/json"]


async def test_content_length_body_and_read_limit(serve: Any, pool: Pool) -> None:
    payload = bytes(range(256)) * 100
    server = await serve(keep_answering(lambda c, line, h, b: ok(payload)))
    resp, data = await get(pool, server.url + "/")
    assert data == payload
    resp = await pool.request("GET", server.url + "/", None, {})
    first = await resp.read(1000)
    rest = await resp.read()
    assert first == payload[:1000] and first + rest == payload
    resp.release()
    assert server.accepted == 1


async def test_chunked_body_in_pieces(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"hello ", b"chunked ", b"world"):
                await conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                await asyncio.sleep(0)
            await conn.send(b"0\r\n\r\n")

    server = await serve(handler)
    for _ in range(3):
        resp, data = await get(pool, server.url + "/")
        assert data == b"hello chunked world"
        assert resp.headers.get("transfer-encoding") == "chunked"
    assert server.accepted == 1


async def test_body_until_eof_is_read_whole_and_not_pooled(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nno length, ")
        await conn.send(b"ends at close")
        conn.close()

    server = await serve(handler)
    resp, data = await get(pool, server.url + "/")
    assert data == b"no length, ends at close"
    assert pool.idle_count == 0


async def test_sse_stream_from_the_simulator(pool: Pool) -> None:
    sim = Simulator("sim-model", words=12, chunk_delay=0.001)
    await sim.start()
    try:
        body = orjson.dumps({"model": "sim-model", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]})
        resp = await pool.request("POST", sim.base_url + "/chat/completions", body,
                                  {"Content-Type": "application/json"})
        assert resp.status == 200
        assert "text/event-stream" in resp.headers.get("Content-Type", "")
        reader = EventReader(resp)
        events = []
        while (event := await reader.next()) is not None:
            events.append(event)
        resp.release()
        assert events[-1] == DONE_EVENT
        text = "".join(
            orjson.loads(e[6:])["choices"][0]["delta"].get("content") or ""
            for e in events[:-1] if orjson.loads(e[6:])["choices"])
        assert len(text.split()) == 12
        # The connection went back to the pool and serves the next request.
        resp2 = await pool.request("GET", sim.base_url + "/models", None, {})
        assert resp2.status == 200 and b"sim-model" in await resp2.read()
        resp2.release()
        assert pool.open_count == 1
    finally:
        await pool.close()
        await sim.stop()


async def test_refused_connection(pool: Pool) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(ConnRefused) as info:
        await pool.request("GET", f"http://127.0.0.1:{port}/", None, {})
    assert info.value.detail == f"connection refused by 127.0.0.1:{port}"


async def test_unresolvable_host(pool: Pool) -> None:
    with pytest.raises(ConnRefused):
        await pool.request("GET", "http://no-such-host.invalid/", None, {})


async def test_connect_timeout(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def never(*args: Any, **kw: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(loop, "create_connection", never)
    p = Pool(connect_timeout_s=0.05)
    with pytest.raises(UpstreamTimeout) as info:
        await p.request("GET", "http://127.0.0.1:9/", None, {})
    assert info.value.phase == "connect"


async def test_server_closing_an_idle_connection(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(ok(b"once"))  # keep-alive by the headers, then closes anyway
        conn.close()

    server = await serve(handler)
    assert (await get(pool, server.url + "/"))[1] == b"once"
    assert await settle(lambda: server.open == 0)
    assert (await get(pool, server.url + "/"))[1] == b"once"
    assert server.accepted == 2


async def test_reused_connection_closed_before_any_byte_is_retried_once(serve: Any,
                                                                         pool: Pool) -> None:
    # The server takes the second request on a kept-alive connection and closes without a
    # byte: what a server closing an idle connection looks like when the close races the
    # reuse. The client sends again on a fresh connection.
    async def handler(conn: Conn) -> None:
        while (req := await conn.read_request()) is not None:
            if conn.requests == 2:
                conn.close()
                return
            await conn.send(ok(b"conn%d:%s" % (conn.n, req[2])))

    server = await serve(handler)
    assert (await get(pool, server.url + "/", b"a"))[1] == b"conn0:a"
    assert (await get(pool, server.url + "/", b"b"))[1] == b"conn1:b"
    assert server.accepted == 2


async def test_reset_of_a_reused_connection_is_retried(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        while (req := await conn.read_request()) is not None:
            if conn.requests == 2:
                sock = conn.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.writer.transport.abort()  # RST
                return
            await conn.send(ok(b"conn%d:%s" % (conn.n, req[2])))

    server = await serve(handler)
    assert (await get(pool, server.url + "/", b"a"))[1] == b"conn0:a"
    assert (await get(pool, server.url + "/", b"b"))[1] == b"conn1:b"


async def test_fresh_connection_closed_before_the_response_is_not_retried(serve: Any,
                                                                          pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        conn.close()

    server = await serve(handler)
    with pytest.raises(ProcessExited) as info:
        await pool.request("POST", server.url + "/", b"x", {})
    assert info.value.detail == "server closed the connection"
    assert server.accepted == 1


async def test_no_retry_once_a_response_byte_came(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            if conn.requests == 2:
                await conn.send(b"HTTP/1.1 200 O")
                conn.close()
                return
            await conn.send(ok(b"first"))

    server = await serve(handler)
    await get(pool, server.url + "/")
    with pytest.raises(ProcessExited):
        await pool.request("GET", server.url + "/", None, {})
    assert server.accepted == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_close_mid_body(serve: Any, pool: Pool, framing: str) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if framing == "length":
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        else:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        conn.close()

    server = await serve(handler)
    resp = await pool.request("GET", server.url + "/", None, {})
    assert resp.status == 200
    with pytest.raises(ProcessExited) as info:
        await resp.read()
    assert info.value.detail == "response body cut short"
    resp.release()
    assert pool.idle_count == 0 and pool.open_count == 0


async def test_unparsable_response(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"SMTP ready\r\n\r\n")

    server = await serve(handler)
    with pytest.raises(ProcessExited) as info:
        await pool.request("GET", server.url + "/", None, {})
    assert "unparsable" in info.value.detail
    assert await settle(lambda: pool.open_count == 0)


async def test_cancelled_request_leaves_no_connection(serve: Any, pool: Pool) -> None:
    got = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        got.set()  # ...and never answer

    server = await serve(handler)
    task = asyncio.create_task(pool.request("POST", server.url + "/", b"x", {}))
    await got.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.open_count == 0 and pool.idle_count == 0
    assert await settle(lambda: server.open == 0)  # the server saw the close


async def test_timed_out_body_read_then_close_leaves_no_connection(serve: Any,
                                                                    pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    server = await serve(handler)
    resp = await pool.request("GET", server.url + "/", None, {})
    assert await resp.readany() == b"abc"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await resp.readany()
    resp.close()
    assert pool.open_count == 0
    assert await settle(lambda: server.open == 0)


async def test_headers_not_arriving_in_time_is_an_upstream_timeout(serve: Any,
                                                                    pool: Pool) -> None:
    """The request's own timer: the wait for headers ends as UpstreamTimeout(phase), and the
    connection is closed rather than pooled."""
    async def handler(conn: Conn) -> None:
        await conn.read_request()  # ...and never answer

    server = await serve(handler)
    with pytest.raises(UpstreamTimeout) as caught:
        await pool.request("POST", server.url + "/", b"x", {}, timeout_s=0.05,
                           phase="first_byte")
    assert caught.value.phase == "first_byte" and "0.05" in caught.value.detail
    assert pool.open_count == 0 and pool.idle_count == 0
    assert await settle(lambda: server.open == 0)


async def test_a_stalled_body_read_with_a_timeout_fails_and_closes(serve: Any,
                                                                    pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")  # 7 missing

    server = await serve(handler)
    resp = await pool.request("GET", server.url + "/", None, {}, timeout_s=1.0)
    with pytest.raises(UpstreamTimeout) as caught:
        await resp.read(None, 0.05, "body")
    assert caught.value.phase == "body"
    resp.close()
    assert pool.open_count == 0
    assert await settle(lambda: server.open == 0)


async def test_a_readany_timeout_and_a_body_that_came_whole(serve: Any, pool: Pool) -> None:
    """readany's timer fails a silent stream; a body that already arrived whole is read
    at once even with a timeout given, and the connection is reused."""
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await conn.read_request()  # the first response never ends: a new connection asks

    server = await serve(handler)
    resp = await pool.request("GET", server.url + "/", None, {})
    assert await resp.readany(0.5) == b"abc"
    with pytest.raises(UpstreamTimeout) as caught:
        await resp.readany(0.05, "idle")
    assert caught.value.phase == "idle"
    resp.close()

    whole = await serve(keep_answering())
    for _ in range(2):
        resp = await pool.request("POST", whole.url + "/", b"hi", {}, timeout_s=1.0)
        assert await resp.read(None, 1.0) == b"echo:hi"
        resp.release()
    assert whole.accepted == 1


async def test_interim_100_continue_is_skipped(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await asyncio.sleep(0)
            await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"final"))

    server = await serve(handler)
    for _ in range(2):
        resp, data = await get(pool, server.url + "/", b"body")
        assert resp.status == 200 and data == b"final"
        assert "link" not in resp.headers
    assert server.accepted == 1


async def test_headers_are_case_insensitive(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                        b"RETRY-AFTER: 3\r\nX-Multi: a\r\nx-multi: b\r\n"
                        b"Content-Length: 2\r\n\r\n{}")

    server = await serve(handler)
    resp, data = await get(pool, server.url + "/")
    assert resp.status == 429 and data == b"{}"
    h = resp.headers
    assert h.get("Content-Type", "") == "application/json" == h.get("content-type")
    assert h["CONTENT-TYPE"] == "application/json"
    assert "retry-after" in h and "Retry-After" in h and h["retry-after"] == "3"
    assert h.get("missing") is None and h.get("Missing", "dflt") == "dflt"
    assert h["x-multi"] == "a, b"
    assert set(h) == {"content-type", "retry-after", "x-multi", "content-length"}
    assert {n: h[n] for n in ("retry-after",) if n in h} == {"retry-after": "3"}


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_large_body_slow_reader_pauses_and_arrives_intact(serve: Any, pool: Pool,
                                                                framing: str) -> None:
    payload = os.urandom(6 * 1024 * 1024)

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if framing == "length":
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
            conn.writer.write(payload)
        else:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(payload), 100_000):
                piece = payload[i:i + 100_000]
                conn.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.writer.write(b"0\r\n\r\n")
        await conn.writer.drain()

    server = await serve(handler)
    resp = await pool.request("GET", server.url + "/", None, {})
    conn = resp._conn
    assert conn is not None
    digest = hashlib.sha256()
    received = paused_seen = most_buffered = 0
    while True:
        # A slow reader: let the writer run ahead before each read.
        for _ in range(5):
            await asyncio.sleep(0.001)
        paused_seen += conn.paused
        most_buffered = max(most_buffered, conn.buffered)
        data = await resp.readany()
        if not data:
            break
        digest.update(data)
        received += len(data)
    assert received == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert paused_seen > 0
    assert most_buffered < httpclient.HIGH_WATER + 1024 * 1024  # bounded, not the whole body
    resp.release()
    assert pool.idle_count == 1 and server.accepted == 1


async def test_release_before_the_end_closes_the_connection(serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    server = await serve(handler)
    resp = await pool.request("GET", server.url + "/", None, {})
    resp.release()
    resp.close()  # a second close after release is harmless
    assert pool.idle_count == 0
    assert await settle(lambda: server.open == 0)


async def test_late_close_does_not_touch_a_pooled_connection(serve: Any, pool: Pool) -> None:
    server = await serve(keep_answering())
    resp, _ = await get(pool, server.url + "/", b"1")
    resp.close()  # after release(): the connection is the pool's now
    assert pool.idle_count == 1
    assert (await get(pool, server.url + "/", b"2"))[1] == b"echo:2"
    assert server.accepted == 1


async def test_pool_close_closes_idle_connections(serve: Any) -> None:
    server = await serve(keep_answering())
    p = Pool(connect_timeout_s=2.0)
    await get(p, server.url + "/")
    assert server.open == 1
    await p.close()
    assert await settle(lambda: server.open == 0)


async def test_idle_connections_expire(serve: Any) -> None:
    server = await serve(keep_answering())
    p = Pool(connect_timeout_s=2.0, keepalive_s=0.0)
    try:
        await get(p, server.url + "/")
        await get(p, server.url + "/")  # the idle one is too old: a new connection
        assert server.accepted == 2
    finally:
        await p.close()


async def test_max_idle_per_host(serve: Any) -> None:
    server = await serve(keep_answering())
    p = Pool(connect_timeout_s=2.0, max_idle_per_host=2)
    try:
        resps = await asyncio.gather(*(p.request("GET", server.url + "/", None, {})
                                       for _ in range(4)))
        for resp in resps:
            await resp.read()
            resp.release()
        assert server.accepted == 4 and p.idle_count == 2
        assert await settle(lambda: server.open == 2)
    finally:
        await p.close()


async def test_https_with_server_name(tmp_path: Any, pool: Pool) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
        "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    if await made.wait() != 0:
        pytest.skip("openssl cannot make a test certificate here")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        conn = Conn(reader, writer, 0)
        try:
            while await conn.read_request() is not None:
                await conn.send(ok(b"secret"))
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        # The client's context is ssl.create_default_context(); this one also trusts the
        # test certificate. The name checked is the URL's host ("localhost", resolved).
        pool._ssl = ssl.create_default_context(cafile=str(cert))
        for _ in range(2):
            resp, data = await get(pool, f"https://localhost:{port}/v1/models")
            assert resp.status == 200 and data == b"secret"
        assert accepted == 1
        other = Pool(connect_timeout_s=2.0)  # the default context does not trust it
        with pytest.raises(ConnRefused) as info:
            await other.request("GET", f"https://localhost:{port}/", None, {})
        assert "TLS" in info.value.detail
        await other.close()
    finally:
        await pool.close()
        server.close()


async def test_bytes_after_a_whole_response_keep_the_connection_out_of_the_pool(
        serve: Any, pool: Pool) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(ok(b"body"))
            await asyncio.sleep(0.01)
            await conn.send(b"junk")

    server = await serve(handler)
    resp = await pool.request("GET", server.url + "/", None, {})
    assert await resp.read() == b"body"
    assert await settle(lambda: server.open == 0)
    resp.release()
    assert pool.idle_count == 0
    assert (await get(pool, server.url + "/"))[1] == b"body"
    assert server.accepted == 2


async def test_a_big_body_released_unread_leaves_a_usable_connection(serve: Any,
                                                                     pool: Pool) -> None:
    """A response that filled the read buffer (reading paused) and was released unread:
    the pooled connection reads again for the next request."""
    big = b"x" * (httpclient.HIGH_WATER + 1)  # reading pauses at the very last byte

    def respond(conn: Conn, line: bytes, headers: dict[str, str], body: bytes) -> bytes:
        return ok(big if line.startswith(b"GET /big") else b"small")

    server = await serve(keep_answering(respond))
    resp = await pool.request("GET", server.url + "/big", None, {})
    assert await settle(lambda: resp.complete)
    resp.release()
    resp = await pool.request("GET", server.url + "/small", None, {}, timeout_s=5.0)
    assert await resp.read(None, 5.0) == b"small" and server.accepted == 1
    resp.release()
