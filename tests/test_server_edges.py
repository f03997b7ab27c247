"""The proxy's HTTP server (aiohttp.web, proxy/api/server.py) at its edges, over raw sockets.

The proxy is served in this event loop in front of a simulator, the way `failover-proxy
serve` serves it; request bytes are written with `asyncio.open_connection` wherever
framing matters (keep-alive, pipelining, chunked bodies, 100-continue, limits, malformed
heads, streams, disconnects, graceful stop). The client-facing attacks are in
tests/test_client_attacks.py. No test asserts on durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.api.server import MAX_FIELD_SIZE, MAX_LINE_SIZE, ProxyRunner, bound_port, start
from proxy.api.state import STATE
from proxy.app import create_app
from proxy.config import Config
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, RunningProxy, proxy_config, wait_for
from tests.rawhttp import (
    GUARD_S,
    Conns,
    Reply,
    assert_closed,
    build,
    chat,
    post_chat,
    read_reply,
)

#: server.max_body_bytes of the in-process proxy (small, so that "too large" is cheap).
LIMIT = 16 * 1024
MODEL = "edge-model"
WORDS = 8


@dataclass
class Edge:
    proxy: RunningProxy
    sim: Simulator
    conns: Conns

    @property
    def inbound(self) -> int:
        """Client connections the proxy's server holds."""
        server = self.proxy.runner.server
        return len(server.connections) if server is not None else 0


def edge_config(sim: Simulator, **sections: Any) -> Config:
    server = {"max_body_bytes": LIMIT, **sections.pop("server", {})}
    return proxy_config([sim], server=server, **sections)


@pytest.fixture
async def edge(make_sim: MakeSim, make_proxy: MakeProxy) -> AsyncIterator[Edge]:
    sim = await make_sim(MODEL, words=WORDS)
    proxy = await make_proxy(edge_config(sim))
    conns = Conns(proxy.port)
    yield Edge(proxy, sim, conns)
    conns.close()


# --------------------------------------------------------------------------- keep-alive


async def test_keep_alive_answers_sequential_requests_on_one_connection(edge: Edge) -> None:
    reader, writer = await edge.conns.open()
    for prompt in ("first question", "the second, longer question"):
        writer.write(post_chat(prompt))
        reply = await read_reply(reader)
        assert reply.status == 200
        assert reply.json()["choices"][0]["message"]["content"] == answer_text(MODEL, prompt, WORDS)
        assert reply.headers["x-route-instance"] == "p0:s0"
        assert reply.headers["x-route-attempts"] == "1"
        assert reply.headers["x-request-id"] and reply.headers["x-route-plan-id"]
        assert "connection" not in reply.headers
    writer.write(build("GET", "/healthz"))
    assert (await read_reply(reader)).json() == {"status": "ok"}
    assert edge.inbound == 1  # all answered on the same connection


async def test_connection_close_request_is_answered_then_closed(edge: Edge) -> None:
    reply, reader = await edge.conns.ask(build("GET", "/healthz", headers={"Connection": "close"}))
    assert reply.status == 200
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)


async def test_http10_is_closed_after_the_answer_unless_it_asks_for_keep_alive(
        edge: Edge) -> None:
    reply, reader = await edge.conns.ask(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.status == 200 and reply.json() == {"status": "ok"}
    await assert_closed(reader)
    reader, writer = await edge.conns.open()
    for _ in range(2):
        writer.write(build("GET", "/healthz", version="HTTP/1.0",
                           headers={"Connection": "keep-alive"}))
        reply = await read_reply(reader)
        assert reply.status == 200 and reply.headers["connection"].lower() == "keep-alive"


# --------------------------------------------------------------------------- pipelining


async def test_pipelined_requests_are_answered_in_order(edge: Edge) -> None:
    reader, writer = await edge.conns.open()
    writer.write(post_chat("streamed first", stream=True)
                 + post_chat("then whole", headers={"x-request-id": "second-one"})
                 + build("GET", "/healthz"))
    await writer.drain()
    first, second, third = [await read_reply(reader) for _ in range(3)]
    assert first.status == 200 and first.headers["content-type"].startswith("text/event-stream")
    assert first.text() == answer_text(MODEL, "streamed first", WORDS)
    assert first.body.rstrip().endswith(b"data: [DONE]")
    assert second.status == 200 and second.headers["x-request-id"] == "second-one"
    assert third.json() == {"status": "ok"}


# --------------------------------------------------------------------------- bodies


async def test_chunked_request_body_arriving_in_pieces_is_read_whole(edge: Edge) -> None:
    body = chat("sent in chunks")
    reader, writer = await edge.conns.open()
    writer.write(build("POST", "/v1/chat/completions", length=False,
                       headers={"Transfer-Encoding": "chunked"}))
    for at in range(0, len(body), 17):
        piece = body[at:at + 17]
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        await writer.drain()
        await asyncio.sleep(0.005)
    writer.write(b"0\r\n\r\n")
    reply = await read_reply(reader)
    assert reply.status == 200
    assert reply.json()["choices"][0]["message"]["content"] == answer_text(MODEL, "sent in chunks",
                                                                           WORDS)
    writer.write(build("GET", "/healthz"))  # and the connection is still usable
    assert (await read_reply(reader)).status == 200


async def test_expect_100_continue_asks_for_the_body_then_answers(edge: Edge) -> None:
    body = chat("after continue")
    reader, writer = await edge.conns.open()
    writer.write(build("POST", "/v1/chat/completions", length=False, headers={
        "Expect": "100-continue", "Content-Length": str(len(body))}))
    await writer.drain()
    async with asyncio.timeout(GUARD_S):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert edge.sim.stats.requests == 0
    writer.write(body)
    reply = await read_reply(reader)
    assert reply.status == 200 and edge.sim.stats.requests == 1


async def test_expect_100_continue_with_a_body_over_the_limit_gets_413_and_no_continue(
        edge: Edge) -> None:
    reply, reader = await edge.conns.ask(build("POST", "/v1/chat/completions", headers={
        "Expect": "100-continue", "Content-Length": str(LIMIT + 1)}))
    assert reply.status == 413  # the first thing sent: no "100 Continue" before it
    assert reply.error()["code"] == "request_too_large"
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)


async def test_no_100_continue_for_http10(edge: Edge) -> None:
    body = chat("old client")
    reader, writer = await edge.conns.open()
    writer.write(build("POST", "/v1/chat/completions", length=False, version="HTTP/1.0",
                       headers={"Expect": "100-continue", "Content-Length": str(len(body))}))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(body)
    reply = await read_reply(reader)
    assert reply.status == 200  # the first bytes are the answer, not an interim 100


async def test_body_over_the_limit_by_content_length_is_413_readable_then_closed(
        edge: Edge) -> None:
    reader, writer = await edge.conns.open()
    size = 1024 * 1024
    writer.write(build("POST", "/v1/chat/completions", length=False,
                       headers={"Content-Length": str(size)}))
    piece = b"z" * 65536
    with contextlib.suppress(ConnectionError):  # the server may stop reading: fine
        for _ in range(size // len(piece)):
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), GUARD_S)
    reply = await read_reply(reader)  # no reset before the answer can be read
    assert reply.status == 413 and reply.headers["connection"].lower() == "close"
    assert str(LIMIT) in reply.error()["message"]
    await assert_closed(reader)
    assert edge.sim.stats.requests == 0


async def test_chunked_body_growing_over_the_limit_is_413(edge: Edge) -> None:
    reader, writer = await edge.conns.open()
    writer.write(build("POST", "/v1/chat/completions", length=False,
                       headers={"Transfer-Encoding": "chunked"}))
    piece = b"q" * 4096
    with contextlib.suppress(ConnectionError):
        for _ in range(4 * LIMIT // len(piece)):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await asyncio.wait_for(writer.drain(), GUARD_S)
        writer.write(b"0\r\n\r\n")
    reply = await read_reply(reader)
    assert reply.status == 413 and reply.error()["code"] == "request_too_large"
    assert reply.headers["connection"].lower() == "close"
    await assert_closed(reader)
    assert edge.sim.stats.requests == 0


async def test_chunked_body_over_the_limit_arriving_whole_is_413(edge: Edge) -> None:
    """The whole body is there when the handler starts (read without a wait), and it
    declares no length: it is measured as it is taken."""
    body = b"x" * (LIMIT + 1)
    half = LIMIT // 2
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(part), part)
                      for part in (body[:half], body[half:]))
    reply, reader = await edge.conns.ask(build(
        "POST", "/v1/chat/completions", chunks + b"0\r\n\r\n", length=False,
        headers={"Transfer-Encoding": "chunked"}))
    assert reply.status == 413 and reply.error()["code"] == "request_too_large"
    assert str(LIMIT) in reply.error()["message"]
    await assert_closed(reader)
    assert edge.sim.stats.requests == 0


async def test_chunked_body_at_the_limit_arriving_whole_is_served(edge: Edge) -> None:
    body = chat("pad")
    body = body[:-1] + b", \"user\": \"" + b"u" * (LIMIT - len(body) - 12) + b"\"}"
    assert len(body) == LIMIT
    chunks = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    reply, _ = await edge.conns.ask(build("POST", "/v1/chat/completions", chunks,
                                          length=False,
                                          headers={"Transfer-Encoding": "chunked"}))
    assert reply.status == 200


async def test_a_body_exactly_at_the_limit_is_served(edge: Edge) -> None:
    body = chat("pad")
    body = body[:-1] + b", \"user\": \"" + b"u" * (LIMIT - len(body) - 12) + b"\"}"
    assert len(body) == LIMIT
    reply, _ = await edge.conns.ask(build("POST", "/v1/chat/completions", body))
    assert reply.status == 200


async def test_broken_chunked_body_fails_at_once_with_400(edge: Edge) -> None:
    """A handler already waiting on the body learns of broken framing at once, not after
    body_timeout_s (30 s here)."""
    reader, writer = await edge.conns.open()
    writer.write(build("POST", "/v1/chat/completions", length=False,
                       headers={"Transfer-Encoding": "chunked"}))
    writer.write(b"5\r\n{\"mod\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)  # the handler now waits for the rest
    writer.write(b"ZZ\r\n")
    reply = await read_reply(reader)
    assert reply.status == 400 and "could not be read" in reply.error()["message"]
    assert edge.sim.stats.requests == 0


async def test_transfer_encoding_other_than_chunked_is_refused(edge: Edge) -> None:
    reply, reader = await edge.conns.ask(build("POST", "/v1/chat/completions", b"abc",
                                               length=False, headers={"Transfer-Encoding": "gzip"}))
    assert reply.status == 400 and reply.error()["type"] == "invalid_request_error"
    await assert_closed(reader)


async def test_upgrade_with_a_body_is_not_a_way_to_smuggle_a_request(edge: Edge) -> None:
    smuggled = build("GET", "/healthz")
    reader, writer = await edge.conns.open()
    writer.write(build("POST", "/v1/chat/completions", headers={
        "Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
        "Content-Length": str(len(smuggled))}))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(smuggled)  # the "body"
    reply = await read_reply(reader)
    assert reply.status == 400  # a body that is not JSON; and no answer to the GET in it
    writer.write(build("GET", "/readyz"))
    assert (await read_reply(reader)).json()["status"] == "ready"


async def test_bodyless_upgrade_is_answered_as_http11(edge: Edge) -> None:
    reader, writer = await edge.conns.open()
    writer.write(build("GET", "/healthz", headers={"Connection": "Upgrade",
                                                   "Upgrade": "websocket"})
                 + build("GET", "/readyz"))
    first, second = await read_reply(reader), await read_reply(reader)
    assert first.status == 200 and first.json() == {"status": "ok"}
    assert second.status == 200 and second.json()["status"] == "ready"


async def test_connect_gets_a_4xx_in_openai_shape(edge: Edge) -> None:
    reply, _ = await edge.conns.ask(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert 400 <= reply.status < 500
    reply.error()


# --------------------------------------------------------------------------- bad heads


async def test_malformed_request_line_gets_400_in_openai_shape_and_close(edge: Edge) -> None:
    reply, reader = await edge.conns.ask(b"GARBAGE\r\n\r\n")
    assert reply.status == 400
    assert reply.error()["message"].startswith("Malformed HTTP request")
    await assert_closed(reader)


async def test_a_refused_head_is_not_echoed_back(edge: Edge,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The parser's messages quote the bytes it refused; what the client sent (a key, in a
    header or the request line) must not come back in the error or go to the log."""
    secret = "sk-client-SECRET-1234"
    for head in (f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\x00\r\n\r\n",
                 f"GET /v1/models?key={secret}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
                 f"{secret} / HTTP/1.1\r\nHost: x\r\n\r\n"):
        reply, reader = await edge.conns.ask(head.encode("latin-1"))
        assert reply.status == 400 and secret not in reply.body.decode("latin-1")
        reply.error()
        await assert_closed(reader)
    logged = capsys.readouterr()
    assert secret not in logged.out + logged.err


async def test_request_line_too_long_gets_414(edge: Edge) -> None:
    reply, reader = await edge.conns.ask(build("GET", "/healthz?q=" + "a" * MAX_LINE_SIZE))
    assert reply.status == 414 and str(MAX_LINE_SIZE) in reply.error()["message"]
    await assert_closed(reader)


async def test_header_line_too_long_or_too_many_headers_get_431(edge: Edge) -> None:
    reply, reader = await edge.conns.ask(build("GET", "/healthz",
                                               headers={"X-Big": "b" * (MAX_FIELD_SIZE + 100)}))
    assert reply.status == 431 and str(MAX_FIELD_SIZE) in reply.error()["message"]
    await assert_closed(reader)
    many = {f"X-Pad-{n}": "p" for n in range(200)}
    reply, reader = await edge.conns.ask(build("GET", "/healthz", headers=many))
    assert reply.status == 431 and "too many headers" in reply.error()["message"]
    await assert_closed(reader)


async def test_a_large_header_split_before_its_end_is_accepted(edge: Edge) -> None:
    """A header under the limit, its end in a later segment than its start."""
    reader, writer = await edge.conns.open()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_FIELD_SIZE - 100))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"\r\n\r\n")
    assert (await read_reply(reader)).status == 200


async def test_missing_or_repeated_host_is_a_400_in_openai_shape(edge: Edge) -> None:
    """HTTP/1.1 requires exactly one Host (RFC 9112 section 3.2); HTTP/1.0 does not."""
    for head in (b"GET /healthz HTTP/1.1\r\n\r\n",
                 b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"):
        reply, reader = await edge.conns.ask(head)
        assert reply.status == 400 and "Host" in reply.error()["message"]
        await assert_closed(reader)
    reply, _ = await edge.conns.ask(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.status == 200
    assert edge.sim.stats.requests == 0


async def test_unknown_expectation_on_an_unknown_path_is_answered_in_openai_shape(
        edge: Edge) -> None:
    """aiohttp answers this before any middleware runs (its default Expect handler)."""
    reply, _ = await edge.conns.ask(build("GET", "/nowhere", headers={"Expect": "junk"}))
    assert reply.status == 417
    reply.error()
    reply, _ = await edge.conns.ask(build("GET", "/healthz", headers={"Expect": "junk"}))
    assert reply.status == 200  # ignored on a route of ours (RFC 9110 section 10.1.1)


# --------------------------------------------------------------------------- routing


async def test_unknown_path_and_wrong_method_keep_the_connection(edge: Edge) -> None:
    reader, writer = await edge.conns.open()
    writer.write(build("GET", "/nowhere") + build("DELETE", "/healthz")
                 + build("GET", "/v1/chat/completions") + build("GET", "/healthz"))
    await writer.drain()
    missing = await read_reply(reader)
    assert missing.status == 404 and "/nowhere" in missing.error()["message"]
    wrong = await read_reply(reader)
    assert wrong.status == 405 and wrong.headers["allow"] == "GET, HEAD"
    assert "GET, HEAD" in wrong.error()["message"]
    post_only = await read_reply(reader)
    assert post_only.status == 405 and post_only.headers["allow"] == "POST"
    ok = await read_reply(reader)
    assert ok.status == 200 and ok.json() == {"status": "ok"}


async def test_head_on_a_get_route_sends_headers_only(edge: Edge) -> None:
    reader, writer = await edge.conns.open()
    writer.write(build("HEAD", "/healthz") + build("GET", "/readyz"))
    await writer.drain()
    head = await read_reply(reader, head=True)
    assert head.status == 200 and head.headers["content-length"] == "15"
    # no body bytes: the very next bytes are the second answer's status line
    following = await read_reply(reader)
    assert following.json()["status"] == "ready"


async def test_admin_route_segments_are_percent_decoded_once(edge: Edge) -> None:
    reply, _ = await edge.conns.ask(build("POST", "/admin/instances/p0%3As0/drain"))
    assert reply.status == 200 and reply.json()["id"] == "p0:s0"
    reply, _ = await edge.conns.ask(build("POST", "/admin/instances/p0%253As0/drain"))
    assert reply.status == 404 and "p0%3As0" in reply.error()["message"]


# --------------------------------------------------------------------------- streams


async def test_stream_arrives_whole_chunked_with_the_route_headers(edge: Edge) -> None:
    reply, _ = await edge.conns.ask(post_chat("stream me", stream=True,
                                              headers={"x-request-id": "edge-stream-1"}))
    assert reply.status == 200
    assert reply.headers["transfer-encoding"] == "chunked" and "content-length" not in reply.headers
    assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert reply.headers["x-request-id"] == "edge-stream-1"
    assert reply.headers["x-route-instance"] == "p0:s0"
    assert reply.headers["x-route-attempts"] == "1" and reply.headers["x-route-plan-id"]
    assert reply.text() == answer_text(MODEL, "stream me", WORDS)
    assert reply.body.rstrip().endswith(b"data: [DONE]")


async def test_stream_to_an_http10_client_is_unframed_and_ends_with_the_connection(
        edge: Edge) -> None:
    reader, writer = await edge.conns.open()
    writer.write(post_chat("old stream", stream=True, version="HTTP/1.0"))
    async with asyncio.timeout(GUARD_S):
        raw = await reader.read()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert Reply("", 200, {}, body).text() == answer_text(MODEL, "old stream", WORDS)
    assert body.rstrip().endswith(b"data: [DONE]")


async def test_a_stream_to_a_client_that_does_not_read_waits_then_delivers_everything(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    words = 60_000  # ~ 10 MB of events: more than the kernel buffers to the client hold
    sim = await make_sim(MODEL, words=words)
    proxy = await make_proxy(edge_config(sim, timeouts={"idle_s": 30, "total_s": 120}))
    conns = Conns(proxy.port)
    try:
        reader, writer = await conns.open(rcvbuf=32 * 1024)
        writer.write(post_chat("a long one", stream=True))
        await writer.drain()
        # The client reads nothing for a while. The relay must wait for it (aiohttp's
        # writer pauses when the transport's buffer is full), not buffer the answer.
        await wait_for(lambda: sim.stats.inflight == 1, what="the upstream stream")
        server = proxy.runner.server
        assert server is not None
        waiting = 0
        for _ in range(20):
            await asyncio.sleep(0.1)
            buffered = max(c.transport.get_write_buffer_size() for c in server.connections
                           if c.transport is not None)
            assert buffered < 1024 * 1024, f"{buffered} bytes buffered for a client not reading"
            waiting += 1
        reply = await read_reply(reader)
        assert waiting == 20 and reply.status == 200
        assert reply.text() == answer_text(MODEL, "a long one", words)
        writer.write(build("GET", "/healthz"))  # the connection is still usable afterwards
        assert (await read_reply(reader)).status == 200
    finally:
        conns.close()


async def test_client_leaving_mid_stream_stops_the_relay_and_releases_the_upstream(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim(MODEL, words=2000, chunk_delay=0.01)
    proxy = await make_proxy(edge_config(sim))
    conns = Conns(proxy.port)
    reader, writer = await conns.open()
    writer.write(post_chat("then I leave", stream=True))
    async with asyncio.timeout(GUARD_S):
        await reader.readuntil(b"data: ")  # the stream has started
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()  # a reset, as from a killed client
    await wait_for(lambda: sim.stats.aborted == 1, what="the upstream stream to be closed")
    await wait_for(lambda: sim.stats.open_connections == 0, what="the upstream connection closed")
    state = proxy.app[STATE]
    await wait_for(lambda: state.recorder.metrics.inflight == 0, what="no request in flight")
    inst = state.registry.by_id["p0:s0"]
    assert inst.failures == 0  # the client's leaving is not held against the instance
    reply, _ = await conns.ask(post_chat("still serving"))
    assert reply.status == 200
    conns.close()


# --------------------------------------------------------------------------- graceful stop


async def test_graceful_stop_lets_a_running_stream_finish_and_refuses_new_connections(
        make_sim: MakeSim, tmp_path: Path) -> None:
    sim = await make_sim(MODEL, words=60, chunk_delay=0.02)
    config = edge_config(sim, store={"url": f"sqlite:///{tmp_path}/audit.db"})
    runner = await start(create_app(config), "127.0.0.1", 0, shutdown_timeout=10)
    port = bound_port(runner)
    conns = Conns(port)
    stopping: asyncio.Task[None] | None = None
    try:
        idle_reader, idle_writer = await conns.open()  # an idle keep-alive connection
        idle_writer.write(build("GET", "/healthz"))
        assert (await read_reply(idle_reader)).status == 200
        reader, writer = await conns.open()
        writer.write(post_chat("finish me", stream=True))
        async with asyncio.timeout(GUARD_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        stopping = asyncio.create_task(runner.cleanup())
        await assert_closed(idle_reader)  # idle connections are closed at once
        with pytest.raises(OSError):  # no longer accepting
            await asyncio.open_connection("127.0.0.1", port)
        assert not stopping.done()  # still waiting for the stream
        async with asyncio.timeout(GUARD_S):
            rest = await reader.read()  # the stream, to its end; then the connection closes
        assert Reply("", 200, {}, rest).text() == answer_text(MODEL, "finish me", 60)
        assert b"data: [DONE]" in rest and rest.endswith(b"0\r\n\r\n")
        async with asyncio.timeout(GUARD_S):
            await stopping
    finally:
        conns.close()
        if stopping is None:
            await runner.cleanup()


async def test_stop_with_a_short_grace_cancels_a_request_that_never_finishes(
        make_sim: MakeSim) -> None:
    sim = await make_sim(MODEL, faults=["hang"])
    config = edge_config(sim, timeouts={"connect_s": 1, "first_byte_s": 60, "idle_s": 60,
                                        "total_s": 120}, health={"enabled": False},
                         store={"enabled": False})
    runner: ProxyRunner = await start(create_app(config), "127.0.0.1", 0, shutdown_timeout=0.3)
    conns = Conns(bound_port(runner))
    try:
        reader, writer = await conns.open()
        writer.write(post_chat("never answered"))
        await writer.drain()
        await wait_for(lambda: sim.stats.inflight == 1, what="the upstream request")
        async with asyncio.timeout(GUARD_S):
            await runner.cleanup()
        await wait_for(lambda: sim.stats.open_connections == 0, what="the upstream closed")
        async with asyncio.timeout(GUARD_S):
            rest = await reader.read()
        assert b"200 OK" not in rest
    finally:
        conns.close()
