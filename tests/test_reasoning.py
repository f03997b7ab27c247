"""Everything the model streams is content: reasoning, tool-call and refusal deltas commit
the stream and are relayed as they arrive; a cut after any of them is continued or fails
loudly, and the client never sees text twice or a gap."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.config import parse_config
from proxy.engine.chunks import _of_choices, inspect_chunk
from proxy.engine.record import PREFILL, REPLAY
from proxy.engine.splicing import Delivered, Diverged, Splicer
from proxy.sim.faults import REASONING_STEP_S
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text, reasoning_words, stream_pieces
from tests.conftest import MakeProxy, MakeSim, RunningProxy

PROMPT = "think it over"
WORDS = 12


def config_for(sims: list[tuple[Simulator, dict[str, Any]]], tmp: Path,
               first_byte_s: float = 1.0) -> Any:
    return parse_config({
        "timeouts": {"connect_s": 1, "first_byte_s": first_byte_s, "idle_s": 2, "total_s": 60},
        "health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "store": {"url": f"sqlite:///{tmp}/audit.db"},
        "models": {"main": {"instances": [f"p:s{n}" for n in range(len(sims))],
                            "strategy": "ordered"}},
        "providers": [{"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": sim.base_url, "metadata": {"model": sim.model, **meta}}
            for n, (sim, meta) in enumerate(sims)]}],
    }, "<test>")


def reasoning_of(model: str, seconds: float) -> str:
    """The reasoning text a simulator with `reasoning=seconds` streams for PROMPT."""
    return "".join(stream_pieces(reasoning_words(model, PROMPT, round(seconds / REASONING_STEP_S))))


class Streamed:
    """A streamed answer as a client read it, event by event, with arrival times."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[tuple[float, dict[str, Any]]] = []
        self.done = False
        self.error: Any = None

    def joined(self, field: str) -> str:
        return "".join(str(c["choices"][0]["delta"].get(field) or "")
                       for _, c in self.chunks if c.get("choices"))

    def first(self, field: str) -> float:
        return next(t for t, c in self.chunks
                    if c.get("choices") and c["choices"][0]["delta"].get(field))


async def stream(proxy: RunningProxy) -> Streamed:
    """POST a streamed chat request and read its events as they arrive."""
    got = Streamed()
    body = {"model": "main", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.base_url}/chat/completions", json=body) as resp:
        got.status = resp.status
        got.headers = {k.lower(): v for k, v in resp.headers.items()}
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                got.done = True
                continue
            obj = orjson.loads(payload)
            if "error" in obj:
                got.error = obj["error"]
            else:
                got.chunks.append((time.monotonic(), obj))
    return got


async def events_of(proxy: RunningProxy, request_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{proxy.url}/admin/events", params={"request_id": request_id}) as resp:
        return list(reversed((await resp.json())["events"]))


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
async def test_reasoning_longer_than_first_byte_on_one_instance_is_relayed_as_it_arrives(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path, field: str) -> None:
    # 2 s of reasoning before the answer, first_byte_s 1: the reasoning is the first byte.
    solo = await make_sim("thinker", words=WORDS, faults=["reasoning=2", f"reasoning_field={field}"])
    proxy = await make_proxy(config_for([(solo, {})], tmp_path, first_byte_s=1.0))
    got = await stream(proxy)
    assert got.status == 200 and got.done and got.error is None
    assert got.headers["x-route-attempts"] == "1"
    assert got.joined(field) == reasoning_of("thinker", 2)
    assert got.joined("content") == answer_text("thinker", PROMPT, WORDS)
    # Relayed as it arrived: the client had the first reasoning long before the answer
    # (the simulator spaces them 2 s apart), not all of it at once when the answer came.
    assert got.first("content") - got.first(field) > 1.0
    trail = await events_of(proxy, got.headers["x-request-id"])
    assert not [e for e in trail if e["type"] == "REROUTED"]


async def test_a_cut_during_reasoning_is_replayed_on_a_twin_once_and_whole(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    cut = await make_sim("twin", words=WORDS, faults=["reasoning=0.8", "die_after=3"])
    twin = await make_sim("twin", words=WORDS, faults=["reasoning=0.8"])
    proxy = await make_proxy(config_for([(cut, {}), (twin, {"capabilities": ["prefill"]})],
                                        tmp_path))
    got = await stream(proxy)
    assert got.status == 200 and got.done and got.error is None
    # Every reasoning word and every answer word exactly once, under one identity.
    assert got.joined("reasoning_content") == reasoning_of("twin", 0.8)
    assert got.joined("content") == answer_text("twin", PROMPT, WORDS)
    assert len({c["id"] for _, c in got.chunks}) == 1
    trail = await events_of(proxy, got.headers["x-request-id"])
    resumed = [e for e in trail if e["type"] == "STREAM_RESUMED"]
    assert len(resumed) == 1 and resumed[0]["detail"]["mode"] == "replay"


async def test_a_cut_during_reasoning_with_no_twin_fails_loudly(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    cut = await make_sim("thinker", words=WORDS, faults=["reasoning=0.8", "die_after=3"])
    other = await make_sim("other", words=WORDS)
    proxy = await make_proxy(config_for([(cut, {}), (other, {"capabilities": ["prefill"]})],
                                        tmp_path))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    reasoning = ""
    with pytest.raises(openai.APIError) as raised:  # never a clean end: the SDK raises
        async for chunk in await client.chat.completions.create(
                model="main", messages=[{"role": "user", "content": PROMPT}], stream=True):
            reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
    assert "only reasoning had been delivered" in str(raised.value)
    assert reasoning == reasoning_of("thinker", 0.3)  # the 3 pieces sent before the cut
    assert other.stats.requests == 0  # a prefill cannot carry on a reasoning: not asked


async def test_a_cut_after_reasoning_and_some_answer_is_continued_without_its_reasoning_again(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    # 5 reasoning pieces, then 4 answer words, then the connection dies.
    cut = await make_sim("twin", words=WORDS, faults=["reasoning=0.5", "die_after=9"])
    # The continuation reasons again before going on: that must not reach the client.
    cont = await make_sim("twin", words=WORDS, faults=["reasoning=0.5"])
    proxy = await make_proxy(config_for([(cut, {}), (cont, {"capabilities": ["prefill"]})],
                                        tmp_path))
    got = await stream(proxy)
    assert got.status == 200 and got.done and got.error is None
    assert got.joined("reasoning_content") == reasoning_of("twin", 0.5)
    # The simulator continues the prefill only if it is exactly the delivered answer text
    # (no reasoning in it); anything else would show as different words here.
    assert got.joined("content") == answer_text("twin", PROMPT, WORDS)
    trail = await events_of(proxy, got.headers["x-request-id"])
    resumed = [e for e in trail if e["type"] == "STREAM_RESUMED"]
    assert resumed[0]["detail"] == {"chars_carried": len(answer_text("twin", PROMPT, 4)),
                                    "mode": "prefill"}


async def test_a_replay_slower_than_first_byte_to_catch_up_is_not_a_timeout(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    # The twin needs ~2 s to regenerate the 20 delivered words: output all along, which
    # first_byte_s (1 s) must not cut short.
    cut = await make_sim("twin", words=30, faults=["die_after=20"])
    twin = await make_sim("twin", words=30, prefill=False, chunk_delay=0.1)
    proxy = await make_proxy(config_for([(cut, {}), (twin, {})], tmp_path))
    got = await stream(proxy)
    assert got.status == 200 and got.done and got.error is None
    assert got.joined("content") == answer_text("twin", PROMPT, 30)


async def test_a_tool_call_as_the_first_output_commits_the_stream(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    # ~2.5 s of stream whose first output (after 0.25 s) is a tool call; first_byte_s 1.
    solo = await make_sim("caller", words=4, faults=["tool_call"], chunk_delay=0.25)
    proxy = await make_proxy(config_for([(solo, {})], tmp_path, first_byte_s=1.0))
    got = await stream(proxy)
    assert got.status == 200 and got.done
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for _, c in got.chunks
             if c.get("choices") and c["choices"][0]["delta"].get("tool_calls")]
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert orjson.loads(arguments) == {"q": answer_text("caller", PROMPT, 4)}
    assert got.chunks[-1][1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_refusal_commits_the_stream_and_is_relayed(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    # A refusal streamed over ~1.5 s, first_byte_s 1: the refusal is the first byte.
    solo = await make_sim("careful", words=4, faults=["refusal"], chunk_delay=0.25)
    proxy = await make_proxy(config_for([(solo, {})], tmp_path, first_byte_s=1.0))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    refusal = ""
    async for chunk in await client.chat.completions.create(
            model="main", messages=[{"role": "user", "content": PROMPT}], stream=True):
        if chunk.choices:
            refusal += chunk.choices[0].delta.refusal or ""
    assert refusal == answer_text("careful", PROMPT, 4)


# --------------------------------------------------------------------------- chunk and splicer


def _delta_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "up-2", "created": 2, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.mark.parametrize(("delta", "output"), [
    ({"content": "Hi"}, True),
    ({"reasoning_content": "Let me see"}, True),            # DeepSeek, llama.cpp
    ({"content": "", "reasoning": "We need"}, True),        # vLLM >= PR 27752, Ollama /v1
    ({"content": None, "thinking": "Hmm"}, True),
    ({"reasoning_details": [{"type": "reasoning.encrypted", "data": "x"}]}, True),  # OpenRouter
    ({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}, True),
    ({"function_call": {"name": "f"}}, True),               # the legacy shape
    ({"refusal": "I can't"}, True),
    ({"role": "assistant", "content": ""}, False),
    ({"role": "assistant", "content": None, "reasoning_content": None}, False),
    ({}, False),
])
def test_every_kind_of_model_output_commits(delta: dict[str, Any], output: bool) -> None:
    assert inspect_chunk(orjson.dumps(_delta_chunk(delta))).has_content is output


@pytest.mark.parametrize("chunk", [
    _delta_chunk({"content": "Hi"}),                        # the common shape
    _delta_chunk({"content": "Hi"}, "stop"),                # ... as the last one
    _delta_chunk({"content": "Hi"}) | {"model": ""},        # claims no model
    _delta_chunk({"content": "Hi"}) | {"usage": {"prompt_tokens": 1}},
    _delta_chunk({"content": ""}),
    _delta_chunk({"content": 7}),
    _delta_chunk({"refusal": "no"}),
    {"model": "m", "choices": [{"index": 0, "delta": {"content": "a"}},
                               {"index": 1, "delta": {"content": "b"}}]},
])
def test_a_plain_text_chunk_reads_as_the_general_reading_does(chunk: dict[str, Any]) -> None:
    """inspect_chunk reads the one-choice answer-text chunk (nearly every event) without
    its general loop: what it finds must be what the loop finds."""
    obj = orjson.loads(orjson.dumps(chunk))
    assert inspect_chunk(orjson.dumps(chunk)) == _of_choices(obj, obj["choices"])


def test_a_text_completion_piece_commits() -> None:
    chunk = inspect_chunk(b'{"choices": [{"text": "Once", "index": 0, "finish_reason": null}]}')
    assert chunk.has_content and chunk.text == "Once"


def _sent(event: bytes | None) -> dict[str, Any]:
    assert event is not None and event.startswith(b"data: ")
    return dict(orjson.loads(event[6:]))


def test_a_prefill_continuation_relays_no_reasoning_of_its_own() -> None:
    d = Delivered(id="up-1", created=1, pieces=["The answer"], content_chunks=2,
                  reasoning_pieces=["I think"], reasoning_chunks=1, role_sent=True)
    s = Splicer(d, PREFILL)
    assert s.feed(_delta_chunk({"reasoning_content": "Again I think"})) is None
    assert s.producing and not s.committed
    out = _sent(s.feed(_delta_chunk({"content": " is 42", "reasoning": "and so"})))
    assert out["choices"][0]["delta"] == {"content": " is 42"}
    assert d.text == "The answer is 42" and d.reasoning == "I think"


def test_a_replay_after_reasoning_only_repeats_it_exactly_then_goes_on() -> None:
    d = Delivered(id="up-1", created=1, reasoning_pieces=["Let me", " see"],
                  reasoning_chunks=2, role_sent=True)
    s = Splicer(d, REPLAY)
    assert s.feed(_delta_chunk({"reasoning_content": "Let"})) is None
    out = _sent(s.feed(_delta_chunk({"reasoning_content": " me see, then"})))
    assert out["choices"][0]["delta"] == {"reasoning_content": ", then"}
    assert _sent(s.feed(_delta_chunk({"content": "Yes"})))["choices"][0]["delta"] == \
        {"content": "Yes"}
    assert d.reasoning == "Let me see, then" and d.text == "Yes"


def test_a_replay_whose_reasoning_differs_or_falls_short_diverges() -> None:
    def fresh() -> Splicer:
        return Splicer(Delivered(reasoning_pieces=["Let me see"], reasoning_chunks=1), REPLAY)

    with pytest.raises(Diverged):
        fresh().feed(_delta_chunk({"reasoning_content": "Let us"}))
    short = fresh()
    assert short.feed(_delta_chunk({"reasoning_content": "Let me"})) is None
    with pytest.raises(Diverged):
        short.feed(_delta_chunk({"content": "Yes"}))


def test_the_simulator_refuses_an_unknown_reasoning_field() -> None:
    with pytest.raises(ValueError, match="reasoning_field"):
        Simulator("m", faults=["reasoning=1", "reasoning_field=musings"])
