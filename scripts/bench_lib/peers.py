"""Optional peers measured with the same load as the proxy (BENCH_PEERS=litellm).

Each peer lives in its own virtualenv outside the project, created on first use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "failover-proxy-bench"))
LITELLM_VENV = CACHE / "litellm-venv"
# Versions published by attackers (LiteLLM supply-chain incidents) are never installed.
LITELLM_SPEC = "litellm[proxy]!=1.82.7,!=1.82.8,!=1.107.*"
INSTALL_TIMEOUT_S = 900


def ensure_litellm(log_path: Path) -> tuple[Path | None, str]:
    """(path of the `litellm` command, what happened); None and the reason when it failed."""
    exe = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / ".bench-installed"
    if exe.exists() and marker.exists():
        return exe, f"cached venv {LITELLM_VENV}"
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        steps = []
        if not (LITELLM_VENV / "bin" / "python").exists():
            steps.append([sys.executable, "-m", "venv", str(LITELLM_VENV)])
        pip = str(LITELLM_VENV / "bin" / "python")
        steps.append([pip, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
        steps.append([pip, "-m", "pip", "install", "--quiet", LITELLM_SPEC])
        for cmd in steps:
            left = INSTALL_TIMEOUT_S - (time.monotonic() - started)
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=max(left, 1),
                                    check=False).returncode
            except subprocess.TimeoutExpired:
                return None, f"install timed out after {INSTALL_TIMEOUT_S}s (log: {log_path})"
            if rc != 0:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                return None, f"`{' '.join(cmd[-2:])}` failed (exit {rc}): {' | '.join(tail)}"
    if not exe.exists():
        return None, f"installed, but {exe} is missing (log: {log_path})"
    marker.write_text(LITELLM_SPEC + "\n")
    return exe, f"installed into {LITELLM_VENV} in {time.monotonic() - started:.0f}s"


def litellm_version() -> str:
    py = LITELLM_VENV / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "?"


def litellm_config(model_name: str, upstream_model: str, api_base: str) -> str:
    return (
        "model_list:\n"
        f"  - model_name: {model_name}\n"
        "    litellm_params:\n"
        f"      model: openai/{upstream_model}\n"
        f"      api_base: {api_base}\n"
        "      api_key: not-a-real-key\n"
        "litellm_settings:\n"
        "  set_verbose: false\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )


def litellm_env(master_key: str) -> dict[str, str]:
    """LiteLLM refuses to start without a master key: a random one, per run."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update({
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the cost map at start
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    })
    return env
