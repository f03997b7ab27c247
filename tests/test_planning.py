"""The scored route plan, with no server: requirements, filters, scores, reasons, sessions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.api.errors import BadRequest, NotFound
from proxy.api.inbound import CHAT, MAX_DEPTH, ClientRequest, parse_request
from proxy.config import Config, load_config, parse_config
from proxy.health.instance import InstanceState
from proxy.health.registry import Registry
from proxy.health.states import DOWN, READY
from proxy.routing.planner import Planner
from proxy.routing.requirements import classify

#: The seed's providers.json, a real user's config (copied: a clone has no ../shared).
SEED = Path(__file__).resolve().parent / "fixtures" / "providers.json"


def request(body: dict[str, Any]) -> ClientRequest:
    return parse_request(CHAT, orjson.dumps(body), "req-1")


def chat(prompt: str = "hello", model: str = "auto", **extra: Any) -> ClientRequest:
    return request({"model": model, "messages": [{"role": "user", "content": prompt}], **extra})


def seed_with_cloud() -> Config:
    """The seed's two llama.cpp instances plus a cloud instance, as in its example."""
    doc = orjson.loads(SEED.read_bytes())
    doc["providers"].append({"provider_id": "openai", "local": False, "instances": [
        {"id": "default", "base_url": "https://api.openai.com/v1",
         "metadata": {"model": "gpt-4o-mini", "ctx": 128000, "tags": ["general"],
                      "cost": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}}]})
    return parse_config(doc, "seed+cloud")


def ready_planner(config: Config) -> Planner:
    registry = Registry(config.instances)
    for state in registry.states:
        state.state = READY
    return Planner(config, registry)


def test_seed_example_decision_is_reproduced() -> None:
    planner = ready_planner(seed_with_cloud())
    plan = planner.plan(chat("build the settings page", max_tokens=4096),
                        {"x-route-tags": "coding,frontend"})
    assert plan.selected == "llamacpp:qwen3-coder-30b"
    assert plan.fallback == ["llamacpp:glm47flash-q8", "openai:default"]
    assert plan.requirements.ctx_needed >= 4096
    reasons = plan.reasons["llamacpp:qwen3-coder-30b"]
    assert reasons[0] == "READY"
    assert "tags_match=coding" in reasons
    assert f"ctx>={plan.requirements.ctx_needed}" in reasons
    assert "local_preferred" in reasons
    scores = plan.scores
    assert scores["llamacpp:qwen3-coder-30b"] >= scores["llamacpp:glm47flash-q8"] > scores["openai:default"]


@pytest.mark.parametrize("text,tags", [
    ("fix this python bug", ("coding",)),
    ("Why does my Rust code segfault?", ("coding",)),
    ("```\nprint(1)\n```", ("coding",)),
    ("center a div with css flexbox", ("coding", "frontend")),
    ("write a React component for a login form", ("coding", "frontend")),
    ("what is the capital of France?", ("general",)),
    ("", ("general",)),
])
def test_keyword_classifier(text: str, tags: tuple[str, ...]) -> None:
    assert classify(text) == tags


@pytest.mark.parametrize("text,tags", [
    ("python.", ("general",)),  # `.` is part of a word: "python." is no keyword
    ("(python)", ("coding",)),
    ("c++ or c#?", ("coding",)),
    ("pythonétait", ("coding",)),  # not ASCII: split at é, as before
    ("é python", ("coding",)),
    ("next.js\tpage", ("coding", "frontend")),
])
def test_keyword_classifier_words_split_alike_in_ascii_and_other_text(
        text: str, tags: tuple[str, ...]) -> None:
    assert classify(text) == tags


@pytest.mark.parametrize("code", range(128))
def test_keyword_classifier_splits_at_each_ascii_character_as_in_other_text(code: int) -> None:
    # ASCII text is split by bytes.translate, other text by the _WORD pattern: each ASCII
    # character around a keyword splits (or joins) alike in both.
    for text in (f"{chr(code)}python{chr(code)}", f"react{chr(code)}x", f"x{chr(code)}css"):
        assert classify(text) == classify(text + " é"), repr(text)


# One message: the brackets are counted first; more than MAX_DEPTH: walked at once.
@pytest.mark.parametrize("messages", [1, MAX_DEPTH + 1])
def test_a_body_nested_deeper_than_the_limit_is_refused(messages: int) -> None:
    def body(depth: int) -> bytes:  # the body itself is the first level
        nested = "[" * (depth - 1) + "]" * (depth - 1)
        history = ", ".join(['{"role": "user", "content": "hi"}'] * messages)
        return f'{{"model": "auto", "messages": [{history}], "extra": {nested}}}'.encode()

    assert parse_request(CHAT, body(MAX_DEPTH), "r").model == "auto"
    with pytest.raises(BadRequest) as refused:
        parse_request(CHAT, body(MAX_DEPTH + 1), "r")
    assert refused.value.code == "too_deep"


@pytest.mark.parametrize("body,capabilities", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tools"}),
    ({"functions": [{"name": "f"}]}, {"tools"}),
    ({"response_format": {"type": "json_object"}}, {"json"}),
    ({"response_format": {"type": "text"}}, set()),
    ({}, set()),
])
def test_capabilities_needed(body: dict[str, Any], capabilities: set[str]) -> None:
    planner = ready_planner(seed_with_cloud())
    reqs = planner.requirements(chat(**body), {})
    assert reqs.capabilities == capabilities


def test_image_parts_need_vision_and_count_toward_context() -> None:
    planner = ready_planner(seed_with_cloud())
    req = request({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    reqs = planner.requirements(req, {})
    assert reqs.capabilities == {"vision"}
    assert reqs.prompt_tokens >= 1000


def test_context_estimate_uses_max_tokens_or_the_default() -> None:
    planner = ready_planner(seed_with_cloud())
    short = planner.requirements(chat("x" * 400, max_tokens=100), {})
    assert short.prompt_tokens == 100 + 4 and short.ctx_needed == 204
    default = planner.requirements(chat("x" * 400), {})
    assert default.ctx_needed == 104 + 1024


def test_preference_and_session_headers() -> None:
    planner = ready_planner(seed_with_cloud())
    reqs = planner.requirements(chat(user="u-1"), {"x-route-prefer": "cloud"})
    assert reqs.prefer == "cloud" and reqs.session == "u-1"
    reqs = planner.requirements(chat(user="u-1"), {"x-session-id": "s-9", "x-route-prefer": "bogus"})
    assert reqs.prefer is None and reqs.session == "s-9"


def test_context_too_small_is_rejected_with_reason() -> None:
    planner = ready_planner(seed_with_cloud())
    plan = planner.plan(chat("word " * 12000, max_tokens=1000), {})  # ~16k tokens
    assert plan.rejected["llamacpp:glm47flash-q8"].startswith("ctx=8192<")
    assert "llamacpp:glm47flash-q8" not in plan.fallback
    assert plan.selected == "llamacpp:qwen3-coder-30b"


def test_unsupported_capability_is_rejected_unmentioned_is_unknown_and_ranked_lower() -> None:
    config = parse_config({"providers": [{"provider_id": "p", "instances": [
        {"id": "plain", "base_url": "http://127.0.0.1:1", "metadata": {"capabilities": ["json"]}},
        {"id": "unknown", "base_url": "http://127.0.0.1:2"},
        {"id": "tools", "base_url": "http://127.0.0.1:3", "metadata": {"capabilities": ["tools"]}},
        {"id": "none", "base_url": "http://127.0.0.1:4", "metadata": {"unsupported": ["tools"]}},
    ]}]})
    plan = ready_planner(config).plan(chat(tools=[{"type": "function", "function": {"name": "f"}}]), {})
    assert plan.rejected == {"p:none": "capability_unsupported=tools"}
    assert [plan.selected, *plan.fallback] == ["p:tools", "p:plain", "p:unknown"]
    assert "capability_unknown=tools" in plan.reasons["p:plain"]
    assert "capability_unknown=tools" in plan.reasons["p:unknown"]
    assert not any(r.startswith("capability_unknown") for r in plan.reasons["p:tools"])


def test_down_and_disabled_instances_are_rejected() -> None:
    config = seed_with_cloud()
    planner = ready_planner(config)
    coder = planner.registry.by_id["llamacpp:qwen3-coder-30b"]
    coder.state = DOWN
    plan = planner.plan(chat("fix this python bug"), {})
    # Down by the prober only: kept as a last resort, in case it is back already.
    assert plan.selected == "llamacpp:glm47flash-q8"
    assert plan.fallback[-1] == "llamacpp:qwen3-coder-30b"
    assert plan.reasons["llamacpp:qwen3-coder-30b"][-1] == "last_resort"
    assert plan.preferred == "llamacpp:qwen3-coder-30b"  # recorded as INSTANCE_NOT_READY
    # Down by traffic too (its circuit is open): still tried, but after everything else.
    coder.circuit.on_failure("connection", time.monotonic(), immediate=True)
    planner.registry.by_id["openai:default"].circuit.on_failure(
        "connection", time.monotonic(), immediate=True)
    plan = planner.plan(chat("fix this python bug"), {})
    assert plan.fallback == ["openai:default", "llamacpp:qwen3-coder-30b"]
    planner.registry.by_id["openai:default"].state = "DRAINED"
    plan = planner.plan(chat("fix this python bug"), {})
    assert plan.rejected["openai:default"] == "drained"


@pytest.mark.parametrize("prefer_local,prefer,first", [
    (True, None, "llamacpp:qwen3-coder-30b"),
    (True, "cloud", "openai:default"),
    (False, "local", "llamacpp:qwen3-coder-30b"),
    (False, "cheap", "llamacpp:qwen3-coder-30b"),
])
def test_preference_moves_the_plan(prefer_local: bool, prefer: str | None, first: str) -> None:
    config = seed_with_cloud()
    doc = {"routing": {"prefer_local": prefer_local},
           "providers": orjson.loads(SEED.read_bytes())["providers"] + [
               {"provider_id": "openai", "local": False, "instances": [
                   {"id": "default", "base_url": "https://api.openai.com/v1",
                    "metadata": {"tags": ["coding"], "cost": {"input_per_mtok": 0.15,
                                                              "output_per_mtok": 0.6}}}]}]}
    config = parse_config(doc)
    headers = {"x-route-prefer": prefer} if prefer else {}
    plan = ready_planner(config).plan(chat("fix this python bug"), headers)
    assert plan.selected == first


def test_fast_prefers_measured_low_latency() -> None:
    planner = ready_planner(seed_with_cloud())
    planner.registry.record_success(planner.registry.by_id["llamacpp:qwen3-coder-30b"], 2.0)
    planner.registry.record_success(planner.registry.by_id["llamacpp:glm47flash-q8"], 0.040)
    plan = planner.plan(chat("fix this python bug"), {"x-route-prefer": "fast"})
    assert plan.selected == "llamacpp:glm47flash-q8"
    assert "latency=40ms" in plan.reasons["llamacpp:glm47flash-q8"]


def outcome(inst: InstanceState, ok: bool) -> None:
    """An attempt's outcome in the instance's recent history (what the registry keeps)."""
    now = time.monotonic()
    inst.recent.append((now, ok))
    if not ok:
        inst.last_failure_mono = now


def test_error_rate_lowers_the_score() -> None:
    planner = ready_planner(seed_with_cloud())
    coder = planner.registry.by_id["llamacpp:qwen3-coder-30b"]
    for ok in [False] * 8 + [True] * 2:
        outcome(coder, ok)
    plan = planner.plan(chat("fix this python bug"), {})
    assert "error_rate=0.80" in plan.reasons["llamacpp:qwen3-coder-30b"]
    assert plan.selected == "llamacpp:glm47flash-q8"


def test_old_failures_are_forgotten() -> None:
    planner = ready_planner(seed_with_cloud())
    coder = planner.registry.by_id["llamacpp:qwen3-coder-30b"]
    outcome(coder, False)
    assert coder.error_rate() == 1.0
    assert coder.error_rate(now=time.monotonic() + coder.error_window_s + 1) == 0.0


def test_ties_break_by_config_order() -> None:
    config = parse_config({"providers": [{"provider_id": "p", "instances": [
        {"id": f"i{n}", "base_url": f"http://127.0.0.1:{n + 1}"} for n in range(5)]}]})
    plan = ready_planner(config).plan(chat("what is the weather like"), {})
    assert [plan.selected, *plan.fallback] == [f"p:i{n}" for n in range(5)]


def test_session_sticks_to_the_instance_that_served_it() -> None:
    planner = ready_planner(seed_with_cloud())
    first = planner.plan(chat("fix this python bug", user="alice"), {})
    assert first.selected == "llamacpp:qwen3-coder-30b"
    planner.served(first, "llamacpp:glm47flash-q8")  # the fallback answered
    second = planner.plan(chat("fix this python bug", user="alice"), {})
    assert second.selected == "llamacpp:glm47flash-q8"
    assert "sticky_session" in second.reasons["llamacpp:glm47flash-q8"]
    other = planner.plan(chat("fix this python bug", user="bob"), {})
    assert other.selected == "llamacpp:qwen3-coder-30b"


def test_sticky_entries_expire() -> None:
    from proxy.routing.sessions import SessionTable

    table = SessionTable(ttl_s=10, max_entries=2)
    table.remember("a", "x", now=0)
    assert table.get("a", now=5) == "x"
    assert table.get("a", now=11) is None
    table.remember("a", "x", now=0)
    table.remember("b", "y", now=0)
    table.remember("c", "z", now=0)
    assert table.get("a", now=1) is None and len(table) == 2


def test_model_resolution() -> None:
    config = parse_config({
        "models": {"fast": {"instances": ["p:b", "p:a"], "strategy": "ordered"},
                   "coder": {"tags": ["coding"]}},
        "providers": [{"provider_id": "p", "instances": [
            {"id": "a", "base_url": "http://127.0.0.1:1", "metadata": {"model": "m-a", "tags": ["coding"]}},
            {"id": "b", "base_url": "http://127.0.0.1:2", "metadata": {"model": "m-b"}},
            {"id": "c", "base_url": "http://127.0.0.1:3", "metadata": {"model": "m-b"}}]}]})
    planner = ready_planner(config)

    def order(model: str) -> list[str | None]:
        plan = planner.plan(chat("hello there", model=model), {})
        return [plan.selected, *plan.fallback]

    assert order("fast") == ["p:b", "p:a"]          # ordered group: the user's priority
    assert order("coder") == ["p:a"]                # tag group: only its members
    assert order("p:c") == ["p:c", "p:a", "p:b"]    # instance id first, then the rest
    assert order("c") == ["p:c", "p:a", "p:b"]      # a unique short id works too
    assert order("m-b") == ["p:b", "p:c", "p:a"]    # upstream model name first
    assert order("auto") == ["p:a", "p:b", "p:c"]
    assert order("nope") == ["p:a", "p:b", "p:c"]   # unknown, not strict: auto


def test_unknown_model_in_strict_mode_is_not_found() -> None:
    config = parse_config({"routing": {"strict_models": True}, "providers": [
        {"provider_id": "p", "instances": [{"id": "a", "base_url": "http://127.0.0.1:1"}]}]})
    with pytest.raises(NotFound):
        ready_planner(config).plan(chat(model="nope"), {})


def test_plan_is_plain_serialisable_data() -> None:
    plan = ready_planner(seed_with_cloud()).plan(chat("fix this python bug"), {})
    data = orjson.loads(orjson.dumps(plan.as_dict()))
    assert set(data) >= {"plan_id", "request_id", "requirements", "selected", "fallback",
                         "rejected", "reasons", "scores"}
    assert data["request_id"] == "req-1"


def test_demo_config_plans_without_network() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "config" / "demo.yaml")
    plan = Planner(config, Registry(config.instances)).plan(chat("fix this python bug"), {})
    assert plan.selected == "local:primary"
    assert plan.fallback[-1] == "cloud:default"


def test_what_the_messages_api_cannot_express_never_goes_to_an_anthropic_instance() -> None:
    """n > 1, text completions and embeddings are filtered out for `kind: anthropic`
    instances at planning time, with the reason in the plan (rather than tried, failed,
    and counted against the instance's circuit, or answered with one choice of two)."""
    config = parse_config({"providers": [
        {"provider_id": "local", "instances": [
            {"id": "a", "base_url": "http://127.0.0.1:9/v1", "metadata": {"model": "m"}}]},
        {"provider_id": "claude", "kind": "anthropic", "api_key": "sk-ant-test-key-123456",
         "local": False, "instances": [
             {"id": "default", "base_url": "https://api.anthropic.com/v1",
              "metadata": {"model": "claude-x"}}]}]}, "<test>")
    planner = ready_planner(config)
    plain = planner.plan(chat(n=1), {})
    assert plain.fallback == ["claude:default"]
    two = planner.plan(chat(n=2), {})
    assert two.fallback == []
    assert two.rejected["claude:default"] == "unsupported_by_anthropic=n>1"
    assert two.requirements.as_dict()["protocol"] == ["n>1"]
    for endpoint in ("completions", "embeddings"):
        field = "prompt" if endpoint == "completions" else "input"
        req = parse_request(endpoint, orjson.dumps({"model": "auto", field: "hi"}), "r")
        plan = planner.plan(req, {})
        assert plan.candidates[0].id == "local:a"
        assert plan.rejected["claude:default"] == f"unsupported_by_anthropic={endpoint}"
