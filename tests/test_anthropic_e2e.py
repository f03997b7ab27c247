"""Anthropic as a fallback: the OpenAI SDK is served by a Messages API instance unawares."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import (
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
)

from proxy.config import parse_config
from proxy.sim.anthropic import AnthropicSimulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim

CLAUDE = "claude-sim-3"
KEY = "sk-ant-test-key-123456"
PROMPT = "summarise the incident"


@pytest.fixture
async def claude() -> AsyncIterator[AnthropicSimulator]:
    sim = AnthropicSimulator(CLAUDE, api_key=KEY)
    await sim.start()
    yield sim
    await sim.stop()


def config_for(local: list[Any], claude: AnthropicSimulator, tmp: Path, **extra: Any) -> Any:
    return parse_config({
        "timeouts": {"connect_s": 1, "first_byte_s": 3, "idle_s": 3},
        "health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "store": {"url": f"sqlite:///{tmp}/audit.db"},
        "providers": [
            *([{"provider_id": "llamacpp", "instances": [
                {"id": f"l{n}", "base_url": sim.base_url, "metadata": {"model": sim.model}}
                for n, sim in enumerate(local)]}] if local else []),
            {"provider_id": "anthropic", "kind": "anthropic", "local": False, "instances": [
                {"id": "default", "base_url": claude.base_url + "/v1", "api_key": KEY,
                 "metadata": {"model": CLAUDE, "capabilities": ["tools", "prefill"],
                              **extra}}]},
        ]}, "<test>")


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="client-key", max_retries=0, timeout=20)


@pytest.mark.parametrize("stream", [False, True])
async def test_every_local_down_the_anthropic_instance_answers(
        make_sim: MakeSim, make_proxy: MakeProxy, claude: AnthropicSimulator, tmp_path: Path,
        stream: bool) -> None:
    local = await make_sim("local-model")
    proxy = await make_proxy(config_for([local], claude, tmp_path))
    await local.stop()
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "system", "content": "be brief"},
                                {"role": "user", "content": PROMPT}],
        stream=stream, max_tokens=12,
        stream_options={"include_usage": True} if stream else None)
    assert raw.headers["x-route-instance"] == "anthropic:default"
    expected = answer_text(CLAUDE, "be brief\n" + PROMPT, 12)
    parsed = raw.parse()
    if isinstance(parsed, openai.AsyncStream):
        text, finishes, usage, ids = "", [], [], set()
        async for chunk in parsed:
            ids.add(chunk.id)
            if chunk.usage:
                usage.append(chunk.usage)
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        assert text == expected
        assert finishes == ["length"] and len(ids) == 1 and len(usage) == 1
        assert usage[0].completion_tokens == 12
    else:
        assert parsed.choices[0].message.content == expected
        assert parsed.choices[0].finish_reason == "length"
        assert parsed.model == CLAUDE and parsed.usage is not None
        assert parsed.usage.completion_tokens == 12
    sent = {k.lower(): v for k, v in claude.last_headers.items()}
    assert sent["x-api-key"] == KEY and "anthropic-version" in sent
    assert "client-key" not in str(sent)
    assert claude.last_body is not None and claude.last_body["system"] == "be brief"


async def test_several_choices_are_never_sent_to_the_anthropic_instance(
        make_sim: MakeSim, make_proxy: MakeProxy, claude: AnthropicSimulator,
        tmp_path: Path) -> None:
    """n=2 has no Messages API equivalent: with the local instance down, the client gets a
    clear error naming why (502 with the local attempt, or 503 once the local instance is
    known down), not one choice where it asked for two."""
    local = await make_sim("local-model")
    proxy = await make_proxy(config_for([local], claude, tmp_path))
    await local.stop()
    before = claude.requests
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", n=2, messages=[{"role": "user", "content": PROMPT}])
    assert caught.value.status_code in (502, 503)
    assert "anthropic:default (unsupported_by_anthropic=n>1)" in str(caught.value) or \
        "anthropic:default: unsupported_by_anthropic=n>1" in str(caught.value)
    assert claude.requests == before


async def test_a_tool_call_round_trip_through_anthropic(make_proxy: MakeProxy,
                                                       claude: AnthropicSimulator,
                                                       tmp_path: Path) -> None:
    proxy = await make_proxy(config_for([], claude, tmp_path))
    client = sdk(proxy.base_url)
    tools: list[ChatCompletionFunctionToolParam] = [{"type": "function", "function": {
        "name": "get_weather", "description": "weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages: list[Any] = [{"role": "user", "content": "what is the weather in Paris?"}]
    first = await client.chat.completions.create(model="auto", messages=messages, tools=tools,
                                                 max_tokens=50)
    calls = first.choices[0].message.tool_calls or []
    call = calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
    second = await client.chat.completions.create(model="auto", messages=messages,
                                                  tools=tools, max_tokens=50)
    assert second.choices[0].message.content == "The tool said: sunny, 21C"
    blocks = claude.last_body["messages"] if claude.last_body else []
    assert [b["type"] for b in blocks[1]["content"]] == ["tool_use"]
    assert blocks[2]["content"][0]["type"] == "tool_result"


async def test_a_streamed_tool_call_through_anthropic(make_proxy: MakeProxy,
                                                      claude: AnthropicSimulator,
                                                      tmp_path: Path) -> None:
    proxy = await make_proxy(config_for([], claude, tmp_path))
    tools: list[ChatCompletionFunctionToolParam] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    arguments, names = "", []
    async for chunk in await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "weather please"}],
            tools=tools, max_tokens=50, stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                arguments += (call.function.arguments or "") if call.function else ""
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Paris"}


async def test_anthropic_overloaded_fails_over(make_sim: MakeSim, make_proxy: MakeProxy,
                                               tmp_path: Path) -> None:
    overloaded = AnthropicSimulator(CLAUDE, api_key=KEY, status=529)
    await overloaded.start()
    try:
        spare = await make_sim("spare")
        config = parse_config({
            "health": {"interval_s": 30},
            "store": {"url": f"sqlite:///{tmp_path}/audit.db"},
            "models": {"main": {"instances": ["anthropic:default", "llamacpp:spare"],
                                "strategy": "ordered"}},
            "providers": [
                {"provider_id": "anthropic", "kind": "anthropic", "instances": [
                    {"id": "default", "base_url": overloaded.base_url, "api_key": KEY,
                     "metadata": {"model": CLAUDE}}]},
                {"provider_id": "llamacpp", "instances": [
                    {"id": "spare", "base_url": spare.base_url, "metadata": {"model": "spare"}}]},
            ]}, "<test>")
        proxy = await make_proxy(config)
        raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
            model="main", messages=[{"role": "user", "content": PROMPT}], max_tokens=10)
        assert raw.headers["x-route-instance"] == "llamacpp:spare"
        assert overloaded.requests == 2  # a 5xx gets one more try on the same instance
    finally:
        await overloaded.stop()


async def test_a_request_the_messages_api_cannot_express_skips_the_anthropic_instance(
        make_sim: MakeSim, make_proxy: MakeProxy, claude: AnthropicSimulator,
        tmp_path: Path) -> None:
    """An audio part has no Messages API form: the Anthropic instance (first in the plan)
    is skipped with the reason, not tried and failed; its circuit and error rate stay clean
    and the skip is not counted as an attempt."""
    import aiohttp

    local = await make_sim("local-model")
    proxy = await make_proxy(config_for([local], claude, tmp_path))
    audio = [{"type": "text", "text": PROMPT},
             {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.base_url}/chat/completions", json={
                "model": "anthropic:default",
                "messages": [{"role": "user", "content": audio}]}) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-route-instance"] == "llamacpp:l0"
            assert resp.headers["x-route-attempts"] == "1"
            request_id = resp.headers["x-request-id"]
        async with http.get(f"{proxy.url}/admin/instances") as resp:
            rows = {r["id"]: r for r in (await resp.json())["instances"]}
        async with http.get(f"{proxy.url}/admin/events",
                            params={"request_id": request_id, "type": "REROUTED"}) as resp:
            events = (await resp.json())["events"]
    skipped = rows["anthropic:default"]
    assert (skipped["circuit"], skipped["failures"], skipped["error_rate"]) == ("closed", 0, 0)
    assert claude.requests == 0
    assert [(e["reason_code"], e["from_instance"]) for e in events] == [
        ("UNSUPPORTED_REQUEST", "anthropic:default")]


async def test_a_cut_stream_is_continued_on_the_anthropic_instance(
        make_sim: MakeSim, make_proxy: MakeProxy, claude: AnthropicSimulator,
        tmp_path: Path) -> None:
    # A local server of the same model dies after 5 words; the Messages API continues the
    # assistant turn (prefill), and the client sees one complete answer.
    local = await make_sim(CLAUDE, faults=["die_after=5"])
    proxy = await make_proxy(config_for([local], claude, tmp_path))
    text, ids = "", set()
    async for chunk in await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}], stream=True,
            max_tokens=20):
        ids.add(chunk.id)
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == answer_text(CLAUDE, PROMPT, 20)
    assert len(ids) == 1
    assert claude.last_body is not None
    assert claude.last_body["messages"][-1]["role"] == "assistant"  # continued, not replayed


async def test_the_anthropic_instance_is_probed_and_fingerprinted(
        make_proxy: MakeProxy, claude: AnthropicSimulator, tmp_path: Path) -> None:
    import aiohttp

    proxy = await make_proxy(config_for([], claude, tmp_path))
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/admin/instances") as resp:
        row = (await resp.json())["instances"][0]
    assert row["id"] == "anthropic:default"
    assert row["state"] == "READY" and row["fingerprint"] == CLAUDE  # from its /v1/models
    wrong = AnthropicSimulator(CLAUDE, api_key="another-key-000000")
    await wrong.start()
    try:
        config = config_for([], wrong, tmp_path)
        proxy2 = await make_proxy(config)
        async with aiohttp.ClientSession() as http, http.get(
                f"{proxy2.url}/admin/instances") as resp:
            row = (await resp.json())["instances"][0]
        assert row["state"] == "DOWN"  # the listing refused our key
        assert "401" in row["last_probe_error"]
    finally:
        await wrong.stop()
