#!/usr/bin/env python3
"""Planning cost per request: requirements + filters + scores + plan, for N instances."""

from __future__ import annotations

import argparse
import time

import orjson

from proxy.api.inbound import CHAT, parse_request
from proxy.config import parse_config
from proxy.health.registry import Registry
from proxy.health.states import READY
from proxy.routing.planner import Planner


def measure(instances: int = 10, rounds: int = 20000, history: int = 0,
            affinity: bool = True, repeats: int = 15) -> float:
    """Microseconds per plan: the best of `repeats` runs of `rounds // 5` plans (on a
    shared, noisy machine the minimum is the figure that repeats). With `history`, the
    request is a conversation of that many messages whose prefix (all but its last two
    messages) an instance served before: a prefix-cache affinity hit (routing.affinity is
    on by default; `affinity=False` turns it off)."""
    config = parse_config({"routing": {"affinity": {"enabled": affinity}},
                           "providers": [{"provider_id": "p", "instances": [
        {"id": f"i{n}", "base_url": f"http://127.0.0.1:{20000 + n}",
         "metadata": {"model": f"m{n % 3}", "tags": ["coding"] if n % 2 else ["general"],
                      "ctx": 8192 * (1 + n % 4), "capabilities": ["tools", "json"]}}
        for n in range(instances)]}]})
    registry = Registry(config.instances)
    for n, state in enumerate(registry.states):
        state.state = READY
        state.ttfb_ewma_ms = 20.0 + n
    planner = Planner(config, registry)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "fix this python bug: the loop never ends " * 5}]
    for n in range(history - len(messages)):
        messages.append({"role": "assistant" if n % 2 == 0 else "user",
                         "content": f"turn {n}: the loop ends when the counter wraps " * 4})
    body = orjson.dumps({"model": "auto", "max_tokens": 256, "user": "bench",
                         "messages": messages})
    req = parse_request(CHAT, body, "r")
    if history:
        before = parse_request(CHAT, orjson.dumps({"model": "auto",
                                                   "messages": messages[:-2]}), "r0")
        planner.served(planner.plan(before, {}), registry.states[5].id)
    headers: dict[str, str] = {}
    best = float("inf")
    runs = max(1, rounds // 5)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(runs):
            planner.plan(req, headers)
        best = min(best, (time.perf_counter() - t0) / runs * 1e6)
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--history", type=int, default=0,
                        help="messages of a conversation whose prefix is cached (0: two)")
    args = parser.parse_args()
    print(f"planning cost, {args.instances} instances: "
          f"{measure(args.instances, args.rounds, args.history):.1f} us per request")
