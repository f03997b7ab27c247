"""One attempt loop for fresh tries and continuations: a continuation of a cut stream is
an attempt like any other (it counts as in flight, waits for a concurrency slot, gets a
same-instance retry of a blip), slots are handed over when one frees (no polling), and a
half-open trial belongs to the attempt that claimed it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from proxy.api.state import STATE
from proxy.config import HealthConfig, parse_config
from proxy.failures import StreamMalformed
from proxy.health.circuit import HALF_OPEN
from proxy.health.registry import Registry
from proxy.health.slots import Slots
from tests.conftest import MakeProxy, MakeSim, chat_body, wait_for
from tests.test_midstream import WORDS, assert_one_clean_answer, config_for, events_of, stream


async def test_a_continuation_counts_as_in_flight_on_the_instance_that_continues(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=10"])
    b = await make_sim("twin", words=WORDS, chunk_delay=0.03)
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path))
    s1 = proxy.app[STATE].registry.by_id["p:s1"]
    task = asyncio.create_task(stream(proxy))
    await wait_for(lambda: b.stats.inflight == 1, what="the continuation on s1")
    assert s1.inflight == 1
    assert_one_clean_answer(await task)
    assert s1.inflight == 0


async def test_a_continuation_waits_for_a_busy_instance_slot_then_continues(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """s1 (max_concurrency 1) is busy with another stream when s0's stream is cut: the
    continuation queues for s1's slot instead of piling on, and goes ahead the moment the
    other stream ends."""
    a = await make_sim("twin", words=WORDS, faults=["die_after=10"])
    b = await make_sim("twin", words=WORDS, chunk_delay=0.01)
    proxy = await make_proxy(config_for(
        [(a, {}), (b, {"capabilities": ["prefill"], "instance": {"max_concurrency": 1}})],
        tmp_path, retry={"queue_wait_s": 20}))
    s1 = proxy.app[STATE].registry.by_id["p:s1"]
    async with aiohttp.ClientSession() as http:
        other = await http.post(f"{proxy.base_url}/chat/completions",
                                json=chat_body("hold the slot", model="p:s1", stream=True))
        assert other.headers["x-route-instance"] == "p:s1"
        await other.content.readany()  # in flight on s1, holding its one slot
        main = asyncio.create_task(stream(proxy))
        await wait_for(lambda: s1.slots.waiting == 1, what="the continuation queued for s1")
        assert (b.stats.requests, s1.inflight) == (1, 1)  # not sent past the cap
        assert (await other.read()).endswith(b"data: [DONE]\n\n")
        other.close()
        got = await main
    assert_one_clean_answer(got)
    assert b.stats.requests == 2
    resumed = [(e["from_instance"], e["to_instance"])
               for e in await events_of(proxy, got.headers["x-request-id"])
               if e["type"] == "STREAM_RESUMED"]
    assert resumed == [("p:s0", "p:s1")]


async def test_a_continuation_reset_before_anything_new_is_retried_once_on_the_same_instance(
        make_sim: MakeSim, make_proxy: MakeProxy, tmp_path: Path) -> None:
    a = await make_sim("twin", words=WORDS, faults=["die_after=10"])
    b = await make_sim("twin", words=WORDS, faults=["die_after=0", "times=1"])
    proxy = await make_proxy(config_for([(a, {}), (b, {"capabilities": ["prefill"]})], tmp_path))
    got = await stream(proxy)
    assert_one_clean_answer(got)
    assert b.stats.requests == 2  # the reset continuation, then its retry
    trail = await events_of(proxy, got.headers["x-request-id"])
    moves = [(e["type"], e["reason_code"], e["from_instance"], e["to_instance"])
             for e in trail if e["type"] in ("REROUTED", "STREAM_RESUMED")]
    assert moves == [("REROUTED", "STREAM_CUT", "p:s0", "p:s1"),
                     ("STREAM_RESUMED", None, "p:s0", "p:s1")]


# --------------------------------------------------------------------------- slots


async def test_a_freed_slot_goes_to_the_first_waiter_and_the_count_stays_exact() -> None:
    slots = Slots(1)
    assert slots.take() and not slots.take()
    first = asyncio.create_task(slots.wait(30))
    second = asyncio.create_task(slots.wait(30))
    await wait_for(lambda: slots.waiting == 2, what="two waiters")
    slots.release()
    assert await first and not second.done()
    assert slots.inflight == 1  # handed over, not freed and taken again
    slots.release()
    assert await second
    slots.release()
    assert (slots.inflight, slots.waiting) == (0, 0)


async def test_a_waiter_whose_time_runs_out_gets_no_slot() -> None:
    slots = Slots(1)
    assert slots.take()
    assert not await slots.wait(0.01)
    assert (slots.inflight, slots.waiting) == (1, 0)


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    slots = Slots(1)
    assert slots.take()
    gone = asyncio.create_task(slots.wait(30))
    await wait_for(lambda: slots.waiting == 1, what="a waiter")
    slots.release()  # handed to `gone`, which is cancelled before it runs
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert slots.inflight == 0


async def test_a_larger_max_concurrency_from_a_reload_lets_a_waiter_in() -> None:
    slots = Slots(1)
    assert slots.take()
    waiter = asyncio.create_task(slots.wait(30))
    await wait_for(lambda: slots.waiting == 1, what="a waiter")
    slots.resize(2)
    assert await waiter
    assert slots.inflight == 2


def test_the_last_candidate_forces_a_slot_past_the_cap_and_gives_it_back() -> None:
    slots = Slots(1)
    assert slots.take()
    slots.force()
    assert slots.inflight == 2
    slots.release()
    slots.release()
    assert slots.inflight == 0


# --------------------------------------------------------------------------- trials


def half_open_registry() -> Registry:
    config = parse_config({"providers": [{"provider_id": "p", "instances": [
        {"id": "s0", "base_url": "http://127.0.0.1:9"}]}]})
    registry = Registry(config.instances, HealthConfig(failure_threshold=1))
    # Open, and half-open at once: no cooldown (the config's least is 10 ms, a wait).
    registry.states[0].circuit.base_cooldown_s = 0.0
    registry.record_failure(registry.states[0], StreamMalformed("garbled"))
    return registry


def test_a_half_open_trial_belongs_to_the_attempt_that_claimed_it() -> None:
    registry = half_open_registry()
    inst = registry.states[0]
    trial, last_resort = object(), object()
    assert registry.admit(inst, False, trial) is None
    assert inst.circuit.state == HALF_OPEN
    assert registry.admit(inst, False, object()) == "circuit half_open"  # one at a time
    # A last resort goes through anyway, and its end does not free another's trial.
    assert registry.admit(inst, True, last_resort) is None
    registry.take_slot(inst)
    registry.end_attempt(inst, last_resort)
    assert inst.circuit.trial_owner is trial


def test_a_trial_claimed_by_an_attempt_that_found_no_slot_is_given_back() -> None:
    registry = half_open_registry()
    inst = registry.states[0]
    busy = object()
    assert registry.admit(inst, False, busy) is None
    registry.withdraw(inst, busy)  # INSTANCE_BUSY: it never went ahead
    assert registry.admit(inst, False, object()) is None  # the next one may try
