"""Property tests of the prompt's hash chain (proxy.routing.chain): for any body the
inbound parser accepts, every key, end and `first_at_least` asked for lazily (in any
order, on a fresh chain) equals the full pass (`all()`/`ends()`), and planning with
affinity never raises."""

from __future__ import annotations

import bisect
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.api.errors import BadRequest
from proxy.api.inbound import CHAT, COMPLETIONS, ClientRequest, parse_request
from proxy.fronts.messages import MESSAGES
from proxy.fronts.responses import RESPONSES
from proxy.routing.affinity import LocalPrefixStore
from proxy.routing.chain import CHUNK_BYTES, MAX_BYTES, MAX_PARTS, MESSAGE_END, prefix_of
from tests.test_balance import config, planner

#: Text that looks like the chain's own boundaries once serialised, and non-ASCII.
_TRICKY = st.sampled_from(["\n  },\n  {\n", "}", "},", "\n  }", "  },\n  {", "\"}",
                           "é", "日本", "\U0001f600", "\\", "\u2028", "\x00", ""])
_TEXT = st.lists(st.one_of(_TRICKY, st.text(max_size=30)), max_size=6).map("".join)
_CONTENT = st.one_of(
    _TEXT, st.none(),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}), max_size=3))
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _CONTENT},
    optional={"name": _TEXT, "tool_calls": st.lists(st.fixed_dictionaries(
        {"id": _TEXT, "type": st.just("function"),
         "function": st.fixed_dictionaries({"name": _TEXT, "arguments": _TEXT})}),
        max_size=2)})
_TOOLS = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function":
                                         st.fixed_dictionaries({"name": _TEXT})}), max_size=2)


def _messages(count: st.SearchStrategy[int]) -> st.SearchStrategy[list[dict[str, Any]]]:
    """`count` messages: a few drawn in full, the rest short copies (fast to draw)."""
    return st.tuples(count, st.lists(_MESSAGE, min_size=1, max_size=4)).map(
        lambda pair: [dict(pair[1][i % len(pair[1])], n=i) for i in range(pair[0])])


_COUNTS = st.one_of(st.integers(1, 8), st.sampled_from(
    [MAX_PARTS - 1, MAX_PARTS, MAX_PARTS + 1, MAX_PARTS + 7]))
_CHAT = st.fixed_dictionaries({"model": st.just("auto"), "messages": _messages(_COUNTS)},
                              optional={"tools": _TOOLS, "functions": _TOOLS})
_SIZES = st.one_of(st.integers(0, 40), st.sampled_from(
    [CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES - 1,
     CHUNK_BYTES * MAX_PARTS, CHUNK_BYTES * MAX_PARTS + 1]))
_PROMPT = st.one_of(
    st.tuples(_SIZES, st.sampled_from(["a", "é", "\U0001f600", "}\n"])).map(
        lambda pair: (pair[1] * pair[0])[:pair[0]]),
    _TEXT,
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=300),
    st.lists(_TEXT, max_size=5),
    st.lists(st.lists(st.integers(0, 50_000), max_size=5), max_size=3))
_COMPLETION = st.fixed_dictionaries({"model": st.just("auto"), "prompt": _PROMPT})


def _request(endpoint: str, body: dict[str, Any]) -> ClientRequest | None:
    try:
        return parse_request(endpoint, orjson.dumps(body), "r")
    except BadRequest:
        return None


def check_lazy_equals_full(req: ClientRequest, order: list[int], least: list[int]) -> None:
    """Every key and end asked for lazily, in `order` (indices, negative too), equals the
    full pass of another chain of the same request; so does `first_at_least`."""
    full = prefix_of(req)
    if full is None:
        return
    keys, ends = full.keys, full.ends
    n = len(keys)
    assert n == len(ends) == len(full.chain) and 1 <= n <= MAX_PARTS
    assert list(ends) == sorted(set(ends)) and ends[-1] == full.total <= MAX_BYTES
    for how in ("key", "end", "least"):
        lazy = prefix_of(req)
        assert lazy is not None
        chain = lazy.chain
        assert len(chain) == n and chain.total == full.total
        for i in order:
            if not -n <= i < n:  # out of range: IndexError, as from the full pass
                with pytest.raises(IndexError):
                    chain.end(i)
                with pytest.raises(IndexError):
                    chain[i]
                continue
            if how == "key":
                assert chain[i] == keys[i], (i, n)
            elif how == "end":
                assert chain.end(i) == ends[i], (i, n)
            else:
                for want in least:
                    at = bisect.bisect_left(ends, want)
                    assert chain.first_at_least(want) == (at if at < n else None), want
                assert chain[i] == keys[i], (i, n)
        assert chain.all() == keys


def check_store(req: ClientRequest, cut: int) -> None:
    """The store finds the longest remembered prefix of a chain asked lazily."""
    full = prefix_of(req)
    if full is None:
        return
    keys = full.keys
    store = LocalPrefixStore(60, 100_000)
    store.remember(keys[:cut + 1], "i", 0.0)
    lazy = prefix_of(req)
    assert lazy is not None
    found = store.longest(lazy.chain, 0, 1.0)
    assert found is not None and found[0] == min(cut, len(keys) - 1)


_ORDER = st.lists(st.one_of(st.integers(-(MAX_PARTS + 2), MAX_PARTS + 2),
                            st.integers(-10, 10)), max_size=12)
_LEAST = st.lists(st.integers(-1, MAX_BYTES + 1), max_size=4)
_FAST = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_FAST
@given(_CHAT, _ORDER, _LEAST, st.integers(0, MAX_PARTS))
def test_any_accepted_chat_body_chains_lazily_as_in_one_pass(
        body: dict[str, Any], order: list[int], least: list[int], cut: int) -> None:
    req = _request(CHAT, body)
    if req is None:
        return
    check_lazy_equals_full(req, order, least)
    check_store(req, cut)
    # A conversation that grows a turn keeps every key of its history (the tip too).
    grown = _request(CHAT, dict(body, messages=[*body["messages"],
                                                {"role": "user", "content": "more"}]))
    assert grown is not None
    short, long = prefix_of(req), prefix_of(grown)
    assert short is not None and long is not None
    assert long.keys[:len(short.keys)] == short.keys


@_FAST
@given(_COMPLETION, _ORDER, _LEAST, st.integers(0, MAX_PARTS))
def test_any_accepted_completion_prompt_chains_lazily_as_in_one_pass(
        body: dict[str, Any], order: list[int], least: list[int], cut: int) -> None:
    req = _request(COMPLETIONS, body)
    if req is not None:
        check_lazy_equals_full(req, order, least)
        check_store(req, cut)


def test_max_bytes_cut_at_every_offset_around_a_message_boundary() -> None:
    """A body cut by MAX_BYTES inside a message, just after its `}` and at every byte of
    the boundary between two messages."""
    filler = {"role": "user", "content": "x" * 1000}
    head = orjson.dumps([filler] * 3, option=orjson.OPT_INDENT_2)
    first_end = head.find(MESSAGE_END)
    for shift in range(-3, len(MESSAGE_END) + 4):
        # The first message's `}` ends `shift` bytes before MAX_BYTES is reached.
        pad = MAX_BYTES - (first_end + 4) - shift
        messages = [dict(filler, content="x" * (1000 + pad)), filler, filler]
        req = _request(CHAT, {"model": "auto", "messages": messages})
        assert req is not None
        check_lazy_equals_full(req, [0, 1, 2, -1, -2, 5], [0, 1, MAX_BYTES - 20, MAX_BYTES])


@_FAST
@given(st.one_of(st.tuples(st.just(CHAT), _CHAT), st.tuples(st.just(COMPLETIONS), _COMPLETION)),
       st.integers(0, 3))
def test_planning_any_accepted_body_twice_with_affinity_never_raises(
        case: tuple[str, dict[str, Any]], answered_by: int) -> None:
    """Plan, tell the planner who answered, plan again (the chain is known now: the
    lookup finds it): no exception, and the second plan puts that instance first when the
    prompt is long enough to be worth it."""
    endpoint, body = case
    req = _request(endpoint, body)
    if req is None:
        return
    p = planner()
    first = p.plan(req, {})
    instance = first.candidates[answered_by % len(first.candidates)].id
    p.served(first, instance)
    again = p.plan(req, {})
    if first.prefix is not None and first.prefix.total >= 4 * p.affinity.min_prefix_chars:
        assert again.candidates[0].id == instance


_BLOCKS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}), max_size=3)
_ANTHROPIC = st.fixed_dictionaries(
    {"model": st.just("auto"), "max_tokens": st.just(8), "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                               "content": st.one_of(_TEXT, _BLOCKS)}), max_size=6)},
    optional={"system": st.one_of(_TEXT, _BLOCKS)})
_RESPONSES = st.fixed_dictionaries(
    {"model": st.just("auto"), "input": st.one_of(_TEXT, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "developer"]),
         "content": _TEXT}), max_size=6))},
    optional={"instructions": _TEXT})


@_FAST
@given(st.one_of(st.tuples(st.just(MESSAGES), _ANTHROPIC),
                 st.tuples(st.just(RESPONSES), _RESPONSES)), _ORDER, _LEAST)
def test_any_accepted_messages_or_responses_body_chains_lazily_as_in_one_pass(
        case: tuple[Any, dict[str, Any]], order: list[int], least: list[int]) -> None:
    """The Messages and Responses fronts' translated chat messages (an empty system
    prompt, an empty turn) chain like a chat request's, and are planned."""
    front, body = case
    try:
        exchange = front.exchange(orjson.dumps(body), "r", config())
    except BadRequest:
        return
    req = exchange.request
    check_lazy_equals_full(req, order, least)
    p = planner()
    p.served(p.plan(req, {}), "llamacpp:gpu1")
    p.plan(req, {})


def peak_bytes_of_chaining(endpoint: str, body: dict[str, Any]) -> int:
    """The most memory (bytes, tracemalloc) `prefix_of` and planning's first questions
    hold at once: a measure of the work they do, without a clock."""
    req = _request(endpoint, body)
    assert req is not None
    tracemalloc.start()
    try:
        prefix = prefix_of(req)
        assert prefix is not None
        prefix.chain.first_at_least(1024)
        prefix.chain[-1]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_long_prompt_costs_what_its_hashed_beginning_costs() -> None:
    """Only MAX_PARTS messages and the first hashed bytes of a text prompt are ever
    hashed: 10 000 messages, a 4 MiB message after the first MAX_PARTS, a million token
    ids or 7 MiB of text cost no more to chain than the part of them that is hashed
    (they were serialised whole: for the token ids 20 ms, and 250 MB allocated, though
    not all touched, by orjson's buffer)."""
    messages = [{"role": "user", "content": "hi"}] * 10_000
    past_the_parts = [*messages[:MAX_PARTS], {"role": "user", "content": "x" * (4 << 20)}]
    ids, text = list(range(1_000_000)), "é" * (7 << 19)
    hashed = CHUNK_BYTES * MAX_PARTS  # bytes of a text prompt
    for endpoint, field, long, beginning in (
            (CHAT, "messages", messages, messages[:MAX_PARTS]),
            (CHAT, "messages", past_the_parts, messages[:MAX_PARTS]),
            (COMPLETIONS, "prompt", ids, ids[:hashed // 2 + 1]),  # (two bytes an id)
            (COMPLETIONS, "prompt", text, text[:hashed])):
        cost = peak_bytes_of_chaining(endpoint, {"model": "auto", field: long})
        baseline = peak_bytes_of_chaining(endpoint, {"model": "auto", field: beginning})
        assert cost < 2 * baseline, (endpoint, type(long), cost, baseline)


def test_a_long_prompt_keeps_the_keys_of_its_hashed_beginning() -> None:
    """Not serialising the rest changes no key: a longer prompt's keys are those of its
    beginning."""
    ids = list(range(300_000))
    text = "ab\U0001f600" * 200_000
    for endpoint, long, short in (
            (COMPLETIONS, {"prompt": ids}, {"prompt": ids[:CHUNK_BYTES * MAX_PARTS]}),
            (COMPLETIONS, {"prompt": text}, {"prompt": text[:CHUNK_BYTES * MAX_PARTS]}),
            (CHAT, {"messages": [{"role": "user", "content": str(n)} for n in range(900)]},
             {"messages": [{"role": "user", "content": str(n)} for n in range(300)]})):
        long_req = _request(endpoint, {"model": "auto", **long})
        short_req = _request(endpoint, {"model": "auto", **short})
        assert long_req is not None and short_req is not None
        long_prefix, short_prefix = prefix_of(long_req), prefix_of(short_req)
        assert long_prefix is not None and short_prefix is not None
        assert long_prefix.keys == short_prefix.keys
        assert long_prefix.total == short_prefix.total


def test_an_end_asked_by_negative_index_or_past_the_tip_is_a_list_s() -> None:
    """`end(-1)` of a fresh chain raised IndexError (its empty head list was indexed from
    its end) and, once the head was found, gave the first message's end; `end(len)` gave
    a tail end instead of IndexError."""
    messages = [{"role": "user", "content": f"message {n}"} for n in range(6)]
    req = _request(CHAT, {"model": "auto", "messages": messages})
    assert req is not None
    full = prefix_of(req)
    assert full is not None
    ends = full.ends
    for ask_first in ("nothing", "head", "tail"):
        lazy = prefix_of(req)
        assert lazy is not None
        if ask_first == "head":
            lazy.chain.first_at_least(1)
        elif ask_first == "tail":
            lazy.chain[-1]
        assert [lazy.chain.end(i) for i in range(-6, 6)] == [ends[i] for i in range(-6, 6)]
        for past in (6, -7):
            with pytest.raises(IndexError):
                lazy.chain.end(past)
