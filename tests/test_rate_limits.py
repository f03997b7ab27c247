"""When upstreams rate-limit: leave them alone for as long as they ask, tell the client when
to come back, and let it see the upstream's own rate-limit headers.

Simulators on real ports (OpenAI-style and Anthropic-style) behind the proxy on a real
port; the header parsing is checked on its own at the end.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from proxy.api.state import STATE
from proxy.config import parse_config
from proxy.providers.ratelimits import relay_headers, retry_after_s
from proxy.sim.anthropic import AnthropicSimulator
from tests.conftest import MakeProxy, MakeSim, chat_body, proxy_config, started

CLAUDE = "claude-sim-3"
KEY = "sk-ant-test-key-123456"


async def post(http: aiohttp.ClientSession, url: str, **body: Any
               ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST a chat request; (status, lowercase headers, JSON body)."""
    async with http.post(f"{url}/chat/completions", json=chat_body(**body)) as resp:
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return resp.status, headers, await resp.json(content_type=None)


def rate_limit_error(status: int, body: dict[str, Any]) -> bool:
    error = body["error"]
    return status == 429 and error["type"] == "rate_limit_error" \
        and error["code"] == "rate_limit_exceeded"


async def test_two_instances_429_retry_after_30_the_next_requests_get_429_and_hit_nobody(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim("model-a", faults=["rate_limit=30"])
    b = await make_sim("model-b", faults=["rate_limit=30"])
    proxy = await make_proxy(proxy_config([a, b]))

    status, headers, body = await post(http, proxy.base_url)
    assert rate_limit_error(status, body)
    assert 29 <= int(headers["retry-after"]) <= 30  # the soonest end, rounded up
    assert headers["x-route-attempts"] == "2"
    assert (a.stats.requests, b.stats.requests) == (1, 1)

    status, headers, body = await post(http, proxy.base_url, stream=True)
    assert rate_limit_error(status, body)
    second = int(headers["retry-after"])
    assert 1 <= second <= 30
    assert headers["x-route-attempts"] == "0"
    for inst in ("p0:s0", "p1:s1"):  # the message says who is cooling down
        assert inst in body["error"]["message"]

    await asyncio.sleep(1.1)  # a whole second later the soonest end is a second nearer
    with pytest.raises(openai.RateLimitError) as err:
        await openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0
                                 ).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hello"}])
    assert 1 <= int(err.value.response.headers["Retry-After"]) < second
    # Not a single request reached the limited upstreams after their 429.
    assert (a.stats.requests, b.stats.requests) == (1, 1)

    async with http.post(f"{proxy.url}/admin/route", json=chat_body()) as resp:
        plan = await resp.json()
    assert plan["selected"] is None
    for inst in ("p0:s0", "p1:s1"):
        assert plan["rejected"][inst].startswith("rate_limited(retry_in=")


async def test_a_limited_instance_is_no_last_resort_while_another_is_down(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    limited = await make_sim("model-a", faults=["rate_limit=30"])
    down = await make_sim("model-b", faults=["status=503"])
    proxy = await make_proxy(proxy_config([limited, down]))
    status, headers, body = await post(http, proxy.base_url)
    assert rate_limit_error(status, body) and 29 <= int(headers["retry-after"]) <= 30
    before = limited.stats.requests
    for _ in range(3):
        status, headers, body = await post(http, proxy.base_url)
        assert rate_limit_error(status, body)  # the limited one could serve: come back then
        assert 1 <= int(headers["retry-after"]) <= 30
    assert limited.stats.requests == before == 1


async def test_a_429_without_retry_after_cools_down_for_the_default_then_twice_that(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    limited = await make_sim("model-a", faults=["status=429"])  # no Retry-After at all
    proxy = await make_proxy(proxy_config([limited],
                                          health={"cooldown_s": 10, "max_cooldown_s": 60},
                                          retry={"max_retry_after_s": 0.5}))
    inst = proxy.app[STATE].registry.by_id["p0:s0"]
    status, headers, body = await post(http, proxy.base_url)
    assert status == 429 and 9 <= int(headers["retry-after"]) <= 10  # health.cooldown_s
    status, headers, body = await post(http, proxy.base_url)
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 10
    assert limited.stats.requests == 1
    inst.rate_limited_until = 0.0  # as if the 10 s had passed
    status, headers, body = await post(http, proxy.base_url)
    assert status == 429 and 19 <= int(headers["retry-after"]) <= 20  # a second 429 in a row
    assert limited.stats.requests == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_rate_limit_headers_reach_the_client_on_success(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession,
        stream: bool) -> None:
    a = await make_sim("model-a", faults=["ratelimit_headers"])
    proxy = await make_proxy(proxy_config([a]))
    status, headers, _ = await post(http, proxy.base_url, stream=stream) if not stream else \
        await post_stream(http, proxy.base_url)
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == "1000"
    assert headers["x-ratelimit-remaining-requests"] == "999"
    assert headers["x-ratelimit-reset-tokens"] == "1s"
    assert headers["x-route-instance"] == "p0:s0"


async def post_stream(http: aiohttp.ClientSession, url: str
                      ) -> tuple[int, dict[str, str], bytes]:
    async with http.post(f"{url}/chat/completions", json=chat_body(stream=True)) as resp:
        data = await resp.read()
        assert data.endswith(b"data: [DONE]\n\n")
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, data


async def test_rate_limit_headers_of_the_upstream_429_reach_the_client(
        make_sim: MakeSim, make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    a = await make_sim("model-a", faults=["rate_limit=30"])
    proxy = await make_proxy(proxy_config([a]))
    status, headers, body = await post(http, proxy.base_url)
    assert rate_limit_error(status, body)
    assert 29 <= int(headers["retry-after"]) <= 30
    assert headers["retry-after-ms"] == "30000"  # the upstream's own, relayed
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "30s"


# --------------------------------------------------------------------------- Anthropic


@pytest.fixture
async def make_claude() -> AsyncIterator[Any]:
    async with started(functools.partial(AnthropicSimulator, CLAUDE, api_key=KEY)) as make:
        yield make


def claude_config(claude: AnthropicSimulator, tmp: Path) -> Any:
    return parse_config({
        "timeouts": {"connect_s": 1, "first_byte_s": 3, "idle_s": 3},
        "health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "retry": {"max_retry_after_s": 3},
        "store": {"url": f"sqlite:///{tmp}/audit.db"},
        "providers": [{"provider_id": "anthropic", "kind": "anthropic", "local": False,
                       "instances": [{"id": "default", "base_url": claude.base_url + "/v1",
                                      "api_key": KEY, "metadata": {"model": CLAUDE}}]}]},
        "<test>")


async def test_anthropic_429_without_retry_after_cools_down_until_its_limit_resets(
        make_claude: Any, make_proxy: MakeProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    # The 429 carries no retry-after, only anthropic-ratelimit-requests-remaining: 0 and a
    # reset 20 s from now (an RFC 3339 time).
    claude = await make_claude(status=429, retry_after=None)
    proxy = await make_proxy(claude_config(claude, tmp_path))
    status, headers, body = await post(http, proxy.base_url)
    assert rate_limit_error(status, body)
    assert 15 <= int(headers["retry-after"]) <= 20
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "anthropic-ratelimit-requests-reset" in headers
    status, headers, body = await post(http, proxy.base_url, stream=True)
    assert rate_limit_error(status, body) and 1 <= int(headers["retry-after"]) <= 20
    assert claude.requests == 1


async def test_anthropic_429_retry_after_and_success_headers_reach_the_client(
        make_claude: Any, make_proxy: MakeProxy, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    claude = await make_claude(status=429, retry_after="30", ratelimit_headers=True)
    proxy = await make_proxy(claude_config(claude, tmp_path))
    status, headers, body = await post(http, proxy.base_url)
    assert rate_limit_error(status, body) and 29 <= int(headers["retry-after"]) <= 30
    claude.status = None
    inst = proxy.app[STATE].registry.by_id["anthropic:default"]
    inst.rate_limited_until = 0.0  # as if the 30 s had passed
    for stream in (False, True):
        if stream:
            status, headers, _ = await post_stream(http, proxy.base_url)
        else:
            status, headers, _ = await post(http, proxy.base_url)
        assert status == 200 and headers["x-route-instance"] == "anthropic:default"
        assert headers["anthropic-ratelimit-requests-limit"] == "50"
        assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")


# --------------------------------------------------------------------------- headers


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "2"}) == 1.5


def test_retry_after_as_seconds_or_as_an_http_date() -> None:
    assert retry_after_s(CIMultiDict({"Retry-After": "30"})) == 30.0  # as aiohttp's headers
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after_s({"retry-after": later}, now=now.timestamp()) == 90.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "-5"}) is None


def test_without_retry_after_the_latest_reset_of_an_exhausted_limit_counts() -> None:
    openai_429 = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s",
                  "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "20ms",
                  "x-ratelimit-remaining-tokens_usage_based": "5",
                  "x-ratelimit-reset-tokens_usage_based": "1h"}
    assert retry_after_s(openai_429) == 360.0
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    anthropic_429 = {"anthropic-ratelimit-tokens-remaining": "0",
                     "anthropic-ratelimit-tokens-reset": "2025-01-01T12:00:42Z",
                     "anthropic-ratelimit-requests-remaining": "10",
                     "anthropic-ratelimit-requests-reset": "2025-01-01T12:05:00Z"}
    assert retry_after_s(anthropic_429, now=now.timestamp()) == 42.0
    assert retry_after_s({"content-type": "application/json"}) is None


def test_only_rate_limit_headers_are_relayed_in_any_case() -> None:
    upstream = {"Content-Type": "application/json", "X-RateLimit-Limit-Requests": "10",
                "anthropic-ratelimit-tokens-remaining": "5", "Retry-After": "3",
                "retry-after-ms": "3000", "x-request-id": "upstream-id", "Server": "uvicorn",
                "Authorization": "Bearer leaked"}
    assert relay_headers(upstream) == {
        "x-ratelimit-limit-requests": "10", "anthropic-ratelimit-tokens-remaining": "5",
        "retry-after": "3", "retry-after-ms": "3000"}
