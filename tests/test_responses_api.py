"""OpenAI's Responses API in front: the `openai` SDK's `client.responses` (and LangChain with
`use_responses_api=True`) served by simulated chat-completions backends, through the same
planner, failover and continuation as chat; GET /v1/models/{id}."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import parse_config
from proxy.sim.anthropic import AnthropicSimulator
from proxy.sim.text import answer_text, prompt_of_messages
from tests.conftest import MakeProxy, MakeSim, proxy_config, serving

PROMPT = "tell me about failover"
SYSTEM = "be brief"


def sdk(proxy_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy_url, api_key="none", max_retries=0, timeout=20)


async def collect(stream: Any) -> tuple[list[Any], str]:
    """Every event of a raw Responses stream, and the text of its output_text deltas."""
    events, text = [], ""
    async for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta":
            text += event.delta
    return events, text


async def test_a_healthy_answer(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([sim]))
    raw = await sdk(proxy.base_url).responses.with_raw_response.create(
        model="auto", input=PROMPT, instructions=SYSTEM, max_output_tokens=50,
        temperature=0.2)
    response = raw.parse()
    assert raw.headers["x-route-instance"] == "p0:s0"
    assert response.status == "completed" and response.object == "response"
    assert response.output_text == answer_text("sim-model", f"{SYSTEM}\n{PROMPT}", 20)
    assert response.usage is not None and response.usage.output_tokens == 20
    assert response.model == "sim-model"
    sent = sim.stats.last_body
    assert sent is not None and sent["messages"] == [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.2


async def test_a_healthy_stream_has_every_responses_event(make_sim: MakeSim,
                                                          make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([sim]))
    raw = await sdk(proxy.base_url).responses.with_raw_response.create(
        model="auto", input=[{"role": "user", "content": [{"type": "input_text",
                                                           "text": PROMPT}]}],
        stream=True)
    assert raw.headers["x-route-instance"] == "p0:s0"
    assert raw.headers["content-type"].startswith("text/event-stream")
    events, text = await collect(raw.parse())
    expected = answer_text("sim-model", PROMPT, 20)
    assert text == expected
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added",
                         "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == expected and final.usage.output_tokens == 20
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


async def test_the_sdk_stream_helper_gets_the_final_response(make_sim: MakeSim,
                                                             make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model", words=6)
    proxy = await make_proxy(proxy_config([sim]))
    async with sdk(proxy.base_url).responses.stream(model="auto", input=PROMPT) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == answer_text("sim-model", PROMPT, 6)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_cut_by_max_output_tokens_is_incomplete(
        make_sim: MakeSim, make_proxy: MakeProxy, stream: bool) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([sim]))
    client = sdk(proxy.base_url)
    if stream:
        events, text = await collect(await client.responses.create(
            model="auto", input=PROMPT, max_output_tokens=5, stream=True))
        assert events[-1].type == "response.incomplete"
        response = events[-1].response
    else:
        response = await client.responses.create(model="auto", input=PROMPT,
                                                 max_output_tokens=5)
        text = response.output_text
    assert text == answer_text("sim-model", PROMPT, 5)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("stream", [False, True])
async def test_primary_refused_the_fallback_answers_with_route_headers(
        make_sim: MakeSim, make_proxy: MakeProxy, stream: bool) -> None:
    primary, fallback = await make_sim("sim-model"), await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([primary, fallback],
                                          health={"interval_s": 30}))
    await primary.stop()
    raw = await sdk(proxy.base_url).responses.with_raw_response.create(
        model="auto", input=PROMPT, stream=stream)
    assert raw.headers["x-route-instance"] == "p1:s1"
    assert raw.headers["x-route-attempts"] == "2"
    assert raw.headers["x-route-plan-id"]
    parsed = raw.parse()
    if isinstance(parsed, openai.AsyncStream):
        _, text = await collect(parsed)
    else:
        text = parsed.output_text
    assert text == answer_text("sim-model", PROMPT, 20)


async def test_a_stream_cut_mid_answer_is_continued_and_the_client_sees_it_once(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    # Same model on both: the twin replays the answer and only what follows the cut is
    # relayed, inside the same output item.
    cut = await make_sim("sim-model", faults=["die_after=7"])
    twin = await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([cut, twin]))
    raw = await sdk(proxy.base_url).responses.with_raw_response.create(
        model="auto", input=PROMPT, stream=True)
    assert raw.headers["x-route-instance"] == "p0:s0"
    events, text = await collect(raw.parse())
    assert text == answer_text("sim-model", PROMPT, 20)
    kinds = [e.type for e in events]
    assert kinds.count("response.output_item.added") == 1
    assert kinds.count("response.completed") == 1 and "error" not in kinds
    assert events[-1].response.output_text == text
    assert cut.stats.requests == 1 and twin.stats.requests == 1
    resumed: list[Any] = []

    async def stream_resumed() -> bool:
        async with aiohttp.ClientSession() as http, http.get(
                f"{proxy.url}/admin/events", params={
                    "request_id": raw.headers["x-request-id"],
                    "type": "STREAM_RESUMED"}) as resp:
            resumed[:] = (await resp.json())["events"]
        return bool(resumed)

    for _ in range(100):
        if await stream_resumed():
            break
        await asyncio.sleep(0.05)
    assert [(e["from_instance"], e["to_instance"]) for e in resumed] == [("p0:s0", "p1:s1")]


async def test_a_cut_nobody_can_continue_ends_with_error_and_response_failed(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    cut = await make_sim("sim-model", faults=["die_after=7"])
    proxy = await make_proxy(proxy_config([cut]))
    events, text = await collect(await sdk(proxy.base_url).responses.create(
        model="auto", input=PROMPT, stream=True))
    assert text == answer_text("sim-model", PROMPT, 7)
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert "response.completed" not in kinds
    assert "could not be continued" in events[-2].message
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.output[0].status == "incomplete"


async def test_a_tool_call_round_trip_streamed(make_sim: MakeSim,
                                               make_proxy: MakeProxy) -> None:
    """The simulator answers the first request with a streamed tool call; the second
    request sends the call and its output back as Responses items, which reach the server
    as an assistant tool call and a tool message."""
    sim = await make_sim("sim-model", words=4, faults=["tool_call", "times=1"])
    proxy = await make_proxy(proxy_config([sim]))
    client = sdk(proxy.base_url)
    tools: list[Any] = [{"type": "function", "name": "lookup", "description": "look it up",
                         "parameters": {"type": "object",
                                        "properties": {"q": {"type": "string"}}}}]
    events, _ = await collect(await client.responses.create(
        model="auto", input=PROMPT, tools=tools, tool_choice="auto", stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    call = events[-1].response.output[0]
    assert events[-1].type == "response.completed"
    assert call.type == "function_call" and call.name == "lookup"
    assert json.loads(call.arguments) == {"q": answer_text("sim-model", PROMPT, 4)}
    sent = sim.stats.last_body
    assert sent is not None and sent["tools"][0]["function"]["name"] == "lookup"
    assert sent["tool_choice"] == "auto"

    items: list[Any] = [
        {"role": "user", "content": PROMPT},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    second = await client.responses.create(model="auto", tools=tools, input=items)
    chat = [{"role": "user", "content": PROMPT},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.call_id, "type": "function",
                 "function": {"name": "lookup", "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    assert sim.stats.last_body is not None and sim.stats.last_body["messages"] == chat
    assert second.output_text == answer_text("sim-model", prompt_of_messages(chat), 4)


async def test_a_tool_call_round_trip_through_an_anthropic_instance(
        make_proxy: MakeProxy, tmp_path: Path) -> None:
    """Responses -> chat -> Messages and back: the Anthropic simulator asks for the tool,
    then answers from its result."""
    claude = AnthropicSimulator("claude-sim", api_key="sk-ant-000000000000")
    await claude.start()
    try:
        proxy = await make_proxy(parse_config({
            "health": {"interval_s": 30},
            "providers": [{"provider_id": "anthropic", "kind": "anthropic", "instances": [
                {"id": "default", "base_url": claude.base_url + "/v1",
                 "api_key": "sk-ant-000000000000",
                 "metadata": {"model": "claude-sim", "capabilities": ["tools"]}}]}]},
            "<test>"))
        client = sdk(proxy.base_url)
        tools: list[Any] = [{"type": "function", "name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}]
        first = await client.responses.create(model="auto", tools=tools,
                                              input="what is the weather in Paris?")
        call = first.output[0]
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
        items: list[Any] = [
            {"role": "user", "content": "what is the weather in Paris?"},
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}]
        second = await client.responses.create(model="auto", tools=tools, input=items)
        assert second.output_text == "The tool said: sunny, 21C"
        assert claude.last_body is not None
        assert [b["type"] for b in claude.last_body["messages"][1]["content"]] == ["tool_use"]
    finally:
        await claude.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_every_instance_down_the_sdk_raises_its_status_error(
        make_sim: MakeSim, make_proxy: MakeProxy, stream: bool) -> None:
    a, b = await make_sim("sim-model"), await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([a, b], health={"interval_s": 30}))
    await a.stop()
    await b.stop()
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(proxy.base_url).responses.create(model="auto", input=PROMPT, stream=stream)
    assert caught.value.status_code in (502, 503)
    assert isinstance(caught.value.body, dict) and "p0:s0" in caught.value.body["message"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"max_output_tokens": "many"}, "max_output_tokens"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
])
async def test_bad_or_stateful_input_is_an_openai_shaped_400(
        make_sim: MakeSim, make_proxy: MakeProxy, extra: dict[str, Any], param: str) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([sim]))
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(proxy.base_url).responses.create(**{"model": "auto", "input": PROMPT,
                                                      **extra})
    assert caught.value.param == param
    assert sim.stats.requests == 0


async def test_an_unparsable_body_or_a_missing_input_is_a_400(make_sim: MakeSim,
                                                              make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([sim]))
    async with aiohttp.ClientSession() as http:
        for body in (b"{not json", b"[1]", b'{"model": "auto"}', b'{"input": "hi"}'):
            async with http.post(f"{proxy.base_url}/responses", data=body) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert error["type"] == "invalid_request_error" and error["message"]


async def test_the_json_schema_text_format_becomes_a_response_format(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model", words=3)
    proxy = await make_proxy(proxy_config([sim]))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    text: Any = {"format": {"type": "json_schema", "name": "reply", "schema": schema,
                            "strict": True}}
    await sdk(proxy.base_url).responses.create(model="auto", input=PROMPT, text=text)
    sent = sim.stats.last_body
    assert sent is not None and sent["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "reply", "schema": schema,
                                               "strict": True}}


async def test_langchain_with_the_responses_api(make_sim: MakeSim,
                                                make_proxy: MakeProxy) -> None:
    from langchain_openai import ChatOpenAI

    sim = await make_sim("sim-model", words=5)
    proxy = await make_proxy(proxy_config([sim]))
    options: dict[str, Any] = {"api_key": "none"}  # (a SecretStr to the type checker)
    llm = ChatOpenAI(model="auto", base_url=proxy.base_url, use_responses_api=True,
                     max_retries=0, **options)
    message = await llm.ainvoke(PROMPT)
    assert message.text == answer_text("sim-model", PROMPT, 5)
    chunks = [chunk.text async for chunk in llm.astream(PROMPT)]
    assert "".join(chunks) == answer_text("sim-model", PROMPT, 5)


async def test_models_retrieve_names_groups_instances_and_labels(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([sim], models={"fast": {"instances": ["p0:s0"]}}))
    client = sdk(proxy.base_url)
    for name, owner in (("auto", "failover-proxy"), ("fast", "failover-proxy"),
                        ("sim-model", "p0"), ("p0:s0", "p0")):
        model = await client.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", owner)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


@pytest.fixture
async def odd_server() -> Any:
    """A chat server whose answers carry wrong types where counts and lists belong (token
    counts as text, `tool_calls` a number, a tool call index an object)."""
    from aiohttp import web

    odd_usage = {"prompt_tokens": "lots", "completion_tokens": None, "total_tokens": [1]}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({
                "id": "c1", "object": "chat.completion", "created": 1, "model": "odd",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "hi there", "tool_calls": 7}}],
                "usage": odd_usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "odd"}
        for delta, finish in (({"role": "assistant", "content": "hi"}, None),
                              ({"content": " there", "tool_calls": 5}, None),
                              ({"tool_calls": [{"index": {}, "id": "t", "function": {
                                  "name": "f", "arguments": "{}"}}]}, None),
                              ({}, "stop")):
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps({**base, "choices": [], "usage": odd_usage})
                         .encode() + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("stream", [False, True])
async def test_odd_types_in_an_answer_never_break_the_translation(
        make_proxy: MakeProxy, odd_server: str, stream: bool) -> None:
    proxy = await make_proxy(proxy_config([("odd", odd_server)], health={"enabled": False}))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.base_url}/responses", json={
                "model": "auto", "input": PROMPT, "stream": stream}) as resp:
            assert resp.status == 200
            text = await resp.text()
        async with http.post(f"{proxy.url}/v1/messages", json={
                "model": "auto", "max_tokens": 9, "stream": stream,
                "messages": [{"role": "user", "content": PROMPT}]}) as resp:
            assert resp.status == 200
            message = await resp.text()
    if stream:
        assert "response.completed" in text and '"delta":" there"' in text
        assert "message_stop" in message and '"text":" there"' in message
    else:
        assert json.loads(text)["output"][0]["content"][0]["text"] == "hi there"
        assert json.loads(text)["usage"]["input_tokens"] == 0
        assert json.loads(message)["content"] == [{"type": "text", "text": "hi there"}]
