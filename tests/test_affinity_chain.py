"""The prompt's hash chain as planning computes it (a few keys, on demand) against every
key computed in one pass, and the store's search through the middle of a chain."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.api.inbound import CHAT, COMPLETIONS, parse_request
from proxy.routing.affinity import LocalPrefixStore
from proxy.routing.chain import MAX_BYTES, MAX_PARTS, TAIL, prefix_of
from tests.test_balance import SYSTEM, chat, conversation, planner


def fresh_keys(messages: list[dict[str, Any]], order: list[int]) -> list[int]:
    """The keys of a new chain of `messages`, asked for one by one in `order`."""
    prefix = prefix_of(chat(messages))
    assert prefix is not None
    return [prefix.chain[i] for i in order]


def test_keys_asked_for_one_by_one_in_any_order_equal_the_keys_of_one_pass() -> None:
    tricky: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": "a\n  },\n  {\n b"},
                                     {"type": "text", "text": "two parts"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "}\n  },\n  {"},
        {"content": "keys in another order", "role": "user"},
        *conversation(6)[1:],
    ]
    whole = prefix_of(chat(tricky))
    assert whole is not None
    keys, n = whole.keys, len(tricky)
    assert len(keys) == len(whole.chain) == n  # one key per message, however nested
    assert whole.ends[-1] == whole.total
    for order in (list(range(n)), list(range(n - 1, -1, -1)), [n - 1, 0, n // 2, n - 2, 1]):
        assert fresh_keys(tricky, order) == [keys[i] for i in order]
    # A grown conversation keeps every key of the shorter one, the tip included.
    assert fresh_keys(tricky + [{"role": "user", "content": "more"}], list(range(n))) \
        == list(keys)


def test_a_prompt_cut_at_max_parts_or_max_bytes_keeps_the_keys_of_its_beginning() -> None:
    many = [{"role": "user", "content": f"message {n}"} for n in range(MAX_PARTS + 20)]
    long = prefix_of(chat(many))
    shorter = prefix_of(chat(many[:MAX_PARTS]))
    assert long is not None and shorter is not None
    assert len(long.keys) == MAX_PARTS
    assert long.keys[:MAX_PARTS - 1] == shorter.keys[:MAX_PARTS - 1]
    huge = [{"role": "user", "content": "x" * (MAX_BYTES // 4)} for _ in range(6)]
    cut = prefix_of(chat(huge))
    cut_longer = prefix_of(chat([*huge, {"role": "user", "content": "more"}]))
    assert cut is not None and cut_longer is not None
    assert cut.total == MAX_BYTES and cut.keys == cut_longer.keys


def test_a_branch_from_the_middle_of_a_long_conversation_finds_its_shared_beginning() -> None:
    p = planner()
    history = conversation(12)
    p.served(p.plan(chat(history), {}), "llamacpp:gpu2")
    # The same first 9 messages, then another way: beyond the TAIL looked at one by one.
    branched = history[:9] + [{"role": "user", "content": f"instead {n}" * 40}
                              for n in range(TAIL + 3)]
    plan = p.plan(chat(branched), {})
    assert plan.selected == "llamacpp:gpu2"
    assert plan.prefix is not None
    share = plan.prefix.ends[8] / plan.prefix.total
    assert f"prefix_hit={share:.2f}" in plan.reasons["llamacpp:gpu2"]
    # A new conversation with nothing known at its shortest key looks no further.
    other = p.plan(chat([{"role": "system", "content": "another task " * 60},
                         *branched[1:]]), {})
    assert not any(r.startswith("prefix_hit") for rs in other.reasons.values() for r in rs)


def test_the_store_searches_the_middle_of_a_chain_by_halves() -> None:
    store = LocalPrefixStore(ttl_s=10, max_entries=1000)
    store.remember(list(range(1, 21)), "x", now=0.0)
    asked = list(range(1, 14)) + list(range(100, 110))  # known up to index 12
    assert store.longest(asked, 2, now=1.0) == (12, ("x",))
    assert store.longest(asked, 13, now=1.0) is None  # nothing that long is known
    assert store.longest(list(range(1, 21)), 0, now=1.0) == (19, ("x",))


def test_a_text_completion_and_tools_chain_as_before() -> None:
    body = {"model": "auto", "messages": conversation(2),
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    tooled = prefix_of(parse_request(CHAT, orjson.dumps(body), "r"))
    plain = prefix_of(chat(conversation(2)))
    assert tooled is not None and plain is not None
    assert tooled.ends == plain.ends and not set(tooled.keys) & set(plain.keys)
    assert [tooled.chain[i] for i in (3, 0)] == [tooled.keys[3], tooled.keys[0]]


def test_a_prompt_shorter_than_the_least_worth_remembering_gets_no_chain() -> None:
    chat_request = chat(conversation(2))
    text_request = parse_request(COMPLETIONS, orjson.dumps(
        {"model": "auto", "prompt": "Once upon a time " * 100}), "r")
    for req in (chat_request, text_request):
        whole = prefix_of(req)
        assert whole is not None
        at_least = prefix_of(req, whole.total)  # exactly long enough: the same chain
        assert at_least is not None and at_least.keys == whole.keys
        assert prefix_of(req, whole.total + 1) is None
    # The planner asks for min_prefix_chars: a short prompt's plan has no chain at all.
    p = planner()
    short = chat([{"role": "user", "content": "hi"}])
    assert prefix_of(short) is not None and p.plan(short, {}).prefix is None
    assert p.plan(chat_request, {}).prefix is not None
