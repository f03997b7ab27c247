"""Odd prompts through the proxy's public endpoints with prefix-cache affinity on (the
default): every one is planned (its hash chain asked for keys, remembered, asked again)
and answered, never a 500. The openai SDK for chat, completions and Responses, the
anthropic SDK for Messages; simulators behind."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from proxy.api.state import STATE
from proxy.routing.affinity import LocalPrefixStore
from proxy.routing.chain import CHUNK_BYTES, MAX_BYTES, MAX_PARTS
from tests.conftest import MakeProxy, MakeSim
from tests.test_balance_e2e import sdk, twins

PARTS_PAST_CUT = MAX_BYTES // 50
BOUNDARY = "a\n  },\n  {\n  }\n]} },{ \"}\" é 日本 \U0001f600"


def chat_bodies() -> dict[str, list[dict[str, Any]]]:
    many = [{"role": "user" if n % 2 else "assistant", "content": f"turn {n} " * 8}
            for n in range(MAX_PARTS + 1)]
    return {
        "one message": [{"role": "user", "content": "hello " * 300}],
        "MAX_PARTS messages": many[:MAX_PARTS],
        "MAX_PARTS + 1 messages": many,
        # Indented, a text part is twice its compact size: the body stays under the
        # simulator's 1 MiB (aiohttp's client_max_size) while the chain is cut.
        "cut by MAX_BYTES inside a message": [
            {"role": "system", "content": "s" * 1000},
            {"role": "user", "content": [{"type": "text", "text": "a"}] * PARTS_PAST_CUT},
            {"role": "user", "content": "after the cut"}],
        "boundary text in content": [
            {"role": "system", "content": BOUNDARY * 40},
            {"role": "user", "content": [{"type": "text", "text": BOUNDARY},
                                         {"type": "text", "text": "}" * 500}]}],
    }


async def test_odd_prompts_are_planned_with_affinity_and_answered_twice(
        make_sim: MakeSim, make_proxy: MakeProxy) -> None:
    _, proxy = await twins(make_sim, make_proxy)
    client = sdk(proxy)
    for name, messages in chat_bodies().items():
        for _ in range(2):  # the second time the chain is known: a lookup finds it
            tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
            answer = await client.chat.completions.create(
                model="twin", messages=messages,  # type: ignore[arg-type]
                tools=tools if name.startswith("boundary") else [])  # type: ignore[arg-type]
            assert answer.choices[0].message.content, name
    prompts: list[Any] = ["p" * CHUNK_BYTES, "é" * (3 * CHUNK_BYTES), "x",
                          ["first " * 300, "second " * 300]]
    for prompt in prompts:
        for _ in range(2):
            done = await client.completions.create(model="twin", prompt=prompt,
                                                   max_tokens=8)
            assert done.choices, type(prompt)
    # Token ids are planned (chained) like text; the simulator takes text only, and its
    # 400 comes back as it is.
    for ids in (list(range(5000)), [list(range(2000))]):
        for _ in range(2):
            with pytest.raises(openai.BadRequestError, match="non-empty array of strings"):
                await client.completions.create(model="twin", prompt=ids, max_tokens=8)
    for _ in range(2):
        response = await client.responses.create(
            model="twin", instructions=BOUNDARY * 50,
            input=[{"role": "user", "content": BOUNDARY * 20},
                   {"role": "assistant", "content": "ok"},
                   {"role": "user", "content": "}\n  },\n  {\n"}])
        assert response.output_text
        message = await anthropic.AsyncAnthropic(
            base_url=proxy.url, api_key="x", max_retries=0, timeout=60).messages.create(
            model="twin", max_tokens=16, system=BOUNDARY * 50,
            messages=[{"role": "user", "content": BOUNDARY * 20},
                      {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": [{"type": "text", "text": "}"},
                                                   {"type": "text", "text": BOUNDARY}]}])
        assert message.content
    store = proxy.app[STATE].planner.affinity.store
    assert isinstance(store, LocalPrefixStore) and len(store) > MAX_PARTS
