"""Tokens and cost: what an upstream reports in `usage`, counted per instance and model in
/metrics, in the request's log line and audit record, and priced with metadata.cost."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import parse_config
from tests.cluster import Cluster
from tests.conftest import MakeProxy, MakeSim, RunningProxy, chat_body, proxy_config

#: What OpenAI's API answers for a prompt mostly served from its prompt cache (the shape
#: of "The chat completion object", API reference).
CACHED_ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
              "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0}},
}


@pytest.fixture
async def openai_like() -> AsyncIterator[str]:
    """A bare aiohttp server answering every chat completion with CACHED_ANSWER."""
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini"}]})

    async def chat(request: web.Request) -> web.Response:
        return web.json_response(CACHED_ANSWER)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    await runner.cleanup()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series of a /metrics page (0.0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def scrape(proxy: RunningProxy) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/metrics") as resp:
        return await resp.text()


async def test_a_whole_answers_tokens_and_cost_reach_metrics_and_the_audit_record(
        make_proxy: MakeProxy, openai_like: str) -> None:
    config = parse_config({"providers": [{"provider_id": "openai", "local": False, "instances": [
        {"id": "default", "base_url": openai_like, "metadata": {
            "model": "gpt-4o-mini", "cost": {"input_per_mtok": 2.0, "output_per_mtok": 8.0}}}]}]},
        "<test>")
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.base_url}/chat/completions",
                             json=chat_body(model="gpt-4o-mini")) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"] == CACHED_ANSWER["usage"]  # relayed as it was
            request_id = resp.headers["x-request-id"]
        async with http.get(f"{proxy.url}/admin/requests/{request_id}") as resp:
            (story,) = (await resp.json())["requests"]
        async with http.get(f"{proxy.url}/admin/status") as resp:
            hour = (await resp.json())["last_hour"]
    text = await scrape(proxy)
    where = {"model": "gpt-4o-mini", "instance": "openai:default"}
    assert metric(text, "failover_proxy_tokens_total", kind="prompt", **where) == 1200
    assert metric(text, "failover_proxy_tokens_total", kind="completion", **where) == 300
    assert metric(text, "failover_proxy_tokens_total", kind="cached", **where) == 1000
    cost = (1200 * 2.0 + 300 * 8.0) / 1e6
    assert metric(text, "failover_proxy_cost_total", **where) == pytest.approx(cost)
    assert story["usage"] == {"prompt_tokens": 1200, "completion_tokens": 300,
                              "cached_tokens": 1000, "cost": pytest.approx(cost)}
    assert hour["tokens"] == {"prompt": 1200, "completion": 300, "cached": 1000}
    assert hour["cost"] == pytest.approx(cost)


async def test_stream_tokens_count_when_the_stream_carries_usage_and_nothing_is_invented(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("local-model")
    proxy = await make_proxy(proxy_config([sim]))
    async with aiohttp.ClientSession() as http:
        variants: tuple[dict[str, Any], ...] = ({"stream_options": {"include_usage": True}}, {})
        for options in variants:
            async with http.post(f"{proxy.base_url}/chat/completions",
                                 json=chat_body(stream=True, **options)) as resp:
                body = await resp.read()
            assert resp.status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in body  # the second stream asked for none
    text = await scrape(proxy)
    where = {"model": "auto", "instance": "p0:s0"}
    # one stream reported 20 words as 20 completion tokens; the other reported nothing
    assert metric(text, "failover_proxy_tokens_total", kind="completion", **where) == 20
    assert metric(text, "failover_proxy_tokens_total", kind="prompt", **where) > 0
    assert metric(text, "failover_proxy_requests_total", outcome="ok", **where) == 2
    assert "failover_proxy_cost_total{" not in text  # a local instance costs nothing


async def test_a_replayed_streams_tokens_are_the_twin_that_finished_it(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    cut, twin = await make_sim("m", faults=["die_after=5"]), await make_sim("m")
    proxy = await make_proxy(proxy_config([cut, twin], health={"enabled": False}))
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.base_url}/chat/completions",
            json=chat_body(stream=True, stream_options={"include_usage": True})) as resp:
        body = await resp.read()
    assert resp.headers["x-route-instance"] == "p0:s0" and body.endswith(b"data: [DONE]\n\n")
    text = await scrape(proxy)
    assert metric(text, "failover_proxy_tokens_total", kind="completion", instance="p1:s1") == 20
    assert metric(text, "failover_proxy_tokens_total", instance="p0:s0") == 0


def test_the_request_log_line_carries_tokens_and_cost(cluster: Cluster) -> None:
    cluster.start_sim("a", "local-model")
    cluster.start_proxy([("a", "local-model")], instance_extra={
        "a": {"metadata": {"model": "local-model",
                           "cost": {"input_per_mtok": 1.0, "output_per_mtok": 3.0}}}})
    client = cluster.client()
    answer = client.chat.completions.create(
        model="local-model", messages=[{"role": "user", "content": "count my tokens"}])
    assert answer.usage is not None
    stream = client.chat.completions.create(
        model="local-model", messages=[{"role": "user", "content": "count my tokens"}],
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = chunks[-1].usage
    assert streamed is not None
    cluster.close()  # flushes the log
    logged: list[dict[str, Any]] = [json.loads(line) for line in cluster.log().splitlines()
                                    if line.startswith("{")]
    lines = [line for line in logged if line.get("event") == "request"]
    assert len(lines) == 2
    for line, usage in zip(lines, (answer.usage, streamed), strict=True):
        assert line["prompt_tokens"] == usage.prompt_tokens
        assert line["completion_tokens"] == usage.completion_tokens
        assert line["cached_tokens"] == 0
        assert line["cost"] == pytest.approx(
            (usage.prompt_tokens * 1.0 + usage.completion_tokens * 3.0) / 1e6)
