"""Declared capabilities are what is known, not all there is (issue 14, item 2).

A capability an instance does not mention is unknown: it costs some score, with a reason,
and never filters. Only `metadata.unsupported` filters. Names are validated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from openai.types.chat import ChatCompletionFunctionToolParam

from proxy.api.inbound import CHAT, parse_request
from proxy.config import CAPABILITIES, Config, ConfigError, load_config, parse_config
from proxy.health.registry import Registry
from proxy.health.states import READY
from proxy.routing.planner import Planner
from proxy.routing.scoring import capability_notes
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, sdk_text

ROOT = Path(__file__).resolve().parents[1]
TOOLS: list[ChatCompletionFunctionToolParam] = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def demo_config(primary: Simulator, secondary: Simulator, cloud: Simulator) -> Config:
    """config/demo.yaml as shipped, at the simulators' addresses (same URL forms)."""
    doc = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    urls = {"primary": primary.base_url, "secondary": secondary.base_url + "/v1",
            "default": cloud.base_url + "/v1"}
    for provider in doc["providers"]:
        for inst in provider["instances"]:
            inst["base_url"] = urls[inst["id"]]
    return parse_config(doc, "demo.yaml")


def sdk(proxy_base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy_base_url, api_key="x", max_retries=0, timeout=20)


@pytest.mark.parametrize("model", ["local", "auto"])
async def test_demo_config_with_tools_answers_from_a_local_simulator(
        make_sim: MakeSim, make_proxy: MakeProxy, model: str) -> None:
    primary, secondary = await make_sim("demo-model"), await make_sim("demo-model")
    cloud = await make_sim("demo-cloud")
    proxy = await make_proxy(demo_config(primary, secondary, cloud))
    client = sdk(proxy.base_url)
    for stream in (False, True):
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "what time is it"}],
            tools=TOOLS, response_format={"type": "json_object"}, stream=stream)
        assert raw.status_code == 200
        assert raw.headers["x-route-instance"] == "local:primary"
        assert raw.headers["x-route-attempts"] == "1"
        assert await sdk_text(raw.parse()) == answer_text("demo-model", "what time is it", 20)
    assert cloud.stats.requests == 0


async def test_unsupported_vision_filters_the_local_instance_and_the_plan_says_why(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    text_only, cloud = await make_sim("local-text"), await make_sim("cloud-vision")
    proxy = await make_proxy(parse_config({"providers": [
        {"provider_id": "local", "instances": [
            {"id": "text", "base_url": text_only.base_url,
             "metadata": {"model": "local-text", "unsupported": ["vision"]}}]},
        {"provider_id": "cloud", "local": False, "instances": [
            {"id": "default", "base_url": cloud.base_url,
             "metadata": {"model": "cloud-vision", "capabilities": ["vision"]}}]}]}))
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "what is this"}, IMAGE]}]
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=messages)
    assert raw.headers["x-route-instance"] == "cloud:default"
    assert text_only.stats.requests == 0
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.url}/admin/route", json={"model": "auto", "messages": messages}) as resp:
        plan = await resp.json()
    assert plan["rejected"] == {"local:text": "capability_unsupported=vision"}
    # A text request still goes local: `unsupported` only concerns what it names.
    raw = await sdk(proxy.base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-route-instance"] == "local:text"


def ready_planner(config: Config) -> Planner:
    registry = Registry(config.instances)
    for inst in registry.states:
        inst.state = READY
    return Planner(config, registry)


def plan_for(config: Config, **body: Any) -> Any:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}], **body}
    return ready_planner(config).plan(parse_request(CHAT, orjson.dumps(body), "r"), {})


def test_planner_reasons_a_silent_local_instance_beats_a_paid_cloud_one_that_declares_tools() -> None:
    config = parse_config({"providers": [
        {"provider_id": "local", "instances": [
            {"id": "coder", "base_url": "http://127.0.0.1:1",
             "metadata": {"capabilities": ["prefill"]}}]},
        {"provider_id": "openai", "local": False, "instances": [
            {"id": "default", "base_url": "https://api.openai.com/v1",
             "metadata": {"capabilities": ["tools", "json"],
                          "cost": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}}]}]})
    plan = plan_for(config, tools=TOOLS, response_format={"type": "json_object"})
    assert [plan.selected, *plan.fallback] == ["local:coder", "openai:default"]
    assert "capability_unknown=json,tools" in plan.reasons["local:coder"]
    assert not any(r.startswith("capability_") for r in plan.reasons["openai:default"])
    assert plan.rejected == {}
    # Without a local preference, the instance known to have tools comes first.
    config = parse_config({"routing": {"prefer_local": False}, "providers": [
        {"provider_id": "local", "instances": [{"id": "coder", "base_url": "http://127.0.0.1:1"}]},
        {"provider_id": "openai", "local": False, "instances": [
            {"id": "default", "base_url": "https://api.openai.com/v1",
             "metadata": {"capabilities": ["tools"]}}]}]})
    assert plan_for(config, tools=TOOLS).selected == "openai:default"


@pytest.mark.parametrize("metadata,path,got", [
    ({"capabilities": ["tools", "prefil"]}, "metadata.capabilities[1]", "'prefil'"),
    ({"unsupported": ["images"]}, "metadata.unsupported[0]", "'images'"),
    ({"capabilities": ["vision"], "unsupported": ["Vision"]}, "metadata.unsupported", "vision"),
    ({"capabilites": ["tools"]}, "metadata.capabilites", "unknown key"),
])
def test_capability_typo_is_a_config_error_naming_the_key_and_the_known_names(
        tmp_path: Path, metadata: dict[str, Any], path: str, got: str) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"providers": [{"provider_id": "p", "instances": [
        {"id": "a", "base_url": "http://127.0.0.1:1"},
        {"id": "b", "base_url": "http://127.0.0.1:2", "metadata": metadata}]}]}))
    with pytest.raises(ConfigError) as err:
        load_config(file)
    msg = str(err.value)
    assert msg.startswith(f"{file}: providers[0].instances[1].{path}:"), msg
    assert got in msg
    if "unknown key" not in msg and "also listed" not in msg:
        assert "expected one of json, prefill, tools, vision" in msg


def test_capability_names_are_case_insensitive_and_cover_what_requests_need() -> None:
    config = parse_config({"providers": [{"provider_id": "p", "instances": [
        {"id": "a", "base_url": "http://127.0.0.1:1",
         "metadata": {"capabilities": ["Tools", "JSON"], "unsupported": ["vision"]}}]}]})
    assert config.instances[0].capabilities == {"tools", "json"}
    assert config.instances[0].unsupported == {"vision"}
    planner = ready_planner(config)
    everything = {"model": "auto", "tools": TOOLS, "response_format": {"type": "json_schema"},
                  "messages": [{"role": "user", "content": [IMAGE]}]}
    needed = planner.requirements(parse_request(CHAT, orjson.dumps(everything), "r"), {})
    assert needed.capabilities <= set(CAPABILITIES)  # every derived name can be declared
    assert needed.capabilities == {"tools", "json", "vision"}


def test_capability_notes_say_what_only_cloud_instances_or_none_can_serve(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    example = load_config(ROOT / "config" / "example.yaml")
    assert capability_notes(example.instances) == [
        "vision: only cloud instances declare it (openai:default, anthropic:default); local "
        "instances that do not mention it are tried first (list it in their "
        "metadata.unsupported if they lack it)"]
    assert capability_notes(load_config(ROOT / "config" / "demo.yaml").instances) == []
    config = parse_config({"providers": [
        {"provider_id": "local", "instances": [
            {"id": "a", "base_url": "http://127.0.0.1:1",
             "metadata": {"unsupported": ["vision", "json"], "capabilities": ["prefill"]}},
            {"id": "off", "base_url": "http://127.0.0.1:3", "enabled": False}]},
        {"provider_id": "cloud", "local": False, "instances": [
            {"id": "b", "base_url": "http://127.0.0.1:2", "metadata": {"unsupported": ["json"]}}]}]})
    assert capability_notes(config.instances) == [
        "json: no instance can serve it (all list it as unsupported)",
        "vision: only cloud instances can serve it (cloud:b)"]
