"""Chaos under load: three twin simulators killed and restarted at random (never all at
once) while 20 clients send streaming and non-streaming requests through the proxy.

The engine is scripts/chaos.py (`make chaos` runs it for a minute, with real processes and
SIGKILL); here it runs in-process for a few seconds, so the proxy's upstream pool and the
event loop's tasks can be inspected directly. Every answer is checked word for word:
no failed non-streaming request, no stream presented as complete with a word missing or
twice, no loud stream failure while another twin could have continued it, and nothing
left behind once the load stops (connections in the pool match what the simulators
see, none checked out, no client connection, no task beyond those before the load).

CHAOS_SEED=N reproduces a run's schedule of requests and kills (timing still varies);
CHAOS_TEST_DURATION=S changes the length of the load (default 10 s).
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import openai
import pytest

from proxy.api.state import STATE
from proxy.config import parse_config
from proxy.health.states import DOWN, READY
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, wait_for

ROOT = Path(__file__).resolve().parents[1]


def _load_engine() -> ModuleType:
    name = "failover_chaos_engine"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


chaos = _load_engine()

DURATION = float(os.environ.get("CHAOS_TEST_DURATION", "10"))
CLIENTS = 20


async def test_simulators_killed_and_restarted_under_load(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    report = await chaos.run(chaos.Options(
        duration=DURATION, clients=CLIENTS, seed=seed, mode="inproc", words=40,
        chunk_delay=0.005, settle_s=5.0, workdir=tmp_path, quiet=True))
    summary = report.summary()
    print(summary)

    assert report.setup_error is None, summary
    # The run really was chaotic: enough traffic, kills, and streams cut mid-answer.
    assert len(report.outcomes) >= 100, summary
    assert report.kills >= 5 and report.restarts >= report.kills, summary
    assert (report.upstream_cuts or 0) >= 1, "no stream was cut mid-answer\n" + summary
    assert len(report.by_status(chaos.COMPLETE)) >= 20, summary

    # Every property at once, so one failure does not hide another.
    if report.violations:
        pytest.fail(summary, pytrace=False)


# --------------------------------------------------------------------------- reproductions
# Deterministic versions of what the chaos run found, so each can be fixed and kept fixed.


def _twins_config(sims: list[Any], tmp: Path, interval_s: float) -> Any:
    return parse_config({
        # Generous: a loaded machine must not time out a healthy twin (nothing here is
        # about timeouts; the refusals are immediate).
        "timeouts": {"connect_s": 1, "first_byte_s": 5, "idle_s": 5, "total_s": 30},
        "health": {"interval_s": interval_s, "timeout_s": 5},
        "store": {"url": f"sqlite:///{tmp}/audit.db"},
        "providers": [{"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": sim.base_url,
             "metadata": {"model": "twin", "capabilities": ["prefill"]}}
            for n, sim in enumerate(sims)]}],
    }, "<test>")


@pytest.mark.parametrize("stream", [False, True])
async def test_an_instance_that_is_back_is_tried_before_the_request_fails(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path, stream: bool) -> None:
    """The only live instance was marked DOWN by its last probe (it has restarted since);
    the one the proxy thinks is up has just died. Some instance can serve the request, so
    the client must get its answer, not a 502 naming the live instance as "not tried"."""
    a = await make_sim("twin")
    b = await make_sim("twin", faults=["refuse"])  # down when probed at start-up
    proxy = await make_proxy(_twins_config([a, b], tmp_path, interval_s=30))
    assert proxy.app[STATE].registry.by_id["p:s1"].state == DOWN
    b.set_faults([])  # b is back (the next probe is far away)...
    await a.stop()    # ...and a dies
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=10)
    messages: Any = [{"role": "user", "content": "hello"}]
    if stream:
        text = "".join([c.choices[0].delta.content or "" async for c in
                        await client.chat.completions.create(model="twin", messages=messages,
                                                             stream=True) if c.choices])
    else:
        completion = await client.chat.completions.create(model="twin", messages=messages)
        text = completion.choices[0].message.content or ""
    assert text == answer_text("twin", "hello", 20)


async def test_a_cut_stream_continues_on_a_twin_that_came_back_after_planning(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A twin that was down when the request was planned, and is known READY again when
    the stream is cut, can continue the answer; the stream must not fail loudly with "no
    instance left that can continue it"."""
    a = await make_sim("twin", words=40, chunk_delay=0.05)
    b = await make_sim("twin", words=40, faults=["refuse"])
    proxy = await make_proxy(_twins_config([a, b], tmp_path, interval_s=0.2))
    registry = proxy.app[STATE].registry
    assert registry.by_id["p:s1"].state == DOWN
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=10)
    text, chunks = "", 0
    async for chunk in await client.chat.completions.create(
            model="twin", messages=[{"role": "user", "content": "a long story"}], stream=True):
        text += "".join(c.delta.content or "" for c in chunk.choices)
        chunks += 1
        if chunks == 5:  # a few words in: b comes back, the proxy sees it, then a dies
            b.set_faults([])
            await wait_for(lambda: registry.by_id["p:s1"].state == READY, what="b READY")
            await a.stop()
    assert text == answer_text("twin", "a long story", 40)
