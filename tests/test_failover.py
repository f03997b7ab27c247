"""Failover before the commit point, through the proxy app on a real port, with simulators.

Each test breaks a real socket-level backend and checks what the client (the official
`openai` SDK or a raw HTTP client) actually received.
"""

from __future__ import annotations

import time

import aiohttp
import openai
import pytest

from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, chat_body, proxy_config, sdk_text

PROMPT = "tell me about failover"


def sdk(proxy_base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy_base_url, api_key="unused", max_retries=0,
                              timeout=20)


async def test_healthy_primary_answers_non_stream(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("model-a"), await make_sim("model-b")
    proxy = await make_proxy(proxy_config([a, b]))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}])
    completion = raw.parse()
    assert completion.choices[0].message.content == answer_text("model-a", PROMPT, 20)
    assert completion.model == "model-a"  # the upstream's model field, unchanged
    assert raw.headers["x-route-instance"] == "p0:s0"
    assert raw.headers["x-route-attempts"] == "1"
    assert raw.headers["x-request-id"]
    assert raw.headers["x-route-plan-id"]
    assert b.stats.requests == 0


async def test_healthy_primary_answers_stream(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("model-a"), await make_sim("model-b")
    proxy = await make_proxy(proxy_config([a, b]))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}], stream=True)
    assert raw.headers["x-route-instance"] == "p0:s0"
    ids, text = set(), ""
    async for chunk in raw.parse():
        ids.add(chunk.id)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == answer_text("model-a", PROMPT, 20)
    assert len(ids) == 1


async def test_client_request_id_is_kept(make_sim: MakeSim, make_proxy: MakeProxy,
                                         http: aiohttp.ClientSession) -> None:
    a = await make_sim()
    proxy = await make_proxy(proxy_config([a]))
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body(),
                         headers={"x-request-id": "req-123"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "req-123"


@pytest.mark.parametrize("probes,attempts", [(False, "2"), (True, "1")])
async def test_primary_not_listening_fails_over(make_sim: MakeSim, make_proxy: MakeProxy,
                                                probes: bool, attempts: str) -> None:
    dead = await make_sim("model-a", faults=["refuse"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([dead, b], health={"enabled": probes}))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert raw.headers["x-route-instance"] == "p1:s1"
    # Found by traffic it costs one refused attempt; found by the prober, none.
    assert raw.headers["x-route-attempts"] == attempts
    assert raw.parse().choices[0].message.content == answer_text("model-b", PROMPT, 20)


async def test_stream_with_dead_primary_equals_fallback_direct(make_sim: MakeSim,
                                                              make_proxy: MakeProxy) -> None:
    dead = await make_sim("model-a", faults=["refuse"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([dead, b]))

    async def stream_text(client: openai.AsyncOpenAI, model: str) -> str:
        text = ""
        async for chunk in await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPT}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        return text

    direct = openai.AsyncOpenAI(base_url=b.base_url + "/v1", api_key="x", max_retries=0)
    assert await stream_text(sdk(proxy.base_url), "auto") == await stream_text(direct, "model-b")


async def test_primary_killed_between_two_requests(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("model-a"), await make_sim("model-b")
    proxy = await make_proxy(proxy_config([a, b]))
    client = sdk(proxy.base_url)
    first = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "one"}], user="session-1")
    assert first.headers["x-route-instance"] == "p0:s0"
    await a.stop()  # like a killed process: listener closed, connections aborted
    second = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "two"}], user="session-1")
    assert second.headers["x-route-instance"] == "p1:s1"
    assert second.parse().choices[0].message.content == answer_text("model-b", "two", 20)


@pytest.mark.parametrize("stream", [False, True])
async def test_primary_hangs_answer_arrives_after_first_byte_timeout(
        make_sim: MakeSim, make_proxy: MakeProxy, stream: bool) -> None:
    hung = await make_sim("model-a", faults=["hang"])
    b = await make_sim("model-b")
    # first_byte_s is the fallback's budget too: 2 s, for a loaded machine.
    proxy = await make_proxy(proxy_config([hung, b], timeouts={"first_byte_s": 2}))
    started = time.monotonic()
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}], stream=stream)
    assert raw.headers["x-route-instance"] == "p1:s1"
    assert raw.headers["x-route-attempts"] == "2"
    assert await sdk_text(raw.parse()) == answer_text("model-b", PROMPT, 20)
    # The hang cost the first-byte timeout, not the SDK's 20 s (loose bound: not a benchmark).
    assert time.monotonic() - started < 10
    assert hung.stats.requests == 1  # a timeout is not retried on the same instance


async def test_primary_503_is_retried_once_then_fails_over(make_sim: MakeSim,
                                                          make_proxy: MakeProxy) -> None:
    bad = await make_sim("model-a", faults=["status=503"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([bad, b]))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert raw.headers["x-route-instance"] == "p1:s1"
    assert raw.headers["x-route-attempts"] == "3"
    assert bad.stats.requests == 2


async def test_transient_500_retried_on_same_instance(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    flaky = await make_sim("model-a", faults=["status=500", "times=1"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([flaky, b]))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert raw.headers["x-route-instance"] == "p0:s0"
    assert raw.headers["x-route-attempts"] == "2"
    assert b.stats.requests == 0


async def test_body_cut_mid_response_is_retried(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    dying = await make_sim("model-a", faults=["die_after=3", "times=1"])
    proxy = await make_proxy(proxy_config([dying]))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert raw.headers["x-route-attempts"] == "2"
    assert raw.parse().choices[0].message.content == answer_text("model-a", PROMPT, 20)


async def test_429_fails_over_at_once(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    limited = await make_sim("model-a", faults=["rate_limit=30"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([limited, b]))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert raw.headers["x-route-instance"] == "p1:s1"
    assert raw.headers["x-route-attempts"] == "2"
    assert limited.stats.requests == 1


async def test_429_on_the_only_instance_waits_out_retry_after(make_sim: MakeSim,
                                                             make_proxy: MakeProxy) -> None:
    limited = await make_sim("model-a", faults=["rate_limit=1", "times=1"])
    proxy = await make_proxy(proxy_config([limited]))
    started = time.monotonic()
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert raw.headers["x-route-instance"] == "p0:s0"
    assert raw.headers["x-route-attempts"] == "2"
    assert time.monotonic() - started >= 0.9  # Retry-After honoured, not hammered


async def test_429_longer_than_max_wait_returns_429(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    limited = await make_sim("model-a", faults=["rate_limit=60"])
    proxy = await make_proxy(proxy_config([limited]))
    with pytest.raises(openai.RateLimitError) as err:
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert err.value.response.headers["Retry-After"]
    assert limited.stats.requests == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_everything_down_names_each_attempt(make_sim: MakeSim, make_proxy: MakeProxy,
                                                  stream: bool) -> None:
    a = await make_sim("model-a", faults=["refuse"])
    b = await make_sim("model-b", faults=["status=503"])
    proxy = await make_proxy(proxy_config([a, b], health={"enabled": False}))
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}], stream=stream)
    assert err.value.status_code == 502
    message = str(err.value)
    assert "p0:s0 CONN_REFUSED" in message
    assert "p1:s1 UPSTREAM_5XX" in message
    assert err.value.response.headers["x-route-attempts"] == "3"


async def test_everything_known_down_is_503_route_blocked(make_sim: MakeSim,
                                                          make_proxy: MakeProxy) -> None:
    a = await make_sim("model-a", faults=["refuse"])
    b = await make_sim("model-b", faults=["refuse"])
    proxy = await make_proxy(proxy_config([a, b]))
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert err.value.status_code == 503
    assert err.value.code == "ROUTE_BLOCKED"
    assert "No available instances" in str(err.value)
    # Both were given a last try in case they were back; both refused.
    assert "last-resort tries failed: p0:s0 CONN_REFUSED" in str(err.value)


async def test_every_attempt_timed_out_is_504(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a = await make_sim("model-a", faults=["hang"])
    proxy = await make_proxy(proxy_config([a], timeouts={"first_byte_s": 0.3}))
    with pytest.raises(openai.APIStatusError) as err:
        await sdk(proxy.base_url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert err.value.status_code == 504
    assert "TIMEOUT" in str(err.value)


async def test_upstream_400_passes_through_unchanged(make_sim: MakeSim, make_proxy: MakeProxy,
                                                     http: aiohttp.ClientSession) -> None:
    bad = await make_sim("model-a", faults=["status=400"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([bad, b]))
    async with http.post(f"{bad.base_url}/v1/chat/completions", json=chat_body()) as direct:
        direct_body = await direct.read()
    bad_before = bad.stats.requests
    async with http.post(f"{proxy.base_url}/chat/completions", json=chat_body()) as resp:
        assert resp.status == 400
        assert await resp.read() == direct_body
        assert resp.headers["x-route-instance"] == "p0:s0"
    assert bad.stats.requests == bad_before + 1
    assert b.stats.requests == 0


async def test_stream_dying_before_content_is_invisible(make_sim: MakeSim,
                                                        make_proxy: MakeProxy) -> None:
    dying = await make_sim("model-a", faults=["die_after=0"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([dying, b], retry={"same_instance_retries": 0}))
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert raw.headers["x-route-instance"] == "p1:s1"
    assert text == answer_text("model-b", PROMPT, 20)


async def test_stream_cut_after_commit_is_never_a_clean_end(make_sim: MakeSim,
                                                            make_proxy: MakeProxy) -> None:
    dying = await make_sim("model-a", faults=["die_after=5"], prefill=False)
    b = await make_sim("model-b", prefill=False)
    proxy = await make_proxy(proxy_config([dying, b]))
    text = ""
    with pytest.raises(openai.APIError):
        async for chunk in await sdk(proxy.base_url).chat.completions.create(
                model="auto", messages=[{"role": "user", "content": PROMPT}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    assert answer_text("model-a", PROMPT, 20).startswith(text)
    assert len(text.split()) == 5


async def test_stream_without_done_but_finished_is_completed(make_sim: MakeSim,
                                                             make_proxy: MakeProxy,
                                                             http: aiohttp.ClientSession) -> None:
    sim = await make_sim("model-a", faults=["no_done"])
    proxy = await make_proxy(proxy_config([sim]))
    async with http.post(f"{proxy.base_url}/chat/completions",
                         json=chat_body(PROMPT, stream=True)) as resp:
        body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"[DONE]") == 1


async def test_model_name_is_rewritten_for_each_instance(make_sim: MakeSim,
                                                         make_proxy: MakeProxy) -> None:
    a = await make_sim("model-a", faults=["refuse"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([a, b], models={"chat": {"instances": ["p0:s0", "p1:s1"]}}))
    completion = await sdk(proxy.base_url).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": PROMPT}])
    # The simulator answers for the model it was asked for; model-b's text proves the rewrite.
    assert completion.model == "model-b"
    assert completion.choices[0].message.content == answer_text("model-b", PROMPT, 20)


async def test_completions_and_embeddings_fail_over(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    dead = await make_sim("model-a", faults=["refuse"])
    b = await make_sim("model-b")
    proxy = await make_proxy(proxy_config([dead, b]))
    client = sdk(proxy.base_url)
    text = await client.completions.with_raw_response.create(model="auto", prompt=PROMPT)
    assert text.headers["x-route-instance"] == "p1:s1"
    assert text.parse().choices[0].text == answer_text("model-b", PROMPT, 20)
    emb = await client.embeddings.with_raw_response.create(model="auto", input=["a", "b"])
    assert emb.headers["x-route-instance"] == "p1:s1"
    assert len(emb.parse().data) == 2


async def test_requested_instance_first_then_others(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("model-a"), await make_sim("model-b")
    proxy = await make_proxy(proxy_config([a, b]))
    client = sdk(proxy.base_url)
    by_model = await client.chat.completions.with_raw_response.create(
        model="model-b", messages=[{"role": "user", "content": PROMPT}])
    assert by_model.headers["x-route-instance"] == "p1:s1"
    by_id = await client.chat.completions.with_raw_response.create(
        model="p1:s1", messages=[{"role": "user", "content": PROMPT}])
    assert by_id.headers["x-route-instance"] == "p1:s1"
    await b.stop()
    fallback = await client.chat.completions.with_raw_response.create(
        model="model-b", messages=[{"role": "user", "content": PROMPT}])
    assert fallback.headers["x-route-instance"] == "p0:s0"
