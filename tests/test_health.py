"""Health probes, circuit breakers and fingerprints, with simulators on real ports.

A dead or wrong server must cost at most one failed attempt; traffic returns once it
recovers; a server answering as another model never answers for this one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.api.state import STATE
from proxy.config import parse_config
from proxy.failures import RateLimited
from proxy.health.circuit import BY_CONNECTION, BY_HTTP, CLOSED, HALF_OPEN, OPEN, Circuit
from proxy.health.registry import Registry
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, RunningProxy, sdk_text, wait_for

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "are you still there"


def config_for(sims: list[Simulator], *, server: str = "openai", interval: float = 0.3,
               ordered: bool = True, **sections: Any) -> Any:
    doc: dict[str, Any] = {
        # Generous first byte, chunk and probe timeouts and circuit cooldown
        # (tests/conftest.py proxy_config says why); a test about one sets its own.
        "timeouts": {"connect_s": 1, "first_byte_s": 5, "idle_s": 5},
        "health": {"interval_s": interval, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120, **sections.pop("health", {})},
        "providers": [{"provider_id": "p", "server": server, "instances": [
            {"id": f"s{n}", "base_url": sim.base_url, "metadata": {"model": sim.model}}
            for n, sim in enumerate(sims)]}],
        **sections,
    }
    if ordered:  # the user's explicit priority: s0 is the primary
        doc["models"] = {"main": {"instances": [f"p:s{n}" for n in range(len(sims))],
                                  "strategy": "ordered"}}
    return parse_config(doc, "<test>")


async def ask(proxy: RunningProxy, prompt: str = PROMPT, stream: bool = False,
              model: str = "main") -> tuple[str, str, str]:
    """(text, x-route-instance, x-route-attempts) through the official SDK."""
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=20)
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], stream=stream)
    text = await sdk_text(raw.parse())
    return text, raw.headers["x-route-instance"], raw.headers["x-route-attempts"]


async def admin_instances(proxy: RunningProxy) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/admin/instances") as resp:
        assert resp.status == 200
        return {row["id"]: row for row in (await resp.json())["instances"]}


# --------------------------------------------------------------------------- circuit logic


def test_circuit_opens_at_once_for_connection_failures_and_doubles_its_cooldown() -> None:
    c = Circuit(base_cooldown_s=1, max_cooldown_s=4, threshold=3)
    assert c.on_failure(BY_CONNECTION, now=0, immediate=True)
    assert c.state == OPEN and not c.available(0.5) and c.available(1.0)
    assert c.acquire(1.0, "trial") and c.state == HALF_OPEN
    assert not c.acquire(1.0, "another")  # one trial at a time
    c.on_failure(BY_CONNECTION, now=1.0, immediate=True)
    assert c.open_until == 3.0  # doubled
    c.acquire(3.0, "trial")
    c.on_failure(BY_CONNECTION, now=3.0, immediate=True)
    c.acquire(7.0, "trial")
    c.on_failure(BY_CONNECTION, now=7.0, immediate=True)
    assert c.open_until == 11.0  # capped at 4 s
    c.on_success()
    assert c.state == CLOSED


def test_circuit_needs_n_timeouts_and_only_a_trial_closes_an_http_opening() -> None:
    c = Circuit(base_cooldown_s=1, max_cooldown_s=16, threshold=3)
    assert not c.on_failure(BY_HTTP, now=0, immediate=False)
    assert not c.on_failure(BY_HTTP, now=0, immediate=False)
    assert c.on_failure(BY_HTTP, now=0, immediate=False)
    assert c.state == OPEN and c.opened_by == BY_HTTP
    assert not c.on_probe_ok() and c.state == OPEN  # a /v1/models probe proves nothing here
    assert c.acquire(1.0, "trial")
    c.on_success()
    assert c.state == CLOSED
    conn = Circuit()
    conn.on_failure(BY_CONNECTION, now=0, immediate=True)
    assert conn.on_probe_ok() and conn.state == CLOSED


def one_instance_registry(**health: float) -> Registry:
    config = parse_config({"health": health, "providers": [
        {"provider_id": "p", "instances": [{"id": "a", "base_url": "http://127.0.0.1:9"}]}]},
        "<test>")
    return Registry(config.instances, config.health)


def test_rate_limit_cooldown_is_exactly_retry_after_and_leaves_the_circuit_alone() -> None:
    registry = one_instance_registry()
    inst = registry.states[0]
    before = time.monotonic()
    registry.record_failure(inst, RateLimited(5.0))
    after = time.monotonic()
    until = inst.rate_limited_until
    assert before + 5.0 <= until <= after + 5.0
    assert not inst.routable(until - 0.01) and inst.routable(until)
    assert inst.circuit.state == CLOSED  # a 429 is no circuit matter
    registry.record_success(inst, 0.01)  # a request admitted earlier answering proves nothing
    assert inst.rate_limited_until == until


def test_a_429_without_retry_after_cools_down_by_doubling_steps() -> None:
    registry = one_instance_registry(cooldown_s=1, max_cooldown_s=4)
    inst = registry.states[0]
    waits = []
    for _ in range(4):
        before = time.monotonic()
        registry.record_failure(inst, RateLimited(None))
        waits.append(inst.rate_limited_until - before)
        inst.rate_limited_until = 0.0  # as if each cooldown had passed
    assert [round(w) for w in waits] == [1, 2, 4, 4]
    registry.record_success(inst, 0.01)
    registry.record_failure(inst, RateLimited(None))
    assert inst.rate_limited_until - time.monotonic() <= 1.0  # a success starts it over


# --------------------------------------------------------------------------- with servers


async def test_primary_killed_next_ten_requests_take_one_attempt_each(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("twin"), await make_sim("twin")
    proxy = await make_proxy(config_for([a, b], interval=30))  # traffic finds it, not probes
    assert (await ask(proxy))[1] == "p:s0"
    await a.stop()
    text, instance, attempts = await ask(proxy)
    assert (instance, attempts) == ("p:s1", "2")  # the one failed attempt of discovery
    for n in range(10):
        text, instance, attempts = await ask(proxy, f"question {n}", stream=n % 2 == 1)
        assert (instance, attempts) == ("p:s1", "1")
        assert text == answer_text("twin", f"question {n}", 20)


async def test_primary_restarted_gets_traffic_back_within_two_probe_intervals(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("twin"), await make_sim("twin")
    interval = 0.3
    proxy = await make_proxy(config_for([a, b], interval=interval))
    await a.stop()
    assert (await ask(proxy))[1] == "p:s1"
    primary = proxy.app[STATE].registry.by_id["p:s0"]
    await wait_for(lambda: primary.state == "DOWN", what="the prober to mark p:s0 DOWN")
    await a.start()
    # A probe lands within one interval (+10% jitter); allow a second one and some slack.
    await wait_for(lambda: primary.routable(), timeout=2 * interval * 1.1 + 1.0,
                   what="p:s0 routable again")
    assert (await ask(proxy))[1:] == ("p:s0", "1")


async def test_primary_restarted_with_another_model_is_mismatch(make_sim: MakeSim,
                                                                make_proxy: MakeProxy) -> None:
    a, b = await make_sim("twin"), await make_sim("twin")
    proxy = await make_proxy(config_for([a, b], interval=0.3))
    assert (await ask(proxy))[1] == "p:s0"
    port = a.port
    await a.stop()
    impostor = await make_sim("another-model", port=port)
    primary = proxy.app[STATE].registry.by_id["p:s0"]
    await wait_for(lambda: primary.state == "MISMATCH", what="MISMATCH")
    text, instance, attempts = await ask(proxy)
    assert (instance, attempts) == ("p:s1", "1")
    assert text == answer_text("twin", PROMPT, 20)
    assert impostor.stats.requests == 0  # never asked to answer as "twin"
    row = (await admin_instances(proxy))["p:s0"]
    assert row["state"] == "MISMATCH"
    assert row["fingerprint"] == "twin"
    assert "another-model" in row["last_probe_error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_model_swapped_between_probes_is_caught_by_the_response(
        make_sim: MakeSim, make_proxy: MakeProxy, stream: bool) -> None:
    a, b = await make_sim("twin"), await make_sim("twin")
    proxy = await make_proxy(config_for([a, b], interval=60))
    assert (await ask(proxy))[1] == "p:s0"
    a.set_faults(["model=swapped-in"])  # no probe will run before the next request
    text, instance, attempts = await ask(proxy, stream=stream)
    assert (instance, attempts) == ("p:s1", "2")
    assert text == answer_text("twin", PROMPT, 20)  # nothing of the impostor's answer
    row = (await admin_instances(proxy))["p:s0"]
    assert row["state"] == "MISMATCH"
    assert "FINGERPRINT_MISMATCH" in row["last_error"]
    assert (await ask(proxy))[1:] == ("p:s1", "1")


async def test_provider_aliasing_is_not_a_mismatch(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    dated = await make_sim("gpt-4o-mini-2024-07-18")
    config = parse_config({"health": {"interval_s": 60}, "providers": [
        {"provider_id": "openai", "instances": [
            {"id": "default", "base_url": dated.base_url, "metadata": {"model": "gpt-4o-mini"}}]}]})
    proxy = await make_proxy(config)
    row = (await admin_instances(proxy))["openai:default"]
    # The pin is what the server serves; the label names it (a dated snapshot): no warning.
    assert row["state"] == "READY" and row["fingerprint"] == "gpt-4o-mini-2024-07-18"
    assert row["warnings"] == []
    text, instance, attempts = await ask(proxy, model="auto")
    assert (instance, attempts) == ("openai:default", "1")


async def test_retry_after_keeps_the_instance_out_that_long_and_no_longer(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    # Retry-After 4 s, asked for 2 s of it: a request sent near the end of those 2 s and
    # planned late on a loaded machine still falls well inside the 4.
    a = await make_sim("twin", faults=["rate_limit=4", "times=1"])
    b = await make_sim("twin")
    proxy = await make_proxy(config_for([a, b], interval=30))
    started = time.monotonic()
    assert (await ask(proxy))[1:] == ("p:s1", "2")
    primary = proxy.app[STATE].registry.by_id["p:s0"]
    while time.monotonic() - started < 2:  # well inside the 4 s: never contacted
        assert (await ask(proxy))[1:] == ("p:s1", "1")
    assert a.stats.requests == 1
    await wait_for(lambda: primary.routable(), timeout=10, what="the Retry-After to pass")
    assert time.monotonic() - started >= 3.9
    assert (await ask(proxy))[1:] == ("p:s0", "1")


async def test_drain_and_enable(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a, b = await make_sim("twin"), await make_sim("twin")
    proxy = await make_proxy(config_for([a, b], interval=30))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/admin/instances/p:s0/drain") as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "DRAINED"
        before = a.stats.requests
        for _ in range(3):
            assert (await ask(proxy))[1:] == ("p:s1", "1")
        assert a.stats.requests == before
        assert (await admin_instances(proxy))["p:s0"]["state"] == "DRAINED"
        async with http.post(f"{proxy.url}/admin/instances/s0/enable") as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "READY"
        async with http.post(f"{proxy.url}/admin/instances/nope/drain") as resp:
            assert resp.status == 404
    assert (await ask(proxy))[1:] == ("p:s0", "1")


async def test_llamacpp_loading_state_from_health(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a = await make_sim("tiny", faults=["loading"])
    b = await make_sim("tiny")
    proxy = await make_proxy(config_for([a, b], server="llamacpp", interval=0.3))
    rows = await admin_instances(proxy)
    assert rows["p:s0"]["state"] == "LOADING"
    assert rows["p:s1"]["state"] == "READY"
    assert rows["p:s1"]["fingerprint"] == "tiny"  # learned from /props model_alias
    assert rows["p:s1"]["fingerprint_detail"] == "/models/tiny.gguf"
    assert (await ask(proxy))[1:] == ("p:s1", "1")
    assert a.stats.requests == 0
    a.set_faults([])
    primary = proxy.app[STATE].registry.by_id["p:s0"]
    await wait_for(lambda: primary.state == "READY", what="READY after loading")
    assert (await ask(proxy))[1] == "p:s0"


async def test_ollama_listing_is_probed(make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a = await make_sim("llama3.1:8b")
    proxy = await make_proxy(config_for([a], server="ollama", interval=30))
    row = (await admin_instances(proxy))["p:s0"]
    assert row["state"] == "READY" and row["fingerprint"] == "llama3.1:8b"
    assert a.stats.by_path.get("/api/tags") == 1


async def test_http_errors_open_the_circuit_after_threshold_failed_attempts_and_only_a_trial_closes_it(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    a = await make_sim("twin", faults=["status=500"])
    b = await make_sim("twin")
    proxy = await make_proxy(config_for([a, b], interval=0.2,
                                        health={"failure_threshold": 3, "cooldown_s": 1.5}))
    primary = proxy.app[STATE].registry.by_id["p:s0"]
    # Every failed attempt is a strike. First request: a 500, one more try on s0 (a blip?),
    # a 500 again (two strikes), then s1 answers.
    assert (await ask(proxy))[1:] == ("p:s1", "3")
    assert primary.circuit.state == CLOSED and primary.circuit.strikes == 2
    # Second request: its first 500 is the third failed attempt in a row and opens the
    # circuit, so s0 gets no second try.
    assert (await ask(proxy))[1:] == ("p:s1", "2")
    assert a.stats.requests == 3
    assert primary.circuit.state == OPEN and primary.circuit.opened_by == BY_HTTP
    served_by_a = a.stats.requests
    assert (await ask(proxy))[1:] == ("p:s1", "1")  # skipped while open
    assert a.stats.requests == served_by_a
    a.set_faults([])
    # Probes of /v1/models succeed meanwhile but must not close an HTTP-opened circuit.
    await wait_for(lambda: primary.last_probe_at is not None and primary.circuit.state == OPEN)
    await wait_for(lambda: primary.circuit.available(time.monotonic()), what="cooldown")
    assert primary.circuit.state == OPEN
    assert (await ask(proxy))[1:] == ("p:s0", "1")  # the half-open trial
    assert primary.circuit.state == CLOSED


def test_check_cli_prints_a_table(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("providers: [{provider_id: p, instances: "
                      "[{id: gone, base_url: 'http://127.0.0.1:9'}]}]\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    # Nothing is routable: the table, then why, and a failing exit code.
    assert result.returncode == 1, result.stderr
    assert "no instance is routable" in result.stderr and "p:gone: DOWN" in result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split()[:4] == ["INSTANCE", "STATE", "CIRCUIT", "LATENCY"]
    assert row.split()[:2] == ["p:gone", "DOWN"]
    assert "CONN_REFUSED" in row
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: 3\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(bad)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert result.returncode == 1 and "providers" in result.stderr
