"""Load-aware planning and prefix-cache affinity, with no server: the terms, their reasons,
the prefix chain and its memory, and what the prober reads from servers' own figures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from proxy.api.inbound import CHAT, COMPLETIONS, ClientRequest, parse_request
from proxy.config import Config, ConfigError, parse_config
from proxy.fronts.base import Front
from proxy.fronts.messages import MessagesFront
from proxy.fronts.responses import ResponsesFront
from proxy.health.registry import Registry
from proxy.health.states import READY
from proxy.providers.load import (
    LLAMACPP_RUNNING,
    LLAMACPP_WAITING,
    VLLM_RUNNING,
    VLLM_WAITING,
    ServerLoad,
    from_metrics,
    from_slots,
    total_slots,
)
from proxy.routing.affinity import Affinity, LocalPrefixStore, decode_chain, encode_chain
from proxy.routing.chain import CHUNK_BYTES, MAX_PARTS, prefix_of
from proxy.routing.planner import Planner

SYSTEM = "You are a careful assistant for a team that runs model servers. " * 12


def config(n: int = 3, **routing: Any) -> Config:
    return parse_config({
        "routing": routing,
        "providers": [{"provider_id": "llamacpp", "instances": [
            {"id": f"gpu{i}", "base_url": f"http://10.0.0.{i + 1}:8080/v1",
             "metadata": {"model": "qwen"}} for i in range(n)]}]}, "<test>")


def planner(cfg: Config | None = None) -> Planner:
    cfg = cfg or config()
    registry = Registry(cfg.instances)
    for inst in registry.states:
        registry.probed(inst, READY, "healthy", 1.0, (), ServerLoad(4, 0, 0))
    return Planner(cfg, registry)


def conversation(turns: int, tag: str = "a") -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for n in range(turns):
        messages.append({"role": "user", "content": f"question {tag}{n}: " + "why? " * 30})
        if n < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {tag}{n} " * 20})
    return messages


def chat(messages: list[dict[str, str]]) -> ClientRequest:
    return parse_request(CHAT, orjson.dumps({"model": "auto", "messages": messages}), "r")


def occupy(p: Planner, inst_id: str, n: int) -> None:
    for _ in range(n):
        assert p.registry.take_slot(p.registry.by_id[inst_id])


# --------------------------------------------------------------------------- load


def test_equal_instances_take_turns_by_load_and_ties_keep_config_order() -> None:
    p = planner()
    chosen = []
    for _ in range(6):
        plan = p.plan(chat(conversation(1)), {})
        assert plan.selected is not None
        chosen.append(plan.selected)
        occupy(p, plan.selected, 1)
    assert chosen == ["llamacpp:gpu0", "llamacpp:gpu1", "llamacpp:gpu2"] * 2
    assert "load=2/4" in p.plan(chat(conversation(1)), {}).reasons["llamacpp:gpu0"]


def test_server_reported_busy_slots_and_queue_count_as_load() -> None:
    p = planner()
    first = p.registry.by_id["llamacpp:gpu0"]
    p.registry.probed(first, READY, "healthy", 1.0, (), ServerLoad(4, 3, 2))
    plan = p.plan(chat(conversation(1)), {})
    assert plan.selected == "llamacpp:gpu1"
    reasons = plan.reasons["llamacpp:gpu0"]
    assert "load=3/4" in reasons and "queue=2" in reasons
    # Its own count counts when larger than what the server said at the last probe.
    occupy(p, "llamacpp:gpu1", 4)
    assert "load=4/4" in p.plan(chat(conversation(1)), {}).reasons["llamacpp:gpu1"]


def test_config_order_balance_ignores_load() -> None:
    p = planner(config(balance="config_order"))
    occupy(p, "llamacpp:gpu0", 3)
    plan = p.plan(chat(conversation(1)), {})
    assert plan.selected == "llamacpp:gpu0"
    assert not any(r.startswith("load=") for r in plan.reasons["llamacpp:gpu0"])


def test_capacity_is_the_smaller_of_max_concurrency_and_the_servers_slots() -> None:
    cfg = parse_config({"providers": [{"provider_id": "llamacpp", "instances": [
        {"id": "a", "base_url": "http://10.0.0.1:8080/v1", "max_concurrency": 2}]}]}, "<t>")
    registry = Registry(cfg.instances)
    inst = registry.states[0]
    assert inst.capacity == 2
    registry.probed(inst, READY, "healthy", 1.0, (), ServerLoad(slots=1))
    assert inst.capacity == 1
    registry.probed(inst, "DOWN", "refused", 1.0, (), None)  # slots are kept while down
    assert inst.capacity == 1 and inst.server_busy == 0


def test_a_busy_local_server_still_comes_before_an_idle_cloud_one() -> None:
    cfg = parse_config({"providers": [
        {"provider_id": "llamacpp", "instances": [{"id": "a", "base_url": "http://10.0.0.1:8080/v1"}]},
        {"provider_id": "openai", "local": False, "api_key": "k", "instances": [
            {"id": "default", "base_url": "https://api.openai.com/v1",
             "metadata": {"cost": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}}]}]}, "<t>")
    p = planner(cfg)
    occupy(p, "llamacpp:a", 4)
    assert p.plan(chat(conversation(1)), {}).selected == "llamacpp:a"


@pytest.mark.parametrize("routing, expected", [
    ({"balance": "round_robin"}, "routing.balance: expected one of least_loaded, config_order"),
    ({"affinity": {"ttl_s": -1}}, "routing.affinity.ttl_s"),
    ({"affinity": {"max_entries": 0}}, "routing.affinity.max_entries"),
    ({"affinity": {"sticky": True}}, "routing.affinity.sticky"),
])
def test_bad_routing_balance_and_affinity_settings_are_config_errors(
        routing: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(**routing)
    assert expected in str(err.value)


# --------------------------------------------------------------------------- server figures

LLAMACPP_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 123
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 3
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
"""

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 5.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 4.0
"""


def test_llamacpp_and_vllm_metrics_are_read_as_running_and_waiting() -> None:
    assert from_metrics(LLAMACPP_METRICS, LLAMACPP_RUNNING, LLAMACPP_WAITING) == (3, 2)
    assert from_metrics(VLLM_METRICS, VLLM_RUNNING, VLLM_WAITING) == (7, 4)
    assert from_metrics(VLLM_METRICS, LLAMACPP_RUNNING, LLAMACPP_WAITING) is None
    assert from_metrics("not { prometheus", VLLM_RUNNING, VLLM_WAITING) is None


def test_llamacpp_slots_and_props_are_read_as_slots_and_busy() -> None:
    slots = [{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False},
             {"id": 2, "is_processing": True}, "junk"]
    assert from_slots(slots) == (4, 2)
    assert from_slots({"error": "not supported"}) is None
    assert total_slots({"total_slots": 4}) == 4
    assert total_slots({"total_slots": True}) is None
    assert total_slots({"total_slots": 0}) is None


# --------------------------------------------------------------------------- the prefix chain


def test_a_growing_conversation_keeps_the_keys_of_its_history() -> None:
    two, three = prefix_of(chat(conversation(2))), prefix_of(chat(conversation(3)))
    assert two is not None and three is not None
    assert three.keys[:len(two.keys)] == two.keys
    assert three.ends[:len(two.ends)] == two.ends
    other = prefix_of(chat(conversation(2, tag="b")))
    assert other is not None
    assert other.keys[0] == two.keys[0]  # the same system prompt
    assert other.keys[1] != two.keys[1]


def test_an_edited_earlier_message_breaks_the_chain_from_there() -> None:
    history = conversation(3)
    edited = [dict(m) for m in history]
    edited[1]["content"] += "!"
    a, b = prefix_of(chat(history)), prefix_of(chat(edited))
    assert a is not None and b is not None
    assert a.keys[0] == b.keys[0] and not set(a.keys[1:]) & set(b.keys[1:])


def test_a_long_message_is_hashed_whole() -> None:
    long = "x" * 4096
    base = prefix_of(chat([{"role": "user", "content": long}]))
    longer = prefix_of(chat([{"role": "user", "content": long + "y"}]))
    tail = prefix_of(chat([{"role": "user", "content": long[:-1] + "y"}]))
    middle = prefix_of(chat([{"role": "user", "content": long[:2000] + "y" + long[2001:]}]))
    assert base is not None and longer is not None and tail is not None and middle is not None
    assert len({base.keys[0], longer.keys[0], tail.keys[0], middle.keys[0]}) == 4
    assert base.ends[-1] > 4096  # it stands for the whole text


def test_tools_change_every_key_of_the_chain() -> None:
    plain = prefix_of(chat(conversation(1)))
    body = {"model": "auto", "messages": conversation(1),
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    tooled = prefix_of(parse_request(CHAT, orjson.dumps(body), "r"))
    assert plain is not None and tooled is not None
    assert not set(plain.keys) & set(tooled.keys)


def test_the_responses_and_messages_fronts_chain_their_history_like_chat() -> None:
    cfg = config()
    system = "You review diffs. " * 40
    turns: list[dict[str, Any]] = [{"role": "user", "content": "first question"}]
    grown = [*turns, {"role": "assistant", "content": "first answer"},
             {"role": "user", "content": "second question"}]
    def messages(ms: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": "auto", "max_tokens": 16, "system": system, "messages": ms}

    def responses(ms: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": "auto", "instructions": system, "input": ms}

    fronts: list[tuple[Front, Callable[[list[dict[str, Any]]], dict[str, Any]]]] = [
        (MessagesFront(), messages), (ResponsesFront(), responses)]
    for front, shape in fronts:
        one = prefix_of(front.exchange(orjson.dumps(shape(turns)), "r", cfg).request)
        two = prefix_of(front.exchange(orjson.dumps(shape(grown)), "r", cfg).request)
        assert one is not None and two is not None
        assert two.keys[:len(one.keys)] == one.keys, type(front).__name__
        assert len(two.keys) > len(one.keys)


def test_a_text_prompt_is_chained_in_chunks_and_a_long_one_is_bounded() -> None:
    def completion(prompt: str) -> ClientRequest:
        return parse_request(COMPLETIONS, orjson.dumps({"model": "auto", "prompt": prompt}), "r")

    short = prefix_of(completion("a" * (CHUNK_BYTES * 2 + 10)))
    longer = prefix_of(completion("a" * (CHUNK_BYTES * 3)))
    assert short is not None and longer is not None
    assert len(short.keys) == 3 and short.ends[-1] == CHUNK_BYTES * 2 + 10
    assert longer.keys[:2] == short.keys[:2]
    huge = prefix_of(completion("b" * (CHUNK_BYTES * (MAX_PARTS + 50))))
    assert huge is not None and len(huge.keys) == MAX_PARTS


def test_the_store_forgets_expired_and_oldest_prefixes() -> None:
    store = LocalPrefixStore(ttl_s=10, max_entries=3)
    store.remember([1, 2], "x", now=0.0)
    assert store.longest([1, 2, 3], 0, now=5.0) == (1, ("x",))
    assert store.longest([1, 2, 3], 1, now=5.0) == (1, ("x",))
    assert store.longest([1, 2, 3], 2, now=5.0) is None  # shorter than asked for
    assert store.longest([1, 2, 3], 0, now=10.0) is None  # expired
    store.remember([11, 12, 13, 14], "y", now=20.0)
    assert len(store) == 3
    assert store.longest([11], 0, now=21.0) is None  # the oldest went first
    assert store.longest([11, 12], 0, now=21.0) == (1, ("y",))


def test_the_store_knows_every_instance_that_has_a_prefix_and_each_ones_conversations() -> None:
    store = LocalPrefixStore(ttl_s=10, max_entries=100)
    store.remember([1, 2], "x", now=0.0)  # a system prompt, then conversation 2
    assert store.longest([1, 4], 0, now=0.5) == (0, ("x",))
    store.remember([1, 3], "y", now=1.0)  # the same system prompt, conversation 3
    assert store.longest([1, 4], 0, now=2.0) is None  # shared: says nothing of where to go
    assert store.longest([1, 2, 9], 0, now=2.0) == (1, ("x",))
    assert store.resident("x") == store.resident("y") == 1
    store.remember([1, 2, 5, 6], "x", now=2.0)  # conversation 2 grew on x
    assert store.resident("x") == 1
    store.remember([1, 3, 7, 8], "x", now=3.0)  # conversation 3 moved to x
    assert (store.resident("x"), store.resident("y")) == (2, 0)


# --------------------------------------------------------------------------- affinity in plans


def test_the_next_turn_goes_back_to_the_instance_that_served_its_prefix() -> None:
    p = planner()
    first = p.plan(chat(conversation(1)), {})
    assert first.selected == "llamacpp:gpu0"
    p.served(first, "llamacpp:gpu2")  # gpu2 answered it (say gpu0 failed)
    second = p.plan(chat(conversation(2)), {})
    assert second.selected == "llamacpp:gpu2"
    hit = [r for r in second.reasons["llamacpp:gpu2"] if r.startswith("prefix_hit=")]
    assert len(hit) == 1 and 0.5 < float(hit[0].split("=")[1]) < 1.0
    assert not any(r.startswith("prefix_hit") for r in second.reasons["llamacpp:gpu0"])


def test_a_shared_system_prompt_favours_no_one_and_new_conversations_spread() -> None:
    p = planner()
    chosen = []
    for tag in "abcdef":  # one at a time: nothing is ever in flight when planning
        plan = p.plan(chat(conversation(1, tag)), {})
        assert plan.selected is not None
        chosen.append(plan.selected)
        p.served(plan, plan.selected)
    # The second goes where the system prompt is; from the third on, that prompt is known
    # to be shared, and conversations go where fewer are kept.
    assert chosen == ["llamacpp:gpu0", "llamacpp:gpu0", "llamacpp:gpu1", "llamacpp:gpu2",
                      "llamacpp:gpu1", "llamacpp:gpu2"]
    plan = p.plan(chat(conversation(1, "g")), {})
    assert not any(r.startswith("prefix_hit=") for rs in plan.reasons.values() for r in rs)
    assert all("resident=2" in plan.reasons[f"llamacpp:gpu{n}"] for n in range(3))


def test_affinity_beats_a_lighter_load_but_not_a_full_server() -> None:
    p = planner()
    p.served(p.plan(chat(conversation(1)), {}), "llamacpp:gpu1")
    occupy(p, "llamacpp:gpu1", 3)
    assert p.plan(chat(conversation(2)), {}).selected == "llamacpp:gpu1"
    occupy(p, "llamacpp:gpu1", 1)  # 4/4: the cached prefix would wait for a slot
    plan = p.plan(chat(conversation(2)), {})
    assert plan.selected == "llamacpp:gpu0"
    assert any(r.startswith("prefix_hit=") and r.endswith("(busy)")
               for r in plan.reasons["llamacpp:gpu1"])


def test_a_session_wins_over_affinity() -> None:
    p = planner()
    headers = {"x-session-id": "alice"}
    p.served(p.plan(chat(conversation(1)), headers), "llamacpp:gpu1")  # alice is on gpu1
    p.served(p.plan(chat(conversation(2)), {}), "llamacpp:gpu2")  # the prefix now on gpu2
    plan = p.plan(chat(conversation(3)), headers)
    assert plan.selected == "llamacpp:gpu1"
    assert not any(r.startswith("prefix_hit") for rs in plan.reasons.values() for r in rs)


def test_a_short_prefix_earns_nothing_and_affinity_can_be_off() -> None:
    p = planner(config(affinity={"min_prefix_chars": 100_000}))
    p.served(p.plan(chat(conversation(1)), {}), "llamacpp:gpu2")
    assert p.plan(chat(conversation(2)), {}).selected == "llamacpp:gpu0"
    off = planner(config(affinity={"enabled": False}))
    off.served(off.plan(chat(conversation(1)), {}), "llamacpp:gpu2")
    plan = off.plan(chat(conversation(2)), {})
    assert plan.selected == "llamacpp:gpu0" and plan.prefix is None


def test_the_same_state_gives_the_same_plan_for_ten_instances() -> None:
    p = planner(config(10))
    p.served(p.plan(chat(conversation(4)), {}), "llamacpp:gpu7")
    occupy(p, "llamacpp:gpu3", 2)
    a, b = p.plan(chat(conversation(5)), {}), p.plan(chat(conversation(5)), {})
    assert a.selected == b.selected == "llamacpp:gpu7"
    assert [a.selected, *a.fallback] == [b.selected, *b.fallback]
    assert a.reasons == b.reasons


def test_a_hash_chain_travels_to_another_replica_as_text_and_back() -> None:
    told: list[tuple[str, str, float]] = []
    here = Affinity(True, 60.0, 1000, 0)
    there = Affinity(True, 60.0, 1000, 0)
    here.on_remember = lambda chain, inst, ttl: told.append((chain, inst, ttl))
    keys = (0, 1, 0xFFFFFFFF_FFFF, 12345)
    assert decode_chain(encode_chain(keys)) == keys
    for garbage in ("", "zz", "1,,2", ",".join(["1"] * 1000)):
        assert decode_chain(garbage) is None
        there.adopt(garbage, "x", 100.0)  # ignored, never raises
    prefix = prefix_of(chat(conversation(3)))
    assert prefix is not None
    here.served(prefix, "local:b", now=0.0)
    assert len(told) == 1 and told[0][1:] == ("local:b", 60.0)
    there.adopt(told[0][0], "local:b", 60.0)
    assert there.hit(prefix, 1.0) == (("local:b",), 1.0)
    assert there.hit(prefix, 61.0) is None  # the TTL travels with it
