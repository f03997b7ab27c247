"""Tokens and cost: what an upstream reports in `usage`, counted per instance and model in
/metrics, in the request's log line and audit record, and priced with metadata.cost."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import parse_config
from tests.cluster import ROOT, Cluster
from tests.conftest import MakeProxy, MakeSim, RunningProxy, chat_body, proxy_config, serving

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


@contextlib.asynccontextmanager
async def one_answer_server(model: str, answer: dict[str, Any]) -> AsyncIterator[str]:
    """A bare aiohttp server listing `model` and answering every chat completion with
    `answer`; yields its base URL (`.../v1`)."""
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model}]})

    async def chat(request: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def openai_like() -> AsyncIterator[str]:
    """Every chat completion answered with CACHED_ANSWER."""
    async with one_answer_server("gpt-4o-mini", CACHED_ANSWER) as url:
        yield url


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
                              "cached_tokens": 1000, "cost": pytest.approx(cost),
                              "tokens_estimated": False}
    assert hour["tokens"] == {"prompt": 1200, "completion": 300, "cached": 1000}
    assert hour["tokens_estimated"] == {"prompt": 0, "completion": 0}
    assert hour["cost"] == pytest.approx(cost)


async def test_a_stream_without_usage_gets_estimated_tokens_marked_as_such(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    """Two streams, one with `include_usage`, one without: the first counts as stated, the
    second is estimated (prompt: the planner's estimate; completion: the characters the
    client received / 4) and shows as estimated in its own series, the request view, the
    status tallies and the route_plans row; nothing estimated is added to the stated
    figures."""
    sim = await make_sim("local-model")
    proxy = await make_proxy(proxy_config([sim]))
    ids, texts = [], []
    async with aiohttp.ClientSession() as http:
        variants: tuple[dict[str, Any], ...] = ({"stream_options": {"include_usage": True}}, {})
        for options in variants:
            async with http.post(f"{proxy.base_url}/chat/completions",
                                 json=chat_body(stream=True, **options)) as resp:
                body = await resp.read()
            assert resp.status == 200 and body.endswith(b"data: [DONE]\n\n")
            ids.append(resp.headers["x-request-id"])
            texts.append("".join(
                (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                for line in body.decode().splitlines()
                if line.startswith("data: {")))
        stories = []
        for request_id in ids:
            async with http.get(f"{proxy.url}/admin/requests/{request_id}") as resp:
                stories.append((await resp.json())["requests"][0])
        async with http.get(f"{proxy.url}/admin/status") as resp:
            hour = (await resp.json())["last_hour"]
    assert b'"usage"' not in body  # the second stream asked for none
    text = await scrape(proxy)
    where = {"model": "auto", "instance": "p0:s0"}
    # the first stream reported 20 words as 20 completion tokens
    assert metric(text, "failover_proxy_tokens_total", kind="completion", **where) == 20
    stated_prompt = metric(text, "failover_proxy_tokens_total", kind="prompt", **where)
    assert stated_prompt > 0
    assert metric(text, "failover_proxy_requests_total", outcome="ok", **where) == 2
    assert "failover_proxy_cost_total{" not in text  # a local instance costs nothing
    estimated_completion = -(-len(texts[1]) // 4)
    prompt_estimate = stories[1]["plan"]["requirements"]["prompt_tokens"]
    assert estimated_completion > 0 and prompt_estimate > 0
    assert metric(text, "failover_proxy_tokens_estimated_total", kind="completion",
                  **where) == estimated_completion
    assert metric(text, "failover_proxy_tokens_estimated_total", kind="prompt",
                  **where) == prompt_estimate
    assert stories[0]["usage"]["tokens_estimated"] is False
    assert stories[1]["usage"] == {"prompt_tokens": prompt_estimate,
                                   "completion_tokens": estimated_completion,
                                   "cached_tokens": 0, "cost": 0.0, "tokens_estimated": True}
    assert hour["tokens"]["completion"] == 20
    assert hour["tokens_estimated"] == {"prompt": prompt_estimate,
                                        "completion": estimated_completion}


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


@pytest.fixture
async def no_usage_server() -> AsyncIterator[str]:
    """Whole answers that carry no `usage` (as some servers send them)."""
    async with one_answer_server("quiet", {
            "id": "c", "object": "chat.completion", "created": 1, "model": "quiet",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": ANSWER_WITHOUT_USAGE}}]}) as url:
        yield url


ANSWER_WITHOUT_USAGE = "The answer is forty-two, as always."  # 35 characters: 9 tokens


def quiet_config(no_usage_server: str, openai_like: str, store_url: str) -> Any:
    """A priced instance without usage and one with it (CACHED_ANSWER)."""
    return parse_config({"store": {"url": store_url}, "providers": [
        {"provider_id": "cloud", "local": False, "instances": [
            {"id": "quiet", "base_url": no_usage_server, "metadata": {
                "model": "quiet", "cost": {"input_per_mtok": 1.0, "output_per_mtok": 4.0}}},
            {"id": "stated", "base_url": openai_like, "metadata": {
                "model": "gpt-4o-mini", "cost": {"input_per_mtok": 2.0,
                                                 "output_per_mtok": 8.0}}}]}]}, "<test>")


async def test_a_whole_answer_without_usage_is_estimated_from_its_text(
        make_proxy: MakeProxy, no_usage_server: str, openai_like: str, tmp_path: Path) -> None:
    proxy = await make_proxy(quiet_config(no_usage_server, openai_like,
                                          f"sqlite:///{tmp_path}/audit.db"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.base_url}/chat/completions",
                             json=chat_body(model="quiet")) as resp:
            assert resp.status == 200 and "usage" not in await resp.json()
            request_id = resp.headers["x-request-id"]
        async with http.get(f"{proxy.url}/admin/requests/{request_id}") as resp:
            (story,) = (await resp.json())["requests"]
    prompt = story["plan"]["requirements"]["prompt_tokens"]
    cost = (prompt * 1.0 + 9 * 4.0) / 1e6
    assert story["usage"] == {"prompt_tokens": prompt, "completion_tokens": 9,
                              "cached_tokens": 0, "cost": pytest.approx(cost),
                              "tokens_estimated": True}
    text = await scrape(proxy)
    where = {"model": "quiet", "instance": "cloud:quiet"}
    assert metric(text, "failover_proxy_tokens_estimated_total", kind="completion", **where) == 9
    assert metric(text, "failover_proxy_cost_estimated_total", **where) == pytest.approx(cost)
    assert metric(text, "failover_proxy_tokens_total", **where) == 0


async def test_events_sum_adds_up_tokens_and_cost_by_instance_and_model(
        make_proxy: MakeProxy, no_usage_server: str, openai_like: str, store_url: str) -> None:
    """`failover-proxy events --sum` on either store: two answers with usage and one
    without, grouped by instance and model asked for, the estimated one counted as such;
    `--until` before them finds none; a malformed `--until` is refused."""
    proxy = await make_proxy(quiet_config(no_usage_server, openai_like, store_url))
    async with aiohttp.ClientSession() as http:
        for model in ("gpt-4o-mini", "gpt-4o-mini", "quiet"):
            async with http.post(f"{proxy.base_url}/chat/completions",
                                 json=chat_body(model=model)) as resp:
                assert resp.status == 200
    await proxy.stop()  # everything queued is written

    def events(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", "events", "--store", store_url,
                               *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                              check=False)

    out = events("--sum", "--since", "1h", "--json")
    assert out.returncode == 0, out.stderr
    quiet, stated = json.loads(out.stdout)  # ordered by instance
    assert (stated["instance"], stated["model"], stated["requests"]) == (
        "cloud:stated", "gpt-4o-mini", 2)
    assert (stated["prompt_tokens"], stated["completion_tokens"], stated["cached_tokens"]) == (
        2400, 600, 2000)
    assert stated["cost"] == pytest.approx(2 * (1200 * 2.0 + 300 * 8.0) / 1e6)
    assert stated["estimated"] == 0
    assert (quiet["instance"], quiet["model"], quiet["requests"], quiet["estimated"]) == (
        "cloud:quiet", "quiet", 1, 1)
    assert quiet["completion_tokens"] == 9
    table = events("--sum", "--since", "24h")
    assert table.returncode == 0
    head, *rows = table.stdout.splitlines()[1:]
    assert head.split()[:4] == ["INSTANCE", "MODEL", "REQUESTS", "PROMPT"]
    assert rows[0].split()[:6] == ["cloud:quiet", "quiet", "1", str(quiet["prompt_tokens"]),
                                   "9", "0"]
    assert rows[-1].split()[:2] == ["total", "3"]
    before = events("--sum", "--until", "2h", "--json")
    assert before.returncode == 0 and json.loads(before.stdout) == []
    bad = events("--sum", "--until", "yesterday")
    assert bad.returncode == 2 and "'until'" in bad.stderr
    mixed = events("--sum", "--type", "REROUTED")
    assert mixed.returncode == 2 and "--sum adds up a period" in mixed.stderr


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
    unstated = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="local-model", messages=[{"role": "user", "content": "count my tokens"}],
        stream=True) if c.choices)
    cluster.close()  # flushes the log
    logged: list[dict[str, Any]] = [json.loads(line) for line in cluster.log().splitlines()
                                    if line.startswith("{")]
    lines = [line for line in logged if line.get("event") == "request"]
    assert len(lines) == 3
    assert lines[2]["tokens_estimated"] is True
    assert lines[2]["completion_tokens"] == -(-len(unstated) // 4)
    for line, usage in zip(lines[:2], (answer.usage, streamed), strict=True):
        assert line["tokens_estimated"] is False
        assert line["prompt_tokens"] == usage.prompt_tokens
        assert line["completion_tokens"] == usage.completion_tokens
        assert line["cached_tokens"] == 0
        assert line["cost"] == pytest.approx(
            (usage.prompt_tokens * 1.0 + usage.completion_tokens * 3.0) / 1e6)
