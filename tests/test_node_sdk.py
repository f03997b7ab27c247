"""The Node `openai` SDK (`responses.create`, whole and streamed) as a client of the
proxy's Responses API. `make node` installs it into tests/node (`make test` does first)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, proxy_config

NODE_DIR = Path(__file__).parent / "node"
PROMPT = "tell me about failover"


async def run_node(base_url: str) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("node or the Node openai SDK is missing: run `make node` (`make test` "
                    "runs it first)", pytrace=False)
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "responses.mjs"), base_url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def test_the_node_sdk_gets_the_answer_whole_and_streamed_from_the_fallback(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    primary, fallback = await make_sim("sim-model"), await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([primary, fallback], health={"interval_s": 30}))
    await primary.stop()
    got = await run_node(proxy.base_url)
    assert "error" not in got, got
    assert got["instance"] == "p1:s1"
    assert got["text"] == got["streamed"] == answer_text("sim-model", PROMPT, 20)
    assert got["events"][0] == "response.created" and got["events"][-1] == "response.completed"


async def test_the_node_sdk_raises_its_status_error_when_every_instance_is_down(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    sim = await make_sim("sim-model")
    proxy = await make_proxy(proxy_config([sim], health={"interval_s": 30}))
    await sim.stop()
    got = await run_node(proxy.base_url)
    assert got["error"]["status"] in (502, 503)
    assert got["error"]["name"] in ("InternalServerError", "APIError")
