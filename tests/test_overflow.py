"""Every server's way of saying "context too long" reroutes to a larger window, teaches the
proxy the window of an instance whose config states none, and nothing else is mistaken
for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.api.state import STATE
from proxy.app import reload_config
from proxy.config import load_config, parse_config
from proxy.failures import ContextTooLong
from proxy.providers.anthropic import Anthropic
from proxy.providers.overflow import Overflow, classify, of_error
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, chat_body, serving

# Twelve words: over a simulator's `context=10`.
PROMPT = "one two three four five six seven eight nine ten eleven twelve"
STYLES = ["openai", "vllm", "vllm_old", "sglang", "tgi", "llamacpp", "llamacpp_old", "ollama",
          "lmstudio", "anthropic"]


def doc_for(sims: list[tuple[Simulator | str, dict[str, Any]]], **sections: Any) -> dict[str, Any]:
    return {
        "timeouts": {"connect_s": 1, "first_byte_s": 2, "idle_s": 2},
        "health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "providers": [{"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": sim if isinstance(sim, str) else sim.base_url,
             "metadata": {"model": "sim-model" if isinstance(sim, str) else sim.model, **meta}}
            for n, (sim, meta) in enumerate(sims)]}],
        **sections,
    }


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=20)


@pytest.mark.parametrize("style", STYLES)
async def test_each_servers_overflow_reroutes_to_a_larger_window(
        make_sim: MakeSim, make_proxy: MakeProxy, style: str) -> None:
    small = await make_sim("small", faults=["context=10", f"context_style={style}"])
    big = await make_sim("big")
    proxy = await make_proxy(parse_config(doc_for([(small, {}), (big, {"ctx": 65536})]), "<t>"))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}], max_tokens=20)
    assert raw.headers["x-route-instance"] == "p:s1"
    assert raw.headers["x-route-attempts"] == "2"
    assert raw.parse().choices[0].message.content == answer_text("big", PROMPT, 20)
    async with aiohttp.ClientSession() as http, http.get(
            f"{proxy.url}/admin/events",
            params={"request_id": raw.headers["x-request-id"], "type": "REROUTED"}) as resp:
        (event,) = (await resp.json())["events"]
    assert event["reason_code"] == "CONTEXT_TOO_LONG" and event["from_instance"] == "p:s0"


async def test_an_overflow_everywhere_is_an_openai_400_whatever_the_server_said(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    small = await make_sim("small", faults=["context=10", "context_style=tgi"])  # a 422
    proxy = await make_proxy(parse_config(doc_for([(small, {})]), "<t>"))
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
    assert raised.value.status_code == 400
    assert raised.value.code == "context_length_exceeded"
    assert "`max_new_tokens` must be <= 10" in raised.value.message  # the server's own words


@pytest.mark.parametrize("max_tokens", [1_000_000, 100])
async def test_a_request_larger_than_every_window_is_a_400_not_a_retryable_503(
        make_sim: MakeSim, make_proxy: MakeProxy, max_tokens: int) -> None:
    a, b, off = await make_sim("a"), await make_sim("b"), await make_sim("c")
    proxy = await make_proxy(parse_config(doc_for(
        [(a, {"ctx": 4096}), (b, {"ctx": 8192}), (off, {"ctx": 2048})]), "<t>"))
    # An admin took one out: still a size question for the others, not an outage.
    async with aiohttp.ClientSession() as http, \
            http.post(f"{proxy.url}/admin/instances/p:s2/drain") as resp:
        assert resp.status == 200
    prompt = "word " * 40_000 if max_tokens == 100 else "hello"  # ~50k tokens estimated
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
    assert raised.value.code == "context_length_exceeded"
    assert "p:s0: ctx=4096<" in raised.value.message and "p:s1: ctx=8192<" in raised.value.message
    assert a.stats.requests == b.stats.requests == off.stats.requests == 0


async def test_a_request_too_large_for_the_healthy_instances_but_not_a_broken_one_is_503(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    small = await make_sim("small")
    wrong = await make_sim("another-model")  # pinned to sim-model: MISMATCH at the first probe
    doc = doc_for([(small, {"ctx": 4096}), (wrong, {"ctx": 131072})])
    doc["providers"][0]["instances"][1]["fingerprint"] = {"model": "big-model"}
    proxy = await make_proxy(parse_config(doc, "<t>"))
    with pytest.raises(openai.InternalServerError) as raised:  # it may fit once s1 is back
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hello"}], max_tokens=10_000)
    assert raised.value.status_code == 503


async def test_an_instance_without_ctx_learns_its_window_and_later_plans_filter_it(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    small = await make_sim("small", faults=["context=10", "context_style=sglang"])
    big = await make_sim("big")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc_for([(small, {}), (big, {"ctx": 65536})],
                                           store={"url": f"sqlite:///{tmp_path}/audit.db"})))
    proxy = await make_proxy(load_config(path))
    client = sdk(proxy.base_url)
    async with aiohttp.ClientSession() as http:
        async def plan(**body: Any) -> dict[str, Any]:
            async with http.post(f"{proxy.url}/admin/route", json=body) as resp:
                return dict(await resp.json())

        before = await plan(**chat_body(PROMPT, max_tokens=20))
        assert before["selected"] == "p:s0" and "ctx=unknown" in before["reasons"]["p:s0"]
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}], max_tokens=20)
        assert raw.headers["x-route-attempts"] == "2"  # SGLang said: 10 tokens

        after = await plan(**chat_body(PROMPT, max_tokens=20))
        needed = after["requirements"]["ctx_needed"]
        assert after["rejected"]["p:s0"] == f"ctx=10(learned)<{needed}"
        assert after["selected"] == "p:s1"
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}], max_tokens=20)
        assert raw.headers["x-route-attempts"] == "1" and small.stats.requests == 1

        fits = await plan(model="auto", messages=[{"role": "user", "content": "hi"}],
                          max_tokens=1)  # 2 tokens by the estimate: the learned window fits
        assert "p:s0" not in fits["rejected"] and "ctx=learned:10" in fits["reasons"]["p:s0"]

        ok, _ = await reload_config(proxy.app)  # the same file: figures carry over
        assert ok
        async with http.get(f"{proxy.url}/admin/instances") as resp:
            listed = {i["id"]: i for i in (await resp.json())["instances"]}
        assert (listed["p:s0"]["ctx"], listed["p:s0"]["ctx_source"]) == (10, "learned")
        assert (listed["p:s1"]["ctx"], listed["p:s1"]["ctx_source"]) == (65536, "configured")
        assert proxy.app[STATE].registry.by_id["p:s0"].learned_ctx == 10


async def test_a_declared_ctx_is_not_overwritten_by_what_a_server_said(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    small = await make_sim("small", faults=["context=10", "context_style=llamacpp"])
    big = await make_sim("big")
    proxy = await make_proxy(parse_config(doc_for([(small, {"ctx": 4096}), (big, {})]), "<t>"))
    await sdk(proxy.base_url).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}], max_tokens=20)
    inst = proxy.app[STATE].registry.by_id["p:s0"]
    assert inst.learned_ctx is None and inst.ctx == 4096


@pytest.mark.parametrize(("status", "body"), [
    # OpenAI: an output limit, not the context window.
    (400, {"error": {"message": "max_tokens is too large: 40000. This model supports at most "
                                "16384 completion tokens, whereas you provided 40000.",
                     "type": "invalid_request_error", "param": "max_tokens",
                     "code": "invalid_value"}}),
    (400, {"error": {"message": "Invalid 'messages[0].content': string too long. Expected a "
                                "string with maximum length 10485760, but got a string with "
                                "length 10485761 instead.", "type": "invalid_request_error",
                     "param": "messages[0].content", "code": "string_above_max_length"}}),
    # TGI: the output limit alone.
    (422, {"error": "Input validation error: `max_new_tokens` must be <= 4096. Given: 20000",
           "error_type": "validation"}),
    # vLLM: a bad parameter, in its old top-level shape.
    (400, {"object": "error", "message": "temperature must be non-negative, got -1.0.",
           "type": "BadRequestError", "param": None, "code": 400}),
])
async def test_a_client_error_that_is_not_about_context_passes_through_unchanged(
        make_proxy: MakeProxy, status: int, body: dict[str, Any]) -> None:
    raw = orjson.dumps(body)
    hits: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=status, body=raw, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    async with serving(app) as port:
        proxy = await make_proxy(parse_config(doc_for([
            (f"http://127.0.0.1:{port}", {"ctx": 4096}),
            (f"http://127.0.0.1:{port}", {"ctx": 65536})], health={"enabled": False}), "<t>"))
        async with aiohttp.ClientSession() as http, http.post(
                f"{proxy.base_url}/chat/completions", json=chat_body(PROMPT)) as resp:
            assert resp.status == status
            assert await resp.read() == raw
            assert resp.headers["x-route-attempts"] == "1"
        assert hits == ["/v1/chat/completions"]  # not retried, not rerouted


# --------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize(("status", "body", "window", "requested"), [
    # llama.cpp llama-server (tools/server, ERROR_TYPE_EXCEED_CONTEXT_SIZE)
    (400, {"error": {"code": 400, "message": "request (9412 tokens) exceeds the available "
                     "context size (8192 tokens), try increasing it",
                     "type": "exceed_context_size_error", "n_prompt_tokens": 9412,
                     "n_ctx": 8192}}, 8192, 9412),
    (400, {"error": {"code": 400, "message": "the request exceeds the available context size, "
                     "try increasing it", "type": "invalid_request_error"}}, None, None),
    # vLLM, current and older wordings and shapes
    (400, {"error": {"message": "This model's maximum context length is 8192 tokens. However, "
                     "you requested 64 output tokens and your prompt contains at least 8129 "
                     "input tokens, for a total of at least 8193 tokens. Please reduce the "
                     "length of the input prompt or the number of requested output tokens. "
                     "(parameter=input_tokens, value=8129)", "type": "BadRequestError",
                     "param": "input_tokens", "code": 400}}, 8192, 8193),
    (400, {"error": {"message": "'max_tokens' or 'max_completion_tokens' is too large: 8000. "
                     "This model's maximum context length is 4096 tokens and your request has "
                     "2778 input tokens (8000 > 4096 - 2778). None", "type": "BadRequestError",
                     "param": None, "code": 400}}, 4096, 10778),
    (400, {"object": "error", "message": "This model's maximum context length is 4096 tokens. "
           "However, you requested 10778 tokens (2778 in the messages, 8000 in the completion). "
           "Please reduce the length of the messages or completion.",
           "type": "BadRequestError", "param": None, "code": 400}, 4096, 10778),
    (400, {"error": {"message": "The decoder prompt (length 9000) is longer than the maximum "
                     "model length of 8192. Make sure that `max_model_len` is no smaller than "
                     "the number of text tokens."}}, 8192, 9000),
    # SGLang
    (400, {"object": "error", "message": "The input (9000 tokens) is longer than the model's "
           "context length (8192 tokens).", "type": "BadRequestError", "param": None,
           "code": 400}, 8192, 9000),
    # TGI (422)
    (422, {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
           "Given: 4000 `inputs` tokens and 200 `max_new_tokens`", "error_type": "validation"},
     4096, 4200),
    (422, {"error": "Input validation error: `inputs` must have less than 1024 tokens. "
           "Given: 2000", "error_type": "validation"}, None, 2000),
    # Ollama, native and /v1
    (400, {"error": "prompt too long; exceeded max context length by 4 tokens"}, None, None),
    (400, {"error": {"message": "prompt too long; exceeded max context length by 4 tokens",
                     "type": "api_error", "param": None, "code": None}}, None, None),
    # LM Studio
    (400, {"error": "The number of tokens to keep from the initial prompt is greater than the "
           "context length (n_keep: 5228 >= n_ctx: 4096). Try to load the model with a larger "
           "context length, or provide a shorter input."}, 4096, 5228),
    # OpenAI
    (400, {"error": {"message": "This model's maximum context length is 128000 tokens. However, "
                     "your messages resulted in 130000 tokens. Please reduce the length of the "
                     "messages.", "type": "invalid_request_error", "param": "messages",
                     "code": "context_length_exceeded"}}, 128000, 130000),
    (400, {"error": {"message": "Input tokens exceed the configured limit of 272000 tokens. "
                     "Your messages resulted in 509178 tokens. Please reduce the length of the "
                     "messages.", "type": "invalid_request_error", "param": "messages",
                     "code": "context_length_exceeded"}}, 272000, 509178),
    # Anthropic
    (400, {"type": "error", "error": {"type": "invalid_request_error",
                                      "message": "prompt is too long: 208310 tokens > 200000 "
                                                 "maximum"}}, 200000, 208310),
    (400, {"type": "error", "error": {"type": "invalid_request_error",
                                      "message": "input length and `max_tokens` exceed context "
                                                 "limit: 188240 + 21333 > 200000, decrease input "
                                                 "length or `max_tokens` and try again"}},
     200000, 209573),
])
def test_every_servers_wording_is_an_overflow_with_its_numbers(
        status: int, body: dict[str, Any], window: int | None, requested: int | None) -> None:
    found = classify(status, orjson.dumps(body))
    assert found is not None
    assert (found.window, found.requested) == (window, requested)


@pytest.mark.parametrize(("status", "body"), [
    (413, b'{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the '
          b'maximum allowed number of bytes."}}'),  # Anthropic: bytes, not tokens
    (429, b'{"error":{"message":"Rate limit reached: too many tokens per min",'
          b'"code":"rate_limit_exceeded"}}'),
    (500, b'{"error":{"message":"the request exceeds the available context size"}}'),
    (404, b'{"error":{"message":"model \'x\' not found, try pulling it first"}}'),
    (400, b"Bad Request"),
    (400, b""),
])
def test_what_is_not_an_overflow(status: int, body: bytes) -> None:
    assert classify(status, body) is None


def test_an_in_band_overflow_is_recognised() -> None:
    found = of_error({"code": 400, "message": "the request exceeds the available context size, "
                      "try increasing it", "type": "exceed_context_size_error", "n_ctx": 2048,
                      "n_prompt_tokens": 3000})
    assert found == Overflow(2048, 3000, found.message if found else "")
    assert of_error({"message": "simulated failure", "type": "server_error"}) is None


def test_the_anthropic_mapping_uses_the_same_classifier() -> None:
    body = orjson.dumps({"type": "error", "error": {
        "type": "invalid_request_error", "message": "input length and `max_tokens` exceed "
        "context limit: 188240 + 21333 > 200000, decrease input length or `max_tokens` and "
        "try again"}})
    assert isinstance(Anthropic().error_for(400, body, {}), ContextTooLong)


def test_the_simulator_refuses_an_unknown_wording() -> None:
    with pytest.raises(ValueError, match="context_style"):
        Simulator("m", faults=["context=10", "context_style=cobol"])
