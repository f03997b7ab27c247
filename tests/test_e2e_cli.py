"""End to end: the proxy and the simulators started through the CLI as real processes,
driven by the official `openai` SDK (sync and async), with backends killed for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from proxy.sim.text import answer_text
from tests.cluster import ROOT, Cluster

pytestmark = pytest.mark.e2e
PROMPT = "what happens when the primary dies"


def stream_text(stream: openai.Stream[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def ask(client: openai.OpenAI, prompt: str = PROMPT, stream: bool = False) -> tuple[str, str]:
    """(text, x-route-instance) for one chat request."""
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], stream=stream)
    parsed = raw.parse()
    text = stream_text(parsed) if isinstance(parsed, openai.Stream) \
        else parsed.choices[0].message.content
    return text or "", raw.headers["x-route-instance"]


@pytest.mark.parametrize("stream", [False, True])
def test_primary_not_listening(cluster: Cluster, stream: bool) -> None:
    cluster.start_sim("primary", "model-a", listen=False)
    cluster.start_sim("secondary", "model-b")
    cluster.start_proxy([("primary", "model-a"), ("secondary", "model-b")])
    text, instance = ask(cluster.client(), stream=stream)
    assert instance == "local:secondary"
    assert text == answer_text("model-b", PROMPT, 20)


@pytest.mark.parametrize("stream", [False, True])
def test_primary_killed_between_two_requests_of_a_session(cluster: Cluster, stream: bool) -> None:
    cluster.start_sim("primary", "twin")
    cluster.start_sim("secondary", "twin")
    cluster.start_proxy([("primary", "twin"), ("secondary", "twin")])
    client = cluster.client()
    text1, first = ask(client, "first question", stream)
    assert first == "local:primary"
    cluster.kill_sim("primary")
    text2, second = ask(client, "second question", stream)
    assert second == "local:secondary"
    assert text1 == answer_text("twin", "first question", 20)
    assert text2 == answer_text("twin", "second question", 20)
    assert "rerouted" in cluster.log() and "CONN_REFUSED" in cluster.log()


def test_primary_hangs_answer_within_first_byte_timeout(cluster: Cluster) -> None:
    cluster.start_sim("primary", "model-a", "hang")
    cluster.start_sim("secondary", "model-b")
    cluster.start_proxy([("primary", "model-a"), ("secondary", "model-b")])
    started = time.monotonic()
    text, instance = ask(cluster.client(), stream=True)
    assert instance == "local:secondary"
    assert text == answer_text("model-b", PROMPT, 20)
    assert time.monotonic() - started < 15  # bounded by first_byte_s, not the SDK timeout


def test_primary_503(cluster: Cluster) -> None:
    cluster.start_sim("primary", "model-a", "status=503")
    cluster.start_sim("secondary", "model-b")
    cluster.start_proxy([("primary", "model-a"), ("secondary", "model-b")])
    text, instance = ask(cluster.client())
    assert instance == "local:secondary"


def test_primary_429(cluster: Cluster) -> None:
    cluster.start_sim("primary", "model-a", "rate_limit=30")
    cluster.start_sim("secondary", "model-b")
    cluster.start_proxy([("primary", "model-a"), ("secondary", "model-b")])
    _, instance = ask(cluster.client(), stream=True)
    assert instance == "local:secondary"


async def test_async_sdk_through_killed_primary(cluster: Cluster) -> None:
    cluster.start_sim("primary", "twin")
    cluster.start_sim("secondary", "twin")
    cluster.start_proxy([("primary", "twin"), ("secondary", "twin")])
    client = cluster.async_client()
    first = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert first.headers["x-route-instance"] == "local:primary"
    cluster.kill_sim("primary")
    text = ""
    async for chunk in await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": PROMPT}], stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == answer_text("twin", PROMPT, 20)


def test_everything_down_sdk_raises_naming_each_attempt(cluster: Cluster) -> None:
    cluster.start_sim("primary", "model-a", listen=False)
    cluster.start_sim("secondary", "model-b", "status=500")
    cluster.start_proxy([("primary", "model-a"), ("secondary", "model-b")])
    with pytest.raises(openai.APIStatusError) as err:
        ask(cluster.client())
    assert err.value.status_code == 502
    # The prober found the primary down: it is tried only as the last resort, after the
    # secondary failed twice.
    assert "local:secondary UPSTREAM_5XX" in str(err.value)
    assert str(err.value).endswith("local:primary CONN_REFUSED: connection refused by "
                                   f"127.0.0.1:{cluster.sims['primary'][0]}")


def test_malformed_bodies_are_400_and_the_proxy_stays_up(cluster: Cluster) -> None:
    cluster.start_sim("primary", "model-a")
    cluster.start_proxy([("primary", "model-a")])
    for payload in (b"{", b"[]", b'{"model": "auto", "messages": 3}', b"\x00\xff"):
        request = urllib.request.Request(f"{cluster.base_url}/chat/completions", data=payload,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 400
        assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"
    text, _ = ask(cluster.client())
    assert text == answer_text("model-a", PROMPT, 20)


def test_logs_are_json_lines_with_request_fields(cluster: Cluster) -> None:
    cluster.start_sim("primary", "model-a")
    cluster.start_proxy([("primary", "model-a")])
    ask(cluster.client())
    lines = [json.loads(line) for line in cluster.log().splitlines() if line.startswith("{")]
    requests = [r for r in lines if r.get("event") == "request"]
    assert requests, cluster.log()
    assert {"request_id", "instance", "attempts", "status", "latency_ms"} <= set(requests[-1])


def test_invalid_config_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [{provider_id: p, instances: [{id: a, base_url: nope}]}]\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(bad)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30,
                            env={**os.environ})
    assert result.returncode == 1
    assert f"{bad}: providers[0].instances[0].base_url: expected" in result.stderr
    assert "Traceback" not in result.stderr
