"""The proxy's upstream side under attack: hostile upstreams on raw sockets, forward
proxies, TLS.

Each hostile upstream is a raw asyncio server that writes exactly the bytes of its attack
(a library would refuse to produce them). While it attacks, the proxy must stay
responsive (`GET /healthz` answers within a second: a liveness bound, not a benchmark),
and the victim request must get a clear error or, as here, a failover to a good
simulator, with the reason recorded.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme

from proxy.config import parse_config
from proxy.providers.transport import Deadline
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, RunningProxy, chat_body, proxy_config, started
from tests.rawhttp import RawServer

PROMPT = "tell me about the upstream side"
TEXT = "an answer from the hostile upstream"
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Hostile"], Awaitable[None]]


class Hostile(RawServer):
    """A raw-socket upstream: `behave` runs once per connection, reads requests with
    `read_request` and writes whatever the attack needs. Counts what arrives."""

    def __init__(self, behave: Behaviour) -> None:
        super().__init__()
        self.behave = behave
        self.connections = 0
        self.requests = 0
        self.attacking = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.behave(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the proxy hung up on the attack: what it should do
        finally:
            writer.transport.abort()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One whole request (head and Content-Length body)."""
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(match.group(1))) if match else b""
        self.requests += 1
        return head + body

    async def flood(self, writer: asyncio.StreamWriter, first: bytes, piece: bytes,
                    cap: int = 256 * 1024 * 1024) -> None:
        """Write `first`, then `piece` again and again, until the proxy hangs up (or
        `cap` bytes: the test must end by itself)."""
        self.attacking.set()
        writer.write(first)
        sent = 0
        while sent < cap:
            writer.write(piece)
            sent += len(piece)
            await writer.drain()


MakeHostile = Callable[[Behaviour], Awaitable[Hostile]]


@pytest.fixture
async def make_hostile() -> AsyncIterator[MakeHostile]:
    async with started(Hostile) as make:
        yield make


@pytest.fixture
async def raw_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that shows the bytes as they came (no decoding of Content-Encoding)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def config_for(hostile: Hostile, good: Simulator, **sections: Any) -> Any:
    """The hostile upstream first (p0:s0), a good simulator behind it (p1:s1); no probes,
    so only the victim request meets the attack."""
    return proxy_config([("h", hostile.base_url), good], health={"enabled": False},
                        timeouts={"first_byte_s": 5, "idle_s": 5},
                        retry={"same_instance_retries": 0}, **sections)


async def assert_alive(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    """The proxy answers /healthz within a second, three times in a row."""
    for _ in range(3):
        async with asyncio.timeout(1.0), http.get(f"{proxy.url}/healthz") as resp:
            assert resp.status == 200


async def post_chat(http: aiohttp.ClientSession, proxy: RunningProxy,
                    stream: bool = False) -> tuple[int, Any, bytes]:
    async with http.post(f"{proxy.base_url}/chat/completions",
                         json=chat_body(PROMPT, stream=stream)) as resp:
        return resp.status, resp.headers, await resp.read()


async def under_attack(proxy: RunningProxy, http: aiohttp.ClientSession, hostile: Hostile,
                       stream: bool = False) -> tuple[int, Any, bytes]:
    """Send the victim request; once the attack has begun, check the proxy is alive."""
    victim = asyncio.create_task(post_chat(http, proxy, stream))
    async with asyncio.timeout(10):
        await hostile.attacking.wait()
    await assert_alive(proxy, http)
    async with asyncio.timeout(20):
        return await victim


async def reroute_reasons(proxy: RunningProxy, http: aiohttp.ClientSession,
                          request_id: str) -> list[str]:
    async with http.get(f"{proxy.url}/admin/events", params={"request_id": request_id}) as resp:
        events = (await resp.json())["events"]
    return [e["reason_code"] for e in reversed(events) if e["type"] == "REROUTED"]


def streamed_text(body: bytes) -> tuple[str, bool]:
    """(the content of an SSE chat stream, whether it ended with [DONE])."""
    text, done = "", False
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not event.startswith(b"data: "):
            continue
        if event == b"data: [DONE]":
            done = True
            continue
        for choice in orjson.loads(event[6:])["choices"]:
            text += choice["delta"].get("content") or ""
    return text, done


async def assert_served_by_the_good_one(proxy: RunningProxy, http: aiohttp.ClientSession,
                                        result: tuple[int, Any, bytes], stream: bool,
                                        reason: str) -> None:
    status, headers, body = result
    assert status == 200, body
    assert headers["x-route-instance"] == "p1:s1"
    assert headers["x-route-attempts"] == "2"
    if stream:
        assert streamed_text(body) == (answer_text("sim-model", PROMPT, 20), True)
    else:
        assert orjson.loads(body)["choices"][0]["message"]["content"] == \
            answer_text("sim-model", PROMPT, 20)
    assert await reroute_reasons(proxy, http, headers["x-request-id"]) == [reason]


# --------------------------------------------------------------------------- the head

HEAD_FLOODS = {
    # 20,000 copies of one header line: aiohttp stops at 128 header lines
    "repeated_header_lines": (b"HTTP/1.1 200 OK\r\n", b"X-Flood: x\r\n" * 1000),
    # one header value that never ends: aiohttp stops at 8190 bytes
    "endless_header_value": (b"HTTP/1.1 200 OK\r\nX-Endless: ", b"a" * 65536),
}


@pytest.mark.parametrize("attack", list(HEAD_FLOODS))
async def test_a_header_flood_fails_over_with_protocol_error(
        attack: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    first, piece = HEAD_FLOODS[attack]

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await h.read_request(reader)
        await h.flood(writer, first, piece, cap=20 * len(piece))  # 20,000 lines, or 1.3 MB

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim()))
    result = await under_attack(proxy, http, hostile)
    await assert_served_by_the_good_one(proxy, http, result, False, "UPSTREAM_PROTOCOL_ERROR")


# --------------------------------------------------------------------------- the body

OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n"
BODY_FLOODS = {
    # no length: the body runs until the connection closes, and it does not
    "endless_body_until_close": (OK_JSON + b"\r\n", b"x" * 65536),
    "endless_chunked_body": (OK_JSON + CHUNKED, b"10000\r\n" + b"x" * 65536 + b"\r\n"),
    "gigantic_chunk_size": (OK_JSON + CHUNKED + b"7fffffffffffffff\r\n", b"x" * 65536),
    "chunk_size_overflowing_64_bits": (OK_JSON + CHUNKED + b"f" * 40 + b"\r\n", b"x" * 65536),
    "content_length_of_a_terabyte": (OK_JSON + b"Content-Length: 1000000000000\r\n\r\n",
                                     b"x" * 65536),
}


@pytest.mark.parametrize("attack", list(BODY_FLOODS))
async def test_an_endless_body_is_bounded_by_max_response_bytes(
        attack: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    first, piece = BODY_FLOODS[attack]

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await h.read_request(reader)
        await h.flood(writer, first, piece)

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim(),
                                        upstream={"max_response_bytes": 4 * 1024 * 1024}))
    result = await under_attack(proxy, http, hostile)
    await assert_served_by_the_good_one(proxy, http, result, False, "UPSTREAM_PROTOCOL_ERROR")


@pytest.mark.parametrize("framing", ["content_length", "chunked"])
async def test_a_whole_answer_over_max_response_bytes_arriving_at_once_fails_over(
        framing: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """A complete JSON answer over the limit, written in one piece with its head: it is
    all there when the proxy looks (taken without a wait), and still refused."""
    body = b'{"choices": [], "pad": "' + b"x" * 4096 + b'"}'
    if framing == "chunked":
        answer = OK_JSON + CHUNKED + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    else:
        answer = OK_JSON + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)

    await answered_at_once_fails_over(answer, 1024, make_hostile, make_sim, make_proxy, http)


def written_at_once(answer: bytes, close: bool) -> Behaviour:
    """An upstream that writes `answer` (head and body) in one piece, then closes at once
    (`close`) or waits for the proxy to hang up."""
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await h.read_request(reader)
        h.attacking.set()
        writer.write(answer)
        await writer.drain()
        if close:
            writer.transport.abort()
        else:
            await reader.read()  # until the proxy hangs up
    return behave


async def answered_at_once_fails_over(answer: bytes, max_response_bytes: int,
                                      make_hostile: MakeHostile, make_sim: MakeSim,
                                      make_proxy: MakeProxy,
                                      http: aiohttp.ClientSession) -> None:
    """An upstream writes `answer` (head and body) in one piece, then waits for the proxy
    to hang up: with `upstream.max_response_bytes` set, the request is served by the good
    instance after an UPSTREAM_PROTOCOL_ERROR."""
    hostile = await make_hostile(written_at_once(answer, close=False))
    proxy = await make_proxy(config_for(hostile, await make_sim(),
                                        upstream={"max_response_bytes": max_response_bytes}))
    result = await under_attack(proxy, http, hostile)
    await assert_served_by_the_good_one(proxy, http, result, False, "UPSTREAM_PROTOCOL_ERROR")


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + CHUNKED
SSE_FLOODS = {
    "one_endless_line": b"data: {\"choices\": [\"" + b"a" * 65536,
    "lines_but_never_a_blank_one": b"data: a\n" * 8192,
}


@pytest.mark.parametrize("attack", list(SSE_FLOODS))
async def test_an_sse_event_without_end_is_bounded_by_max_event_bytes(
        attack: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    piece = SSE_FLOODS[attack]

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await h.read_request(reader)
        await h.flood(writer, SSE_HEAD, b"%x\r\n%b\r\n" % (len(piece), piece))

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim(),
                                        upstream={"max_event_bytes": 256 * 1024}))
    result = await under_attack(proxy, http, hostile, stream=True)
    await assert_served_by_the_good_one(proxy, http, result, True, "UPSTREAM_PROTOCOL_ERROR")


# --------------------------------------------------------------------------- compressed answers

def completion(text: str) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-hostile", "object": "chat.completion", "created": 1,
        "model": "sim-model", "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}})


def chunk_event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": 1,
        "model": "sim-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


COMPRESSORS = {"gzip": 31, "deflate": 15}  # zlib wbits: gzip container, zlib container


@pytest.mark.parametrize("encoding", list(COMPRESSORS))
async def test_a_compressed_answer_reaches_the_client_decoded(
        encoding: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        raw_http: aiohttp.ClientSession) -> None:
    """The proxy asks for identity; a server that compresses anyway must not reach the
    client as compressed bytes labelled plain JSON."""
    body = completion(TEXT)
    packed = zlib.compressobj(wbits=COMPRESSORS[encoding])
    data = packed.compress(body) + packed.flush()
    if encoding == "gzip":
        assert gzip.decompress(data) == body

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await h.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Encoding: %b\r\nContent-Length: %d\r\n\r\n%b"
                     % (encoding.encode(), len(data), data))
        await writer.drain()
        await reader.read()  # until the proxy closes

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim()))
    status, headers, got = await post_chat(raw_http, proxy)
    assert status == 200
    assert headers["x-route-instance"] == "p0:s0"
    assert "Content-Encoding" not in headers
    assert headers["Content-Type"].startswith("application/json")
    assert got == body


@pytest.mark.parametrize("encoding", list(COMPRESSORS))
async def test_a_compressed_answer_arriving_whole_is_measured_decoded(
        encoding: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """A compressed answer, all of it written with its head, a few hundred bytes packed
    and 64 KiB decoded: `upstream.max_response_bytes` (8 KiB) is the decoded size's limit,
    as when the body is read as it arrives, so it fails over."""
    body = b'{"choices": [], "pad": "' + b"x" * 65536 + b'"}'
    packed = zlib.compressobj(wbits=COMPRESSORS[encoding])
    data = packed.compress(body) + packed.flush()
    assert len(data) < 1024

    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Content-Encoding: %b\r\nContent-Length: %d\r\n\r\n%b"
              % (encoding.encode(), len(data), data))
    await answered_at_once_fails_over(answer, 8192, make_hostile, make_sim, make_proxy, http)


async def test_a_gzipped_stream_reaches_the_client_decoded_event_by_event(
        make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        raw_http: aiohttp.ClientSession) -> None:
    words = TEXT.split(" ")
    events = [chunk_event({"role": "assistant", "content": ""})]
    events += [chunk_event({"content": w + (" " if i < len(words) - 1 else "")})
               for i, w in enumerate(words)]
    events += [chunk_event({}, "stop"), b"data: [DONE]\n\n"]

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await h.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Content-Encoding: gzip\r\n" + CHUNKED)
        packer = zlib.compressobj(wbits=31)
        for event in events:  # each event flushed on its own, as a streaming server does
            piece = packer.compress(event) + packer.flush(zlib.Z_SYNC_FLUSH)
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.005)
        tail = packer.flush()
        writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(tail), tail))
        await writer.drain()
        await reader.read()

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim()))
    status, headers, got = await post_chat(raw_http, proxy, stream=True)
    assert status == 200
    assert headers["x-route-instance"] == "p0:s0"
    assert "Content-Encoding" not in headers
    assert streamed_text(got) == (TEXT, True)


# --------------------------------------------------------------------------- framing

async def test_a_second_unsolicited_response_is_not_taken_for_the_next_answer(
        make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    first, smuggled, third = completion("first"), completion("smuggled"), completion("third")

    def response(body: bytes) -> bytes:
        return OK_JSON + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        while True:
            await h.read_request(reader)
            # The first answer comes with a second one nobody asked for, in one packet.
            writer.write(response(first) + response(smuggled) if h.requests == 1
                         else response(third))
            await writer.drain()

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim()))
    answers = []
    for _ in range(2):
        status, headers, body = await post_chat(http, proxy)
        assert status == 200 and headers["x-route-instance"] == "p0:s0"
        answers.append(body)
    assert answers == [first, third]  # not merged, and never handed to the next request
    assert hostile.requests == 2
    assert hostile.connections == 2  # the connection that carried extra bytes was dropped


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_101_is_not_relayed_as_an_answer(
        stream: bool, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await h.read_request(reader)
        h.attacking.set()
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x05hello")
        await writer.drain()
        await reader.read()

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim()))
    result = await under_attack(proxy, http, hostile, stream=stream)
    await assert_served_by_the_good_one(proxy, http, result, stream, "UPSTREAM_PROTOCOL_ERROR")


# --------------------------------------------------------------------------- no hidden re-sends

@pytest.mark.parametrize("same_instance_retries,instance,attempts", [
    (0, "p1:s1", "2"),  # the silent one is left at once
    (1, "p0:s0", "2"),  # one counted retry there, on a fresh connection, which answers
])
async def test_a_post_on_a_kept_alive_connection_that_dies_silent_is_not_resent_unseen(
        same_instance_retries: int, instance: str, attempts: str, make_hostile: MakeHostile,
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    """The upstream answers a first request on a connection, then reads the second one on
    that same kept-alive connection, stays silent 1.5 s and closes. The library must not
    send that POST again by itself: every request that reaches the upstream is an
    attempt the client is told about."""
    silent_closes = 0

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        nonlocal silent_closes
        await h.read_request(reader)
        body = completion(TEXT)
        writer.write(OK_JSON + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        await h.read_request(reader)  # the second request on this connection
        await asyncio.sleep(1.5)
        silent_closes += 1

    hostile = await make_hostile(behave)
    good = await make_sim()
    proxy = await make_proxy(proxy_config(
        [("h", hostile.base_url), good], health={"enabled": False},
        timeouts={"first_byte_s": 5}, retry={"same_instance_retries": same_instance_retries}))
    status, headers, _ = await post_chat(http, proxy)
    assert (status, headers["x-route-instance"], headers["x-route-attempts"]) == \
        (200, "p0:s0", "1")
    assert hostile.connections == 1

    status, headers, _ = await post_chat(http, proxy)
    assert status == 200
    assert (headers["x-route-instance"], headers["x-route-attempts"]) == (instance, attempts)
    assert silent_closes == 1  # the kept-alive connection was reused, and died silent
    # Every request that arrived anywhere is one the client was told about.
    assert hostile.requests - 1 + good.stats.requests == int(attempts)
    assert await reroute_reasons(proxy, http, headers["x-request-id"]) == \
        (["PROCESS_EXITED"] if same_instance_retries == 0 else [])


# --------------------------------------------------------------------------- answers that say nothing

def answering(answer: bytes) -> Behaviour:
    """An upstream that answers every request on a connection with these bytes."""

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        while True:
            await h.read_request(reader)
            writer.write(answer)
            await writer.drain()

    return behave


EMPTY_STREAMS = {
    "only_done": b"data: [DONE]\n\n",
    "a_role_chunk_then_the_end": chunk_event({"role": "assistant", "content": ""}),
    "nothing_at_all": b"",
}


@pytest.mark.parametrize("shape", list(EMPTY_STREAMS))
async def test_a_stream_that_ends_before_any_output_is_tried_once_more_then_fails_over_as_EMPTY_STREAM(
        shape: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    events = EMPTY_STREAMS[shape]
    hostile = await make_hostile(answering(
        SSE_HEAD + (b"%x\r\n%b\r\n" % (len(events), events) if events else b"")
        + b"0\r\n\r\n"))
    proxy = await make_proxy(proxy_config(
        [("h", hostile.base_url), await make_sim()], health={"enabled": False},
        timeouts={"first_byte_s": 5, "idle_s": 5}, retry={"same_instance_retries": 1}))
    status, headers, body = await post_chat(http, proxy, stream=True)
    assert (status, headers["x-route-instance"], headers["x-route-attempts"]) == \
        (200, "p1:s1", "3")
    assert streamed_text(body) == (answer_text("sim-model", PROMPT, 20), True)
    assert hostile.requests == 2  # the same-instance retry of a blip, then the next one
    assert await reroute_reasons(proxy, http, headers["x-request-id"]) == ["EMPTY_STREAM"]
    async with http.get(f"{proxy.url}/admin/instances") as resp:
        rows = {row["id"]: row for row in (await resp.json())["instances"]}
    # Two strikes, not a connection failure: the circuit is still closed.
    assert (rows["p0:s0"]["circuit"], rows["p0:s0"]["failures"]) == ("closed", 2)


UNREADABLE_MESSAGES = {"not_json": b"<html>oops</html>", "a_json_list": b"[1, 2]",
                       "content_not_a_list": b'{"content": 7, "stop_reason": "end_turn"}'}


@pytest.mark.parametrize("shape", list(UNREADABLE_MESSAGES))
async def test_an_unreadable_messages_api_answer_fails_over_as_RESPONSE_MALFORMED(
        shape: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    body = UNREADABLE_MESSAGES[shape]
    hostile = await make_hostile(answering(
        OK_JSON + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)))
    good = await make_sim()
    proxy = await make_proxy(parse_config({
        "health": {"enabled": False}, "timeouts": {"first_byte_s": 5},
        "providers": [
            {"provider_id": "claude", "kind": "anthropic", "instances": [
                {"id": "h", "base_url": hostile.base_url + "/v1", "api_key": "k" * 20,
                 "metadata": {"model": "claude-x"}}]},
            {"provider_id": "p1", "instances": [
                {"id": "s1", "base_url": good.base_url, "metadata": {"model": good.model}}]}]},
        "<test>"))
    status, headers, answer = await post_chat(http, proxy)
    assert (status, headers["x-route-instance"], headers["x-route-attempts"]) == \
        (200, "p1:s1", "2"), answer
    assert await reroute_reasons(proxy, http, headers["x-request-id"]) == ["RESPONSE_MALFORMED"]


# --------------------------------------------------------------------------- TLS and proxies

async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class TlsFront(RawServer):
    """Terminates TLS with a test certificate and relays the bytes to a plain upstream."""

    def __init__(self, context: ssl.SSLContext, upstream_port: int) -> None:
        super().__init__(context)
        self.upstream_port = upstream_port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


class ConnectProxy(RawServer):
    """A forward proxy that opens CONNECT tunnels, to 127.0.0.1 for the names it knows
    (they resolve nowhere else). Records every tunnel asked for."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names
        self.tunnels: list[str] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
        self.tunnels.append(f"{method} {target}")
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or host not in self.names:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_front(ca: trustme.CA) -> AsyncIterator[Callable[..., Awaitable[TlsFront]]]:
    """`await tls_front(port, client_ca=None)`: TLS with a certificate of `ca` for
    cloud.test, in front of 127.0.0.1:port (asking for a client certificate of
    `client_ca` when given); stopped at the end of the test."""
    def front(upstream_port: int, client_ca: trustme.CA | None = None) -> TlsFront:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("cloud.test", "localhost", "127.0.0.1").configure_cert(context)
        if client_ca is not None:  # mutual TLS: the proxy must show a certificate
            context.verify_mode = ssl.CERT_REQUIRED
            client_ca.configure_trust(context)
        return TlsFront(context, upstream_port)

    async with started(front) as make:
        yield make


def ask_model(model: str, stream: bool = False) -> dict[str, Any]:
    return chat_body(PROMPT, model=model, stream=stream)


async def test_a_cloud_instance_reached_only_through_https_proxy_while_no_proxy_keeps_local_direct(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession, ca: trustme.CA,
        tls_front: Callable[..., Awaitable[TlsFront]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    local, cloud = await make_sim("local-model"), await make_sim("cloud-model")
    front = await tls_front(cloud.port)
    forward = ConnectProxy({"cloud.test"})
    await forward.start()
    try:
        for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{forward.port}")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{forward.port}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        # cloud.test resolves nowhere: only the forward proxy knows where it is.
        proxy = await make_proxy(proxy_config_with_tls(
            local, f"https://cloud.test:{front.port}/v1", {"ca_file": str(tmp_path / "ca.pem")}))
        for stream in (False, True):
            async with http.post(f"{proxy.base_url}/chat/completions",
                                 json=ask_model("cloud-model", stream)) as resp:
                body = await resp.read()
                assert resp.status == 200, body
                assert resp.headers["x-route-instance"] == "p1:s1"
                assert resp.headers["x-route-attempts"] == "1"
            expected = answer_text("cloud-model", PROMPT, 20)
            if stream:
                assert streamed_text(body) == (expected, True)
            else:
                assert orjson.loads(body)["choices"][0]["message"]["content"] == expected
        async with http.post(f"{proxy.base_url}/chat/completions",
                             json=ask_model("local-model")) as resp:
            assert resp.status == 200
            assert resp.headers["x-route-instance"] == "p0:s0"
        assert cloud.stats.requests == 2 and local.stats.requests == 1
        # Only the cloud went through the forward proxy (one kept-alive tunnel or more).
        assert forward.tunnels and set(forward.tunnels) == {f"CONNECT cloud.test:{front.port}"}
    finally:
        await forward.stop()


def proxy_config_with_tls(first: Simulator, https_url: str, tls: dict[str, Any] | None,
                          **sections: Any) -> Any:
    """p0:s0 a plain simulator, p1:s1 an https:// instance with these `tls:` settings."""
    from proxy.config import parse_config

    https: dict[str, Any] = {"id": "s1", "base_url": https_url,
                             "metadata": {"model": "cloud-model"}}
    if tls is not None:
        https["tls"] = tls
    doc: dict[str, Any] = {
        "timeouts": {"connect_s": 1, "first_byte_s": 2, "idle_s": 2, "total_s": 30},
        "health": {"enabled": False},
        "retry": {"same_instance_retries": 0},
        "providers": [
            {"provider_id": "p0", "instances": [
                {"id": "s0", "base_url": first.base_url, "metadata": {"model": first.model}}]},
            {"provider_id": "p1", "local": False, "instances": [https]},
        ],
        **sections,
    }
    return parse_config(doc, "<test>")


@pytest.mark.parametrize("tls,served_by,reasons", [
    ("ca_file", "p1:s1", []),
    (None, "p0:s0", ["CONN_REFUSED"]),  # the system's CAs do not know the test CA
    ("verify_off", "p1:s1", []),
])
async def test_an_https_instance_with_its_own_ca(
        tls: str | None, served_by: str, reasons: list[str], make_sim: MakeSim,
        make_proxy: MakeProxy, http: aiohttp.ClientSession, ca: trustme.CA,
        tls_front: Callable[..., Awaitable[TlsFront]], tmp_path: Path) -> None:
    plain, secure = await make_sim("plain-model"), await make_sim("cloud-model")
    front = await tls_front(secure.port)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    choices: dict[str, dict[str, Any]] = {"ca_file": {"ca_file": str(tmp_path / "ca.pem")},
                                           "verify_off": {"verify": False}}
    settings = choices.get(tls or "")
    proxy = await make_proxy(proxy_config_with_tls(
        plain, f"https://localhost:{front.port}/v1", settings))
    async with http.post(f"{proxy.base_url}/chat/completions",
                         json=ask_model("cloud-model")) as resp:
        body = await resp.read()
        assert resp.status == 200, body
        assert resp.headers["x-route-instance"] == served_by
        request_id = resp.headers["x-request-id"]
    if served_by == "p1:s1":
        assert orjson.loads(body)["choices"][0]["message"]["content"] == \
            answer_text("cloud-model", PROMPT, 20)
    assert await reroute_reasons(proxy, http, request_id) == reasons


async def test_mutual_tls_with_a_client_certificate(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession, ca: trustme.CA,
        tls_front: Callable[..., Awaitable[TlsFront]], tmp_path: Path) -> None:
    plain, secure = await make_sim("plain-model"), await make_sim("cloud-model")
    client_ca = trustme.CA()
    front = await tls_front(secure.port, client_ca=client_ca)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_ca.issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client.pem"))
    url = f"https://localhost:{front.port}/v1"
    without = await make_proxy(proxy_config_with_tls(plain, url,
                                                     {"ca_file": str(tmp_path / "ca.pem")}))
    with_cert = await make_proxy(proxy_config_with_tls(plain, url, {
        "ca_file": str(tmp_path / "ca.pem"), "client_cert": str(tmp_path / "client.pem")}))
    for proxy, served_by in ((without, "p0:s0"), (with_cert, "p1:s1")):
        async with http.post(f"{proxy.base_url}/chat/completions",
                             json=ask_model("cloud-model")) as resp:
            assert resp.status == 200
            assert resp.headers["x-route-instance"] == served_by


# ------------------------------------------------------------------ the first-byte deadline


async def test_a_deadline_that_passes_is_a_timeout_and_leaves_the_task_uncancelled() -> None:
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        with Deadline(0.01):
            await never
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left pending for the next wait
    with Deadline(5.0):  # a wait that ends in time is untouched
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


async def test_a_cancellation_from_elsewhere_passes_through_a_deadline() -> None:
    """The client leaving while the proxy waits for an upstream's head: the handler is
    cancelled, and that must stay a cancellation, not become a timeout."""
    entered = asyncio.Event()

    async def waiting() -> None:
        with Deadline(5.0):
            entered.set()
            await asyncio.get_running_loop().create_future()

    task = asyncio.create_task(waiting())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


HOSTILE_KEY = "sk-hostile-SECRET-ffff6666"


async def test_an_upstream_quoting_its_key_in_a_failure_reaches_no_event_or_admin_output(
        make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """A 200 that is no answer, its Content-Type quoting the Authorization it was sent:
    the failure's detail (in the REROUTED event, the instance's state reason) shows the
    key masked, as an error body quoting it is."""

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        request = await h.read_request(reader)
        sent = re.search(rb"(?i)\r\nauthorization: *([^\r]*)", request)
        assert sent is not None and HOSTILE_KEY.encode() in sent.group(1)
        h.attacking.set()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; you-sent=%b\r\n"
                     b"Content-Length: 6\r\n\r\n<html>" % sent.group(1))
        await writer.drain()
        await reader.read()

    hostile = await make_hostile(behave)
    good = await make_sim()
    proxy = await make_proxy(parse_config({
        "health": {"enabled": False}, "timeouts": {"first_byte_s": 5, "idle_s": 5},
        "retry": {"same_instance_retries": 0},
        "providers": [
            {"provider_id": "p0", "instances": [{"id": "s0", "base_url": hostile.base_url,
                                                 "api_key": HOSTILE_KEY}]},
            {"provider_id": "p1", "instances": [{"id": "s1", "base_url": good.base_url,
                                                 "metadata": {"model": good.model}}]}]},
        "<test>"))
    result = await under_attack(proxy, http, hostile)
    assert result[0] == 200 and result[1]["x-route-instance"] == "p1:s1"
    async with http.get(f"{proxy.url}/admin/events",
                        params={"request_id": result[1]["x-request-id"]}) as resp:
        events = await resp.text()
    assert "UPSTREAM_PROTOCOL_ERROR" in events and "you-sent=Bearer ***" in events
    async with http.get(f"{proxy.url}/admin/instances") as resp:
        instances = await resp.text()
    assert HOSTILE_KEY not in events + instances


def _whole_answers() -> dict[str, tuple[bytes, bool]]:
    """Answers written in one piece with their head, then the connection closed: (bytes,
    whether they are a whole answer the client gets)."""
    body = completion(TEXT)
    return {
        "chunked_with_trailers": (OK_JSON + CHUNKED + b"%x\r\n%b\r\n0\r\nX-Trailer: t\r\n\r\n"
                                  % (len(body), body), True),
        "length_then_close": (OK_JSON + b"Content-Length: %d\r\n\r\n%b" % (len(body), body),
                              True),
        "length_longer_than_the_body": (OK_JSON + b"Content-Length: %d\r\n\r\n%b"
                                        % (len(body) + 10, body), False),
        "chunked_without_its_last_chunk": (OK_JSON + CHUNKED + b"%x\r\n%b\r\n"
                                           % (len(body), body), False),
    }


@pytest.mark.parametrize("answer", list(_whole_answers()))
async def test_an_answer_in_one_piece_then_a_close_is_served_only_when_complete(
        answer: str, make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """The answer arrives in one piece and the connection closes at once: a complete
    one (chunked with trailers, or its Content-Length) is the answer; one cut short (fewer
    bytes than its length says, no last chunk) fails over (UPSTREAM_PROTOCOL_ERROR or
    the process gone), never reaching the client truncated."""
    data, complete = _whole_answers()[answer]
    hostile = await make_hostile(written_at_once(data, close=True))
    proxy = await make_proxy(config_for(hostile, await make_sim()))
    status, headers, body = await under_attack(proxy, http, hostile)
    assert status == 200, body
    if complete:
        assert headers["x-route-instance"] == "p0:s0"
        assert orjson.loads(body)["choices"][0]["message"]["content"] == TEXT
    else:
        assert headers["x-route-instance"] == "p1:s1"
        assert len(await reroute_reasons(proxy, http, headers["x-request-id"])) == 1


@pytest.mark.parametrize("pinned", [True, False])
async def test_an_upstream_listing_its_key_as_a_model_reaches_no_admin_output(
        pinned: bool, make_hostile: MakeHostile, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """Probed, the server lists the Authorization it was sent as its model: pinned to
    another model, the instance is a mismatch, and its state reason (in /admin/instances
    and the INSTANCE_STATE_CHANGED event) shows the key masked; not pinned, the
    fingerprint it learns does."""

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        while True:
            request = await h.read_request(reader)
            sent = re.search(rb"(?i)\r\nauthorization: *([^\r]*)", request)
            listing = orjson.dumps({"object": "list", "data": [
                {"id": (sent.group(1) if sent else b"none").decode(), "object": "model"}]})
            writer.write(OK_JSON + b"Content-Length: %d\r\n\r\n%b" % (len(listing), listing))
            await writer.drain()

    hostile = await make_hostile(behave)
    proxy = await make_proxy(parse_config({
        "health": {"interval_s": 0.2, "timeout_s": 5},
        "providers": [{"provider_id": "p", "instances": [
            {"id": "s0", "base_url": hostile.base_url + "/v1", "api_key": HOSTILE_KEY,
             "fingerprint": {"model": "m" if pinned else "auto"}}]}]}, "<test>"))
    async with asyncio.timeout(20):
        while True:
            async with http.get(f"{proxy.url}/admin/instances") as resp:
                (instance,) = (await resp.json())["instances"]
            if instance["state"] == ("MISMATCH" if pinned else "READY") \
                    and (pinned or instance["fingerprint_models"]):
                break
            await asyncio.sleep(0.1)
    async with http.get(f"{proxy.url}/admin/events",
                        params={"type": "INSTANCE_STATE_CHANGED"}) as resp:
        events = await resp.text()
    shown = instance["state_reason"] if pinned else instance["fingerprint_models"][0]
    assert "Bearer ***" in shown, instance
    assert HOSTILE_KEY not in orjson.dumps(instance).decode() + events
