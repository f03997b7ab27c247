"""Mid-stream failures: a stream cut, stalled or garbled after the client has part of the
answer is continued elsewhere into one complete answer, or fails so that SDKs raise."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.config import parse_config
from proxy.engine.record import PREFILL, REPLAY
from proxy.engine.splicing import Delivered, Diverged, Splicer
from proxy.sim.simulator import Simulator
from proxy.sim.text import answer_text
from tests.conftest import MakeProxy, MakeSim, RunningProxy, chat_body, wait_for

PROMPT = "tell me a long story"
WORDS = 60


def config_for(sims: list[tuple[Simulator, dict[str, Any]]], tmp: Path, idle_s: float = 2.0,
               **sections: Any) -> Any:
    return parse_config({
        "timeouts": sections.pop("timeouts", {"connect_s": 1, "first_byte_s": 2, "idle_s": idle_s,
                                              "total_s": 60}),
        "health": {"interval_s": 30, "timeout_s": 5, "cooldown_s": 60,
                   "max_cooldown_s": 120},
        "store": {"url": f"sqlite:///{tmp}/audit.db"},
        "models": {"main": {"instances": [f"p:s{n}" for n in range(len(sims))],
                            "strategy": "ordered"}},
        "providers": [{"provider_id": "p", "instances": [
            {"id": f"s{n}", "base_url": sim.base_url, **extra.pop("instance", {}),
             "metadata": {"model": sim.model, **extra}}
            for n, (sim, extra) in enumerate(sims)]}],
        **sections,
    }, "<test>")


class Received:
    """What an SDK client got from one streamed answer."""

    def __init__(self) -> None:
        self.text = ""
        self.ids: set[str] = set()
        self.created: set[int] = set()
        self.roles = 0
        self.finishes: list[str] = []
        self.usage: list[Any] = []
        self.headers: dict[str, str] = {}


async def stream(proxy: RunningProxy, *, prompt: str = PROMPT, **extra: Any) -> Received:
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=30)
    raw = await client.chat.completions.with_raw_response.create(
        model="main", messages=[{"role": "user", "content": prompt}], stream=True, **extra)
    got = Received()
    got.headers = dict(raw.headers)
    async for chunk in raw.parse():
        got.ids.add(chunk.id)
        got.created.add(chunk.created)
        if chunk.usage is not None:
            got.usage.append(chunk.usage)
        for choice in chunk.choices:
            if choice.delta.role:
                got.roles += 1
            got.text += choice.delta.content or ""
            if choice.finish_reason:
                got.finishes.append(choice.finish_reason)
    return got


async def events_of(proxy: RunningProxy, request_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{proxy.url}/admin/events", params={"request_id": request_id}) as resp:
        return list(reversed((await resp.json())["events"]))


def assert_one_clean_answer(got: Received, model: str = "twin") -> None:
    expected = answer_text(model, PROMPT, WORDS)
    assert got.text == expected  # complete, and no word twice or missing
    assert len(got.ids) == 1 and len(got.created) == 1
    assert got.roles == 1
    assert got.finishes == ["stop"]


async def test_cut_after_25_of_60_words_arrives_complete_and_once(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=25"])
    b = await make_sim("twin", words=WORDS)
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path))
    got = await stream(proxy)
    assert_one_clean_answer(got)
    trail = await events_of(proxy, got.headers["x-request-id"])
    resumed = [e for e in trail if e["type"] == "STREAM_RESUMED"]
    assert len(resumed) == 1
    assert resumed[0]["from_instance"] == "p:s0" and resumed[0]["to_instance"] == "p:s1"
    assert resumed[0]["detail"] == {"chars_carried": len(answer_text("twin", PROMPT, 25)),
                                    "mode": "prefill"}
    assert any(e["type"] == "REROUTED" and e["reason_code"] == "STREAM_CUT" for e in trail)


async def test_echoed_prefill_is_not_delivered_twice(make_sim: MakeSim, make_proxy: MakeProxy,
                                                     tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=25"])
    b = await make_sim("twin", words=WORDS, faults=["echo_prefill"])  # like llama.cpp
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path))
    assert_one_clean_answer(await stream(proxy))


async def test_without_prefill_or_twin_the_sdk_raises(make_sim: MakeSim, make_proxy: MakeProxy,
                                                      tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=25"])
    b = await make_sim("different", words=WORDS, prefill=False)
    proxy = await make_proxy(config_for([(a, {}), (b, {})], tmp_path))
    with pytest.raises(openai.APIError) as err:
        await stream(proxy)
    assert "could not be continued" in str(err.value)
    assert b.stats.requests == 0  # neither able to continue nor a twin: not even asked


async def test_replay_on_a_twin_without_prefill(make_sim: MakeSim, make_proxy: MakeProxy,
                                                tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=25"])
    b = await make_sim("twin", words=WORDS, prefill=False)
    proxy = await make_proxy(config_for([(a, {}), (b, {})], tmp_path))
    got = await stream(proxy)
    assert_one_clean_answer(got)
    resumed = [e for e in await events_of(proxy, got.headers["x-request-id"])
               if e["type"] == "STREAM_RESUMED"]
    assert resumed[0]["detail"]["mode"] == "replay"


async def test_a_replay_that_diverges_fails_loudly(make_sim: MakeSim, make_proxy: MakeProxy,
                                                   tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=25"])
    # Configured as the same model but really answering differently (sampling, a new
    # build...): the replay must be caught, not spliced.
    liar = await make_sim("twin", words=WORDS, prefill=False, faults=["model=twin-v2"])
    proxy = await make_proxy(config_for(
        [(a, {}), (liar, {"instance": {"fingerprint": "off"}})], tmp_path))
    received = ""
    with pytest.raises(openai.APIError) as err:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        async for chunk in await client.chat.completions.create(
                model="main", messages=[{"role": "user", "content": PROMPT}], stream=True):
            received += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert received == answer_text("twin", PROMPT, 25)  # nothing of the other answer
    assert "could not be continued" in str(err.value)


async def test_prefill_rejected_by_4xx_is_never_the_clients_error(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=25"])
    claims = await make_sim("twin", words=WORDS, prefill=False)  # says prefill, refuses it
    c = await make_sim("twin", words=WORDS)
    proxy = await make_proxy(config_for(
        [(a, {}), (claims, {"capabilities": ["prefill"]}), (c, {"capabilities": ["prefill"]})],
        tmp_path))
    got = await stream(proxy)
    assert_one_clean_answer(got)
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/admin/instances") as resp:
        rows = {r["id"]: r for r in (await resp.json())["instances"]}
    assert rows["p:s1"]["prefill"] is False  # learned, so it is not asked again


async def test_stall_longer_than_idle_is_detected_and_continued(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["stall_after=10"])
    b = await make_sim("twin", words=WORDS)
    idle = 0.5
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path,
                                        idle_s=idle))
    started = time.monotonic()
    got = await stream(proxy)
    assert_one_clean_answer(got)
    assert time.monotonic() - started < idle + 5.0  # detected at idle_s, not at a timeout
    trail = await events_of(proxy, got.headers["x-request-id"])
    assert any(e["reason_code"] == "STREAM_STALLED" for e in trail if e["type"] == "REROUTED")


@pytest.mark.parametrize("fault,reason", [("malformed_after=7", "STREAM_MALFORMED"),
                                          ("error_after=7", "UPSTREAM_ERROR"),
                                          ("no_finish", "STREAM_CUT")])
async def test_garbage_errors_and_unfinished_ends_are_continued(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path, fault: str, reason: str,
        http: aiohttp.ClientSession) -> None:
    a = await make_sim("twin", words=WORDS, faults=[fault])
    b = await make_sim("twin", words=WORDS)
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path))
    async with http.post(f"{proxy.base_url}/chat/completions",
                         json=chat_body(PROMPT, model="main", stream=True)) as resp:
        raw = await resp.read()
        request_id = resp.headers["x-request-id"]
    assert b"not json" not in raw  # a malformed chunk is never forwarded
    assert b'"error"' not in raw
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    text = ""
    for line in raw.split(b"\n\n"):
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    assert text == answer_text("twin", PROMPT, WORDS)
    trail = await events_of(proxy, request_id)
    assert any(e["reason_code"] == reason for e in trail if e["type"] == "REROUTED")


async def test_usage_is_reported_once_for_the_whole_answer(make_sim: MakeSim, make_proxy: MakeProxy,
                                                           tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=25"])
    b = await make_sim("twin", words=WORDS)
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path))
    got = await stream(proxy, stream_options={"include_usage": True})
    assert_one_clean_answer(got)
    assert len(got.usage) == 1
    usage = got.usage[0]
    assert usage.completion_tokens == WORDS  # 25 carried + 35 continued
    assert usage.prompt_tokens == len(PROMPT.split())
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_a_continuation_that_fails_moves_on(make_sim: MakeSim, make_proxy: MakeProxy,
                                                  tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=20"])
    b = await make_sim("twin", words=WORDS, faults=["die_after=10"])  # cut again
    c = await make_sim("twin", words=WORDS)
    proxy = await make_proxy(config_for(
        [(a, {}), (b, {"capabilities": ["prefill"]}), (c, {"capabilities": ["prefill"]})],
        tmp_path))
    got = await stream(proxy)
    assert_one_clean_answer(got)
    assert got.headers["x-route-instance"] == "p:s0"  # the header names who started it
    resumed = [e for e in await events_of(proxy, got.headers["x-request-id"])
               if e["type"] == "STREAM_RESUMED"]
    assert [(e["from_instance"], e["to_instance"]) for e in resumed] == [("p:s1", "p:s2")]


async def test_client_disconnect_closes_the_upstream(make_sim: MakeSim, make_proxy: MakeProxy,
                                                     tmp_path: Path) -> None:
    a = await make_sim("twin", words=400, chunk_delay=0.02)
    proxy = await make_proxy(config_for([(a, {})], tmp_path))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{proxy.base_url}/chat/completions",
                               json=chat_body(PROMPT, model="main", stream=True))
        await resp.content.readany()
        await wait_for(lambda: a.stats.open_connections >= 1, what="the upstream stream")
        resp.close()  # the client goes away mid-answer
    await wait_for(lambda: a.stats.aborted == 1, timeout=5, what="the upstream to be closed")
    # Recorded as an outcome, not held against the instance.
    from proxy.api.state import STATE
    inst = proxy.app[STATE].registry.by_id["p:s0"]
    await asyncio.sleep(0.1)
    assert inst.failures == 0 and inst.circuit.state == "closed"


# --------------------------------------------------------------------------- splicer logic


def _chunk(text: str | None = None, *, role: bool = False, finish: str | None = None,
           cid: str = "up-2", usage: dict[str, int] | None = None) -> dict[str, Any]:
    if usage is not None:
        return {"id": cid, "created": 2, "model": "m", "choices": [], "usage": usage}
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"id": cid, "created": 2, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _delivered(text: str, chunks: int = 3) -> Delivered:
    d = Delivered(id="up-1", created=1, pieces=[text], content_chunks=chunks)
    d.role_sent = True
    return d


def _sent(event: bytes | None) -> dict[str, Any]:
    assert event is not None and event.startswith(b"data: ")
    return dict(orjson.loads(event[6:]))


def test_splicer_prefill_drops_the_role_chunk_and_keeps_one_identity() -> None:
    d = _delivered("Hello wor")
    s = Splicer(d, PREFILL)
    assert s.feed(_chunk("", role=True)) is None
    out = _sent(s.feed(_chunk("ld, how")))
    assert out["id"] == "up-1" and out["created"] == 1
    assert out["choices"][0]["delta"] == {"content": "ld, how"}
    assert d.text == "Hello world, how"


def test_splicer_prefill_recognises_an_echo_split_across_chunks() -> None:
    d = _delivered("Hello world")
    s = Splicer(d, PREFILL)
    assert s.feed(_chunk("Hel")) is None
    assert s.feed(_chunk("lo wo")) is None
    out = _sent(s.feed(_chunk("rld and more")))
    assert out["choices"][0]["delta"]["content"] == " and more"
    assert _sent(s.feed(_chunk("!")))["choices"][0]["delta"]["content"] == "!"


def test_splicer_replay_checks_the_prefix_exactly() -> None:
    s = Splicer(_delivered("one two three"), REPLAY)
    assert s.feed(_chunk("one ")) is None
    assert _sent(s.feed(_chunk("two three four")))["choices"][0]["delta"]["content"] == " four"
    bad = Splicer(_delivered("one two three"), REPLAY)
    assert bad.feed(_chunk("one ")) is None
    with pytest.raises(Diverged):
        bad.feed(_chunk("tw0"))
    short = Splicer(_delivered("one two three"), REPLAY)
    with pytest.raises(Diverged):
        short.feed(_chunk("one", finish="stop"))


def test_splicer_usage_accounts_for_the_carried_part() -> None:
    s = Splicer(_delivered("abc", chunks=25), PREFILL)
    usage = _sent(s.feed(_chunk(usage={"prompt_tokens": 30, "completion_tokens": 35,
                                       "total_tokens": 65})))["usage"]
    assert usage == {"prompt_tokens": 5, "completion_tokens": 60, "total_tokens": 65}


def test_splicer_usage_in_the_finishing_chunk_accounts_for_the_carried_part() -> None:
    """llama.cpp puts `usage` beside the finish reason: the client and the audit record get
    the whole answer's figures there too."""
    s = Splicer(_delivered("abc", chunks=25), PREFILL)
    finishing = _chunk(" done", finish="stop")
    finishing["usage"] = {"prompt_tokens": 30, "completion_tokens": 35, "total_tokens": 65}
    whole = {"prompt_tokens": 5, "completion_tokens": 60, "total_tokens": 65}
    assert _sent(s.feed(finishing))["usage"] == whole
    assert s.delivered.usage == whole


async def test_client_leaving_before_the_first_byte_closes_the_upstream(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    slow = await make_sim("twin", faults=["slow_first_byte=20"])
    proxy = await make_proxy(config_for([(slow, {})], tmp_path,
                                        timeouts={"connect_s": 1, "first_byte_s": 30,
                                                  "idle_s": 30, "total_s": 60}))
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(http.post(f"{proxy.base_url}/chat/completions",
                                             json=chat_body(PROMPT, model="main", stream=True)))
        await wait_for(lambda: slow.stats.inflight == 1, what="the upstream request")
        task.cancel()  # the client gives up while the upstream is still thinking
        await asyncio.gather(task, return_exceptions=True)
    # Cancelled at once, not after the upstream's 20 s: no orphaned generation.
    await wait_for(lambda: slow.stats.inflight == 0 and slow.stats.open_connections == 0,
                   timeout=5, what="the upstream connection to close")


async def test_a_tool_call_in_flight_is_never_continued(make_sim: MakeSim, make_proxy: MakeProxy,
                                                        tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["tool_call", "die_after=10"])
    b = await make_sim("twin", words=WORDS)
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    arguments = ""
    with pytest.raises(openai.APIError) as err:
        async for chunk in await client.chat.completions.create(
                model="main", messages=[{"role": "user", "content": PROMPT}], stream=True):
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                arguments += call.function.arguments or "" if call.function else ""
    assert "a tool call was in flight" in str(err.value)
    assert arguments.startswith('{"q": "')  # half a call arrived, and it is not passed off
    assert b.stats.requests == 0


async def test_a_complete_tool_call_stream_passes_through(make_sim: MakeSim, make_proxy: MakeProxy,
                                                          tmp_path: Path) -> None:
    a = await make_sim("twin", words=12, faults=["tool_call"])
    proxy = await make_proxy(config_for([(a, {})], tmp_path))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    arguments, finishes = "", []
    async for chunk in await client.chat.completions.create(
            model="main", messages=[{"role": "user", "content": PROMPT}], stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                arguments += (call.function.arguments or "") if call.function else ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert orjson.loads(arguments) == {"q": answer_text("twin", PROMPT, 12)}
    assert finishes == ["tool_calls"]


async def test_a_text_completion_with_a_list_prompt_cut_mid_stream_fails_loudly_without_blaming_the_healthy_instance(  # noqa: E501
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("model-a", words=WORDS, faults=["die_after=25"])
    # Healthy and able to continue by prefill, but a list prompt cannot be expressed as
    # one, and it serves another model (no replay): it must be skipped, not failed.
    b = await make_sim("model-b", words=WORDS)
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.base_url}/completions", json={
                "model": "main", "prompt": [PROMPT], "stream": True}) as resp:
            assert resp.status == 200 and resp.headers["x-route-instance"] == "p:s0"
            request_id = resp.headers["x-request-id"]
            data = await resp.read()
        assert b"[DONE]" not in data  # never presented as complete
        last = orjson.loads(data.strip().rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
        message = last["error"]["message"]
        assert message.startswith("The stream from p:s0 failed")  # the one that failed
        assert "p:s1: a text completion whose prompt is not one string" in message
        assert b.stats.requests == 0
        async with http.get(f"{proxy.url}/admin/instances") as resp:
            rows = {r["id"]: r for r in (await resp.json())["instances"]}
    healthy = rows["p:s1"]
    assert healthy["circuit"] == "closed" and healthy["routable"] is True
    assert (healthy["failures"], healthy["error_rate"], healthy["last_error"]) == (0, 0, None)
    trail = await events_of(proxy, request_id)
    away = [e["reason_code"] for e in trail
            if e["type"] == "REROUTED" and e["from_instance"] == "p:s1"]
    assert away == ["UNSUPPORTED_REQUEST"]  # recorded as a skip, never as a failure
    assert rows["p:s0"]["circuit"] == "open"


async def test_a_cut_with_only_a_dead_twin_left_blames_the_instance_that_was_cut(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """The first twin is dead (its circuit opened on the refusal), the second starts the
    answer and is cut: the dead one is not tried again mid-answer, and the error names
    the instance that was cut, not the dead one."""
    dead = await make_sim("twin", words=WORDS)
    cut = await make_sim("twin", words=WORDS, faults=["die_after=10"])
    proxy = await make_proxy(config_for([(dead, {}), (cut, {})], tmp_path))
    await dead.stop()
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=30)
    raw = await client.chat.completions.with_raw_response.create(
        model="main", messages=[{"role": "user", "content": PROMPT}], stream=True)
    assert raw.headers["x-route-instance"] == "p:s1"  # s0 refused before the commit point
    with pytest.raises(openai.APIError) as raised:
        async for _ in raw.parse():
            pass
    message = raised.value.message
    assert message.startswith("The stream from p:s1 failed after the answer had started")
    assert "p:s0: circuit open" in message and "The last try" not in message
    reroutes = [(e["from_instance"], e["to_instance"], e["reason_code"])
                for e in await events_of(proxy, raw.headers["x-request-id"])
                if e["type"] == "REROUTED"]
    # The cut is recorded, and the dead twin passed over mid-answer: no attempt back to it.
    assert reroutes == [("p:s0", "p:s1", "CONN_REFUSED"), ("p:s1", None, "STREAM_CUT"),
                        ("p:s0", None, "INSTANCE_NOT_READY")]
