"""The simulated Anthropic Messages backend, over real sockets with aiohttp."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.sim.anthropic import AnthropicSimulator, anthropic_prompt
from proxy.sim.text import answer_text, answer_words, prompt_of_messages, stream_pieces

MODEL = "claude-sim"
WORDS = 12
KEY = "sk-ant-test"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
SYSTEM = "be brief"
USER: list[Any] = [{"role": "user", "content": "hello there"}]
OPENAI_MSGS: list[Any] = [{"role": "system", "content": SYSTEM}, *USER]
PROMPT = prompt_of_messages(OPENAI_MSGS)
FULL = answer_text(MODEL, PROMPT, WORDS)
TOOLS = [{"name": "get_weather", "description": "weather of a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture
async def sim() -> AsyncIterator[AnthropicSimulator]:
    s = AnthropicSimulator(MODEL, words=WORDS, api_key=KEY)
    await s.start()
    yield s
    await s.stop()


async def post(http: aiohttp.ClientSession, sim: AnthropicSimulator, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.post(f"{sim.base_url}/v1/messages", json=body,
                            headers=HEADERS if headers is None else headers) as r:
        return r.status, await r.json()


async def events(http: aiohttp.ClientSession, sim: AnthropicSimulator,
                 body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    async with http.post(f"{sim.base_url}/v1/messages", json={**body, "stream": True},
                            headers=HEADERS) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    out: list[tuple[str, dict[str, Any]]] = []
    for chunk in raw.split("\n\n"):
        if not chunk.strip():
            continue
        name_line, data_line = chunk.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[len("data: "):])
        assert data["type"] == name_line[len("event: "):]
        out.append((data["type"], data))
    return out


def test_prompt_key_matches_openai() -> None:
    assert anthropic_prompt(SYSTEM, USER) == PROMPT
    blocks = [{"type": "text", "text": SYSTEM}]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]},
            {"role": "assistant", "content": "pre"}]
    assert anthropic_prompt(blocks, msgs) == PROMPT
    assert anthropic_prompt(None, USER) == prompt_of_messages(USER)


async def test_models_and_auth(sim: AnthropicSimulator, http: aiohttp.ClientSession) -> None:
    assert sim.port > 0 and sim.base_url == f"http://127.0.0.1:{sim.port}"
    async with http.get(f"{sim.base_url}/v1/models", headers=HEADERS) as r:
        assert r.status == 200
        body = await r.json()
    assert body == {"data": [{"type": "model", "id": MODEL, "display_name": MODEL,
                              "created_at": "2025-01-01T00:00:00Z"}],
                    "has_more": False, "first_id": MODEL, "last_id": MODEL}
    async with http.get(f"{sim.base_url}/v1/models", headers={"x-api-key": "wrong"}) as r:
        assert r.status == 401
        assert (await r.json())["error"]["type"] == "authentication_error"
    status, err = await post(http, sim, {"model": MODEL, "max_tokens": 5, "messages": USER},
                             headers={"anthropic-version": "2023-06-01"})
    assert status == 401 and err["type"] == "error"
    status, err = await post(http, sim, {"model": MODEL, "max_tokens": 5, "messages": USER},
                             headers={"x-api-key": KEY})
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    status, err = await post(http, sim, {"model": MODEL, "messages": USER})
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    assert sim.requests == 3
    assert sim.last_body == {"model": MODEL, "messages": USER}
    assert sim.last_headers["x-api-key"] == KEY


async def test_non_stream_text(sim: AnthropicSimulator, http: aiohttp.ClientSession) -> None:
    status, body = await post(http, sim, {"model": MODEL, "max_tokens": 100,
                                             "system": SYSTEM, "messages": USER})
    assert status == 200
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == MODEL
    assert body["id"].startswith("msg_sim")
    assert body["content"] == [{"type": "text", "text": FULL}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"] == {"input_tokens": len(PROMPT.split()), "output_tokens": WORDS}

    status, body = await post(http, sim, {"model": MODEL, "max_tokens": 4,
                                             "system": [{"type": "text", "text": SYSTEM}],
                                             "messages": USER})
    assert body["content"][0]["text"] == answer_text(MODEL, PROMPT, 4)
    assert body["stop_reason"] == "max_tokens" and body["usage"]["output_tokens"] == 4


async def test_stream_text(sim: AnthropicSimulator, http: aiohttp.ClientSession) -> None:
    evs = await events(http, sim, {"model": MODEL, "max_tokens": 100, "system": SYSTEM,
                                      "messages": USER})
    names = [n for n, _ in evs]
    assert names == ["message_start", "ping", "content_block_start",
                     *["content_block_delta"] * WORDS,
                     "content_block_stop", "message_delta", "message_stop"]
    start = evs[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == MODEL
    assert start["usage"] == {"input_tokens": len(PROMPT.split()), "output_tokens": 0}
    assert evs[2][1]["content_block"] == {"type": "text", "text": ""}
    deltas = [d["delta"]["text"] for n, d in evs if n == "content_block_delta"]
    assert deltas == stream_pieces(answer_words(MODEL, PROMPT, WORDS))
    assert "".join(deltas) == FULL
    md = evs[-2][1]
    assert md["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert md["usage"] == {"output_tokens": WORDS}


async def test_prefill_remainder(sim: AnthropicSimulator, http: aiohttp.ClientSession) -> None:
    cut = len(FULL) // 2 + 1  # most likely mid-word
    msgs = [*USER, {"role": "assistant", "content": FULL[:cut]}]
    body = {"model": MODEL, "max_tokens": 100, "system": SYSTEM, "messages": msgs}
    status, resp = await post(http, sim, body)
    assert status == 200
    assert FULL[:cut] + resp["content"][0]["text"] == FULL
    evs = await events(http, sim, body)
    assert FULL[:cut] + "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta") == FULL


async def test_tool_use_and_result(sim: AnthropicSimulator, http: aiohttp.ClientSession) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = {"model": MODEL, "max_tokens": 100, "messages": ask, "tools": TOOLS}
    status, resp = await post(http, sim, body)
    assert status == 200 and resp["stop_reason"] == "tool_use"
    assert resp["content"] == [{"type": "tool_use", "id": "toolu_sim1", "name": "get_weather",
                                "input": {"city": "Paris"}}]

    evs = await events(http, sim, body)
    assert [n for n, _ in evs] == ["message_start", "ping", "content_block_start",
                                   "content_block_delta", "content_block_delta",
                                   "content_block_stop", "message_delta", "message_stop"]
    assert evs[2][1]["content_block"] == {"type": "tool_use", "id": "toolu_sim1",
                                          "name": "get_weather", "input": {}}
    parts = [d["delta"]["partial_json"] for n, d in evs if n == "content_block_delta"]
    assert all(d["delta"]["type"] == "input_json_delta" for n, d in evs if n == "content_block_delta")
    assert json.loads("".join(parts)) == {"city": "Paris"}
    assert evs[-2][1]["delta"]["stop_reason"] == "tool_use"

    convo = [*ask, {"role": "assistant", "content": resp["content"]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_sim1",
                                           "content": "sunny, 21 C"}]}]
    status, resp = await post(http, sim, {"model": MODEL, "max_tokens": 100, "messages": convo,
                                             "tools": TOOLS})
    assert status == 200 and resp["stop_reason"] == "end_turn"
    assert resp["content"] == [{"type": "text", "text": "The tool said: sunny, 21 C"}]
    evs = await events(http, sim, {"model": MODEL, "max_tokens": 100, "messages": convo, "tools": TOOLS})
    text = "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta")
    assert text == "The tool said: sunny, 21 C"

    # Without tools, "weather" is just a prompt word.
    status, resp = await post(http, sim, {"model": MODEL, "max_tokens": 100, "messages": ask})
    assert resp["content"][0]["text"] == answer_text(MODEL, prompt_of_messages(ask), WORDS)


@pytest.mark.parametrize(("code", "etype"), [(529, "overloaded_error"), (500, "api_error"),
                                             (429, "rate_limit_error")])
async def test_status(http: aiohttp.ClientSession, code: int, etype: str) -> None:
    sim = AnthropicSimulator(MODEL, status=code)
    await sim.start()
    try:
        async with http.post(f"{sim.base_url}/v1/messages", headers=HEADERS,
                                json={"model": MODEL, "max_tokens": 5, "messages": USER}) as r:
            assert r.status == code
            body = await r.json()
            if code == 429:
                assert r.headers["retry-after"] == "1"
        assert body["type"] == "error" and body["error"]["type"] == etype
        assert sim.requests == 1
    finally:
        await sim.stop()
