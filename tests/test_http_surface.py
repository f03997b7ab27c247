"""The HTTP surface: bad input gets an OpenAI-shaped 4xx, never a 500; health and models."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import MakeProxy, MakeSim, chat_body, proxy_config


def assert_openai_error(body: dict[str, Any], status: int) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("path,payload,param", [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", b'"text"', None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    ("/v1/chat/completions", b'{"model": 5, "messages": []}', "model"),
    ("/v1/chat/completions", b'{"model": "auto"}', "messages"),
    ("/v1/chat/completions", b'{"model": "auto", "messages": "hi"}', "messages"),
    ("/v1/chat/completions", b'{"model": "auto", "messages": []}', "messages"),
    ("/v1/chat/completions", b'{"model": "auto", "messages": [42]}', "messages[0]"),
    ("/v1/chat/completions", b'{"model": "auto", "messages": [{"content": "x"}]}', "messages[0].role"),
    ("/v1/chat/completions",
     b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    ("/v1/chat/completions",
     b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}',
     "max_tokens"),
    ("/v1/chat/completions",
     b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream_options": 1}',
     "stream_options"),
    ("/v1/chat/completions", b"\xff\xfe\x00garbage", None),
    ("/v1/completions", b'{"model": "auto"}', "prompt"),
    ("/v1/completions", b'{"model": "auto", "prompt": {"a": 1}}', "prompt"),
    ("/v1/embeddings", b'{"model": "auto"}', "input"),
    ("/v1/embeddings", b'{"model": "auto", "input": "x", "stream": true}', "stream"),
])
async def test_malformed_bodies_get_400(make_sim: MakeSim, make_proxy: MakeProxy,
                                        http: aiohttp.ClientSession, path: str, payload: bytes,
                                        param: str | None) -> None:
    sim = await make_sim()
    proxy = await make_proxy(proxy_config([sim]))
    async with http.post(proxy.url + path, data=payload,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert_openai_error(body, 400)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert sim.stats.requests == 0  # rejected before any upstream work


async def test_sdk_raises_bad_request(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim()
    proxy = await make_proxy(proxy_config([sim]))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="auto", messages=[])


async def test_body_too_large_is_413(make_sim: MakeSim, make_proxy: MakeProxy,
                                     http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    proxy = await make_proxy(proxy_config([sim], server={"max_body_bytes": 2048}))
    big = chat_body("x" * 5000)
    async with http.post(f"{proxy.base_url}/chat/completions", json=big) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json(), 413)


async def test_unknown_path_and_wrong_method_are_openai_shaped(make_sim: MakeSim,
                                                               make_proxy: MakeProxy,
                                                               http: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(proxy_config([await make_sim()]))
    async with http.get(f"{proxy.base_url}/nothing-here") as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json(), 404)
    async with http.get(f"{proxy.base_url}/chat/completions") as resp:
        assert resp.status == 405
        assert_openai_error(await resp.json(), 405)


async def test_strict_mode_unknown_model_is_404(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("model-a")
    proxy = await make_proxy(proxy_config([sim], routing={"strict_models": True}))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model",
                                             messages=[{"role": "user", "content": "x"}])
    ok = await client.chat.completions.create(model="model-a",
                                              messages=[{"role": "user", "content": "x"}])
    assert ok.model == "model-a"


async def test_non_strict_unknown_model_is_served(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("model-a")
    proxy = await make_proxy(proxy_config([sim]))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    ok = await client.chat.completions.create(model="whatever",
                                              messages=[{"role": "user", "content": "x"}])
    assert ok.model == "model-a"


async def test_models_list(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("model-a"), await make_sim("model-b")
    proxy = await make_proxy(proxy_config([a, b], models={"fast": {"instances": ["p1:s1"]}}))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    ids = [m.id async for m in client.models.list()]
    assert ids == ["auto", "fast", "model-a", "model-b"]


async def test_healthz_and_readyz(make_sim: MakeSim, make_proxy: MakeProxy,
                                  http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    proxy = await make_proxy(proxy_config([sim]))
    async with http.get(f"{proxy.url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{proxy.url}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["routable"] == ["p0:s0"]


async def test_readyz_503_and_route_blocked_when_nothing_enabled(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    from proxy.config import parse_config

    sim = await make_sim()
    config = parse_config({"providers": [{"provider_id": "p", "instances": [
        {"id": "a", "base_url": sim.base_url, "enabled": False}]}]})
    proxy = await make_proxy(config)
    async with http.get(f"{proxy.url}/readyz") as resp:
        assert resp.status == 503
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
        assert resp.status == 503
        body = await resp.json()
    assert_openai_error(body, 503)
    assert body["error"]["code"] == "ROUTE_BLOCKED"
    assert "No available instances" in body["error"]["message"]
    assert sim.stats.requests == 0
