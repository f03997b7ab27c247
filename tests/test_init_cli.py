"""`failover-proxy init` as a real process (issue 20, item 5): it probes each port the way
its server kind answers, lists what it found and writes a starter config that loads and
passes `check`; it never overwrites a file without --force. The usual ports may be taken
on a test machine, so the simulators run on free ports given by the hidden --ports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import load_config, parse_config
from tests.cluster import ROOT, Cluster, free_port

pytestmark = pytest.mark.e2e
GGUF = "/models/Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_init_lists_each_server_found_and_writes_a_config_that_passes_check(
        cluster: Cluster, tmp_path: Path) -> None:
    llama = cluster.start_sim("llama", GGUF, f"model_file={GGUF}")
    ollama = cluster.start_sim("ollama", "llama3.1:8b", "models=llama3.1:8b,qwen2.5-coder:7b")
    vllm = cluster.start_sim("vllm", "Qwen/Qwen3-8B")
    dead = free_port()
    out = tmp_path / "starter.yaml"
    result = run("init", "--out", str(out), "--ports",
                 f"llamacpp={llama},ollama={ollama},lmstudio={dead},vllm={vllm}")
    assert result.returncode == 0, result.stdout + result.stderr
    said = result.stdout
    # the model file once: with no --alias it is also the name llama.cpp serves
    assert f"  llama.cpp on 127.0.0.1:{llama}: {GGUF}\n" in said
    assert f"Ollama on 127.0.0.1:{ollama}: llama3.1:8b, qwen2.5-coder:7b" in said
    assert f"LM Studio on 127.0.0.1:{dead}: not found (CONN_REFUSED" in said
    assert f"vLLM on 127.0.0.1:{vllm}: Qwen/Qwen3-8B" in said
    assert f"wrote {out} with 4 instances" in said

    config = load_config(out)
    by_id = {inst.id: inst for inst in config.instances}
    assert sorted(by_id) == ["llamacpp:Qwen3-Coder-30B-A3B-Instruct-Q4_K_M",
                             "ollama:llama3.1-8b", "ollama:qwen2.5-coder-7b", "vllm:Qwen-Qwen3-8B"]
    llama_inst = by_id["llamacpp:Qwen3-Coder-30B-A3B-Instruct-Q4_K_M"]
    assert (llama_inst.server, llama_inst.base_url) == ("llamacpp", f"http://127.0.0.1:{llama}/v1")
    assert llama_inst.model == "Qwen3-Coder-30B-A3B-Instruct-Q4_K_M"
    assert "prefill" in llama_inst.capabilities
    assert by_id["ollama:qwen2.5-coder-7b"].model == "qwen2.5-coder:7b"
    assert by_id["ollama:qwen2.5-coder-7b"].server == "ollama"
    assert by_id["vllm:Qwen-Qwen3-8B"].model == "Qwen/Qwen3-8B"
    assert not by_id["vllm:Qwen-Qwen3-8B"].capabilities
    assert config.server.port not in (llama, ollama, vllm, dead, 8080)
    text = out.read_text()
    assert "  # - provider_id: openai" in text and "${OPENAI_API_KEY:-}" in text

    checked = run("check", "--config", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("READY") == 4
    assert "warning:" not in checked.stdout  # every label is a name its server lists


def test_init_finding_nothing_still_writes_a_loadable_example_and_says_so(
        tmp_path: Path) -> None:
    out = tmp_path / "sub" / "starter.yaml"
    result = run("init", "--out", str(out), "--ports",
                 f"llamacpp={free_port()},ollama={free_port()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no model server answered" in result.stdout
    config = load_config(out)
    assert [(i.id, i.server) for i in config.instances] == [("llamacpp:local", "llamacpp")]
    text = out.read_text()
    assert "# Nothing answered when init ran" in text
    assert "  # - provider_id: openai" in text and "${OPENAI_API_KEY:-}" in text


def test_init_never_overwrites_a_file_unless_forced(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "mine.yaml"
    out.write_text("# my own config\n")
    sim = cluster.start_sim("vllm", "served-model")
    ports = f"vllm={sim}"

    refused = run("init", "--out", str(out), "--ports", ports)
    assert refused.returncode == 1
    assert f"{out} exists; pass --force" in refused.stderr
    assert out.read_text() == "# my own config\n"

    forced = run("init", "--out", str(out), "--ports", ports, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert [i.model for i in load_config(out).instances] == ["served-model"]


def test_init_rejects_a_malformed_port_list_with_a_usage_error(tmp_path: Path) -> None:
    result = run("init", "--out", str(tmp_path / "x.yaml"), "--ports", "llamacpp=notaport")
    assert result.returncode == 2
    assert "expected KIND=PORT" in result.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_readme_quickstart_configs_load_alone_and_with_the_cloud_fallback() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in quickstart.split("```yaml\n")[1:]]
    assert len(blocks) == 2
    local = parse_config(yaml.safe_load(blocks[0]), "README local")
    assert [(i.id, i.server, i.local) for i in local.instances] == [
        ("llamacpp:local", "llamacpp", True)]
    assert local.server.port == 8081
    both = parse_config(yaml.safe_load(blocks[0] + blocks[1]), "README local + cloud")
    assert [(i.id, i.local) for i in both.instances] == [
        ("llamacpp:local", True), ("openai:default", False)]
