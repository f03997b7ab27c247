"""The route plan at work: simulators on real ports behind the proxy, the openai SDK in front."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
from openai.types.chat import ChatCompletionFunctionToolParam

from proxy.api.state import STATE
from proxy.config import parse_config
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, chat_body, wait_for

ROOT = Path(__file__).resolve().parents[1]


def config_for(sims: list[tuple[Simulator, dict[str, Any]]], **sections: Any) -> Any:
    doc: dict[str, Any] = {
        "timeouts": {"connect_s": 1, "first_byte_s": 2, "idle_s": 2},
        "health": {"interval_s": 0.5, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "providers": [{"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": sim.base_url, "metadata": {"model": sim.model, **meta}}
            for n, (sim, meta) in enumerate(sims)]}],
        **sections,
    }
    return parse_config(doc, "<test>")


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=20)


async def test_long_prompt_skips_the_small_window_instance(make_sim: MakeSim,
                                                           make_proxy: MakeProxy) -> None:
    small, big = await make_sim("small"), await make_sim("big")
    proxy = await make_proxy(config_for([(small, {"ctx": 2048}), (big, {"ctx": 32768})]))
    prompt = "lorem ipsum " * 2000  # ~6,000 tokens by the estimate
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=50)
    assert raw.headers["x-route-instance"] == "p:s1"
    assert raw.headers["x-route-attempts"] == "1"
    assert small.stats.requests == 0  # never even tried


async def test_tools_request_goes_first_to_the_instance_that_declares_tools(make_sim: MakeSim,
                                                                    make_proxy: MakeProxy) -> None:
    plain, capable = await make_sim("plain"), await make_sim("capable")
    proxy = await make_proxy(config_for([(plain, {"capabilities": ["json"]}),
                                         (capable, {"capabilities": ["tools", "json"]})]))
    tools: list[ChatCompletionFunctionToolParam] = [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "what time is it"}], tools=tools)
    assert raw.headers["x-route-instance"] == "p:s1"
    assert plain.stats.requests == 0


async def test_session_stays_and_moves_once_when_its_instance_dies(make_sim: MakeSim,
                                                                  make_proxy: MakeProxy) -> None:
    a, b = await make_sim("twin"), await make_sim("twin")
    proxy = await make_proxy(config_for([(a, {}), (b, {})]))
    client = sdk(proxy.base_url)

    async def served_by(prompt: str, session: str) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}],
            extra_headers={"x-session-id": session})
        assert raw.parse().choices[0].message.content == answer_text("twin", prompt, 20)
        return raw.headers["x-route-instance"]

    assert [await served_by(f"turn {n}", "alice") for n in range(3)] == ["p:s0"] * 3
    await a.stop()
    assert await served_by("turn 3", "alice") == "p:s1"
    await a.start()  # the first server is back, on the same port
    # Alice stays where her conversation moved; a new session starts on the first server.
    assert [await served_by(f"turn {n}", "alice") for n in range(4, 7)] == ["p:s1"] * 3
    first = proxy.app[STATE].registry.by_id["p:s0"]
    await wait_for(lambda: first.routable(), what="the prober to see p:s0 back")
    assert await served_by("hello", "bob") == "p:s0"
    assert await served_by("turn 7", "alice") == "p:s1"


async def test_user_field_is_the_session_key(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("twin"), await make_sim("twin")
    proxy = await make_proxy(config_for([(a, {}), (b, {})]))
    client = sdk(proxy.base_url)
    await a.stop()
    moved = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], user="carol")
    assert moved.headers["x-route-instance"] == "p:s1"
    await a.start()
    again = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], user="carol")
    assert again.headers["x-route-instance"] == "p:s1"


async def test_context_length_exceeded_reroutes_to_a_larger_window(make_sim: MakeSim,
                                                                   make_proxy: MakeProxy) -> None:
    # The config under-states nothing: the server itself says the prompt does not fit.
    small = await make_sim("small", faults=["context=10"])
    same = await make_sim("same", faults=["context=10"])
    big = await make_sim("big")
    proxy = await make_proxy(config_for([(small, {"ctx": 4096}), (same, {"ctx": 4096}),
                                         (big, {"ctx": 65536})]))
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=20)
    assert raw.headers["x-route-instance"] == "p:s2"
    assert raw.headers["x-route-attempts"] == "2"
    assert same.stats.requests == 0  # a window no larger is not worth trying
    assert raw.parse().choices[0].message.content == answer_text("big", prompt, 20)


async def test_context_length_exceeded_everywhere_is_a_400(make_sim: MakeSim,
                                                           make_proxy: MakeProxy) -> None:
    small = await make_sim("small", faults=["context=3"])
    proxy = await make_proxy(config_for([(small, {"ctx": 4096})]))
    try:
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "a b c d e f"}], max_tokens=5)
    except openai.BadRequestError as exc:
        assert exc.code == "context_length_exceeded"
    else:
        raise AssertionError("expected a 400")


async def test_admin_route_dry_run_sends_nothing(make_sim: MakeSim, make_proxy: MakeProxy,
                                                 http: aiohttp.ClientSession) -> None:
    a, b = await make_sim("a"), await make_sim("b")
    proxy = await make_proxy(config_for([(a, {"tags": ["general"]}), (b, {"tags": ["coding"]})],
                                        server={"admin_key": "adm-secret"}))
    body = chat_body("fix this python bug")
    async with http.post(f"{proxy.url}/admin/route", json=body) as resp:
        assert resp.status == 401
    async with http.post(f"{proxy.url}/admin/route", json=body,
                         headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
        assert "adm-secret" not in await resp.text()
    async with http.post(f"{proxy.url}/admin/route", json=body,
                         headers={"Authorization": "Bearer adm-secret"}) as resp:
        assert resp.status == 200
        plan = await resp.json()
    assert plan["selected"] == "p:s1"
    assert plan["requirements"]["tags"] == ["coding"]
    assert "tags_match=coding" in plan["reasons"]["p:s1"]
    assert a.stats.requests == 0 and b.stats.requests == 0


async def test_plan_id_header_on_responses(make_sim: MakeSim, make_proxy: MakeProxy,
                                           http: aiohttp.ClientSession) -> None:
    a = await make_sim("a")
    proxy = await make_proxy(config_for([(a, {})]))
    ids = set()
    for _ in range(3):
        async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
            ids.add(resp.headers["x-route-plan-id"])
    assert len(ids) == 3


def test_route_cli_prints_a_readable_plan() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "route", "--config", "config/demo.yaml", "-m", "auto",
         "-p", "fix this python bug"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["selected"] == "local:primary"
    assert plan["fallback"] == ["local:secondary", "cloud:default"]
    assert plan["requirements"]["tags"] == ["coding"]
    assert "tags_match=coding" in plan["reasons"]["local:primary"]
