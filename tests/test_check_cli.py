"""`failover-proxy check` and `serve`'s start-up as real processes (issue 14, items 1-2):
check fails when nothing is routable and says why per instance; labels the servers do not
list and capabilities only cloud instances can serve are reported, never fatal."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.sim.text import answer_text
from tests.cluster import ROOT, Cluster, free_port, wait_until

pytestmark = pytest.mark.e2e
SEED = Path(__file__).resolve().parent / "fixtures" / "providers.json"
QWEN_FILE = "/models/Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf"
GLM_REPO = "unsloth/GLM-4.7-Flash-GGUF:Q8_0"


def check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(config),
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_check_exits_1_and_says_why_when_no_instance_is_routable(cluster: Cluster,
                                                                  tmp_path: Path) -> None:
    live = cluster.start_sim("live", "Qwen/Qwen3-Coder-30B-A3B-Instruct")
    config = write(tmp_path / "c.yaml", {"health": {"timeout_s": 1}, "providers": [
        {"provider_id": "vllm", "instances": [
            {"id": "dead", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
            {"id": "pinned", "base_url": f"http://127.0.0.1:{live}/v1",
             "fingerprint": {"model": "GLM-4.7-Flash"}},
            {"id": "off", "base_url": f"http://127.0.0.1:{live}/v1", "enabled": False}]}]})
    result = check(config)
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert "no instance is routable" in err
    assert "vllm:dead: DOWN: CONN_REFUSED" in err
    assert ("vllm:pinned: MISMATCH: serves Qwen/Qwen3-Coder-30B-A3B-Instruct, "
            "not the configured model GLM-4.7-Flash") in err
    assert "vllm:off: disabled in the config" in err
    assert "vllm:dead" in result.stdout  # the table is still printed

    as_json = check(config, "--json")
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)
    assert doc["routable"] == 0
    assert [row["state"] for row in doc["instances"]] == ["DOWN", "MISMATCH", "DRAINED"]


def test_check_passes_the_seed_config_and_prints_label_warnings_and_capability_notes(
        cluster: Cluster, tmp_path: Path) -> None:
    qwen = cluster.start_sim("qwen", QWEN_FILE, f"model_file={QWEN_FILE}")
    glm = cluster.start_sim("glm", GLM_REPO)
    doc = json.loads(SEED.read_text())
    for inst, port in zip(doc["providers"][0]["instances"], (qwen, glm), strict=True):
        inst["base_url"] = f"http://127.0.0.1:{port}"
    config = tmp_path / "providers.json"
    config.write_text(json.dumps(doc))

    result = check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "llamacpp:qwen3-coder-30b  READY" in out and QWEN_FILE in out
    assert ("warning: llamacpp:qwen3-coder-30b: metadata.model 'Qwen3-Coder-30B' is not a "
            f"model this server lists ({QWEN_FILE})") in out
    assert "warning: llamacpp:glm47flash-q8: metadata.model 'GLM-4-7B-Flash'" in out
    assert "capabilities: prefill: no instance declares it" in out
    assert result.stderr == ""

    doc = json.loads(check(config, "--json").stdout)
    assert doc["routable"] == 2
    assert [len(row["warnings"]) for row in doc["instances"]] == [1, 1]


def sim_probes(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/state", timeout=5) as resp:
        return int(json.load(resp)["stats"]["by_path"].get(path, 0))


def test_serve_logs_a_label_warning_once_per_instance_and_what_only_the_cloud_can_serve(
        cluster: Cluster) -> None:
    cluster.start_sim("coder", QWEN_FILE, f"model_file={QWEN_FILE}")
    cluster.start_sim("cloud", "gpt-4o-mini-2024-07-18")
    cluster.start_proxy(
        [("coder", "Qwen3-Coder-30B"), ("cloud", "gpt-4o-mini")],
        instance_extra={
            "coder": {"server": "llamacpp",
                      "metadata": {"model": "Qwen3-Coder-30B", "capabilities": ["prefill"],
                                   "unsupported": ["vision"]}},
            "cloud": {"local": False,
                      "metadata": {"model": "gpt-4o-mini", "capabilities": ["tools", "vision"]}}},
        health={"interval_s": 0.1, "timeout_s": 1})
    port = cluster.sims["coder"][0]
    # Many probes, each seeing the same label.
    wait_until(lambda: sim_probes(port, "/props") >= 8, 20, "eight probes", 0.1)
    client = cluster.client()
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello"}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    # The local instance is silent about tools: unknown, not missing; local is preferred.
    assert raw.headers["x-route-instance"] == "local:coder"
    assert raw.parse().choices[0].message.content == answer_text(QWEN_FILE, "hello", 20)
    log = cluster.log()
    warnings = [line for line in log.splitlines() if "instance_warning" in line]
    assert len(warnings) == 1 and "local:coder" in warnings[0], warnings
    assert "'Qwen3-Coder-30B'" in warnings[0]
    coverage = [line for line in log.splitlines() if "capability_coverage" in line]
    assert len(coverage) == 1
    assert "vision: only cloud instances can serve it (local:cloud)" in coverage[0]
    assert "tools: only cloud instances declare it (local:cloud)" in coverage[0]
