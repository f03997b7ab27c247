"""Fingerprints against what real servers report (issue 14, item 1).

A model name the user wrote is a label, not a lock: simulators on real ports report the
names real servers do (llama.cpp's model path or `-hf` repo with quantisation suffixes,
Ollama tags, HF-style ids, LM Studio publisher ids, vLLM served names, gateway ids), and
the instance must route. Only a change of what the server serves, or a contradiction of
an explicit `fingerprint: {model: X}`, is a MISMATCH.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.api.state import STATE
from proxy.config import Config, parse_config
from proxy.health.fingerprints import Served, judge, learn
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, wait_for
from tests.test_health import admin_instances, ask

SEED = Path(__file__).resolve().parent / "fixtures" / "providers.json"
PROMPT = "fix this python function"

# llama.cpp started with `-m PATH` and no `--alias` names its model by the path; with
# `-hf REPO:QUANT` by the repo (llama.cpp tools/server/server-context.cpp, vendored in
# llama-cpp-python 0.3.36: model_name = alias, else model.get_name(), i.e. hf_repo or path).
QWEN_FILE = "/models/Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf"
QWEN_REPO = "unsloth/Qwen3-Coder-30B-A3B-Instruct-GGUF:Q4_K_M"
QWEN_CACHED = ("/root/.cache/llama.cpp/"
               "unsloth_Qwen3-Coder-30B-A3B-Instruct-GGUF_Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf")
GLM_REPO = "unsloth/GLM-4.7-Flash-GGUF:Q8_0"
GLM_FILE = "/root/.cache/llama.cpp/unsloth_GLM-4.7-Flash-GGUF_GLM-4.7-Flash-Q8_0.gguf"


def seed_pointed_at(sims: list[Simulator]) -> Config:
    """The seed's providers.json as its user wrote it, at the simulators' addresses."""
    doc = orjson.loads(SEED.read_bytes())
    for inst, sim in zip(doc["providers"][0]["instances"], sims, strict=True):
        inst["base_url"] = sim.base_url
    return parse_config(doc, str(SEED))


def one_provider(server: str, instances: list[dict[str, Any]], interval: float = 60) -> Config:
    """Instances `p:s0`, `p:s1`, ... of one provider, tried in this order (group `main`)."""
    return parse_config({
        "timeouts": {"connect_s": 1, "first_byte_s": 2, "idle_s": 2},
        "health": {"interval_s": interval, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "models": {"main": {"instances": [f"p:s{n}" for n in range(len(instances))],
                            "strategy": "ordered"}},
        "providers": [{"provider_id": "p", "server": server, "instances": [
            {"id": f"s{n}", **inst} for n, inst in enumerate(instances)]}],
    }, "<test>")


async def test_seed_providers_json_routes_to_llamacpp_servers_whose_files_carry_quant_suffixes(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    qwen = await make_sim(QWEN_FILE, faults=[f"model_file={QWEN_FILE}"])
    glm = await make_sim(GLM_REPO, faults=[f"model_file={GLM_FILE}"])
    proxy = await make_proxy(seed_pointed_at([qwen, glm]))

    rows = await admin_instances(proxy)
    coder, flash = rows["llamacpp:qwen3-coder-30b"], rows["llamacpp:glm47flash-q8"]
    assert (coder["state"], coder["routable"]) == ("READY", True)
    assert (flash["state"], flash["routable"]) == ("READY", True)
    assert coder["fingerprint"] == QWEN_FILE and coder["fingerprint_source"] == "learned"
    assert flash["fingerprint"] == GLM_REPO and flash["fingerprint_detail"] == GLM_FILE
    # The labels are not what the servers call their models: a warning each, and llama.cpp
    # ignores a request's `model`, so no word about the server refusing it.
    [warning] = coder["warnings"]
    assert "'Qwen3-Coder-30B'" in warning and QWEN_FILE in warning and "refuse" not in warning
    [warning] = flash["warnings"]
    assert "'GLM-4-7B-Flash'" in warning and GLM_REPO in warning

    for stream in (False, True):  # the response's `model` (the path) is what was learned
        assert await ask(proxy, PROMPT, stream, model="auto") == (
            answer_text(QWEN_FILE, PROMPT, 20), "llamacpp:qwen3-coder-30b", "1")
    # Clients name the instances by the labels; that keeps working.
    assert (await ask(proxy, PROMPT, model="Qwen3-Coder-30B"))[1:] == (
        "llamacpp:qwen3-coder-30b", "1")
    assert (await ask(proxy, PROMPT, True, model="GLM-4-7B-Flash")) == (
        answer_text(GLM_REPO, PROMPT, 20), "llamacpp:glm47flash-q8", "1")
    # ... and by the names the servers use, once the prober has learned them.
    assert (await ask(proxy, PROMPT, model=GLM_REPO))[1:] == ("llamacpp:glm47flash-q8", "1")
    rows = await admin_instances(proxy)
    assert [r["state"] for r in rows.values()] == ["READY", "READY"]
    assert [r["failures"] for r in rows.values()] == [0, 0]


# (label, server kind, the simulator's model, its faults, whether the label is listed)
SIBLINGS = [
    pytest.param("Qwen3-Coder-30B", "llamacpp", QWEN_FILE, [f"model_file={QWEN_FILE}"], False,
                 id="llamacpp-gguf-path"),
    pytest.param("Qwen3-Coder-30B", "llamacpp", QWEN_REPO, [f"model_file={QWEN_CACHED}"], False,
                 id="llamacpp-hf-repo"),
    pytest.param("Qwen3-Coder-30B", "llamacpp", "qwen3-coder", [f"model_file={QWEN_FILE}"], False,
                 id="llamacpp-alias"),
    pytest.param("Qwen3-Coder-30B", "ollama", "-",
                 ["models=qwen3-coder:30b-a3b-q4_K_M,llama3.1:8b,nomic-embed-text:latest"], False,
                 id="ollama-tag"),
    pytest.param("Qwen3-Coder-30B", "vllm", "Qwen/Qwen3-Coder-30B-A3B-Instruct", [], False,
                 id="vllm-hf-id"),
    pytest.param("Qwen3-Coder-30B", "vllm", "coder", [], False, id="vllm-served-model-name"),
    pytest.param("Qwen3-Coder-30B", "lmstudio", "-",
                 ["models=qwen/qwen3-coder-30b,text-embedding-nomic-embed-text-v1.5"], True,
                 id="lmstudio-publisher-id"),
    pytest.param("Qwen3-Coder-30B", "openai", "qwen3-coder-30b-2025-07-31", [], True,
                 id="dated-snapshot"),
    pytest.param("fb-s01-429-retry-after", "openai", "-", ["models=fb-s01,fb-s02"], False,
                 id="gateway-lists-short-ids"),
    pytest.param("fb-s01", "openai", "-", ["models=fb-s01-429-retry-after,fb-s02-500"], False,
                 id="gateway-lists-long-ids"),
]


@pytest.mark.parametrize("label,server,served,faults,listed", SIBLINGS)
async def test_a_label_the_server_names_otherwise_is_a_warning_and_the_instance_routes(
        make_sim: MakeSim, make_proxy: MakeProxy, label: str, server: str, served: str,
        faults: list[str], listed: bool) -> None:
    sim = await make_sim(served, faults=faults)
    proxy = await make_proxy(one_provider(server, [
        {"base_url": sim.base_url, "metadata": {"model": label}}]))
    row = (await admin_instances(proxy))["p:s0"]
    assert (row["state"], row["routable"], row["fingerprint_source"]) == ("READY", True, "learned")
    if listed:
        assert row["warnings"] == []
    else:
        [warning] = row["warnings"]
        assert f"'{label}'" in warning
        # Every server but llama.cpp looks a request's `model` up: a one-model server is
        # sent the name it serves; for a listing the label names none of, say it may refuse.
        multi = any(f.startswith("models=") and "," in f for f in faults)
        assert ("may refuse" in warning) == (server != "llamacpp" and multi)
        assert ("name the model it serves" in warning) == (server != "llamacpp" and not multi)
    # Servers listing several models echo the requested one (the label); others their own.
    answers_as = label if any(f.startswith("models=") for f in faults) else served
    for stream in (False, True):
        assert await ask(proxy, PROMPT, stream, model="main") == (
            answer_text(answers_as, PROMPT, 20), "p:s0", "1")
    row = (await admin_instances(proxy))["p:s0"]
    assert (row["state"], row["failures"]) == ("READY", 0)


async def test_azure_empty_model_first_event_streams_and_the_instance_stays_ready(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    azure = await make_sim("gpt-4o-2024-11-20", faults=["azure_prelude"])
    backup = await make_sim("gpt-4o-2024-11-20")
    proxy = await make_proxy(one_provider("openai", [
        {"base_url": azure.base_url, "metadata": {"model": "gpt-4o"}},
        {"base_url": backup.base_url, "metadata": {"model": "gpt-4o"}}]))
    for n in range(3):
        prompt = f"{PROMPT} {n}"
        assert await ask(proxy, prompt, True, model="main") == (
            answer_text("gpt-4o-2024-11-20", prompt, 20), "p:s0", "1")
    row = (await admin_instances(proxy))["p:s0"]
    assert (row["state"], row["failures"], row["last_error"]) == ("READY", 0, None)
    assert backup.stats.requests == 0


async def test_llamacpp_restarted_with_another_model_is_mismatch_though_its_label_never_matched(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    first = await make_sim(QWEN_FILE, faults=[f"model_file={QWEN_FILE}"])
    twin = await make_sim(QWEN_FILE, faults=[f"model_file={QWEN_FILE}"])
    proxy = await make_proxy(one_provider("llamacpp", [
        {"base_url": sim.base_url, "metadata": {"model": "Qwen3-Coder-30B"}}
        for sim in (first, twin)], interval=0.2))
    assert (await ask(proxy, model="main"))[1] == "p:s0"
    port = first.port
    await first.stop()
    other = await make_sim(GLM_REPO, port=port, faults=[f"model_file={GLM_FILE}"])
    primary = proxy.app[STATE].registry.by_id["p:s0"]
    await wait_for(lambda: primary.state == "MISMATCH", what="MISMATCH")
    assert await ask(proxy, PROMPT, model="main") == (
        answer_text(QWEN_FILE, PROMPT, 20), "p:s1", "1")
    assert other.stats.requests == 0
    row = (await admin_instances(proxy))["p:s0"]
    assert row["fingerprint"] == QWEN_FILE  # still pinned to what it served before
    assert GLM_REPO in row["last_probe_error"] and QWEN_FILE in row["last_probe_error"]


async def test_llamacpp_same_alias_on_another_file_is_mismatch_until_the_file_is_back(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("qwen3-coder", faults=[f"model_file={QWEN_FILE}"])
    proxy = await make_proxy(one_provider("llamacpp", [
        {"base_url": sim.base_url, "metadata": {"model": "qwen3-coder"}}], interval=0.2))
    inst = proxy.app[STATE].registry.by_id["p:s0"]
    assert inst.state == "READY" and inst.warnings == ()
    sim.set_faults([f"model_file={GLM_FILE}"])  # restarted: `--alias qwen3-coder -m GLM...`
    await wait_for(lambda: inst.state == "MISMATCH", what="MISMATCH")
    assert inst.last_probe_error is not None and GLM_FILE in inst.last_probe_error
    # The same file in another directory is the same model.
    sim.set_faults([f"model_file=/srv/models/{Path(QWEN_FILE).name}"])
    await wait_for(lambda: inst.state == "READY", what="READY again")


async def test_ollama_box_that_gains_models_is_the_same_server_one_that_loses_the_labelled_model_is_not(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("-", faults=["models=llama3.1:8b,qwen3-coder:30b"])
    proxy = await make_proxy(one_provider("ollama", [
        {"base_url": sim.base_url, "metadata": {"model": "llama3.1:8b"}}], interval=0.2))
    inst = proxy.app[STATE].registry.by_id["p:s0"]
    assert inst.state == "READY" and inst.fingerprint == "llama3.1:8b" and inst.warnings == ()
    sim.set_faults(["models=llama3.1:8b,qwen3-coder:30b,mistral:7b"])  # `ollama pull mistral`
    await wait_for(lambda: inst.pin is not None and "mistral:7b" in inst.pin.models,
                   what="the new model taken into the pin")
    sim.set_faults(["models=llama3.1:8b,mistral:7b"])  # `ollama rm qwen3-coder:30b`
    await wait_for(lambda: inst.pin is not None and len(inst.pin.models) == 2,
                   what="the removed model dropped from the pin")
    assert inst.state == "READY"
    assert (await ask(proxy, model="main"))[1:] == ("p:s0", "1")
    sim.set_faults(["models=mistral:7b"])  # the labelled model is gone
    await wait_for(lambda: inst.state == "MISMATCH", what="MISMATCH")
    assert inst.last_probe_error is not None and "llama3.1:8b" in inst.last_probe_error


async def test_multi_model_server_with_an_unlisted_label_is_another_server_only_when_all_it_served_is_gone(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("-", faults=["models=alpha,beta"])
    proxy = await make_proxy(one_provider("vllm", [
        {"base_url": sim.base_url, "metadata": {"model": "house-model"}}], interval=0.2))
    inst = proxy.app[STATE].registry.by_id["p:s0"]
    assert inst.state == "READY" and len(inst.warnings) == 1
    assert inst.pin is not None and inst.pin.models == ("alpha", "beta")
    sim.set_faults(["models=beta,gamma"])
    await wait_for(lambda: inst.pin is not None and inst.pin.models == ("beta", "gamma"),
                   what="the listing change taken in")
    assert inst.state == "READY"
    sim.set_faults(["models=delta,epsilon"])
    await wait_for(lambda: inst.state == "MISMATCH", what="MISMATCH")


async def test_explicit_pin_contradicted_by_the_server_is_mismatch(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    qwen = await make_sim("Qwen/Qwen3-Coder-30B-A3B-Instruct")
    also_qwen = await make_sim("Qwen/Qwen3-Coder-30B-A3B-Instruct")
    proxy = await make_proxy(one_provider("vllm", [
        {"base_url": also_qwen.base_url, "fingerprint": {"model": "GLM-4.7-Flash"},
         "metadata": {"model": "GLM-4.7-Flash"}},
        {"base_url": qwen.base_url, "fingerprint": {"model": "Qwen3-Coder-30B-A3B-Instruct"}}]))
    rows = await admin_instances(proxy)
    assert rows["p:s0"]["state"] == "MISMATCH"
    assert "not the configured model GLM-4.7-Flash" in rows["p:s0"]["last_probe_error"]
    assert rows["p:s1"]["state"] == "READY"  # the pin names the served model (an HF id)
    assert rows["p:s1"]["fingerprint_source"] == "configured"
    assert (await ask(proxy, model="main"))[1:] == ("p:s1", "1")
    assert also_qwen.stats.requests == 0


def test_a_response_claims_another_model_only_when_it_names_one_the_server_does_not_serve() -> None:
    pin = learn(Served((QWEN_FILE,), QWEN_FILE, QWEN_FILE), "Qwen3-Coder-30B")
    assert not pin.contradicted_by(QWEN_FILE)  # llama.cpp's answers name the model path
    assert not pin.contradicted_by("")  # Azure's prompt-filter event
    assert not pin.contradicted_by(None)
    assert not pin.contradicted_by("Qwen3-Coder-30B")  # an older llama.cpp echoes the request
    assert not pin.contradicted_by("qwen3-coder-30b-a3b-instruct-q4_k_m")
    assert pin.contradicted_by("GLM-4.7-Flash")
    listed = learn(Served(("llama3.1:8b", "qwen3-coder:30b")), "llama3.1:8b")
    assert not listed.contradicted_by("qwen3-coder:30b")  # served there, if not the label
    assert listed.contradicted_by("mistral:7b")


def test_a_llamacpp_probe_without_props_keeps_the_file_it_knows() -> None:
    pin = learn(Served(("qwen3-coder", QWEN_FILE), "qwen3-coder", QWEN_FILE), "qwen3-coder")
    kept, mismatch = judge(pin, Served(("qwen3-coder",), "qwen3-coder"))  # /v1/models only
    assert (kept, mismatch) == (pin, None)
    kept, mismatch = judge(kept, Served(("qwen3-coder", "/m/other.gguf"), "qwen3-coder",
                                        "/m/other.gguf"))
    assert mismatch is not None and "/m/other.gguf" in mismatch


@pytest.mark.parametrize("label", ["Qwen3-Coder-30B", None])
async def test_a_label_ollama_does_not_serve_is_sent_as_the_name_it_serves(
        make_sim: MakeSim, make_proxy: MakeProxy, label: str | None) -> None:
    # An Ollama box that pulled one model refuses any other name with 404 (strict_models);
    # the user's label (or no label at all) must not make every request fail.
    served = "qwen3-coder:30b-a3b-q4_K_M"
    sim = await make_sim("-", faults=[f"models={served}", "strict_models"])
    meta = {"model": label} if label else {}
    proxy = await make_proxy(one_provider("ollama", [{"base_url": sim.base_url, "metadata": meta}]))
    inst = proxy.app[STATE].registry.by_id["p:s0"]
    assert inst.state == "READY" and inst.request_model == served
    if label:
        [warning] = inst.warnings
        assert "requests name the model it serves instead" in warning
    for stream in (False, True):
        text, instance, attempts = await ask(proxy, PROMPT, stream, model="main")
        assert (instance, attempts) == ("p:s0", "1") and text
        assert sim.stats.last_model == served


async def test_a_label_a_multi_model_server_lists_is_sent_as_written(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("-", faults=["models=llama3.1:8b,qwen3-coder:30b", "strict_models"])
    proxy = await make_proxy(one_provider("ollama", [
        {"base_url": sim.base_url, "metadata": {"model": "qwen3-coder:30b"}}]))
    assert (await ask(proxy, model="main"))[1:] == ("p:s0", "1")
    assert sim.stats.last_model == "qwen3-coder:30b"
