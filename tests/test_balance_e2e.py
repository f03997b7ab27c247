"""Load spreading and prefix-cache affinity at work: simulators that report llama.cpp's
slots on real ports behind the proxy, the openai SDK in front, no session header unless
the test is about sessions."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from proxy.api.state import STATE
from proxy.config import parse_config
from proxy.sim.simulator import Simulator
from tests.conftest import MakeProxy, MakeSim, RunningProxy, serving, wait_for

SYSTEM = "You review pull requests for a proxy written in Python. Be brief. " * 10


def config_for(sims: list[Simulator], **routing: Any) -> Any:
    return parse_config({
        "timeouts": {"connect_s": 2, "first_byte_s": 60, "idle_s": 60},
        "health": {"interval_s": 0.3, "timeout_s": 2},
        "routing": routing,
        "providers": [{"provider_id": "llamacpp", "instances": [
            {"id": f"s{n}", "base_url": sim.base_url, "metadata": {"model": "twin"}}
            for n, sim in enumerate(sims)]}],
    }, "<test>")


def sdk(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=60)


async def twins(make_sim: MakeSim, make_proxy: MakeProxy, slots: int = 4,
                **kw: Any) -> tuple[list[Simulator], RunningProxy]:
    sims = [await make_sim("twin", slots=slots, **kw) for _ in range(3)]
    proxy = await make_proxy(config_for(sims))
    registry = proxy.app[STATE].registry
    await wait_for(lambda: all(s.capacity == slots for s in registry.states), 10,
                   "the probes to read every simulator's slots")
    return sims, proxy


@asynccontextmanager
async def held(proxy: RunningProxy, sim: Simulator, instance: str,
               n: int = 1) -> AsyncIterator[None]:
    """`n` requests hanging on `instance` (named by `model`, so nothing else is chosen)
    while the block runs; they are dropped after it."""
    inst = proxy.app[STATE].registry.by_id[instance]
    before = inst.inflight
    sim.set_faults(["hang"])
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(http.post(
            f"{proxy.base_url}/chat/completions",
            json={"model": instance, "messages": [{"role": "user", "content": f"hold {k}"}]}))
            for k in range(n)]
        try:
            await wait_for(lambda: inst.inflight == before + n, 10, f"{n} held on {instance}")
            sim.set_faults([])
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    await wait_for(lambda: inst.inflight == before, 10, f"{instance} to be released")


async def turn(client: openai.AsyncOpenAI, history: list[ChatCompletionMessageParam],
               question: str, **extra: Any) -> str:
    """Ask the next question of a conversation (the whole history re-sent, as agents do);
    the answer is appended to `history`. Returns the instance that answered."""
    history.append({"role": "user", "content": question})
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=history, max_tokens=16, **extra)
    history.append({"role": "assistant", "content": raw.parse().choices[0].message.content or ""})
    return str(raw.headers["x-route-instance"])


async def dry_run(proxy: RunningProxy, history: list[ChatCompletionMessageParam],
                  question: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    body = {"model": "auto", "messages": [*history, {"role": "user", "content": question}]}
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/admin/route", json=body, headers=headers or {}) as resp:
        assert resp.status == 200
        plan: dict[str, Any] = await resp.json()
        return plan


async def test_24_concurrent_requests_are_spread_over_three_equal_instances(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sims, proxy = await twins(make_sim, make_proxy, chunk_delay=0.02)
    client = sdk(proxy)

    async def one(n: int) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"request {n}"}], stream=True)
        async for _ in raw.parse():
            pass
        return raw.headers["x-route-instance"]

    served = collections.Counter(await asyncio.gather(*(one(n) for n in range(24))))
    assert sum(served.values()) == 24
    assert max(served.values()) / 24 <= 0.5, served
    assert len(served) == 3, served
    assert sum(s.stats.requests for s in sims) == 24


async def test_a_growing_text_prompt_comes_back_to_the_instance_that_served_it(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    """/v1/completions chains its prompt in chunks: a prompt that grows (a document being
    continued) goes back where its beginning is cached, short or long."""
    sims, proxy = await twins(make_sim, make_proxy)
    client = sdk(proxy)
    prompt = "Once upon a time, in a data centre far away, " * 30  # above min_prefix_chars
    async with held(proxy, sims[0], "llamacpp:s0"):  # s0 busy: the first one goes to s1
        raw = await client.completions.with_raw_response.create(
            model="auto", prompt=prompt, max_tokens=8)
        assert raw.headers["x-route-instance"] == "llamacpp:s1"
    for more in (" and then", " and then" * 200):  # within a chunk, then across several
        prompt += more
        raw = await client.completions.with_raw_response.create(
            model="auto", prompt=prompt, max_tokens=8)
        assert raw.headers["x-route-instance"] == "llamacpp:s1"
        assert raw.parse().choices[0].text


async def test_a_conversation_comes_back_to_the_instance_that_served_its_prefix(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sims, proxy = await twins(make_sim, make_proxy)
    client = sdk(proxy)
    history: list[ChatCompletionMessageParam] = [{"role": "system", "content": SYSTEM}]
    async with held(proxy, sims[0], "llamacpp:s0"):  # s0 busy: the first turn goes to s1
        assert await turn(client, history, "What does this diff change?") == "llamacpp:s1"
    # Every instance idle again: config order would say s0; the cached prefix says s1.
    plan = await dry_run(proxy, history, "And the tests?")
    assert plan["selected"] == "llamacpp:s1"
    hit = [r for r in plan["reasons"]["llamacpp:s1"] if r.startswith("prefix_hit=")]
    assert hit and float(hit[0].split("=")[1]) > 0.5  # all but the answer and new question
    for question in ("And the tests?", "Anything else?", "Ship it?"):
        assert await turn(client, history, question) == "llamacpp:s1"
    # A conversation nobody has seen earns no instance a prefix bonus.
    plan = await dry_run(proxy, [{"role": "user", "content": "Unrelated. " * 80}], "Hello?")
    assert not any(r.startswith("prefix_hit") for rs in plan["reasons"].values() for r in rs)


async def test_load_guard_beats_affinity_when_the_cached_instance_is_full(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sims, proxy = await twins(make_sim, make_proxy, slots=2)
    client = sdk(proxy)
    history: list[ChatCompletionMessageParam] = [{"role": "system", "content": SYSTEM}]
    assert await turn(client, history, "What does this diff change?") == "llamacpp:s0"
    async with held(proxy, sims[0], "llamacpp:s0", n=2):  # 2 of its 2 slots
        plan = await dry_run(proxy, history, "And the tests?")
        assert plan["selected"] == "llamacpp:s1"
        reasons = plan["reasons"]["llamacpp:s0"]
        assert "load=2/2" in reasons
        assert any(r.startswith("prefix_hit=") and r.endswith("(busy)") for r in reasons)
        assert await turn(client, history, "And the tests?") == "llamacpp:s1"
    # Served by s1 last: s1 has the longest prefix now.
    assert await turn(client, history, "Anything else?") == "llamacpp:s1"


async def test_a_session_header_wins_over_affinity(make_sim: MakeSim,
                                                   make_proxy: MakeProxy) -> None:
    sims, proxy = await twins(make_sim, make_proxy)
    client = sdk(proxy)
    bob = {"x-session-id": "bob"}
    assert await turn(client, [], "Hi, I am Bob.", extra_headers=bob) == "llamacpp:s0"
    history: list[ChatCompletionMessageParam] = [{"role": "system", "content": SYSTEM}]
    async with held(proxy, sims[0], "llamacpp:s0", n=4):  # full: the prefix goes to s1
        assert await turn(client, history, "What does this diff change?") == "llamacpp:s1"
    plan = await dry_run(proxy, history, "And the tests?", bob)
    assert plan["selected"] == "llamacpp:s0"
    assert "sticky_session" in plan["reasons"]["llamacpp:s0"]
    assert not any(r.startswith("prefix_hit") for rs in plan["reasons"].values() for r in rs)
    assert await turn(client, history, "And the tests?", extra_headers=bob) == "llamacpp:s0"


LLAMACPP_METRICS = (b"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 3\n"
                    b"# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 2\n")
VLLM_METRICS = (b'# TYPE vllm:num_requests_running gauge\n'
                b'vllm:num_requests_running{model_name="m"} 3.0\n'
                b'# TYPE vllm:num_requests_waiting gauge\n'
                b'vllm:num_requests_waiting{model_name="m"} 2.0\n')


@pytest.mark.parametrize("server", ["llamacpp", "vllm"])
async def test_the_prober_reads_a_servers_own_load_from_its_metrics(
        server: str, make_proxy: MakeProxy) -> None:
    """A server answering as llama.cpp (`/health`, `/props` with `endpoint_metrics`,
    `/metrics`) or vLLM (`/v1/models`, `/metrics`) on a real port: its running and
    waiting requests reach the plan's reasons, and it is planned after an idle twin."""
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=LLAMACPP_METRICS if server == "llamacpp" else VLLM_METRICS,
                            content_type="text/plain")

    app = web.Application()
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def props(request: web.Request) -> web.Response:
        return web.json_response({"model_alias": "m", "total_slots": 4, "endpoint_metrics": True})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_get("/props", props)
    app.router.add_get("/v1/models", models)
    async with serving(app) as port:
        busy = f"http://127.0.0.1:{port}/v1"
        idle = f"http://127.0.0.1:{port}/idle/v1"  # 404s: reachable, and says no load
        proxy = await make_proxy(parse_config({
            "health": {"interval_s": 0.3, "timeout_s": 2},
            "providers": [{"provider_id": "p", "server": server, "instances": [
                {"id": "busy", "base_url": busy, "metadata": {"model": "m"}},
                {"id": "other", "base_url": idle, "metadata": {"model": "m"}}]}]}, "<t>"))
        inst = proxy.app[STATE].registry.by_id["p:busy"]
        await wait_for(lambda: (inst.server_busy, inst.server_queued) == (3, 2), 10,
                       "the probe to read the server's metrics")
        plan = await dry_run(proxy, [], "hello")
        reasons = plan["reasons"]["p:busy"]
        assert "queue=2" in reasons
        assert ("load=3/4" if server == "llamacpp" else "load=3") in reasons
        assert plan["selected"] == "p:other"


async def test_a_stream_cut_mid_answer_is_remembered_on_the_instance_that_finished_it(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sims, proxy = await twins(make_sim, make_proxy, words=40)
    sims[0].set_faults(["die_after=10"])  # s0 starts the answer and dies; s1 replays it
    client = sdk(proxy)
    history: list[ChatCompletionMessageParam] = [{"role": "system", "content": SYSTEM}]
    bob = {"x-session-id": "bob"}
    history.append({"role": "user", "content": "What does this diff change?"})
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=history, max_tokens=64, stream=True, extra_headers=bob)
    text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert raw.headers["x-route-instance"] == "llamacpp:s0"  # where it started
    history.append({"role": "assistant", "content": text})
    trail = await events(proxy, raw.headers["x-request-id"])
    assert [(e["from_instance"], e["to_instance"]) for e in trail
            if e["type"] == "STREAM_RESUMED"] == [("llamacpp:s0", "llamacpp:s1")]
    sims[0].set_faults([])
    # s1 holds the prompt and the whole answer: the next turn's prefix is there.
    plan = await dry_run(proxy, history, "And the tests?")
    assert any(r.startswith("prefix_hit=") for r in plan["reasons"]["llamacpp:s1"])
    assert not any(r.startswith("prefix_hit=") for r in plan["reasons"]["llamacpp:s0"])
    plan = await dry_run(proxy, history, "And the tests?", bob)
    assert plan["selected"] == "llamacpp:s1"
    assert "sticky_session" in plan["reasons"]["llamacpp:s1"]


async def events(proxy: RunningProxy, request_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{proxy.url}/admin/events", params={"request_id": request_id}) as resp:
        return list((await resp.json())["events"])
