"""Found by attacking the proxy as an adversary would (issues 14 and 15): each test is the
smallest reproduction of one defect, on real sockets (hostile upstreams are raw asyncio
servers, see tests/test_upstream_edges.py; the proxy and the simulators listen on ports).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from proxy.config import load_config, parse_config
from proxy.sim.text import answer_text
from tests import test_upstream_edges
from tests.conftest import MakeProxy, MakeSim, chat_body
from tests.test_upstream_edges import (
    PROMPT,
    Hostile,
    MakeHostile,
    completion,
    config_for,
    post_chat,
    reroute_reasons,
    streamed_text,
)

make_hostile = test_upstream_edges.make_hostile  # the raw-socket upstream fixture

UPSTREAM_KEY = "sk-upstream-secret-0123456789"


def answer(head: bytes, body: bytes = b"") -> bytes:
    """A whole response with a Content-Length (keep-alive friendly)."""
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def serve_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        h: Hostile, reply: bytes) -> None:
    """Answer every request on the connection with `reply`."""
    while True:
        await h.read_request(reader)
        writer.write(reply)
        await writer.drain()


# --------------------------------------------------------------------------- 2xx non-answers

NON_ANSWERS = {
    "no_content_204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "empty_200": answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"),
    "html_200": answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n",
                       b"<html><body>Sign in to the network</body></html>"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("attack", list(NON_ANSWERS))
async def test_a_2xx_that_is_no_completion_fails_over_instead_of_being_relayed_as_success(
        attack: str, stream: bool, make_hostile: MakeHostile, make_sim: MakeSim,
        make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    """A 204, an empty 200 or a captive portal's HTML page is no answer to a completion
    request: the client must get the good instance's answer, not an empty success."""
    reply = NON_ANSWERS[attack]

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await serve_forever(reader, writer, h, reply)

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim()))
    status, headers, body = await post_chat(http, proxy, stream)
    assert status == 200, body
    assert headers["x-route-instance"] == "p1:s1", body
    assert await reroute_reasons(proxy, http, headers["x-request-id"]) == \
        ["UPSTREAM_PROTOCOL_ERROR"]
    if stream:
        assert streamed_text(body) == (answer_text("sim-model", PROMPT, 20), True)
    else:
        assert orjson.loads(body)["choices"][0]["message"]["content"] == \
            answer_text("sim-model", PROMPT, 20)


async def test_a_stream_answered_with_a_whole_json_completion_reaches_the_client_as_a_stream(
        make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """An upstream that ignores `stream: true` and answers one JSON completion: relayed as
    it is, an OpenAI SDK iterating the stream finds no `data:` event and returns an empty
    answer without raising. The client asked for a stream and must get one."""
    text = "a whole answer to a streamed request"
    reply = answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", completion(text))

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await serve_forever(reader, writer, h, reply)

    hostile = await make_hostile(behave)
    proxy = await make_proxy(config_for(hostile, await make_sim()))
    status, headers, body = await post_chat(http, proxy, stream=True)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/event-stream"), (headers, body)
    assert headers["x-route-instance"] == "p0:s0"
    assert streamed_text(body) == (text, True)
    finishes = [choice["finish_reason"]
                for event in body.split(b"\n\n") if event.startswith(b"data: {")
                for choice in orjson.loads(event[6:])["choices"]]
    assert finishes[-1] == "stop"


# --------------------------------------------------------------------------- secrets

async def test_an_upstream_echoing_its_key_in_rate_limit_headers_does_not_leak_it(
        make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """The upstream's `x-ratelimit-*` and `retry-after` headers are relayed to the client;
    a server that quotes the key it was sent in them must not hand it to the client."""
    reply = answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   b"x-ratelimit-limit-requests: " + UPSTREAM_KEY.encode() + b"\r\n"
                   b"Retry-After: Bearer " + UPSTREAM_KEY.encode() + b"\r\n",
                   completion("hello"))

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await serve_forever(reader, writer, h, reply)

    hostile = await make_hostile(behave)
    config = config_for(hostile, await make_sim())
    doc = _doc(config, hostile)
    doc["providers"][0]["instances"][0]["api_key"] = UPSTREAM_KEY
    proxy = await make_proxy(parse_config(doc, "<test>"))
    for stream in (False, True):
        status, headers, body = await post_chat(http, proxy, stream)
        assert status == 200, body
        assert headers["x-route-instance"] == "p0:s0"
        assert "x-ratelimit-limit-requests" in headers
        for name, value in headers.items():
            assert UPSTREAM_KEY not in value, (name, value)


def _doc(config: Any, hostile: Hostile) -> dict[str, Any]:
    """The config of `config_for` as a document, to edit."""
    return {
        "timeouts": {"connect_s": 1, "first_byte_s": 5, "idle_s": 5, "total_s": 30},
        "health": {"enabled": False},
        "retry": {"same_instance_retries": 0, "max_retry_after_s": 3},
        "providers": [
            {"provider_id": "p0", "instances": [
                {"id": "s0", "base_url": hostile.base_url, "metadata": {"model": "sim-model"}}]},
            {"provider_id": "p1", "instances": [
                {"id": "s1", "base_url": config.instances[1].base_url,
                 "metadata": {"model": "sim-model"}}]},
        ],
    }


# --------------------------------------------------------------------------- rate limits

async def test_an_absurd_retry_after_is_bounded_and_enable_clears_the_cooldown(
        make_hostile: MakeHostile, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """`Retry-After: 1000000000` (31 years) from a buggy or hostile upstream must not take
    the instance out until the proxy restarts: the cooldown is bounded, and an admin's
    `enable` puts the instance back at once."""
    reply = answer(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                   b"Retry-After: 1000000000\r\n",
                   b'{"error": {"message": "slow down", "type": "rate_limit_error"}}')

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await serve_forever(reader, writer, h, reply)

    hostile = await make_hostile(behave)
    proxy = await make_proxy(parse_config({
        "health": {"enabled": False}, "retry": {"max_retry_after_s": 1},
        "providers": [{"provider_id": "p0", "instances": [
            {"id": "s0", "base_url": hostile.base_url, "metadata": {"model": "sim-model"}}]}],
    }, "<test>"))
    status, headers, body = await post_chat(http, proxy)
    assert status == 429, body
    assert 1 <= int(headers["Retry-After"]) <= 3600, headers["Retry-After"]
    async with http.post(f"{proxy.url}/admin/instances/p0:s0/enable") as resp:
        assert resp.status == 200
        assert (await resp.json())["rate_limited_retry_in_s"] == 0.0


# --------------------------------------------------------------------------- context overflow

LMSTUDIO_OVERFLOW = (
    "Trying to keep the first 6203 tokens when context the overflows. However, the model "
    "is loaded with context length of only 4096 tokens, which is not enough. Try to load "
    "the model with a larger context length, or provide a shorter input")


async def test_lm_studio_trying_to_keep_the_first_tokens_is_a_context_overflow(
        make_hostile: MakeHostile, make_sim: MakeSim, make_proxy: MakeProxy,
        http: aiohttp.ClientSession) -> None:
    """LM Studio's other overflow wording (lmstudio-ai/lmstudio-bug-tracker#237, #546)
    reroutes to a larger window, and its window is learned."""
    reply = answer(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n",
                   orjson.dumps({"error": LMSTUDIO_OVERFLOW}))

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     h: Hostile) -> None:
        await serve_forever(reader, writer, h, reply)

    hostile = await make_hostile(behave)
    sim = await make_sim()
    proxy = await make_proxy(parse_config({
        "health": {"enabled": False},
        "providers": [
            {"provider_id": "p0", "instances": [
                {"id": "s0", "base_url": hostile.base_url, "metadata": {"model": "sim-model"}}]},
            {"provider_id": "p1", "instances": [
                {"id": "s1", "base_url": sim.base_url,
                 "metadata": {"model": "sim-model", "ctx": 32768}}]},
        ],
    }, "<test>"))
    status, headers, body = await post_chat(http, proxy)
    assert status == 200, body
    assert headers["x-route-instance"] == "p1:s1"
    assert await reroute_reasons(proxy, http, headers["x-request-id"]) == ["CONTEXT_TOO_LONG"]
    async with http.get(f"{proxy.url}/admin/instances") as resp:
        states = {i["id"]: i for i in (await resp.json())["instances"]}
    assert states["p0:s0"]["ctx"] == 4096


# --------------------------------------------------------------------------- reloads

async def test_concurrent_reloads_leave_one_prober_per_instance(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    """Reloads that overlap (a burst of SIGHUPs, or admin reloads sent together) must not
    leave probers of replaced configs running: each would probe every instance forever
    (20 overlapping reloads multiplied the probes of a running proxy by 20)."""
    sims = [await make_sim(), await make_sim()]
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({
        "health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "store": {"url": f"sqlite:///{tmp_path}/audit.db"},
        "providers": [{"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": sim.base_url, "metadata": {"model": sim.model}}
            for n, sim in enumerate(sims)]}],
    }))
    proxy = await make_proxy(load_config(path))

    def probers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks()
                if t.get_name().startswith("probe:") and not t.done()]

    assert len(probers()) == 2
    answers = await asyncio.gather(*(http.post(f"{proxy.url}/admin/reload")
                                     for _ in range(10)))
    assert [a.status for a in answers] == [200] * 10
    assert len(probers()) == 2, sorted(t.get_name() for t in probers())
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
