"""The simulated backend: wire format, determinism, prefill, faults, control, CLI.

Everything runs over real sockets on 127.0.0.1 with aiohttp and the official
openai SDK as clients; hang/stall checks use tiny client timeouts.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.sim.faults import parse_faults
from proxy.sim.simulator import Simulator
from proxy.sim.text import (
    answer_text,
    answer_words,
    embedding_vector,
    prompt_of_messages,
    stream_pieces,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sim-a"
WORDS = 12
USER: list[Any] = [{"role": "user", "content": "hello there"}]
PROMPT = prompt_of_messages(USER)
FULL = answer_text(MODEL, PROMPT, WORDS)


# --------------------------------------------------------------------------- fixtures & helpers


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(MODEL, words=WORDS)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=sim.base_url + "/v1", api_key="x", max_retries=0, timeout=5)
    yield c
    await c.close()


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def post(http: aiohttp.ClientSession, sim: Simulator, path: str, body: Any,
               **kw: Any) -> tuple[int, Any]:
    async with http.post(sim.base_url + path, json=body, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


async def raw_stream(
    http: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any], path: str = "/v1/chat/completions",
    timeout: aiohttp.ClientTimeout | None = None,
) -> tuple[list[str], BaseException | None]:
    """POST a streaming request; return the ``data:`` payloads and the error that ended it, if any."""
    datas: list[str] = []
    err: BaseException | None = None
    async with http.post(sim.base_url + path, json={"stream": True, **body}, timeout=timeout) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        try:
            async for line in resp.content:
                text = line.decode()
                if text.startswith("data: "):
                    datas.append(text[6:].rstrip("\n"))
                else:
                    assert text == "\n"
        except (TimeoutError, aiohttp.ClientError) as exc:
            err = exc
    return datas, err


def chunks(datas: list[str]) -> list[dict[str, Any]]:
    return [orjson.loads(d) for d in datas if d != "[DONE]"]


def contents(datas: list[str]) -> list[str]:
    """Content pieces of chat chunks, skipping the empty role chunk."""
    out = []
    for c in chunks(datas):
        for ch in c.get("choices", []):
            piece = ch["delta"].get("content")
            if piece:
                out.append(piece)
    return out


def chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **kw}


# --------------------------------------------------------------------------- simtext


def test_answer_words_are_deterministic_indexed_and_prefix_stable() -> None:
    words = answer_words("m", "p", 50)
    assert len(words) == 50 and len(set(words)) == 50
    assert all(w.endswith(str(i)) and w[: -len(str(i))].isalpha() for i, w in enumerate(words))
    assert words == answer_words("m", "p", 50)
    assert answer_words("m", "p", 7) == words[:7]
    assert answer_words("m2", "p", 50) != words
    assert answer_words("m", "p2", 50) != words
    # even one-word answers differ between prompts
    firsts = {answer_words("m", f"prompt {i}", 1)[0] for i in range(200)}
    assert len(firsts) > 190
    assert answer_text("m", "p", 5) == " ".join(words[:5])
    assert answer_words("m", "p", 0) == []


def test_stream_pieces_join_to_the_text() -> None:
    words = answer_words("m", "p", 6)
    pieces = stream_pieces(words)
    assert pieces[0] == words[0] and all(p.startswith(" ") for p in pieces[1:])
    assert "".join(pieces) == answer_text("m", "p", 6)
    assert stream_pieces([]) == []


def test_prompt_of_messages() -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": " here"}]},
    ]
    assert prompt_of_messages(msgs) == "be brief\nlook here"
    # a trailing assistant message is the prefill, not part of the prompt
    assert prompt_of_messages([*msgs, {"role": "assistant", "content": "abc"}]) == "be brief\nlook here"
    # ... but an assistant turn in the middle is
    mid = [*msgs, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    assert prompt_of_messages(mid) == "be brief\nlook here\nok\nmore"
    assert prompt_of_messages([{"role": "user", "content": None}]) == ""


def test_embedding_vector_is_deterministic_unit() -> None:
    v = embedding_vector("abc")
    assert len(v) == 8 and v == embedding_vector("abc") and v != embedding_vector("abd")
    assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-9)


def test_parse_faults() -> None:
    f = parse_faults(["die_after=3", "times=2", "no_done", "rate_limit=5"])
    assert (f.die_after, f.times, f.no_done, f.rate_limit) == (3, 2, True, "5")
    assert f.spec == ("die_after=3", "no_done", "rate_limit=5", "times=2")
    assert parse_faults(["slow_first_byte=0.5"]).slow_first_byte == 0.5
    for bad, msg in [
        (["explode"], "unknown fault 'explode'"),
        (["die_after"], "needs a value"),
        (["die_after=x"], "needs an integer"),
        (["hang=1"], "takes no value"),
        (["status=200"], "400-599"),
        (["refuse", "times=1"], "cannot be combined"),
        (["rate_limit=-1"], "seconds >= 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_faults(bad)
    with pytest.raises(ValueError):
        Simulator("m", faults=["nope"])


# --------------------------------------------------------------------------- happy path


async def test_openai_chat_non_stream(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model=MODEL, messages=USER)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    assert r.choices[0].message.content == FULL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, WORDS, WORDS + 2)


async def test_openai_chat_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    got = [c async for c in stream]
    assert got[0].choices[0].delta.role == "assistant" and got[0].choices[0].delta.content == ""
    pieces = [c.choices[0].delta.content for c in got[1:] if c.choices and c.choices[0].delta.content]
    assert pieces == stream_pieces(answer_words(MODEL, PROMPT, WORDS))
    assert "".join(pieces) == FULL
    assert got[-2].choices[0].finish_reason == "stop"
    assert got[-1].choices == [] and got[-1].usage is not None and got[-1].usage.completion_tokens == WORDS
    assert len({c.id for c in got}) == 1 and len({c.created for c in got}) == 1
    assert all(c.model == MODEL and c.object == "chat.completion.chunk" for c in got)


async def test_raw_stream_format(http: aiohttp.ClientSession, sim: Simulator) -> None:
    async with http.post(sim.base_url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    objs = [orjson.loads(e[6:]) for e in events[:-2]]
    assert len(objs) == 1 + WORDS + 1  # role, pieces, finish (no usage unless asked)
    assert objs[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert objs[1]["choices"] == [{"index": 0, "delta": {"content": FULL.split()[0]}, "finish_reason": None}]
    assert sim.stats.completed_streams == 1


async def test_determinism_across_simulators(http: aiohttp.ClientSession) -> None:
    texts = []
    for model in (MODEL, MODEL, "sim-b"):
        s = Simulator(model, words=WORDS)
        await s.start()
        try:
            _, body = await post(http, s, "/v1/chat/completions", chat_body())
            texts.append(body["choices"][0]["message"]["content"])
        finally:
            await s.stop()
    assert texts[0] == texts[1] == FULL
    assert texts[2] == answer_text("sim-b", PROMPT, WORDS) != FULL


async def test_max_tokens_caps(http: aiohttp.ClientSession, sim: Simulator) -> None:
    _, body = await post(http, sim, "/v1/chat/completions", chat_body(max_tokens=5))
    assert body["choices"][0]["message"]["content"] == answer_text(MODEL, PROMPT, 5)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    _, body = await post(http, sim, "/v1/chat/completions", chat_body(max_completion_tokens=3))
    assert body["choices"][0]["message"]["content"] == answer_text(MODEL, PROMPT, 3)
    _, body = await post(http, sim, "/v1/chat/completions", chat_body(max_tokens=WORDS))
    assert body["choices"][0]["finish_reason"] == "stop"
    datas, err = await raw_stream(http, sim, chat_body(max_tokens=4))
    assert err is None and "".join(contents(datas)) == answer_text(MODEL, PROMPT, 4)
    assert chunks(datas)[-1]["choices"][0]["finish_reason"] == "length"
    status, body = await post(http, sim, "/v1/chat/completions", chat_body(max_tokens="many"))
    assert status == 400 and body["error"]["param"] == "max_tokens"


async def test_legacy_completions(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(model=MODEL, prompt="say", max_tokens=4)
    assert r.object == "text_completion"
    assert r.choices[0].text == answer_text(MODEL, "say", 4) and r.choices[0].finish_reason == "length"
    stream = await client.completions.create(model=MODEL, prompt=["say", "ignored"], stream=True)
    got = [c async for c in stream]
    assert "".join(c.choices[0].text for c in got if c.choices) == answer_text(MODEL, "say", WORDS)
    assert got[-1].choices[0].finish_reason == "stop"


async def test_embeddings(client: openai.AsyncOpenAI, http: aiohttp.ClientSession, sim: Simulator) -> None:
    r = await client.embeddings.create(model=MODEL, input=["a b", "c"])  # SDK asks for base64
    assert [d.index for d in r.data] == [0, 1]
    for d, text in zip(r.data, ["a b", "c"], strict=True):
        assert d.embedding == pytest.approx(embedding_vector(text), abs=1e-6)
    assert r.usage.prompt_tokens == 3
    _, body = await post(http, sim, "/v1/embeddings", {"model": MODEL, "input": "a b"})
    assert body["object"] == "list" and body["data"][0]["embedding"] == embedding_vector("a b")
    status, body = await post(http, sim, "/v1/embeddings", {"model": MODEL, "input": 3})
    assert status == 400 and body["error"]["param"] == "input"


async def test_info_endpoints(http: aiohttp.ClientSession, sim: Simulator, client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "simulator"
    async with http.get(sim.base_url + "/health") as resp:
        assert await resp.json() == {"status": "ok"}
    async with http.get(sim.base_url + "/props") as resp:
        assert await resp.json() == {"model_alias": MODEL, "model_path": f"/models/{MODEL}.gguf"}


async def test_bad_requests(http: aiohttp.ClientSession, sim: Simulator) -> None:
    async with http.post(sim.base_url + "/v1/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] is None
    status, body = await post(http, sim, "/v1/chat/completions", {"model": MODEL})
    assert status == 400 and body["error"]["param"] == "messages"
    async with http.get(sim.base_url + "/v1/nothing") as resp:
        assert resp.status == 404 and "error" in await resp.json()
    async with http.get(sim.base_url + "/v1/chat/completions") as resp:
        assert resp.status == 405


# --------------------------------------------------------------------------- prefill


async def test_prefill_continuation(http: aiohttp.ClientSession, sim: Simulator) -> None:
    words = FULL.split()
    for cut in (len(words[0]) + 1 + len(words[1]),  # word boundary
                len(words[0]) + 4,  # in the middle of the second word
                0, len(FULL)):
        prefix = FULL[:cut]
        msgs = [*USER, {"role": "assistant", "content": prefix}]
        _, body = await post(http, sim, "/v1/chat/completions", {"model": MODEL, "messages": msgs})
        assert body["choices"][0]["message"]["content"] == FULL[cut:], cut
        datas, err = await raw_stream(http, sim, {"model": MODEL, "messages": msgs})
        assert err is None
        pieces = contents(datas)
        assert prefix + "".join(pieces) == FULL
        if cut == len(words[0]) + 4:
            # the first piece is the rest of the cut word, then whole pieces follow
            assert pieces[0] == words[1][3:]
            assert pieces[1:] == stream_pieces(words)[2:]


async def test_prefill_mismatch_and_parts(http: aiohttp.ClientSession, sim: Simulator) -> None:
    msgs = [*USER, {"role": "assistant", "content": "something else"}]
    _, body = await post(http, sim, "/v1/chat/completions", {"model": MODEL, "messages": msgs})
    text = body["choices"][0]["message"]["content"]
    assert text and text not in FULL and not FULL.startswith("something else")
    # content as a list of parts works as a prefix too
    parts = [*USER, {"role": "assistant", "content": [{"type": "text", "text": FULL[:10]}]}]
    _, body = await post(http, sim, "/v1/chat/completions", {"model": MODEL, "messages": parts})
    assert body["choices"][0]["message"]["content"] == FULL[10:]


async def test_prefill_disabled(http: aiohttp.ClientSession) -> None:
    s = Simulator(MODEL, words=WORDS, prefill=False)
    await s.start()
    try:
        msgs = [*USER, {"role": "assistant", "content": FULL[:5]}]
        status, body = await post(http, s, "/v1/chat/completions", {"model": MODEL, "messages": msgs})
        assert status == 400
        assert "assistant prefill is not supported" in body["error"]["message"]
        assert body["error"]["type"] == "invalid_request_error"
        status, _ = await post(http, s, "/v1/chat/completions", chat_body())
        assert status == 200
    finally:
        await s.stop()


# --------------------------------------------------------------------------- faults


async def test_refuse_and_back(http: aiohttp.ClientSession) -> None:
    s = Simulator(MODEL, words=WORDS, faults=["refuse"])
    await s.start()
    try:
        port = s.port
        assert port > 0
        with pytest.raises(aiohttp.ClientConnectorError):
            await post(http, s, "/v1/chat/completions", chat_body())
        s.set_faults([])
        status, _ = await post(http, s, "/v1/chat/completions", chat_body())
        assert status == 200 and s.port == port
        # applying refuse at run time closes the port at once, and drops pooled connections
        s.set_faults(["refuse"])
        await until(lambda: s.stats.open_connections == 0)
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, s, "/v1/chat/completions", chat_body())
        s.set_faults([])
        status, _ = await post(http, s, "/v1/chat/completions", chat_body())
        assert status == 200 and s.port == port
    finally:
        await s.stop()


async def test_hang_times_out_and_connection_is_counted(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["hang"])
    task = asyncio.ensure_future(post(http, sim, "/v1/chat/completions", chat_body(),
                                      timeout=aiohttp.ClientTimeout(total=0.3)))
    await until(lambda: sim.stats.inflight == 1)
    assert sim.stats.open_connections == 1
    with pytest.raises(asyncio.TimeoutError):
        await task
    # the client gave up: the connection and the parked handler are gone
    await until(lambda: sim.stats.open_connections == 0 and sim.stats.inflight == 0)


async def test_slow_first_byte(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["slow_first_byte=0.2"])
    t0 = time.monotonic()
    status, body = await post(http, sim, "/v1/chat/completions", chat_body())
    assert status == 200 and body["choices"][0]["message"]["content"] == FULL
    assert time.monotonic() - t0 >= 0.19


async def test_die_after_stream(http: aiohttp.ClientSession, sim: Simulator,
                                client: openai.AsyncOpenAI) -> None:
    sim.set_faults(["die_after=3"])
    datas, err = await raw_stream(http, sim, chat_body())
    assert isinstance(err, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError
                      | aiohttp.ClientConnectionError)
    assert contents(datas) == stream_pieces(FULL.split())[:3]
    assert "[DONE]" not in datas and all(c["choices"][0]["finish_reason"] is None for c in chunks(datas))
    # the SDK sees a transport error too
    got: list[str] = []
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                got.append(c.choices[0].delta.content)
    assert got == stream_pieces(FULL.split())[:3]
    assert sim.stats.aborted == 0 and sim.stats.completed_streams == 0


async def test_die_after_non_stream(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["die_after=1"])
    async with http.post(sim.base_url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200 and resp.content_length is not None
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_stall_after(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["stall_after=2"])
    datas, err = await raw_stream(http, sim, chat_body(), timeout=aiohttp.ClientTimeout(sock_read=0.3))
    assert isinstance(err, asyncio.TimeoutError)
    assert contents(datas) == stream_pieces(FULL.split())[:2]
    await until(lambda: sim.stats.aborted == 1 and sim.stats.open_connections == 0)
    # non-stream: headers, then nothing
    async with http.post(sim.base_url + "/v1/chat/completions", json=chat_body(),
                            timeout=aiohttp.ClientTimeout(sock_read=0.3)) as resp:
        assert resp.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await resp.read()


async def test_malformed_after(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["malformed_after=2"])
    datas, err = await raw_stream(http, sim, chat_body())
    assert err is None
    assert datas[3] == "{not json"  # role chunk, two pieces, then the bad event
    good = [d for d in datas if d != "{not json"]
    assert "".join(contents(good)) == FULL and good[-1] == "[DONE]"


async def test_error_after(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["error_after=2"])
    datas, err = await raw_stream(http, sim, chat_body())
    assert err is None
    assert contents(datas[:-1]) == stream_pieces(FULL.split())[:2]
    assert orjson.loads(datas[-1]) == {"error": {"message": "simulated failure", "type": "server_error",
                                                 "code": None}}
    assert "[DONE]" not in datas


async def test_no_done_and_no_finish(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["no_done"])
    datas, err = await raw_stream(http, sim, chat_body())
    assert err is None and datas[-1] != "[DONE]"
    assert chunks(datas)[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(contents(datas)) == FULL
    sim.set_faults(["no_finish"])
    datas, err = await raw_stream(http, sim, chat_body(stream_options={"include_usage": True}))
    assert err is None and "[DONE]" not in datas
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks(datas))
    assert "".join(contents(datas)) == FULL


async def test_status_and_rate_limit(http: aiohttp.ClientSession, sim: Simulator,
                                     client: openai.AsyncOpenAI) -> None:
    sim.set_faults(["status=503"])
    status, body = await post(http, sim, "/v1/chat/completions", chat_body(stream=True))
    assert status == 503 and body["error"]["type"] == "server_error"
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model=MODEL, messages=USER)
    sim.set_faults(["rate_limit=5"])
    async with http.post(sim.base_url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "5"
        err = (await resp.json())["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model=MODEL, messages=USER)
    # info endpoints are not affected
    async with http.get(sim.base_url + "/health") as resp:
        assert resp.status == 200


async def test_model_fault(http: aiohttp.ClientSession, sim: Simulator, client: openai.AsyncOpenAI) -> None:
    sim.set_faults(["model=other"])
    models = await client.models.list()
    assert [m.id for m in models.data] == ["other"]
    r = await client.chat.completions.create(model=MODEL, messages=USER)
    assert r.model == "other" and r.choices[0].message.content == answer_text("other", PROMPT, WORDS)
    datas, _ = await raw_stream(http, sim, chat_body())
    assert {c["model"] for c in chunks(datas)} == {"other"}


async def test_context_fault(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["context=3"])
    status, _ = await post(http, sim, "/v1/chat/completions", chat_body())  # 2 words
    assert status == 200
    long = [{"role": "user", "content": "one two three four"}]
    status, body = await post(http, sim, "/v1/chat/completions", {"model": MODEL, "messages": long})
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "messages"
    assert body["error"]["message"].startswith("This model's maximum context length is 3 tokens")


async def test_times_applies_once_then_clears(http: aiohttp.ClientSession, sim: Simulator) -> None:
    sim.set_faults(["status=500", "times=1"])
    # info requests do not use up the count
    async with http.get(sim.base_url + "/v1/models") as resp:
        assert resp.status == 200
    status, _ = await post(http, sim, "/v1/chat/completions", chat_body())
    assert status == 500
    assert sim.faults == ()
    status, _ = await post(http, sim, "/v1/chat/completions", chat_body())
    assert status == 200
    sim.set_faults(["die_after=2", "times=2"])
    for _ in range(2):
        _, err = await raw_stream(http, sim, chat_body())
        assert err is not None
    datas, err = await raw_stream(http, sim, chat_body())
    assert err is None and "".join(contents(datas)) == FULL


async def test_chunk_delay(http: aiohttp.ClientSession) -> None:
    s = Simulator(MODEL, words=5, chunk_delay=0.02)
    await s.start()
    try:
        t0 = time.monotonic()
        datas, err = await raw_stream(http, s, chat_body())
        assert err is None and "".join(contents(datas)) == answer_text(MODEL, PROMPT, 5)
        assert time.monotonic() - t0 >= 0.02 * 5
    finally:
        await s.stop()


async def test_client_disconnect_mid_stream_counts_as_aborted(http: aiohttp.ClientSession) -> None:
    s = Simulator(MODEL, words=50, chunk_delay=0.01)
    await s.start()
    try:
        async with http.post(s.base_url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
            await resp.content.readline()  # the role chunk
            resp.close()  # drop the connection, like a client that gave up
        await until(lambda: s.stats.aborted == 1 and s.stats.inflight == 0 and s.stats.open_connections == 0)
        assert s.stats.completed_streams == 0
    finally:
        await s.stop()


# --------------------------------------------------------------------------- control, stats, lifecycle


async def test_control_endpoints_and_stats(http: aiohttp.ClientSession, sim: Simulator) -> None:
    await post(http, sim, "/v1/chat/completions", chat_body())
    await raw_stream(http, sim, chat_body())
    async with http.get(sim.base_url + "/_sim/state") as resp:
        state = await resp.json()
    assert state["model"] == MODEL and state["faults"] == []
    assert state["stats"]["requests"] == 2
    assert state["stats"]["by_path"] == {"/v1/chat/completions": 2}
    assert state["stats"]["completed_streams"] == 1
    status, state = await post(http, sim, "/_sim/faults", {"faults": ["die_after=3", "times=1"]})
    assert status == 200 and state["faults"] == ["die_after=3", "times=1"]
    assert sim.faults == ("die_after=3", "times=1")
    status, body = await post(http, sim, "/_sim/faults", {"faults": ["bogus"]})
    assert status == 400 and "unknown fault 'bogus'" in body["error"]["message"]
    status, body = await post(http, sim, "/_sim/faults", ["x"])
    assert status == 400
    status, body = await post(http, sim, "/_sim/faults", {"faults": [3]})
    assert status == 400 and "must be a string" in body["error"]["message"]
    assert sim.faults == ("die_after=3", "times=1")  # a rejected update changes nothing
    status, state = await post(http, sim, "/_sim/reset_stats", {})
    assert status == 200 and state["stats"]["requests"] == 0 and state["stats"]["by_path"] == {}
    assert sim.stats.requests == 0  # control requests are never counted


async def test_refuse_via_main_port_and_control_port(http: aiohttp.ClientSession) -> None:
    s = Simulator(MODEL, words=WORDS, control_port=0)
    await s.start()
    try:
        assert s.control_port and s.control_port != s.port
        ctl = f"http://127.0.0.1:{s.control_port}"
        # switching to refuse over the main port still answers that request
        status, state = await post(http, s, "/_sim/faults", {"faults": ["refuse"]})
        assert status == 200 and state["faults"] == ["refuse"] and state["listening"] is False
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, s, "/v1/chat/completions", chat_body())
        async with http.get(ctl + "/_sim/state") as resp:
            assert (await resp.json())["faults"] == ["refuse"]
        async with http.post(ctl + "/_sim/faults", json={"faults": []}) as resp:
            assert resp.status == 200
        status, _ = await post(http, s, "/v1/chat/completions", chat_body())
        assert status == 200
        assert s.stats.requests == 1
    finally:
        await s.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(ctl + "/_sim/state"):
            pass


async def test_stop_aborts_open_streams_and_restart_keeps_port(http: aiohttp.ClientSession) -> None:
    s = Simulator(MODEL, words=WORDS, faults=["stall_after=1"])
    await s.start()
    port = s.port
    task = asyncio.ensure_future(raw_stream(http, s, chat_body()))
    await until(lambda: s.stats.inflight == 1)
    t0 = time.monotonic()
    await s.stop()
    datas, err = await asyncio.wait_for(task, 2)
    assert isinstance(err, aiohttp.ClientError) and time.monotonic() - t0 < 1.5
    assert contents(datas) == [FULL.split()[0]]
    assert s.stats.open_connections == 0
    s.set_faults([])
    await s.start()
    try:
        assert s.port == port
        status, _ = await post(http, s, "/v1/chat/completions", chat_body())
        assert status == 200
    finally:
        await s.stop()


def test_cli_run() -> None:
    code = (
        "import argparse, proxy.sim.cli as s; p = argparse.ArgumentParser(); s.add_arguments(p); "
        "raise SystemExit(s.run(p.parse_args()))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-c", code, "--port", "0", "--model", "m", "--fault", "nope"],
                         capture_output=True, text=True, env=env, timeout=20, check=False)
    assert bad.returncode == 2 and "unknown fault 'nope'" in bad.stderr
    with subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--model", "cli-m", "--words", "3"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("simulator cli-m listening on http://127.0.0.1:")
            url = line.split()[-1]
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as resp:
                assert orjson.loads(resp.read())["data"][0]["id"] == "cli-m"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
