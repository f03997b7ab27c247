"""Anthropic's Messages API in front: the `anthropic` SDK's `messages.create`,
`messages.stream` and `messages.count_tokens` served by simulated chat-completions backends,
through the same planner, failover and continuation as chat, with errors in Anthropic's
shape."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.types import (
    RawContentBlockDeltaEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ToolUseBlock,
)

from proxy.config import parse_config
from proxy.sim.anthropic import AnthropicSimulator
from proxy.sim.text import answer_text, prompt_of_messages
from tests.conftest import MakeProxy, MakeSim, proxy_config

PROMPT = "tell me about failover"
SYSTEM = "be brief"
KEY = "client-key-0123456789"


def sdk(proxy_url: str, **kw: Any) -> anthropic.AsyncAnthropic:
    kw.setdefault("api_key", KEY)
    return anthropic.AsyncAnthropic(base_url=proxy_url, max_retries=0, timeout=20, **kw)


def text_of(block: object) -> str:
    """The text of a content block that must be a text block."""
    assert isinstance(block, TextBlock), block
    return block.text


def tool_use(block: object) -> ToolUseBlock:
    assert isinstance(block, ToolUseBlock), block
    return block


def thinking(block: object) -> ThinkingBlock:
    assert isinstance(block, ThinkingBlock), block
    return block


def keyed(*sims: Any, **sections: Any) -> Any:
    return proxy_config(list(sims), server={"api_keys": [KEY]}, **sections)


async def test_a_healthy_answer(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(keyed(sim))
    raw = await sdk(proxy.url).messages.with_raw_response.create(
        model="auto", max_tokens=50, system=[{"type": "text", "text": SYSTEM,
                                              "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": PROMPT}], stop_sequences=["never"],
        extra_body={"temperature": 0.3})  # this SDK release no longer takes it as a keyword
    message = await raw.parse()
    assert raw.headers["x-route-instance"] == "p0:s0"
    assert raw.headers["x-route-attempts"] == "1"
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert text_of(message.content[0]) == answer_text("sim-model", f"{SYSTEM}\n{PROMPT}", 20)
    assert message.stop_reason == "end_turn" and message.model == "sim-model"
    assert message.usage.output_tokens == 20 and message.usage.input_tokens > 0
    sent = sim.stats.last_body
    assert sent is not None and sent["messages"] == [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    assert sent["stop"] == ["never"] and sent["max_tokens"] == 50
    assert sent["temperature"] == 0.3
    assert KEY not in json.dumps(sim.stats.last_headers)  # the client's key stays here


async def test_a_healthy_stream_with_every_messages_event(make_sim: MakeSim,
                                                          make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(keyed(sim))
    async with sdk(proxy.url).messages.stream(
            model="auto", max_tokens=50,
            messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == answer_text("sim-model", PROMPT, 20)
    assert text_of(final.content[0]) == text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 20

    # The wire: event names as Anthropic sends them (the SDK hides ping).
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/v1/messages",
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01",
                     "anthropic-beta": "prompt-caching-2024-07-31"},
            json={"model": "auto", "max_tokens": 3, "stream": True,
                  "messages": [{"role": "user", "content": PROMPT}]}) as resp:
        assert resp.status == 200
        names = [line[7:] for line in (await resp.text()).splitlines()
                 if line.startswith("event: ")]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]


async def test_max_tokens_reached_is_the_stop_reason(make_sim: MakeSim,
                                                     make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(keyed(sim))
    message = await sdk(proxy.url).messages.create(
        model="auto", max_tokens=4, messages=[{"role": "user", "content": PROMPT}])
    assert message.stop_reason == "max_tokens"
    assert text_of(message.content[0]) == answer_text("sim-model", PROMPT, 4)


@pytest.mark.parametrize("stream", [False, True])
async def test_primary_refused_the_fallback_answers_with_route_headers(
        make_sim: MakeSim, make_proxy: MakeProxy, stream: bool) -> None:
    primary, fallback = await make_sim("sim-model"), await make_sim("sim-model")
    proxy = await make_proxy(keyed(primary, fallback, health={"interval_s": 30}))
    await primary.stop()
    client = sdk(proxy.url, api_key=None, auth_token=KEY)  # Authorization: Bearer
    raw = await client.messages.with_raw_response.create(
        model="auto", max_tokens=50, messages=[{"role": "user", "content": PROMPT}],
        stream=stream)
    assert raw.headers["x-route-instance"] == "p1:s1"
    assert raw.headers["x-route-attempts"] == "2"
    parsed = await raw.parse()
    if isinstance(parsed, anthropic.AsyncStream):
        text = ""
        async for event in parsed:
            if isinstance(event, RawContentBlockDeltaEvent) and \
                    isinstance(event.delta, TextDelta):
                text += event.delta.text
    else:
        text = text_of(parsed.content[0])
    assert text == answer_text("sim-model", PROMPT, 20)


async def test_a_stream_cut_mid_answer_is_continued_and_the_client_sees_it_once(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    cut = await make_sim("sim-model", faults=["die_after=7"])
    twin = await make_sim("sim-model")
    proxy = await make_proxy(keyed(cut, twin))
    starts = 0
    async with sdk(proxy.url).messages.stream(
            model="auto", max_tokens=50,
            messages=[{"role": "user", "content": PROMPT}]) as stream:
        async for event in stream:
            starts += event.type in ("message_start", "content_block_start")
        final = await stream.get_final_message()
    assert text_of(final.content[0]) == answer_text("sim-model", PROMPT, 20)
    assert len(final.content) == 1 and starts == 2
    assert cut.stats.requests == 1 and twin.stats.requests == 1


async def test_a_cut_nobody_can_continue_raises_in_the_sdk(make_sim: MakeSim,
                                                           make_proxy: MakeProxy) -> None:
    cut = await make_sim("sim-model", faults=["die_after=7"])
    proxy = await make_proxy(keyed(cut))
    text = ""
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with sdk(proxy.url).messages.stream(
                model="auto", max_tokens=50,
                messages=[{"role": "user", "content": PROMPT}]) as stream:
            async for piece in stream.text_stream:
                text += piece
    assert text == answer_text("sim-model", PROMPT, 7)
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    assert "could not be continued" in body["error"]["message"]


async def test_a_tool_call_round_trip(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model", words=4, faults=["tool_call", "times=1"])
    proxy = await make_proxy(keyed(sim))
    client = sdk(proxy.url)
    tools: Any = [{"name": "lookup", "description": "look it up",
                   "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    first = await client.messages.create(
        model="auto", max_tokens=50, tools=tools, tool_choice={"type": "any"},
        messages=[{"role": "user", "content": PROMPT}])
    assert first.stop_reason == "tool_use"
    use = first.content[0]
    assert use.type == "tool_use" and use.name == "lookup"
    assert use.input == {"q": answer_text("sim-model", PROMPT, 4)}
    sent = sim.stats.last_body
    assert sent is not None and sent["tool_choice"] == "required"
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "lookup", "description": "look it up",
        "parameters": tools[0]["input_schema"]}}]

    history: list[Any] = [  # (the SDK's blocks, dumped as a client sends them back)
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"},
            {"type": "text", "text": "and tomorrow?"}]}]
    second = await client.messages.create(model="auto", max_tokens=50, tools=tools,
                                          messages=history)
    chat = [{"role": "user", "content": PROMPT},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": use.id, "type": "function",
                 "function": {"name": "lookup", "arguments": json.dumps(
                     use.input, separators=(",", ":"))}}]},
            {"role": "tool", "tool_call_id": use.id, "content": "sunny"},
            {"role": "user", "content": "and tomorrow?"}]
    assert sim.stats.last_body is not None and sim.stats.last_body["messages"] == chat
    assert text_of(second.content[0]) == answer_text("sim-model", prompt_of_messages(chat), 4)


async def test_a_streamed_tool_call(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model", words=4, faults=["tool_call"])
    proxy = await make_proxy(keyed(sim))
    async with sdk(proxy.url).messages.stream(
            model="auto", max_tokens=50, messages=[{"role": "user", "content": PROMPT}],
            tools=[{"name": "lookup", "input_schema": {"type": "object"}}]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["tool_use"]
    assert tool_use(final.content[0]).input == {"q": answer_text("sim-model", PROMPT, 4)}


@pytest.mark.parametrize("stream", [False, True])
async def test_every_instance_down_the_sdk_raises_its_status_error(
        make_sim: MakeSim, make_proxy: MakeProxy, stream: bool) -> None:
    a, b = await make_sim("sim-model"), await make_sim("sim-model")
    proxy = await make_proxy(keyed(a, b, health={"interval_s": 30}))
    await a.stop()
    await b.stop()
    with pytest.raises(anthropic.InternalServerError) as caught:
        await sdk(proxy.url).messages.create(
            model="auto", max_tokens=50, messages=[{"role": "user", "content": PROMPT}],
            stream=stream)
    assert caught.value.status_code in (502, 503)
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "api_error" and "p0:s0" in body["error"]["message"]


@pytest.mark.parametrize(("extra", "where"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "data": "x",
                                        "media_type": "text/plain"}}]}]},
     "messages.0.content.0"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
])
async def test_bad_input_is_an_anthropic_shaped_400(
        make_sim: MakeSim, make_proxy: MakeProxy, extra: dict[str, Any], where: str) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(keyed(sim))
    body = {"model": "auto", "max_tokens": 10,
            "messages": [{"role": "user", "content": PROMPT}], **extra}
    if body["max_tokens"] is None:
        del body["max_tokens"]
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/v1/messages", json=body,
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(where)
    assert sim.stats.requests == 0


async def test_bad_input_and_a_wrong_key_raise_the_sdks_own_errors(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(keyed(sim))
    with pytest.raises(anthropic.BadRequestError) as bad:
        await sdk(proxy.url).messages.create(model="auto", max_tokens=0, messages=[
            {"role": "user", "content": PROMPT}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError) as denied:
        await sdk(proxy.url, api_key="wrong-key").messages.create(
            model="auto", max_tokens=10, messages=[{"role": "user", "content": PROMPT}])
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "wrong-key" not in str(denied.value.body)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/v1/messages", data=b"{not json",
                             headers={"x-api-key": KEY}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with http.post(f"{proxy.url}/v1/messages", json={}) as resp:  # no key at all
            assert resp.status == 401
            error = (await resp.json())["error"]
            assert error["type"] == "authentication_error" and "x-api-key" in error["message"]
        async with http.get(f"{proxy.url}/v1/messages", headers={"x-api-key": KEY}) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_an_upstream_client_error_is_relayed_in_anthropics_shape(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model", faults=["status=422"])
    proxy = await make_proxy(keyed(sim))
    with pytest.raises(anthropic.UnprocessableEntityError) as caught:
        await sdk(proxy.url).messages.create(
            model="auto", max_tokens=10, messages=[{"role": "user", "content": PROMPT}])
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["message"] == "simulated HTTP 422 failure"


async def test_count_tokens_estimates_without_a_tokenizer(make_sim: MakeSim,
                                                         make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(keyed(sim))
    counted = await sdk(proxy.url).messages.count_tokens(
        model="auto", system=SYSTEM, messages=[{"role": "user", "content": PROMPT}])
    # The planner's estimate: characters / 4 plus 4 per message (proxy.routing.requirements).
    assert counted.input_tokens == (len(SYSTEM) + len(PROMPT)) // 4 + 2 * 4
    assert sim.stats.requests == 0
    with pytest.raises(anthropic.BadRequestError):
        await sdk(proxy.url).messages.count_tokens(model="auto", messages=[])


async def test_models_retrieve_in_anthropics_shape(make_sim: MakeSim,
                                                   make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(keyed(sim))
    model = await sdk(proxy.url).models.retrieve("sim-model")
    assert (model.type, model.id) == ("model", "sim-model")
    with pytest.raises(anthropic.NotFoundError) as caught:
        await sdk(proxy.url).models.retrieve("nothing-like-it")
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


# --- an Anthropic instance behind the Messages front: no double translation ----------------

CLAUDE = "claude-sim-3"
CLAUDE_KEY = "sk-ant-upstream-key-000000"


def with_claude(claude: Any, *sims: Any) -> Any:
    return parse_config({
        "server": {"api_keys": [KEY]},
        "health": {"interval_s": 30},
        "timeouts": {"connect_s": 1, "first_byte_s": 3, "idle_s": 3},
        "providers": [
            *([{"provider_id": "local", "instances": [
                {"id": f"l{n}", "base_url": sim.base_url, "metadata": {"model": sim.model}}
                for n, sim in enumerate(sims)]}] if sims else []),
            {"provider_id": "anthropic", "kind": "anthropic", "local": False, "instances": [
                {"id": "default", "base_url": claude.base_url + "/v1", "api_key": CLAUDE_KEY,
                 "metadata": {"model": CLAUDE, "capabilities": ["tools", "prefill"]}}]}]},
        "<test>")


@pytest.fixture
async def claude() -> Any:
    sim = AnthropicSimulator(CLAUDE, api_key=CLAUDE_KEY)
    await sim.start()
    yield sim
    await sim.stop()


CACHED_REQUEST: dict[str, Any] = {
    "model": "auto", "max_tokens": 50,
    "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "messages": [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "let me think", "signature": "sig-abc"},
            {"type": "text", "text": "first answer"}]},
        {"role": "user", "content": [{"type": "text", "text": PROMPT,
                                      "cache_control": {"type": "ephemeral"}}]}],
}


async def test_an_anthropic_instance_gets_the_request_as_it_came(
        make_proxy: MakeProxy, claude: AnthropicSimulator) -> None:
    """cache_control, thinking blocks with their signatures and the thinking setting reach
    the Anthropic instance untouched (only the model is the instance's), and its answer
    comes back as it sent it."""
    proxy = await make_proxy(with_claude(claude))
    raw = await sdk(proxy.url).messages.with_raw_response.create(**CACHED_REQUEST)
    message = await raw.parse()
    assert raw.headers["x-route-instance"] == "anthropic:default"
    assert claude.last_body == {**CACHED_REQUEST, "model": CLAUDE}
    assert message.id.startswith("msg_sim")  # the instance's own message, not a rebuilt one
    assert message.usage.input_tokens == len(
        f"{SYSTEM}\nfirst question\nfirst answer\n{PROMPT}".split())
    assert text_of(message.content[0]) == answer_text(
        CLAUDE, f"{SYSTEM}\nfirst question\nfirst answer\n{PROMPT}", 20)


async def test_an_anthropic_instances_stream_is_relayed_as_it_came(
        make_proxy: MakeProxy, claude: AnthropicSimulator) -> None:
    proxy = await make_proxy(with_claude(claude))
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/v1/messages", headers={"x-api-key": KEY},
            json={**CACHED_REQUEST, "stream": True, "max_tokens": 3}) as resp:
        body = await resp.text()
    assert claude.last_body == {**CACHED_REQUEST, "model": CLAUDE, "stream": True,
                                "max_tokens": 3}
    events = [(lines[0][7:], json.loads(lines[1][6:])) for lines in
              (e.split("\n") for e in body.strip().split("\n\n"))]
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["id"].startswith("msg_sim")
    assert events[7][1]["usage"] == {"output_tokens": 3}  # as the instance sent it


async def test_a_local_stream_cut_is_continued_on_the_anthropic_instance(
        make_sim: MakeSim, make_proxy: MakeProxy, claude: AnthropicSimulator) -> None:
    """A local server of the same model dies mid-answer; the Anthropic instance continues
    the assistant turn (a translated prefill), and the Messages client sees one message."""
    local = await make_sim(CLAUDE, faults=["die_after=5"])
    proxy = await make_proxy(with_claude(claude, local))
    async with sdk(proxy.url).messages.stream(
            model="auto", max_tokens=20,
            messages=[{"role": "user", "content": PROMPT}]) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["text"]
    assert text_of(final.content[0]) == answer_text(CLAUDE, PROMPT, 20)
    assert claude.last_body is not None
    assert claude.last_body["messages"][-1]["role"] == "assistant"  # continued


async def test_a_local_instance_gets_the_translation_and_the_anthropic_one_the_original(
        make_sim: MakeSim, make_proxy: MakeProxy, claude: AnthropicSimulator) -> None:
    local = await make_sim("local-model")
    proxy = await make_proxy(with_claude(claude, local))
    first = await sdk(proxy.url).messages.create(**CACHED_REQUEST)
    assert first.id.startswith("msg_") and not first.id.startswith("msg_sim")
    assert local.stats.last_body is not None and local.stats.last_body["messages"] == [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"}, {"role": "user", "content": PROMPT}]
    assert claude.requests == 0

    await local.stop()  # the same request fails over to the Anthropic instance: as it came
    raw = await sdk(proxy.url).messages.with_raw_response.create(**CACHED_REQUEST)
    assert raw.headers["x-route-instance"] == "anthropic:default"
    assert (await raw.parse()).id.startswith("msg_sim")
    assert claude.last_body == {**CACHED_REQUEST, "model": CLAUDE}


async def test_reasoning_comes_back_as_thinking_and_unsigned_thinking_never_reaches_anthropic(
        make_sim: MakeSim, make_proxy: MakeProxy, claude: AnthropicSimulator) -> None:
    """A local reasoning server's thinking is shown as a thinking block (no signature); sent
    back in the next turn, it is dropped for the Anthropic instance, which would refuse a
    signature it cannot verify, while its own signed blocks pass."""
    local = await make_sim("local-model", words=3, faults=["reasoning=0.2"])
    proxy = await make_proxy(with_claude(claude, local))
    client = sdk(proxy.url)
    ask: dict[str, Any] = {"model": "auto", "max_tokens": 50,
                           "thinking": {"type": "enabled", "budget_tokens": 1024}}
    async with client.messages.stream(
            **ask, messages=[{"role": "user", "content": PROMPT}]) as stream:
        first = await stream.get_final_message()
    assert [b.type for b in first.content] == ["thinking", "text"]
    assert thinking(first.content[0]).thinking and thinking(first.content[0]).signature == ""
    assert text_of(first.content[1]) == answer_text("local-model", PROMPT, 3)

    await local.stop()
    history: list[Any] = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                          for b in first.content]},
        {"role": "user", "content": "go on"}]
    await client.messages.create(**ask, messages=history)
    assert claude.last_body is not None
    assert claude.last_body["messages"][1]["content"] == [
        {"type": "text", "text": text_of(first.content[1])}]


async def test_count_tokens_asks_the_anthropic_instance(make_proxy: MakeProxy,
                                                        claude: AnthropicSimulator) -> None:
    proxy = await make_proxy(with_claude(claude))
    counted = await sdk(proxy.url).messages.count_tokens(
        model="auto", system=SYSTEM, messages=[{"role": "user", "content": PROMPT}])
    assert counted.input_tokens == len(f"{SYSTEM}\n{PROMPT}".split())
    assert claude.last_count_body == {"model": CLAUDE, "system": SYSTEM,
                                      "messages": [{"role": "user", "content": PROMPT}]}
    assert claude.requests == 0  # counting is no model request
